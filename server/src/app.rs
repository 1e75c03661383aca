//! The node's shared state and its HTTP router.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::http::Request;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::trace::TraceLayer;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::error::ApiError;
use crate::hub::{Hub, SessionId};
use crate::store::Store;
use crate::writer::Writers;
use crate::{api, ops, ws};

/// A cheap handle on the node's state, cloned into every handler and session.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    pub config: Config,
    pub auth: Authenticator,
    pub store: Arc<dyn Store>,
    pub hub: Hub,
    pub writers: Writers,
    /// Every WebSocket session, so a drain can wait for them.
    pub sessions: TaskTracker,
    /// Cancelled when the node starts draining: sessions close with 1012.
    pub shutdown: CancellationToken,
    pub metrics: PrometheusHandle,
    next_session: AtomicU64,
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub fn new(config: Config, store: Arc<dyn Store>, metrics: PrometheusHandle) -> AppState {
        let hub = Hub::new();
        let writers = Writers::new(Arc::clone(&store), hub.clone());
        let auth = Authenticator::new(config.jwt_secret.as_deref(), config.api_key.as_deref());
        AppState(Arc::new(Shared {
            config,
            auth,
            store,
            hub,
            writers,
            sessions: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            metrics,
            next_session: AtomicU64::new(1),
        }))
    }

    pub fn next_session_id(&self) -> SessionId {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}

/// The whole HTTP surface of a node; `serve` and tests use the same router.
pub fn router(state: AppState) -> Router {
    // Spans carry the path only: a query string may hold a token.
    let trace = TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
        tracing::debug_span!("http", method = %req.method(), path = %req.uri().path())
    });
    Router::new()
        .merge(ws::routes())
        .merge(api::routes())
        .merge(ops::routes())
        .fallback(|| async { ApiError::not_found() })
        .layer(trace)
        .with_state(state)
}
