// Retention deleted what a client missed while offline: `truncated` is reported with the first
// seq the application will never see, and delivery continues from the oldest stored message.
// A real node: SQLite, SEQCAST_RETENTION=1s, retention job every second.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { SeqcastClient } from '../src/index.js';
import { freePort, startNode, waitFor, WebSocket } from './helpers.js';

let node;
before(async () => {
  node = await startNode({ SEQCAST_RETENTION: '1s', SEQCAST_JOB_INTERVAL: '1s' });
});
after(async () => {
  await node?.stop();
});

async function post(room, body) {
  const res = await fetch(`${node.http}/v1/rooms/${room}/messages`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ body }),
  });
  assert.equal(res.status, 201);
  return (await res.json()).seq;
}

test('truncated is reported after retention deleted the messages missed offline', async () => {
  // While `offline`, the client's connection attempts go to a port nothing listens on.
  const dead = `ws://127.0.0.1:${await freePort()}/v1/ws`;
  const gate = { offline: false, sockets: [] };
  class Gated extends WebSocket {
    constructor(url) {
      super(gate.offline ? dead : url);
      gate.sockets.push(this);
    }
  }
  const c = new SeqcastClient({ url: node.ws, WebSocket: Gated, backoff: { base: 100, cap: 300 } });
  c.on('error', () => {});
  const seen = [];
  const truncated = [];
  c.on('message', (m) => seen.push(m.seq));
  c.on('truncated', (t) => truncated.push(t));
  try {
    await c.join('trunc');
    for (let i = 1; i <= 3; i++) await post('trunc', i);
    await waitFor(() => seen.length === 3, 5000, 'messages 1..3');

    gate.offline = true;
    gate.sockets.at(-1).terminate();
    for (let i = 4; i <= 6; i++) await post('trunc', i);
    // Retention deletes everything older than a second (the room's head stays 6).
    await waitFor(
      async () => (await (await fetch(`${node.http}/v1/rooms/trunc`)).json()).first === 7,
      15000,
      'retention to delete messages 1..6',
    );
    gate.offline = false;
    await waitFor(() => truncated.length === 1, 10000, 'truncated');
    assert.deepEqual(truncated[0], { room: 'trunc', first: 7, head: 6, lostFrom: 4 });
    assert.equal(c.lastSeq('trunc'), 6);
    assert.equal(await post('trunc', 7), 7);
    await waitFor(() => seen.length === 4, 5000, 'message 7');
    assert.deepEqual(seen, [1, 2, 3, 7]);
    console.log(`truncated: messages 4..6 lost to retention reported as ${JSON.stringify(truncated[0])}; then saw 7`);
  } finally {
    c.close();
  }
});
