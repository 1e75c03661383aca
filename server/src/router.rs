//! The node's HTTP surface: every route, the JSON fallbacks for unknown paths and methods, CORS
//! and the tracing layer. `serve` and the tests build it the same way.
//!
//! Two surfaces: the public one ([`router`]) and, with `SEQCAST_ADMIN_LISTEN`, the admin one
//! ([`admin_router`]: `/metrics`, `/live`, `/ready`), which then takes `/metrics` off the public
//! port.
//!
//! Kept apart from [`crate::app`]: the handlers ([`crate::api`], [`crate::ws`], [`crate::ops`])
//! take the state, and the state knows no handler, so no module imports another in a circle.

use std::time::Duration;

use axum::http::{header, HeaderValue, Method, Request};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;
use tower_service::Service;

use crate::admission::Admission;
use crate::app::AppState;
use crate::error::ApiError;
use crate::startup::{Startup, Surface};
use crate::{api, demo, ops, ws};

/// How long a browser may cache a CORS preflight's answer.
const CORS_MAX_AGE: Duration = Duration::from_secs(600);

/// What a node serves on `surface` from the moment it listens: while it starts, `/live`,
/// `/ready` (503 with the reason) and 503 `unavailable` for everything else, WebSocket upgrades
/// included; once [`Startup::serve`] has been handed the full routers, that surface's.
pub fn gated(startup: Startup, surface: Surface) -> Router {
    let starting = Router::new()
        .merge(ops::starting_routes())
        .fallback(|| async { ApiError::unavailable("the node is starting; retry shortly") })
        .with_state(startup.clone());
    Router::new().fallback(move |request: axum::extract::Request| {
        let mut router = startup.router(surface).unwrap_or_else(|| starting.clone());
        async move {
            // A router is always ready: no `poll_ready` needed before `call`.
            match router.call(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
    })
}

/// The public HTTP surface of a node over `state`.
pub fn router(state: AppState) -> Router {
    let mut routes = Router::new()
        .merge(ws::routes())
        .merge(api::routes())
        .merge(ops::health_routes())
        .merge(demo::routes());
    if state.config.admin_listen.is_none() {
        routes = routes.merge(ops::metrics_routes());
    }
    let cors = cors(state.admission.clone());
    finish(routes).layer(cors).layer(trace()).with_state(state)
}

/// The admin surface (`SEQCAST_ADMIN_LISTEN`): metrics and the health endpoints.
pub fn admin_router(state: AppState) -> Router {
    let routes = Router::new()
        .merge(ops::health_routes())
        .merge(ops::metrics_routes());
    finish(routes).layer(trace()).with_state(state)
}

/// The JSON answers to an unknown method or path.
fn finish(routes: Router<AppState>) -> Router<AppState> {
    // After the merges: it applies to the routes added so far.
    routes
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .fallback(|| async { ApiError::not_found() })
}

/// Spans carry the path only: a query string may hold a token.
fn trace() -> TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    impl Fn(&Request<axum::body::Body>) -> tracing::Span + Clone,
> {
    TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
        tracing::debug_span!("http", method = %req.method(), path = %req.uri().path())
    })
}

/// CORS for browser pages on other origins, by the same list as the WebSocket origin check
/// (`SEQCAST_ALLOWED_ORIGINS`; `*` = any, unset = none: only the server's own pages, which need
/// no CORS). Preflights (`OPTIONS`) are answered here, whatever the origin; only an allowed one
/// is echoed in `Access-Control-Allow-Origin`. Tokens travel in `Authorization`, never in
/// cookies: no credentials mode.
fn cors(admission: Admission) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(
            move |origin: &HeaderValue, _request| {
                origin
                    .to_str()
                    .is_ok_and(|origin| admission.allows_cross_origin(origin))
            },
        ))
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .expose_headers([header::RETRY_AFTER])
        .max_age(CORS_MAX_AGE)
}
