//! The per-user limit (`SEQCAST_USER_SEND_RATE`): leases of tokens from a bucket per user in
//! Redis, a bucket per node while Redis is unusable.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use fred::error::Error as RedisError;
use fred::types::Value;
use tokio::time::Instant;

use super::{TokenBucket, BURST_FACTOR};
use crate::config::Config;
use crate::metrics as m;
use crate::redis::{LinkState, RedisLink, Script};

/// How long tokens taken from Redis stay usable on this node. Unused ones are then dropped (not
/// returned), so a node never holds tokens another node could use for longer than this.
const LEASE_TTL: Duration = Duration::from_secs(2);
/// A node takes `rate / LEASE_DIVISOR` tokens (at least 1, at most [`MAX_LEASE`]) per Redis call:
/// a user sending at full rate costs about ten Redis calls per second per node it sends on.
const LEASE_DIVISOR: u32 = 10;
const MAX_LEASE: u32 = 64;
/// How often idle users are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Takes up to `ARGV[3]` tokens from the bucket `KEYS[1]`, refilled at `ARGV[1]` tokens per
/// second up to `ARGV[2]`, by Redis's clock (so node clocks do not matter). Returns
/// `{granted, ms until the next token}`. The key expires once the bucket would be full again:
/// an idle user costs no memory, and a missing key is a full bucket.
const TAKE_SCRIPT: &str = r"
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
  ts = now
end
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', ts)
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) * 1000 / rate) + 1000)
local wait = 0
if tokens < 1 then
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
return {granted, wait}
";

/// Counts a refusal by the per-user rate and says why, the same on the WebSocket and over HTTP.
pub(crate) fn user_refusal(wait: Duration) -> String {
    metrics::counter!(m::RATE_LIMITED, "limit" => "user").increment(1);
    format!(
        "too many messages from this user (SEQCAST_USER_SEND_RATE); retry in {} ms",
        wait.as_millis().max(1)
    )
}

/// The per-user limit (`SEQCAST_USER_SEND_RATE`). Cheap to clone.
///
/// With Redis, the bucket of a user lives in Redis, but a send does not ask Redis each time:
/// a node takes tokens in small batches (a *lease*: `rate / 10`, at least 1, at most 64, usable
/// for 2 s) and spends them locally, under a lock held for a few instructions. When a lease runs
/// low (half spent), the next batch is fetched in the background, so a user sending steadily
/// never waits for Redis; a send finds the lease empty, and waits for one Redis call, only at the
/// start of a burst or after a pause. Leases only ever hold tokens Redis granted, so a user never
/// gets more than the rate across the cluster; the price is that tokens leased by one node are
/// not available to another until spent or expired (at most one batch per node for 2 s).
/// When Redis refuses (the bucket is empty), the node remembers until when, so a flood past the
/// limit costs Redis about one call per token per node, not one per frame.
///
/// Redis is usable while the node's Redis link is up (`crate::redis`). A Redis call that gets
/// no answer within `SEQCAST_REDIS_TIMEOUT` turns the link down: from then on the node decides
/// alone with a bucket per user of its own (the rate per node) until the link's probe answers
/// again (it pings twice per timeout). So a send waits for Redis at most once per outage, and at
/// most the Redis timeout.
///
/// Right after start the node does not know yet whether Redis is usable (the link is
/// `Connecting`). It does not count alone meanwhile (each node would then grant a whole burst of
/// its own, on top of the cluster's: issue 10, item 3): sends wait for the link's first probe, a
/// PING that waits for the connection, at most about the Redis timeout. Why here rather than by
/// keeping `/ready` at 503: sends reach a node before or without its `/ready` being asked, and a
/// Redis that is down at start must not keep a node out of service (`/ready` is about the
/// database).
#[derive(Clone)]
pub struct UserLimiter {
    /// `None`: the limit is off.
    inner: Option<Arc<UserShared>>,
}

struct UserShared {
    rate: u32,
    /// Tokens per Redis call.
    batch: u32,
    /// A full per-node bucket, cloned for each new user.
    fresh: TokenBucket,
    users: DashMap<String, UserEntry>,
    redis: Option<Arc<RedisBuckets>>,
    last_sweep: Mutex<Instant>,
}

/// One user's state on this node.
struct UserEntry {
    /// The per-node bucket: the limit while Redis is absent or unusable.
    local: TokenBucket,
    /// Tokens taken from Redis, not yet spent; worthless after `lease_until`.
    lease: u32,
    lease_until: Instant,
    /// Redis had no token for this user until then.
    denied_until: Option<Instant>,
    /// A background refill of the lease is under way.
    refilling: bool,
    last_used: Instant,
}

impl UserEntry {
    /// Adds `n` tokens from Redis to the lease.
    fn deposit(&mut self, n: u32, now: Instant) {
        if self.lease_until <= now {
            self.lease = 0;
        }
        self.lease += n;
        self.lease_until = now + LEASE_TTL;
        self.denied_until = None;
    }
}

/// What the lease says about a send.
enum Leased {
    /// A token was spent; start a background refill if `refill`.
    Taken { refill: bool },
    /// Redis said no; retry after this long.
    Denied(Duration),
    /// Ask Redis now.
    Empty,
}

impl UserLimiter {
    /// The limiter of a node: through the node's Redis link when given, per node otherwise.
    pub fn new(config: &Config, redis: Option<RedisLink>) -> UserLimiter {
        let rate = config.user_send_rate;
        let Some(fresh) = TokenBucket::new(rate, Instant::now()) else {
            return UserLimiter { inner: None };
        };
        let redis = redis.map(|link| {
            Arc::new(RedisBuckets {
                prefix: format!("{}rate:", link.prefix()),
                link,
                take: Script::new(TAKE_SCRIPT),
            })
        });
        UserLimiter {
            inner: Some(Arc::new(UserShared {
                rate,
                batch: (rate / LEASE_DIVISOR).clamp(1, MAX_LEASE),
                fresh,
                users: DashMap::new(),
                redis,
                last_sweep: Mutex::new(Instant::now()),
            })),
        }
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// Takes a token for one message of `user`, or says how long until one is there.
    pub async fn acquire(&self, user: &str) -> Result<(), Duration> {
        match &self.inner {
            None => Ok(()),
            Some(shared) => shared.acquire(user).await,
        }
    }
}

impl UserShared {
    async fn acquire(self: &Arc<Self>, user: &str) -> Result<(), Duration> {
        let now = Instant::now();
        self.sweep(now);
        if let Some(redis) = self.redis.as_ref().filter(|r| !r.is_settled()) {
            // Just started: whether Redis is usable is not known yet. Counting alone now would
            // give this user a whole burst per node on top of the cluster's (issue 10, item 3),
            // so wait for the first probe (about one Redis timeout at most, once per node).
            Box::pin(redis.link.settled()).await;
        }
        let Some(redis) = self.redis.as_ref().filter(|r| r.is_usable()) else {
            return self.with_entry(user, now, |e| e.local.try_take(now));
        };
        match self.take_leased(user, now) {
            Leased::Taken { refill } => {
                if refill {
                    self.spawn_refill(Arc::clone(redis), user.to_owned());
                }
                Ok(())
            }
            Leased::Denied(wait) => Err(wait),
            // Boxed: the Redis call's future is about 5 KiB, and every session's task would
            // otherwise carry room for it while idle (see `session::inbound`).
            Leased::Empty => Box::pin(self.fetch_now(redis, user)).await,
        }
    }

    /// Runs `f` on the entry of `user`, created if missing. Never held across an await.
    fn with_entry<R>(&self, user: &str, now: Instant, f: impl FnOnce(&mut UserEntry) -> R) -> R {
        let mut entry = match self.users.get_mut(user) {
            Some(entry) => entry,
            None => self
                .users
                .entry(user.to_owned())
                .or_insert_with(|| UserEntry {
                    // Full: refilling from an older instant stops at the burst.
                    local: self.fresh.clone(),
                    lease: 0,
                    lease_until: now,
                    denied_until: None,
                    refilling: false,
                    last_used: now,
                }),
        };
        entry.last_used = now;
        f(&mut entry)
    }

    fn take_leased(&self, user: &str, now: Instant) -> Leased {
        let half = self.batch / 2;
        self.with_entry(user, now, |e| {
            if e.lease_until <= now {
                e.lease = 0;
            }
            if e.lease > 0 {
                e.lease -= 1;
                let refill = !e.refilling && e.lease <= half;
                e.refilling |= refill;
                return Leased::Taken { refill };
            }
            match e.denied_until {
                Some(until) if until > now => Leased::Denied(until - now),
                _ => Leased::Empty,
            }
        })
    }

    /// The lease is empty: one Redis call decides this send (and refills the lease).
    async fn fetch_now(
        self: &Arc<Self>,
        redis: &Arc<RedisBuckets>,
        user: &str,
    ) -> Result<(), Duration> {
        let outcome = redis.take(user, self.rate, self.batch).await;
        let now = Instant::now();
        match outcome {
            Ok(grant) => {
                let half = self.batch / 2;
                let (result, refill) = self.with_entry(user, now, |e| {
                    if grant.granted == 0 {
                        e.denied_until = Some(now + grant.wait);
                        return (Err(grant.wait), false);
                    }
                    e.deposit(grant.granted - 1, now);
                    let refill = !e.refilling && e.lease <= half;
                    e.refilling |= refill;
                    (Ok(()), refill)
                });
                if refill {
                    self.spawn_refill(Arc::clone(redis), user.to_owned());
                }
                result
            }
            Err(error) => {
                tracing::debug!(error = %error, "user rate in Redis failed: counting per node");
                self.with_entry(user, now, |e| e.local.try_take(now))
            }
        }
    }

    /// Tops the lease up in the background.
    fn spawn_refill(self: &Arc<Self>, redis: Arc<RedisBuckets>, user: String) {
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            let outcome = redis.take(&user, shared.rate, shared.batch).await;
            let now = Instant::now();
            if let Some(mut e) = shared.users.get_mut(&user) {
                e.refilling = false;
                match &outcome {
                    Ok(grant) if grant.granted > 0 => e.deposit(grant.granted, now),
                    Ok(grant) => e.denied_until = Some(now + grant.wait),
                    Err(_) => {}
                }
            }
        });
    }

    /// Forgets users idle long enough that their state equals a new one's (lease expired, local
    /// bucket full again), at most every [`SWEEP_EVERY`].
    fn sweep(&self, now: Instant) {
        let Ok(mut last) = self.last_sweep.try_lock() else {
            return;
        };
        if now.saturating_duration_since(*last) < SWEEP_EVERY {
            return;
        }
        *last = now;
        drop(last);
        let idle =
            Duration::from_secs(u64::from(BURST_FACTOR)).max(LEASE_TTL) + Duration::from_secs(1);
        self.users
            .retain(|_, e| e.refilling || now.saturating_duration_since(e.last_used) < idle);
    }
}

/// Tokens granted by one Redis call.
struct Grant {
    granted: u32,
    /// Until the bucket holds a token again (when it holds none).
    wait: Duration,
}

/// The user buckets in Redis, through the node's link (whose state says whether Redis is
/// usable).
struct RedisBuckets {
    link: RedisLink,
    /// `{SEQCAST_REDIS_PREFIX}rate:`
    prefix: String,
    take: Script,
}

impl RedisBuckets {
    fn is_usable(&self) -> bool {
        self.link.is_up()
    }

    fn is_settled(&self) -> bool {
        self.link.state() != LinkState::Connecting
    }

    /// `TAKE_SCRIPT` on the user's key, bounded by the Redis timeout; an outage is reported to
    /// the link (which then reads down until its probe answers).
    async fn take(&self, user: &str, rate: u32, want: u32) -> Result<Grant, RedisError> {
        let args = vec![
            Value::from(i64::from(rate)),
            Value::from(i64::from(rate) * i64::from(BURST_FACTOR)),
            Value::from(i64::from(want)),
        ];
        let key = format!("{}{user}", self.prefix);
        let (granted, wait_ms): (i64, i64) = self.take.run(&self.link, &key, args).await?;
        Ok(Grant {
            granted: u32::try_from(granted).unwrap_or(0),
            wait: Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0).max(1)),
        })
    }
}
