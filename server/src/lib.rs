//! seqcast: a WebSocket chat and broadcast server with durable, gap-free per-room sequences.
//!
//! One path for a message, visible in the module layout:
//!
//! ```text
//!  ws.rs ──► session::inbound ──► writer (group commit) ──► store (commit = durability point)
//!  (upgrade)  (parse, authorize)        │
//!                                       ├──► bus (Redis pub/sub) ──► other nodes' relay ──┐
//!                                       └──► hub (local fan-out, one serialized frame) ◄──┘
//!                                              └──► session::outbound (cursor per room) ──► socket
//! ```
//!
//! Ephemeral frames take a shorter path, without the writer, the store's log or seq checks:
//! `signal` (session::ephemeral) ──► hub (the room's other sessions) + bus (the room's channel),
//! and a `read` cursor, once raised in the store, ──► hub (the user's other connections) + bus
//! (the user's channel). At most once; see [`bus`].
//!
//! - [`config`]: the settings (environment variables and the flags that mirror them), their
//!   defaults and checks, the redacting types secrets are held in.
//! - [`auth`]: tokens, the server key, room patterns.
//! - `seqcast_protocol` (the `protocol/` crate, so that fuzzing builds it alone): client frame
//!   parsing and server frame writing; imported by name, not re-exported.
//! - [`store`]: the `Store` trait with Postgres and SQLite backends.
//! - [`writer`]: per-room commit queues, committed together across rooms (node-wide group
//!   commit); the only way a message is committed.
//! - [`hub`]: which local sessions are in which room (and which connections are whose, for read
//!   cursors); non-blocking fan-out into each session's mailbox.
//! - [`redis`]: the node's one link to Redis (its clients, one health state with its probe, Lua
//!   scripts), shared by the bus, the per-user rate limit and the leader election.
//! - [`bus`]: the `Bus` trait with Redis and in-process transports between nodes, for committed
//!   messages and for ephemeral frames (signals, read cursors).
//! - [`relay`]: bus subscriptions, messages from other nodes, and head checks against the
//!   database that find what the bus lost (or, without Redis, carry everything); on Postgres,
//!   the `LISTEN` connection that hears of messages an application committed with the SQL
//!   function `seqcast_publish` (`relay/listen.rs`, migration 0003).
//! - [`presence`]: who is joined where: this node's share counted at every join and leave, the
//!   other nodes' read from a roster table in Postgres (heartbeats, so a dead node's users
//!   leave), changes reported on the bus (or NOTIFY) and told to watching sessions in batches.
//! - [`jobs`]: leader election through the Redis link and the background jobs (retention,
//!   partition maintenance on Postgres).
//! - [`session`]: one connection; its outbound half keeps a cursor per room and reads the
//!   database whenever it is behind the live stream (join with `since`, gaps, slow clients);
//!   `session::ephemeral` relays signals and read-cursor moves.
//! - [`api`], [`ws`], [`ops`]: the HTTP handlers; [`demo`]: the demo page at `/` (static files
//!   and the JavaScript client, embedded); [`router`] puts them together under one router;
//!   [`app`] is the state they are all handed (it knows no handler).
//! - [`listener`]: the HTTP server loop (request deadlines, peer addresses, graceful stop).
//! - [`admission`]: who may connect: origins, client addresses, connection limits.
//! - [`ratelimit`]: send rates per connection and per user (token buckets, Redis leases), one
//!   file per mechanism.
//! - [`reads`]: database reads in flight per user (HTTP history, joins, catch-ups).
//! - [`readiness`]: the database check behind `/ready`, one at a time and reused for a second.
//! - [`metrics`]: Prometheus names and exporter.
//! - [`startup`]: a node before it serves: listening, not ready, retrying the database.
//!
//! [`serve`] runs a node on a listener until a shutdown future resolves, then drains.

pub mod admission;
pub mod api;
pub mod app;
pub mod auth;
pub mod bus;
pub mod config;
pub mod demo;
pub mod error;
pub mod hub;
pub mod jobs;
pub mod listener;
pub mod metrics;
pub mod ops;
pub mod presence;
pub mod ratelimit;
pub mod readiness;
pub mod reads;
pub mod redis;
pub mod relay;
pub mod router;
pub mod session;
pub mod startup;
pub mod store;
pub mod writer;
pub mod ws;

use std::future::Future;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use app::AppState;
use startup::{Startup, Surface};

/// How long a stopping node waits for its background jobs (and the leader lock's release).
const JOBS_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
pub use config::Config;

/// Serves a node on `listener` until `shutdown` resolves, then drains: `/ready` turns 503, new
/// WebSocket upgrades are refused, sessions are served for `SEQCAST_DRAIN_DELAY` more and then
/// closed with 1012 over `SEQCAST_DRAIN_SPREAD` (see [`Config::drain_plan`]), and the call returns
/// once they are gone or `config.shutdown_timeout` has passed.
///
/// It listens from the start: until the database is open (and its schema current), `/live` is
/// 200, `/ready` 503 with the reason and everything else 503, while [`startup::open_store`]
/// retries (see [`startup`]).
///
/// `admin` is the listener of `SEQCAST_ADMIN_LISTEN`, if any ([`router::admin_router`]); it
/// stops with the public one.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let handle = metrics::install();
    let upkeep = tokio::spawn(metrics::upkeep(handle.clone()));
    let _stop_upkeep = AbortOnDrop(upkeep.abort_handle());
    let drain_timeout = config.shutdown_timeout;
    let startup = Startup::new(&config.node_id);
    let http_stop = CancellationToken::new();
    let request_timeout = (!config.handshake_timeout.is_zero()).then_some(config.handshake_timeout);
    let write_timeout = (!config.write_timeout.is_zero()).then_some(config.write_timeout);
    let mut server_task = tokio::spawn(listener::serve(
        listener,
        router::gated(startup.clone(), Surface::Public),
        request_timeout,
        write_timeout,
        http_stop.clone(),
    ));
    // Behind the public server's task: it ends when that one does (same `http_stop`), and a
    // stopping node waits for it the same way.
    let admin_task = admin.map(|admin| {
        tokio::spawn(listener::serve(
            admin,
            router::gated(startup.clone(), Surface::Admin),
            request_timeout,
            write_timeout,
            http_stop.clone(),
        ))
    });
    let _stop_admin = admin_task
        .as_ref()
        .map(|task| AbortOnDrop(task.abort_handle()));
    let mut shutdown = std::pin::pin!(shutdown);

    let store = tokio::select! {
        store = startup::open_store(&config, &startup) => store?,
        _ = &mut shutdown => {
            tracing::info!(reason = %startup.reason(), "stopped before serving");
            http_stop.cancel();
            return match tokio::time::timeout(drain_timeout, server_task).await {
                Ok(result) => result.context("http server task"),
                Err(_) => Ok(()),
            };
        }
        result = &mut server_task => {
            result.context("http server task")?;
            anyhow::bail!("the HTTP server stopped on its own");
        }
    };
    tracing::info!(store = store.kind(), node = %config.node_id, "database ready");
    // Background tasks (cluster link, jobs) outlive the drain: commits still in flight during
    // it must reach the other nodes.
    let background = CancellationToken::new();
    let _stop_background = background.clone().drop_guard();
    let state = AppState::start(config, store, handle, background.clone())?;
    startup.serve(
        router::router(state.clone()),
        router::admin_router(state.clone()),
    );

    tokio::select! {
        _ = &mut shutdown => {}
        result = &mut server_task => {
            result.context("http server task")?;
            anyhow::bail!("the HTTP server stopped on its own");
        }
    }

    let deadline = tokio::time::Instant::now() + drain_timeout;
    let open = state.hub.session_count();
    let (delay, spread) = state.config.drain_plan();
    tracing::info!(sessions = open, timeout = ?drain_timeout, ?delay, ?spread, "draining");
    // `/ready` turns 503 and upgrades are refused; sessions are still served for the delay, so a
    // load balancer polling `/ready` stops sending clients here before these are told to leave,
    // then they are closed (1012) spread over the window: their reconnects reach the other
    // nodes (each a `since` read from the database) a few at a time, not as one storm.
    state.shutdown.cancel();
    ::metrics::gauge!(crate::metrics::DRAINING).set(1.0);
    if open > 0 {
        tokio::time::sleep(delay).await;
    }
    state.hub.close_sessions(spread).await;
    state.sessions.close();
    if tokio::time::timeout_at(deadline, state.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = state.sessions.len(),
            "drain timeout: sessions still open"
        );
    }
    http_stop.cancel();
    match tokio::time::timeout_at(deadline, server_task).await {
        Ok(result) => result.context("http server task")?,
        Err(_) => tracing::warn!("drain timeout: HTTP connections still open"),
    }
    if let Some(task) = admin_task {
        match tokio::time::timeout_at(deadline, task).await {
            Ok(result) => result.context("admin http server task")?,
            Err(_) => tracing::warn!("drain timeout: admin HTTP connections still open"),
        }
    }
    // Release the leader lock (if held) so another node takes over at once, not after its TTL.
    background.cancel();
    if tokio::time::timeout(JOBS_STOP_TIMEOUT, state.jobs.stopped())
        .await
        .is_err()
    {
        tracing::warn!("background jobs did not stop in time");
    }
    // Last, once the election has released its lock through it.
    if let Some(link) = &state.redis {
        let _ = tokio::time::timeout(JOBS_STOP_TIMEOUT, link.quit()).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Aborts a task when dropped, on every way out of [`serve`].
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
