//! Rate limits: token buckets per connection and per user.
//!
//! Both limits are token buckets that refill at their rate and hold [`BURST_FACTOR`] x the rate,
//! so a client may burst after a quiet spell; a rate of `0` turns a limit off.
//!
//! - **Per connection** (`SEQCAST_SEND_RATE`, default 50/s): every `join`, `auth`, `send`,
//!   `signal` and `read`, and every malformed frame (one that fails to parse, binary frames included) costs a token
//!   of the connection's bucket, which is plain state of the session's inbound half (no lock, no
//!   shared memory). `leave`, `ping` and other valid frames are free. A frame without a token is
//!   answered with `rate_limited` under its `ref` and not executed; the connection stays open
//!   unless it keeps exceeding its rate tenfold ([`AbuseWatch`] says exactly when), which closes
//!   it with 1008 `rate limit`.
//! - **Per user** (`SEQCAST_USER_SEND_RATE`, default 100/s): every WebSocket `send` and
//!   `signal` and every HTTP POST of one `sub`, on every node together, counted by a bucket in Redis (one atomic Lua
//!   script, key `{SEQCAST_REDIS_PREFIX}rate:{user}`); by a bucket per node while Redis is absent,
//!   down or slow. [`UserLimiter`] explains how a send avoids waiting for Redis.
//!
//! The server key is never limited. Development-mode clients are anonymous, each with a random
//! name, so they are limited per connection only.
//!
//! One file per mechanism: [`bucket`] (the token bucket), [`abuse`] (tenfold abuse of a
//! connection's rate), [`excess`] (the node's allowance for frames of over-rate connections),
//! [`user`] (the per-user limit through Redis), and [`session`], which applies the first two and
//! the per-user limit to a session's frames. The HTTP answer to a refused request (429) is in
//! `crate::error`.

pub mod abuse;
pub mod bucket;
pub mod excess;
pub mod session;
pub mod user;

pub use abuse::{AbuseWatch, ABUSE_FACTOR, ABUSE_WINDOW, ABUSE_WINDOWS};
pub use bucket::TokenBucket;
pub use excess::ExcessAllowance;
pub use session::{Refusal, SessionLimits};
pub use user::UserLimiter;

/// A bucket holds this many seconds of its rate: the burst is 4x the rate.
pub const BURST_FACTOR: u32 = 4;
