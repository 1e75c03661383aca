//! The node's link to the rest of the cluster: bus subscriptions, remote messages, head checks.
//!
//! - Subscriptions follow the hub: a room is subscribed on the bus when it gets its first local
//!   session and unsubscribed when it loses its last, so a node's bus traffic is proportional to
//!   its own rooms. After a reconnect (or any hint of loss) every local room is subscribed again.
//! - Messages from other nodes go into the hub like local ones; the hub keeps each room in order
//!   (see Holes below) and sessions' cursors repair whatever still gets past.
//! - Head checks: the heads of all local rooms are read from the database in one query, every
//!   `SEQCAST_HEAD_CHECK_INTERVAL` while the bus is up (to find a lost *last* message, which no
//!   later message reveals), every `SEQCAST_POLL_INTERVAL` while it is down or absent (then this
//!   is how messages of other nodes arrive), and at once after a subscription or a reconnect. A
//!   room found behind is read from the database once and fed into the hub.
//! - Ephemeral frames (signals, read cursors) from other nodes go straight to the hub's
//!   sessions: no order, no head check, no repair. A user's channel is subscribed while the
//!   node has a connection of that user, with the same retries as a room's.
//! - Holes: the hub holds a room's messages back while a seq below them is missing (see `hub`);
//!   a hole still open after [`HOLE_GRACE`] (the message was lost, or is slow, on the bus) is
//!   read from the database once for the whole node, and the held messages follow it.
//! - Messages published from SQL (`seqcast_publish`, in an application's transaction) reach no
//!   bus: each node hears of them through one `LISTEN` connection ([`listen`]) and reads them
//!   like a room found behind in a head check.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::bus::{Affected, Bus, BusError, BusEvent, BusState, Ephemeral, Topic};
use crate::config::Config;
use crate::hub::{Hub, Live, Notice, RoomChange};
use crate::metrics as m;
use crate::presence::Presence;
use crate::store::{Store, StoreResult};
use seqcast_protocol as protocol;

mod listen;

/// Messages read per page while repairing a room.
const REPAIR_PAGE: usize = 500;

/// Pages read per room in one head check; a room further behind is read on in the next check
/// (at once), so one room never holds up the head checks of the others.
const CHECK_REPAIR_PAGES: usize = 4;

/// How long a hole may stay open before it is read from the database. A message committed on
/// another node just before one committed here usually arrives through the bus within a
/// millisecond or two; this bounds what a lost one costs its room's sessions.
pub const HOLE_GRACE: std::time::Duration = std::time::Duration::from_millis(30);

/// What `/ready` shows of the cluster link. Cheap to clone.
#[derive(Clone)]
pub struct RelayStatus {
    shared: Arc<StatusInner>,
}

struct StatusInner {
    /// "redis", "none" (Postgres without Redis: polling), or "local" (a single SQLite node).
    kind: &'static str,
    up: AtomicBool,
}

impl RelayStatus {
    /// A single node: no other node to hear from.
    pub fn local() -> RelayStatus {
        RelayStatus {
            shared: Arc::new(StatusInner {
                kind: "local",
                up: AtomicBool::new(true),
            }),
        }
    }

    pub fn kind(&self) -> &'static str {
        self.shared.kind
    }

    fn bus_up(&self) -> bool {
        self.shared.up.load(Ordering::Acquire)
    }
}

/// Starts the relay tasks; they stop with `stop`.
pub fn spawn(
    config: &Config,
    store: Arc<dyn Store>,
    hub: Hub,
    presence: Presence,
    (changes, holes): (
        mpsc::UnboundedReceiver<RoomChange>,
        mpsc::UnboundedReceiver<Arc<str>>,
    ),
    bus: Option<(Arc<dyn Bus>, mpsc::Receiver<BusEvent>)>,
    stop: CancellationToken,
) -> RelayStatus {
    let kind = bus.as_ref().map_or("none", |(b, _)| b.kind());
    let status = RelayStatus {
        shared: Arc::new(StatusInner {
            kind,
            up: AtomicBool::new(false),
        }),
    };
    let check = Arc::new(Notify::new());
    let renewals = Arc::new(Renewals::default());
    let (bus, events) = match bus {
        Some((bus, events)) => (Some(bus), Some(events)),
        None => (None, None),
    };
    tokio::spawn(subscriptions(
        bus,
        hub.clone(),
        changes,
        Arc::clone(&check),
        Arc::clone(&renewals),
        stop.clone(),
    ));
    if let Some(events) = events {
        tokio::spawn(bus_events(
            events,
            hub.clone(),
            presence.clone(),
            status.clone(),
            Arc::clone(&check),
            renewals,
            stop.clone(),
        ));
    }
    tokio::spawn(fill_holes(
        Arc::clone(&store),
        hub.clone(),
        holes,
        status.clone(),
        stop.clone(),
    ));
    // Only Postgres nodes get here: SQLite has no `seqcast_publish`, nor another node.
    listen::spawn(
        config.database_url.expose().to_owned(),
        config.db_timeout,
        Arc::clone(&store),
        hub.clone(),
        presence,
        Arc::clone(&check),
        stop.clone(),
    );
    let intervals = (config.head_check_interval, config.poll_interval);
    tokio::spawn(head_checks(
        store,
        hub,
        status.clone(),
        check,
        intervals,
        stop,
    ));
    status
}

/// First pause before retrying a failed SUBSCRIBE; doubled after each failed retry.
const SUBSCRIBE_RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(100);
/// Longest pause between SUBSCRIBE retries.
const SUBSCRIBE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// Subscriptions the bus asked to renew, merged until the subscriptions task takes them.
#[derive(Default)]
struct Renewals {
    wanted: std::sync::Mutex<Renewal>,
    notify: Notify,
}

#[derive(Default)]
struct Renewal {
    /// Every subscription (a reconnect).
    all: bool,
    /// Those of the topics in any of these (slots that moved), unless `all`.
    some: Vec<Affected>,
}

impl Renewals {
    fn lock(&self) -> std::sync::MutexGuard<'_, Renewal> {
        self.wanted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn all(&self) {
        let mut wanted = self.lock();
        wanted.all = true;
        wanted.some.clear();
        drop(wanted);
        self.notify.notify_one();
    }

    fn some(&self, affected: Affected) {
        let mut wanted = self.lock();
        if !wanted.all {
            wanted.some.push(affected);
        }
        drop(wanted);
        self.notify.notify_one();
    }

    fn take(&self) -> Renewal {
        std::mem::take(&mut *self.lock())
    }
}

/// Keeps the bus subscriptions equal to the hub's rooms and users. A SUBSCRIBE that fails (a paused
/// Redis, a connection being replaced) is retried with backoff until it succeeds or the room
/// closes, whether or not the bus reports a reconnect meanwhile.
async fn subscriptions(
    bus: Option<Arc<dyn Bus>>,
    hub: Hub,
    mut changes: mpsc::UnboundedReceiver<RoomChange>,
    check: Arc<Notify>,
    renewals: Arc<Renewals>,
    stop: CancellationToken,
) {
    // Rooms and users whose subscription failed, and when to try them again.
    let mut pending: std::collections::BTreeSet<Topic> = std::collections::BTreeSet::new();
    let mut backoff = SUBSCRIBE_RETRY_MIN;
    let retry = tokio::time::sleep(backoff);
    tokio::pin!(retry);
    loop {
        let mut topics = Vec::new();
        tokio::select! {
            _ = stop.cancelled() => return,
            change = changes.recv() => {
                let (topic, opened) = match change {
                    None => return,
                    Some(RoomChange::Opened(room)) => (Topic::Room(room), true),
                    Some(RoomChange::Closed(room)) => (Topic::Room(room), false),
                    Some(RoomChange::UserOpened(user)) => (Topic::User(user), true),
                    Some(RoomChange::UserClosed(user)) => (Topic::User(user), false),
                };
                pending.remove(&topic);
                if opened {
                    topics.push(topic);
                } else {
                    if let Some(bus) = &bus {
                        if let Err(e) = unsubscribe(bus.as_ref(), &topic).await {
                            tracing::debug!(?topic, error = %e, "unsubscribe failed");
                        }
                    }
                    continue;
                }
            },
            _ = renewals.notify.notified() => {
                let renewal = renewals.take();
                if renewal.all {
                    pending.clear();
                    backoff = SUBSCRIBE_RETRY_MIN;
                    topics = open_topics(&hub);
                } else {
                    topics = open_topics(&hub)
                        .into_iter()
                        .filter(|t| renewal.some.iter().any(|a| a.contains(t)))
                        .collect();
                }
            }
            () = &mut retry, if !pending.is_empty() => {
                // Only rooms and users that still have local sessions.
                let open: std::collections::HashSet<Topic> =
                    open_topics(&hub).into_iter().collect();
                topics = std::mem::take(&mut pending)
                    .into_iter()
                    .filter(|t| open.contains(t))
                    .collect();
                backoff = (backoff * 2).min(SUBSCRIBE_RETRY_MAX);
            }
        }
        // A user's channel carries nothing a head check could find: only a room's subscription
        // calls for one (a reconnect storm of users must not make one per connection).
        let rooms_touched = topics.iter().any(|t| matches!(t, Topic::Room(_)));
        let Some(bus) = &bus else {
            if rooms_touched {
                check.notify_one();
            }
            continue;
        };
        let was_pending = !pending.is_empty();
        let mut topics = topics.into_iter();
        while let Some(topic) = topics.next() {
            if let Err(e) = subscribe(bus.as_ref(), &topic).await {
                // Said once per run of failures (a refusal such as an ACL without the channel
                // is an operator's to fix); the retries that follow stay quiet.
                if was_pending {
                    tracing::debug!(?topic, error = %e, "subscribe failed; retrying");
                } else {
                    tracing::warn!(
                        ?topic,
                        error = %e,
                        "subscribe failed; retrying with backoff up to 2 s"
                    );
                }
                // Each attempt may wait for the Redis timeout: the rest are tried with it later.
                pending.insert(topic);
                pending.extend(topics);
                break;
            }
        }
        if pending.is_empty() {
            backoff = SUBSCRIBE_RETRY_MIN;
        } else if !was_pending || retry.is_elapsed() {
            retry.as_mut().reset(tokio::time::Instant::now() + backoff);
        }
        // Messages committed elsewhere before a subscription took effect travelled before we
        // listened: look for them now.
        if rooms_touched {
            check.notify_one();
        }
    }
}

/// Every room and user this node has sessions of.
fn open_topics(hub: &Hub) -> Vec<Topic> {
    let rooms = hub.rooms().into_iter().map(Topic::Room);
    rooms
        .chain(hub.users().into_iter().map(Topic::User))
        .collect()
}

async fn subscribe(bus: &dyn Bus, topic: &Topic) -> Result<(), BusError> {
    match topic {
        // A room's presence reports share its channel.
        Topic::Room(room) | Topic::Presence(room) => bus.subscribe(room).await,
        Topic::User(user) => bus.subscribe_user(user).await,
    }
}

async fn unsubscribe(bus: &dyn Bus, topic: &Topic) -> Result<(), BusError> {
    match topic {
        Topic::Room(room) | Topic::Presence(room) => bus.unsubscribe(room).await,
        Topic::User(user) => bus.unsubscribe_user(user).await,
    }
}

/// Feeds messages of other nodes into the hub and tracks the bus state.
async fn bus_events(
    mut events: mpsc::Receiver<BusEvent>,
    hub: Hub,
    presence: Presence,
    status: RelayStatus,
    check: Arc<Notify>,
    renewals: Arc<Renewals>,
    stop: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
        };
        match event {
            BusEvent::Message(msg) => {
                let live = Arc::new(Live {
                    room: msg.room,
                    seq: msg.seq,
                    frame: msg.frame,
                });
                let seq = live.seq;
                if let (Some(previous), _) = hub.publish(live) {
                    if previous > 0 && seq > previous + 1 {
                        // Lost or reordered on the bus: the hub holds this message until the
                        // hole fills (`fill_holes`).
                        metrics::counter!(m::GAPS_DETECTED).increment(1);
                    }
                }
            }
            // Straight to the sessions: no order, no repair (at most once).
            BusEvent::Ephemeral(Ephemeral { topic, frame }) => match topic {
                Topic::Room(room) => {
                    let notice = Arc::new(Notice {
                        room: Some(Arc::clone(&room)),
                        except: None,
                        frame,
                    });
                    hub.signal(&room, &notice);
                }
                Topic::User(user) => {
                    let notice = Arc::new(Notice {
                        room: None,
                        except: None,
                        frame,
                    });
                    hub.to_user(&user, &notice);
                }
                Topic::Presence(room) => presence.reported(&room),
            },
            BusEvent::MaybeLost => {
                presence.reread_all();
                renewals.all();
                check.notify_one();
            }
            // The rooms' heads are checked once their subscriptions are renewed.
            BusEvent::Dropped(affected) => {
                presence.reread_some(&affected);
                renewals.some(affected);
            }
            BusEvent::State(state) => {
                status
                    .shared
                    .up
                    .store(state == BusState::Up, Ordering::Release);
                // Either way the head-check pace changes; check now.
                check.notify_one();
            }
        }
    }
}

/// Compares the heads of local rooms with the database and feeds what is missing into the hub.
async fn head_checks(
    store: Arc<dyn Store>,
    hub: Hub,
    status: RelayStatus,
    check: Arc<Notify>,
    (when_up, when_down): (std::time::Duration, std::time::Duration),
    stop: CancellationToken,
) {
    loop {
        let pause = if status.bus_up() { when_up } else { when_down };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
            _ = check.notified() => {}
        }
        if let Err(e) = check_heads(store.as_ref(), &hub, &check).await {
            tracing::warn!(error = %e, "head check failed");
        }
    }
}

async fn check_heads(store: &dyn Store, hub: &Hub, check: &Notify) -> StoreResult<()> {
    let local = hub.seeded_heads();
    if local.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = local.iter().map(|(room, _)| room.to_string()).collect();
    let heads = store.room_heads(&names).await?;
    let mut unfinished = false;
    for (room, db_head) in heads {
        // Re-read: a message may have arrived while the query ran, and the room may have lost
        // its last session (then there is nothing to read for it: from 0 that would be its
        // whole history). From what was handed on, not from the head: every hole below the
        // held messages is read in the same pass.
        let Some(known) = hub.delivered(&room) else {
            continue;
        };
        if db_head > known {
            metrics::counter!(m::GAPS_DETECTED).increment(1);
            let room = Arc::from(room.as_str());
            let (repaired, done) =
                repair(store, hub, room, known, db_head, CHECK_REPAIR_PAGES).await?;
            metrics::counter!(m::MESSAGES_REPAIRED).increment(repaired);
            unfinished |= !done;
        }
    }
    if unfinished {
        // Bounded work per room and check, so that one far-behind room does not hold up the
        // others: the rest follows in the next check, at once.
        check.notify_one();
    }
    Ok(())
}

/// Fills the holes the hub reports. While the bus is up, a hole still open after
/// [`HOLE_GRACE`] (lost or slow on the bus) is read from the database, together with every
/// other hole below the room's head, in one pass; the held messages follow. While the bus is
/// down nothing fills a hole but the database, and the poll (`head_checks`, every
/// `SEQCAST_POLL_INTERVAL`) reads everything missing of every room in one pass per interval:
/// no read per hole, no grace per hole. A hole that cannot be filled (the database is
/// unreachable, or retention deleted the messages) is given up: the held messages go out and
/// each session reads what it lacks itself.
async fn fill_holes(
    store: Arc<dyn Store>,
    hub: Hub,
    mut holes: mpsc::UnboundedReceiver<Arc<str>>,
    status: RelayStatus,
    stop: CancellationToken,
) {
    loop {
        let room = tokio::select! {
            _ = stop.cancelled() => return,
            room = holes.recv() => match room {
                Some(room) => room,
                None => return,
            },
        };
        // One task per open hole (the hub reports a room again only after its hole closed), so
        // one slow read never delays another room's.
        let (store, hub, status, stop) = (
            Arc::clone(&store),
            hub.clone(),
            status.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                () = fill(store.as_ref(), &hub, &status, room) => {}
            }
        });
    }
}

async fn fill(store: &dyn Store, hub: &Hub, status: &RelayStatus, room: Arc<str>) {
    loop {
        tokio::time::sleep(HOLE_GRACE).await;
        let Some((after, _)) = hub.hole(&room) else {
            // Filled by the bus or the poll in the meantime (or the room closed).
            return;
        };
        if !status.bus_up() {
            // The poll reads it, with everything else missing, within a poll interval; it
            // also gives up on a hole the database does not have.
            return;
        }
        // Up to the head: every hole below the held messages at once.
        let upto = hub.head(&room);
        match repair(store, hub, Arc::clone(&room), after, upto, usize::MAX).await {
            Ok((repaired, _)) => metrics::counter!(m::MESSAGES_REPAIRED).increment(repaired),
            Err(e) => tracing::warn!(room = %room, error = %e, "reading a hole failed"),
        }
        match hub.hole(&room) {
            None => return,
            Some((after_now, _)) if after_now <= after => {
                // Nothing came of it: let the sessions repair it themselves.
                hub.release(&room);
                return;
            }
            // Filled, and a new hole opened meanwhile (its report was dropped with this one):
            // handle it as a fresh one.
            Some(_) => {}
        }
    }
}

/// Reads `(after, upto]` of `room`, at most `pages` pages, and hands it to the hub, serialized
/// once per message. Returns how many messages were read and whether all of it was.
async fn repair(
    store: &dyn Store,
    hub: &Hub,
    room: Arc<str>,
    mut after: u64,
    upto: u64,
    pages: usize,
) -> StoreResult<(u64, bool)> {
    let mut count = 0;
    for _ in 0..pages {
        if after >= upto {
            break;
        }
        let page = store
            .read_after(&room, after, Some(upto), REPAIR_PAGE)
            .await?;
        let Some(last) = page.last() else {
            return Ok((count, true));
        };
        after = last.seq;
        for message in &page {
            let frame = Utf8Bytes::from(protocol::message_frame(message));
            let _ = hub.publish(Arc::new(Live {
                room: Arc::clone(&room),
                seq: message.seq,
                frame,
            }));
            count += 1;
        }
        if page.len() < REPAIR_PAGE {
            return Ok((count, true));
        }
    }
    Ok((count, after >= upto))
}

#[cfg(test)]
mod tests;
