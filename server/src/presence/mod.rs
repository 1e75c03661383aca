//! Presence: who has a connection joined to a room, on any node.
//!
//! A user is present in a room while at least one of their connections, on any node, is joined
//! to it (server-key connections have no user and do not count). Each node knows its own share
//! exactly and at once: every join and leave counts the user's local connections here
//! ([`Presence::enter`], [`Presence::exit`]). In a cluster the other nodes' shares come from the
//! roster table in Postgres (`roster`, migration 0005), which each node writes its share to in
//! batches, and which counts a node only while its heartbeat is fresh: a node that dies stops
//! counting within `SEQCAST_PRESENCE_TTL` without anyone cleaning up after it.
//!
//! Only rooms someone watches (a local session that joined with `"presence":true`) have a
//! [`View`]: what this node's watchers were last told, and the other nodes' share as last read.
//! Every `SEQCAST_PRESENCE_INTERVAL` the background task (`task`) writes the node's changes to
//! the roster, tells the other nodes which rooms changed (on the room's bus channel, or with a
//! Postgres NOTIFY when the bus is down), reads the rooms others reported, and sends each
//! room's watchers one `presence` frame with what changed since the last: users arrive or leave
//! once for the cluster, not once per connection or node, and a burst of joins becomes one
//! frame. Reports are at most once; what they lose, the task's periodic re-reads find (see
//! `task` for the bounds). A frame that a watcher's queue refuses (more than half full) is not
//! lost for good: the view remembers what that watcher was last told and sends it its own
//! difference at each turn until one is queued.
//!
//! A room with more present users than `SEQCAST_PRESENCE_MAX_USERS` is not listed: its watchers
//! get the count (`presence_count` in `joined`, `count` in `presence`), and the full list again
//! (`users`) once it is small enough. Memory is bounded by what is joined on this node plus the
//! lists of watched rooms, each at most that many names read from the roster.

mod task;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use tokio::sync::Notify;

pub use self::task::spawn;
use crate::bus::{Affected, Topic};
use crate::hub::{Notice, SessionId, Subscriber};
use crate::store::{Listed as Remote, Roster, StoreResult};
use seqcast_protocol::{self as protocol, Present};

/// Who is present, as a node knows it.
pub type Users = Present<Arc<str>>;

/// A watched room: what its watchers were told, and the other nodes' share.
struct View {
    remote: Remote,
    told: Told,
    watchers: HashMap<SessionId, Subscriber>,
    /// Watchers that missed a frame (their queue was more than half full, see
    /// [`crate::hub::Mailbox::push_notice`]), with what they were last told: the view's next
    /// difference would be wrong for them, so they are sent their own, at every turn until one
    /// is queued. Bounded like `told`, for each session that does not read.
    behind: HashMap<SessionId, Told>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Told {
    Users(BTreeSet<Arc<str>>),
    Count(u64),
}

impl Told {
    fn to_users(&self) -> Users {
        match self {
            Told::Users(users) => Present::Users(users.iter().cloned().collect()),
            Told::Count(n) => Present::Count(*n),
        }
    }
}

#[derive(Default)]
struct Room {
    /// This node's joined connections per user.
    local: HashMap<Arc<str>, u32>,
    /// While a local session watches the room.
    view: Option<View>,
}

/// What the task has to do at its next turn.
#[derive(Default)]
struct Pending {
    /// (room, user) pairs whose local presence changed since the roster was last written
    /// (cluster only).
    changed: HashSet<(Arc<str>, Arc<str>)>,
    /// Watched rooms whose local share changed: their watchers are due a frame.
    flush: HashSet<Arc<str>>,
    /// Rooms another node reported a change in: read them from the roster again.
    reread: HashSet<Arc<str>>,
    /// Read every watched room again (a node expired, the bus lost reports, a safety pass).
    reread_all: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.changed.is_empty()
            && self.flush.is_empty()
            && self.reread.is_empty()
            && !self.reread_all
    }
}

struct Inner {
    /// This process's name in the roster: unique per start, so a restarted node never inherits
    /// the rows of the process it replaces (those expire with its heartbeat).
    node: String,
    max_users: usize,
    rooms: DashMap<Arc<str>, Room>,
    pending: Mutex<Pending>,
    wake: Notify,
    /// The cluster's roster; `None` on a single node, whose own share is the whole room.
    roster: Option<Roster>,
}

/// The node's presence registry. Cheap to clone.
#[derive(Clone)]
pub struct Presence(Arc<Inner>);

impl Presence {
    /// A registry for a node: `roster` is the cluster's (a Postgres node), `None` for a single
    /// node. `node` names this process in the roster.
    pub fn new(node: String, max_users: usize, roster: Option<Roster>) -> Presence {
        Presence(Arc::new(Inner {
            node,
            max_users: max_users.max(1),
            rooms: DashMap::new(),
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            roster,
        }))
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Held only to add or take entries, never across an `.await`.
        self.0.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn clustered(&self) -> bool {
        self.0.roster.is_some()
    }

    /// A connection of `user` joined `room` (a join, not a rejoin).
    pub fn enter(&self, room: &Arc<str>, user: &str) {
        let mut entry = self.0.rooms.entry(Arc::clone(room)).or_default();
        if let Some(count) = entry.local.get_mut(user) {
            *count += 1;
            return;
        }
        let user: Arc<str> = Arc::from(user);
        entry.local.insert(Arc::clone(&user), 1);
        let watched = entry.view.is_some();
        drop(entry);
        self.changed(room, user, watched);
    }

    /// A connection of `user` left `room` (a leave, a closed connection).
    pub fn exit(&self, room: &str, user: &str) {
        let Some(mut entry) = self.0.rooms.get_mut(room) else {
            return;
        };
        let Some(count) = entry.local.get_mut(user) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        let (user, _) = entry.local.remove_entry(user).expect("counted above");
        let watched = entry.view.is_some();
        let room = Arc::clone(entry.key());
        drop(entry);
        self.forget_if_unused(&room);
        self.changed(&room, user, watched);
    }

    fn changed(&self, room: &Arc<str>, user: Arc<str>, watched: bool) {
        let mut pending = self.pending();
        if self.clustered() {
            pending.changed.insert((Arc::clone(room), user));
        }
        if watched {
            pending.flush.insert(Arc::clone(room));
        }
        let due = !pending.is_empty();
        drop(pending);
        if due {
            self.0.wake.notify_one();
        }
    }

    /// Drops the room's entry once nothing is joined or watched there.
    fn forget_if_unused(&self, room: &str) {
        self.0
            .rooms
            .remove_if(room, |_, r| r.local.is_empty() && r.view.is_none());
    }

    /// Session `id` watches `room` from now on: it receives a `presence` frame for every change
    /// after the returned snapshot, and none before it. Reads the room from the roster when no
    /// local session watched it yet.
    pub async fn watch(
        &self,
        room: &Arc<str>,
        id: SessionId,
        sub: Subscriber,
    ) -> StoreResult<Users> {
        if let Some(users) = self.add_watcher(room, id, &sub, None) {
            return Ok(users);
        }
        let remote = self.remote_of(room).await?;
        let users = self.add_watcher(room, id, &sub, Some(remote));
        if self.clustered() {
            // A change another node wrote while the roster was read, and reported before the
            // view existed, was not waited for: read the room once more at the next turn.
            self.pending().reread.insert(Arc::clone(room));
            self.0.wake.notify_one();
        }
        Ok(users.expect("a view is made when a remote share is given"))
    }

    /// Adds the watcher to the room's view, making the view from `remote` if there is none (or
    /// returning `None` without one). The room's other watchers are first told what changed, so
    /// that the snapshot returned is exactly what they were told.
    fn add_watcher(
        &self,
        room: &Arc<str>,
        id: SessionId,
        sub: &Subscriber,
        remote: Option<Remote>,
    ) -> Option<Users> {
        let max = self.0.max_users;
        let (users, behind) = {
            let mut entry = self.0.rooms.entry(Arc::clone(room)).or_default();
            let entry = &mut *entry;
            let view = match (&mut entry.view, remote) {
                (Some(view), _) => {
                    // A rejoin with `"presence":true` gets a snapshot: exact again.
                    view.behind.remove(&id);
                    flush_view(room, &entry.local, view, max);
                    view
                }
                (None, None) => return None,
                (slot @ None, Some(remote)) => {
                    let told = current(&entry.local, &remote, max);
                    slot.insert(View {
                        remote,
                        told,
                        watchers: HashMap::new(),
                        behind: HashMap::new(),
                    })
                }
            };
            view.watchers.insert(id, Arc::clone(sub));
            view.behind.remove(&id);
            (view.told.to_users(), !view.behind.is_empty())
        };
        if behind {
            self.retry(room);
        }
        Some(users)
    }

    /// Some of `room`'s watchers are behind: tell them again at the next turn (not before, so
    /// a session that does not read is retried once per interval, not in a loop).
    fn retry(&self, room: &Arc<str>) {
        self.pending().flush.insert(Arc::clone(room));
    }

    /// Session `id` stops watching `room` (a leave, a rejoin without `"presence":true`, a closed
    /// connection). Idempotent.
    pub fn unwatch(&self, room: &str, id: SessionId) {
        let Some(mut entry) = self.0.rooms.get_mut(room) else {
            return;
        };
        let Some(view) = &mut entry.view else {
            return;
        };
        view.watchers.remove(&id);
        view.behind.remove(&id);
        if view.watchers.is_empty() {
            entry.view = None;
            drop(entry);
            self.forget_if_unused(room);
        }
    }

    /// Who is present in `room` now (`GET /v1/rooms/{room}/presence`).
    pub async fn present(&self, room: &str) -> StoreResult<Users> {
        let max = self.0.max_users;
        if let Some(entry) = self.0.rooms.get(room) {
            if let Some(view) = &entry.view {
                return Ok(current(&entry.local, &view.remote, max).to_users());
            }
        }
        let remote = self.remote_of(&Arc::from(room)).await?;
        let told = match self.0.rooms.get(room) {
            Some(entry) => current(&entry.local, &remote, max),
            None => current(&HashMap::new(), &remote, max),
        };
        Ok(told.to_users())
    }

    /// What the roster says of `room` on the other nodes (nothing on a single node).
    async fn remote_of(&self, room: &Arc<str>) -> StoreResult<Remote> {
        let Some(roster) = &self.0.roster else {
            return Ok(Remote::Users(BTreeSet::new()));
        };
        let read = roster
            .remote(std::slice::from_ref(room), &self.0.node, self.0.max_users)
            .await?;
        Ok(read
            .into_iter()
            .next()
            .map_or(Remote::Users(BTreeSet::new()), |(_, remote)| remote))
    }

    /// Another node reported a change in `room`: read it again if it is watched here.
    pub fn reported(&self, room: &str) {
        let Some(room) = self.watched_key(room) else {
            return;
        };
        self.pending().reread.insert(room);
        self.0.wake.notify_one();
    }

    /// Reports may have been lost (the bus or the LISTEN connection reconnected): read every
    /// watched room again.
    pub fn reread_all(&self) {
        if !self.clustered() {
            return;
        }
        self.pending().reread_all = true;
        self.0.wake.notify_one();
    }

    /// The subscriptions of some rooms were dropped (a Redis Cluster slot moved): reports on
    /// their channels may have been lost meanwhile, so read those of them that are watched
    /// again. The other rooms' reports still arrive.
    pub fn reread_some(&self, affected: &Affected) {
        if !self.clustered() {
            return;
        }
        let rooms: Vec<Arc<str>> = self
            .watched_rooms()
            .into_iter()
            .filter(|room| affected.contains(&Topic::Presence(Arc::clone(room))))
            .collect();
        if rooms.is_empty() {
            return;
        }
        self.pending().reread.extend(rooms);
        self.0.wake.notify_one();
    }

    fn watched_key(&self, room: &str) -> Option<Arc<str>> {
        let entry = self.0.rooms.get(room)?;
        entry.view.as_ref()?;
        Some(Arc::clone(entry.key()))
    }

    fn watched_rooms(&self) -> Vec<Arc<str>> {
        self.0
            .rooms
            .iter()
            .filter(|e| e.view.is_some())
            .map(|e| Arc::clone(e.key()))
            .collect()
    }

    /// Whether `user` has a joined connection to `room` on this node.
    fn is_local(&self, room: &str, user: &str) -> bool {
        self.0
            .rooms
            .get(room)
            .is_some_and(|entry| entry.local.contains_key(user))
    }

    /// Every (room, user) this node has a joined connection for.
    fn local_pairs(&self) -> Vec<(Arc<str>, Arc<str>)> {
        let mut pairs = Vec::new();
        for entry in self.0.rooms.iter() {
            for user in entry.local.keys() {
                pairs.push((Arc::clone(entry.key()), Arc::clone(user)));
            }
        }
        pairs
    }

    /// Whether the room's other nodes are counted rather than listed.
    fn is_counted(&self, room: &str) -> bool {
        self.0.rooms.get(room).is_some_and(|e| {
            matches!(
                e.view,
                Some(View {
                    remote: Remote::Count(_),
                    ..
                })
            )
        })
    }

    /// Stores what the roster says of watched rooms' other nodes.
    fn set_remote(&self, remote: HashMap<Arc<str>, Remote>, read: &[Arc<str>]) {
        let mut remote = remote;
        for room in read {
            if let Some(mut entry) = self.0.rooms.get_mut(room) {
                if let Some(view) = &mut entry.view {
                    view.remote = remote
                        .remove(room)
                        .unwrap_or(Remote::Users(BTreeSet::new()));
                }
            }
        }
    }

    /// Sends each of `rooms`' watchers what changed since they were last told.
    fn flush(&self, rooms: impl IntoIterator<Item = Arc<str>>) {
        let max = self.0.max_users;
        for room in rooms {
            let behind = self.0.rooms.get_mut(&room).is_some_and(|mut entry| {
                let entry = &mut *entry;
                entry
                    .view
                    .as_mut()
                    .is_some_and(|view| flush_view(&room, &entry.local, view, max))
            });
            if behind {
                self.retry(&room);
            }
        }
    }
}

/// Who is present: the other nodes' share and this node's.
fn current(local: &HashMap<Arc<str>, u32>, remote: &Remote, max: usize) -> Told {
    match remote {
        Remote::Count(n) => Told::Count(*n),
        Remote::Users(others) => {
            let extra = local.keys().filter(|u| !others.contains(*u)).count();
            let total = others.len() + extra;
            if total > max {
                return Told::Count(total as u64);
            }
            let mut all = others.clone();
            all.extend(local.keys().cloned());
            Told::Users(all)
        }
    }
}

/// Tells the room's watchers what changed since they were last told (nothing if nothing did),
/// each watcher that is behind what changed since its own last frame. Returns whether some are
/// still behind. Called under the room's lock: a watcher added after it is told nothing it
/// already has.
fn flush_view(
    room: &Arc<str>,
    local: &HashMap<Arc<str>, u32>,
    view: &mut View,
    max: usize,
) -> bool {
    let now = current(local, &view.remote, max);
    let change = difference(room, &view.told, &now);
    if change.is_none() && view.behind.is_empty() {
        return false;
    }
    let before = std::mem::replace(&mut view.told, now);
    let (mut queued, mut dropped) = (0, 0);
    for (id, sub) in &view.watchers {
        let own;
        let frame = match view.behind.get(id) {
            Some(told) => {
                own = difference(room, told, &view.told);
                &own
            }
            None => &change,
        };
        let Some(frame) = frame else {
            // Behind, but what it missed has been undone since: it is exact again.
            view.behind.remove(id);
            continue;
        };
        if sub.push_notice(frame) {
            view.behind.remove(id);
            queued += 1;
        } else {
            view.behind.entry(*id).or_insert_with(|| before.clone());
            dropped += 1;
        }
    }
    metrics::counter!(crate::metrics::PRESENCE_FRAMES).increment(queued);
    if dropped > 0 {
        metrics::counter!(crate::metrics::EPHEMERAL_DROPPED, "at" => "session").increment(dropped);
    }
    !view.behind.is_empty()
}

/// The `presence` frame that takes a watcher told `before` to `after`, if they differ.
fn difference(room: &Arc<str>, before: &Told, after: &Told) -> Option<Arc<Notice>> {
    let frame = match (before, after) {
        (Told::Users(before), Told::Users(after)) => {
            let joined: Vec<&Arc<str>> = after.difference(before).collect();
            let left: Vec<&Arc<str>> = before.difference(after).collect();
            if joined.is_empty() && left.is_empty() {
                return None;
            }
            protocol::presence_frame(room, &joined, &left)
        }
        (Told::Count(a), Told::Count(b)) if a == b => return None,
        (_, now) => protocol::presence_reset_frame(room, &now.to_users()),
    };
    Some(Arc::new(Notice {
        room: Some(Arc::clone(room)),
        except: None,
        frame: Utf8Bytes::from(frame),
    }))
}

#[cfg(test)]
mod tests;
