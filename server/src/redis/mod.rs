//! The node's one link to Redis: its clients, its health, and the way scripts run on it.
//!
//! Three parts of a node use Redis: the bus (pub/sub between nodes), the per-user rate limit
//! (token buckets in Redis) and the leader election (a lock). They share one [`RedisLink`], so
//! they share one opinion of whether Redis works, and `/ready` and `seqcast_bus_up` show that
//! opinion:
//!
//! - **Clients.** A command client (PUBLISH, scripts, SET) and a subscriber client (SUBSCRIBE
//!   needs a connection of its own). Both reconnect forever, backing off to 2 s, and every
//!   command has a timeout (`SEQCAST_REDIS_TIMEOUT`).
//! - **Health** ([`LinkState`]). `Connecting` until the first probe's outcome, then `Up` or
//!   `Down`. The probe pings both clients twice per timeout; the link is `Up` only while both
//!   answer in time. A Redis that is down, or up but not answering (paused), is `Down` within
//!   about one timeout. A user whose command fails for want of an answer (not for an error
//!   *reply*: that is Redis working) reports it ([`RedisLink::report_outage`]), which makes the
//!   link `Down` at once; only the probe makes it `Up` again.
//! - **Scripts** ([`Script`]): `EVALSHA`, falling back to `EVAL` when Redis does not know the
//!   script (`NOSCRIPT`, after a restart), so the script text crosses the network once per
//!   Redis process rather than with every call.
//!
//! - **TLS.** A `rediss://` URL connects over TLS (rustls), verifying the server against the
//!   system's roots, or against the CAs of `SEQCAST_REDIS_CA_FILE` (a managed Redis with a
//!   private CA). A server that fails verification is a Redis that does not answer: `Down`.
//!
//! - **Redis Cluster.** A `redis-cluster://host:port?node=host2:port2&...` URL (or
//!   `rediss-cluster://`) connects in fred's clustered mode: each command goes to the shard that
//!   owns its key's slot, and fred follows MOVED/ASK redirections and failovers. The bus then
//!   uses sharded pub/sub (`SPUBLISH`, `SSUBSCRIBE`), so each room's channel lives on one shard
//!   and its messages touch that shard only; the rate-limit and election scripts take one key
//!   each, so they run on a cluster as they are. The probe pings a random shard each time, so a
//!   shard that is down shows as a link that flips down until its replica takes over.
//!
//! A node without Redis (SQLite, or Postgres without `REDIS_URL`) has no link: `/ready` says
//! `"bus_state":"not configured"` and `seqcast_bus_up` is absent (not 0: nothing is down).

mod script;

pub use script::Script;

use std::sync::Arc;
use std::time::Duration;

use fred::clients::{Client, SubscriberClient};
use fred::error::{Error as RedisError, ErrorKind};
use fred::interfaces::ClientLike;
use fred::types::config::{
    Config as FredConfig, Options, ReconnectPolicy, TlsConfig, TlsConnector,
};
use fred::types::Builder;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// fred's internal pub/sub broadcast capacity (its default, 32, drops messages under load).
const BROADCAST_CAPACITY: usize = 8192;

/// What the node knows of Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Started, and the first probe has not decided yet (at most one Redis timeout).
    Connecting,
    /// Both clients answered the last probe in time.
    Up,
    /// A probe or a command went unanswered; the probe has not succeeded since.
    Down,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Up => "up",
            LinkState::Down => "down",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid Redis configuration: {0}")]
pub struct LinkError(String);

/// The node's link to Redis. Cheap to clone.
#[derive(Clone)]
pub struct RedisLink {
    shared: Arc<Shared>,
}

struct Shared {
    prefix: String,
    timeout: Duration,
    /// A Redis Cluster (sharded pub/sub) rather than one server.
    clustered: bool,
    commands: Client,
    subscriber: SubscriberClient,
    /// Per-command options of the users' commands: the timeout, and failing at once while
    /// disconnected rather than queueing for a reconnection.
    options: Options,
    state: watch::Sender<LinkState>,
}

impl RedisLink {
    /// Starts connecting to `url` in the background and probing it, and returns at once: a node
    /// starts, and serves, with Redis down. Probing stops with `stop`.
    pub fn start(
        url: &str,
        prefix: &str,
        timeout: Duration,
        stop: CancellationToken,
    ) -> Result<RedisLink, LinkError> {
        RedisLink::start_with_ca(url, None, prefix, timeout, stop)
    }

    /// [`RedisLink::start`], verifying a `rediss://` server against the CAs in the PEM file
    /// `ca_file` (`SEQCAST_REDIS_CA_FILE`) instead of the system's roots. An unreadable file, or
    /// one with no certificate, is an error now, not a Redis that is down forever.
    pub fn start_with_ca(
        url: &str,
        ca_file: Option<&str>,
        prefix: &str,
        timeout: Duration,
        stop: CancellationToken,
    ) -> Result<RedisLink, LinkError> {
        let mut config = FredConfig::from_url(url).map_err(|e| LinkError(e.to_string()))?;
        let clustered = config.server.is_clustered();
        if let Some(ca_file) = ca_file {
            if config.tls.is_none() {
                return Err(LinkError(format!(
                    "SEQCAST_REDIS_CA_FILE is set but REDIS_URL is not rediss:// ({})",
                    crate::config::redact_url(url)
                )));
            }
            config.tls = Some(tls_trusting(ca_file)?);
        }
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
                // One write attempt: a command is not replayed after a reconnect (it may have
                // run). On a cluster fred counts every write of a command, the one that follows
                // a redirection included; with one attempt the user-rate script failed on every
                // call ("Too many failed write attempts", `redis_cluster` test), so a cluster
                // gets a second.
                conn.max_command_attempts = if clustered { 2 } else { 1 };
            });
        let commands = builder.build().map_err(|e| LinkError(e.to_string()))?;
        let subscriber = builder
            .build_subscriber_client()
            .map_err(|e| LinkError(e.to_string()))?;
        // Connecting counts as not up: the gauge exists from the start on a node with Redis.
        metrics::gauge!(m::BUS_UP).set(0.0);
        let shared = Arc::new(Shared {
            prefix: prefix.to_owned(),
            timeout,
            clustered,
            commands,
            subscriber,
            options: Options {
                timeout: Some(timeout),
                fail_fast: true,
                ..Options::default()
            },
            state: watch::Sender::new(LinkState::Connecting),
        });
        // The connection tasks run until `quit`; their handles are not needed.
        drop(shared.commands.connect());
        drop(shared.subscriber.connect());
        tokio::spawn(Arc::clone(&shared).probe(stop));
        Ok(RedisLink { shared })
    }

    /// `SEQCAST_REDIS_PREFIX`, which every key and channel of the node starts with.
    pub fn prefix(&self) -> &str {
        &self.shared.prefix
    }

    /// Whether `REDIS_URL` names a Redis Cluster (`redis-cluster://`): the bus then uses sharded
    /// pub/sub.
    pub fn is_clustered(&self) -> bool {
        self.shared.clustered
    }

    /// `SEQCAST_REDIS_TIMEOUT`: how long one command may take.
    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// The command client (PUBLISH, scripts, keys).
    pub fn commands(&self) -> &Client {
        &self.shared.commands
    }

    /// The subscriber client (SUBSCRIBE, UNSUBSCRIBE, incoming messages).
    pub fn subscriber(&self) -> &SubscriberClient {
        &self.shared.subscriber
    }

    /// Options for a user's command: bounded by the timeout, failing at once while disconnected.
    pub fn options(&self) -> &Options {
        &self.shared.options
    }

    pub fn state(&self) -> LinkState {
        *self.shared.state.borrow()
    }

    pub fn is_up(&self) -> bool {
        self.state() == LinkState::Up
    }

    /// Follows state changes.
    pub fn watch(&self) -> watch::Receiver<LinkState> {
        self.shared.state.subscribe()
    }

    /// The state once the first probe has decided (`Up` or `Down`); at once after that. Bounded
    /// by about one Redis timeout, since the first probe starts at once and is.
    pub async fn settled(&self) -> LinkState {
        let mut states = self.watch();
        let wait = async {
            let state = states.wait_for(|s| *s != LinkState::Connecting).await;
            state.map(|s| *s).ok()
        };
        let settled = tokio::time::timeout(self.shared.timeout * 2, wait).await;
        // The probe stopped (the node stops) or is late: no answer is as good as down.
        settled.ok().flatten().unwrap_or(LinkState::Down)
    }

    /// A command went unanswered (`error` says how): the link is down until the probe answers
    /// again. Error replies from Redis are not outages and are ignored here.
    /// While the link is still `Connecting` only the probe decides: a command sent before the
    /// connection was made fails at once (commands fail fast) and proves nothing, and calling the
    /// link down then would make the user limit count per node right after start.
    pub fn report_outage(&self, error: &RedisError) {
        if is_outage(error) && self.state() != LinkState::Connecting {
            self.shared.mark(LinkState::Down, &error.to_string());
        }
    }

    /// Awaits one of a user's commands for at most the link's timeout (which the error then
    /// says), reporting an outage to the link when it gets no answer.
    pub async fn bounded<T>(
        &self,
        command: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisError> {
        let timeout = self.timeout();
        let result = match tokio::time::timeout(timeout, command).await {
            Ok(result) => result,
            Err(_) => Err(timed_out(timeout)),
        };
        if let Err(e) = &result {
            self.report_outage(e);
        }
        result
    }

    /// Closes both connections. For the end of a node, after every user is done.
    pub async fn quit(&self) {
        let _ = self.shared.commands.quit().await;
        let _ = self.shared.subscriber.quit().await;
    }
}

/// TLS settings that trust the CAs of the PEM file `ca_file`, and no others.
fn tls_trusting(ca_file: &str) -> Result<TlsConfig, LinkError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let fail = |what: String| LinkError(format!("SEQCAST_REDIS_CA_FILE {ca_file}: {what}"));
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file).map_err(|e| fail(e.to_string()))?;
    for cert in certs {
        let cert = cert.map_err(|e| fail(e.to_string()))?;
        roots.add(cert).map_err(|e| fail(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(fail("no certificate in it".into()));
    }
    // The process's crypto provider, as fred's own default TLS settings use: ring, the only one
    // rustls is built with here (the workspace enables ring for sqlx, fred and this crate).
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(config).into())
}

/// Whether `error` means Redis did not answer (as opposed to answering with an error).
pub fn is_outage(error: &RedisError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::IO
            | ErrorKind::Timeout
            | ErrorKind::Canceled
            | ErrorKind::Routing
            | ErrorKind::Protocol
    )
}

/// The error of a command that got no answer within the link's timeout.
pub(crate) fn timed_out(timeout: Duration) -> RedisError {
    RedisError::new(ErrorKind::Timeout, format!("no answer within {timeout:?}"))
}

impl Shared {
    /// Pings both clients twice per timeout until `stop`; the link is up only while both answer
    /// in time.
    async fn probe(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval((self.timeout / 2).max(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let pings = async {
                let a = self.commands.ping::<fred::types::Value>(None).await;
                let b = self.subscriber.ping::<fred::types::Value>(None).await;
                a.is_ok() && b.is_ok()
            };
            match tokio::time::timeout(self.timeout, pings).await {
                Ok(true) => self.mark(LinkState::Up, "ping answered"),
                Ok(false) => self.mark(LinkState::Down, "ping failed"),
                Err(_) => self.mark(LinkState::Down, "ping timed out"),
            }
        }
    }

    /// Records a state change once (log, gauge, watchers); repeated reports of the same state
    /// are ignored.
    fn mark(&self, state: LinkState, why: &str) {
        let changed = self.state.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
        if !changed {
            return;
        }
        let up = state == LinkState::Up;
        metrics::gauge!(m::BUS_UP).set(if up { 1.0 } else { 0.0 });
        if up {
            tracing::info!("Redis is up: pub/sub fan-out, user rate limit and leader election");
        } else {
            tracing::warn!(
                reason = why,
                "Redis is down: delivering through database polling, limiting users per node"
            );
        }
    }
}
