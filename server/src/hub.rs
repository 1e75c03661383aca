//! Local fan-out: which sessions of this node are joined to which room.
//!
//! A committed message arrives here once (from this node's room writer, or later from the bus)
//! with its frame already serialized; every subscriber gets a clone of the same bytes. Delivery
//! never waits: each session has a bounded queue, and when it is full the frame is dropped for
//! that session and the session is told it lagged. A lagging session then reads what it missed
//! from the database (see `session::cursor`), so a slow reader costs bounded memory, slows nobody
//! else and loses nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use tokio::sync::{mpsc, Notify};

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

/// Tells a session that the hub dropped frames for it (its queue was full).
#[derive(Debug, Default)]
pub struct LagSignal {
    lagged: AtomicBool,
    notify: Notify,
}

impl LagSignal {
    fn raise(&self) {
        self.lagged.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Waits until frames were dropped, then clears the signal.
    pub async fn wait(&self) {
        loop {
            if self.lagged.swap(false, Ordering::AcqRel) {
                return;
            }
            self.notify.notified().await;
        }
    }
}

/// A session's entry in a room.
#[derive(Clone)]
pub struct Subscriber {
    pub queue: mpsc::Sender<Arc<Live>>,
    pub lag: Arc<LagSignal>,
}

#[derive(Default)]
struct RoomSubscribers {
    /// Highest seq handed to this room's subscribers; a lagging session reads up to here.
    head: AtomicU64,
    /// Set once `head` has been seeded from the database by the room's first join; until then
    /// head checks leave the room alone (from 0 they would replay its whole history).
    seeded: AtomicBool,
    /// A std lock: held only to clone handles or `try_send`, never across an `.await`.
    sessions: RwLock<HashMap<SessionId, Subscriber>>,
}

/// A room gained its first or lost its last local session: the bus subscription follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomChange {
    Opened(Arc<str>),
    Closed(Arc<str>),
}

/// The node's room registry. Cheap to clone.
#[derive(Clone, Default)]
pub struct Hub {
    rooms: Arc<DashMap<Arc<str>, Arc<RoomSubscribers>>>,
    /// Where room openings and closings are reported (the relay), if anywhere.
    changes: Option<mpsc::UnboundedSender<RoomChange>>,
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    /// A hub that reports rooms opening and closing on `changes`. Unbounded: at most one event
    /// per join or leave, consumed by one task.
    pub fn with_changes(changes: mpsc::UnboundedSender<RoomChange>) -> Hub {
        Hub {
            rooms: Arc::default(),
            changes: Some(changes),
        }
    }

    /// Adds a session to a room (replacing its previous entry, if any). True if the room had no
    /// local session before.
    pub fn subscribe(&self, room: &str, id: SessionId, sub: Subscriber) -> bool {
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
        opened
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

    /// Sets the head of a room that just got its first session to what that session read from
    /// the database, so head checks start from there rather than from 0 (which would read the
    /// room's whole history). Never lowers it.
    pub fn init_head(&self, room: &str, head: u64) {
        if let Some(entry) = self.rooms.get(room) {
            entry.head.fetch_max(head, Ordering::AcqRel);
            entry.seeded.store(true, Ordering::Release);
        }
    }

    /// Delivers `live` to every session of its room. Returns the room's head before this
    /// message (`None` if the room has no local session) and how many queues took it.
    pub fn publish(&self, live: Arc<Live>) -> (Option<u64>, usize) {
        let Some(entry) = self.rooms.get(&*live.room).map(|e| Arc::clone(e.value())) else {
            return (None, 0);
        };
        // Raised before any queue sees the frame, so a session told it lagged will find a head
        // that covers the frame it lost.
        let previous = entry.head.fetch_max(live.seq, Ordering::AcqRel);
        let sessions = read(&entry.sessions);
        let mut queued = 0;
        for sub in sessions.values() {
            match sub.queue.try_send(Arc::clone(&live)) {
                Ok(()) => queued += 1,
                Err(mpsc::error::TrySendError::Full(_)) => sub.lag.raise(),
                // The session is going away and will unsubscribe itself.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        (Some(previous), queued)
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

// Lock poisoning only follows a panic while holding the lock, and the maps stay consistent
// (every critical section is a single insert/remove/iteration), so recover the guard.
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

    fn sub(cap: usize) -> (Subscriber, mpsc::Receiver<Arc<Live>>, Arc<LagSignal>) {
        let (tx, rx) = mpsc::channel(cap);
        let lag = Arc::new(LagSignal::default());
        (
            Subscriber {
                queue: tx,
                lag: Arc::clone(&lag),
            },
            rx,
            lag,
        )
    }

    #[tokio::test]
    async fn full_queue_signals_lag_and_others_still_receive() {
        let hub = Hub::new();
        let (slow, mut slow_rx, slow_lag) = sub(1);
        let (fast, mut fast_rx, _) = sub(16);
        hub.subscribe("r", 1, slow);
        hub.subscribe("r", 2, fast);
        assert_eq!(hub.publish(live("r", 1)), (Some(0), 2));
        assert_eq!(
            hub.publish(live("r", 2)),
            (Some(1), 1),
            "the slow queue is full"
        );
        assert_eq!(hub.head("r"), 2);
        tokio::time::timeout(std::time::Duration::from_secs(1), slow_lag.wait())
            .await
            .expect("lag signalled");
        assert_eq!(slow_rx.recv().await.unwrap().seq, 1);
        assert_eq!(fast_rx.recv().await.unwrap().seq, 1);
        assert_eq!(fast_rx.recv().await.unwrap().seq, 2);
        // Same bytes, not a copy per subscriber.
        let m = live("r", 3);
        let _ = hub.publish(Arc::clone(&m));
        let got = fast_rx.recv().await.unwrap();
        assert!(Arc::ptr_eq(&got, &m));
    }

    #[test]
    fn rooms_are_removed_with_their_last_session() {
        let hub = Hub::new();
        let (a, _ra, _) = sub(1);
        let (b, _rb, _) = sub(1);
        hub.subscribe("r", 1, a);
        hub.subscribe("r", 2, b);
        hub.unsubscribe("r", 1);
        assert_eq!(hub.room_count(), 1);
        hub.unsubscribe("r", 2);
        assert_eq!(hub.room_count(), 0);
        assert_eq!(hub.publish(live("r", 1)), (None, 0));
    }

    #[test]
    fn openings_and_closings_are_reported_once_in_order() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let hub = Hub::with_changes(tx);
        let (a, _ra, _) = sub(1);
        let (b, _rb, _) = sub(1);
        assert!(hub.subscribe("r", 1, a.clone()));
        assert!(!hub.subscribe("r", 2, b));
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
