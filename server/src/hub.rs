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
    /// A std lock: held only to clone handles or `try_send`, never across an `.await`.
    sessions: RwLock<HashMap<SessionId, Subscriber>>,
}

/// The node's room registry. Cheap to clone.
#[derive(Clone, Default)]
pub struct Hub {
    rooms: Arc<DashMap<Arc<str>, Arc<RoomSubscribers>>>,
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    /// Adds a session to a room (replacing its previous entry, if any).
    pub fn subscribe(&self, room: &str, id: SessionId, sub: Subscriber) {
        // The shard lock of `entry` is held while the session is inserted, so this cannot race
        // with `unsubscribe` removing an emptied room.
        let entry = self.rooms.entry(Arc::from(room)).or_default();
        write(&entry.sessions).insert(id, sub);
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
            self.rooms
                .remove_if(room, |_, entry| read(&entry.sessions).is_empty());
        }
    }

    /// Delivers `live` to every session of its room; returns how many queues took it.
    pub fn publish(&self, live: Arc<Live>) -> usize {
        let Some(entry) = self.rooms.get(&*live.room).map(|e| Arc::clone(e.value())) else {
            return 0;
        };
        // Raised before any queue sees the frame, so a session told it lagged will find a head
        // that covers the frame it lost.
        entry.head.fetch_max(live.seq, Ordering::AcqRel);
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
        queued
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
        assert_eq!(hub.publish(live("r", 1)), 2);
        assert_eq!(hub.publish(live("r", 2)), 1, "the slow queue is full");
        assert_eq!(hub.head("r"), 2);
        tokio::time::timeout(std::time::Duration::from_secs(1), slow_lag.wait())
            .await
            .expect("lag signalled");
        assert_eq!(slow_rx.recv().await.unwrap().seq, 1);
        assert_eq!(fast_rx.recv().await.unwrap().seq, 1);
        assert_eq!(fast_rx.recv().await.unwrap().seq, 2);
        // Same bytes, not a copy per subscriber.
        let m = live("r", 3);
        hub.publish(Arc::clone(&m));
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
        assert_eq!(hub.publish(live("r", 1)), 0);
    }
}
