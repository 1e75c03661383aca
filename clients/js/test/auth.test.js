// Tokens: first-frame auth (never in the URL), refresh before expiry, 1008 handling.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { SeqcastClient } from '../src/index.js';
import { mintToken, recordingWebSocket, startNode, waitFor } from './helpers.js';

const SECRET = 'js-client-test-secret';
let node;
before(async () => {
  // No leeway: a connection whose token is not refreshed is closed right at exp.
  node = await startNode({ SEQCAST_JWT_SECRET: SECRET, SEQCAST_JWT_LEEWAY: '0s' });
});
after(async () => {
  await node?.stop();
});

const now = () => Math.floor(Date.now() / 1000);
const token = (ttl, sub = 'alice') => mintToken(SECRET, { sub, exp: now() + ttl, rooms: ['*'] });

test('the token goes in the first frame, never in the URL', async () => {
  const rec = recordingWebSocket();
  const issued = [];
  const c = new SeqcastClient({
    url: node.ws,
    WebSocket: rec.WebSocket,
    getToken: async () => {
      issued.push(token(600));
      return issued.at(-1);
    },
  });
  const seen = [];
  c.on('message', (m) => seen.push(m));
  try {
    await c.join('auth-room');
    const ack = await c.send('auth-room', 'hello');
    await waitFor(() => seen.length === 1, 5000, 'own message');
    assert.equal(seen[0].from, 'alice'); // the server knows who we are: the token got there
    assert.equal(ack.seq, 1);
    assert.deepEqual(rec.urls, [node.ws]);
    for (const u of rec.urls) assert.ok(!u.includes('token') && !u.includes(issued[0]), `token in URL ${u}`);
  } finally {
    c.close();
  }
});

test('a token refreshed before exp keeps the connection past exp', async () => {
  const rec = recordingWebSocket();
  let calls = 0;
  const states = [];
  const c = new SeqcastClient({
    url: node.ws,
    WebSocket: rec.WebSocket,
    refreshMargin: 2000, // a 5 s token is refreshed at about 3 s
    getToken: () => {
      calls += 1;
      return token(5);
    },
  });
  c.on('state', (s) => states.push(s.state));
  const errors = [];
  c.on('error', (e) => errors.push(e));
  try {
    await c.join('refresh-room');
    const started = Date.now();
    // Past the first token's exp (5 s, leeway 0) and the second's (~8 s).
    await new Promise((r) => setTimeout(r, 9000));
    const ack = await c.send('refresh-room', 'still here');
    assert.equal(ack.seq, 1);
    assert.equal(rec.sockets.length, 1, 'one connection all along');
    assert.deepEqual(states, ['connecting', 'open']);
    assert.ok(calls >= 3, `getToken called ${calls} times`);
    assert.deepEqual(errors, []);
    console.log(
      `refresh: connection kept ${((Date.now() - started) / 1000).toFixed(1)} s with 5 s tokens, getToken called ${calls} times`,
    );
  } finally {
    c.close();
  }
});

test('without refresh the server closes with 1008 and the client reconnects with a fresh token', async () => {
  const rec = recordingWebSocket();
  let calls = 0;
  const codes = [];
  const c = new SeqcastClient({
    url: node.ws,
    WebSocket: rec.WebSocket,
    refreshMargin: -60000, // never refresh in time: "refresh" a minute after exp
    backoff: { base: 100, cap: 200 },
    getToken: () => {
      calls += 1;
      return token(2);
    },
  });
  c.on('state', (s) => s.code && codes.push(s.code));
  c.on('error', () => {});
  try {
    await c.join('expiry-room');
    await waitFor(() => codes.includes(1008) && c.state === 'open', 10000, 'reconnect after 1008');
    assert.ok(calls >= 2);
    assert.equal(rec.sockets.length, 2);
    assert.equal((await c.send('expiry-room', 'back')).seq, 1);
  } finally {
    c.close();
  }
});

test('a fixed token that is refused stops the client instead of looping', async () => {
  const c = new SeqcastClient({
    url: node.ws,
    WebSocket: recordingWebSocket().WebSocket,
    token: mintToken('wrong-secret', { sub: 'mallory', exp: now() + 600, rooms: ['*'] }),
  });
  const errors = [];
  c.on('error', (e) => errors.push(e.code));
  const joining = c.join('nope');
  await assert.rejects(joining, (e) => e.code === 'unauthorized');
  assert.equal(c.state, 'closed');
  assert.ok(errors.includes('unauthorized'));
});
