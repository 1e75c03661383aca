// v1.1 against a real seqcast node (SQLite, tokens): signals, read cursors and presence between
// two clients.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { SeqcastClient } from '../src/index.js';
import { mintToken, startNode, waitFor, WebSocket } from './helpers.js';

const SECRET = 'js-client-v11-secret';
let node;
before(async () => {
  node = await startNode({ SEQCAST_JWT_SECRET: SECRET });
});
after(async () => {
  await node?.stop();
});

const now = () => Math.floor(Date.now() / 1000);
const client = (sub, extra = {}) =>
  new SeqcastClient({ url: node.ws, WebSocket, token: mintToken(SECRET, { sub, exp: now() + 600, rooms: ['*'] }), ...extra });

test('signals: the other client gets it with from, the sender does not; a refusal is an error event', async () => {
  const alice = client('alice');
  const bob = client('bob');
  const got = { alice: [], bob: [] };
  const errors = [];
  alice.on('signal', (s) => got.alice.push(s));
  bob.on('signal', (s) => got.bob.push(s));
  alice.on('error', (e) => errors.push(e));
  try {
    await alice.join('sig');
    await bob.join('sig');
    assert.equal(alice.signal('sig', { typing: true }), true);
    await waitFor(() => got.bob.length === 1, 5000, "bob's signal");
    assert.deepEqual(got.bob[0], { room: 'sig', from: 'alice', body: { typing: true } });
    assert.equal(alice.signal('sig', 'x'.repeat(5000)), true); // over SEQCAST_MAX_SIGNAL_BYTES
    await waitFor(() => errors.length === 1, 5000, 'the refusal');
    assert.deepEqual([errors[0].code, errors[0].op, errors[0].room], ['too_large', 'signal', 'sig']);
    bob.signal('sig', 'marker');
    await waitFor(() => got.alice.length === 1, 5000, "alice's marker");
    assert.deepEqual(got.alice, [{ room: 'sig', from: 'bob', body: 'marker' }], 'never its own');
    assert.equal(got.bob.length, 1, 'the refused one was not relayed');
    console.log(`signals: bob got ${got.bob.length}, alice got ${got.alice.length}, refusals ${errors.length}`);
  } finally {
    alice.close();
    bob.close();
  }
});

test("read cursors: a move reaches the user's other client; the cursor never moves back", async () => {
  const phone = client('carol');
  const laptop = client('carol');
  const other = client('dave');
  const moves = [];
  laptop.on('read', (r) => moves.push(r));
  const otherMoves = [];
  other.on('read', (r) => otherMoves.push(r));
  try {
    for (let i = 1; i <= 5; i++) await phone.send('rd', i);
    assert.equal((await phone.join('rd')).read, 0);
    await laptop.join('rd');
    await other.join('rd');
    assert.equal(await phone.read('rd', 3), 3);
    assert.equal(phone.readCursor('rd'), 3);
    await waitFor(() => moves.length === 1, 5000, "the laptop's move");
    assert.deepEqual(moves[0], { room: 'rd', seq: 3 });
    assert.equal(laptop.readCursor('rd'), 3);
    assert.equal(await laptop.read('rd', 2), 3, 'a lower seq leaves it');
    assert.equal(await laptop.read('rd', 99), 5, 'capped at the head');
    await waitFor(() => phone.readCursor('rd') === 5, 5000, "the phone's move");
    // A new client of the same user learns it from joined.
    const tablet = client('carol');
    try {
      assert.equal((await tablet.join('rd')).read, 5);
      assert.equal(tablet.readCursor('rd'), 5);
    } finally {
      tablet.close();
    }
    assert.equal(await other.read('rd', 1), 1, "dave's cursor is his own");
    assert.deepEqual(otherMoves, []);
    console.log(`read cursors: laptop saw moves ${moves.map((m) => m.seq).join(',')}`);
  } finally {
    phone.close();
    laptop.close();
    other.close();
  }
});

test('presence: a client joined with presence sees the other join and leave', async () => {
  const erin = client('erin');
  const frank = client('frank');
  const changes = [];
  erin.on('presence', (p) => changes.push(p));
  try {
    const joined = await erin.join('pres', { presence: true });
    // The joiner is present; frank is not yet.
    assert.deepEqual(joined.presence, ['erin']);
    await frank.join('pres');
    await waitFor(() => erin.presence('pres')?.users?.includes('frank'), 5000, 'frank present');
    assert.deepEqual(changes.at(-1).joined, ['frank']);
    await frank.leave('pres');
    await waitFor(() => !erin.presence('pres').users.includes('frank'), 5000, 'frank gone');
    assert.deepEqual(changes.at(-1).left, ['frank']);
    assert.equal(erin.presence('pres').count, erin.presence('pres').users.length);
  } finally {
    erin.close();
    frank.close();
  }
});
