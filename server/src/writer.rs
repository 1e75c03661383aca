//! Room writers: the only way a message gets committed, with group commit.
//!
//! `submit` queues a message for its room and, if the room was idle, puts the room on the
//! node's ready list. Committer tasks (at most `SEQCAST_COMMIT_CONCURRENCY` at once, spawned on
//! demand, gone when nothing is ready) take every ready room with what it has queued and commit
//! them all in one transaction: one counter update per room, a multi-row insert per room, one
//! commit. A room is in at most one commit at a time, so its seqs are handed on in order; what
//! queues while its commit is in flight goes into the next one. An idle node therefore commits
//! a lone message at once, a busy room commits in batches, and many rooms share each commit.
//!
//! Why node-wide, and why few: measured with 100 busy rooms on two nodes (one 2-core machine),
//! one commit per room with up to 16 in flight per node made batches of ~39 messages and 65-68k
//! commits/s; grouped, with at most 4 commits in flight, 81-89k/s (~4 rooms and ~280 messages
//! per commit), with at most 2, 101-103k/s, Postgres spending about half the CPU per message:
//! fewer transactions, less lock and context-switch churn. Grouping also keeps the cap from
//! hurting quiet rooms: thousands of rooms with a message now and then share each transaction
//! rather than wait for one each. A database far away (long round trips) may want more.
//!
//! After a commit the new messages are serialized once and handed to the bus (other nodes) and
//! the hub (local sessions); only then is each sender acknowledged. Nothing is acknowledged that
//! was not committed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::oneshot;

use crate::bus::{Bus, BusMessage};
use crate::hub::{Hub, Live};
use crate::metrics as m;
use crate::store::{Appended, NewMessage, Store, StoreError};
use seqcast_protocol as protocol;

/// Most messages of one room committed in one transaction; a larger backlog is committed in
/// several.
const MAX_BATCH: usize = 512;
/// Most rooms committed in one transaction.
const MAX_GROUP: usize = 128;
/// Most bytes (bodies, senders and idempotency keys) committed in one transaction, so that one
/// commit's statement, the database's work on it and its memory stay bounded whatever the
/// message sizes. A single message larger than this is committed alone.
const MAX_GROUP_BYTES: usize = 4 << 20;

/// Why a message was not committed. Nothing was stored in either case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The database cannot commit now; the client may retry (with the same `idem`).
    #[error("the database cannot commit now; nothing was stored, retry")]
    Unavailable,
    #[error("internal error")]
    Internal,
}

pub type CommitResult = Result<Appended, CommitError>;

struct Pending {
    message: NewMessage,
    reply: oneshot::Sender<CommitResult>,
}

/// One room's part of a commit: its messages and, in the same order, their senders' replies
/// (apart, so that the store borrows the messages as they are).
struct RoomBatch {
    room: Arc<str>,
    messages: Vec<NewMessage>,
    replies: Vec<oneshot::Sender<CommitResult>>,
}

/// Rooms with their messages, as one commit takes them.
type Group = Vec<RoomBatch>;

/// A room with messages queued or in a commit. Rooms with neither have no entry.
#[derive(Default)]
struct RoomQueue {
    pending: Vec<Pending>,
    /// In a commit right now: not on the ready list until that commit is done.
    committing: bool,
}

/// Per-room commit queues and the node's committers. Cheap to clone.
#[derive(Clone)]
pub struct Writers {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn Store>,
    hub: Hub,
    /// Other nodes, when this node is part of a cluster with a bus.
    bus: Option<Arc<dyn Bus>>,
    /// Committers running at most (`SEQCAST_COMMIT_CONCURRENCY`).
    concurrency: usize,
    /// A std mutex: held only to push, take or hand back, never across an `.await`.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    rooms: HashMap<Arc<str>, RoomQueue>,
    /// Rooms with queued messages and no commit in flight, in the order they became ready.
    ready: VecDeque<Arc<str>>,
    /// Committer tasks running.
    committers: usize,
}

impl Writers {
    /// Room writers committing to `store`, at most `concurrency` commits at once (at least one).
    pub fn new(
        store: Arc<dyn Store>,
        hub: Hub,
        bus: Option<Arc<dyn Bus>>,
        concurrency: usize,
    ) -> Writers {
        Writers {
            shared: Arc::new(Shared {
                store,
                hub,
                bus,
                concurrency: concurrency.max(1),
                state: Mutex::default(),
            }),
        }
    }

    /// Queues `message` for `room`; the receiver yields the outcome once it is known.
    pub fn submit(&self, room: &str, message: NewMessage) -> oneshot::Receiver<CommitResult> {
        let (reply, outcome) = oneshot::channel();
        let start = {
            let mut state = self.shared.lock();
            let state = &mut *state;
            let queue = match state.rooms.get_mut(room) {
                Some(queue) => queue,
                None => state.rooms.entry(Arc::from(room)).or_default(),
            };
            let was_idle = queue.pending.is_empty() && !queue.committing;
            queue.pending.push(Pending { message, reply });
            if was_idle {
                state.ready.push_back(Arc::from(room));
            }
            let start = was_idle && state.committers < self.shared.concurrency;
            if start {
                state.committers += 1;
            }
            start
        };
        if start {
            let shared = Arc::clone(&self.shared);
            tokio::spawn(async move { shared.run_committer().await });
        }
        outcome
    }
}

/// Unblocks the rooms of a group whose committer dies (a panic in a backend): their queues are
/// dropped, so their senders get `internal`, and the next submit starts afresh.
struct GroupGuard<'a> {
    shared: &'a Shared,
    /// The rooms of the commit in flight.
    rooms: Vec<Arc<str>>,
    /// Set when the committer counted itself out (it found nothing ready).
    counted_out: bool,
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        for room in &self.rooms {
            state.rooms.remove(room);
        }
        if !self.counted_out {
            state.committers -= 1;
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Poisoning needs a panic inside a critical section, which is a push, a take or a
        // hand-back.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commits groups of ready rooms until none is ready, then exits.
    async fn run_committer(&self) {
        let mut guard = GroupGuard {
            shared: self,
            rooms: Vec::new(),
            counted_out: false,
        };
        loop {
            let mut group = {
                let mut state = self.lock();
                let state = &mut *state;
                let mut group: Group = Vec::new();
                let mut bytes = 0usize;
                while group.len() < MAX_GROUP {
                    let Some(room) = state.ready.front().cloned() else {
                        break;
                    };
                    let Some(queue) = state.rooms.get_mut(&room) else {
                        state.ready.pop_front();
                        continue;
                    };
                    // As many of the room's messages as the byte budget takes; at least one
                    // when the group is still empty.
                    let mut n = 0;
                    for pending in queue.pending.iter().take(MAX_BATCH) {
                        let size = message_bytes(&pending.message);
                        if bytes + size > MAX_GROUP_BYTES && !(group.is_empty() && n == 0) {
                            break;
                        }
                        bytes += size;
                        n += 1;
                    }
                    if n == 0 {
                        // The group is full; the room stays first in line for the next one.
                        break;
                    }
                    state.ready.pop_front();
                    queue.committing = true;
                    let (messages, replies) = queue
                        .pending
                        .drain(..n)
                        .map(|p| (p.message, p.reply))
                        .unzip();
                    group.push(RoomBatch {
                        room,
                        messages,
                        replies,
                    });
                }
                if group.is_empty() {
                    // Counted out under the same lock that found nothing ready: a submit after
                    // this sees one committer fewer and starts a new one.
                    state.committers -= 1;
                    guard.counted_out = true;
                    return;
                }
                group
            };
            // Ascending room order: every node locks rooms in the same order (no deadlocks).
            group.sort_unstable_by(|a, b| a.room.cmp(&b.room));
            guard.rooms = group.iter().map(|b| Arc::clone(&b.room)).collect();
            self.commit(group).await;
            let mut state = self.lock();
            let state = &mut *state;
            for room in guard.rooms.drain(..) {
                let Some(queue) = state.rooms.get_mut(&room) else {
                    continue;
                };
                queue.committing = false;
                if queue.pending.is_empty() {
                    state.rooms.remove(&room);
                } else {
                    state.ready.push_back(room);
                }
            }
        }
    }

    /// Commits `group` (distinct rooms in ascending order) in one transaction, hands the new
    /// messages to the bus and the hub, then answers every sender.
    ///
    /// A group that fails for a reason other than the database being unavailable (one message
    /// the database refuses, say) is split in two and each half tried again, left before right,
    /// down to a single room and then down to a single message: only the message at fault gets
    /// `internal`, and a few bad messages cost a few transactions each (halving, not one per
    /// room or message). Left before right keeps each room's messages in submission order, and
    /// a message that fails takes no seq. Once the database reports itself unavailable, what is
    /// left of the group is answered `unavailable` without another try: nothing would commit.
    async fn commit(&self, group: Group) {
        // Parts still to try, the next one last.
        let mut parts = vec![group];
        let mut unavailable = false;
        let mut set_aside = false;
        while let Some(part) = parts.pop() {
            if unavailable {
                answer_failed(part, CommitError::Unavailable);
                continue;
            }
            let part = match self.commit_part(part).await {
                Ok(()) => continue,
                // Once per group: should the rest wait again, it is answered `unavailable`.
                Err((part, e)) if e.lock_timed_out() && !set_aside => {
                    set_aside = true;
                    parts.extend(self.set_aside_held(part).await);
                    continue;
                }
                Err((part, e @ StoreError::Unavailable(_))) => {
                    tracing::warn!(error = %e, "commit failed: database unavailable");
                    metrics::counter!(m::COMMIT_ERRORS, "reason" => "unavailable").increment(1);
                    unavailable = true;
                    answer_failed(part, CommitError::Unavailable);
                    if e.timed_out() {
                        self.fail_queued();
                    }
                    continue;
                }
                Err((part, e)) => {
                    match split(part) {
                        Ok((left, right)) => {
                            parts.push(right);
                            parts.push(left);
                            continue;
                        }
                        Err(single) => {
                            // One message, alone at fault.
                            tracing::warn!(error = %e, "commit failed: message refused");
                            metrics::counter!(m::COMMIT_ERRORS, "reason" => "internal")
                                .increment(1);
                            single
                        }
                    }
                }
            };
            answer_failed(part, CommitError::Internal);
        }
    }

    /// A commit waited for a room's lock until `lock_timeout`: another transaction holds it,
    /// an application's `seqcast_publish` transaction that has not ended (migration 0003). The
    /// rooms held are answered `unavailable`; a room that merely shared the commit with a held
    /// one must not fail with it. Returns what is left to commit as parts for the stack of
    /// [`Shared::commit`] (the last is tried first): the rooms found free, at once, then the
    /// rooms whose row could not be seen (new rooms, one of which may be the held one: a
    /// transaction's first publish to a room inserts its row), which may wait once more. Nothing is swept (see [`Shared::fail_queued`]): the database answers, only
    /// some rooms are stuck.
    async fn set_aside_held(&self, part: Group) -> Vec<Group> {
        let rooms: Vec<&str> = part.iter().map(|b| &*b.room).collect();
        let found = match self.store.held_rooms(&rooms).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "commit failed: rooms locked, and the look failed");
                answer_failed(part, CommitError::Unavailable);
                return Vec::new();
            }
        };
        let is_in = |rooms: &[String], room: &str| rooms.iter().any(|r| r == room);
        let (stuck, rest): (Group, Group) =
            part.into_iter().partition(|b| is_in(&found.held, &b.room));
        let (unseen, free): (Group, Group) = rest
            .into_iter()
            .partition(|b| is_in(&found.unseen, &b.room));
        if !stuck.is_empty() {
            tracing::warn!(
                rooms = ?found.held,
                "rooms locked by another transaction (an open seqcast_publish?): their messages \
                 answered unavailable"
            );
            metrics::counter!(m::COMMIT_ERRORS, "reason" => "locked").increment(1);
        }
        answer_failed(stuck, CommitError::Unavailable);
        [unseen, free]
            .into_iter()
            .filter(|g| !g.is_empty())
            .collect()
    }

    /// The database did not answer a commit within its whole deadline: every message queued on
    /// the node is answered `unavailable` now, and only what is submitted from here on tries the
    /// database again.
    ///
    /// Without this each group behind waited out a deadline of its own: with more ready rooms
    /// than the committers take at once (`MAX_GROUP` each), a message queued behind them was
    /// answered only after two, three deadlines (12 s with the default 4 s and 640 busy rooms,
    /// `tests/db_faults.rs`; 4.2 s with this). Now a message waits at most for the commit in flight
    /// when it was queued and, if that one succeeded, for its own: two deadlines however long
    /// the queue. Only a timeout sweeps: a deadlock or one broken connection fails fast and says
    /// nothing about the next commit, so it fails only its own group.
    fn fail_queued(&self) {
        let mut swept = Vec::new();
        {
            let mut state = self.lock();
            let state = &mut *state;
            state.ready.clear();
            state.rooms.retain(|_, queue| {
                swept.extend(queue.pending.drain(..).map(|p| p.reply));
                // A room in another committer's group keeps its entry: that committer hands it
                // back (and removes it, now that nothing is queued).
                queue.committing
            });
        }
        if !swept.is_empty() {
            tracing::warn!(
                messages = swept.len(),
                "database not answering: every queued message answered unavailable"
            );
        }
        for reply in swept {
            let _ = reply.send(Err(CommitError::Unavailable));
        }
    }

    /// One transaction for `group`; on success hands the new messages on and answers their
    /// senders, on failure gives the group back unanswered, with the error.
    async fn commit_part(&self, group: Group) -> Result<(), (Group, StoreError)> {
        let result = {
            let batches: Vec<(&str, &[NewMessage])> = group
                .iter()
                .map(|b| (&*b.room, b.messages.as_slice()))
                .collect();
            let started = Instant::now();
            let result = self.store.append_rooms(&batches).await;
            metrics::histogram!(m::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
            let total: usize = group.iter().map(|b| b.messages.len()).sum();
            metrics::histogram!(m::COMMIT_BATCH).record(total as f64);
            metrics::histogram!(m::COMMIT_ROOMS).record(group.len() as f64);
            result
        };
        let appended = match result {
            Ok(appended) => appended,
            Err(e) => return Err((group, e)),
        };
        let mut fresh = 0u64;
        for (batch, appended) in group.into_iter().zip(appended) {
            for a in appended.iter().filter(|a| !a.duplicate) {
                fresh += 1;
                self.hand_on(&batch.room, a);
            }
            for (reply, outcome) in batch.replies.into_iter().zip(appended) {
                // The sender may have gone away; the message is committed regardless.
                let _ = reply.send(Ok(outcome));
            }
        }
        metrics::counter!(m::MESSAGES_COMMITTED).increment(fresh);
        Ok(())
    }

    /// Serializes a newly committed message once and hands the same bytes to the other nodes
    /// and to this node's sessions.
    fn hand_on(&self, room: &Arc<str>, appended: &Appended) {
        let frame = Utf8Bytes::from(protocol::message_frame(&appended.message));
        let seq = appended.message.seq;
        if let Some(bus) = &self.bus {
            // Never waits on the network.
            bus.publish(&BusMessage {
                room: Arc::clone(room),
                seq,
                frame: frame.clone(),
            });
        }
        let _ = self.hub.publish(Arc::new(Live {
            room: Arc::clone(room),
            seq,
            frame,
        }));
    }
}

/// What a message weighs against [`MAX_GROUP_BYTES`].
fn message_bytes(message: &NewMessage) -> usize {
    message.body.len() + message.sender.len() + message.idem.as_ref().map_or(0, String::len)
}

/// Answers every sender of `group` with `err`.
fn answer_failed(group: Group, err: CommitError) {
    for reply in group.into_iter().flat_map(|b| b.replies) {
        let _ = reply.send(Err(err));
    }
}

/// Halves a group that failed: by rooms while it has several, else its one room's messages
/// (the earlier half first). A single message comes back as it is.
fn split(mut group: Group) -> Result<(Group, Group), Group> {
    if group.len() > 1 {
        let right = group.split_off(group.len() / 2);
        return Ok((group, right));
    }
    match group.pop() {
        Some(mut earlier) if earlier.messages.len() > 1 => {
            let half = earlier.messages.len() / 2;
            let later = RoomBatch {
                room: Arc::clone(&earlier.room),
                messages: earlier.messages.split_off(half),
                replies: earlier.replies.split_off(half),
            };
            Ok((vec![earlier], vec![later]))
        }
        Some(single) => Err(vec![single]),
        None => Err(group),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::instrumented::Instrumented;

    /// Rooms and bytes (as weighed against [`MAX_GROUP_BYTES`]) of each commit `store` saw.
    fn group_sizes(store: &Instrumented) -> Vec<(usize, usize)> {
        store
            .groups()
            .iter()
            .map(|rooms| {
                let bytes = rooms.iter().flatten().map(message_bytes).sum();
                (rooms.len(), bytes)
            })
            .collect()
    }

    fn message(n: usize) -> NewMessage {
        NewMessage {
            sender: "alice".into(),
            body: n.to_string(),
            idem: None,
        }
    }

    /// Rooms that become ready while a commit is in flight (here: before the one committer runs)
    /// share the next transaction, and each still gets its own seqs.
    #[tokio::test]
    async fn rooms_ready_together_share_one_commit() {
        let store = Instrumented::new().await;
        let writers = Writers::new(Arc::clone(&store) as Arc<dyn Store>, Hub::new(), None, 1);
        // Submitting never yields: on this single-threaded runtime the committer runs after all.
        let outcomes: Vec<_> = (0..50)
            .flat_map(|room| (0..3).map(move |n| (room, n)))
            .map(|(room, n)| writers.submit(&format!("room-{room}"), message(n)))
            .collect();
        for (i, outcome) in outcomes.into_iter().enumerate() {
            let appended = outcome.await.expect("answered").expect("committed");
            assert_eq!(appended.message.seq, (i % 3) as u64 + 1);
        }
        let rooms: Vec<usize> = group_sizes(&store)
            .iter()
            .map(|&(rooms, _)| rooms)
            .collect();
        assert_eq!(rooms, vec![50], "one transaction for all 50 rooms");
        // Afterwards every room's entry is gone: an idle room costs nothing.
        assert!(writers.shared.lock().rooms.is_empty());
        assert_eq!(writers.shared.lock().committers, 0);
    }

    /// A group stops at `MAX_GROUP_BYTES`; what does not fit waits for the next commit, first
    /// in line; a message larger than the cap is committed alone.
    #[tokio::test]
    async fn groups_are_bounded_in_bytes() {
        let store = Instrumented::new().await;
        let writers = Writers::new(Arc::clone(&store) as Arc<dyn Store>, Hub::new(), None, 1);
        let sized = |bytes: usize| NewMessage {
            sender: "a".into(),
            body: "x".repeat(bytes - 1),
            idem: None,
        };
        const MIB: usize = 1 << 20;
        // Ten rooms of 1 MiB each, then one message of 5 MiB, then 1 MiB more in the first room.
        let mut outcomes: Vec<_> = (0..10)
            .map(|room| writers.submit(&format!("room-{room}"), sized(MIB)))
            .collect();
        outcomes.push(writers.submit("huge", sized(5 * MIB)));
        outcomes.push(writers.submit("room-0", sized(MIB)));
        for outcome in outcomes {
            outcome.await.expect("answered").expect("committed");
        }
        let bytes: Vec<usize> = group_sizes(&store)
            .iter()
            .map(|&(_, bytes)| bytes)
            .collect();
        assert_eq!(bytes.iter().sum::<usize>(), 16 * MIB);
        for (i, &b) in bytes.iter().enumerate() {
            assert!(
                b <= MAX_GROUP_BYTES || b == 5 * MIB,
                "group {i} carried {b} bytes: {bytes:?}"
            );
        }
        assert!(
            bytes.contains(&(5 * MIB)),
            "the huge message alone: {bytes:?}"
        );
        assert!(bytes.len() <= 6, "groups still fill up: {bytes:?}");
    }
}
