// The demo page: seqcast's JavaScript client (served at /client/seqcast.js, the same file as
// clients/js/src/index.js) in a small chat UI. The client does the hard parts (reconnect with
// backoff, rejoin with `since`, resend unacknowledged sends with their `idem`); this file only
// shows what it delivers. Messages are kept per room by seq, so history pages and live messages
// merge without duplicates; `data-seq` on each line lets the browser test read the order.
import { SeqcastClient } from '/client/seqcast.js';

const $ = (selector) => document.querySelector(selector);
const PAGE = 50;

/** room -> { messages: Map(seq -> message), oldest: seq | null, hasOlder, unread } */
const rooms = new Map();
let client = null;
let current = null;

const wsUrl = () => `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/v1/ws`;

function setState({ state, code, delay }) {
  const badge = $('#state');
  badge.className = `state state-${state}`;
  badge.dataset.state = state;
  const labels = { idle: 'not connected', connecting: 'connecting', open: 'connected', closed: 'closed' };
  badge.textContent = state === 'reconnecting'
    ? `reconnecting in ${(delay / 1000).toFixed(1)} s${code ? ` (close ${code})` : ''}`
    : labels[state] ?? state;
}

function notice(text) {
  const p = $('#notice');
  p.textContent = text;
  p.hidden = !text;
}

function bodyText(body) {
  if (body && typeof body === 'object' && typeof body.text === 'string') return body.text;
  return JSON.stringify(body);
}

function line(message, pending = false) {
  const li = document.createElement('li');
  if (pending) li.className = 'pending';
  else li.dataset.seq = String(message.seq);
  const from = document.createElement('span');
  from.className = 'from';
  from.textContent = message.from;
  const text = document.createElement('span');
  text.className = 'text';
  text.textContent = bodyText(message.body);
  const meta = document.createElement('span');
  meta.className = 'meta';
  meta.textContent = pending ? 'sending' : `#${message.seq} ${new Date(message.ts).toLocaleTimeString()}`;
  li.append(from, text, meta);
  return li;
}

function renderRooms() {
  const list = $('#rooms');
  list.replaceChildren(...[...rooms.entries()].map(([name, room]) => {
    const li = document.createElement('li');
    li.textContent = name;
    li.dataset.room = name;
    if (name === current) li.className = 'current';
    if (room.unread > 0) {
      const badge = document.createElement('span');
      badge.className = 'unread';
      badge.textContent = String(room.unread);
      li.append(badge);
    }
    li.addEventListener('click', () => select(name));
    return li;
  }));
}

function renderMessages() {
  const room = rooms.get(current);
  const list = $('#messages');
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const seqs = [...room.messages.keys()].sort((a, b) => a - b);
  list.replaceChildren(...seqs.map((seq) => line(room.messages.get(seq))));
  $('#older').hidden = !room.hasOlder;
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function select(name) {
  current = name;
  rooms.get(name).unread = 0;
  renderRooms();
  renderMessages();
  notice('');
}

async function loadOlder(name) {
  const room = rooms.get(name);
  if (room.oldest === null || room.oldest <= 1) {
    room.hasOlder = false;
    return;
  }
  const page = await client.history(name, { before: room.oldest, limit: PAGE });
  for (const message of page.messages) room.messages.set(message.seq, message);
  if (page.messages.length > 0) room.oldest = page.messages[0].seq;
  room.hasOlder = page.has_more;
}

async function join(name) {
  if (!rooms.has(name)) {
    rooms.set(name, { messages: new Map(), oldest: null, hasOlder: false, unread: 0 });
  }
  select(name);
  try {
    // Live from now on; the last page of history comes over HTTP.
    const joined = await client.join(name);
    const room = rooms.get(name);
    room.oldest = joined.head + 1;
    await loadOlder(name);
    if (current === name) renderMessages();
  } catch (error) {
    notice(`cannot join ${name}: ${error.message}`);
  }
}

function connect(credential, shownName) {
  client = new SeqcastClient({ url: wsUrl(), httpUrl: location.origin, token: credential });
  client.on('state', setState);
  client.on('message', (message) => {
    const room = rooms.get(message.room);
    if (!room) return;
    room.messages.set(message.seq, message);
    if (room.oldest === null) room.oldest = message.seq;
    if (message.room === current) renderMessages();
    else {
      room.unread += 1;
      renderRooms();
    }
  });
  client.on('truncated', ({ room, lostFrom, first }) => {
    if (room === current) notice(`messages ${lostFrom} to ${first - 1} were deleted by retention`);
  });
  client.on('error', (error) => {
    notice(error.message);
    if (error.code === 'token') {
      $('#login').hidden = false;
      $('#chat').hidden = true;
      $('#login-error').textContent = `the server refused the credential: ${error.message}`;
      $('#login-error').hidden = false;
    }
  });
  $('#who').textContent = shownName;
  $('#login').hidden = true;
  $('#chat').hidden = false;
  join(new URLSearchParams(location.search).get('room') || 'general');
}

$('#login').addEventListener('submit', (event) => {
  event.preventDefault();
  const token = $('#token').value.trim();
  const name = $('#name').value.trim();
  if (!token && !name) {
    $('#login-error').textContent = 'a name or a token, please';
    $('#login-error').hidden = false;
    return;
  }
  if (client) client.close();
  // A development-mode node takes `dev:NAME` as the user's name (docs/protocol.md).
  connect(token || `dev:${name}`, name || 'token user');
});

$('#join').addEventListener('submit', (event) => {
  event.preventDefault();
  const name = $('#room').value.trim();
  $('#room').value = '';
  if (name) join(name);
});

$('#older').addEventListener('click', async () => {
  const name = current;
  await loadOlder(name);
  if (current === name) renderMessages();
});

$('#compose').addEventListener('submit', async (event) => {
  event.preventDefault();
  const text = $('#text').value;
  $('#text').value = '';
  const pending = line({ from: $('#who').textContent, body: { text } }, true);
  $('#messages').append(pending);
  try {
    // Resolves once committed; the message itself arrives as a `message` event.
    await client.send(current, { text });
  } catch (error) {
    notice(`not sent: ${error.message}`);
  } finally {
    pending.remove();
  }
});

// ?name=alice&room=general connects at once (handy for trying two windows side by side).
const params = new URLSearchParams(location.search);
if (params.get('name')) {
  $('#name').value = params.get('name');
  $('#login').requestSubmit();
}
