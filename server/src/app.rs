//! The node's shared state: what every handler and session is handed. It knows no handler;
//! the routes are in [`crate::router`].

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Admission;
use crate::auth::Authenticator;
use crate::bus::redis::RedisBus;
use crate::bus::Bus;
use crate::config::Config;
use crate::hub::{Hub, SessionId};
use crate::jobs::{self, Jobs};
use crate::presence::{self, Presence};
use crate::ratelimit::{ExcessAllowance, UserLimiter};
use crate::reads::UserReads;
use crate::redis::RedisLink;
use crate::relay::{self, RelayStatus};
use crate::store::Store;
use crate::writer::Writers;

/// A cheap handle on the node's state, cloned into every handler and session.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    pub config: Config,
    pub auth: Authenticator,
    /// Origins, client addresses and connection counts checked at the WebSocket upgrade.
    pub admission: Admission,
    pub store: Arc<dyn Store>,
    pub hub: Hub,
    /// Who is joined where, on this node and (through the roster) on the others.
    pub presence: Presence,
    pub writers: Writers,
    /// The transport to the other nodes, for ephemeral frames (signals, read cursors; committed
    /// messages go through `writers`). `None` on a single node and on a Postgres node without
    /// Redis: those frames then reach this node's sessions only (see `bus`).
    pub bus: Option<Arc<dyn Bus>>,
    /// Every WebSocket session, so a drain can wait for them.
    pub sessions: TaskTracker,
    /// Cancelled when the node starts draining: sessions close with 1012.
    pub shutdown: CancellationToken,
    pub metrics: PrometheusHandle,
    /// The cluster link's state, for `/ready`.
    pub relay: RelayStatus,
    /// Leader election and background jobs.
    pub jobs: Jobs,
    /// The per-user send rate (`SEQCAST_USER_SEND_RATE`), through Redis when there is one.
    pub user_limits: UserLimiter,
    /// The node-wide allowance for frames from over-rate connections
    /// (`SEQCAST_EXCESS_FRAME_RATE`).
    pub excess: ExcessAllowance,
    /// The link to Redis (`None` without `REDIS_URL`, and on a SQLite node): its state is what
    /// `/ready` shows as `bus_state`.
    pub redis: Option<RedisLink>,
    /// Database reads in flight per user (`SEQCAST_USER_READ_CONCURRENCY`).
    pub user_reads: UserReads,
    /// The database check behind `/ready`, shared by its requests.
    pub ready: crate::readiness::ReadyCheck,
    next_session: AtomicU64,
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// Builds the node's state and starts its background tasks (the cluster link), which stop
    /// with `background`.
    ///
    /// A SQLite node is a single node by construction (one file, one process): its hub is the
    /// whole fan-out. A Postgres node is a cluster member: it relays through Redis when
    /// `REDIS_URL` is set and polls the database for other nodes' messages when it is not.
    pub fn start(
        config: Config,
        store: Arc<dyn Store>,
        metrics: PrometheusHandle,
        background: CancellationToken,
    ) -> anyhow::Result<AppState> {
        // First: a malformed origin or proxy range stops the node before anything is spawned.
        let admission = Admission::new(&config)?;
        // Likewise an unreadable or unsupported token key (SEQCAST_JWT_PUBLIC_KEY).
        let auth = Authenticator::from_config(&config)?;
        // Unique per process: a restarted node does not inherit its predecessor's presence.
        let node = format!("{}:{}", config.node_id, uuid::Uuid::new_v4().simple());
        let presence = Presence::new(node, config.presence_max_users, store.roster());
        let (hub, bus, relay, redis) = if store.kind() == "sqlite" {
            if config.redis_url.is_some() {
                tracing::warn!("REDIS_URL ignored: a SQLite node is a single node");
            }
            (Hub::new(), None, RelayStatus::local(), None)
        } else {
            let (changes_tx, changes) = mpsc::unbounded_channel();
            let (holes_tx, holes) = mpsc::unbounded_channel();
            let hub = Hub::clustered(changes_tx, holes_tx);
            let mut redis = None;
            let bus = match &config.redis_url {
                Some(url) => {
                    // One link for the bus, the user limit and the election: one opinion of
                    // whether Redis works.
                    let link = RedisLink::start_with_ca(
                        url.expose(),
                        config.redis_ca_file.as_deref(),
                        &config.redis_prefix,
                        config.redis_timeout,
                        background.clone(),
                    )?;
                    let (bus, events) = RedisBus::start(&link, background.clone());
                    redis = Some(link);
                    Some((Arc::new(bus) as Arc<dyn Bus>, events))
                }
                None => None,
            };
            let publisher = bus.as_ref().map(|(bus, _)| Arc::clone(bus));
            let relay = relay::spawn(
                &config,
                Arc::clone(&store),
                hub.clone(),
                presence.clone(),
                (changes, holes),
                bus,
                background.clone(),
            );
            (hub, publisher, relay, redis)
        };
        presence::spawn(
            presence.clone(),
            bus.clone(),
            config.presence_interval,
            config.presence_ttl,
            background.clone(),
        );
        let user_reads = UserReads::new(config.user_read_concurrency);
        let excess = ExcessAllowance::new(config.excess_frame_rate, background.clone());
        let user_limits = UserLimiter::new(&config, redis.clone());
        let jobs = jobs::spawn(&config, Arc::clone(&store), redis.clone(), background);
        let writers = Writers::new(
            Arc::clone(&store),
            hub.clone(),
            bus.clone(),
            config.commit_concurrency,
        );
        Ok(AppState(Arc::new(Shared {
            config,
            auth,
            admission,
            store,
            hub,
            presence,
            writers,
            bus,
            sessions: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            metrics,
            relay,
            jobs,
            user_limits,
            excess,
            redis,
            user_reads,
            ready: crate::readiness::ReadyCheck::default(),
            next_session: AtomicU64::new(1),
        })))
    }

    pub fn next_session_id(&self) -> SessionId {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}
