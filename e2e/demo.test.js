// The demo page (served by seqcast at /) in a real browser: Debian's Chromium, driven by
// playwright-core, against a real 2-node cluster (Postgres, Redis; deploy/local/cluster.sh).
// Alice's page is served by node 1, Bob's by node 2. They exchange messages; then Bob's node is
// killed, Alice keeps typing, the node comes back, and Bob's page must show every message once,
// in order, without a reload. Screenshots go to e2e/artifacts/ (paths printed).
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const REPO = resolve(here, '..');
const SEQCAST_BIN = process.env.SEQCAST_BIN ?? join(REPO, 'target/debug/seqcast');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const CLUSTER = join(REPO, 'deploy/local/cluster.sh');
const ARTIFACTS = join(here, 'artifacts');
const OFFLINE_MESSAGES = 12;

let cluster;
let browser;

function freePort() {
  return new Promise((res, rej) => {
    const server = createServer();
    server.once('error', rej);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => res(port));
    });
  });
}

/** `deploy/local/cluster.sh up` with 2 nodes, until it prints its URL. */
async function startCluster() {
  assert.ok(existsSync(SEQCAST_BIN), `no seqcast binary at ${SEQCAST_BIN}: cargo build -p seqcast`);
  const dir = mkdtempSync(join(tmpdir(), 'seqcast-e2e-'));
  rmSync(dir, { recursive: true, force: true });
  const port = await freePort();
  const child = spawn('bash', [CLUSTER, 'up', '--nodes', '2', '--port', String(port), '--dir', dir,
    '--binary', SEQCAST_BIN], { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  child.stderr.setEncoding('utf8').on('data', (chunk) => (log += chunk));
  child.stdout.setEncoding('utf8');
  await new Promise((res, rej) => {
    const timer = setTimeout(() => rej(new Error(`cluster.sh up: no URL within 120 s\n${log}`)), 120000);
    child.stdout.on('data', (chunk) => {
      if (/seqcast cluster of 2 nodes/.test(chunk)) {
        clearTimeout(timer);
        res();
      }
    });
    child.once('exit', (code) => rej(new Error(`cluster.sh up exited ${code}\n${log}`)));
  });
  const nodeUrl = (i) => `http://127.0.0.1:${readFileSync(join(dir, `node-${i}.port`), 'utf8').trim()}`;
  const node = (command, i) => execFileSync('bash', [CLUSTER, command, '--dir', dir, String(i)],
    { stdio: ['ignore', 'ignore', 'inherit'] });
  return {
    nodeUrl,
    node,
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((res) => child.once('exit', res));
        child.kill('SIGTERM');
        await exited;
      }
    },
  };
}

before(async () => {
  assert.ok(existsSync(CHROMIUM),
    `no Chromium at ${CHROMIUM}: apt-get install -y chromium (or set CHROMIUM=/path/to/chrome)`);
  mkdirSync(ARTIFACTS, { recursive: true });
  cluster = await startCluster();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu'],
  });
});

after(async () => {
  await browser?.close();
  await cluster?.stop();
});

/** A page of the demo for `name`, served by node `i`, joined to `room`. */
async function openPage(name, i, room) {
  const page = await browser.newPage({ viewport: { width: 900, height: 600 } });
  page.errors = [];
  page.on('pageerror', (error) => page.errors.push(error.message));
  page.on('console', (message) => {
    // Chromium itself logs each refused reconnect while a node is down: expected, not the page's.
    const refused = /^WebSocket connection to .* failed/.test(message.text());
    if (message.type() === 'error' && !refused) page.errors.push(message.text());
  });
  await page.goto(`${cluster.nodeUrl(i)}/?name=${name}&room=${room}`);
  await page.waitForSelector('#state[data-state="open"]', { timeout: 20000 });
  await page.waitForSelector(`#rooms li[data-room="${room}"].current`);
  assert.equal(await page.isHidden('#login'), true, 'the login form gives way to the chat');
  return page;
}

/** Types `text` into the composer and sends it. */
async function say(page, text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}

/** The messages the page shows: [seq, from, text], top to bottom. */
function shown(page) {
  return page.$$eval('#messages li[data-seq]', (lines) => lines.map((li) => [
    Number(li.dataset.seq),
    li.querySelector('.from').textContent,
    li.querySelector('.text').textContent,
  ]));
}

async function waitShown(page, count, what) {
  await page.waitForFunction((n) => document.querySelectorAll('#messages li[data-seq]').length >= n,
    count, { timeout: 60000 }).catch((error) => {
    throw new Error(`${what}: fewer than ${count} messages shown: ${error.message}`);
  });
}

async function screenshot(page, name) {
  const path = join(ARTIFACTS, `${name}.png`);
  await page.screenshot({ path, fullPage: true });
  console.log(`screenshot: ${path}`);
}

test('two pages on two nodes; the page whose node is killed catches up exactly once, in order', async () => {
  const room = 'demo';
  const alice = await openPage('alice', 1, room);
  const bob = await openPage('bob', 2, room);

  await say(alice, 'hello from alice');
  await waitShown(bob, 1, 'bob sees alice');
  await say(bob, 'hi alice, bob here');
  await waitShown(alice, 2, 'alice sees bob');
  assert.deepEqual(await shown(bob), [[1, 'alice', 'hello from alice'], [2, 'bob', 'hi alice, bob here']]);
  await screenshot(alice, '1-alice-node1');
  await screenshot(bob, '1-bob-node2');

  // Bob's node dies (SIGKILL: no close frame); his page notices and keeps trying.
  cluster.node('kill', 2);
  await bob.waitForSelector('#state:not([data-state="open"])', { timeout: 30000 });
  for (let i = 1; i <= OFFLINE_MESSAGES; i++) {
    await say(alice, `while bob was away ${i}`);
    await waitShown(alice, 2 + i, 'alice sees her own message');
  }
  await screenshot(bob, '2-bob-offline');

  const restarted = Date.now();
  cluster.node('start', 2);
  await bob.waitForSelector('#state[data-state="open"]', { timeout: 60000 });
  const total = 2 + OFFLINE_MESSAGES;
  await waitShown(bob, total, 'bob catches up');
  const caughtUp = Date.now() - restarted;
  // A moment for any duplicate or stray message to show up before checking.
  await alice.waitForTimeout(500);

  const expected = [[1, 'alice', 'hello from alice'], [2, 'bob', 'hi alice, bob here']];
  for (let i = 1; i <= OFFLINE_MESSAGES; i++) expected.push([2 + i, 'alice', `while bob was away ${i}`]);
  assert.deepEqual(await shown(bob), expected, 'bob: every message once, in seq order');
  assert.deepEqual(await shown(alice), expected, 'alice: the same');

  // And the conversation goes on both ways.
  await say(bob, 'back');
  await waitShown(alice, total + 1, 'alice sees bob again');
  await screenshot(bob, '3-bob-caught-up');
  await screenshot(alice, '3-alice');
  console.log(`FIGURE bob's page: ${total} messages shown once each, in order; caught up ${caughtUp} ms after his node was started again`);

  // History: a fresh page scrolls back with "Load older" (page size 50: all 15 fit, so no button).
  const carol = await openPage('carol', 1, room);
  await waitShown(carol, total + 1, 'carol sees the history');
  assert.equal(await carol.isHidden('#older'), true);
  for (const page of [alice, bob, carol]) assert.deepEqual(page.errors, [], 'no page errors');
});

test('scrolling back through history pages of 50', async () => {
  const room = 'history';
  // 120 messages posted over HTTP (development mode: the API acts with the server key).
  for (let i = 1; i <= 120; i++) {
    const res = await fetch(`${cluster.nodeUrl(1)}/v1/rooms/${room}/messages`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ body: { text: `old ${i}` }, idem: `e2e-${i}` }),
    });
    assert.equal(res.status, 201);
  }
  const page = await openPage('dave', 2, room);
  await waitShown(page, 50, 'the last page');
  assert.deepEqual((await shown(page)).map(([seq]) => seq)[0], 71);
  await page.click('#older');
  await waitShown(page, 100, 'one page older');
  await page.click('#older');
  await waitShown(page, 120, 'the oldest page');
  assert.equal(await page.isHidden('#older'), true, 'no older messages left');
  const seqs = (await shown(page)).map(([seq]) => seq);
  assert.deepEqual(seqs, Array.from({ length: 120 }, (_, k) => k + 1));
  await screenshot(page, '4-history');
  assert.deepEqual(page.errors, []);
});
