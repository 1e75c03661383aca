// seqcast client: one WebSocket carrying any number of rooms, with the behaviour
// docs/protocol.md ("Client behaviour") asks of a client so that the application sees every
// message of a room exactly once and in order, across reconnects, node restarts and drains:
//
// - per room, `last` = the last seq delivered; a message is delivered only when seq == last + 1,
//   older ones are duplicates (dropped), a gap makes the client rejoin with since = last;
// - every send carries an `idem` and is kept until its ack; after a reconnect, or after a
//   retryable error, it is sent again with the same idem, so it is stored once;
// - reconnects use exponential backoff with full jitter (a short jitter after a drain's 1012),
//   fetch a fresh token on every connect and after a 1008, and rejoin every room with since;
// - the token goes in the first frame (`auth`), never in the URL, and is refreshed before it
//   expires; an application-level ping detects dead connections.
//
// v1.1: signals (ephemeral, at most once: never buffered, never resent), read cursors (the
// largest one seen per room, never moving back) and presence (src/presence.js).
//
// No runtime dependency: the global WebSocket (browsers, Node >= 22) or the constructor given in
// the options (e.g. the `ws` package on Node 18/20), and the global fetch for history.
import { Emitter } from './emitter.js';
import { applyPresenceFrame, presenceFromJoined, presenceView, replacePresence } from './presence.js';

/** How long a signal's ref is remembered, to report the `error` the server may answer it with. */
const SIGNAL_ERROR_WINDOW = 30000;

/** Error codes after which a send is retried (same idem) rather than rejected. */
const RETRYABLE = new Set(['unavailable', 'rate_limited', 'internal']);

/** An error answered by the server (`code` is its error code) or raised by the client. */
export class SeqcastError extends Error {
  constructor(code, message) {
    super(message ? `${code}: ${message}` : code);
    this.name = 'SeqcastError';
    this.code = code;
  }
}

const DEFAULTS = {
  backoff: { base: 500, cap: 30000 },
  drainJitter: 1000,
  refreshMargin: 60000,
  pingInterval: 20000,
  pongTimeout: 10000,
  connectTimeout: 10000,
  maxAuthFailures: 3,
  retryDelay: { base: 500, cap: 10000 },
};

let fallbackCounter = 0;
const fallbackPrefix = Math.random().toString(36).slice(2, 10) + Date.now().toString(36);

/** A fresh idem: a random UUID where crypto.randomUUID exists (browsers, Node >= 19), else a
 *  random per-process prefix and a counter (Node 18 has no global crypto). */
export function newIdem() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === 'function') return c.randomUUID();
  fallbackCounter += 1;
  return `${fallbackPrefix}-${fallbackCounter}`;
}

/** `ws://host:port/v1/ws` -> `http://host:port`. */
function httpBase(url) {
  const u = new URL(url);
  u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
  return u.origin;
}

function jitter(base, cap, attempt) {
  return Math.random() * Math.min(cap, base * 2 ** attempt);
}

export class SeqcastClient extends Emitter {
  #opts;
  #WS;
  #ws = null; // the current socket, or null between connections
  #state = 'idle';
  #closedByUser = false;
  #attempt = 0; // reconnect attempts since the last successful join
  #authFailures = 0; // consecutive 1008 closes
  #token = null;
  #nextRef = 1;
  #refs = new Map(); // ref -> what the reply to that frame settles (current socket only)
  #rooms = new Map(); // room -> { last, since, joined, rejoining, waiters, presence, present }
  #cursors = new Map(); // room -> the largest read cursor seen (joined or not)
  #signals = []; // [ref, room, body, sent at] of signals on this socket, oldest first
  #sends = new Map(); // local id -> unacked send, in submission order
  #nextSendId = 1;
  #timers = { reconnect: null, refresh: null, ping: null, pong: null, connect: null };
  #online = false; // authed on the current socket: frames may be sent
  #generation = 0; // bumped per connection attempt, so a superseded attempt gives up

  /**
   * @param {import('./index').SeqcastOptions} options
   */
  constructor(options) {
    super();
    if (!options || !options.url) throw new TypeError('SeqcastClient: `url` is required');
    this.#opts = {
      ...DEFAULTS,
      ...options,
      backoff: { ...DEFAULTS.backoff, ...options.backoff },
      retryDelay: { ...DEFAULTS.retryDelay, ...options.retryDelay },
    };
    this.#WS = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WS !== 'function') {
      throw new TypeError(
        'SeqcastClient: no global WebSocket here; pass one as the `WebSocket` option (e.g. from the ws package)',
      );
    }
    this.#token = options.token ?? null;
    // After the caller's synchronous code, so listeners added right after `new` see 'connecting'.
    if (options.connect !== false) queueMicrotask(() => this.connect());
  }

  /** 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed' */
  get state() {
    return this.#state;
  }

  /** The last seq delivered for `room` (undefined before its first `joined`). */
  lastSeq(room) {
    return this.#rooms.get(room)?.last ?? undefined;
  }

  /** The largest read cursor seen for `room` (from `joined`, `read` replies and other devices'
   *  moves); undefined when none was seen. It never moves back. */
  readCursor(room) {
    return this.#cursors.get(room);
  }

  /** Who is present in `room` (joined with `presence: true`): `{ users, count }`, `users` sorted,
   *  or null when the server only sends the count (a very large room). Undefined before the
   *  first `joined` with presence, or when the server does not support it. */
  presence(room) {
    return presenceView(this.#rooms.get(room)?.present);
  }

  /** Number of sends not acknowledged yet. */
  get pendingSends() {
    return this.#sends.size;
  }

  /** Starts connecting (done by the constructor unless `connect: false`). */
  connect() {
    if (this.#state !== 'idle' || this.#closedByUser) return;
    this.#openSocket();
  }

  /** Drops the current connection (if any) and reconnects at once, without backoff: for when
   *  the platform says the network changed or the app came back to the foreground, where the old
   *  socket is likely dead without knowing it. */
  reconnect() {
    if (this.#closedByUser || this.#state === 'idle') return;
    this.#dropSocket();
    this.#attempt = 0;
    this.#openSocket();
  }

  /** Subscribes to `room`; resolves with the first `joined`. `since`: replay every message with
   *  seq > since first. `presence: true`: also track who is present (asked again on every
   *  rejoin). The room is rejoined automatically after every reconnect. */
  join(room, { since, presence } = {}) {
    if (this.#closedByUser) return Promise.reject(new SeqcastError('closed', 'client closed'));
    return new Promise((resolve, reject) => {
      let r = this.#rooms.get(room);
      if (!r) {
        r = { last: null, since: null, joined: false, rejoining: false, waiters: [], presence: false, present: undefined };
        this.#rooms.set(room, r);
      }
      if (presence !== undefined) r.presence = !!presence;
      if (since !== undefined) {
        r.since = since;
        r.last = null;
      }
      r.waiters.push({ resolve, reject });
      if (this.#online) this.#sendJoin(room, r);
    });
  }

  /** Unsubscribes; messages of the room are no longer delivered from now on. */
  leave(room) {
    const r = this.#rooms.get(room);
    if (!r) return Promise.resolve();
    this.#rooms.delete(room);
    for (const w of r.waiters) w.reject(new SeqcastError('left', `left ${room} before it was joined`));
    if (!this.#online) return Promise.resolve();
    return new Promise((resolve) => {
      // not_joined (a join still in flight) counts as done too.
      this.#request({ type: 'leave', room }, { kind: 'leave', done: () => resolve() });
    });
  }

  /** Commits `body` to `room`; resolves with the ack `{room, seq, id, ts}` once stored, however
   *  many reconnects and retries that takes. Rejects on bad_request, forbidden, too_large. */
  send(room, body, { idem } = {}) {
    if (this.#closedByUser) return Promise.reject(new SeqcastError('closed', 'client closed'));
    return new Promise((resolve, reject) => {
      const entry = {
        id: this.#nextSendId++,
        room,
        body,
        idem: idem ?? newIdem(),
        resolve,
        reject,
        retries: 0,
        retryTimer: null,
      };
      this.#sends.set(entry.id, entry);
      if (this.#online) this.#transmit(entry);
    });
  }

  /** Sends an ephemeral signal (typing, cursor position) to the room's other joined sessions.
   *  At most once: returns true when it was written to the open connection, false when the
   *  client is not connected (then it is dropped: never buffered, never resent after a
   *  reconnect). A refusal (forbidden, too_large, rate_limited, ...) arrives later as an `error`
   *  event: a SeqcastError with `op: 'signal'`, the `room` and the `body`. */
  signal(room, body) {
    if (!this.#online) return false;
    const now = Date.now();
    while (this.#signals.length && now - this.#signals[0][3] > SIGNAL_ERROR_WINDOW) this.#signals.shift();
    const ref = this.#nextRef++;
    this.#signals.push([ref, room, body, now]);
    try {
      this.#ws.send(JSON.stringify({ type: 'signal', room, body, ref }));
    } catch {
      return false; // the socket is closing
    }
    return true;
  }

  /** Marks `room` read up to `seq`; resolves with the user's cursor now (the server's reply:
   *  never lower than before, capped at the room's head). Needs an open connection: rejects with
   *  `offline` when there is none or it is lost before the reply (it is safe to call again). */
  read(room, seq) {
    if (!this.#online) return Promise.reject(new SeqcastError('offline', 'not connected'));
    return new Promise((resolve, reject) => {
      this.#request({ type: 'read', room, seq }, { kind: 'read', room, resolve, reject });
    });
  }

  /** A page of stored messages over HTTP: `after` (ascending from there), or `before` (the
   *  `limit` messages just below it). Resolves with `{room, head, messages, has_more}`. */
  async history(room, { before, after, limit } = {}) {
    const base = this.#opts.httpUrl ?? httpBase(this.#opts.url);
    const url = new URL(`/v1/rooms/${encodeURIComponent(room)}/messages`, base);
    if (before !== undefined) url.searchParams.set('before', String(before));
    if (after !== undefined) url.searchParams.set('after', String(after));
    if (limit !== undefined) url.searchParams.set('limit', String(limit));
    const headers = {};
    // The connection's current token; a client that has not connected yet asks getToken.
    const token = this.#token ?? (this.#opts.getToken ? await this.#opts.getToken() : null);
    if (token) headers.Authorization = `Bearer ${token}`;
    const fetchImpl = this.#opts.fetch ?? globalThis.fetch;
    const res = await fetchImpl(url, { headers });
    const json = await res.json().catch(() => ({}));
    if (!res.ok) throw new SeqcastError(json.error ?? `http_${res.status}`, json.message);
    return json;
  }

  /** Cancels a pending reconnect, tears the connection's state down and closes its socket (1000). */
  #dropSocket() {
    clearTimeout(this.#timers.reconnect);
    const ws = this.#ws;
    this.#teardown();
    if (ws) {
      try {
        ws.close(1000);
      } catch {
        /* already closing */
      }
    }
  }

  /** Stops everything: closes the socket (1000), cancels reconnects, rejects pending promises. */
  close() {
    if (this.#closedByUser) return;
    this.#closedByUser = true;
    this.#dropSocket();
    this.#fail(new SeqcastError('closed', 'client closed'));
    this.#setState('closed', { code: 1000 });
  }

  // ---- connection lifecycle ------------------------------------------------------------------

  #setState(state, detail = {}) {
    if (this.#state === state && state !== 'reconnecting') return;
    this.#state = state;
    this.emit('state', { state, ...detail });
  }

  async #openSocket() {
    const generation = ++this.#generation;
    this.#timers.reconnect = null;
    this.#setState(this.#attempt === 0 && this.#state === 'idle' ? 'connecting' : 'reconnecting');
    if (this.#opts.getToken) {
      try {
        this.#token = await this.#opts.getToken();
      } catch (err) {
        if (generation !== this.#generation) return;
        this.emit('error', new SeqcastError('token', `getToken failed: ${err?.message ?? err}`));
        this.#scheduleReconnect(null);
        return;
      }
      if (this.#closedByUser || generation !== this.#generation) return;
    }
    let ws;
    try {
      ws = new this.#WS(this.#opts.url);
    } catch (err) {
      this.emit('error', err);
      this.#scheduleReconnect(null);
      return;
    }
    this.#ws = ws;
    this.#timers.connect = setTimeout(() => this.#dead(ws, 'connect timeout'), this.#opts.connectTimeout);
    ws.onopen = () => {
      if (ws !== this.#ws) return;
      if (this.#token) {
        // First-frame auth: the token never appears in the URL (and so in no access log).
        this.#request({ type: 'auth', token: this.#token }, { kind: 'auth', first: true });
      } else {
        this.#onAuthed(ws, undefined);
      }
    };
    ws.onmessage = (ev) => {
      if (ws !== this.#ws) return;
      let frame;
      try {
        frame = JSON.parse(typeof ev.data === 'string' ? ev.data : String(ev.data));
      } catch {
        this.emit('error', new SeqcastError('protocol', 'a frame that is not JSON'));
        return;
      }
      this.#onFrame(ws, frame);
    };
    ws.onerror = () => {
      // A close event follows; a refused upgrade shows up as 1006 there.
    };
    ws.onclose = (ev) => {
      if (ws !== this.#ws) return;
      this.#onClose(ev.code ?? 1006, ev.reason ?? '');
    };
  }

  #onAuthed(ws, exp) {
    clearTimeout(this.#timers.connect);
    this.#authFailures = 0;
    this.#online = true;
    this.#scheduleRefresh(exp);
    this.#startPing(ws);
    this.#setState('open');
    if (this.#rooms.size === 0) this.#attempt = 0;
    // Rejoin every room with since = last, then resend what is unacked, in submission order.
    for (const [room, r] of this.#rooms) this.#sendJoin(room, r);
    for (const entry of this.#sends.values()) {
      if (!entry.retryTimer) this.#transmit(entry);
    }
  }

  #onClose(code, reason) {
    this.#teardown();
    if (this.#closedByUser) return;
    if (code === 1008) {
      // A bad or expired token: never loop on it. With getToken a fresh one is fetched on the
      // next connect; a fixed token cannot get better.
      this.#authFailures += 1;
      if (!this.#opts.getToken || this.#authFailures > this.#opts.maxAuthFailures) {
        this.emit('error', new SeqcastError('unauthorized', `closed 1008 ${reason}`.trim()));
        this.#fail(new SeqcastError('unauthorized', 'the server refused the token'));
        this.#closedByUser = true;
        this.#setState('closed', { code, reason });
        return;
      }
    }
    this.#scheduleReconnect(code, reason);
  }

  #scheduleReconnect(code, reason = '') {
    if (this.#closedByUser) return;
    const { base, cap } = this.#opts.backoff;
    let delay;
    if (code === 1012) {
      delay = Math.random() * this.#opts.drainJitter; // a drain: other nodes are ready now
    } else {
      // 1013 (overloaded) backs off further than a plain failure.
      delay = jitter(base, cap, this.#attempt + (code === 1013 ? 2 : 0));
      this.#attempt += 1;
    }
    this.#setState('reconnecting', { code: code ?? undefined, reason, delay });
    this.#timers.reconnect = setTimeout(() => this.#openSocket(), delay);
  }

  /** A connection that stopped answering: drop it without waiting for TCP to notice. */
  #dead(ws, why) {
    if (ws !== this.#ws) return;
    this.emit('error', new SeqcastError('timeout', why));
    try {
      if (typeof ws.terminate === 'function') ws.terminate();
      else ws.close(4000, why);
    } catch {
      /* ignore */
    }
    this.#onClose(1006, why);
  }

  /** Forgets the current socket and its timers; unacked sends and rooms stay for the next one. */
  #teardown() {
    const ws = this.#ws;
    this.#ws = null;
    this.#online = false;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    for (const name of ['refresh', 'ping', 'pong', 'connect']) {
      clearTimeout(this.#timers[name]);
      clearInterval(this.#timers[name]);
      this.#timers[name] = null;
    }
    // Replies to this socket's frames will never come; their owners are redone on reconnect
    // (joins and sends) or done already (a leave is complete once the socket is gone).
    for (const pending of this.#refs.values()) {
      if (pending.kind === 'leave') pending.done();
      if (pending.kind === 'read') pending.reject(new SeqcastError('offline', 'connection lost'));
    }
    this.#refs.clear();
    this.#signals = [];
    for (const r of this.#rooms.values()) r.rejoining = false;
  }

  /** Rejects every pending promise (the client is closed for good). */
  #fail(err) {
    for (const entry of this.#sends.values()) {
      clearTimeout(entry.retryTimer);
      entry.reject(err);
    }
    this.#sends.clear();
    for (const r of this.#rooms.values()) for (const w of r.waiters) w.reject(err);
    this.#rooms.clear();
  }

  // ---- token refresh and liveness ------------------------------------------------------------

  #scheduleRefresh(exp) {
    clearTimeout(this.#timers.refresh);
    if (exp === undefined || exp === null || !this.#opts.getToken) return;
    const lifetime = exp * 1000 - Date.now();
    // Refresh `refreshMargin` before exp, or half-way for a token shorter than twice the margin.
    const at = lifetime > 2 * this.#opts.refreshMargin ? lifetime - this.#opts.refreshMargin : lifetime / 2;
    this.#timers.refresh = setTimeout(() => this.#refresh(), Math.max(0, Math.min(at, 2 ** 31 - 1)));
  }

  async #refresh() {
    const ws = this.#ws;
    let token;
    try {
      token = await this.#opts.getToken();
    } catch (err) {
      this.emit('error', new SeqcastError('token', `getToken failed: ${err?.message ?? err}`));
      // Try again shortly; if the token runs out first, the server closes with 1008.
      if (ws === this.#ws && this.#online) {
        this.#timers.refresh = setTimeout(() => this.#refresh(), this.#opts.retryDelay.base * 4);
      }
      return;
    }
    if (ws !== this.#ws || !this.#online) return; // reconnected meanwhile: that fetched a token
    this.#token = token;
    this.#request({ type: 'auth', token }, { kind: 'auth', first: false });
  }

  #startPing(ws) {
    const { pingInterval, pongTimeout } = this.#opts;
    if (!pingInterval) return;
    this.#timers.ping = setInterval(() => {
      if (ws !== this.#ws || this.#timers.pong) return;
      this.#timers.pong = setTimeout(() => this.#dead(ws, 'no pong'), pongTimeout);
      this.#request({ type: 'ping' }, { kind: 'ping' });
    }, pingInterval);
  }

  // ---- frames --------------------------------------------------------------------------------

  #request(frame, pending) {
    const ref = this.#nextRef++;
    this.#refs.set(ref, pending);
    try {
      this.#ws.send(JSON.stringify({ ...frame, ref }));
    } catch {
      // The socket is closing: its close event reconnects, and joins and sends are redone then.
    }
    return ref;
  }

  #sendJoin(room, r) {
    const since = r.last ?? r.since;
    const frame = since === null || since === undefined ? { type: 'join', room } : { type: 'join', room, since };
    if (r.presence) frame.presence = true;
    this.#request(frame, { kind: 'join', room, r });
  }

  #transmit(entry) {
    entry.retryTimer = null;
    const { room, body, idem } = entry;
    this.#request({ type: 'send', room, body, idem }, { kind: 'send', entry });
  }

  #onFrame(ws, f) {
    const pending = f.ref !== undefined ? this.#refs.get(f.ref) : undefined;
    if (pending) this.#refs.delete(f.ref);
    switch (f.type) {
      case 'message':
        return this.#onMessage(f);
      case 'joined':
        return this.#onJoined(f, pending);
      case 'ack':
        if (pending?.kind === 'send' && this.#sends.delete(pending.entry.id)) {
          pending.entry.resolve({ room: f.room, seq: f.seq, id: f.id, ts: f.ts });
        }
        return;
      case 'authed':
        if (pending?.first) return this.#onAuthed(ws, f.exp);
        return this.#scheduleRefresh(f.exp);
      case 'pong':
        clearTimeout(this.#timers.pong);
        this.#timers.pong = null;
        return;
      case 'left':
        if (pending?.kind === 'leave') return pending.done();
        if (f.reason === 'forbidden' && this.#rooms.has(f.room)) {
          // A refreshed token no longer allows the room.
          this.#rooms.delete(f.room);
          this.emit('error', new SeqcastError('forbidden', `left ${f.room}: the new token does not allow it`));
        }
        return;
      case 'error':
        return this.#onError(f, pending);
      case 'signal':
        if (f.from === undefined) return;
        return this.emit('signal', { room: f.room, from: f.from, body: f.body });
      case 'read':
        return this.#onRead(f, pending);
      case 'presence':
        return this.#onPresence(f);
      default:
        return; // unknown frame types are ignored (forward compatibility)
    }
  }

  #onJoined(f, pending) {
    const r = this.#rooms.get(f.room);
    if (!r || (pending && pending.r !== r)) return; // left meanwhile, or an older join's reply
    const wasJoined = r.joined;
    r.joined = true;
    r.rejoining = false;
    this.#attempt = 0;
    if (r.last === null) r.last = r.since ?? f.head; // live-only: continue after the head
    if (f.truncated) {
      // Messages before `first` were deleted by retention: the stream continues from there.
      const lostFrom = r.last + 1;
      r.last = f.first - 1;
      this.emit('truncated', { room: f.room, first: f.first, head: f.head, lostFrom });
    }
    const info = { room: f.room, head: f.head, first: f.first, truncated: !!f.truncated, read: f.read ?? 0 };
    if (Array.isArray(f.presence)) info.presence = f.presence;
    if (typeof f.presence_count === 'number') info.presenceCount = f.presence_count;
    if (typeof f.read === 'number') this.#raiseCursor(f.room, f.read);
    // A new `joined` replaces the present set: who left or arrived meanwhile is reported.
    const present = r.presence ? presenceFromJoined(f) : undefined;
    if (present) {
      const change = replacePresence(f.room, r.present, present);
      r.present = present;
      if (change) this.emit('presence', change);
    }
    const waiters = r.waiters.splice(0);
    for (const w of waiters) w.resolve(info);
    if (wasJoined) this.emit('rejoined', info);
  }

  #onMessage(f) {
    const r = this.#rooms.get(f.room);
    if (!r || !r.joined || r.last === null) return;
    if (f.seq <= r.last) return; // a duplicate (around a rejoin)
    if (f.seq > r.last + 1) {
      // A gap must not be delivered out of order: ask again from what we hold.
      if (!r.rejoining && this.#online) {
        r.rejoining = true;
        this.#sendJoin(f.room, r);
      }
      return;
    }
    r.last = f.seq;
    this.emit('message', { room: f.room, seq: f.seq, id: f.id, from: f.from, body: f.body, ts: f.ts });
  }

  /** Raises the room's cursor to `seq` if that is larger; true when it moved. */
  #raiseCursor(room, seq) {
    if (typeof seq !== 'number') return false;
    const cur = this.#cursors.get(room);
    if (cur !== undefined && seq <= cur) return false;
    this.#cursors.set(room, seq);
    return true;
  }

  #onRead(f, pending) {
    const moved = this.#raiseCursor(f.room, f.seq);
    if (pending?.kind === 'read') return pending.resolve(f.seq);
    // Another connection of the user moved it; an older move arriving late is not reported.
    if (moved) this.emit('read', { room: f.room, seq: f.seq });
  }

  #onPresence(f) {
    const r = this.#rooms.get(f.room);
    if (!r || !r.presence || !r.present) return; // not asked, or before its joined
    const { state, change } = applyPresenceFrame(f.room, r.present, f);
    r.present = state;
    if (change) this.emit('presence', change);
  }

  #onError(f, pending) {
    const err = new SeqcastError(f.code, f.message);
    if (!pending && f.ref !== undefined) {
      const i = this.#signals.findIndex((s) => s[0] === f.ref);
      if (i >= 0) {
        const [, room, body] = this.#signals[i];
        this.#signals.splice(i, 1);
        Object.assign(err, { op: 'signal', room, body });
        this.emit('error', err);
        return;
      }
    }
    if (!pending) {
      this.emit('error', err); // e.g. unauthorized before a 1008 close
      return;
    }
    switch (pending.kind) {
      case 'send': {
        const entry = pending.entry;
        if (!this.#sends.has(entry.id)) return;
        if (RETRYABLE.has(f.code) || f.code === 'unauthorized') {
          // Same idem, later; on a reconnect in between it is resent at once.
          const { base, cap } = this.#opts.retryDelay;
          const delay = base + jitter(base, cap, entry.retries++);
          entry.retryTimer = setTimeout(() => {
            if (this.#online) this.#transmit(entry);
            else entry.retryTimer = null;
          }, delay);
        } else {
          this.#sends.delete(entry.id);
          entry.reject(err);
        }
        return;
      }
      case 'join': {
        const r = pending.r;
        if (this.#rooms.get(pending.room) !== r) return;
        if (RETRYABLE.has(f.code)) {
          const delay = jitter(this.#opts.retryDelay.base, this.#opts.retryDelay.cap, 1);
          const ws = this.#ws;
          setTimeout(() => {
            if (ws === this.#ws && this.#online && this.#rooms.get(pending.room) === r) this.#sendJoin(pending.room, r);
          }, delay);
          return;
        }
        this.#rooms.delete(pending.room);
        for (const w of r.waiters.splice(0)) w.reject(err);
        if (r.joined) this.emit('error', err); // a rejoin refused: nobody else awaits it
        return;
      }
      case 'leave':
        return pending.done();
      case 'read':
        return pending.reject(err);
      case 'auth':
        // A refused first auth is followed by close 1008 (handled there); a refused refresh
        // leaves the old token in force until it expires.
        this.emit('error', err);
        return;
      default:
        this.emit('error', err);
    }
  }
}
