// Presence bookkeeping of one room (v1.1), without I/O: the set of users present, or only their
// number in a very large room (this server's extension: `presence_count` in `joined`, `count`
// and `users` in `presence` frames; see docs/protocol.md "Presence").
//
// A state is `{ users: Set<string> | null, count: number }`; `users === null` means the server
// only sends the count. Every function returns the change to report, or null when nothing changed.

/** The set or count a `joined` carries, or undefined when it carries neither (a server without
 *  presence, or presence not asked for). */
export function presenceFromJoined(f) {
  if (Array.isArray(f.presence)) {
    const users = new Set(f.presence);
    return { users, count: users.size };
  }
  if (typeof f.presence_count === 'number') return { users: null, count: f.presence_count };
  return undefined;
}

/** Replaces `prev` (undefined before the first `joined`) by `next` (a new `joined`, or a
 *  `presence` frame with a full `users` list): users who left meanwhile are reported as left,
 *  users who arrived as joined. Coming from count-only mode everyone listed counts as joined. */
export function replacePresence(room, prev, next) {
  const joined = [];
  const left = [];
  if (next.users) {
    for (const u of next.users) if (!prev?.users?.has(u)) joined.push(u);
  }
  if (prev?.users) {
    for (const u of prev.users) if (!next.users?.has(u)) left.push(u);
  }
  const unchanged = prev && joined.length === 0 && left.length === 0 && prev.count === next.count &&
    (prev.users === null) === (next.users === null);
  return unchanged ? null : change(room, next, joined, left);
}

/** Applies a `presence` frame to `state` (mutated). Returns `{ state, change }`; `change` is null
 *  when the frame changed nothing (a user already present joining again, say). */
export function applyPresenceFrame(room, state, f) {
  if (Array.isArray(f.users)) {
    // A full list: the room became small again, or a resynchronisation.
    const users = new Set(f.users);
    const next = { users, count: users.size };
    return { state: next, change: replacePresence(room, state, next) };
  }
  if (typeof f.count === 'number') {
    // Very large room: from now on only the number is tracked.
    const next = { users: null, count: f.count };
    const same = state.users === null && state.count === f.count;
    return { state: next, change: same ? null : change(room, next, f.joined ?? [], f.left ?? []) };
  }
  const joined = [];
  const left = [];
  if (state.users) {
    for (const u of f.joined ?? []) {
      if (!state.users.has(u)) {
        state.users.add(u);
        joined.push(u);
      }
    }
    for (const u of f.left ?? []) {
      if (state.users.delete(u)) left.push(u);
    }
    state.count = state.users.size;
  } else {
    // Count-only mode: a delta frame cannot be checked against a set; pass it on as it is.
    joined.push(...(f.joined ?? []));
    left.push(...(f.left ?? []));
    state.count = Math.max(0, state.count + joined.length - left.length);
  }
  if (joined.length === 0 && left.length === 0) return { state, change: null };
  return { state, change: change(room, state, joined, left) };
}

/** A snapshot for the application: `{ users: string[] | null, count }`. */
export function presenceView(state) {
  if (!state) return undefined;
  return { users: state.users ? [...state.users].sort() : null, count: state.count };
}

function change(room, state, joined, left) {
  return { room, joined, left, ...presenceView(state) };
}
