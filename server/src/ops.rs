//! Operational endpoints: liveness, readiness and metrics; and while the node starts, liveness
//! and a readiness that says why it is not serving yet.
//!
//! `/live` and `/ready` are always on the public port (load balancers probe them there);
//! `/metrics` is there too unless `SEQCAST_ADMIN_LISTEN` gives it a listener of its own
//! ([`crate::router`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use serde_json::json;
use tokio::time::Instant;

use crate::app::AppState;
use crate::startup::Startup;
use crate::store::Store;

/// How long `/ready` waits for the database before calling it unreachable.
const READY_DB_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one database check answers `/ready`. `/ready` is on the public port and needs no
/// credentials, so without this every request took a pooled database connection: a client
/// flooding it could take the connections commits need.
pub const READY_DB_FRESH: Duration = Duration::from_secs(1);

/// What a database check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DbCheck {
    Ok,
    Failed,
    TimedOut,
}

impl DbCheck {
    fn as_str(self) -> &'static str {
        match self {
            DbCheck::Ok => "ok",
            DbCheck::Failed => "failed",
            DbCheck::TimedOut => "timeout",
        }
    }
}

/// The database check behind `/ready`: at most one in flight (concurrent requests wait for the
/// same one), and its outcome reused for [`READY_DB_FRESH`]. So a node pings its database at
/// most about once a second for readiness, however often it is asked.
#[derive(Default)]
pub struct ReadyCheck(Mutex<ReadySlot>);

#[derive(Default)]
struct ReadySlot {
    last: Option<(Instant, DbCheck)>,
    running: Option<Shared<BoxFuture<'static, DbCheck>>>,
}

impl ReadyCheck {
    async fn check(&self, store: &Arc<dyn Store>) -> DbCheck {
        let running = {
            let mut slot = self.slot();
            if let Some((at, outcome)) = slot.last {
                if at.elapsed() < READY_DB_FRESH {
                    return outcome;
                }
            }
            // Polled by whichever of its waiters is still there; a check whose waiters all
            // went away is resumed by the next request.
            slot.running
                .get_or_insert_with(|| ping(Arc::clone(store)).boxed().shared())
                .clone()
        };
        let outcome = running.await;
        let mut slot = self.slot();
        if slot.running.is_some() {
            // The first waiter back records it; the others find it recorded.
            slot.running = None;
            slot.last = Some((Instant::now(), outcome));
        }
        outcome
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, ReadySlot> {
        // Held to look and to swap, never across an `.await`.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn ping(store: Arc<dyn Store>) -> DbCheck {
    let outcome = match tokio::time::timeout(READY_DB_TIMEOUT, store.ping()).await {
        Ok(Ok(())) => DbCheck::Ok,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: database check failed");
            DbCheck::Failed
        }
        Err(_) => DbCheck::TimedOut,
    };
    metrics::counter!(crate::metrics::READY_DB_CHECKS, "outcome" => outcome.as_str()).increment(1);
    outcome
}

/// `/live` and `/ready`.
pub fn health_routes() -> Router<AppState> {
    Router::new()
        .route("/live", get(live))
        .route("/ready", get(ready))
}

/// `/metrics`.
pub fn metrics_routes() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

/// The routes of a node that is starting ([`crate::startup`]).
pub fn starting_routes() -> Router<Startup> {
    Router::new()
        .route("/live", get(live))
        .route("/ready", get(starting))
}

async fn starting(State(startup): State<Startup>) -> Response {
    let body = json!({
        "status": "starting",
        "reason": startup.reason(),
        "node": startup.node_id(),
    });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "live" }))
}

async fn ready(State(state): State<AppState>) -> Response {
    let node = &state.config.node_id;
    let store = state.store.kind();
    if state.is_draining() {
        let body = json!({ "status": "draining", "reason": "the node is shutting down", "node": node, "store": store });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    match state.ready.check(&state.store).await {
        DbCheck::Ok => {
            let body = json!({
                "status": "ready",
                "node": node,
                "store": store,
                "draining": false,
                "bus": state.relay.kind(),
                // The Redis link's state, the one the bus, the user limit and the election go by.
                "bus_state": state.redis.as_ref().map_or("not configured", |link| link.state().as_str()),
                "leader": state.jobs.is_leader(),
                "rooms": state.hub.room_count(),
            });
            (StatusCode::OK, Json(body)).into_response()
        }
        DbCheck::Failed => {
            let body = json!({ "status": "unavailable", "reason": "database unreachable", "node": node, "store": store });
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
        DbCheck::TimedOut => {
            let body = json!({ "status": "unavailable", "reason": "database did not answer in time", "node": node, "store": store });
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
