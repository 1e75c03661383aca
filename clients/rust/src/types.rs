//! What the client hands to the application: events, replies to requests, errors.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// A committed message of a room, delivered once and in `seq` order.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Message {
    pub room: String,
    pub seq: u64,
    pub id: String,
    pub from: String,
    pub body: Value,
    /// RFC 3339 in UTC with milliseconds, as the server wrote it.
    pub ts: String,
}

/// The answer to a send: the message is committed under this `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub room: String,
    pub seq: u64,
    pub id: String,
    pub ts: String,
}

/// The answer to a join (and the value of [`Event::Rejoined`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub room: String,
    /// The room's last `seq` when the join took effect (0 for an empty room).
    pub head: u64,
    /// The oldest `seq` still stored (`head + 1` when none is).
    pub first: u64,
    /// Retention deleted messages after the `since` asked for: see [`Event::Truncated`].
    pub truncated: bool,
    /// v1.1: the user's read cursor in the room (0 when it has none, or before v1.1).
    pub read: u64,
    /// v1.1, joined with presence: the users present when the join took effect.
    pub presence: Option<Vec<String>>,
    /// This server's extension for very large rooms: only the number of users present (then
    /// `presence` is `None`).
    pub presence_count: Option<u64>,
}

/// How to join a room ([`crate::Client::join_with`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JoinOptions {
    /// Replay every message with `seq > since` first; `None`: live messages only.
    pub since: Option<u64>,
    /// v1.1: also track who is present (asked again on every rejoin).
    pub presence: bool,
}

/// v1.1: another session's signal in a joined room (never your own).
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    pub room: String,
    pub from: String,
    pub body: Value,
}

/// v1.1: who is present in a room joined with presence ([`crate::Client::presence`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// Sorted; `None` when the server only sends the count (very large rooms).
    pub users: Option<Vec<String>>,
    pub count: u64,
}

/// v1.1: what changed in a room's presence ([`Event::Presence`]), and the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    pub room: String,
    /// Users who arrived (after a reconnect: since before it).
    pub joined: Vec<String>,
    /// Users who left (after a reconnect: meanwhile).
    pub left: Vec<String>,
    /// Everyone present now, sorted; `None` in count-only mode.
    pub users: Option<Vec<String>>,
    pub count: u64,
}

/// The connection's state, as reported by [`Event::State`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// The first connection is being opened.
    Connecting,
    /// Connected and authenticated to `url` (one of [`crate::Options::url`] and its
    /// `fallback_urls`): frames flow; rooms are being rejoined.
    Open { url: String },
    /// The connection was lost (`code`: its close code, `None` when it broke or never opened);
    /// the next attempt starts after `delay`.
    Reconnecting {
        code: Option<u16>,
        reason: String,
        delay: Duration,
    },
    /// For good: [`crate::Client::close`], every handle dropped, or the token refused.
    Closed { code: Option<u16> },
}

/// What the client reports, in order, on the channel [`crate::Client::new`] returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The next message of a joined room: exactly once, in `seq` order.
    Message(Message),
    State(State),
    /// Messages `lost_from ..= first - 1` of `room` were deleted by retention before this
    /// client got them; delivery continues at `first`.
    Truncated {
        room: String,
        first: u64,
        head: u64,
        lost_from: u64,
    },
    /// A room was joined again (after a reconnect or a gap).
    Rejoined(Joined),
    /// v1.1: another session's signal.
    Signal(Signal),
    /// v1.1: another connection of the same user moved its read cursor in `room`; `seq` is the
    /// largest cursor seen (a move older than one seen already is not reported).
    Read {
        room: String,
        seq: u64,
    },
    /// v1.1: the presence of a room joined with presence changed (or was first learnt).
    Presence(PresenceChange),
    /// Something no request reports: a dead connection (`timeout`), the token callback failing
    /// (`token`), a refused token refresh, a rejoin refused, giving up after 1008, a refused
    /// signal ([`Error::SignalRefused`]).
    Error(Error),
}

/// What the client dropped or repaired on the server's behalf: both stay 0 against a server
/// that keeps the protocol's guarantees ([`crate::Client::stats`]); tests and monitoring read
/// them, since the application never sees either.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages of a joined room with a seq already delivered (dropped).
    pub duplicates: u64,
    /// Messages that skipped past the next seq on a connection (the client rejoined with
    /// `since` to fill the gap).
    pub gaps: u64,
}

/// A page of stored messages ([`crate::Client::history`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Page {
    pub room: String,
    pub head: u64,
    pub messages: Vec<Message>,
    pub has_more: bool,
}

/// Which page [`crate::Client::history`] asks for: `after` (ascending from there) or `before`
/// (the `limit` messages just below it); neither: from the beginning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    pub before: Option<u64>,
    pub after: Option<u64>,
    pub limit: Option<u32>,
}

/// An error answered by the server (`code` is its error code) or raised by the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An `error` frame or an HTTP error: `bad_request`, `forbidden`, `too_large`, ...
    #[error("{code}: {message}")]
    Server { code: String, message: String },
    /// The client was closed (or every handle dropped) before this completed.
    #[error("client closed")]
    Closed,
    /// The server refused the token (close 1008) and no fresh one helped.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The room was left before its join completed.
    #[error("left {0} before it was joined")]
    Left(String),
    /// The token callback failed.
    #[error("token: {0}")]
    Token(String),
    /// The connection stopped answering (no pong, or no `authed` in time).
    #[error("timeout: {0}")]
    Timeout(String),
    /// The connection could not be opened or broke (reported with [`Event::Error`] only).
    #[error("connection: {0}")]
    Connection(String),
    /// The HTTP request of `history` failed.
    #[error("http: {0}")]
    Http(String),
    /// v1.1: the server refused a signal sent to `room` (reported with [`Event::Error`] only).
    #[error("signal to {room} refused: {code}: {message}")]
    SignalRefused {
        room: String,
        code: String,
        message: String,
    },
}

impl Error {
    /// The server's error code, for [`Error::Server`] and [`Error::SignalRefused`].
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Server { code, .. } | Error::SignalRefused { code, .. } => Some(code),
            _ => None,
        }
    }
}
