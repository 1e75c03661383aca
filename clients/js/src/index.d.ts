// Types of the seqcast client (src/index.js). Checked by `tsc --noEmit` (npm test) against
// test/types-check.ts.

/** The part of the WebSocket API the client uses: the browser's, Node's global one, or `ws`. */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface Backoff {
  /** First delay bound, ms. */
  base?: number;
  /** Largest delay bound, ms. */
  cap?: number;
}

export interface SeqcastOptions {
  /** WebSocket URL, e.g. `wss://chat.example/v1/ws` (never put a token in it). */
  url: string;
  /** A fixed token (JWT or server key), sent as the first frame. */
  token?: string;
  /** Called on every (re)connect and before the token expires; wins over `token`. */
  getToken?: () => string | Promise<string>;
  /** WebSocket constructor; default: the global `WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** Base URL of the HTTP API for `history`; default: derived from `url` (ws->http, same host). */
  httpUrl?: string;
  /** `fetch` implementation for `history`; default: the global `fetch`. */
  fetch?: (url: URL, init: { headers: Record<string, string> }) => Promise<{
    ok: boolean;
    status: number;
    json(): Promise<any>;
  }>;
  /** Reconnect backoff (full jitter), ms. Default `{ base: 500, cap: 30000 }`. */
  backoff?: Backoff;
  /** Largest random delay before reconnecting after a drain (close 1012), ms. Default 1000. */
  drainJitter?: number;
  /** Refresh the token this long before its `exp`, ms (half-way for shorter tokens). Default 60000. */
  refreshMargin?: number;
  /** Send an application `ping` this often, ms; 0 = never. Default 20000. */
  pingInterval?: number;
  /** A `pong` missing after this long marks the connection dead, ms. Default 10000. */
  pongTimeout?: number;
  /** Open + authenticate within this long, or retry, ms. Default 10000. */
  connectTimeout?: number;
  /** Consecutive 1008 closes (refused tokens) tolerated before giving up. Default 3. */
  maxAuthFailures?: number;
  /** Delay before retrying a send answered unavailable/rate_limited/internal, ms.
   *  Default `{ base: 500, cap: 10000 }`. */
  retryDelay?: Backoff;
  /** `false`: do not connect in the constructor (call `connect()`). Default true. */
  connect?: boolean;
}

export interface Joined {
  room: string;
  /** The room's last seq when the join took effect. */
  head: number;
  /** The oldest seq still stored. */
  first: number;
  /** Messages the join asked for were deleted by retention. */
  truncated: boolean;
  /** v1.1: the user's read cursor in the room (0 when none, or from a server before v1.1). */
  read: number;
  /** v1.1, joined with `presence: true`: the users present when the join took effect. */
  presence?: string[];
  /** This server's extension for very large rooms: only the number of users present (then
   *  `presence` is absent). */
  presenceCount?: number;
}

export interface JoinOptions {
  /** Replay every message with seq > since first; absent: live messages only. */
  since?: number;
  /** v1.1: also track who is present (asked again on every rejoin). */
  presence?: boolean;
}

/** v1.1: another session's signal in a joined room (never your own). */
export interface Signal<Body = unknown> {
  room: string;
  from: string;
  body: Body;
}

/** v1.1: another connection of the same user moved its read cursor to `seq` (the largest seen). */
export interface ReadEvent {
  room: string;
  seq: number;
}

/** v1.1: who is present in a room joined with `presence: true`. */
export interface Presence {
  /** Sorted; null when the server only sends the count (very large rooms). */
  users: string[] | null;
  count: number;
}

/** v1.1: what changed in a room's presence, and the result. */
export interface PresenceEvent extends Presence {
  room: string;
  /** Users who arrived (after a reconnect: since before it). */
  joined: string[];
  /** Users who left (after a reconnect: meanwhile). */
  left: string[];
}

export interface Ack {
  room: string;
  seq: number;
  id: string;
  ts: string;
}

export interface Message<Body = unknown> {
  room: string;
  seq: number;
  id: string;
  from: string;
  body: Body;
  ts: string;
}

export interface HistoryPage<Body = unknown> {
  room: string;
  head: number;
  messages: Message<Body>[];
  has_more: boolean;
}

export type ClientState = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed';

export interface StateEvent {
  state: ClientState;
  /** The close code that caused a reconnect, when there was one. */
  code?: number;
  reason?: string;
  /** The delay before the next attempt, ms (state `reconnecting`). */
  delay?: number;
}

export interface TruncatedEvent {
  room: string;
  /** Delivery continues at this seq. */
  first: number;
  head: number;
  /** The first seq the application will never see (messages lostFrom..first-1 are gone). */
  lostFrom: number;
}

export interface SeqcastEvents {
  message: Message;
  state: StateEvent;
  truncated: TruncatedEvent;
  /** A room was joined again after a reconnect or a gap. */
  rejoined: Joined;
  signal: Signal;
  read: ReadEvent;
  presence: PresenceEvent;
  /** Also a refused signal: a SeqcastError with `op: 'signal'`, `room` and `body`. */
  error: Error;
}

export class SeqcastError extends Error {
  constructor(code: string, message?: string);
  /** The server's error code (`forbidden`, `too_large`, ...) or `closed`, `timeout`, `token`,
   *  `offline`. */
  code: string;
  /** Set on a refused signal (reported as an `error` event). */
  op?: 'signal';
  room?: string;
  body?: unknown;
}

export function newIdem(): string;

export class SeqcastClient {
  constructor(options: SeqcastOptions);
  readonly state: ClientState;
  readonly pendingSends: number;
  connect(): void;
  /** Drop the connection and reconnect now (network change, app back in the foreground). */
  reconnect(): void;
  join(room: string, options?: JoinOptions): Promise<Joined>;
  leave(room: string): Promise<void>;
  send(room: string, body: unknown, options?: { idem?: string }): Promise<Ack>;
  history<Body = unknown>(
    room: string,
    options?: { before?: number; after?: number; limit?: number },
  ): Promise<HistoryPage<Body>>;
  lastSeq(room: string): number | undefined;
  /** v1.1: an ephemeral signal; false (and dropped) when not connected. At most once. */
  signal(room: string, body: unknown): boolean;
  /** v1.1: marks `room` read up to `seq`; resolves with the cursor now. */
  read(room: string, seq: number): Promise<number>;
  /** v1.1: the largest read cursor seen for `room`. */
  readCursor(room: string): number | undefined;
  /** v1.1: who is present in `room` (joined with `presence: true`). */
  presence(room: string): Presence | undefined;
  close(): void;
  on<K extends keyof SeqcastEvents>(event: K, listener: (value: SeqcastEvents[K]) => void): () => void;
  once<K extends keyof SeqcastEvents>(event: K, listener: (value: SeqcastEvents[K]) => void): () => void;
  off<K extends keyof SeqcastEvents>(event: K, listener: (value: SeqcastEvents[K]) => void): void;
}
