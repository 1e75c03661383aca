//! A client for seqcast: any number of rooms over one WebSocket, and every message of a room
//! delivered to the application exactly once and in order, across reconnects, node crashes and
//! drains. It implements the client behaviour of docs/protocol.md and mirrors the JavaScript
//! client (clients/js) in design and defaults.
//!
//! ```no_run
//! # async fn demo() -> Result<(), seqcast_client::Error> {
//! use seqcast_client::{Client, Event, Options};
//!
//! let (client, mut events) = Client::new(Options::new("ws://127.0.0.1:8080/v1/ws").token("dev:alice"));
//! client.join("general", None).await?;
//! let ack = client.send("general", serde_json::json!({"text": "hi"}), None).await?;
//! while let Some(event) = events.recv().await {
//!     if let Event::Message(m) = event {
//!         println!("{} #{} {}: {}", m.room, m.seq, m.from, m.body);
//!     }
//! }
//! # let _ = ack; Ok(()) }
//! ```
//!
//! Layout, along a message's path:
//!
//! - [`Client`] (this file): the cheap, cloneable handle. Each call becomes a command on a
//!   channel to the background task, and a future waiting for its reply.
//! - `driver`: the background task, the only owner of the socket: reconnect delays, opening and
//!   authenticating a connection, and one `select!` over frames, commands and timers.
//! - `core`: the state that survives reconnects (rooms, unacked sends) and the reactions to
//!   commands, frames and timers, without I/O.
//! - `room`: one room's cursor, the exactly-once rule.
//! - `core/v11.rs`, `presence`: the v1.1 frames (signals, read cursors, presence).
//! - `options`, `types`: settings with their defaults; events, replies, errors.

mod core;
mod driver;
mod options;
mod presence;
mod room;
mod types;

use std::future::Future;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::core::{Command, Core};
use crate::driver::{Driver, EventSink, TokenSlot};
pub use crate::options::{Backoff, Options, TokenFuture, TokenSource};
pub use crate::types::{
    Ack, Error, Event, HistoryQuery, JoinOptions, Joined, Message, Page, Presence, PresenceChange,
    Signal, State, Stats,
};

/// The handle to a client. Cloning it is cheap (all clones talk to the same connection); the
/// client closes when [`Client::close`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::UnboundedSender<Command>,
    http: Arc<Http>,
}

struct Http {
    base: String,
    token: TokenSlot,
    source: TokenSource,
    client: reqwest::Client,
}

impl Client {
    /// Starts the client (it connects in the background at once) and returns its handle and its
    /// events. Events are unbounded: read them promptly (or see [`Client::bounded`]). Must be
    /// called within a Tokio runtime.
    pub fn new(options: Options) -> (Client, mpsc::UnboundedReceiver<Event>) {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        (
            Client::start(options, EventSink::Unbounded(events_tx)),
            events_rx,
        )
    }

    /// Like [`Client::new`], with at most `capacity` events waiting for the application
    /// (`capacity` >= 1). While the channel is full the client does not read its socket, so a
    /// slow application holds a bounded amount of memory and the server sees a slow reader: it
    /// keeps the messages in its database and sends them once the client reads again (or, past
    /// its write timeout, closes the connection; the client then reconnects and rejoins with
    /// `since`). Either way every message still arrives once and in order. Requests (`join`,
    /// `send`, ...) are still served meanwhile, but their replies wait for the socket to be read.
    pub fn bounded(options: Options, capacity: usize) -> (Client, mpsc::Receiver<Event>) {
        let (events_tx, events_rx) = mpsc::channel(capacity.max(1));
        (
            Client::start(options, EventSink::Bounded(events_tx)),
            events_rx,
        )
    }

    fn start(options: Options, events: EventSink) -> Client {
        let opts = Arc::new(options);
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let token: TokenSlot = Arc::new(Mutex::new(None));
        let http = Http {
            base: opts.http_base(),
            token: Arc::clone(&token),
            source: opts.token.clone(),
            client: reqwest::Client::new(),
        };
        let core = Core::new(Arc::clone(&opts));
        tokio::spawn(Driver::new(core, commands_rx, events, token).run());
        Client {
            commands,
            http: Arc::new(http),
        }
    }

    /// Subscribes to `room`; resolves with the first `joined`. `since`: replay every message
    /// with `seq > since` first; `None`: live messages from now on. The room is rejoined after
    /// every reconnect with `since` = the last seq delivered. Fails on `forbidden`,
    /// `bad_request`, `limit_exceeded`.
    pub fn join(
        &self,
        room: &str,
        since: Option<u64>,
    ) -> impl Future<Output = Result<Joined, Error>> + Send + 'static {
        self.join_command(room, since, None)
    }

    /// [`Client::join`] with options: `since`, and (v1.1) `presence`: also track who is present
    /// ([`Client::presence`], [`Event::Presence`]), asked again on every rejoin.
    pub fn join_with(
        &self,
        room: &str,
        options: JoinOptions,
    ) -> impl Future<Output = Result<Joined, Error>> + Send + 'static {
        self.join_command(room, options.since, Some(options.presence))
    }

    fn join_command(
        &self,
        room: &str,
        since: Option<u64>,
        presence: Option<bool>,
    ) -> impl Future<Output = Result<Joined, Error>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self.command(Command::Join {
            room: room.to_owned(),
            since,
            presence,
            reply,
        });
        async move {
            sent?;
            rx.await.unwrap_or(Err(Error::Closed))
        }
    }

    /// Unsubscribes; no message of the room is delivered after this resolves.
    pub async fn leave(&self, room: &str) {
        let (reply, rx) = oneshot::channel();
        let command = Command::Leave {
            room: room.to_owned(),
            reply,
        };
        if self.command(command).is_ok() {
            // An error only means the client closed meanwhile: then the room is left too.
            rx.await.unwrap_or(());
        }
    }

    /// Commits `body` (any JSON value) to `room`. The send is queued at once; the future
    /// resolves once, with the ack, however many reconnects and retries that takes. `idem`
    /// defaults to a fresh UUID v4. Fails on `bad_request`, `forbidden`, `too_large` and when
    /// the client closes first.
    pub fn send(
        &self,
        room: &str,
        body: Value,
        idem: Option<String>,
    ) -> impl Future<Output = Result<Ack, Error>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self.command(Command::Send {
            room: room.to_owned(),
            body,
            idem: idem.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            reply,
        });
        async move {
            sent?;
            rx.await.unwrap_or(Err(Error::Closed))
        }
    }

    /// v1.1: an ephemeral signal (typing, a cursor position) to the room's other joined
    /// sessions. At most once: taken when called (not when first polled); resolves `Ok` once
    /// written to the open connection, fails with [`Error::Connection`] when the client is not
    /// connected (it is then dropped: signals are never buffered nor resent after a reconnect).
    /// A refusal (`forbidden`, `too_large`, `rate_limited`, ...) comes later as
    /// [`Event::Error`] with [`Error::SignalRefused`].
    pub fn signal(
        &self,
        room: &str,
        body: Value,
    ) -> impl Future<Output = Result<(), Error>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self.command(Command::Signal {
            room: room.to_owned(),
            body,
            reply,
        });
        async move {
            sent?;
            rx.await.unwrap_or(Err(Error::Closed))
        }
    }

    /// v1.1: marks `room` read up to `seq`; resolves with the user's cursor now (the server's
    /// reply: never lower than before, capped at the room's head). Needs an open connection:
    /// fails with [`Error::Connection`] when there is none or it is lost before the reply (it
    /// is safe to call again).
    pub async fn read(&self, room: &str, seq: u64) -> Result<u64, Error> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Read {
            room: room.to_owned(),
            seq,
            reply,
        })?;
        rx.await
            .unwrap_or_else(|_| Err(Error::Connection("connection lost".to_owned())))
    }

    /// v1.1: the largest read cursor seen for `room` (from `joined`, `read` replies and other
    /// connections' moves); it never moves back. `None` when none was seen.
    pub async fn read_cursor(&self, room: &str) -> Option<u64> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::ReadCursor {
            room: room.to_owned(),
            reply,
        })
        .ok()?;
        rx.await.ok().flatten()
    }

    /// v1.1: who is present in `room` (joined with presence). `None` before the first `joined`
    /// with presence, when not asked, or when the server does not support it.
    pub async fn presence(&self, room: &str) -> Option<Presence> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Presence {
            room: room.to_owned(),
            reply,
        })
        .ok()?;
        rx.await.ok().flatten()
    }

    /// A page of stored messages over HTTP (`GET /v1/rooms/{room}/messages`), with the
    /// connection's current token (or a fresh one from the callback before the first connect).
    /// Plain `http://` only: the workspace's HTTP client is built without TLS.
    pub async fn history(&self, room: &str, query: HistoryQuery) -> Result<Page, Error> {
        let http = &self.http;
        let url = format!("{}/v1/rooms/{}/messages", http.base, encode_room(room));
        let mut params = Vec::new();
        for (name, value) in [
            ("before", query.before),
            ("after", query.after),
            ("limit", query.limit.map(u64::from)),
        ] {
            if let Some(v) = value {
                params.push((name, v.to_string()));
            }
        }
        let current = http.token.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let token = match (current, &http.source) {
            (Some(t), _) => Some(t),
            (None, TokenSource::Fixed(t)) => Some(t.clone()),
            (None, TokenSource::Callback(f)) => Some(f().await.map_err(Error::Token)?),
            (None, TokenSource::None) => None,
        };
        let mut request = http.client.get(url).query(&params);
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        let response = request
            .send()
            .await
            .map_err(|e| Error::Http(e.to_string()))?;
        let status = response.status();
        let json: Value = response
            .json()
            .await
            .map_err(|e| Error::Http(e.to_string()))?;
        if !status.is_success() {
            let text = |k: &str| json.get(k).and_then(Value::as_str).map(str::to_owned);
            return Err(Error::Server {
                code: text("error").unwrap_or_else(|| format!("http_{}", status.as_u16())),
                message: text("message").unwrap_or_default(),
            });
        }
        serde_json::from_value(json).map_err(|e| Error::Http(e.to_string()))
    }

    /// The last seq delivered in `room` (`None` before its first `joined`, or not joined).
    pub async fn last_seq(&self, room: &str) -> Option<u64> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::LastSeq {
            room: room.to_owned(),
            reply,
        })
        .ok()?;
        rx.await.ok().flatten()
    }

    /// Sends not acknowledged yet.
    pub async fn pending_sends(&self) -> usize {
        let (reply, rx) = oneshot::channel();
        if self.command(Command::PendingSends { reply }).is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// Duplicates dropped and gaps repaired so far (see [`Stats`]).
    pub async fn stats(&self) -> Stats {
        let (reply, rx) = oneshot::channel();
        if self.command(Command::Stats { reply }).is_err() {
            return Stats::default();
        }
        rx.await.unwrap_or_default()
    }

    /// An application `ping` on the open connection, resolved by its `pong`: every frame the
    /// server sent before the pong has been handled by then. Fails when not connected or when
    /// the connection is lost first.
    pub async fn ping(&self) -> Result<(), Error> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Ping { reply })?;
        rx.await
            .unwrap_or_else(|_| Err(Error::Connection("connection lost".to_owned())))
    }

    /// Drops the current connection and reconnects at once, without backoff: for when the
    /// platform says the network changed, where the old socket is likely dead without knowing it.
    pub fn reconnect(&self) {
        // Closed already: nothing to reconnect.
        if self.command(Command::Reconnect).is_err() {
            tracing::trace!("reconnect() on a closed client");
        }
    }

    /// Closes the socket (1000), stops reconnecting, fails pending requests with
    /// [`Error::Closed`]; resolves once the background task has stopped.
    pub async fn close(&self) {
        let (done, rx) = oneshot::channel();
        if self.command(Command::Close { done }).is_ok() {
            // An error means the task has stopped already, which is what we wait for.
            rx.await.unwrap_or(());
        }
    }

    fn command(&self, command: Command) -> Result<(), Error> {
        self.commands.send(command).map_err(|_| Error::Closed)
    }
}

/// Percent-encodes a room name for a path segment (room names are `A-Z a-z 0-9 _ . : -`, so
/// only an invalid one has anything to encode; the server then answers 400).
fn encode_room(room: &str) -> String {
    let mut out = String::with_capacity(room.len());
    for b in room.bytes() {
        if b.is_ascii_alphanumeric() || b"_.:-".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
