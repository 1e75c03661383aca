//! Room writers: the only way a message gets committed, with group commit.
//!
//! `submit` queues a message for its room. If no commit of that room is in flight, a task is
//! spawned that commits everything queued in one transaction, then keeps committing whatever
//! queued up meanwhile, and exits when the queue is empty. An idle room therefore pays no added
//! latency, a busy room commits in batches (one transaction, one counter update, many rows), and
//! an idle room costs nothing: its entry is removed when its last commit finishes.
//!
//! After a commit the new messages are serialized once and handed to the bus (other nodes) and
//! the hub (local sessions); only then is each sender acknowledged. Nothing is acknowledged that was not committed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::oneshot;

use crate::bus::{Bus, BusMessage};
use crate::hub::{Hub, Live};
use crate::metrics as m;
use crate::protocol;
use crate::store::{Appended, NewMessage, Store, StoreError};

/// Most messages committed in one transaction; a larger backlog is committed in several.
const MAX_BATCH: usize = 512;

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

#[derive(Default)]
struct RoomQueue {
    pending: Vec<Pending>,
    committing: bool,
}

/// Per-room commit queues. Cheap to clone.
#[derive(Clone)]
pub struct Writers {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn Store>,
    hub: Hub,
    /// Other nodes, when this node is part of a cluster with a bus.
    bus: Option<Arc<dyn Bus>>,
    /// A std mutex: held only to push or take a queue, never across an `.await`.
    rooms: Mutex<HashMap<Arc<str>, RoomQueue>>,
}

impl Writers {
    pub fn new(store: Arc<dyn Store>, hub: Hub, bus: Option<Arc<dyn Bus>>) -> Writers {
        Writers {
            shared: Arc::new(Shared {
                store,
                hub,
                bus,
                rooms: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Queues `message` for `room`; the receiver yields the outcome once it is known.
    pub fn submit(&self, room: &str, message: NewMessage) -> oneshot::Receiver<CommitResult> {
        let (reply, outcome) = oneshot::channel();
        let start = {
            let mut rooms = self.shared.lock();
            let queue = match rooms.get_mut(room) {
                Some(q) => q,
                None => rooms.entry(Arc::from(room)).or_default(),
            };
            queue.pending.push(Pending { message, reply });
            !std::mem::replace(&mut queue.committing, true)
        };
        if start {
            let shared = Arc::clone(&self.shared);
            let room: Arc<str> = Arc::from(room);
            tokio::spawn(async move { shared.drain(room).await });
        }
        outcome
    }
}

/// Unblocks a room if its drain task dies (a panic in a backend): the room's queue is dropped,
/// so its senders get `internal`, and the next submit starts a fresh drain.
struct DrainGuard<'a> {
    shared: &'a Shared,
    room: &'a Arc<str>,
}

impl Drop for DrainGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().remove(self.room);
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, RoomQueue>> {
        // Poisoning needs a panic inside a critical section, which is a push or a take.
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commits the room's queue until it is empty. Exactly one drain runs per room at a time.
    async fn drain(&self, room: Arc<str>) {
        let guard = DrainGuard {
            shared: self,
            room: &room,
        };
        loop {
            let batch = {
                let mut rooms = self.lock();
                let Some(queue) = rooms.get_mut(&room) else {
                    return;
                };
                if queue.pending.is_empty() {
                    rooms.remove(&room);
                    std::mem::forget(guard);
                    return;
                }
                let n = queue.pending.len().min(MAX_BATCH);
                queue.pending.drain(..n).collect::<Vec<_>>()
            };
            self.commit(&room, batch).await;
        }
    }

    async fn commit(&self, room: &Arc<str>, batch: Vec<Pending>) {
        let (messages, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| (p.message, p.reply)).unzip();
        let started = Instant::now();
        let result = self.store.append(room, &messages).await;
        metrics::histogram!(m::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(m::COMMIT_BATCH).record(messages.len() as f64);
        match result {
            Ok(appended) => {
                let mut fresh = 0u64;
                for a in appended.iter().filter(|a| !a.duplicate) {
                    fresh += 1;
                    let frame = Utf8Bytes::from(protocol::message_frame(&a.message));
                    let seq = a.message.seq;
                    if let Some(bus) = &self.bus {
                        // Same bytes for the other nodes; never waits on the network.
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
                metrics::counter!(m::MESSAGES_COMMITTED).increment(fresh);
                for (reply, outcome) in replies.into_iter().zip(appended) {
                    // The sender may have gone away; the message is committed regardless.
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                let err = match e {
                    StoreError::Unavailable(_) => CommitError::Unavailable,
                    _ => CommitError::Internal,
                };
                let reason = if err == CommitError::Unavailable {
                    "unavailable"
                } else {
                    "internal"
                };
                metrics::counter!(m::COMMIT_ERRORS, "reason" => reason).increment(1);
                tracing::warn!(room = %room, batch = messages.len(), error = %e, "commit failed");
                for reply in replies {
                    let _ = reply.send(Err(err));
                }
            }
        }
    }
}
