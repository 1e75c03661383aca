//! Redis pub/sub as the bus (fred), with a channel per room: `{prefix}room:{room}` (messages and
//! signals), and one per user: `{prefix}user:{user}` (read cursors).
//!
//! A node subscribes only to rooms it has sessions in, and to users it has connections of, so its
//! Redis traffic follows its own rooms and users (never one subscription per user of the cluster).
//! Publishing never blocks a commit: messages go to a bounded queue that one task drains,
//! issuing the queued PUBLISHes together (fred pipelines commands in flight on a connection).
//!
//! On a Redis Cluster (`redis-cluster://`) the same channels are *shard* channels: `SPUBLISH`
//! and `SSUBSCRIBE`, so a room's messages go to the one shard that owns its channel's slot,
//! never to every shard (classic `PUBLISH` on a cluster is broadcast to all of them), and adding
//! shards adds pub/sub capacity. A shard failing over drops its connections: fred reconnects,
//! which the bus turns into [`BusEvent::MaybeLost`] like any reconnect (every subscription
//! renewed, heads checked, so what was published meanwhile is read from the database). A slot
//! moving to another shard drops its channels' subscriptions without a reconnect: the node
//! compares the slot map with its routing every second (see [`SLOT_CHECK`]) and reports the
//! topics of the slots that moved as [`BusEvent::Dropped`] (those renewed, their heads
//! checked).
//!
//! Health is the node's [`RedisLink`]'s (see `crate::redis`): while the link is not up,
//! publishes are dropped at once instead of queueing, and the relay polls the database instead.
//! A publish that gets no answer reports an outage to the link. When the link is up again the
//! bus emits [`BusEvent::State`] then [`BusEvent::MaybeLost`], so subscriptions are renewed and
//! every room's head is checked.

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use fred::clients::Pipeline;
use fred::interfaces::{ClientLike, ClusterInterface, EventInterface, PubsubInterface};
use fred::types::cluster::ClusterRouting;
use fred::types::{ClusterHash, CustomCommand, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    decode, encode, encode_ephemeral, Affected, Bus, BusError, BusEvent, BusMessage, BusState,
    Decoded, Ephemeral, Topic,
};
use crate::metrics as m;
use crate::redis::{timed_out, LinkState, RedisLink};

/// Messages waiting to be published; past this they are dropped (and repaired by receivers).
const PUBLISH_QUEUE: usize = 16384;
/// Most PUBLISHes sent together.
const PUBLISH_BATCH: usize = 256;
/// Events buffered for the relay.
const EVENT_QUEUE: usize = 4096;
/// On a Redis Cluster, how often the slot map is read and compared with the one the subscriber
/// routes by. A shard that gives a slot away unsubscribes its subscribers with a push that fred
/// drops unseen, and fred learns of a move only from a redirected command, which a node that
/// only subscribes never sends: this check is how such a node notices. Messages published
/// between the move and the renewed subscription reach the node through the head check that
/// follows. One `CLUSTER SLOTS` per node and second.
const SLOT_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// A PUBLISH waiting in the queue.
struct Outgoing {
    channel: String,
    payload: Bytes,
    /// A signal or read cursor, counted apart from messages (its loss costs no repair).
    ephemeral: bool,
}

/// Counts PUBLISHes that did not happen: messages (other nodes repair them from the database)
/// apart from ephemeral frames (lost for good).
fn count_dropped(ephemeral_flags: impl Iterator<Item = bool>) {
    let (mut messages, mut ephemeral) = (0, 0);
    for is_ephemeral in ephemeral_flags {
        if is_ephemeral {
            ephemeral += 1;
        } else {
            messages += 1;
        }
    }
    if messages > 0 {
        metrics::counter!(m::BUS_PUBLISH_DROPPED).increment(messages);
    }
    if ephemeral > 0 {
        metrics::counter!(m::EPHEMERAL_DROPPED, "at" => "bus").increment(ephemeral);
    }
}

pub struct RedisBus {
    shared: Arc<Shared>,
}

struct Shared {
    /// Of room channels.
    prefix: String,
    /// Of user channels.
    user_prefix: String,
    /// Distinguishes this process's own messages when they come back from Redis.
    origin: String,
    /// A Redis Cluster: shard channels (`SPUBLISH`, `SSUBSCRIBE`).
    clustered: bool,
    link: RedisLink,
    queue: mpsc::Sender<Outgoing>,
    events: mpsc::Sender<BusEvent>,
}

impl RedisBus {
    /// Starts the bus on `link` (connected, or not yet, in the background). Its tasks stop with
    /// `shutdown`.
    pub fn start(
        link: &RedisLink,
        shutdown: CancellationToken,
    ) -> (RedisBus, mpsc::Receiver<BusEvent>) {
        let (queue, queued) = mpsc::channel(PUBLISH_QUEUE);
        let (events, events_rx) = mpsc::channel(EVENT_QUEUE);
        let shared = Arc::new(Shared {
            prefix: format!("{}room:", link.prefix()),
            user_prefix: format!("{}user:", link.prefix()),
            origin: uuid::Uuid::new_v4().simple().to_string(),
            clustered: link.is_clustered(),
            link: link.clone(),
            queue,
            events,
        });
        tokio::spawn(Arc::clone(&shared).publish_loop(queued, shutdown.clone()));
        if shared.clustered {
            tokio::spawn(Arc::clone(&shared).watch_slots(shutdown.clone()));
        }
        tokio::spawn(Arc::clone(&shared).receive_loop(shutdown));
        (RedisBus { shared }, events_rx)
    }
}

impl Shared {
    fn channel(&self, room: &str) -> String {
        format!("{}{}", self.prefix, room)
    }

    fn user_channel(&self, user: &str) -> String {
        format!("{}{}", self.user_prefix, user)
    }

    /// SUBSCRIBE, then learn whether Redis accepted it.
    ///
    /// fred answers a SUBSCRIBE as soon as it is written (its success reply is a push frame), so
    /// a refusal, such as `-NOPERM` from an ACL user without the channel, would be dropped unseen
    /// and never retried. A PING pipelined behind it is answered in order on the same connection:
    /// it receives the SUBSCRIBE's error if there was one, and its own reply otherwise. fred's
    /// connection task writes every command of a pipeline before it reads the next reply, so the
    /// error cannot arrive before the PING waits for it. `subscribe_retry` (real Redis, real
    /// ACL) guards this against a change in fred.
    async fn subscribe(&self, channel: String) -> Result<(), BusError> {
        self.confirmed(channel, Subscription::Subscribe).await
    }

    /// UNSUBSCRIBE, confirmed the same way (a PING behind it): once this returns, Redis has
    /// taken the channel off, and nothing published after it arrives here.
    async fn unsubscribe(&self, channel: String) -> Result<(), BusError> {
        self.confirmed(channel, Subscription::Unsubscribe).await
    }

    /// `change` for `channel` with a PING pipelined behind it, within the link's timeout.
    async fn confirmed(&self, channel: String, change: Subscription) -> Result<(), BusError> {
        let pipeline = Pipeline::from(self.link.subscriber().clone());
        let clustered = self.clustered;
        let confirmed = async {
            // On a cluster the PING must go where the SSUBSCRIBE went: the connection to the
            // shard that owns the channel's slot (fred sends a plain PING to a random shard).
            let slot = fred::util::redis_keyslot(channel.as_bytes());
            match (change, clustered) {
                (Subscription::Subscribe, false) => pipeline.subscribe(channel).await?,
                (Subscription::Unsubscribe, false) => pipeline.unsubscribe(channel).await?,
                (Subscription::Subscribe, true) => pipeline.ssubscribe(channel).await?,
                (Subscription::Unsubscribe, true) => pipeline.sunsubscribe(channel).await?,
            }
            if clustered {
                let ping = CustomCommand::new_static("PING", ClusterHash::Custom(slot), false);
                pipeline.custom::<(), String>(ping, Vec::new()).await?;
            } else {
                pipeline.ping::<()>(None).await?;
            }
            pipeline.last::<Value>().await
        };
        match tokio::time::timeout(self.link.timeout(), confirmed).await {
            Ok(Ok(_pong)) => Ok(()),
            Ok(Err(e)) => Err(BusError::Unavailable(e.to_string())),
            Err(_) => Err(BusError::Timeout),
        }
    }

    /// The event a payload on `channel` makes: `None` for this node's own publications and for
    /// anything that is not ours.
    fn event(&self, channel: &str, payload: Bytes) -> Option<BusEvent> {
        let topic = if let Some(room) = channel.strip_prefix(self.prefix.as_str()) {
            Topic::Room(Arc::from(room))
        } else {
            Topic::User(Arc::from(channel.strip_prefix(self.user_prefix.as_str())?))
        };
        match (decode(payload)?, topic) {
            (
                Decoded::Message { origin, .. }
                | Decoded::Ephemeral { origin, .. }
                | Decoded::Presence { origin },
                _,
            ) if origin == self.origin => None,
            (Decoded::Message { seq, frame, .. }, Topic::Room(room)) => {
                metrics::counter!(m::BUS_RECEIVED).increment(1);
                Some(BusEvent::Message(BusMessage { room, seq, frame }))
            }
            (Decoded::Ephemeral { frame, .. }, topic) => {
                Some(BusEvent::Ephemeral(Ephemeral { topic, frame }))
            }
            (Decoded::Presence { .. }, Topic::Room(room)) => Some(BusEvent::Ephemeral(Ephemeral {
                topic: Topic::Presence(room),
                frame: Utf8Bytes::from_static(""),
            })),
            (Decoded::Presence { .. }, _) => None,
            // A seq on a user channel: not something this version publishes. (Channels map to
            // rooms and users only.)
            (Decoded::Message { .. }, Topic::User(_) | Topic::Presence(_)) => None,
        }
    }

    async fn publish_loop(
        self: Arc<Self>,
        mut queued: mpsc::Receiver<Outgoing>,
        stop: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(PUBLISH_BATCH);
        loop {
            let n = tokio::select! {
                _ = stop.cancelled() => break,
                n = queued.recv_many(&mut batch, PUBLISH_BATCH) => n,
            };
            if n == 0 {
                break;
            }
            // Which PUBLISHes carry ephemeral frames, for the counts once the batch is gone.
            let ephemeral: Vec<bool> = batch.iter().map(|item| item.ephemeral).collect();
            if !self.link.is_up() {
                count_dropped(ephemeral.into_iter());
                batch.clear();
                continue;
            }
            // One pipeline per batch: the commands go to the connection together and come back
            // as one response, rather than a command future and a reply channel per message.
            let pipeline = self.link.commands().pipeline();
            for item in batch.drain(..) {
                // Only queues the command in memory; the outcome comes from `try_all`.
                let _: Result<(), _> = if self.clustered {
                    pipeline.spublish(item.channel, item.payload).await
                } else {
                    pipeline.publish(item.channel, item.payload).await
                };
            }
            let timeout = self.link.timeout();
            match tokio::time::timeout(timeout, pipeline.try_all::<i64>()).await {
                Ok(results) => {
                    // Counted from the successes: a broken connection may answer with fewer
                    // results than commands (those missing count as dropped).
                    let ok = |i: usize| results.get(i).is_some_and(Result::is_ok);
                    let published = (0..n).filter(|&i| !ephemeral[i] && ok(i)).count();
                    metrics::counter!(m::BUS_PUBLISHED).increment(published as u64);
                    count_dropped((0..n).filter(|&i| !ok(i)).map(|i| ephemeral[i]));
                    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
                        self.link.report_outage(e);
                    }
                }
                Err(_) => {
                    count_dropped(ephemeral.into_iter());
                    self.link.report_outage(&timed_out(timeout));
                }
            }
        }
    }

    /// On a Redis Cluster: every [`SLOT_CHECK`], reads the slot map; when it differs from the
    /// subscriber's routing, brings that routing up to date (so that renewed subscriptions go to
    /// the new owners at once, not through a redirection) and reports the topics whose
    /// channels' slots changed owner as dropped: their subscriptions are renewed and their
    /// rooms' heads checked. Only those: during a resharding, slots move one after another, and
    /// renewing every subscription of a node with many rooms at each step would flood Redis.
    async fn watch_slots(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SLOT_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // While the link is down there is nothing to route; its return renews everything.
            if !self.link.is_up() {
                continue;
            }
            let now = match self.read_slots().await {
                Ok(now) => now,
                Err(e) => {
                    tracing::debug!(error = %e, "reading the Redis Cluster's slots failed");
                    continue;
                }
            };
            let routed = self.link.subscriber().cached_cluster_state();
            if routed
                .as_ref()
                .is_some_and(|routed| owners(routed) == owners(&now))
            {
                continue;
            }
            let event = match routed {
                Some(routed) => BusEvent::Dropped(self.affected(moved_slots(&routed, &now))),
                // No routing to compare with: renew everything.
                None => BusEvent::MaybeLost,
            };
            tracing::info!("Redis Cluster slots moved: renewing their subscriptions");
            metrics::counter!(m::BUS_SLOT_MOVES).increment(1);
            let synced =
                tokio::time::timeout(self.link.timeout(), self.link.subscriber().sync_cluster())
                    .await;
            if !matches!(synced, Ok(Ok(()))) {
                // Renewed anyway: a subscription sent to the old owner is redirected.
                tracing::debug!("updating the subscriber's slot map failed");
            }
            if self.events.send(event).await.is_err() {
                return;
            }
        }
    }

    /// The cluster's slot map, as the master of slot 0 has it (always the same master, so that
    /// two masters' views do not alternate while the cluster spreads a change).
    async fn read_slots(&self) -> Result<ClusterRouting, BusError> {
        let command = CustomCommand::new_static("CLUSTER", ClusterHash::Custom(0), false);
        let read = self
            .link
            .commands()
            .custom::<Value, _>(command, vec!["SLOTS"]);
        let slots = match tokio::time::timeout(self.link.timeout(), read).await {
            Ok(Ok(slots)) => slots,
            Ok(Err(e)) => return Err(BusError::Unavailable(e.to_string())),
            Err(_) => return Err(BusError::Timeout),
        };
        ClusterRouting::from_cluster_slots(slots, "")
            .map_err(|e| BusError::Unavailable(e.to_string()))
    }

    /// The topics whose channels hash to a slot of `moved`.
    fn affected(&self, moved: Vec<bool>) -> Affected {
        let (rooms, users) = (self.prefix.clone(), self.user_prefix.clone());
        Affected::new(move |topic| {
            let channel = match topic {
                Topic::Room(room) | Topic::Presence(room) => format!("{rooms}{room}"),
                Topic::User(user) => format!("{users}{user}"),
            };
            let slot = fred::util::redis_keyslot(channel.as_bytes());
            moved.get(usize::from(slot)).copied().unwrap_or(true)
        })
    }

    async fn receive_loop(self: Arc<Self>, stop: CancellationToken) {
        use tokio::sync::broadcast::error::RecvError;
        let mut messages = self.link.subscriber().message_rx();
        let mut reconnects = self.link.subscriber().reconnect_rx();
        let mut states = self.link.watch();
        // Report the state it has now too, should it be up already.
        states.mark_changed();
        let mut was_up = false;
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => break,
                changed = states.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let up = *states.borrow_and_update() == LinkState::Up;
                    if up == was_up {
                        continue;
                    }
                    was_up = up;
                    let state = if up { BusState::Up } else { BusState::Down };
                    if self.events.send(BusEvent::State(state)).await.is_err() {
                        break;
                    }
                    if !up {
                        continue;
                    }
                    // Up again: what was published meanwhile never reached us.
                    BusEvent::MaybeLost
                }
                reconnect = reconnects.recv() => match reconnect {
                    // A new connection has no subscriptions: the relay renews them.
                    Ok(_) | Err(RecvError::Lagged(_)) => BusEvent::MaybeLost,
                    Err(RecvError::Closed) => break,
                },
                message = messages.recv() => match message {
                    Ok(message) => {
                        let Some(payload) = message.value.into_bytes() else { continue };
                        let Some(event) = self.event(&message.channel, payload) else { continue };
                        event
                    }
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "fell behind the Redis pub/sub stream");
                        BusEvent::MaybeLost
                    }
                    Err(RecvError::Closed) => break,
                },
            };
            if self.events.send(event).await.is_err() {
                break;
            }
        }
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn publish(&self, message: &BusMessage) {
        let s = &self.shared;
        if !s.link.is_up() {
            metrics::counter!(m::BUS_PUBLISH_DROPPED).increment(1);
            return;
        }
        let item = Outgoing {
            channel: s.channel(&message.room),
            payload: encode(&s.origin, message),
            ephemeral: false,
        };
        if s.queue.try_send(item).is_err() {
            metrics::counter!(m::BUS_PUBLISH_DROPPED).increment(1);
        }
    }

    /// See `Shared::subscribe` for how a refusal is noticed.
    async fn subscribe(&self, room: &str) -> Result<(), BusError> {
        self.shared.subscribe(self.shared.channel(room)).await
    }

    async fn unsubscribe(&self, room: &str) -> Result<(), BusError> {
        self.shared.unsubscribe(self.shared.channel(room)).await
    }

    fn publish_ephemeral(&self, event: &Ephemeral) {
        let s = &self.shared;
        // The second half of the queue is kept for messages: a burst of signals may delay
        // nothing that is committed (messages dropped here would cost other nodes a database
        // read each, signals cost nothing: at most once).
        if !s.link.is_up() || s.queue.capacity() <= PUBLISH_QUEUE / 2 {
            metrics::counter!(m::EPHEMERAL_DROPPED, "at" => "bus").increment(1);
            return;
        }
        let channel = match &event.topic {
            Topic::Room(room) | Topic::Presence(room) => s.channel(room),
            Topic::User(user) => s.user_channel(user),
        };
        let item = Outgoing {
            channel,
            payload: encode_ephemeral(&s.origin, &event.topic, &event.frame),
            ephemeral: true,
        };
        if s.queue.try_send(item).is_err() {
            metrics::counter!(m::EPHEMERAL_DROPPED, "at" => "bus").increment(1);
        }
    }

    async fn subscribe_user(&self, user: &str) -> Result<(), BusError> {
        self.shared.subscribe(self.shared.user_channel(user)).await
    }

    async fn unsubscribe_user(&self, user: &str) -> Result<(), BusError> {
        self.shared
            .unsubscribe(self.shared.user_channel(user))
            .await
    }

    fn state(&self) -> BusState {
        if self.shared.link.is_up() {
            BusState::Up
        } else {
            BusState::Down
        }
    }
}

/// Which of the cluster's 16,384 slots have another master in `after` than in `before` (or
/// one in only one of them).
fn moved_slots(before: &ClusterRouting, after: &ClusterRouting) -> Vec<bool> {
    const SLOTS: usize = 16384;
    let masters = |routing: &ClusterRouting| {
        let mut of = vec![None; SLOTS];
        for range in routing.slots() {
            let (start, end) = (usize::from(range.start), usize::from(range.end));
            if let Some(slots) = of.get_mut(start..=end.min(SLOTS - 1)) {
                slots.fill(Some((range.id.clone(), range.primary.port)));
            }
        }
        of
    };
    let (before, after) = (masters(before), masters(after));
    before.iter().zip(&after).map(|(b, a)| b != a).collect()
}

/// Each slot range of `routing` with its master's node id (and port, should a server not name
/// its nodes): what decides where a shard channel is subscribed.
fn owners(routing: &ClusterRouting) -> Vec<(u16, u16, &str, u16)> {
    routing
        .slots()
        .iter()
        .map(|range| (range.start, range.end, &*range.id, range.primary.port))
        .collect()
}

/// What [`RedisBus::confirmed`] asks of Redis.
#[derive(Debug, Clone, Copy)]
enum Subscription {
    Subscribe,
    Unsubscribe,
}
