//! One WebSocket connection.
//!
//! A session is two halves driven by one task ([`halves::join`] polls each only when it was woken):
//! - [`inbound`] reads client frames, validates and authorizes them, submits sends to the room
//!   writers and turns their outcomes into `ack`/`error` replies;
//! - [`outbound`] owns the socket's write half and the session's [`cursor::Cursor`] per room. It
//!   handles joins and leaves itself, so that subscribing, reading the head and sending `joined`
//!   happen in order before any `message` frame of that room.
//!
//! The halves talk through a small bounded queue ([`control`]): when the client stops reading,
//! the outbound half blocks on the socket, the queue fills, and the inbound half stops reading the
//! client's frames too, so a client cannot make the server buffer replies without bound. When
//! either half ends, the other is told to end through the queue.
//!
//! Liveness and credentials: the outbound half pings every `SEQCAST_PING_INTERVAL` and closes
//! the connection when its token (plus leeway) expires; the inbound half closes it (1001) when
//! nothing at all arrives for `SEQCAST_IDLE_TIMEOUT`, and checks `auth` frames, whose new
//! identity it uses from then on and hands to the outbound half in order.

mod control;
pub mod cursor;
mod ephemeral;
mod first_auth;
mod halves;
mod inbound;
mod outbound;
mod rooms;

use std::pin::pin;

use axum::extract::ws::WebSocket;
use futures_util::future::Either;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, StreamExt};

use self::control::ControlQueue;
use crate::admission::Permit;
use crate::app::AppState;
use crate::auth::{AuthError, Identity};
use crate::hub::{Mailbox, SessionId};
use crate::listener::WriteProgress;
use crate::metrics as m;
use crate::store::StoreError;
use seqcast_protocol::{self as protocol, ErrorCode, Ref};

/// WebSocket close codes used by seqcast (see the protocol contract).
pub mod close {
    pub const NORMAL: u16 = 1000;
    /// Nothing arrived from the client for `SEQCAST_IDLE_TIMEOUT` (pongs included).
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_LARGE: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const RESTARTING: u16 = 1012;
    pub const OVERLOADED: u16 = 1013;
    pub const SLOW_CONSUMER: u16 = 4008;
}

/// Work for the outbound half, in the order the client asked for it.
///
/// Kept to 32 bytes (the rare, larger requests are boxed): a channel allocates its first block
/// of 32 slots up front, so every idle connection pays 32 x `size_of::<Control>()`.
#[derive(Debug)]
enum Control {
    Join(Box<JoinRequest>),
    Leave(Box<LeaveRequest>),
    /// The client's `auth` frame was accepted: the identity replaces the connection's
    /// credentials (rooms it no longer allows are left, the expiry moves) and `authed` answers.
    Authed(Box<(Identity, Option<Ref>)>),
    /// A ready reply frame (`ack`, `pong`, `error`).
    Reply(String),
    /// Close the connection with this code and reason.
    Close(u16, &'static str),
}

#[derive(Debug)]
struct JoinRequest {
    room: String,
    since: Option<u64>,
    /// `"presence":true`: watch the room's presence.
    presence: bool,
    reply_ref: Option<Ref>,
}

#[derive(Debug)]
struct LeaveRequest {
    room: String,
    reply_ref: Option<Ref>,
}

const _: () = assert!(std::mem::size_of::<Control>() <= 32);

/// Most bytes a session's future may take (as measured at the upgrade, with the task tracker's
/// wrapper, and reported as `seqcast_session_future_bytes`; 1,856 bytes with Rust 1.95). Every
/// open connection holds one for its whole life in a task of its own (see `ws`), and the task is
/// most of what an idle connection costs: tokio lays it out as the future plus 104 bytes
/// (header, scheduler handle, task id, trailer), rounded up to 128, so up to 1,944 bytes of
/// future fit in a 2,048-byte task, the allocator's size class below 2,560. One byte more costs
/// every connection 512. The `session_limits` test fails past it.
pub const FUTURE_BUDGET_BYTES: usize = 1_944;

/// How an upgraded connection authenticates.
#[derive(Debug)]
pub enum Start {
    /// At the upgrade (a token in the query or header, the server key, or development mode): its
    /// outcome. A failure is reported in-band (an `error` frame, then close 1008), since browsers
    /// cannot read the status of a refused upgrade.
    Upgraded(Result<Identity, AuthError>),
    /// No token came with the upgrade on a node that requires one: the first frame must be `auth`
    /// ([`first_auth`]).
    FirstFrame,
}

/// Serves an upgraded connection until it ends. `permit` is the connection's admission, held
/// until then (and, for [`Start::FirstFrame`], counted for its user once known). `progress`
/// tells when the connection's socket last accepted bytes (the write timeout counts from there).
///
/// Not an `async fn`, and no future here captures another by value: an async body keeps room
/// for its arguments, and for a captured future next to the copy it awaits, for its whole life,
/// and this future lives as long as the connection (the socket alone is 368 bytes, the inbound
/// half's future about 800 bytes; see the memory figures in docs/benchmarks.md).
pub fn run(
    socket: WebSocket,
    state: AppState,
    start: Start,
    permit: Permit,
    progress: WriteProgress,
) -> impl std::future::Future<Output = ()> + Send {
    match start {
        Start::Upgraded(Ok(identity)) => {
            let (sink, stream) = socket.split();
            // Boxed: an async fn keeps its arguments for its whole life, next to the halves they
            // are moved into; this way it keeps a pointer, and the box is freed at once.
            Either::Left(Either::Left(
                serve(Box::new(Parts {
                    sink,
                    stream,
                    state,
                    identity,
                    progress,
                }))
                // Held until the session ends.
                .map(move |()| drop(permit)),
            ))
        }
        Start::Upgraded(Err(e)) => Either::Left(Either::Right(refuse(socket, e))),
        Start::FirstFrame => Either::Right(serve_after_auth(Box::new((
            socket, state, permit, progress,
        )))),
    }
}

/// [`Start::FirstFrame`]: authenticates the first frame, then serves like any session. The
/// session it serves is boxed, so that the (rare) wait for the `auth` frame does not make every
/// connection's future larger.
async fn serve_after_auth(parts: Box<(WebSocket, AppState, Permit, WriteProgress)>) {
    let (mut socket, state, mut permit, progress) = unbox(parts);
    match first_auth::authenticate(&mut socket, &state, &mut permit).await {
        Ok(Some(identity)) => {
            let (sink, stream) = socket.split();
            Box::pin(serve(Box::new(Parts {
                sink,
                stream,
                state,
                identity,
                progress,
            })))
            .await;
        }
        Ok(None) => {}
        Err(failure) => failure.send(&mut socket).await,
    }
    drop(permit);
}

/// What a session starts from (see [`run`]).
struct Parts {
    sink: SplitSink<WebSocket, axum::extract::ws::Message>,
    stream: SplitStream<WebSocket>,
    state: AppState,
    identity: Identity,
    progress: WriteProgress,
}

async fn serve(parts: Box<Parts>) {
    let Parts {
        sink,
        stream,
        state,
        identity,
        progress,
    } = unbox(parts);
    metrics::gauge!(m::CONNECTIONS_OPEN).increment(1.0);
    let id = state.next_session_id();
    let (identity, exp, reader) = opened(id, identity);
    let control = ControlQueue::default();
    let mailbox = Mailbox::new(state.config.outbound_queue);

    // The inbound half owns the identity: an `auth` frame replaces it there, and the outbound
    // half hears of the change in order through the control queue.
    // Combinators, not async blocks (which would keep what they move into a half next to the
    // half), pinned where they are made, not moved into `join` (see there).
    let inbound =
        pin!(inbound::run(stream, &state, id, identity, &control).map(|()| control.inbound_gone()));
    let outbound = pin!(
        outbound::Outbound::new(&state, id, exp, reader, sink, progress, mailbox)
            .run(&control)
            .map(|()| control.outbound_gone())
    );
    halves::join(inbound, outbound).await;
    metrics::gauge!(m::CONNECTIONS_OPEN).decrement(1.0);
    tracing::debug!(session = id, "session closed");
}

/// What the outbound half needs of the identity (its expiry, and the user whose read slots its
/// reads take: a refresh cannot change the user, so that is fixed for the session), with the
/// identity handed back for the inbound half.
///
/// A function rather than lines in `serve`: a local that `serve` borrows keeps its room in the
/// session's future after it is moved out (88 bytes for the identity), one that is only moved
/// does not.
fn opened(id: SessionId, identity: Identity) -> (Identity, Option<u64>, Option<String>) {
    tracing::debug!(session = id, user = %identity.user, "session open");
    let reader = (!identity.is_server()).then(|| identity.user.clone());
    let exp = identity.exp;
    (identity, exp, reader)
}

/// Moves a value out of its box and frees the box at once (moving out of `*b` in place would
/// free it only where `b` goes out of scope: at the end of the session).
#[allow(
    clippy::boxed_local,
    reason = "taking the box is the point: it is freed here"
)]
fn unbox<T>(b: Box<T>) -> T {
    *b
}

async fn refuse(mut socket: WebSocket, e: AuthError) {
    first_auth::Failure::refused(&e).send(&mut socket).await;
}

/// The reply to a frame whose database operation failed.
pub(super) fn store_error_frame(e: &StoreError, r: Option<&Ref>) -> String {
    match e {
        StoreError::Unavailable(_) => protocol::error_frame(
            ErrorCode::Unavailable,
            "the database is unavailable; retry",
            r,
        ),
        _ => {
            tracing::error!(error = %e, "store error");
            protocol::error_frame(ErrorCode::Internal, "internal error", r)
        }
    }
}
