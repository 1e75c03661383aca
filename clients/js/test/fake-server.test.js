// Unit-level tests against a FAKE server (a scripted `ws` WebSocketServer, not seqcast), for
// what a healthy seqcast does not produce on demand: a gap in a room's seqs, a missing pong, a
// send answered `unavailable`.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { SeqcastClient } from '../src/index.js';
import { fakeServer, waitFor, WebSocket } from './helpers.js';

const msg = (room, seq) => ({ type: 'message', room, seq, id: `id-${seq}`, from: 'x', body: seq, ts: 't' });

test('fake server: a gap in seqs is not delivered; the client rejoins with since = last', async () => {
  const server = await fakeServer((f, reply) => {
    if (f.type !== 'join') return;
    if (f.since === undefined) {
      reply({ type: 'joined', room: f.room, head: 0, first: 1, ref: f.ref });
      [1, 2, 4, 5].forEach((s) => reply(msg(f.room, s))); // 3 is missing
    } else {
      reply({ type: 'joined', room: f.room, head: 5, first: 1, ref: f.ref });
      for (let s = f.since + 1; s <= 5; s++) reply(msg(f.room, s));
    }
  });
  const c = new SeqcastClient({ url: server.url, WebSocket });
  const seen = [];
  c.on('message', (m) => seen.push(m.seq));
  try {
    await c.join('gap');
    await waitFor(() => seen.length === 5, 5000, 'five messages');
    assert.deepEqual(seen, [1, 2, 3, 4, 5]);
    const joins = server.frames.filter((f) => f.type === 'join');
    assert.deepEqual(
      joins.map((f) => f.since),
      [undefined, 2],
    );
  } finally {
    c.close();
    await server.close();
  }
});

test('fake server: a missing pong marks the connection dead and the client reconnects', async () => {
  const server = await fakeServer((f, reply) => {
    if (f.type === 'join') reply({ type: 'joined', room: f.room, head: 0, first: 1, ref: f.ref });
    // pings are never answered
  });
  const c = new SeqcastClient({ url: server.url, WebSocket, pingInterval: 100, pongTimeout: 200, backoff: { base: 50, cap: 100 } });
  const errors = [];
  c.on('error', (e) => errors.push(e.code));
  try {
    await c.join('ping');
    await waitFor(() => server.connections >= 2, 5000, 'a second connection');
    assert.ok(errors.includes('timeout'));
    const joins = server.frames.filter((f) => f.type === 'join');
    assert.equal(joins[1].since, 0, 'the room is rejoined with since = last');
  } finally {
    c.close();
    await server.close();
  }
});

test('fake server: reconnect() drops the socket and rejoins at once with since', async () => {
  const server = await fakeServer((f, reply) => {
    if (f.type !== 'join') return;
    reply({ type: 'joined', room: f.room, head: 3, first: 1, ref: f.ref });
    if (f.since === undefined) reply(msg(f.room, 4));
  });
  const c = new SeqcastClient({ url: server.url, WebSocket, backoff: { base: 60000, cap: 60000 } });
  try {
    await c.join('fg');
    await waitFor(() => c.lastSeq('fg') === 4, 5000, 'message 4');
    c.reconnect();
    await waitFor(() => server.frames.filter((f) => f.type === 'join').length === 2, 5000, 'the rejoin');
    assert.equal(server.connections, 2);
    assert.equal(server.frames.filter((f) => f.type === 'join')[1].since, 4);
  } finally {
    c.close();
    await server.close();
  }
});

test('fake server: a send answered unavailable is retried with the same idem; forbidden rejects', async () => {
  let attempts = 0;
  const server = await fakeServer((f, reply) => {
    if (f.type !== 'send') return;
    if (f.room === 'nope') return reply({ type: 'error', code: 'forbidden', message: 'no', ref: f.ref });
    attempts += 1;
    if (attempts < 3) reply({ type: 'error', code: 'unavailable', message: 'db down', ref: f.ref });
    else reply({ type: 'ack', room: f.room, seq: 1, id: 'a', ts: 't', ref: f.ref });
  });
  const c = new SeqcastClient({ url: server.url, WebSocket, retryDelay: { base: 20, cap: 50 } });
  try {
    const ack = await c.send('retry', 'x');
    assert.equal(ack.seq, 1);
    const sends = server.frames.filter((f) => f.type === 'send');
    assert.equal(sends.length, 3);
    assert.equal(new Set(sends.map((f) => f.idem)).size, 1);
    await assert.rejects(c.send('nope', 'y'), (e) => e.code === 'forbidden');
    assert.equal(c.pendingSends, 0);
  } finally {
    c.close();
    await server.close();
  }
});
