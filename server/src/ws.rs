//! `GET /v1/ws`: admits, authenticates, applies frame limits and hands the socket to a session.
//!
//! Admission ([`crate::admission`]) runs before the upgrade: a foreign browser origin gets 403,
//! a full node 503, a user or address at its connection limit 429 (`limit_exceeded`). The
//! connection's [`Permit`](crate::admission::Permit) then lives as long as its session.

use std::net::SocketAddr;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, Query, State, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use axum::Router;
use serde::Deserialize;

use crate::api::bearer_token;
use crate::app::AppState;
use crate::auth::AuthError;
use crate::error::ApiError;
use crate::listener::WriteProgress;
use crate::session;

/// tungstenite's read buffer per connection, and the most one of its reads takes in. Small,
/// because every idle connection holds it; the socket reads below it are
/// [`READ_CHUNK_BYTES`](crate::listener::READ_CHUNK_BYTES) at a time into a chunk that exists only
/// while it holds unread bytes, so each of these reads is a copy, not a system call. A larger
/// frame grows the buffer to its size (a cost only clients sending large messages pay).
const READ_BUFFER_BYTES: usize = 128;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/ws", get(upgrade))
}

#[derive(Deserialize)]
struct WsParams {
    /// For browsers, which cannot set headers on a WebSocket request.
    token: Option<String>,
}

async fn upgrade(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    params: Result<Query<WsParams>, QueryRejection>,
    headers: HeaderMap,
    progress: Option<Extension<WriteProgress>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // Not a WebSocket handshake: the JSON error every HTTP error is, with axum's status.
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            return ApiError::rejected(rejection.status(), rejection.body_text()).into_response()
        }
    };
    // Always there behind the listener; a router served otherwise (tests) has no progress.
    let progress = progress.map(|Extension(p)| p).unwrap_or_default();
    if state.is_draining() {
        return ApiError::unavailable("the node is shutting down; connect to another")
            .into_response();
    }
    if let Err(e) = state.admission.check_origin(&headers) {
        return e.into_response();
    }
    // axum's own rejection would be logged with its text; this one says nothing of the query,
    // which may hold a token.
    let Ok(Query(params)) = params else {
        return ApiError::bad_request("malformed query string").into_response();
    };
    let ip = state.admission.client_ip(peer, &headers);
    let mut permit = match state.admission.admit(ip) {
        Ok(permit) => permit,
        Err(refusal) => {
            tracing::debug!(%ip, ?refusal, "WebSocket connection refused");
            return ApiError::from(refusal).into_response();
        }
    };
    let token = bearer_token(&headers).or(params.token.as_deref());
    // No token where one is required: it may come in the first frame (`session::first_auth`).
    let start = match state.auth.websocket(token) {
        Err(AuthError::Missing) if token.is_none() => session::Start::FirstFrame,
        identity => session::Start::Upgraded(identity),
    };
    if let session::Start::Upgraded(Ok(identity)) = &start {
        // The server key is a trusted backend, not a person: it is counted per node only.
        let admitted = match identity.is_server() {
            true => Ok(()),
            false => permit.admit_user(&identity.user),
        };
        if let Err(refusal) = admitted {
            tracing::debug!(%ip, user = %identity.user, ?refusal, "WebSocket connection refused");
            return ApiError::from(refusal).into_response();
        }
    }
    // tungstenite's own defaults (16 MiB frames, 64 MiB messages) stand when the limit is off.
    let limit = state.config.frame_limit();
    // axum runs the upgraded connection in a task of its own that its graceful shutdown does
    // not wait for, so sessions are tracked here to be drained on SIGTERM.
    let sessions = state.sessions.clone();
    let ws = match limit {
        Some(limit) => ws.max_message_size(limit).max_frame_size(limit),
        None => ws,
    };
    ws
        // tungstenite zero-fills its read buffer to full capacity on first read and keeps it;
        // the 128 KiB default would cost every idle connection 128 KiB of RSS.
        .read_buffer_size(READ_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            // A combinator, not an async block: a block would keep room for the socket and the
            // session future next to the session future it awaits (see `session::run`).
            // The permit is held until the session ends; dropped unused if the upgrade fails.
            let session =
                sessions.track_future(session::run(socket, state, start, permit, progress));
            report_session_bytes(std::mem::size_of_val(&session));
            // A task of its own, and axum's upgrade task ends here: awaited there, the session
            // would share its task with axum's upgrade state (about 270 bytes, kept for the
            // connection's life), which took every connection's task into the next allocator
            // size class (see `session::FUTURE_BUDGET_BYTES`).
            tokio::spawn(session);
            std::future::ready(())
        })
}

/// Publishes the size of a session's future once: every open connection holds one for its whole
/// life, so it is most of what an idle connection costs, and the `session_limits` test
/// `an_idle_session_future_stays_within_its_budget` holds it to [`session::FUTURE_BUDGET_BYTES`].
fn report_session_bytes(bytes: usize) {
    static REPORTED: std::sync::Once = std::sync::Once::new();
    REPORTED.call_once(|| {
        metrics::gauge!(crate::metrics::SESSION_FUTURE_BYTES).set(bytes as f64);
    });
}
