//! Node configuration: environment variables (names fixed by the protocol contract), each
//! mirrored by a command-line flag that overrides it.
//!
//! Every setting has a documented default (see `docs/configuration.md`); [`Config::default`] is the
//! zero-config single node: embedded SQLite, development mode, loopback only, and the one source
//! of the defaults that `--help` and `seqcast config` show.
//!
//! - [`settings`]: every setting by name, its help line, its value as text; unknown `SEQCAST_*`
//!   names and the nearest known one.
//! - [`cli`]: the settings as `clap` flags (`--drain-delay 2s` for `SEQCAST_DRAIN_DELAY`).
//! - [`secret`]: the redacting types the secrets are held in.

pub mod cli;
pub mod secret;
pub mod settings;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};

pub use secret::{redact_url, Secret, SecretUrl};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The node's settings. `Debug` is derived: the secrets are held in [`Secret`] and [`SecretUrl`],
/// which print redacted.
#[derive(Debug, Clone)]
pub struct Config {
    /// `SEQCAST_LISTEN`, default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// `SEQCAST_ADMIN_LISTEN`, default unset: a second listener for `/metrics`, `/live` and
    /// `/ready` (then `/metrics` leaves the public port, which keeps `/live` and `/ready`).
    pub admin_listen: Option<SocketAddr>,
    /// `DATABASE_URL`, default `sqlite://seqcast.db`.
    pub database_url: SecretUrl,
    /// `REDIS_URL`, default unset: cross-node fan-out, the user rate limit, leader election.
    pub redis_url: Option<SecretUrl>,
    /// `SEQCAST_JWT_SECRET`; unset = development mode (anonymous clients, loopback only).
    pub jwt_secret: Option<Secret>,
    /// `SEQCAST_API_KEY`: the server key for HTTP publishing and reading in any room.
    pub api_key: Option<Secret>,
    /// `SEQCAST_NODE_ID`, default the host name.
    pub node_id: String,
    /// `SEQCAST_MAX_MESSAGE_BYTES`: largest serialized `body`, default 65536.
    pub max_message_bytes: usize,
    /// `SEQCAST_MAX_SIGNAL_BYTES`: largest serialized `signal` body, default 4096. Signals are
    /// relayed to every joined session on every node and never stored: small by design.
    pub max_signal_bytes: usize,
    /// `SEQCAST_WRITE_TIMEOUT`: close a connection (4008) that accepts no bytes this long.
    pub write_timeout: Duration,
    /// `SEQCAST_SHUTDOWN_TIMEOUT`: how long a SIGTERM drain may take before the process exits.
    pub shutdown_timeout: Duration,
    /// `SEQCAST_DRAIN_DELAY`: on SIGTERM, how long sessions are still served after `/ready`
    /// turns 503, so that a load balancer polling it takes the node out before its clients are
    /// told to reconnect (skipped when no session is open).
    pub drain_delay: Duration,
    /// `SEQCAST_DRAIN_SPREAD`: the window after the delay over which sessions are closed
    /// (1012), evenly, so that their clients reconnect to the other nodes a few at a time.
    pub drain_spread: Duration,
    /// `SEQCAST_OUTBOUND_QUEUE`: live frames buffered per session before it falls back to reading
    /// the database (a session is a cursor: nothing is lost past it, memory stays bounded).
    pub outbound_queue: usize,
    /// Commits in flight on this node at most, over all rooms (`SEQCAST_COMMIT_CONCURRENCY`).
    pub commit_concurrency: usize,
    /// `SEQCAST_LOG_FORMAT`: `text` (default) or `json`.
    pub log_format: LogFormat,
    /// `SEQCAST_REDIS_PREFIX`: prefix of every Redis key and channel, so several clusters can
    /// share one Redis.
    pub redis_prefix: String,
    /// `SEQCAST_DB_TIMEOUT`: a Postgres operation (waiting for a connection included) not done
    /// within this fails as `unavailable`; the database also cancels statements, lock waits and
    /// idle open transactions after it. Default 4 s.
    pub db_timeout: Duration,
    /// `SEQCAST_REDIS_TIMEOUT`: a Redis command unanswered this long marks Redis down (a paused
    /// Redis accepts connections but never answers).
    pub redis_timeout: Duration,
    /// `SEQCAST_POLL_INTERVAL`: how often the heads of local rooms are read from the database
    /// when Redis is absent or down; bounds cross-node delivery delay in that mode.
    pub poll_interval: Duration,
    /// `SEQCAST_PRESENCE_INTERVAL`: how often the node writes its presence changes, reports
    /// them and tells watchers (one `presence` frame per room per interval at most). Default
    /// 100 ms.
    pub presence_interval: Duration,
    /// `SEQCAST_PRESENCE_TTL`: a node's presence counts this long after its last heartbeat
    /// (heartbeats every third of it): a killed node's users leave within about 4/3 of it.
    /// Default 10 s.
    pub presence_ttl: Duration,
    /// `SEQCAST_PRESENCE_MAX_USERS`: a room with more present users is counted, not listed.
    /// Default 1000.
    pub presence_max_users: usize,
    /// `SEQCAST_HEAD_CHECK_INTERVAL`: the same check while Redis is up, to find a lost last
    /// message (pub/sub is at-most-once and no later message reveals that gap).
    pub head_check_interval: Duration,
    /// `SEQCAST_DB_POOL_SIZE`: Postgres connections per node at most (at least 1); not used
    /// with SQLite, whose connections are fixed (one writer, four readers).
    pub db_pool_size: u32,
    /// `SEQCAST_MIGRATE`: whether the node applies pending migrations when it starts (default
    /// true). With false it waits, not ready, until the schema is current (applied by
    /// `seqcast migrate`, e.g. from a Kubernetes Job).
    pub migrate: bool,
    /// `SEQCAST_REDIS_CA_FILE`: a PEM bundle of the CAs a `rediss://` Redis is verified against,
    /// instead of the system's roots (a managed Redis with a private CA).
    pub redis_ca_file: Option<String>,
    /// `SEQCAST_LEADER_TTL`: lifetime of the leader lock in Redis.
    pub leader_ttl: Duration,
    /// `SEQCAST_RETENTION`: delete messages older than this; unset keeps them forever.
    pub retention: Option<Duration>,
    /// `SEQCAST_JOB_INTERVAL`: how often the leader runs the background jobs (retention).
    pub job_interval: Duration,

    // --- Hardening (docs/security.md). For every limit, 0 turns it off. ---
    /// `SEQCAST_JWT_PUBLIC_KEY`: path of a PEM public key (RSA: RS256, EC P-256: ES256) that
    /// tokens may be signed with, besides (or instead of) the HS256 secret.
    pub jwt_public_key: Option<String>,
    /// `SEQCAST_JWT_AUDIENCE`: when set, tokens must carry this `aud`.
    pub jwt_audience: Option<String>,
    /// `SEQCAST_JWT_ISSUER`: when set, tokens must carry this `iss`.
    pub jwt_issuer: Option<String>,
    /// `SEQCAST_JWT_LEEWAY`: clock skew tolerated on `exp` and `nbf`, default 30 s.
    pub jwt_leeway: Duration,
    /// `SEQCAST_ALLOWED_ORIGINS`: browser origins allowed to open a WebSocket besides the
    /// server's own (`*` = any). Requests without `Origin` (native clients) are always allowed.
    pub allowed_origins: Vec<String>,
    /// `SEQCAST_MAX_FRAME_BYTES`: largest WebSocket frame/message; default 2 x the body limit.
    pub max_frame_bytes: usize,
    /// `SEQCAST_MAX_ROOMS_PER_CONNECTION`, default 200.
    pub max_rooms_per_connection: usize,
    /// `SEQCAST_MAX_CONNECTIONS` per node, default 200000.
    pub max_connections: usize,
    /// `SEQCAST_MAX_CONNECTIONS_PER_USER` per node, default 50.
    pub max_connections_per_user: usize,
    /// `SEQCAST_MAX_CONNECTIONS_PER_IP` per node, default 0 (off).
    pub max_connections_per_ip: usize,
    /// `SEQCAST_TRUSTED_PROXIES`: comma-separated CIDRs whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
    /// `SEQCAST_HANDSHAKE_TIMEOUT`: an HTTP connection that has not completed a request in this
    /// time (idle keep-alive connections included) is closed. Default 10 s; 0 = off.
    pub handshake_timeout: Duration,
    /// `SEQCAST_PING_INTERVAL`: how often the server pings a WebSocket client, default 25 s.
    pub ping_interval: Duration,
    /// `SEQCAST_IDLE_TIMEOUT`: a connection from which nothing (pongs included) arrives this long
    /// is closed, default 60 s.
    pub idle_timeout: Duration,
    /// `SEQCAST_SEND_RATE`: sends, joins and malformed frames per second per connection (token
    /// bucket, burst 4x), default 50.
    pub send_rate: u32,
    /// `SEQCAST_USER_SEND_RATE`: sends per second per user across the cluster (through Redis;
    /// per node without it), WebSocket and HTTP together, default 100.
    pub user_send_rate: u32,
    /// `SEQCAST_EXCESS_FRAME_RATE`: frames per second the whole node reads from connections that
    /// are over their own `SEQCAST_SEND_RATE` (token bucket, burst a tenth of a second); past
    /// it those connections are not read until it refills. Default 10000.
    pub excess_frame_rate: u32,
    /// `SEQCAST_USER_READ_CONCURRENCY`: database reads one user may have in flight on a node
    /// (HTTP history and room reads refused with 429 past it, WebSocket joins and catch-ups
    /// wait), default [`crate::reads::DEFAULT_USER_READ_CONCURRENCY`]; 0 = no limit.
    pub user_read_concurrency: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: None,
            database_url: SecretUrl::new("sqlite://seqcast.db"),
            redis_url: None,
            jwt_secret: None,
            api_key: None,
            node_id: host_name(),
            max_message_bytes: crate::store::DEFAULT_MAX_MESSAGE_BYTES,
            max_signal_bytes: 4096,
            write_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(10),
            drain_delay: Duration::from_secs(2),
            drain_spread: Duration::from_secs(2),
            outbound_queue: 1024,
            commit_concurrency: 2,
            log_format: LogFormat::Text,
            redis_prefix: "seqcast:".into(),
            db_timeout: crate::store::DEFAULT_DB_TIMEOUT,
            db_pool_size: crate::store::DEFAULT_DB_POOL_SIZE,
            migrate: true,
            redis_ca_file: None,
            redis_timeout: Duration::from_secs(1),
            poll_interval: Duration::from_millis(100),
            presence_interval: Duration::from_millis(100),
            presence_ttl: Duration::from_secs(10),
            presence_max_users: 1000,
            head_check_interval: Duration::from_secs(1),
            leader_ttl: Duration::from_secs(10),
            retention: None,
            job_interval: Duration::from_secs(60),
            jwt_public_key: None,
            jwt_audience: None,
            jwt_issuer: None,
            jwt_leeway: Duration::from_secs(30),
            allowed_origins: Vec::new(),
            max_frame_bytes: 2 * 65536,
            max_rooms_per_connection: 200,
            max_connections: 200_000,
            max_connections_per_user: 50,
            max_connections_per_ip: 0,
            trusted_proxies: Vec::new(),
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            send_rate: 50,
            user_send_rate: 100,
            excess_frame_rate: 10_000,
            user_read_concurrency: crate::reads::DEFAULT_USER_READ_CONCURRENCY,
        }
    }
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> anyhow::Result<Config> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `get`, so tests need not touch the process environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
        let mut c = Config::default();
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        if let Some(v) = get("SEQCAST_LISTEN") {
            c.listen = v
                .parse()
                .with_context(|| format!("SEQCAST_LISTEN: bad address {v:?}"))?;
        }
        if let Some(v) = get("SEQCAST_ADMIN_LISTEN") {
            c.admin_listen = Some(
                v.parse()
                    .with_context(|| format!("SEQCAST_ADMIN_LISTEN: bad address {v:?}"))?,
            );
        }
        if let Some(v) = get("DATABASE_URL") {
            c.database_url = SecretUrl::new(v);
        }
        c.redis_url = get("REDIS_URL").map(SecretUrl::new);
        c.jwt_secret = get("SEQCAST_JWT_SECRET").map(Secret::new);
        c.api_key = get("SEQCAST_API_KEY").map(Secret::new);
        if let Some(v) = get("SEQCAST_NODE_ID") {
            c.node_id = v;
        }
        if let Some(v) = get("SEQCAST_MAX_MESSAGE_BYTES") {
            c.max_message_bytes = parse_count("SEQCAST_MAX_MESSAGE_BYTES", &v)?;
        }
        if let Some(v) = get("SEQCAST_PRESENCE_MAX_USERS") {
            c.presence_max_users = parse_count("SEQCAST_PRESENCE_MAX_USERS", &v)?.max(1);
        }
        if let Some(v) = get("SEQCAST_MAX_SIGNAL_BYTES") {
            c.max_signal_bytes = parse_count("SEQCAST_MAX_SIGNAL_BYTES", &v)?;
        }
        if let Some(v) = get("SEQCAST_OUTBOUND_QUEUE") {
            c.outbound_queue = parse_count("SEQCAST_OUTBOUND_QUEUE", &v)?;
        }
        if let Some(v) = get("SEQCAST_COMMIT_CONCURRENCY") {
            c.commit_concurrency = parse_count("SEQCAST_COMMIT_CONCURRENCY", &v)?;
            if c.commit_concurrency == 0 {
                anyhow::bail!("SEQCAST_COMMIT_CONCURRENCY: must be at least 1");
            }
        }
        if let Some(v) = get("SEQCAST_DB_POOL_SIZE") {
            c.db_pool_size = u32::try_from(parse_count("SEQCAST_DB_POOL_SIZE", &v)?)
                .context("SEQCAST_DB_POOL_SIZE: too large")?;
        }
        if let Some(v) = get("SEQCAST_MIGRATE") {
            c.migrate = parse_bool("SEQCAST_MIGRATE", &v)?;
        }
        c.redis_ca_file = get("SEQCAST_REDIS_CA_FILE");
        if let Some(v) = get("SEQCAST_REDIS_PREFIX") {
            c.redis_prefix = v;
        }
        for (name, field) in [
            ("SEQCAST_WRITE_TIMEOUT", &mut c.write_timeout),
            ("SEQCAST_SHUTDOWN_TIMEOUT", &mut c.shutdown_timeout),
            ("SEQCAST_REDIS_TIMEOUT", &mut c.redis_timeout),
            ("SEQCAST_DB_TIMEOUT", &mut c.db_timeout),
            ("SEQCAST_POLL_INTERVAL", &mut c.poll_interval),
            ("SEQCAST_PRESENCE_INTERVAL", &mut c.presence_interval),
            ("SEQCAST_PRESENCE_TTL", &mut c.presence_ttl),
            ("SEQCAST_HEAD_CHECK_INTERVAL", &mut c.head_check_interval),
            ("SEQCAST_LEADER_TTL", &mut c.leader_ttl),
            ("SEQCAST_JOB_INTERVAL", &mut c.job_interval),
        ] {
            if let Some(v) = get(name) {
                *field = parse_positive_duration(name, &v)?;
            }
        }
        c.jwt_public_key = get("SEQCAST_JWT_PUBLIC_KEY");
        c.jwt_audience = get("SEQCAST_JWT_AUDIENCE");
        c.jwt_issuer = get("SEQCAST_JWT_ISSUER");
        if let Some(v) = get("SEQCAST_JWT_LEEWAY") {
            c.jwt_leeway = parse_duration(&v).context("SEQCAST_JWT_LEEWAY")?;
        }
        c.allowed_origins = get("SEQCAST_ALLOWED_ORIGINS")
            .map(|v| list(&v))
            .unwrap_or_default();
        c.trusted_proxies = get("SEQCAST_TRUSTED_PROXIES")
            .map(|v| list(&v))
            .unwrap_or_default();
        // The frame limit follows the body limit unless set on its own.
        c.max_frame_bytes = c.max_message_bytes.saturating_mul(2);
        for (name, field) in [
            ("SEQCAST_MAX_FRAME_BYTES", &mut c.max_frame_bytes),
            (
                "SEQCAST_MAX_ROOMS_PER_CONNECTION",
                &mut c.max_rooms_per_connection,
            ),
            ("SEQCAST_MAX_CONNECTIONS", &mut c.max_connections),
            (
                "SEQCAST_MAX_CONNECTIONS_PER_USER",
                &mut c.max_connections_per_user,
            ),
            (
                "SEQCAST_MAX_CONNECTIONS_PER_IP",
                &mut c.max_connections_per_ip,
            ),
            (
                "SEQCAST_USER_READ_CONCURRENCY",
                &mut c.user_read_concurrency,
            ),
        ] {
            if let Some(v) = get(name) {
                *field = v
                    .trim()
                    .parse()
                    .with_context(|| format!("{name}: bad number {v:?}"))?;
            }
        }
        for (name, field) in [
            ("SEQCAST_HANDSHAKE_TIMEOUT", &mut c.handshake_timeout),
            ("SEQCAST_PING_INTERVAL", &mut c.ping_interval),
            ("SEQCAST_IDLE_TIMEOUT", &mut c.idle_timeout),
            ("SEQCAST_DRAIN_DELAY", &mut c.drain_delay),
            ("SEQCAST_DRAIN_SPREAD", &mut c.drain_spread),
        ] {
            if let Some(v) = get(name) {
                *field = parse_duration(&v).with_context(|| name.to_string())?;
            }
        }
        for (name, field) in [
            ("SEQCAST_SEND_RATE", &mut c.send_rate),
            ("SEQCAST_USER_SEND_RATE", &mut c.user_send_rate),
            ("SEQCAST_EXCESS_FRAME_RATE", &mut c.excess_frame_rate),
        ] {
            if let Some(v) = get(name) {
                *field = v
                    .trim()
                    .parse()
                    .with_context(|| format!("{name}: bad number {v:?}"))?;
            }
        }
        if let Some(v) = get("SEQCAST_RETENTION") {
            c.retention = Some(parse_positive_duration("SEQCAST_RETENTION", &v)?);
        }
        if let Some(v) = get("SEQCAST_LOG_FORMAT") {
            c.log_format = match v.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => bail!("SEQCAST_LOG_FORMAT: expected `text` or `json`, got {v:?}"),
            };
        }
        Ok(c)
    }

    /// Development mode: no token verification, anonymous clients, loopback only. Either token
    /// key (secret or public key) turns it off.
    pub fn dev_mode(&self) -> bool {
        self.jwt_secret.is_none() && self.jwt_public_key.is_none()
    }

    /// Largest WebSocket frame accepted (`None` = no limit of seqcast's own). By default a `send`
    /// frame may carry the body plus its envelope (room, idem, ref) and JSON escaping: twice
    /// the body limit leaves room for both.
    pub fn frame_limit(&self) -> Option<usize> {
        (self.max_frame_bytes > 0).then_some(self.max_frame_bytes)
    }

    /// The drain's delay and spread as they are applied: shortened in proportion when together
    /// they would take more than half of `SEQCAST_SHUTDOWN_TIMEOUT`, so that the sessions closed
    /// last still have the other half to take their close frame before the process exits.
    pub fn drain_plan(&self) -> (Duration, Duration) {
        let budget = self.shutdown_timeout / 2;
        let total = self.drain_delay.saturating_add(self.drain_spread);
        if total <= budget {
            return (self.drain_delay, self.drain_spread);
        }
        let scale = |d: Duration| {
            let nanos = d.as_nanos().saturating_mul(budget.as_nanos()) / total.as_nanos();
            Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
        };
        (scale(self.drain_delay), scale(self.drain_spread))
    }

    /// Refuses configurations that are unsafe to serve with.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.dev_mode() && !self.listen.ip().is_loopback() {
            bail!(
                "refusing to listen on {} in development mode: set SEQCAST_JWT_SECRET to serve \
                 beyond loopback, or listen on 127.0.0.1",
                self.listen
            );
        }
        // The same rule for the admin listener: a development node is reachable from this
        // machine only, its metrics included.
        if let Some(admin) = self.admin_listen.filter(|a| !a.ip().is_loopback()) {
            if self.dev_mode() {
                bail!(
                    "refusing to listen on {admin} (SEQCAST_ADMIN_LISTEN) in development mode: \
                     set SEQCAST_JWT_SECRET to serve beyond loopback, or listen on 127.0.0.1"
                );
            }
        }
        Ok(())
    }
}

/// Parses `500ms`, `10s`, `5m`, `2h`, `30d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("bad duration {text:?}"))?;
    let ms = match unit {
        "ms" => n,
        "" | "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        _ => bail!("bad duration {text:?}: units are ms, s, m, h, d"),
    };
    Ok(Duration::from_millis(ms))
}

fn parse_positive_duration(name: &str, v: &str) -> anyhow::Result<Duration> {
    let d = parse_duration(v).with_context(|| name.to_string())?;
    if d.is_zero() {
        bail!("{name}: must be greater than zero");
    }
    Ok(d)
}

fn parse_count(name: &str, v: &str) -> anyhow::Result<usize> {
    let n: usize = v
        .trim()
        .parse()
        .with_context(|| format!("{name}: bad number {v:?}"))?;
    if n == 0 {
        bail!("{name}: must be greater than zero");
    }
    Ok(n)
}

fn parse_bool(name: &str, v: &str) -> anyhow::Result<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => bail!("{name}: expected `true` or `false`, got {v:?}"),
    }
}

/// Splits a comma-separated list, dropping blanks.
fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "seqcast".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_fits_half_the_shutdown_timeout() {
        let mut c = Config::default();
        // The defaults: 2 s + 2 s within a 10 s timeout, so every 1012 is sent within 4 s.
        assert_eq!(
            c.drain_plan(),
            (Duration::from_secs(2), Duration::from_secs(2))
        );
        c.shutdown_timeout = Duration::from_secs(2);
        assert_eq!(
            c.drain_plan(),
            (Duration::from_millis(500), Duration::from_millis(500))
        );
        c.drain_delay = Duration::ZERO;
        c.drain_spread = Duration::from_secs(30);
        assert_eq!(c.drain_plan(), (Duration::ZERO, Duration::from_secs(1)));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86400)
        );
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn defaults_and_overrides() {
        let c = Config::from_lookup(|_| None).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.database_url.expose(), "sqlite://seqcast.db");
        assert_eq!(c.max_message_bytes, 65536);
        assert_eq!(c.write_timeout, Duration::from_secs(10));
        assert!(c.dev_mode());
        c.validate().unwrap();

        let c = Config::from_lookup(|k| match k {
            "SEQCAST_LISTEN" => Some("0.0.0.0:9000".into()),
            "SEQCAST_WRITE_TIMEOUT" => Some("1500ms".into()),
            _ => None,
        })
        .unwrap();
        assert!(
            c.validate().is_err(),
            "dev mode must refuse a non-loopback address"
        );
        assert_eq!(c.write_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn start_up_settings() {
        let c = Config::from_lookup(|_| None).unwrap();
        assert_eq!(c.db_pool_size, 16);
        assert!(c.migrate);
        assert_eq!(c.redis_ca_file, None);
        let c = Config::from_lookup(|k| match k {
            "SEQCAST_DB_POOL_SIZE" => Some("3".into()),
            "SEQCAST_MIGRATE" => Some("false".into()),
            "SEQCAST_REDIS_CA_FILE" => Some("/etc/ca.pem".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.db_pool_size, 3);
        assert!(!c.migrate);
        assert_eq!(c.redis_ca_file.as_deref(), Some("/etc/ca.pem"));
        for (name, bad) in [
            ("SEQCAST_DB_POOL_SIZE", "0"),
            ("SEQCAST_DB_POOL_SIZE", "many"),
            ("SEQCAST_MIGRATE", "maybe"),
        ] {
            let lookup = |k: &str| (k == name).then(|| bad.to_owned());
            assert!(Config::from_lookup(lookup).is_err(), "{name}={bad}");
        }
    }

    #[test]
    fn secrets_are_not_debug_printed() {
        let c = Config::from_lookup(|k| match k {
            "SEQCAST_JWT_SECRET" => Some("jwt-hunter2".into()),
            "SEQCAST_API_KEY" => Some("key-swordfish".into()),
            "DATABASE_URL" => Some("postgres://app:db-opensesame@db:5432/chat".into()),
            "REDIS_URL" => Some("rediss://default:redis-letmein@cache:6380".into()),
            _ => None,
        })
        .unwrap();
        let shown = format!("{c:?} {c:#?}");
        for secret in [
            "jwt-hunter2",
            "key-swordfish",
            "db-opensesame",
            "redis-letmein",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        // What is not secret is still there to debug with.
        assert!(
            shown.contains("postgres://app:[redacted]@db:5432/chat"),
            "{shown}"
        );
        assert!(shown.contains("cache:6380"), "{shown}");
    }

    #[test]
    fn the_admin_listener_follows_the_loopback_rule() {
        let lookup = |admin: &'static str, secret: Option<&'static str>| {
            move |k: &str| match k {
                "SEQCAST_ADMIN_LISTEN" => Some(admin.to_owned()),
                "SEQCAST_JWT_SECRET" => secret.map(str::to_owned),
                _ => None,
            }
        };
        let c = Config::from_lookup(lookup("127.0.0.1:9090", None)).unwrap();
        assert_eq!(
            c.admin_listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 9090)))
        );
        c.validate().unwrap();
        let c = Config::from_lookup(lookup("0.0.0.0:9090", None)).unwrap();
        let error = c.validate().unwrap_err().to_string();
        assert!(error.contains("SEQCAST_ADMIN_LISTEN"), "{error}");
        let c = Config::from_lookup(lookup("0.0.0.0:9090", Some("s"))).unwrap();
        c.validate().unwrap();
        assert!(Config::from_lookup(lookup("nine", None)).is_err());
    }
}
