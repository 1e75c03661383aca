// A 3-node cluster (Postgres, Redis, nginx in front: deploy/local/cluster.sh). A sender and a
// receiver, each a SeqcastClient through the load balancer on different nodes, while the sender
// streams N messages: the sender's node and then the receiver's node are SIGKILLed (test 1) or
// drained with SIGTERM, i.e. closed with 1012 (test 2). The receiving application must see every
// acked message exactly once and in order, and every send promise must resolve exactly once.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { SeqcastClient } from '../src/index.js';
import { alive, connectionsOpen, mintToken, startCluster, waitFor, WebSocket } from './helpers.js';

// With tokens: a send's idem is scoped to its user, and in development mode every connection is
// a new anonymous user, so a send resent after a reconnect would be stored a second time there.
const SECRET = 'cluster-test-secret';
const N = 900;
const RATE = 60; // sends per second (paced, so the stream outlasts both disruptions and a drain's delay)
const WINDOW = 10; // sends in flight at most

let cluster;
before(async () => {
  cluster = await startCluster({ nodes: 3, env: { SEQCAST_JWT_SECRET: SECRET } });
});
after(async () => {
  await cluster?.stop();
});

async function counts() {
  const out = [];
  for (let i = 1; i <= cluster.nodes; i++) {
    out.push(alive(cluster.nodePid(i)) ? await connectionsOpen(cluster.nodePort(i)).catch(() => 0) : 0);
  }
  return out;
}

/** Connects a client through the load balancer and finds the node it landed on (the node whose
 *  open-connection gauge went up by one). */
async function connectTracked(user, setup) {
  const beforeCounts = await counts();
  const client = new SeqcastClient({
    url: cluster.ws,
    WebSocket,
    getToken: () => mintToken(SECRET, { sub: user, exp: Math.floor(Date.now() / 1000) + 3600, rooms: ['*'] }),
  });
  client.on('error', () => {}); // reconnect noise (timeouts, refused upgrades) is expected here
  client.states = [];
  client.on('state', (st) => client.states.push({ t: Date.now(), ...st }));
  await setup(client);
  const node = await waitFor(
    async () => {
      const now = await counts();
      const i = now.findIndex((n, k) => n === beforeCounts[k] + 1);
      return i >= 0 ? i + 1 : 0;
    },
    5000,
    'the node a client landed on',
  );
  return { client, node };
}

/**
 * Streams N messages from a sender to a receiver (different nodes); `disrupt(node, who)` is
 * applied to the sender's node after N/4 acks and to the receiver's node after N/2.
 */
async function scenario(room, disrupt) {
  const seen = [];
  const receiverTimes = [];
  const { client: receiver, node: receiverNode } = await connectTracked('receiver', async (c) => {
    c.on('message', (m) => {
      seen.push(m);
      receiverTimes.push(Date.now());
    });
    await c.join(room);
  });
  const { client: sender, node: senderNode } = await connectTracked('sender', async (c) => {
    await c.send(`${room}-warmup`, 0);
  });
  assert.notEqual(senderNode, receiverNode, 'sender and receiver on different nodes');
  console.log(`${room}: receiver on node-${receiverNode}, sender on node-${senderNode}`);

  const acks = new Array(N);
  const ackTimes = [];
  let settled = 0;
  let rejected = 0;
  const disruptions = [];
  let next = 0;
  let acked = 0;
  const started = Date.now();

  async function maybeDisrupt() {
    if (disruptions.length === 0 && acked >= N / 4) {
      disruptions.push({ at: Date.now(), node: senderNode, who: 'sender' });
      await disrupt(senderNode);
    } else if (disruptions.length === 1 && acked >= N / 2) {
      disruptions.push({ at: Date.now(), node: receiverNode, who: 'receiver' });
      await disrupt(receiverNode);
    }
  }

  async function worker() {
    while (next < N) {
      const i = next++;
      const due = started + (i * 1000) / RATE;
      if (due > Date.now()) await new Promise((r) => setTimeout(r, due - Date.now()));
      try {
        const ack = await sender.send(room, { i });
        assert.equal(acks[i], undefined, `send ${i} resolved twice`);
        acks[i] = ack;
        ackTimes.push(Date.now());
        acked += 1;
      } catch (err) {
        rejected += 1;
        throw err;
      } finally {
        settled += 1;
      }
      await maybeDisrupt();
    }
  }
  await Promise.all(Array.from({ length: WINDOW }, worker));
  const sendSeconds = (Date.now() - started) / 1000;
  await waitFor(() => seen.length >= N, 60000, `receiver to see ${N} messages (has ${seen.length})`);
  // A little longer: anything beyond N would be a duplicate or an extra message.
  await new Promise((r) => setTimeout(r, 500));

  // Every send resolved once, with distinct seqs 1..N.
  assert.equal(settled, N);
  assert.equal(rejected, 0);
  const ackSeqs = acks.map((a) => a.seq).sort((a, b) => a - b);
  assert.deepEqual(
    ackSeqs,
    Array.from({ length: N }, (_, k) => k + 1),
  );
  // The receiver saw seq 1..N once each, in order, and each body once: nothing lost or doubled.
  const seqs = seen.map((m) => m.seq);
  const duplicates = seqs.length - new Set(seqs).size;
  assert.equal(duplicates, 0);
  assert.deepEqual(
    seqs,
    Array.from({ length: N }, (_, k) => k + 1),
  );
  assert.equal(new Set(seen.map((m) => m.body.i)).size, N);
  for (const m of seen) assert.equal(acks[m.body.i].seq, m.seq, 'message matches its ack');

  // Resumption of the disrupted client: when it saw its connection close, when it was open
  // again (authenticated, rejoined, unacked sends resent), and its first ack or message after.
  const firstAfter = (times, t) => times.find((x) => x >= t);
  for (const d of disruptions) {
    const c = d.who === 'sender' ? sender : receiver;
    const closed = c.states.find((st) => st.t >= d.at && st.state === 'reconnecting');
    assert.ok(closed, `the ${d.who} lost its connection`);
    const open = c.states.find((st) => st.t >= closed.t && st.state === 'open');
    assert.ok(open, `the ${d.who} reconnected`);
    d.code = closed.code;
    d.closedAfter = closed.t - d.at;
    d.reopenAfter = open.t - d.at;
    d.resumedAfter = firstAfter(d.who === 'sender' ? ackTimes : receiverTimes, open.t) - d.at;
    assert.ok(Number.isFinite(d.resumedAfter), `the ${d.who} got traffic after reconnecting`);
  }
  console.log(
    `${room}: ${N} sent in ${sendSeconds.toFixed(1)} s, ${N} acked, ${seen.length} messages seen, ` +
      `${duplicates} duplicates, 0 out of order`,
  );
  for (const d of disruptions) {
    console.log(
      `${room}: node-${d.node} (the ${d.who}'s): close ${d.code} seen after ${d.closedAfter} ms, ` +
        `open again after ${d.reopenAfter} ms, first ${d.who === 'sender' ? 'ack' : 'message'} after ` +
        `${d.resumedAfter} ms (times from the signal)`,
    );
  }
  sender.close();
  receiver.close();
  return disruptions;
}

test('SIGKILL of the sender node, then of the receiver node, mid-stream', async () => {
  await scenario('killed', async (node) => {
    process.kill(cluster.nodePid(node), 'SIGKILL');
  });
  // The next test needs three nodes again.
  for (let i = 1; i <= cluster.nodes; i++) if (!alive(cluster.nodePid(i))) await cluster.restartNode(i);
});

test('drain (SIGTERM, close 1012) of the sender node, then of the receiver node, mid-stream', async () => {
  await scenario('drained', async (node) => {
    process.kill(cluster.nodePid(node), 'SIGTERM');
  });
});
