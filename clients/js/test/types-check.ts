// Compiled by `tsc --noEmit` in `npm test`: the declarations must accept real usage.
import { SeqcastClient, SeqcastError, type Ack, type Message } from '../src/index.js';

declare const WS: new (url: string) => {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
};

export async function usage(): Promise<void> {
  const client = new SeqcastClient({
    url: 'ws://127.0.0.1:8080/v1/ws',
    getToken: async () => 'jwt',
    WebSocket: WS,
    backoff: { base: 250 },
    refreshMargin: 30_000,
  });
  const off = client.on('message', (m: Message) => console.log(m.room, m.seq, m.body));
  client.on('truncated', (t) => console.log(t.first, t.lostFrom));
  client.on('state', (s) => console.log(s.state, s.code, s.delay));
  client.on('error', (e) => console.log(e.message));
  const joined = await client.join('general', { since: 41 });
  const head: number = joined.head;
  const ack: Ack = await client.send('general', { text: 'hi' }, { idem: 'k-1' });
  const seq: number = ack.seq + head;
  const page = await client.history<{ text: string }>('general', { before: seq, limit: 50 });
  page.messages.forEach((m) => m.body.text.toUpperCase());
  const last: number | undefined = client.lastSeq('general');
  // v1.1
  const lobby = await client.join('lobby', { presence: true });
  const read0: number = lobby.read;
  console.log(lobby.presence?.join(','), lobby.presenceCount);
  client.on('signal', (s) => console.log(s.room, s.from, s.body));
  client.on('read', (r) => console.log(r.room, r.seq));
  client.on('presence', (p) => console.log(p.joined, p.left, p.count, p.users?.length));
  const written: boolean = client.signal('lobby', { typing: true });
  const cursor: number = await client.read('lobby', read0 + 1);
  const seen: number | undefined = client.readCursor('lobby');
  const present = client.presence('lobby');
  if (present) console.log(present.count, present.users ?? [], written, cursor, seen);
  await client.leave('general');
  off();
  client.close();
  try {
    await client.send('general', 1);
  } catch (e) {
    if (e instanceof SeqcastError) console.log(e.code, last);
  }
}
