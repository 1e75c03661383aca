// Test helpers: real seqcast processes (a single SQLite node, or a loopback cluster started by
// deploy/local/cluster.sh with Postgres, Redis and nginx), HS256 tokens, and waiting on
// conditions instead of sleeping.
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket, { WebSocketServer } from 'ws';

const here = dirname(fileURLToPath(import.meta.url));
export const REPO = resolve(here, '../../..');
export const SEQCAST_BIN = process.env.SEQCAST_BIN ?? resolve(here, '../../../target/debug/seqcast');
export { WebSocket };

/** Resolves when `cond()` is truthy (polled every 20 ms); rejects after `timeout` ms. */
export async function waitFor(cond, timeout = 10000, what = 'condition') {
  const deadline = Date.now() + timeout;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** An HS256 JWT signed with `secret`. */
export function mintToken(secret, claims) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
  const unsigned = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${unsigned}.${createHmac('sha256', secret).update(unsigned).digest('base64url')}`;
}

/** A TCP port nothing listened on a moment ago. */
export function freePort() {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.on('error', rej);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => res(port));
    });
  });
}

/** Waits for a line of `stream` matching `re`; resolves with the match. */
function lineMatching(child, stream, re, timeout, what) {
  return new Promise((res, rej) => {
    let buf = '';
    const timer = setTimeout(() => rej(new Error(`${what}: no line matching ${re} within ${timeout} ms`)), timeout);
    const onData = (chunk) => {
      buf += chunk;
      const m = buf.match(re);
      if (m) {
        clearTimeout(timer);
        stream.off('data', onData);
        res(m);
      }
    };
    stream.setEncoding('utf8');
    stream.on('data', onData);
    child.once('exit', (code) => {
      clearTimeout(timer);
      rej(new Error(`${what} exited (${code}) before printing ${re}`));
    });
  });
}

/** One seqcast node on SQLite in a temp dir, on a free port. `env`: extra SEQCAST_* settings. */
export async function startNode(env = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'seqcast-js-'));
  const child = spawn(SEQCAST_BIN, ['serve'], {
    env: {
      PATH: process.env.PATH,
      SEQCAST_LISTEN: '127.0.0.1:0',
      DATABASE_URL: `sqlite://${dir}/db.sqlite`,
      RUST_LOG: 'warn',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (c) => (stderr += c));
  const m = await lineMatching(child, child.stdout, /seqcast listening on http:\/\/(\S+)/, 30000, 'seqcast');
  child.stdout.resume();
  const addr = m[1];
  // It listens before its database is ready (503 "starting" until then).
  await waitFor(async () => (await fetch(`http://${addr}/ready`).catch(() => ({}))).status === 200, 30000, '/ready');
  return {
    http: `http://${addr}`,
    ws: `ws://${addr}/v1/ws`,
    get stderr() {
      return stderr;
    },
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGKILL');
        await exited;
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * A loopback cluster from deploy/local/cluster.sh: Postgres, Redis, `nodes` seqcast nodes and
 * nginx in front. `env`: SEQCAST_* settings every node inherits. `stop()` sends SIGTERM to the
 * script, which stops everything it started (and any node the test restarted, through its pid
 * file) and removes the directory.
 */
export async function startCluster({ nodes = 2, env = {} } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'seqcast-js-cluster-'));
  rmSync(dir, { recursive: true, force: true }); // cluster.sh creates it
  const port = await freePort();
  const script = join(REPO, 'deploy/local/cluster.sh');
  const child = spawn(
    'bash',
    [script, 'up', '--nodes', String(nodes), '--port', String(port), '--dir', dir, '--binary', SEQCAST_BIN],
    { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let log = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (c) => (log += c));
  await lineMatching(child, child.stdout, /seqcast cluster of \d+ nodes: (http:\S+)/, 120000, `cluster.sh (${log})`);
  child.stdout.resume();
  const file = (name) => readFileSync(join(dir, name), 'utf8').trim();
  return {
    dir,
    http: `http://127.0.0.1:${port}`,
    ws: `ws://127.0.0.1:${port}/v1/ws`,
    nodes,
    nodePort: (i) => Number(file(`node-${i}.port`)),
    nodePid: (i) => Number(file(`node-${i}.pid`)),
    /** Starts node `i` again on its port (`cluster.sh start`, which waits until it is ready). */
    async restartNode(i) {
      await new Promise((res, rej) => {
        const start = spawn('bash', [script, 'start', '--dir', dir, String(i)], { stdio: ['ignore', 'ignore', 'pipe'] });
        let err = '';
        start.stderr.setEncoding('utf8').on('data', (c) => (err += c));
        start.once('exit', (code) => (code === 0 ? res() : rej(new Error(`cluster.sh start ${i}: ${err}`))));
      });
    },
    get log() {
      return log;
    },
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        await exited;
      }
    },
  };
}

/** Open WebSocket connections on the node listening on `port` (its /metrics gauge). */
export async function connectionsOpen(port) {
  const res = await fetch(`http://127.0.0.1:${port}/metrics`);
  const text = await res.text();
  const m = text.match(/^seqcast_connections_open\s+(\d+)/m);
  return m ? Number(m[1]) : 0;
}

/** Whether process `pid` still runs (a zombie counts as gone). */
export function alive(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
    return state !== 'Z' && state !== 'X';
  } catch {
    return false;
  }
}

/** A WebSocket class that records the URLs it opened (to check no token went into one). */
export function recordingWebSocket() {
  const urls = [];
  const sockets = [];
  class Recording extends WebSocket {
    constructor(url) {
      super(url);
      urls.push(url);
      sockets.push(this);
    }
  }
  return { WebSocket: Recording, urls, sockets };
}

/** A FAKE server (a scripted `ws` WebSocketServer, not seqcast): `onFrame(frame, reply, socket)`
 *  scripts the answers; `frames` logs what clients sent, `connections` counts connections. */
export async function fakeServer(onFrame) {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise((r) => wss.once('listening', r));
  const frames = [];
  let connections = 0;
  wss.on('connection', (socket) => {
    connections += 1;
    const reply = (f) => socket.send(JSON.stringify(f));
    socket.on('message', (data) => {
      const f = JSON.parse(String(data));
      frames.push(f);
      onFrame(f, reply, socket);
    });
  });
  return {
    url: `ws://127.0.0.1:${wss.address().port}/v1/ws`,
    frames,
    get connections() {
      return connections;
    },
    close: () => new Promise((r) => wss.close(r)),
  };
}
