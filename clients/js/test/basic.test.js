// Single node (SQLite, development mode): join, send, ack, message, idem, history paging.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { SeqcastClient, SeqcastError } from '../src/index.js';
import { startNode, waitFor, WebSocket } from './helpers.js';

let node;
before(async () => {
  node = await startNode();
});
after(async () => {
  await node?.stop();
});

function client(extra = {}) {
  return new SeqcastClient({ url: node.ws, WebSocket, ...extra });
}

test('join, send, ack and message; every send gets an idem', async () => {
  const c = client();
  const seen = [];
  c.on('message', (m) => seen.push(m));
  try {
    const joined = await c.join('basic');
    assert.equal(joined.head, 0);
    assert.equal(joined.first, 1);
    const acks = await Promise.all([1, 2, 3].map((i) => c.send('basic', { text: `m${i}` })));
    assert.deepEqual(
      acks.map((a) => a.seq),
      [1, 2, 3],
    );
    for (const a of acks) assert.ok(a.id && a.ts && a.room === 'basic');
    await waitFor(() => seen.length === 3, 5000, 'three messages');
    assert.deepEqual(
      seen.map((m) => [m.seq, m.body.text]),
      [
        [1, 'm1'],
        [2, 'm2'],
        [3, 'm3'],
      ],
    );
    assert.match(seen[0].from, /^anon-/);
    assert.equal(c.lastSeq('basic'), 3);
    assert.equal(c.pendingSends, 0);
    console.log(`basic: ${seen.length} messages seen, acks ${acks.map((a) => a.seq).join(',')}`);
  } finally {
    c.close();
  }
});

test('a repeated idem is stored once and acked with the original seq', async () => {
  const c = client();
  try {
    const first = await c.send('idem', { text: 'once' }, { idem: 'fixed-1' });
    const again = await c.send('idem', { text: 'once' }, { idem: 'fixed-1' });
    assert.deepEqual(again, first);
    // Generated idems differ: two identical bodies are two messages.
    const a = await c.send('idem', { text: 'twice' });
    const b = await c.send('idem', { text: 'twice' });
    assert.equal(b.seq, a.seq + 1);
    const page = await c.history('idem', { after: 0 });
    assert.deepEqual(
      page.messages.map((m) => m.body.text),
      ['once', 'twice', 'twice'],
    );
  } finally {
    c.close();
  }
});

test('join with since replays what was missed, then the live stream', async () => {
  const writer = client();
  const reader = client();
  const seen = [];
  reader.on('message', (m) => seen.push(m.seq));
  try {
    for (let i = 1; i <= 5; i++) await writer.send('replay', i);
    await reader.join('replay', { since: 2 });
    await writer.send('replay', 6);
    await waitFor(() => seen.length === 4, 5000, 'replay and live');
    assert.deepEqual(seen, [3, 4, 5, 6]);
  } finally {
    writer.close();
    reader.close();
  }
});

test('history pages forwards with after and backwards with before', async () => {
  const c = client();
  try {
    for (let i = 1; i <= 7; i++) await c.send('paging', { n: i });
    const p1 = await c.history('paging', { after: 0, limit: 3 });
    assert.deepEqual(
      p1.messages.map((m) => m.seq),
      [1, 2, 3],
    );
    assert.equal(p1.has_more, true);
    assert.equal(p1.head, 7);
    const p2 = await c.history('paging', { after: 3, limit: 10 });
    assert.deepEqual(
      p2.messages.map((m) => m.body.n),
      [4, 5, 6, 7],
    );
    assert.equal(p2.has_more, false);
    const back = await c.history('paging', { before: 6, limit: 2 });
    assert.deepEqual(
      back.messages.map((m) => m.seq),
      [4, 5],
    );
    assert.equal(back.has_more, true);
    await assert.rejects(c.history('paging', { limit: 0 }), (e) => e instanceof SeqcastError && e.code === 'bad_request');
  } finally {
    c.close();
  }
});

test('bad_request and too_large reject the send; the connection stays', async () => {
  const c = client();
  try {
    await assert.rejects(c.send('bad room!', 1), (e) => e.code === 'bad_request');
    await assert.rejects(c.send('big', 'x'.repeat(70 * 1024)), (e) => e.code === 'too_large');
    const ack = await c.send('big', 'small');
    assert.equal(ack.seq, 1);
    assert.equal(c.state, 'open');
  } finally {
    c.close();
  }
});

test('close() rejects what is pending and stops reconnecting', async () => {
  const c = client({ connect: false });
  const p = c.send('closing', 1);
  c.close();
  await assert.rejects(p, (e) => e.code === 'closed');
  assert.equal(c.state, 'closed');
});
