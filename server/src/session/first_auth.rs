//! First-frame authentication (contract v1.1): a WebSocket opened without a token, on a node that
//! requires tokens, must send `{"type":"auth","token":...}` as its first frame. Browsers cannot set
//! headers on a WebSocket, and a token in the URL ends up in every proxy's access log; this keeps
//! it in the (encrypted) stream instead.
//!
//! Until that frame arrives the connection is nobody: nothing but the `auth` frame is read (a
//! WebSocket ping is answered by the socket itself), nothing is subscribed, and the connection
//! counts against its node and address only (the upgrade's admission). The frame must arrive
//! within `SEQCAST_HANDSHAKE_TIMEOUT` (10 s; when that is off, [`FALLBACK_TIMEOUT`]). Its token is
//! checked as at the upgrade; then the per-user connection limit applies, `authed` answers, and
//! the session is served as if the token had come with the upgrade. Any failure is an `error`
//! frame (`unauthorized`, or `limit_exceeded` for the user limit) and a close: 1008, or 1013 for
//! the limit (try later), as the contract asks.

use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use seqcast_protocol::{self as protocol, ClientFrame, ErrorCode, Ref};

use super::close;
use crate::admission::Permit;
use crate::app::AppState;
use crate::auth::{AuthError, Identity};

/// The wait for the `auth` frame when `SEQCAST_HANDSHAKE_TIMEOUT` is 0 (off): a connection that
/// never authenticates must not be held forever.
pub const FALLBACK_TIMEOUT: Duration = Duration::from_secs(10);

/// How a connection failed to authenticate: the `error` frame's code and text, the `ref` it
/// answers, and the close code.
pub(super) struct Failure {
    code: ErrorCode,
    message: String,
    reply_ref: Option<Ref>,
    close: u16,
    /// The close frame's reason.
    reason: String,
}

impl Failure {
    fn unauthorized(message: impl Into<String>, reply_ref: Option<Ref>) -> Failure {
        Failure {
            code: ErrorCode::Unauthorized,
            message: message.into(),
            reply_ref,
            close: close::POLICY,
            reason: "unauthorized".into(),
        }
    }

    /// A token refused at the upgrade: `unauthorized` with the reason, which the close repeats.
    pub(super) fn refused(e: &AuthError) -> Failure {
        Failure {
            reason: e.to_string(),
            ..Failure::unauthorized(e.to_string(), None)
        }
    }

    /// Sends the `error` frame and the close (at most 5 s: the client may not be reading). Also
    /// how a connection whose token was refused at the upgrade is answered ([`super::run`]).
    pub(super) async fn send(self, socket: &mut WebSocket) {
        use axum::extract::ws::CloseFrame;
        let frame = protocol::error_frame(self.code, &self.message, self.reply_ref.as_ref());
        let close = CloseFrame {
            code: self.close,
            reason: self.reason.into(),
        };
        let send = async {
            socket.send(Message::Text(frame.into())).await?;
            socket.send(Message::Close(Some(close))).await
        };
        if tokio::time::timeout(Duration::from_secs(5), send)
            .await
            .is_err()
        {
            tracing::debug!("refused connection did not take its close frame");
        }
    }
}

/// Reads the connection's first frame and authenticates it. `Ok(None)`: the client went away
/// first (nothing to answer). On success `authed` has been sent and `permit` counts the user.
pub(super) async fn authenticate(
    socket: &mut WebSocket,
    state: &AppState,
    permit: &mut Permit,
) -> Result<Option<Identity>, Failure> {
    let wait = match state.config.handshake_timeout {
        Duration::ZERO => FALLBACK_TIMEOUT,
        configured => configured,
    };
    let deadline = tokio::time::Instant::now() + wait;
    let (token, reply_ref) = loop {
        let message = match tokio::time::timeout_at(deadline, socket.recv()).await {
            Err(_) => {
                return Err(Failure::unauthorized(
                    format!(
                        "missing token: send an auth frame first (within {} ms)",
                        wait.as_millis()
                    ),
                    None,
                ))
            }
            Ok(None | Some(Err(_))) => return Ok(None),
            Ok(Some(Ok(message))) => message,
        };
        match message {
            Message::Text(text) => {
                match protocol::parse_client_frame(&text, state.config.max_message_bytes) {
                    Ok(ClientFrame::Auth { token, reply_ref }) => break (token, reply_ref),
                    Ok(other) => {
                        return Err(Failure::unauthorized(
                            "missing token: the first frame must be auth",
                            frame_ref(other),
                        ))
                    }
                    Err(e) => {
                        return Err(Failure::unauthorized(
                            format!(
                                "missing token: the first frame must be auth ({})",
                                e.message
                            ),
                            e.reply_ref,
                        ))
                    }
                }
            }
            Message::Binary(_) => {
                return Err(Failure::unauthorized(
                    "missing token: the first frame must be auth",
                    None,
                ))
            }
            Message::Close(_) => return Ok(None),
            // Answered by the socket itself; not a frame of the protocol.
            Message::Ping(_) | Message::Pong(_) => continue,
        }
    };
    let identity = state
        .auth
        .websocket(Some(&token.0))
        .map_err(|e| Failure::unauthorized(e.to_string(), reply_ref.clone()))?;
    // The server key is a trusted backend, not a person: it is counted per node only.
    if !identity.is_server() && permit.admit_user(&identity.user).is_err() {
        tracing::debug!(user = %identity.user, "WebSocket connection refused at its auth frame");
        return Err(Failure {
            code: ErrorCode::LimitExceeded,
            message: "too many connections for this user; try again later".into(),
            reply_ref,
            close: close::OVERLOADED,
            reason: "too many connections".into(),
        });
    }
    let authed = protocol::authed_frame(identity.exp, reply_ref.as_ref());
    if socket.send(Message::Text(authed.into())).await.is_err() {
        return Ok(None);
    }
    Ok(Some(identity))
}

/// The `ref` of a frame that came where `auth` should have, so its error answers it.
fn frame_ref(frame: ClientFrame) -> Option<Ref> {
    match frame {
        ClientFrame::Join { reply_ref, .. }
        | ClientFrame::Leave { reply_ref, .. }
        | ClientFrame::Send { reply_ref, .. }
        | ClientFrame::Ping { reply_ref }
        | ClientFrame::Auth { reply_ref, .. }
        | ClientFrame::Signal { reply_ref, .. }
        | ClientFrame::Read { reply_ref, .. } => reply_ref,
    }
}
