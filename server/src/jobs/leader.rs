//! Leader election: a lock in Redis that one node at a time holds and keeps renewing.
//!
//! [`Leadership::elect`] returns the handle every part of the node reads ([`Leadership`]) and
//! the loop that keeps it up to date ([`Election`], run on a task of its own). Why two nodes
//! never both believe they lead is explained in the [module above](super).

use std::future::pending;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fred::error::Error as RedisError;
use fred::interfaces::{ClientLike, KeysInterface};
use fred::types::{Expiration, SetOptions, Value};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Config;
use crate::redis::{RedisLink, Script};

use crate::metrics::LEADER;

/// Extends the lock by `ARGV[2]` ms if it still holds our value `ARGV[1]`; 1 if it did.
const EXTEND: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then \
                      return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end";

/// Deletes the lock if it still holds our value `ARGV[1]`; 1 if it did.
const RELEASE: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then \
                       return redis.call('del', KEYS[1]) else return 0 end";

/// Settings of an [`Election`].
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// The lock's key: `{SEQCAST_REDIS_PREFIX}leader`, by default `seqcast:leader`.
    pub key: String,
    /// Part of the lock's value, so that `GET seqcast:leader` shows who leads.
    pub node_id: String,
    /// `SEQCAST_LEADER_TTL`: the lock's lifetime in Redis, default 10 s. A node that crashes
    /// while leading is replaced within about this long. Each command is bounded by the link's
    /// timeout (`SEQCAST_REDIS_TIMEOUT`).
    pub ttl: Duration,
}

impl ElectionConfig {
    pub fn from_config(config: &Config) -> Self {
        ElectionConfig {
            key: format!("{}leader", config.redis_prefix),
            node_id: config.node_id.clone(),
            ttl: config.leader_ttl,
        }
    }

    /// How long after sending a successful acquire or renew the node believes it leads: the
    /// TTL less a margin of a fifth, which absorbs a Redis clock that runs faster than ours.
    fn lease(&self) -> Duration {
        self.ttl - self.ttl / 5
    }

    /// The leader renews three times per TTL, so one failed renewal does not cost the lease.
    fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// Other nodes (and a leader whose renewal failed) try again ten times per TTL, so a
    /// released or expired lock is taken over soon.
    fn retry_every(&self) -> Duration {
        self.ttl / 10
    }
}

/// Whether this node leads. Cheap to clone; [`Leadership::is_leader`] reads the clock, so it is
/// right at the moment it is called, even while the election loop is stuck on Redis.
#[derive(Clone)]
pub struct Leadership {
    shared: Arc<Shared>,
}

struct Shared {
    kind: Kind,
    /// The last state published, for [`Leadership::subscribe`]; also logs and the gauge.
    state: watch::Sender<bool>,
}

enum Kind {
    /// No Redis: every node leads (every job is idempotent).
    Always,
    /// Elected: leads until the end of the lease, `None` when not leading. A std mutex: it is
    /// held for a read or a write of one value, never across an await.
    Elected(Mutex<Option<Instant>>),
}

impl Leadership {
    /// Leadership without an election: every node leads, always. For a node without Redis.
    pub fn always() -> Leadership {
        metrics::gauge!(LEADER).set(1.0);
        Leadership {
            shared: Arc::new(Shared {
                kind: Kind::Always,
                state: watch::Sender::new(true),
            }),
        }
    }

    /// Leadership decided by a lock in Redis, through the node's Redis link. Leads only once the
    /// returned [`Election`] runs and has acquired the lock.
    pub fn elect(redis: RedisLink, config: ElectionConfig) -> (Leadership, Election) {
        metrics::gauge!(LEADER).set(0.0);
        let leadership = Leadership {
            shared: Arc::new(Shared {
                kind: Kind::Elected(Mutex::new(None)),
                state: watch::Sender::new(false),
            }),
        };
        let lock = Lock {
            value: format!("{}:{}", config.node_id, Uuid::new_v4()),
            ttl_ms: i64::try_from(config.ttl.as_millis())
                .unwrap_or(i64::MAX)
                .max(1),
            key: config.key.clone(),
            redis,
            extend: Script::new(EXTEND),
            release: Script::new(RELEASE),
        };
        let election = Election {
            leadership: leadership.clone(),
            lock,
            config,
        };
        (leadership, election)
    }

    /// True while this node leads: always without an election, else until the end of the
    /// current lease, by the local monotonic clock.
    pub fn is_leader(&self) -> bool {
        match &self.shared.kind {
            Kind::Always => true,
            Kind::Elected(lease) => {
                let end = *lease.lock().unwrap_or_else(PoisonError::into_inner);
                end.is_some_and(|end| Instant::now() < end)
            }
        }
    }

    /// Follows changes of leadership. The value may trail [`Leadership::is_leader`] by a moment
    /// (the time the election loop takes to notice); decide with `is_leader`, wake up with this.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.shared.state.subscribe()
    }

    /// The end of the current lease, if any.
    fn lease_end(&self) -> Option<Instant> {
        match &self.shared.kind {
            Kind::Always => None,
            Kind::Elected(lease) => *lease.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }

    fn set_lease_end(&self, end: Option<Instant>) {
        if let Kind::Elected(lease) = &self.shared.kind {
            *lease.lock().unwrap_or_else(PoisonError::into_inner) = end;
        }
    }

    /// Resolves when the current lease runs out; never when there is none.
    async fn lapsed(&self) {
        match self.lease_end() {
            Some(end) => sleep_until(end).await,
            None => pending().await,
        }
    }

    /// Forgets a lease that has run out, then publishes the state when it changed: the
    /// watchers, the gauge and one log line per change.
    fn refresh(&self) {
        if self.lease_end().is_some_and(|end| end <= Instant::now()) {
            self.set_lease_end(None);
        }
        let leader = self.is_leader();
        let changed = self.shared.state.send_if_modified(|state| {
            let changed = *state != leader;
            *state = leader;
            changed
        });
        if changed {
            metrics::gauge!(LEADER).set(if leader { 1.0 } else { 0.0 });
            if leader {
                tracing::info!("became the leader: running the background jobs");
            } else {
                tracing::info!("no longer the leader");
            }
        }
    }
}

/// The loop that acquires the lock, renews it and releases it at shutdown.
pub struct Election {
    leadership: Leadership,
    lock: Lock,
    config: ElectionConfig,
}

impl Election {
    /// Runs until `shutdown` is cancelled, then gives up leadership and releases the lock.
    /// Every Redis command is bounded by the configured timeout, so this returns promptly even
    /// when Redis does not answer.
    pub async fn run(self, shutdown: CancellationToken) {
        let leadership = &self.leadership;
        // The link connects in the background: a claim sent before it has would fail at once
        // (commands fail fast while disconnected) and log a warning about an outage that is not
        // one. The first probe decides within about one Redis timeout; a link that is down then
        // is no reason to wait longer (the claims below fail and retry).
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = self.lock.redis.settled() => {}
        }
        let mut next_attempt = Instant::now();
        let mut redis_answers = true;
        'election: loop {
            tokio::select! {
                _ = shutdown.cancelled() => break 'election,
                _ = sleep_until(next_attempt) => {}
                _ = leadership.lapsed() => {
                    leadership.refresh();
                    continue 'election;
                }
            }

            // The lock can only have been set or extended after this instant, so it lives in
            // Redis at least until `sent_at + ttl`, however late the reply comes.
            let sent_at = Instant::now();
            let leading = leadership.lease_end().is_some();
            let attempt = self.lock.claim(leading);
            tokio::pin!(attempt);
            let outcome = loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break 'election,
                    outcome = &mut attempt => break outcome,
                    // A slow reply must not keep a lease alive past its end.
                    _ = leadership.lapsed() => leadership.refresh(),
                }
            };

            let answered = outcome.is_ok();
            match outcome {
                Ok(true) => {
                    leadership.set_lease_end(Some(sent_at + self.config.lease()));
                    next_attempt = sent_at + self.config.renew_every();
                }
                Ok(false) => {
                    // Another node holds the lock.
                    leadership.set_lease_end(None);
                    next_attempt = Instant::now() + self.config.retry_every();
                }
                Err(e) => {
                    // The lease runs out by the clock unless a later attempt succeeds in time.
                    if redis_answers {
                        tracing::warn!(error = %e, "leader election: Redis command failed");
                    } else {
                        tracing::debug!(error = %e, "leader election: Redis command failed");
                    }
                    next_attempt = Instant::now() + self.config.retry_every();
                }
            }
            if answered && !redis_answers {
                tracing::info!("leader election: Redis answers again");
            }
            redis_answers = answered;
            leadership.refresh();
        }

        // Stop believing first, then release, so that this node has stopped leading before
        // another one can start.
        leadership.set_lease_end(None);
        leadership.refresh();
        match self.lock.release().await {
            Ok(true) => tracing::info!("released the leader lock"),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                error = %e,
                ttl = ?self.config.ttl,
                "could not release the leader lock; it expires within the TTL"
            ),
        }
    }
}

/// The lock in Redis: a key holding this node's unique value, with a TTL.
struct Lock {
    /// Its commands fail at once while disconnected and time out after the link's timeout; an
    /// outage is reported to the link.
    redis: RedisLink,
    key: String,
    /// `{node_id}:{random uuid}`: unique to this election, so only it can extend or release.
    value: String,
    ttl_ms: i64,
    extend: Script,
    release: Script,
}

impl Lock {
    /// Makes the lock ours if it can, and returns whether it is ours now. A leader extends it
    /// (compare-and-extend), anyone else sets it if absent (`SET NX PX`); each tries the other
    /// command when its own finds the key not as expected.
    async fn claim(&self, leading: bool) -> Result<bool, RedisError> {
        if leading {
            if self.extend().await? {
                return Ok(true);
            }
            // The lock expired while this node was not looking: take it afresh if it is free.
            self.set_if_absent().await
        } else {
            if self.set_if_absent().await? {
                return Ok(true);
            }
            // An earlier attempt whose reply timed out may have set our value all the same.
            self.extend().await
        }
    }

    async fn set_if_absent(&self) -> Result<bool, RedisError> {
        let client = self.redis.commands().with_options(self.redis.options());
        let set = client.set::<Option<String>, _, _>(
            self.key.as_str(),
            self.value.as_str(),
            Some(Expiration::PX(self.ttl_ms)),
            Some(SetOptions::NX),
            false,
        );
        Ok(self.redis.bounded(set).await?.is_some())
    }

    async fn extend(&self) -> Result<bool, RedisError> {
        let args = vec![Value::from(self.value.as_str()), Value::from(self.ttl_ms)];
        let extended: i64 = self.extend.run(&self.redis, &self.key, args).await?;
        Ok(extended == 1)
    }

    async fn release(&self) -> Result<bool, RedisError> {
        let args = vec![Value::from(self.value.as_str())];
        let released: i64 = self.release.run(&self.redis, &self.key, args).await?;
        Ok(released == 1)
    }
}
