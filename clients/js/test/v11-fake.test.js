// v1.1 frames against a FAKE server (helpers.js `fakeServer`, not seqcast) and the presence
// bookkeeping (src/presence.js) on its own: signals (sent, received, refused, never resent or
// buffered), read cursors (never moving back) and presence (set, count-only mode, full lists,
// rejoin with presence after a reconnect).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { SeqcastClient } from '../src/index.js';
import { applyPresenceFrame, presenceFromJoined, presenceView, replacePresence } from '../src/presence.js';
import { fakeServer, waitFor, WebSocket } from './helpers.js';

const joined = (f, extra = {}) => ({ type: 'joined', room: f.room, head: 0, first: 1, ref: f.ref, ...extra });

/** A fake server whose latest connection can be pushed frames (`push`) and cut (`cut`). */
async function scripted(onFrame = () => {}) {
  let socket = null;
  const server = await fakeServer((f, reply, s) => {
    socket = s;
    onFrame(f, reply);
  });
  server.push = (f) => socket.send(JSON.stringify(f));
  server.cut = () => socket.close(1012, 'drain');
  return server;
}

function client(server, extra = {}) {
  return new SeqcastClient({ url: server.url, WebSocket, drainJitter: 10, backoff: { base: 10, cap: 20 }, ...extra });
}

test('presence.js: set updates, count-only mode, full lists and replacement diffs', () => {
  let s = presenceFromJoined({ presence: ['alice', 'bob'] });
  assert.deepEqual(presenceView(s), { users: ['alice', 'bob'], count: 2 });
  assert.equal(presenceFromJoined({ head: 1 }), undefined, 'no presence field: unknown');
  let r = applyPresenceFrame('r', s, { joined: ['carol', 'alice'], left: ['bob', 'zed'] });
  assert.deepEqual([r.change.joined, r.change.left, r.change.users], [['carol'], ['bob'], ['alice', 'carol']]);
  r = applyPresenceFrame('r', r.state, { joined: [], left: [] });
  assert.equal(r.change, null, 'empty lists change nothing');
  r = applyPresenceFrame('r', r.state, { joined: ['alice'] });
  assert.equal(r.change, null, 'a user already present');
  r = applyPresenceFrame('r', r.state, { count: 5000 });
  assert.deepEqual(presenceView(r.state), { users: null, count: 5000 });
  assert.equal(r.change.users, null);
  r = applyPresenceFrame('r', r.state, { joined: ['x'], left: ['y', 'z'] });
  assert.equal(r.state.count, 4999, 'count-only: deltas move the count');
  r = applyPresenceFrame('r', r.state, { users: ['dan', 'eve'] });
  assert.deepEqual([r.change.joined, r.change.left, r.change.count], [['dan', 'eve'], [], 2]);
  s = presenceFromJoined({ presence_count: 12 });
  assert.deepEqual(presenceView(s), { users: null, count: 12 });
  const c = replacePresence('r', presenceFromJoined({ presence: ['a', 'b'] }), presenceFromJoined({ presence: ['b', 'c'] }));
  assert.deepEqual([c.joined, c.left, c.users], [['c'], ['a'], ['b', 'c']]);
  assert.equal(replacePresence('r', presenceFromJoined({ presence: ['a'] }), presenceFromJoined({ presence: ['a'] })), null);
});

test('fake server: signals are sent, received and refused, never buffered nor resent after a reconnect', async () => {
  const server = await scripted((f, reply) => {
    if (f.type === 'join') reply(joined(f));
    if (f.type === 'read') reply({ type: 'read', room: f.room, seq: 0, ref: f.ref });
    if (f.type === 'signal' && f.body === 'too big') {
      reply({ type: 'error', code: 'too_large', message: 'signal too large', ref: f.ref });
    }
  });
  const c = client(server, { connect: false });
  const signals = [];
  const errors = [];
  c.on('signal', (s) => signals.push(s));
  c.on('error', (e) => errors.push(e));
  try {
    assert.equal(c.signal('r', { typing: true }), false, 'not connected: dropped');
    c.connect();
    await c.join('r');
    assert.equal(c.signal('r', { typing: true }), true);
    assert.equal(c.signal('r', 'too big'), true);
    await waitFor(() => errors.length === 1, 5000, 'the refusal');
    assert.equal(errors[0].code, 'too_large');
    assert.deepEqual([errors[0].op, errors[0].room, errors[0].body], ['signal', 'r', 'too big']);
    server.push({ type: 'signal', room: 'r', from: 'bob', body: { typing: true } });
    await waitFor(() => signals.length === 1, 5000, 'a signal');
    assert.deepEqual(signals[0], { room: 'r', from: 'bob', body: { typing: true } });
    const sent = server.frames.filter((f) => f.type === 'signal');
    assert.equal(sent.length, 2, 'the offline one never went out');
    assert.deepEqual(Object.keys(sent[0]).sort(), ['body', 'ref', 'room', 'type']);
    server.cut();
    await waitFor(() => server.frames.filter((f) => f.type === 'join').length === 2, 5000, 'the rejoin');
    await c.read('r', 0); // a round trip on the new connection: frames before it were logged
    assert.equal(server.frames.filter((f) => f.type === 'signal').length, 2, 'no signal resent');
  } finally {
    c.close();
    await server.close();
  }
});

test('fake server: read resolves with the reply; the cursor keeps the largest seen, from joined too', async () => {
  const server = await scripted((f, reply) => {
    if (f.type === 'join') reply(joined(f, { head: 60, read: 40 }));
    // The server caps at the head and never moves back.
    if (f.type === 'read' && f.seq === 13) reply({ type: 'error', code: 'forbidden', message: 'no', ref: f.ref });
    else if (f.type === 'read') reply({ type: 'read', room: f.room, seq: Math.min(60, Math.max(f.seq, 50)), ref: f.ref });
  });
  const c = client(server);
  const moves = [];
  c.on('read', (r) => moves.push(r));
  try {
    assert.equal(c.readCursor('r'), undefined);
    const j = await c.join('r');
    assert.equal(j.read, 40);
    assert.equal(c.readCursor('r'), 40, 'joined sets it');
    assert.equal(await c.read('r', 57), 57);
    assert.equal(c.readCursor('r'), 57);
    const { ref, ...frame } = server.frames.find((f) => f.type === 'read');
    assert.deepEqual(frame, { type: 'read', room: 'r', seq: 57 });
    assert.equal(typeof ref, 'number');
    // Another device's moves, out of order: 59 then 58 (late). Unsolicited, no ref.
    server.push({ type: 'read', room: 'r', seq: 59 });
    server.push({ type: 'read', room: 'r', seq: 58 });
    server.push({ type: 'read', room: 'other', seq: 3 }); // a room not joined: kept too
    await waitFor(() => c.readCursor('other') === 3, 5000, 'the other room');
    assert.equal(c.readCursor('r'), 59, 'never moves back');
    assert.deepEqual(moves, [{ room: 'r', seq: 59 }, { room: 'other', seq: 3 }], 'the late 58 is not reported');
    // A rejoin whose joined carries an older cursor does not move it back either.
    const rejoined = new Promise((r) => c.once('rejoined', r));
    c.reconnect();
    await rejoined;
    assert.equal(c.readCursor('r'), 59);
    await assert.rejects(c.read('r', 13), (e) => e.code === 'forbidden');
    c.close();
    await assert.rejects(c.read('r', 1), (e) => e.code === 'offline');
  } finally {
    c.close();
    await server.close();
  }
});

test('fake server: presence set, deltas, count-only and full lists; rejoin asks again and diffs', async () => {
  let conn = 0;
  const server = await scripted((f, reply) => {
    if (f.type === 'leave') reply({ type: 'left', room: f.room, ref: f.ref });
    if (f.type !== 'join') return;
    conn += 1;
    // After the reconnect: bob left and dan arrived meanwhile.
    reply(joined(f, f.presence ? { presence: conn === 1 ? ['alice', 'bob'] : ['alice', 'carol', 'dan'] } : {}));
  });
  const c = client(server);
  const changes = [];
  c.on('presence', (p) => changes.push(p));
  try {
    const j = await c.join('r', { presence: true });
    assert.deepEqual(j.presence, ['alice', 'bob']);
    assert.equal(server.frames[0].presence, true);
    assert.deepEqual(c.presence('r'), { users: ['alice', 'bob'], count: 2 });
    assert.deepEqual(changes[0], { room: 'r', joined: ['alice', 'bob'], left: [], users: ['alice', 'bob'], count: 2 });
    server.push({ type: 'presence', room: 'r', joined: ['carol'] });
    server.push({ type: 'presence', room: 'r', left: ['nobody'] }); // changes nothing: no event
    server.push({ type: 'presence', room: 'other', joined: ['x'] }); // not joined: ignored
    await waitFor(() => c.presence('r').count === 3, 5000, 'carol');
    c.reconnect();
    await waitFor(() => changes.length === 3, 5000, 'the rejoin diff');
    const joins = server.frames.filter((f) => f.type === 'join');
    assert.equal(joins.length, 2);
    assert.equal(joins[1].presence, true, 'the rejoin asks for presence again');
    assert.deepEqual([changes[2].joined, changes[2].left], [['dan'], ['bob']]);
    assert.deepEqual(c.presence('r'), { users: ['alice', 'carol', 'dan'], count: 3 });
    // The room grows very large: only the count; then small again: a full list.
    server.push({ type: 'presence', room: 'r', count: 20000 });
    await waitFor(() => c.presence('r').users === null, 5000, 'count-only');
    assert.equal(c.presence('r').count, 20000);
    server.push({ type: 'presence', room: 'r', users: ['erin'] });
    await waitFor(() => c.presence('r').users?.length === 1, 5000, 'a full list');
    assert.deepEqual(changes.at(-1), { room: 'r', joined: ['erin'], left: [], users: ['erin'], count: 1 });
    assert.equal(changes.length, 5);
    // A room joined without presence tracks none.
    await c.join('plain');
    assert.equal(c.presence('plain'), undefined);
    assert.equal(server.frames.filter((f) => f.type === 'join').at(-1).presence, undefined);
    await c.leave('r');
    assert.equal(c.presence('r'), undefined);
  } finally {
    c.close();
    await server.close();
  }
});

test('fake server: joined with presence_count (very large room) tracks only the count', async () => {
  const server = await scripted((f, reply) => {
    if (f.type === 'join') reply(joined(f, { presence_count: 70000 }));
  });
  const c = client(server);
  try {
    const j = await c.join('big', { presence: true });
    assert.equal(j.presenceCount, 70000);
    assert.equal(j.presence, undefined);
    assert.deepEqual(c.presence('big'), { users: null, count: 70000 });
    server.push({ type: 'presence', room: 'big', count: 70001 });
    await waitFor(() => c.presence('big').count === 70001, 5000, 'the new count');
  } finally {
    c.close();
    await server.close();
  }
});
