//! Rate limits: token buckets per connection and per user.
//!
//! Both limits are token buckets that refill at their rate and hold [`BURST_FACTOR`] x the rate,
//! so a client may burst after a quiet spell; a rate of `0` turns a limit off.
//!
//! - **Per connection** (`SEQCAST_SEND_RATE`, default 50/s): every `join`, `auth` and `send`,
//!   and every malformed frame (one that fails to parse, binary frames included) costs a token
//!   of the connection's bucket, which is plain state of the session's inbound half (no lock, no
//!   shared memory). `leave`, `ping` and other valid frames are free. A frame without a token is
//!   answered with `rate_limited` under its `ref` and not executed; the connection stays open
//!   unless it keeps exceeding its rate tenfold ([`AbuseWatch`] says exactly when), which closes
//!   it with 1008 `rate limit`.
//! - **Per user** (`SEQCAST_USER_SEND_RATE`, default 100/s): every WebSocket `send` and every
//!   HTTP POST of one `sub`, on every node together, counted by a bucket in Redis (one atomic Lua
//!   script, key `{SEQCAST_REDIS_PREFIX}rate:{user}`); by a bucket per node while Redis is absent,
//!   down or slow. [`UserLimiter`] explains how a send avoids waiting for Redis.
//!
//! The server key is never limited. Development-mode clients are anonymous, each with a random
//! name, so they are limited per connection only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use fred::clients::Client;
use fred::interfaces::ClientLike;
use fred::types::config::Options;
use fred::types::{ClusterHash, CustomCommand, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::config::Config;
use crate::error::ApiError;
use crate::metrics as m;
use crate::protocol::{self, ClientFrame, ErrorCode, FrameError, Ref};

/// A bucket holds this many seconds of its rate: the burst is 4x the rate.
pub const BURST_FACTOR: u32 = 4;

/// "Tenfold": a window is abusive when more than this many times the connection's rate of
/// rate-counted frames arrive in it.
pub const ABUSE_FACTOR: u64 = 10;
/// Length of one abuse window.
pub const ABUSE_WINDOW: Duration = Duration::from_secs(1);
/// Consecutive abusive windows that close a connection (1008): ten seconds of abuse.
pub const ABUSE_WINDOWS: u32 = 10;

/// How long tokens taken from Redis stay usable on this node. Unused ones are then dropped (not
/// returned), so a node never holds tokens another node could use for longer than this.
const LEASE_TTL: Duration = Duration::from_secs(2);
/// A node takes `rate / LEASE_DIVISOR` tokens (at least 1, at most [`MAX_LEASE`]) per Redis call:
/// a user sending at full rate costs about ten Redis calls per second per node it sends on.
const LEASE_DIVISOR: u32 = 10;
const MAX_LEASE: u32 = 64;
/// While Redis is unusable, how often it is probed (in the background, never by a send).
const REDIS_RETRY: Duration = Duration::from_millis(500);
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

/// A token bucket: refills at `rate` tokens per second, holds at most [`BURST_FACTOR`] x `rate`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket, or `None` for rate 0 (no limit).
    pub fn new(rate: u32, now: Instant) -> Option<TokenBucket> {
        (rate > 0).then(|| {
            let per_sec = f64::from(rate);
            let burst = per_sec * f64::from(BURST_FACTOR);
            TokenBucket {
                per_sec,
                burst,
                tokens: burst,
                updated: now,
            }
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.updated = self.updated.max(now);
    }

    /// Whether a token is there to take at `now`.
    pub fn has_token(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    /// Takes one token, or says how long until there is one.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec))
        }
    }
}

/// Tenfold abuse of a connection's rate, precisely: time is cut into one-second windows
/// ([`ABUSE_WINDOW`]) starting at the connection's first rate-counted frame (after a window
/// without any such frame, at the next one). A window is *abusive* when more than
/// [`ABUSE_FACTOR`] x `SEQCAST_SEND_RATE` rate-counted frames (accepted and refused together)
/// arrive in it. The connection is closed at the moment [`ABUSE_WINDOWS`] consecutive windows
/// are abusive, i.e. during the tenth, as soon as its count passes the threshold. A window that
/// is not abusive (an empty one included) ends the streak. A client that stops at the first
/// `rate_limited` error, or merely sends at up to ten times its rate, is never closed.
#[derive(Debug)]
pub struct AbuseWatch {
    threshold: u64,
    window_start: Option<Instant>,
    count: u64,
    /// Abusive windows just before the current one.
    streak: u32,
}

impl AbuseWatch {
    pub fn new(rate: u32) -> AbuseWatch {
        AbuseWatch {
            threshold: u64::from(rate) * ABUSE_FACTOR,
            window_start: None,
            count: 0,
            streak: 0,
        }
    }

    /// Records one rate-counted frame at `now`; true when the connection must be closed.
    pub fn record(&mut self, now: Instant) -> bool {
        let start = *self.window_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= ABUSE_WINDOW {
            let adjacent = elapsed < ABUSE_WINDOW * 2;
            let abusive = self.count > self.threshold;
            self.streak = if abusive && adjacent {
                self.streak + 1
            } else {
                0
            };
            // After a gap the streak is over anyway: start a new window here.
            self.window_start = Some(if adjacent { start + ABUSE_WINDOW } else { now });
            self.count = 0;
        }
        self.count += 1;
        self.count > self.threshold && self.streak + 1 >= ABUSE_WINDOWS
    }
}

/// The node-wide allowance for *excess* frames: those read from a connection that is over its
/// own `SEQCAST_SEND_RATE` (its bucket is empty, so the frame will be refused or is free
/// anyway). Each costs a permit of one node-wide semaphore that a ticker refills at
/// `SEQCAST_EXCESS_FRAME_RATE` per second (holding at most a tenth of a second of it); until it
/// gets one, the connection is not read (the kernel's buffers fill and TCP slows the sender
/// down).
///
/// Why: answering a refused frame costs the node about as much as serving a good one (read,
/// parse, error frame, write), and a few hundred connections flooding at once could otherwise
/// take all of the node's CPU from the clients within their rate. With the allowance the node
/// spends a bounded share on floods, whatever their size; one abuser alone still gets far more
/// than ten times its rate, so the tenfold-abuse close ([`AbuseWatch`]) still finds it. The
/// semaphore queues its waiters in order, so each permit wakes one connection, not all of them.
#[derive(Clone)]
pub struct ExcessAllowance {
    permits: Option<Arc<tokio::sync::Semaphore>>,
}

/// How often the excess allowance is refilled.
const EXCESS_REFILL_EVERY: Duration = Duration::from_millis(10);

impl ExcessAllowance {
    /// `rate` excess frames per second for the node; 0 = no limit. The refill task stops with
    /// `stop`.
    pub fn new(rate: u32, stop: CancellationToken) -> ExcessAllowance {
        if rate == 0 {
            return ExcessAllowance { permits: None };
        }
        let burst = (rate / 10).max(1) as usize;
        let semaphore = Arc::new(tokio::sync::Semaphore::new(burst));
        let refill = Arc::clone(&semaphore);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EXCESS_REFILL_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Whole permits per tick, the remainder carried over (rates below 100/s included).
            let per_tick = f64::from(rate) * EXCESS_REFILL_EVERY.as_secs_f64();
            let mut owed = 0.0_f64;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                owed += per_tick;
                let whole = owed.floor();
                owed -= whole;
                let room = burst.saturating_sub(refill.available_permits());
                refill.add_permits((whole as usize).min(room));
            }
        });
        ExcessAllowance {
            permits: Some(semaphore),
        }
    }

    /// Waits for a permit for one excess frame; at once when the allowance is off.
    pub async fn acquire(&self) {
        let Some(permits) = &self.permits else {
            return;
        };
        if let Ok(permit) = permits.try_acquire() {
            permit.forget();
            return;
        }
        metrics::counter!(m::EXCESS_DEFERRED).increment(1);
        // The semaphore is never closed.
        if let Ok(permit) = permits.acquire().await {
            permit.forget();
        }
    }
}

/// Why a frame is not executed.
#[derive(Debug)]
pub enum Refusal {
    /// Answer with this `error` frame (`rate_limited`); the connection stays open.
    Reply(String),
    /// Close the connection with 1008 `rate limit`: sustained tenfold abuse.
    Close,
}

/// The rate limits of one WebSocket session, kept by its inbound half.
pub struct SessionLimits {
    /// The connection's bucket; `None` when off (rate 0, the server key).
    connection: Option<(TokenBucket, AbuseWatch)>,
    /// The per-user limiter and this session's user; `None` when the user is not limited by
    /// user (server key, development mode, rate 0).
    user: Option<(UserLimiter, String)>,
}

impl SessionLimits {
    /// The limits for `identity` under `config`, the user's through the node's `user_limits`.
    /// (Handed the two it needs rather than the node's state, which holds the limiter: a
    /// module the state is built from does not import the state.)
    pub fn new(config: &Config, user_limits: &UserLimiter, identity: &Identity) -> SessionLimits {
        if identity.is_server() {
            return SessionLimits {
                connection: None,
                user: None,
            };
        }
        let rate = config.send_rate;
        let connection = TokenBucket::new(rate, Instant::now()).map(|b| (b, AbuseWatch::new(rate)));
        let user = (!config.dev_mode() && user_limits.is_on())
            .then(|| (user_limits.clone(), identity.user.clone()));
        SessionLimits { connection, user }
    }

    /// Charges a parsed client frame before it is executed: `join`, `send` and parse failures
    /// cost a token of the connection, a `send` one of the user too. `Err` = do not execute it.
    pub async fn admit(&mut self, parsed: &Result<ClientFrame, FrameError>) -> Result<(), Refusal> {
        let (reply_ref, send) = match parsed {
            Ok(ClientFrame::Send { reply_ref, .. }) => (reply_ref.as_ref(), true),
            // An `auth` costs a signature check (an RSA one is about a join's worth of CPU).
            Ok(ClientFrame::Join { reply_ref, .. } | ClientFrame::Auth { reply_ref, .. }) => {
                (reply_ref.as_ref(), false)
            }
            Err(e) => (e.reply_ref.as_ref(), false),
            Ok(_) => return Ok(()),
        };
        self.charge_connection(reply_ref)?;
        if let (true, Some((limiter, user))) = (send, &self.user) {
            if let Err(wait) = limiter.acquire(user).await {
                return Err(Refusal::Reply(protocol::error_frame(
                    ErrorCode::RateLimited,
                    &user_refusal(wait),
                    reply_ref,
                )));
            }
        }
        Ok(())
    }

    /// Whether the connection is over its rate: the next rate-counted frame would be refused.
    /// Its next frame (of any kind) is then excess and waits for the node's [`ExcessAllowance`].
    pub fn over_rate(&mut self, now: Instant) -> bool {
        self.connection
            .as_mut()
            .is_some_and(|(bucket, _)| !bucket.has_token(now))
    }

    /// Charges a frame that is not a JSON text frame (a binary frame): malformed.
    pub fn admit_malformed(&mut self) -> Result<(), Refusal> {
        self.charge_connection(None)
    }

    fn charge_connection(&mut self, reply_ref: Option<&Ref>) -> Result<(), Refusal> {
        let Some((bucket, abuse)) = &mut self.connection else {
            return Ok(());
        };
        let now = Instant::now();
        if abuse.record(now) {
            metrics::counter!(m::RATE_LIMIT_CLOSED).increment(1);
            tracing::info!("closing a connection that exceeds its rate tenfold");
            return Err(Refusal::Close);
        }
        bucket.try_take(now).map_err(|wait| {
            metrics::counter!(m::RATE_LIMITED, "limit" => "connection").increment(1);
            let message = format!(
                "too many frames on this connection (SEQCAST_SEND_RATE); retry in {} ms",
                wait.as_millis().max(1)
            );
            Refusal::Reply(protocol::error_frame(
                ErrorCode::RateLimited,
                &message,
                reply_ref,
            ))
        })
    }
}

/// Counts a refusal by the per-user rate and says why, the same on the WebSocket and over HTTP.
fn user_refusal(wait: Duration) -> String {
    metrics::counter!(m::RATE_LIMITED, "limit" => "user").increment(1);
    format!(
        "too many messages from this user (SEQCAST_USER_SEND_RATE); retry in {} ms",
        wait.as_millis().max(1)
    )
}

/// The answer to an HTTP request past the user's rate: 429 `rate_limited` with `Retry-After`.
pub fn http_refusal(wait: Duration) -> Response {
    let mut response = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::RateLimited,
        user_refusal(wait),
    )
    .into_response();
    // Whole seconds, rounded up.
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    response
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
/// A Redis call that fails, or takes longer than `SEQCAST_REDIS_TIMEOUT`, turns Redis
/// *unusable*: from then on the node decides alone with a bucket per user of its own (the rate
/// per node) and probes Redis every 500 ms in the background; a probe answered makes it usable
/// again. So a send waits for Redis at most once per outage, and at most the Redis timeout.
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
    /// The limiter of a node: through `redis` when given (the bus's command connection), per
    /// node otherwise. Its Redis probes stop with `stop`.
    pub fn new(config: &Config, redis: Option<Client>, stop: CancellationToken) -> UserLimiter {
        let rate = config.user_send_rate;
        let Some(fresh) = TokenBucket::new(rate, Instant::now()) else {
            return UserLimiter { inner: None };
        };
        let redis = redis.map(|client| {
            let buckets = Arc::new(RedisBuckets {
                client,
                prefix: format!("{}rate:", config.redis_prefix),
                options: Options {
                    timeout: Some(config.redis_timeout),
                    // A connection that is down fails the call at once instead of queueing it.
                    fail_fast: true,
                    ..Options::default()
                },
                timeout: config.redis_timeout,
                health: Mutex::new(Health {
                    usable: false,
                    probing: false,
                }),
                usable: AtomicBool::new(false),
                stop,
            });
            // Unknown until the first probe answers (the connection is made in the background).
            metrics::gauge!(m::RATE_LIMIT_REDIS_UP).set(0.0);
            buckets.failed(None);
            buckets
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
                redis.failed(Some(&error));
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
            if let Err(error) = outcome {
                redis.failed(Some(&error));
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

/// The user buckets in Redis and whether Redis is usable for them.
struct RedisBuckets {
    client: Client,
    /// `{SEQCAST_REDIS_PREFIX}rate:`
    prefix: String,
    options: Options,
    timeout: Duration,
    /// State changes; a std mutex, held for a few instructions, never across an await.
    health: Mutex<Health>,
    /// `health.usable`, for the hot path.
    usable: AtomicBool,
    stop: CancellationToken,
}

struct Health {
    usable: bool,
    /// A probe task is running.
    probing: bool,
}

impl RedisBuckets {
    fn is_usable(&self) -> bool {
        self.usable.load(Ordering::Acquire)
    }

    /// `EVAL TAKE_SCRIPT 1 key rate burst want`, bounded by the Redis timeout.
    async fn take(&self, user: &str, rate: u32, want: u32) -> Result<Grant, String> {
        let eval = CustomCommand::new_static("EVAL", ClusterHash::Offset(2), false);
        let args = vec![
            Value::from(TAKE_SCRIPT),
            Value::from(1_i64),
            Value::from(format!("{}{user}", self.prefix)),
            Value::from(i64::from(rate)),
            Value::from(i64::from(rate) * i64::from(BURST_FACTOR)),
            Value::from(i64::from(want)),
        ];
        let client = self.client.with_options(&self.options);
        let call = client.custom::<(i64, i64), _>(eval, args);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok((granted, wait_ms))) => Ok(Grant {
                granted: u32::try_from(granted).unwrap_or(0),
                wait: Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0).max(1)),
            }),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    /// Redis failed (or its state is unknown, `error` = `None`): decide per node until a probe
    /// answers.
    fn failed(self: &Arc<Self>, error: Option<&str>) {
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        if health.usable {
            health.usable = false;
            self.usable.store(false, Ordering::Release);
            metrics::gauge!(m::RATE_LIMIT_REDIS_UP).set(0.0);
            tracing::warn!(
                error = error.unwrap_or("unknown"),
                "Redis unusable for the user rate limit: limiting per node"
            );
        }
        if !health.probing {
            health.probing = true;
            tokio::spawn(Arc::clone(self).probe());
        }
    }

    /// Pings Redis until it answers (then it is usable again) or the node stops.
    async fn probe(self: Arc<Self>) {
        loop {
            let client = self.client.with_options(&self.options);
            let ping = client.ping::<Value>(None);
            if let Ok(Ok(_)) = tokio::time::timeout(self.timeout, ping).await {
                let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
                health.usable = true;
                health.probing = false;
                self.usable.store(true, Ordering::Release);
                metrics::gauge!(m::RATE_LIMIT_REDIS_UP).set(1.0);
                tracing::info!("Redis usable for the user rate limit: limiting across nodes");
                return;
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(REDIS_RETRY) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn bucket_bursts_then_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0).unwrap();
        for _ in 0..40 {
            assert!(b.try_take(t0).is_ok(), "the burst is 4x the rate");
        }
        let wait = b.try_take(t0).unwrap_err();
        assert!(wait > ms(99) && wait <= ms(100), "{wait:?}");
        assert!(b.try_take(t0 + ms(100)).is_ok(), "one token per 100 ms");
        assert!(b.try_take(t0 + ms(150)).is_err());
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| b.try_take(later).is_ok()).count(), 40);
        assert!(TokenBucket::new(0, t0).is_none(), "rate 0 = off");
    }

    #[test]
    fn abuse_needs_ten_consecutive_tenfold_windows() {
        let rate = 5; // threshold: more than 50 frames per window
        let t0 = Instant::now();
        let mut watch = AbuseWatch::new(rate);
        let mut closed_at = None;
        'seconds: for second in 0..20u64 {
            for i in 0..60u64 {
                if watch.record(t0 + Duration::from_secs(second) + ms(i * 10)) {
                    closed_at = Some((second, i));
                    break 'seconds;
                }
            }
        }
        // The tenth window (second 9) closes on its 51st frame.
        assert_eq!(closed_at, Some((9, 50)));

        // Exactly tenfold (50 per window) is not past the threshold.
        let mut watch = AbuseWatch::new(rate);
        for second in 0..20u64 {
            for i in 0..50u64 {
                assert!(!watch.record(t0 + Duration::from_secs(second) + ms(i * 10)));
            }
        }

        // A quiet window in between ends the streak.
        let mut watch = AbuseWatch::new(rate);
        for second in (0..9u64).chain(10..19) {
            for i in 0..60u64 {
                assert!(
                    !watch.record(t0 + Duration::from_secs(second) + ms(i * 10)),
                    "closed at second {second}"
                );
            }
        }
    }
}
