//! The node's HTTP surface: every route, the JSON fallbacks for unknown paths and methods, and
//! the tracing layer. `serve` and the tests build it the same way.
//!
//! Kept apart from [`crate::app`]: the handlers ([`crate::api`], [`crate::ws`], [`crate::ops`])
//! take the state, and the state knows no handler, so no module imports another in a circle.

use axum::http::Request;
use axum::Router;
use tower_http::trace::TraceLayer;

use crate::app::AppState;
use crate::error::ApiError;
use crate::{api, ops, ws};

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
        // After the merges: it applies to the routes added so far.
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .fallback(|| async { ApiError::not_found() })
        .layer(trace)
        .with_state(state)
}
