//! Local fan-out: which sessions of this node are joined to which room.
//!
//! A committed message arrives here once (from this node's room writer, or later from the bus)
//! with its frame already serialized; every subscriber gets a clone of the same bytes. Delivery
//! never waits: each session has a bounded queue, and when it is full the frame is dropped for
//! that session and the session is told it lagged. A lagging session then reads what it missed
//! from the database (see `session::cursor`), so a slow reader costs bounded memory, slows nobody
//! else and loses nothing.
//!
//! In a cluster, messages of one room reach a node in two streams (its own commits, and the
//! other nodes' through the bus), so seq 10 committed here can arrive before seq 9 committed
//! elsewhere. Handed on like that, every session of the room would see a gap and read the
//! database for it: with thousands of sessions, a read storm for every interleaving. So the hub
//! keeps each room in order: a message beyond a hole is held (at most [`MAX_HELD`] per room)
//! until the hole fills, from the bus or, if it stays open, from one database read by the relay
//! (`relay::fill_holes`), and duplicates go no further. Sessions' cursors still repair anything
//! that gets past (a full buffer, a failed read), so delivery never depends on this.
//!
//! Ephemeral frames ([`Notice`]: signals, read cursors) take none of that path: no seq, no
//! order, no repair. A signal goes to the room's sessions (but the sender's), a read cursor to
//! the user's connections (but the one it came from), each into the session's mailbox only while
//! it is less than half full (see `mailbox`): at most once, and never at a message's expense.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use tokio::sync::mpsc;

pub use self::mailbox::{Delivery, Mailbox};
pub use self::notices::Notice;

mod mailbox;
mod notices;

/// A committed message on its way to sessions.
#[derive(Debug)]
pub struct Live {
    pub room: Arc<str>,
    pub seq: u64,
    /// The serialized `message` frame, shared by every recipient.
    pub frame: Utf8Bytes,
}

/// Identifies a session within this node.
pub type SessionId = u64;

/// A session's entry in a room: its mailbox.
pub type Subscriber = Arc<Mailbox>;

/// Messages held back per room while a hole below them is open; past it they all go out, holes
/// and all.
pub const MAX_HELD: usize = 1024;

#[derive(Default)]
struct RoomSubscribers {
    /// Highest seq the hub has seen for this room (handed on or held); a lagging session reads
    /// up to here.
    head: AtomicU64,
    /// The room's order, kept only in a cluster; locked during a fan-out so that two publishers
    /// (the room writer and the relay) cannot interleave.
    order: Mutex<Order>,
    /// Set once `head` has been seeded from the database by the room's first join; until then
    /// head checks leave the room alone (from 0 they would replay its whole history).
    seeded: AtomicBool,
    /// A std lock: held only to clone handles or push to mailboxes, never across an `.await`.
    sessions: RwLock<HashMap<SessionId, Subscriber>>,
}

/// Where a room stands in its seq order (cluster only).
#[derive(Default)]
struct Order {
    /// Set when the room's first join has read the head; until then messages pass as they come.
    seeded: bool,
    /// The highest seq that passed before the room was seeded.
    passed: u64,
    /// Every seq up to here was handed on (or is at most the head its first join read).
    delivered: u64,
    /// Messages beyond a hole, by seq.
    held: BTreeMap<u64, Arc<Live>>,
}

/// A room gained its first or lost its last local session, or a user their first or last local
/// connection: the bus subscription follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomChange {
    Opened(Arc<str>),
    Closed(Arc<str>),
    UserOpened(Arc<str>),
    UserClosed(Arc<str>),
}

/// The node's room registry. Cheap to clone.
#[derive(Clone, Default)]
pub struct Hub {
    rooms: Arc<DashMap<Arc<str>, Arc<RoomSubscribers>>>,
    /// Every local session's mailbox, joined to a room or not: how a draining node tells each
    /// session to close. (A shared stop token awaited in every session's loop linked a waiter
    /// into one list and out again for every live delivery, touching other sessions' memory:
    /// a visible share of a fan-out's CPU.)
    sessions: Arc<DashMap<SessionId, Subscriber>>,
    /// The local connections of each user (not the server key's): where read cursors go. An
    /// entry goes with its user's last connection.
    users: Arc<DashMap<Arc<str>, HashMap<SessionId, Subscriber>>>,
    /// Set by [`Hub::close_sessions`]: a session registered later is closed at once.
    closing: Arc<AtomicBool>,
    /// Where room openings and closings are reported (the relay), if anywhere.
    changes: Option<mpsc::UnboundedSender<RoomChange>>,
    /// Where rooms that opened a hole are reported (the relay fills them); `None` on a single
    /// node, whose rooms arrive in order and are not reordered.
    holes: Option<mpsc::UnboundedSender<Arc<str>>>,
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    /// The hub of a cluster node: reports rooms opening and closing on `changes` and rooms
    /// that opened a hole on `holes`, and keeps rooms in order. Unbounded: at most one event per
    /// join, leave or hole, consumed by one task.
    pub fn clustered(
        changes: mpsc::UnboundedSender<RoomChange>,
        holes: mpsc::UnboundedSender<Arc<str>>,
    ) -> Hub {
        Hub {
            changes: Some(changes),
            holes: Some(holes),
            ..Hub::default()
        }
    }

    /// Registers a session's mailbox until [`Hub::deregister`], so that a drain reaches it.
    pub fn register(&self, id: SessionId, mailbox: Subscriber) {
        self.sessions.insert(id, Arc::clone(&mailbox));
        // After the insert: either `close_sessions` finds this mailbox, or the flag it set
        // first is seen here (the map's shard lock orders the two).
        if self.closing.load(Ordering::Acquire) {
            mailbox.close();
        }
    }

    pub fn deregister(&self, id: SessionId) {
        self.sessions.remove(&id);
    }

    /// Tells every local session to close (the node is draining), evenly over `window` so that
    /// their clients reconnect elsewhere a few at a time rather than all in the same instant;
    /// every session registered from the start of the call on is told at once.
    pub async fn close_sessions(&self, window: Duration) {
        self.closing.store(true, Ordering::Release);
        let open: Vec<Subscriber> = self
            .sessions
            .iter()
            .map(|e| Arc::clone(e.value()))
            .collect();
        let start = tokio::time::Instant::now();
        let n = open.len() as f64;
        for (i, mailbox) in open.iter().enumerate() {
            let due = start + window.mul_f64(i as f64 / n);
            // Batched by the millisecond: one timer per session would be 10,000 timers for a
            // full node.
            if due > tokio::time::Instant::now() + Duration::from_millis(1) {
                tokio::time::sleep_until(due).await;
            }
            mailbox.close();
        }
    }

    /// Local sessions registered (open connections).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Adds a session to a room (replacing its previous entry, if any). Returns the room's name
    /// as the hub keeps it, for the session to share rather than hold a copy of its own (every
    /// joined connection holds one), and whether the room had no local session before.
    pub fn subscribe(&self, room: &str, id: SessionId, sub: Subscriber) -> (Arc<str>, bool) {
        // A room that is open already (the common case: a popular room's thousandth join) is
        // joined under the shard's read lock, without making a key. `unsubscribe` removes a room
        // only under the write lock and only if it is empty, which it no longer is once this
        // insert is done.
        if let Some(entry) = self.rooms.get(room) {
            write(&entry.sessions).insert(id, sub);
            return (Arc::clone(entry.key()), false);
        }
        // The shard lock of `entry` is held while the session is inserted and the opening is
        // reported, so this cannot race with `unsubscribe` removing an emptied room, and the
        // openings and closings of a room are reported in order.
        let entry = self.rooms.entry(Arc::from(room));
        let opened = matches!(entry, dashmap::Entry::Vacant(_));
        let entry = entry.or_default();
        write(&entry.sessions).insert(id, sub);
        if opened {
            self.report(RoomChange::Opened(Arc::clone(entry.key())));
        }
        (Arc::clone(entry.key()), opened)
    }

    /// Removes a session from a room; the room's entry goes with its last session.
    pub fn unsubscribe(&self, room: &str, id: SessionId) {
        let emptied = match self.rooms.get(room) {
            Some(entry) => {
                let mut sessions = write(&entry.sessions);
                sessions.remove(&id);
                sessions.is_empty()
            }
            None => false,
        };
        if emptied {
            self.rooms.remove_if(room, |key, entry| {
                let empty = read(&entry.sessions).is_empty();
                if empty {
                    // Still under the shard lock: ordered with `subscribe`'s report.
                    self.report(RoomChange::Closed(Arc::clone(key)));
                }
                empty
            });
        }
    }

    fn report(&self, change: RoomChange) {
        if let Some(changes) = &self.changes {
            // The receiver is gone only while the node stops.
            let _ = changes.send(change);
        }
    }

    /// Seeds the room's head and order from what a joining session read from the database
    /// (`head`), so head checks start from there rather than from 0 (which would read the room's
    /// whole history). Every joiner calls it, not only the one that opened the room: if the
    /// opener's join fails, the next joiner seeds the room (else head checks would skip it for
    /// good). Never lowers the head.
    ///
    /// Returns the seq the joining session must catch up to from the database: in a cluster, what
    /// the room's order already counts as handed on. A later joiner that read an older head
    /// than the one the room was seeded with would otherwise never get the seqs between the two
    /// heads: they reach the hub after seeding and are dropped as already handed on.
    pub fn init_head(&self, room: &str, head: u64) -> u64 {
        let Some(entry) = self.rooms.get(room).map(|e| Arc::clone(e.value())) else {
            return head;
        };
        entry.head.fetch_max(head, Ordering::AcqRel);
        entry.seeded.store(true, Ordering::Release);
        if self.holes.is_none() {
            return head;
        }
        // The order starts after what the joining session reads itself (up to `head`) and what
        // was handed on before (nothing is held before this).
        let mut order = lock(&entry.order);
        if !order.seeded {
            order.seeded = true;
            order.delivered = head.max(order.passed);
        }
        order.delivered.max(head)
    }

    /// Every seq of the room up to the answer has been handed on (or is at most the head its
    /// first join read); `None` if the room has no local session or is not seeded yet, when
    /// nothing may be read for it (from 0 that would be its whole history).
    pub fn delivered(&self, room: &str) -> Option<u64> {
        let entry = self.rooms.get(room).map(|e| Arc::clone(e.value()))?;
        if !entry.seeded.load(Ordering::Acquire) {
            return None;
        }
        if self.holes.is_none() {
            return Some(entry.head.load(Ordering::Acquire));
        }
        let order = lock(&entry.order);
        order.seeded.then_some(order.delivered)
    }

    /// Hands `live` to every session of its room (in a cluster: in seq order, holding it back
    /// while a hole below it is open). Returns the room's head before this message (`None` if
    /// the room has no local session) and how many queues took it now.
    pub fn publish(&self, live: Arc<Live>) -> (Option<u64>, usize) {
        let Some(entry) = self.rooms.get(&*live.room).map(|e| Arc::clone(e.value())) else {
            return (None, 0);
        };
        // Raised before any queue sees the frame, so a session told it lagged will find a head
        // that covers the frame it lost.
        let previous = entry.head.fetch_max(live.seq, Ordering::AcqRel);
        let Some(holes) = &self.holes else {
            return (Some(previous), fan_out(&entry, &live));
        };
        let mut order = lock(&entry.order);
        let seq = live.seq;
        if !order.seeded {
            // No order to keep yet.
            order.passed = order.passed.max(seq);
            return (Some(previous), fan_out(&entry, &live));
        }
        if seq <= order.delivered || order.held.contains_key(&seq) {
            return (Some(previous), 0);
        }
        if seq == order.delivered + 1 {
            order.delivered = seq;
            let queued = fan_out(&entry, &live);
            Self::release_in_order(&entry, &mut order);
            return (Some(previous), queued);
        }
        let opened = order.held.is_empty();
        let room = Arc::clone(&live.room);
        order.held.insert(seq, live);
        if order.held.len() > MAX_HELD {
            Self::release_all(&entry, &mut order);
        } else if opened {
            // The receiver is gone only while the node stops.
            let _ = holes.send(room);
        }
        (Some(previous), 0)
    }

    /// Hands on held messages that are next in order.
    fn release_in_order(entry: &RoomSubscribers, order: &mut Order) {
        while let Some(first) = order.held.first_entry() {
            let seq = *first.key();
            if seq > order.delivered + 1 {
                break;
            }
            let live = first.remove();
            if seq == order.delivered + 1 {
                order.delivered = seq;
                fan_out(entry, &live);
            }
        }
    }

    /// Hands on everything held, holes and all: sessions read the holes from the database.
    fn release_all(entry: &RoomSubscribers, order: &mut Order) {
        for (seq, live) in std::mem::take(&mut order.held) {
            order.delivered = seq;
            fan_out(entry, &live);
        }
    }

    /// The room's open hole, if it has one: every seq in `(after, before)` is missing while
    /// `before` is held.
    pub fn hole(&self, room: &str) -> Option<(u64, u64)> {
        let entry = self.rooms.get(room)?;
        let order = lock(&entry.order);
        let (&before, _) = order.held.first_key_value()?;
        Some((order.delivered, before))
    }

    /// Gives up on the room's hole: hands on everything held (sessions read the hole from the
    /// database themselves).
    pub fn release(&self, room: &str) {
        if let Some(entry) = self.rooms.get(room).map(|e| Arc::clone(e.value())) {
            let mut order = lock(&entry.order);
            Self::release_all(&entry, &mut order);
        }
    }

    /// The highest seq published to this room on this node (0 if none or no subscribers).
    pub fn head(&self, room: &str) -> u64 {
        self.rooms
            .get(room)
            .map(|e| e.head.load(Ordering::Acquire))
            .unwrap_or(0)
    }

    /// Rooms with at least one local session.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// The rooms with at least one local session.
    pub fn rooms(&self) -> Vec<Arc<str>> {
        self.rooms.iter().map(|e| Arc::clone(e.key())).collect()
    }

    /// The rooms whose head can be compared with the database, with that head.
    pub fn seeded_heads(&self) -> Vec<(Arc<str>, u64)> {
        self.rooms
            .iter()
            .filter(|e| e.seeded.load(Ordering::Acquire))
            .map(|e| (Arc::clone(e.key()), e.head.load(Ordering::Acquire)))
            .collect()
    }
}

/// Offers `live` to every session of the room; returns how many queues took it.
fn fan_out(entry: &RoomSubscribers, live: &Arc<Live>) -> usize {
    let sessions = read(&entry.sessions);
    let mut queued = 0;
    for mailbox in sessions.values() {
        // A full mailbox drops the frame and tells its session it lagged.
        if mailbox.push(live) {
            queued += 1;
        }
    }
    queued
}

// Lock poisoning only follows a panic while holding the lock, and the maps stay consistent
// (every critical section is a single insert/remove/iteration), so recover the guard.
fn lock<T>(lock: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(room: &str, seq: u64) -> Arc<Live> {
        Arc::new(Live {
            room: room.into(),
            seq,
            frame: Utf8Bytes::from(format!("m{seq}")),
        })
    }

    /// A subscriber, and the same mailbox again for the test to read.
    fn sub(cap: usize) -> (Subscriber, Subscriber) {
        let mailbox = Mailbox::new(cap);
        (Arc::clone(&mailbox), mailbox)
    }

    fn next(mailbox: &Mailbox) -> Arc<Live> {
        match mailbox.try_recv() {
            Some(Delivery::Live(live)) => live,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn full_queue_signals_lag_and_others_still_receive() {
        let hub = Hub::new();
        let (slow, slow_rx) = sub(1);
        let (fast, fast_rx) = sub(16);
        hub.subscribe("r", 1, slow);
        hub.subscribe("r", 2, fast);
        assert_eq!(hub.publish(live("r", 1)), (Some(0), 2));
        assert_eq!(
            hub.publish(live("r", 2)),
            (Some(1), 1),
            "the slow queue is full"
        );
        assert_eq!(hub.head("r"), 2);
        assert!(
            matches!(slow_rx.try_recv(), Some(Delivery::Lagged)),
            "lag signalled"
        );
        assert_eq!(next(&slow_rx).seq, 1);
        assert_eq!(next(&fast_rx).seq, 1);
        assert_eq!(next(&fast_rx).seq, 2);
        // Same bytes, not a copy per subscriber.
        let m = live("r", 3);
        let _ = hub.publish(Arc::clone(&m));
        let got = next(&fast_rx);
        assert!(Arc::ptr_eq(&got, &m));
    }

    fn seqs(mailbox: &Mailbox) -> Vec<u64> {
        std::iter::from_fn(|| match mailbox.try_recv()? {
            Delivery::Live(live) => Some(live.seq),
            other => panic!("unexpected {other:?}"),
        })
        .collect()
    }

    fn clustered() -> (Hub, mpsc::UnboundedReceiver<Arc<str>>) {
        let (changes, _) = mpsc::unbounded_channel();
        let (holes_tx, holes) = mpsc::unbounded_channel();
        (Hub::clustered(changes, holes_tx), holes)
    }

    #[test]
    fn a_cluster_hub_keeps_each_room_in_order() {
        let (hub, mut holes) = clustered();
        let (a, rx) = sub(64);
        hub.subscribe("r", 1, a);
        // Before the first join has read the head there is no order to keep.
        assert_eq!(hub.publish(live("r", 3)), (Some(0), 1));
        hub.init_head("r", 5);
        assert_eq!(seqs(&rx), vec![3]);

        assert_eq!(hub.publish(live("r", 6)).1, 1, "next in order: handed on");
        assert_eq!(hub.publish(live("r", 8)).1, 0, "beyond a hole: held");
        assert_eq!(hub.publish(live("r", 9)).1, 0);
        assert_eq!(hub.hole("r"), Some((6, 8)));
        assert_eq!(
            holes.try_recv().ok().as_deref(),
            Some("r"),
            "the hole is reported"
        );
        assert!(holes.try_recv().is_err(), "once per hole");
        assert_eq!(hub.head("r"), 9, "the head counts held messages");
        assert_eq!(hub.publish(live("r", 7)).1, 1, "the hole fills");
        assert_eq!(seqs(&rx), vec![6, 7, 8, 9], "in order, each once");
        assert_eq!(hub.hole("r"), None);
        assert_eq!(
            hub.publish(live("r", 8)).1,
            0,
            "a duplicate goes no further"
        );
        assert_eq!(hub.publish(live("r", 5)).1, 0);
        assert!(seqs(&rx).is_empty());
    }

    #[test]
    fn a_hole_given_up_or_too_long_releases_everything_held() {
        let (hub, _holes) = clustered();
        let (a, rx) = sub(4096);
        hub.subscribe("r", 1, a);
        hub.init_head("r", 1);
        let _ = hub.publish(live("r", 3));
        let _ = hub.publish(live("r", 4));
        hub.release("r");
        assert_eq!(seqs(&rx), vec![3, 4], "sessions read 2 themselves");
        assert_eq!(hub.hole("r"), None);
        assert_eq!(hub.publish(live("r", 5)).1, 1);

        for seq in 7..7 + MAX_HELD as u64 {
            assert_eq!(hub.publish(live("r", seq)).1, 0);
        }
        let _ = hub.publish(live("r", 7 + MAX_HELD as u64));
        let got = seqs(&rx);
        assert_eq!(
            got.len(),
            1 + MAX_HELD + 1,
            "one past the limit lets them all go"
        );
        assert!(got.windows(2).all(|w| w[0] < w[1]), "still in seq order");
    }

    #[test]
    fn a_new_room_is_kept_in_order_from_its_first_message() {
        let (hub, _holes) = clustered();
        let (a, rx) = sub(64);
        hub.subscribe("r", 1, a);
        hub.init_head("r", 0);
        assert_eq!(hub.publish(live("r", 2)).1, 0, "1 is missing: held");
        assert_eq!(hub.publish(live("r", 1)).1, 1);
        assert_eq!(seqs(&rx), vec![1, 2]);
    }

    #[test]
    fn the_order_starts_after_what_passed_before_the_first_join_read_the_head() {
        let (hub, mut holes) = clustered();
        let (a, rx) = sub(64);
        hub.subscribe("r", 1, a);
        // Committed after the joining session read head 1, handed on before it seeded the room.
        let _ = hub.publish(live("r", 2));
        hub.init_head("r", 1);
        assert_eq!(
            hub.publish(live("r", 3)).1,
            1,
            "no hole at 2: it was handed on"
        );
        assert_eq!(seqs(&rx), vec![2, 3]);
        assert!(holes.try_recv().is_err());
    }

    /// Issue 10, 2.3: a second joiner read an older head (3) than the one the room was seeded
    /// with (5); seqs 4 and 5 reach the hub after seeding and are dropped, so the joiner must
    /// read them from the database: `init_head` tells it to catch up to 5.
    #[test]
    fn a_later_joiner_with_an_older_head_catches_up_to_the_seeded_order() {
        let (hub, _holes) = clustered();
        let (a, _) = sub(64);
        let (b, b_rx) = sub(64);
        hub.subscribe("r", 1, a);
        hub.subscribe("r", 2, b);
        assert_eq!(hub.init_head("r", 5), 5, "the opener read 5");
        assert_eq!(
            hub.init_head("r", 3),
            5,
            "the later joiner must read up to 5"
        );
        assert_eq!(hub.publish(live("r", 4)).1, 0, "already handed on: dropped");
        assert_eq!(hub.publish(live("r", 5)).1, 0);
        assert!(seqs(&b_rx).is_empty());
        assert_eq!(hub.publish(live("r", 6)).1, 2);
    }

    /// Issue 10, 2.4: the opener's join failed (it left before seeding); the next joiner seeds
    /// the room, so head checks see it.
    #[test]
    fn a_room_whose_opener_failed_is_seeded_by_the_next_joiner() {
        let (hub, _holes) = clustered();
        let (a, _) = sub(64);
        let (b, _) = sub(64);
        hub.subscribe("r", 1, a);
        hub.subscribe("r", 2, b);
        hub.unsubscribe("r", 1);
        assert!(hub.seeded_heads().is_empty());
        assert_eq!(hub.delivered("r"), None);
        hub.init_head("r", 4);
        assert_eq!(hub.seeded_heads(), vec![(Arc::from("r"), 4)]);
        assert_eq!(hub.delivered("r"), Some(4));
    }

    #[test]
    fn rooms_are_removed_with_their_last_session() {
        let hub = Hub::new();
        let (a, _) = sub(1);
        let (b, _) = sub(1);
        hub.subscribe("r", 1, a);
        hub.subscribe("r", 2, b);
        hub.unsubscribe("r", 1);
        assert_eq!(hub.room_count(), 1);
        hub.unsubscribe("r", 2);
        assert_eq!(hub.room_count(), 0);
        assert_eq!(hub.publish(live("r", 1)), (None, 0));
    }

    #[tokio::test]
    async fn closing_reaches_sessions_registered_before_and_after() {
        let hub = Hub::new();
        let (before, _) = sub(4);
        let (gone, _) = sub(4);
        hub.register(1, Arc::clone(&before));
        hub.register(2, Arc::clone(&gone));
        hub.deregister(2);
        hub.close_sessions(Duration::ZERO).await;
        let (after, _) = sub(4);
        hub.register(3, Arc::clone(&after));
        assert!(matches!(before.try_recv(), Some(Delivery::Closing)));
        assert!(matches!(after.try_recv(), Some(Delivery::Closing)));
        assert!(
            gone.try_recv().is_none(),
            "a deregistered session is not told"
        );
        assert_eq!(hub.session_count(), 2);
    }

    #[tokio::test]
    async fn closing_is_spread_over_the_window() {
        let hub = Hub::new();
        let mailboxes: Vec<Subscriber> = (0..10).map(|_| Mailbox::new(4)).collect();
        for (id, mailbox) in mailboxes.iter().enumerate() {
            hub.register(id as SessionId, Arc::clone(mailbox));
        }
        let closed = |mailboxes: &[Subscriber]| {
            mailboxes
                .iter()
                .filter(|m| matches!(m.try_recv(), Some(Delivery::Closing)))
                .count()
        };
        let window = Duration::from_millis(900);
        let start = std::time::Instant::now();
        let closing = tokio::spawn({
            let hub = hub.clone();
            async move { hub.close_sessions(window).await }
        });
        // The first session is told at once, the last 810 ms later.
        while closed(&mailboxes) == 0 {
            assert!(start.elapsed() < window, "nobody told within {window:?}");
            tokio::task::yield_now().await;
        }
        let told = closed(&mailboxes);
        assert!(told < 10, "{told} of 10 told at the start of the window");
        closing.await.unwrap();
        assert_eq!(closed(&mailboxes), 10);
        assert!(
            start.elapsed() >= window * 8 / 10,
            "all told within {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn the_sessions_of_a_room_share_its_name() {
        let hub = Hub::new();
        let (a, _) = sub(1);
        let (b, _) = sub(1);
        let (first, opened) = hub.subscribe("r", 1, a);
        let (second, _) = hub.subscribe("r", 2, b);
        assert!(opened);
        assert!(
            Arc::ptr_eq(&first, &second),
            "one name for the room, not one per session"
        );
    }

    #[test]
    fn openings_and_closings_are_reported_once_in_order() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let hub = Hub::clustered(tx, mpsc::unbounded_channel().0);
        let (a, _) = sub(1);
        let (b, _) = sub(1);
        assert!(hub.subscribe("r", 1, a.clone()).1);
        assert!(!hub.subscribe("r", 2, b).1);
        hub.unsubscribe("r", 1);
        hub.unsubscribe("r", 2);
        hub.subscribe("r", 1, a);
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(
            got,
            vec![
                RoomChange::Opened("r".into()),
                RoomChange::Closed("r".into()),
                RoomChange::Opened("r".into())
            ]
        );
        hub.init_head("r", 7);
        assert_eq!(hub.head("r"), 7);
        hub.init_head("r", 3);
        assert_eq!(hub.head("r"), 7, "never lowered");
    }
}
