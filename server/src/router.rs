//! The node's HTTP surface: every route, the JSON fallbacks for unknown paths and methods, and
//! the tracing layer. `serve` and the tests build it the same way.
//!
//! Kept apart from [`crate::app`]: the handlers ([`crate::api`], [`crate::ws`], [`crate::ops`])
//! take the state, and the state knows no handler, so no module imports another in a circle.

use axum::http::Request;
use axum::Router;
use tower_http::trace::TraceLayer;
use tower_service::Service;

use crate::app::AppState;
use crate::error::ApiError;
use crate::startup::Startup;
use crate::{api, demo, ops, ws};

/// What a node serves from the moment it listens: while it starts, `/live`, `/ready` (503 with
/// the reason) and 503 `unavailable` for everything else, WebSocket upgrades included; once
/// [`Startup::serve`] has been handed the full [`router`], that one.
pub fn gated(startup: Startup) -> Router {
    let starting = Router::new()
        .merge(ops::starting_routes())
        .fallback(|| async { ApiError::unavailable("the node is starting; retry shortly") })
        .with_state(startup.clone());
    Router::new().fallback(move |request: axum::extract::Request| {
        let mut router = startup.router().unwrap_or_else(|| starting.clone());
        async move {
            // A router is always ready: no `poll_ready` needed before `call`.
            match router.call(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
    })
}

/// The whole HTTP surface of a node over `state`.
pub fn router(state: AppState) -> Router {
    // Spans carry the path only: a query string may hold a token.
    let trace = TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
        tracing::debug_span!("http", method = %req.method(), path = %req.uri().path())
    });
    Router::new()
        .merge(ws::routes())
        .merge(api::routes())
        .merge(ops::routes())
        .merge(demo::routes())
        // After the merges: it applies to the routes added so far.
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .fallback(|| async { ApiError::not_found() })
        .layer(trace)
        .with_state(state)
}
