//! The read half of a session: client frames in, commands and replies out.

use std::future::Future;
use std::pin::Pin;

use axum::extract::ws::{Message, WebSocket};
use futures_util::stream::{FuturesUnordered, SplitStream};
use futures_util::StreamExt;
use tokio::time::Instant;

use super::control::ControlQueue;
use super::{close, ephemeral, Control, JoinRequest, LeaveRequest};
use crate::app::AppState;
use crate::auth::{Identity, RefreshError};
use crate::hub::SessionId;
use crate::ratelimit::{Refusal, SessionLimits};
use crate::store::NewMessage;
use crate::writer::{CommitError, CommitResult};
use seqcast_protocol::{self as protocol, ClientFrame, ErrorCode, Ref};

/// Sends (and `read`s) of one connection awaiting the database. Past this the session stops
/// reading the client's frames until one completes: pipelining is allowed, unbounded buffering
/// is not.
const MAX_SENDS_IN_FLIGHT: usize = 256;

/// Client frames handled in one turn of the session's task before it yields to the others.
///
/// A client that pipelines (or floods) has its next frames already in the read buffer, so its
/// task could otherwise handle hundreds of them per poll while every other task on the worker
/// waits: under a garbage flood, an honest client's message waited one such turn of every
/// flooding session at each hop (inbound, writer, outbound). Short turns keep the wait short;
/// the flooder's total work is the same.
const FRAMES_PER_TURN: u32 = 8;

/// How long a closed connection waits for the client's close reply.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// A frame waiting on the database (a `send`'s commit, a `read`'s cursor): its reply.
type Pending = Pin<Box<dyn Future<Output = String> + Send>>;

/// Not an `async fn`: an async fn moves its arguments into locals, so the future kept both
/// (the identity twice); an `async move` block uses what it captured in place.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice"
)]
pub(super) fn run<'a>(
    mut stream: SplitStream<WebSocket>,
    state: &'a AppState,
    id: SessionId,
    mut identity: Identity,
    control: &'a ControlQueue,
) -> impl Future<Output = ()> + Send + 'a {
    async move {
        let mut in_flight = InFlight::default();
        let mut limits = SessionLimits::new(&state.config, &state.user_limits, &identity);
        // Idle detection: `last_received` moves with every frame (cheap); the timer is re-armed
        // from it only when it fires.
        let idle_timeout = state.config.idle_timeout;
        let mut last_received = Instant::now();
        // Boxed, as the outbound half's timer: inline, its 100-odd bytes would push every
        // connection's task into the next allocator size class (see `FUTURE_BUDGET_BYTES`).
        let mut idle = Box::pin(tokio::time::sleep(idle_timeout));
        let mut turn = 0_u32;
        // A permit of the node's excess allowance is held for the next frame.
        let mut excess_permit = false;
        loop {
            turn += 1;
            if turn == FRAMES_PER_TURN {
                turn = 0;
                tokio::task::yield_now().await;
            }
            let room_to_read = in_flight.len() < MAX_SENDS_IN_FLIGHT;
            // Over its rate, the connection's next frame is excess: it is read only with a permit
            // of the node's allowance (`ratelimit::ExcessAllowance`).
            let wait_for_allowance =
                room_to_read && !excess_permit && limits.over_rate(Instant::now());
            let read = room_to_read && !wait_for_allowance;
            let next = tokio::select! {
                biased;
                () = control.outbound_closed() => return drain_until_closed(&mut stream).await,
                Some(reply) = in_flight.next(), if in_flight.len() > 0 => Control::Reply(reply),
                frame = stream.next(), if read => {
                    excess_permit = false;
                    last_received = Instant::now();
                    match frame {
                        Some(Ok(Message::Text(text))) => {
                            // Boxed: handling a frame takes a few hundred bytes, which inline
                            // would be room in every idle connection's task.
                            match Box::pin(handle_text(text.as_str(), state, id, &mut identity, &mut limits)).await {
                                Handled::Control(c) => c,
                                Handled::Pending(fut) => {
                                    in_flight.push(fut);
                                    continue;
                                }
                                Handled::Done => continue,
                            }
                        }
                        Some(Ok(Message::Binary(_))) => match limits.admit_malformed() {
                            Err(refusal) => refused(refusal),
                            Ok(()) => Control::Reply(protocol::error_frame(
                                ErrorCode::BadRequest,
                                "binary frames are not supported; send JSON text frames",
                                None,
                            )),
                        },
                        // tungstenite answers pings itself.
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(Message::Close(_))) | None => return,
                        Some(Err(e)) => {
                            if let Some(code) = close_code_for(&e) {
                                // The outbound half sends the close frame; stop reading.
                                let _ = control.send(Control::Close(code, "frame too large")).await;
                            } else {
                                tracing::debug!(error = %e, "websocket read failed");
                            }
                            return;
                        }
                    }
                },
                () = state.excess.acquire(), if wait_for_allowance => {
                    excess_permit = true;
                    continue;
                }
                // After the read branch (`biased`): a frame that is already waiting wins over the
                // timer, so time spent not reading (backpressure) never counts as client silence.
                _ = idle.as_mut(), if !idle_timeout.is_zero() => {
                    if !read {
                        last_received = Instant::now();
                    }
                    let deadline = last_received + idle_timeout;
                    if deadline > Instant::now() {
                        idle.as_mut().reset(deadline);
                        continue;
                    }
                    tracing::debug!("closing an idle connection");
                    let _ = control.send(Control::Close(close::GOING_AWAY, "idle timeout")).await;
                    return;
                }
            };
            // Waits while the outbound half is blocked on a client that does not read.
            if control.send(next).await.is_err() {
                return;
            }
        }
    }
}

/// Sends and reads of this connection awaiting the database. The set (two allocations, about
/// 270 bytes) exists only while one is pending: most connections are idle most of the time, and
/// an idle connection should not pay for it (issue 11).
#[derive(Default)]
struct InFlight(Option<FuturesUnordered<Pending>>);

impl InFlight {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, FuturesUnordered::len)
    }

    fn push(&mut self, pending: Pending) {
        self.0
            .get_or_insert_with(FuturesUnordered::new)
            .push(pending);
    }

    /// The next send to complete; `None` at once when none is pending (so guard its use with
    /// [`InFlight::len`]). The set is freed when its last send completes.
    async fn next(&mut self) -> Option<String> {
        let set = self.0.as_mut()?;
        let done = set.next().await;
        if set.is_empty() {
            self.0 = None;
        }
        done
    }
}

enum Handled {
    Control(Control),
    /// Answered once the database has done its part.
    Pending(Pending),
    /// Nothing to answer (a signal that was relayed).
    Done,
}

async fn handle_text(
    text: &str,
    state: &AppState,
    id: SessionId,
    identity: &mut Identity,
    limits: &mut SessionLimits,
) -> Handled {
    let parsed = protocol::parse_client_frame(text, state.config.max_message_bytes);
    // Rate limits (`ratelimit`): a refused frame is answered, not executed.
    if let Err(refusal) = limits.admit(&parsed).await {
        return Handled::Control(refused(refusal));
    }
    let frame = match parsed {
        Ok(frame) => frame,
        Err(e) => {
            return Handled::Control(Control::Reply(protocol::error_frame(
                e.code,
                &e.message,
                e.reply_ref.as_ref(),
            )))
        }
    };
    let forbidden = |room: &str, what: &str, r: Option<&Ref>| {
        Handled::Control(Control::Reply(protocol::error_frame(
            ErrorCode::Forbidden,
            &format!("not allowed to {what} room {room:?}"),
            r,
        )))
    };
    match frame {
        ClientFrame::Join {
            room,
            since,
            presence,
            reply_ref,
        } => {
            if !identity.can_read(&room) {
                return forbidden(&room, "join", reply_ref.as_ref());
            }
            Handled::Control(Control::Join(Box::new(JoinRequest {
                room,
                since,
                presence,
                reply_ref,
            })))
        }
        ClientFrame::Leave { room, reply_ref } => {
            Handled::Control(Control::Leave(Box::new(LeaveRequest { room, reply_ref })))
        }
        ClientFrame::Send {
            room,
            body,
            idem,
            reply_ref,
        } => {
            if !identity.can_send(&room) {
                return forbidden(&room, "send to", reply_ref.as_ref());
            }
            let message = NewMessage {
                sender: identity.user.clone(),
                body,
                idem,
            };
            let outcome = state.writers.submit(&room, message);
            Handled::Pending(Box::pin(async move {
                // A dropped reply means the commit task died: the outcome is unknown to us, and
                // `internal` tells the client to retry with its `idem`.
                let result = outcome.await.unwrap_or(Err(CommitError::Internal));
                ack_or_error(result, reply_ref.as_ref())
            }))
        }
        ClientFrame::Signal {
            room,
            body,
            reply_ref,
        } => {
            if !identity.can_send(&room) {
                return forbidden(&room, "signal in", reply_ref.as_ref());
            }
            let limit = state.config.max_signal_bytes;
            if body.len() > limit {
                return Handled::Control(Control::Reply(protocol::error_frame(
                    ErrorCode::TooLarge,
                    &format!(
                        "signal body is {} bytes; the limit is {limit} (SEQCAST_MAX_SIGNAL_BYTES)",
                        body.len()
                    ),
                    reply_ref.as_ref(),
                )));
            }
            ephemeral::signal(state, id, &identity.user, &room, &body);
            Handled::Done
        }
        ClientFrame::Read {
            room,
            seq,
            reply_ref,
        } => {
            // Read cursors are a user's; the server key (every room, no user) keeps none.
            if identity.is_server() {
                return Handled::Control(Control::Reply(protocol::error_frame(
                    ErrorCode::Forbidden,
                    "the server key has no read cursors; use a user token",
                    reply_ref.as_ref(),
                )));
            }
            if !identity.can_read(&room) {
                return forbidden(&room, "read", reply_ref.as_ref());
            }
            let user = identity.user.clone();
            Handled::Pending(Box::pin(ephemeral::mark_read(
                state.clone(),
                id,
                user,
                room,
                seq,
                reply_ref,
            )))
        }
        ClientFrame::Ping { reply_ref } => {
            Handled::Control(Control::Reply(protocol::pong_frame(reply_ref.as_ref())))
        }
        // A refused token leaves the connection as it was, with its old token in force.
        ClientFrame::Auth { token, reply_ref } => match state.auth.refresh(identity, &token.0) {
            Ok(fresh) => {
                *identity = fresh.clone();
                Handled::Control(Control::Authed(Box::new((fresh, reply_ref))))
            }
            Err(e) => {
                let code = match e {
                    RefreshError::Unauthorized(_) => ErrorCode::Unauthorized,
                    RefreshError::OtherUser => ErrorCode::Forbidden,
                };
                Handled::Control(Control::Reply(protocol::error_frame(
                    code,
                    &e.to_string(),
                    reply_ref.as_ref(),
                )))
            }
        },
    }
}

fn refused(refusal: Refusal) -> Control {
    match refusal {
        Refusal::Reply(frame) => Control::Reply(frame),
        Refusal::Close => Control::Close(close::POLICY, "rate limit"),
    }
}

fn ack_or_error(outcome: CommitResult, r: Option<&Ref>) -> String {
    match outcome {
        Ok(appended) => protocol::ack_frame(&appended.message, r),
        Err(CommitError::Unavailable) => protocol::error_frame(
            ErrorCode::Unavailable,
            &CommitError::Unavailable.to_string(),
            r,
        ),
        Err(CommitError::Internal) => {
            protocol::error_frame(ErrorCode::Internal, "internal error", r)
        }
    }
}

/// The outbound half has closed the connection: read (and ignore) what the client still sends
/// until its close reply, briefly, so the socket is not torn down under unread data (which
/// would reset the connection and could cost the client our close frame).
async fn drain_until_closed(stream: &mut SplitStream<WebSocket>) {
    let drain = async {
        while let Some(Ok(msg)) = stream.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
}

/// Maps read errors that deserve a close code of their own.
fn close_code_for(e: &axum::Error) -> Option<u16> {
    use std::error::Error as _;
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(err) = source {
        if let Some(tungstenite::Error::Capacity(_)) = err.downcast_ref::<tungstenite::Error>() {
            return Some(close::TOO_LARGE);
        }
        source = err.source();
    }
    None
}
