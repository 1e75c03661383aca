//! The rate limits of one WebSocket session: its connection's bucket and abuse watch, and its
//! user's limit.

use tokio::time::Instant;

use super::user::user_refusal;
use super::{AbuseWatch, TokenBucket, UserLimiter};
use crate::auth::Identity;
use crate::config::Config;
use crate::metrics as m;
use seqcast_protocol::{self as protocol, ClientFrame, ErrorCode, FrameError, Ref};

/// Why a frame is not executed.
#[derive(Debug)]
pub enum Refusal {
    /// Answer with this `error` frame (`rate_limited`); the connection stays open.
    Reply(String),
    /// Close the connection with 1008 `rate limit`: sustained tenfold abuse.
    Close,
}

/// The rate limits of one WebSocket session, kept by its inbound half.
pub struct SessionLimits {
    /// The connection's bucket; `None` when off (rate 0, the server key).
    connection: Option<(TokenBucket, AbuseWatch)>,
    /// The per-user limiter and this session's user; `None` when the user is not limited by
    /// user (server key, development mode, rate 0).
    user: Option<(UserLimiter, String)>,
}

impl SessionLimits {
    /// The limits for `identity` under `config`, the user's through the node's `user_limits`.
    /// (Handed the two it needs rather than the node's state, which holds the limiter: a
    /// module the state is built from does not import the state.)
    pub fn new(config: &Config, user_limits: &UserLimiter, identity: &Identity) -> SessionLimits {
        if identity.is_server() {
            return SessionLimits {
                connection: None,
                user: None,
            };
        }
        let rate = config.send_rate;
        let connection = TokenBucket::new(rate, Instant::now()).map(|b| (b, AbuseWatch::new(rate)));
        let user = (!config.dev_mode() && user_limits.is_on())
            .then(|| (user_limits.clone(), identity.user.clone()));
        SessionLimits { connection, user }
    }

    /// Charges a parsed client frame before it is executed: `join`, `send`, `signal`, `read`
    /// and parse failures cost a token of the connection, a `send` or `signal` one of the user
    /// too. `Err` = do not execute it.
    pub async fn admit(&mut self, parsed: &Result<ClientFrame, FrameError>) -> Result<(), Refusal> {
        let (reply_ref, send) = match parsed {
            // A signal is relayed to every session of its room on every node, like a message
            // (minus the commit): it counts as one, so a typing flood is held to the same rates.
            Ok(ClientFrame::Send { reply_ref, .. } | ClientFrame::Signal { reply_ref, .. }) => {
                (reply_ref.as_ref(), true)
            }
            // An `auth` costs a signature check (an RSA one is about a join's worth of CPU); a
            // `read` a database write.
            Ok(
                ClientFrame::Join { reply_ref, .. }
                | ClientFrame::Auth { reply_ref, .. }
                | ClientFrame::Read { reply_ref, .. },
            ) => (reply_ref.as_ref(), false),
            Err(e) => (e.reply_ref.as_ref(), false),
            Ok(_) => return Ok(()),
        };
        self.charge_connection(reply_ref)?;
        if let (true, Some((limiter, user))) = (send, &self.user) {
            if let Err(wait) = limiter.acquire(user).await {
                return Err(Refusal::Reply(protocol::error_frame(
                    ErrorCode::RateLimited,
                    &user_refusal(wait),
                    reply_ref,
                )));
            }
        }
        Ok(())
    }

    /// Whether the connection is over its rate: the next rate-counted frame would be refused.
    /// Its next frame (of any kind) is then excess and waits for the node's [`ExcessAllowance`].
    pub fn over_rate(&mut self, now: Instant) -> bool {
        self.connection
            .as_mut()
            .is_some_and(|(bucket, _)| !bucket.has_token(now))
    }

    /// Charges a frame that is not a JSON text frame (a binary frame): malformed.
    pub fn admit_malformed(&mut self) -> Result<(), Refusal> {
        self.charge_connection(None)
    }

    fn charge_connection(&mut self, reply_ref: Option<&Ref>) -> Result<(), Refusal> {
        let Some((bucket, abuse)) = &mut self.connection else {
            return Ok(());
        };
        let now = Instant::now();
        if abuse.record(now) {
            metrics::counter!(m::RATE_LIMIT_CLOSED).increment(1);
            tracing::info!("closing a connection that exceeds its rate tenfold");
            return Err(Refusal::Close);
        }
        bucket.try_take(now).map_err(|wait| {
            metrics::counter!(m::RATE_LIMITED, "limit" => "connection").increment(1);
            let message = format!(
                "too many frames on this connection (SEQCAST_SEND_RATE); retry in {} ms",
                wait.as_millis().max(1)
            );
            Refusal::Reply(protocol::error_frame(
                ErrorCode::RateLimited,
                &message,
                reply_ref,
            ))
        })
    }
}
