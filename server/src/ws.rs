//! `GET /v1/ws`: authenticates, applies frame limits and hands the socket to a session.

use axum::extract::{Query, State, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use crate::api::bearer_token;
use crate::app::AppState;
use crate::error::ApiError;
use crate::session;

/// Initial read buffer per connection.
const READ_BUFFER_BYTES: usize = 8 * 1024;

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
    Query(params): Query<WsParams>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if state.is_draining() {
        return ApiError::unavailable("the node is shutting down; connect to another")
            .into_response();
    }
    let token = bearer_token(&headers).or(params.token.as_deref());
    let identity = state.auth.websocket(token);
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
        // tungstenite zero-fills its read buffer to full capacity on first read; the 128 KiB
        // default would cost every idle connection 128 KiB of RSS. Larger frames still grow it.
        .read_buffer_size(READ_BUFFER_BYTES)
        .on_upgrade(move |socket| sessions.track_future(session::run(socket, state, identity)))
}
