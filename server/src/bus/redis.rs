//! Redis pub/sub as the bus (fred), with a channel per room: `{prefix}room:{room}`.
//!
//! A node subscribes only to rooms it has sessions in, so its Redis traffic follows its own rooms.
//! Publishing never blocks a commit: messages go to a bounded queue that one task drains,
//! issuing the queued PUBLISHes together (fred pipelines commands in flight on a connection).
//!
//! Health: every command has a timeout (`SEQCAST_REDIS_TIMEOUT`), and a probe pings both
//! connections twice per timeout. A Redis that is down, or up but not answering (paused), turns
//! the bus [`BusState::Down`]: publishes are dropped at once instead of queueing, and the relay
//! polls the database instead. When the probe succeeds again the bus is `Up` and emits
//! [`BusEvent::MaybeLost`], so subscriptions are renewed and every room's head is checked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::clients::{Client, SubscriberClient};
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use fred::types::config::{Config as FredConfig, ReconnectPolicy};
use fred::types::Builder;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{decode, encode, Bus, BusError, BusEvent, BusMessage, BusState};
use crate::metrics as m;

/// Messages waiting to be published; past this they are dropped (and repaired by receivers).
const PUBLISH_QUEUE: usize = 16384;
/// Most PUBLISHes sent together.
const PUBLISH_BATCH: usize = 256;
/// Events buffered for the relay.
const EVENT_QUEUE: usize = 4096;
/// fred's internal pub/sub broadcast capacity (its default, 32, drops messages under load).
const BROADCAST_CAPACITY: usize = 8192;

pub struct RedisBus {
    shared: Arc<Shared>,
}

struct Shared {
    prefix: String,
    /// Distinguishes this process's own messages when they come back from Redis.
    origin: String,
    timeout: Duration,
    publisher: Client,
    subscriber: SubscriberClient,
    queue: mpsc::Sender<(String, Bytes)>,
    up: AtomicBool,
    events: mpsc::Sender<BusEvent>,
}

impl RedisBus {
    /// Starts connecting to `url` in the background and returns at once: a node starts, and
    /// serves, with Redis down.
    pub fn start(
        url: &str,
        prefix: &str,
        timeout: Duration,
        shutdown: CancellationToken,
    ) -> Result<(RedisBus, mpsc::Receiver<BusEvent>), BusError> {
        let config = FredConfig::from_url(url).map_err(|e| BusError::Unavailable(e.to_string()))?;
        let mut builder = Builder::from_config(config);
        builder
            // Keep reconnecting forever, backing off to 2 s.
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2000, 2))
            .with_performance_config(|perf| {
                perf.default_command_timeout = timeout;
                perf.broadcast_channel_capacity = BROADCAST_CAPACITY;
            })
            .with_connection_config(|conn| {
                conn.connection_timeout = timeout.max(Duration::from_secs(1));
                conn.internal_command_timeout = timeout.max(Duration::from_secs(1));
                // A paused Redis keeps the TCP connection open: treat silence as a dead link.
                conn.unresponsive.max_timeout = Some(timeout * 3);
                conn.unresponsive.interval = (timeout / 2).max(Duration::from_millis(50));
                conn.max_command_attempts = 1;
            });
        let publisher = builder
            .build()
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        let subscriber = builder
            .build_subscriber_client()
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        let (queue, queued) = mpsc::channel(PUBLISH_QUEUE);
        let (events, events_rx) = mpsc::channel(EVENT_QUEUE);
        let shared = Arc::new(Shared {
            prefix: format!("{prefix}room:"),
            origin: uuid::Uuid::new_v4().simple().to_string(),
            timeout,
            publisher,
            subscriber,
            queue,
            up: AtomicBool::new(false),
            events,
        });
        // The connection tasks run until `quit`; their handles are not needed.
        drop(shared.publisher.connect());
        drop(shared.subscriber.connect());
        tokio::spawn(Arc::clone(&shared).publish_loop(queued, shutdown.clone()));
        tokio::spawn(Arc::clone(&shared).receive_loop(shutdown.clone()));
        tokio::spawn(Arc::clone(&shared).health_loop(shutdown));
        Ok((RedisBus { shared }, events_rx))
    }
}

impl Shared {
    fn channel(&self, room: &str) -> String {
        format!("{}{}", self.prefix, room)
    }

    async fn publish_loop(
        self: Arc<Self>,
        mut queued: mpsc::Receiver<(String, Bytes)>,
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
            if !self.up.load(Ordering::Acquire) {
                metrics::counter!(m::BUS_PUBLISH_DROPPED).increment(n as u64);
                batch.clear();
                continue;
            }
            // One pipeline per batch: the commands go to the connection together and come back
            // as one response, rather than a command future and a reply channel per message.
            let pipeline = self.publisher.pipeline();
            for (channel, payload) in batch.drain(..) {
                // Only queues the command in memory; the outcome comes from `try_all`.
                let _: Result<(), _> = pipeline.publish(channel, payload).await;
            }
            match tokio::time::timeout(self.timeout, pipeline.try_all::<i64>()).await {
                Ok(results) => {
                    // Counted from the successes: a broken connection may answer with fewer
                    // results than commands.
                    let published = results.iter().filter(|r| r.is_ok()).count().min(n);
                    let failed = n - published;
                    metrics::counter!(m::BUS_PUBLISHED).increment(published as u64);
                    if failed > 0 {
                        metrics::counter!(m::BUS_PUBLISH_DROPPED).increment(failed as u64);
                        self.mark(BusState::Down, "publish failed").await;
                    }
                }
                Err(_) => {
                    metrics::counter!(m::BUS_PUBLISH_DROPPED).increment(n as u64);
                    self.mark(BusState::Down, "publish timed out").await;
                }
            }
        }
        let _ = self.publisher.quit().await;
    }

    async fn receive_loop(self: Arc<Self>, stop: CancellationToken) {
        use tokio::sync::broadcast::error::RecvError;
        let mut messages = self.subscriber.message_rx();
        let mut reconnects = self.subscriber.reconnect_rx();
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => break,
                reconnect = reconnects.recv() => match reconnect {
                    // A new connection has no subscriptions: the relay renews them.
                    Ok(_) | Err(RecvError::Lagged(_)) => BusEvent::MaybeLost,
                    Err(RecvError::Closed) => break,
                },
                message = messages.recv() => match message {
                    Ok(message) => {
                        let Some(room) = message.channel.strip_prefix(self.prefix.as_str()) else { continue };
                        let Some(payload) = message.value.into_bytes() else { continue };
                        let Some((origin, seq, frame)) = decode(payload) else { continue };
                        if origin == self.origin {
                            continue;
                        }
                        metrics::counter!(m::BUS_RECEIVED).increment(1);
                        BusEvent::Message(BusMessage { room: Arc::from(room), seq, frame })
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
        let _ = self.subscriber.quit().await;
    }

    /// Pings both connections regularly; the bus is up only while both answer in time.
    async fn health_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval((self.timeout / 2).max(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let probe = async {
                let a = self.publisher.ping::<fred::types::Value>(None).await;
                let b = self.subscriber.ping::<fred::types::Value>(None).await;
                a.is_ok() && b.is_ok()
            };
            match tokio::time::timeout(self.timeout, probe).await {
                Ok(true) => self.mark(BusState::Up, "ping answered").await,
                Ok(false) => self.mark(BusState::Down, "ping failed").await,
                Err(_) => self.mark(BusState::Down, "ping timed out").await,
            }
        }
    }

    /// Records a state change once (logs, metric, event); repeated reports of the same state
    /// are ignored.
    async fn mark(&self, state: BusState, why: &str) {
        let up = state == BusState::Up;
        if self.up.swap(up, Ordering::AcqRel) == up {
            return;
        }
        metrics::gauge!(m::BUS_UP).set(if up { 1.0 } else { 0.0 });
        if up {
            tracing::info!("Redis is up: pub/sub fan-out resumed");
        } else {
            tracing::warn!(
                reason = why,
                "Redis is down: delivering through database polling"
            );
        }
        let _ = self.events.send(BusEvent::State(state)).await;
        if up {
            let _ = self.events.send(BusEvent::MaybeLost).await;
        }
    }
}

impl RedisBus {
    /// The bus's command connection, shared with the leader election.
    pub fn client(&self) -> Client {
        self.shared.publisher.clone()
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn publish(&self, message: &BusMessage) {
        let s = &self.shared;
        if !s.up.load(Ordering::Acquire) {
            metrics::counter!(m::BUS_PUBLISH_DROPPED).increment(1);
            return;
        }
        let item = (s.channel(&message.room), encode(&s.origin, message));
        if s.queue.try_send(item).is_err() {
            metrics::counter!(m::BUS_PUBLISH_DROPPED).increment(1);
        }
    }

    async fn subscribe(&self, room: &str) -> Result<(), BusError> {
        let s = &self.shared;
        match tokio::time::timeout(s.timeout, s.subscriber.subscribe(s.channel(room))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BusError::Unavailable(e.to_string())),
            Err(_) => Err(BusError::Timeout),
        }
    }

    async fn unsubscribe(&self, room: &str) -> Result<(), BusError> {
        let s = &self.shared;
        match tokio::time::timeout(s.timeout, s.subscriber.unsubscribe(s.channel(room))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BusError::Unavailable(e.to_string())),
            Err(_) => Err(BusError::Timeout),
        }
    }

    fn state(&self) -> BusState {
        if self.shared.up.load(Ordering::Acquire) {
            BusState::Up
        } else {
            BusState::Down
        }
    }
}
