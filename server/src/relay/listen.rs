//! Messages published from SQL: `seqcast_publish` (migration 0003), called inside an
//! application's own transaction, commits a message without any node knowing, and says so with
//! `pg_notify` on [`CHANNEL`] when that transaction commits. Each Postgres node holds one
//! dedicated `LISTEN` connection, owned by [`run`]; a notification for a room this node has
//! sessions in sends the room to [`catch_up`], which reads it from the database from what the
//! hub has handed on and feeds the hub: the path head checks use (`super::repair`), not a new
//! way of delivering.
//!
//! What can go wrong, and what covers it:
//! - The connection is lost: notifications sent meanwhile are gone. It is opened again with
//!   backoff, and once it listens again every local room's head is checked (one query), which
//!   finds whatever was published in between.
//! - The connection hangs without an error (a paused database): nothing arrives here, and the
//!   head checks (`SEQCAST_HEAD_CHECK_INTERVAL` with Redis, `SEQCAST_POLL_INTERVAL` without)
//!   remain the safety net, as they are for the bus.
//!
//! Nothing received here is published on the bus: every node listens, so every node hears of
//! every commit on its own. Re-publishing would send each message to each node a second time,
//! only to be dropped as already handed on, and a node would first have to read the message to
//! publish its frame, which is exactly the database read every node does anyway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::metrics as m;
use crate::presence::Presence;
use crate::store::{Store, PRESENCE_CHANNEL};

/// The channel `seqcast_publish` notifies; fixed in migration 0003. Its payload is
/// `{"room":"<room>","seq":<seq>}`.
pub const CHANNEL: &str = "seqcast";

/// First pause before opening the connection again; doubled after each failure.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Longest pause between attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Rooms notified and not yet read, with the highest seq notified. Bounded by the node's rooms:
/// only rooms with local sessions are put here.
#[derive(Default)]
struct Pending {
    rooms: Mutex<HashMap<Arc<str>, u64>>,
    wake: Notify,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, u64>> {
        // Held only to insert or take the map, never across an `.await`.
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The payload of a notification.
#[derive(serde::Deserialize)]
struct Published {
    room: String,
    seq: u64,
}

/// Starts the listener and its reader; both stop with `stop`. `check` asks the head checks for
/// an immediate pass over every local room.
pub(super) fn spawn(
    url: String,
    timeout: Duration,
    store: Arc<dyn Store>,
    hub: Hub,
    presence: Presence,
    check: Arc<Notify>,
    stop: CancellationToken,
) {
    let pending = Arc::new(Pending::default());
    tokio::spawn(run(
        url,
        timeout,
        hub.clone(),
        presence,
        Arc::clone(&pending),
        Arc::clone(&check),
        stop.clone(),
    ));
    tokio::spawn(catch_up(store, hub, pending, check, stop));
}

/// Holds the `LISTEN` connection: opens it (again, with backoff, whenever it is lost) and
/// hands every notification of a local room to [`catch_up`]. Waits on nothing but the
/// connection, so a slow database read never leaves notifications queueing in the socket.
async fn run(
    url: String,
    timeout: Duration,
    hub: Hub,
    presence: Presence,
    pending: Arc<Pending>,
    check: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut backoff = RECONNECT_MIN;
    loop {
        let mut listener = tokio::select! {
            _ = stop.cancelled() => return,
            opened = open(&url, timeout) => match opened {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "LISTEN connection failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                    continue;
                }
            },
        };
        backoff = RECONNECT_MIN;
        metrics::gauge!(m::SQL_LISTEN_UP).set(1.0);
        // Listening from here on: whatever was published before (while the connection was
        // down, or before the node started) is found by one head check, and presence reports
        // sent meanwhile by reading the watched rooms again.
        check.notify_one();
        presence.reread_all();
        loop {
            let received = tokio::select! {
                _ = stop.cancelled() => return,
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(notification)) if notification.channel() == PRESENCE_CHANNEL => {
                    reported(&presence, notification.payload());
                }
                Ok(Some(notification)) => {
                    metrics::counter!(m::SQL_NOTIFICATIONS).increment(1);
                    queue(&hub, &pending, notification.payload());
                }
                Ok(None) => {
                    // Lost, and sqlx opened it again and listens once more before returning:
                    // what was published in between is found by a head check.
                    tracing::warn!("LISTEN connection lost and reopened; checking heads");
                    check.notify_one();
                    presence.reread_all();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection failed; reopening");
                    break;
                }
            }
        }
        metrics::gauge!(m::SQL_LISTEN_UP).set(0.0);
    }
}

/// A new connection listening on [`CHANNEL`], within `timeout` (a paused database would
/// otherwise hold the attempt until TCP gives up).
async fn open(url: &str, timeout: Duration) -> Result<PgListener, sqlx::Error> {
    let attempt = async {
        let mut listener = PgListener::connect(url).await?;
        listener.listen_all([CHANNEL, PRESENCE_CHANNEL]).await?;
        Ok(listener)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the database did not answer in time",
            )))
        })
}

/// Rooms another node's presence changed in while its bus was down (a JSON array of names).
fn reported(presence: &Presence, payload: &str) {
    match serde_json::from_str::<Vec<String>>(payload) {
        Ok(rooms) => rooms.iter().for_each(|room| presence.reported(room)),
        Err(_) => tracing::warn!(payload, "notification on {PRESENCE_CHANNEL} not understood"),
    }
}

/// Puts the room of a notification on the pending list, if this node has sessions in it and
/// has not handed that seq on yet.
fn queue(hub: &Hub, pending: &Pending, payload: &str) {
    let Ok(published) = serde_json::from_str::<Published>(payload) else {
        tracing::warn!(payload, "notification on {CHANNEL} not understood; ignored");
        return;
    };
    let Some(delivered) = hub.delivered(&published.room) else {
        return;
    };
    if published.seq <= delivered {
        return;
    }
    let room: Arc<str> = Arc::from(published.room);
    let mut rooms = pending.lock();
    let seq = rooms.entry(room).or_insert(0);
    *seq = (*seq).max(published.seq);
    drop(rooms);
    pending.wake.notify_one();
}

/// Reads the notified rooms from the database, one after the other, from what the hub has
/// handed on up to the seq notified (the hub drops what it already has). A failed read asks for
/// a head check, which reads the room again in its next pass.
async fn catch_up(
    store: Arc<dyn Store>,
    hub: Hub,
    pending: Arc<Pending>,
    check: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = pending.wake.notified() => {}
        }
        let rooms = std::mem::take(&mut *pending.lock());
        for (room, seq) in rooms {
            // Re-read: the bus, a head check or an earlier notification may have brought it.
            let Some(delivered) = hub.delivered(&room) else {
                continue;
            };
            if seq <= delivered {
                continue;
            }
            let read = super::repair(
                store.as_ref(),
                &hub,
                Arc::clone(&room),
                delivered,
                seq,
                super::CHECK_REPAIR_PAGES,
            );
            match read.await {
                Ok((count, done)) => {
                    metrics::counter!(m::SQL_MESSAGES_READ).increment(count);
                    if !done {
                        check.notify_one();
                    }
                }
                Err(e) => {
                    tracing::warn!(room = %room, error = %e, "reading a published message failed");
                    check.notify_one();
                }
            }
        }
    }
}
