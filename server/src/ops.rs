//! Operational endpoints: liveness, readiness and metrics; and while the node starts, liveness
//! and a readiness that says why it is not serving yet.
//!
//! `/live` and `/ready` are always on the public port (load balancers probe them there);
//! `/metrics` is there too unless `SEQCAST_ADMIN_LISTEN` gives it a listener of its own
//! ([`crate::router`]).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::app::AppState;
use crate::readiness::DbCheck;
use crate::startup::Startup;

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
