//! A small WebSocket client for talking to a [`TestServer`] the way real clients do, following
//! `protocol.md` (the HTTP client is in `http.rs`, frame assertions in `check.rs`).
//!
//! Every receive has a deadline; a missing frame panics with what was being waited for, so a
//! failing test says which contract point broke instead of hanging.
//!
//! Raw frames on purpose: the tests that use this check the wire protocol itself (the frames,
//! their order, refs, error codes and close codes: ws_protocol, hostile_input, first_auth,
//! session_limits, slow_reader, admission, auth, ratelimit, delivery, catch_up, the timed load of
//! db_faults and read_limits, the join storm of cluster_joins, ...), which a client library
//! would hide by retrying, reconnecting or dropping. Where a test plays an application instead
//! (sending a stream, listening, failing over: the cluster tests, rolling_restart), it uses the
//! client library, `seqcast-client` (see `cluster.rs`).
#![allow(dead_code)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::check::assert_ack;
use super::server::TestServer;

/// Default deadline for one expected frame.
pub const RECV_DEADLINE: Duration = Duration::from_secs(10);

/// How a client presents its token.
#[derive(Debug, Clone, Copy)]
pub enum Auth<'a> {
    /// No token (development mode, or to test rejection).
    None,
    /// `?token=...` (browsers).
    Query(&'a str),
    /// `Authorization: Bearer ...` (native clients).
    Header(&'a str),
}

/// What the connection produced next.
#[derive(Debug, Clone)]
pub enum Event {
    /// A JSON text frame.
    Frame(Value),
    /// The server sent a close frame.
    Closed { code: Option<u16>, reason: String },
    /// The connection ended without a close frame (EOF, reset, protocol error).
    Ended(String),
}

pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One WebSocket connection to seqcast.
pub struct WsClient {
    ws: WsStream,
    /// Frames read while looking for something else, returned first by later reads.
    backlog: VecDeque<Value>,
    next_ref: u64,
}

impl WsClient {
    /// Connects in development mode (no token).
    pub async fn connect(server: &TestServer) -> WsClient {
        WsClient::connect_with(server, Auth::None).await
    }

    /// Connects with a token presented as `auth`; panics if the handshake fails.
    pub async fn connect_with(server: &TestServer, auth: Auth<'_>) -> WsClient {
        WsClient::try_connect(&server.ws_url(), auth)
            .await
            .unwrap_or_else(|e| panic!("WebSocket handshake with {} failed: {e}", server.ws_url()))
    }

    /// Connects to `url` (`ws://.../v1/ws`), with a deadline on the handshake.
    pub async fn try_connect(url: &str, auth: Auth<'_>) -> Result<WsClient, tungstenite::Error> {
        let url = match auth {
            Auth::Query(token) => format!("{url}?token={token}"),
            Auth::None | Auth::Header(_) => url.to_owned(),
        };
        let mut request = url.as_str().into_client_request()?;
        if let Auth::Header(token) = auth {
            request.headers_mut().insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {token}")).expect("header value"),
            );
        }
        // Let the client send and receive frames larger than the server's limit: the tests
        // check what the server does with them.
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(64 << 20);
        config.max_frame_size = Some(64 << 20);
        let connect = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
        let (ws, _response) = tokio::time::timeout(RECV_DEADLINE, connect)
            .await
            .unwrap_or_else(|_| {
                panic!("WebSocket handshake with {url} took over {RECV_DEADLINE:?}")
            })?;
        Ok(WsClient {
            ws,
            backlog: VecDeque::new(),
            next_ref: 1_000_000,
        })
    }

    /// A fresh numeric `ref` for a request.
    pub fn new_ref(&mut self) -> Value {
        self.next_ref += 1;
        json!(self.next_ref)
    }

    /// Sends one frame; panics if it cannot be written within [`RECV_DEADLINE`].
    pub async fn send_message(&mut self, message: Message) {
        match tokio::time::timeout(RECV_DEADLINE, self.ws.send(message)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("WebSocket send failed: {e}"),
            Err(_) => panic!("WebSocket send blocked for over {RECV_DEADLINE:?}"),
        }
    }

    /// Sends one frame, returning the error instead of panicking (for frames the server may
    /// refuse by closing).
    pub async fn try_send_message(&mut self, message: Message) -> Result<(), tungstenite::Error> {
        match tokio::time::timeout(RECV_DEADLINE, self.ws.send(message)).await {
            Ok(result) => result,
            Err(_) => panic!("WebSocket send blocked for over {RECV_DEADLINE:?}"),
        }
    }

    /// Sends a JSON value as a text frame.
    pub async fn send_json(&mut self, value: Value) {
        self.send_message(Message::text(value.to_string())).await;
    }

    /// Sends raw text (e.g. malformed JSON).
    pub async fn send_text(&mut self, text: &str) {
        self.send_message(Message::text(text.to_owned())).await;
    }

    /// The next event, or `None` if nothing came within `deadline`. WebSocket pings and pongs
    /// are skipped (tungstenite answers pings itself).
    pub async fn next_event(&mut self, deadline: Duration) -> Option<Event> {
        if let Some(frame) = self.backlog.pop_front() {
            return Some(Event::Frame(frame));
        }
        let until = Instant::now() + deadline;
        loop {
            let remaining = until.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(remaining, self.ws.next()).await.ok()?;
            let event = match next {
                Some(Ok(Message::Text(text))) => {
                    let value = serde_json::from_str(text.as_str()).unwrap_or_else(|e| {
                        panic!("server sent a text frame that is not JSON ({e}): {text}")
                    });
                    Event::Frame(value)
                }
                Some(Ok(Message::Binary(data))) => {
                    panic!("server sent a binary frame ({} bytes)", data.len())
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(frame))) => Event::Closed {
                    code: frame.as_ref().map(|f| u16::from(f.code)),
                    reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                },
                Some(Err(e)) => Event::Ended(e.to_string()),
                None => Event::Ended("stream ended".to_owned()),
            };
            return Some(event);
        }
    }

    /// The next JSON frame within `deadline`; panics on timeout or close.
    pub async fn recv_json_timeout(&mut self, deadline: Duration) -> Value {
        match self.next_event(deadline).await {
            Some(Event::Frame(value)) => value,
            Some(other) => panic!("expected a JSON frame, got {other:?}"),
            None => panic!("no frame received within {deadline:?}"),
        }
    }

    /// The next JSON frame within [`RECV_DEADLINE`].
    pub async fn recv_json(&mut self) -> Value {
        self.recv_json_timeout(RECV_DEADLINE).await
    }

    /// The next frame, which must be of type `ty`.
    pub async fn expect_frame(&mut self, ty: &str) -> Value {
        let frame = self.recv_json().await;
        assert_eq!(frame["type"], ty, "expected a `{ty}` frame, got {frame}");
        frame
    }

    /// Reads until the frame whose `ref` equals `reference`; frames read on the way stay queued
    /// for later reads.
    pub async fn reply_to(&mut self, reference: &Value) -> Value {
        let until = Instant::now() + RECV_DEADLINE;
        let mut skipped = Vec::new();
        let reply = loop {
            let remaining = until.saturating_duration_since(Instant::now());
            match self.next_event(remaining).await {
                Some(Event::Frame(frame)) if frame.get("ref") == Some(reference) => break frame,
                Some(Event::Frame(frame)) => skipped.push(frame),
                Some(other) => panic!(
                    "waiting for the reply with ref {reference}, got {other:?} (skipped: {skipped:?})"
                ),
                None => panic!(
                    "no reply with ref {reference} within {RECV_DEADLINE:?} (skipped: {skipped:?})"
                ),
            }
        };
        self.unread(skipped);
        reply
    }

    /// Puts frames back in front of the backlog, in order.
    fn unread(&mut self, frames: Vec<Value>) {
        for frame in frames.into_iter().rev() {
            self.backlog.push_front(frame);
        }
    }

    /// Sends `frame` (a `ref` is added when it has none) and returns the reply to it.
    pub async fn request(&mut self, mut frame: Value) -> Value {
        if frame.get("ref").is_none() {
            frame["ref"] = self.new_ref();
        }
        let reference = frame["ref"].clone();
        self.send_json(frame).await;
        self.reply_to(&reference).await
    }

    /// Sends `frame`, expects an `error` reply with `code`, returns it.
    pub async fn expect_error(&mut self, frame: Value, code: &str) -> Value {
        let sent = frame.to_string();
        let reply = self.request(frame).await;
        assert_eq!(
            reply["type"], "error",
            "{sent} should fail with {code}, got {reply}"
        );
        assert_eq!(
            reply["code"], code,
            "{sent} should fail with {code}, got {reply}"
        );
        assert!(
            reply["message"].is_string(),
            "an error frame carries a human `message`: {reply}"
        );
        reply
    }

    /// Joins `room` (with `since` when given) and returns the `joined` frame.
    pub async fn join(&mut self, room: &str, since: Option<u64>) -> Value {
        let mut frame = json!({"type": "join", "room": room});
        if let Some(since) = since {
            frame["since"] = json!(since);
        }
        let reply = self.request(frame).await;
        assert_eq!(
            reply["type"], "joined",
            "join {room} since {since:?}: got {reply}"
        );
        assert_eq!(reply["room"], room, "joined names the room: {reply}");
        assert!(
            reply["head"].is_u64(),
            "joined carries a numeric head: {reply}"
        );
        assert!(
            reply["first"].is_u64(),
            "joined carries a numeric first: {reply}"
        );
        reply
    }

    /// Leaves `room` and returns the `left` frame.
    pub async fn leave(&mut self, room: &str) -> Value {
        let reply = self.request(json!({"type": "leave", "room": room})).await;
        assert_eq!(reply["type"], "left", "leave {room}: got {reply}");
        assert_eq!(reply["room"], room, "left names the room: {reply}");
        reply
    }

    /// Sends a message and returns its `ack`.
    pub async fn send_msg(&mut self, room: &str, body: Value) -> Value {
        let reply = self
            .request(json!({"type": "send", "room": room, "body": body}))
            .await;
        assert_ack(&reply, room);
        reply
    }

    /// Pings and waits for the pong: everything the server sent before it is then queued.
    pub async fn ping(&mut self) {
        let reply = self.request(json!({"type": "ping"})).await;
        assert_eq!(reply["type"], "pong", "ping: got {reply}");
    }

    /// Pings and returns every frame that arrived before the pong (they are consumed).
    pub async fn frames_until_pong(&mut self) -> Vec<Value> {
        let reference = self.new_ref();
        self.send_json(json!({"type": "ping", "ref": reference.clone()}))
            .await;
        let mut before = Vec::new();
        loop {
            let frame = self.recv_json().await;
            if frame["type"] == "pong" && frame["ref"] == reference {
                return before;
            }
            before.push(frame);
        }
    }

    /// Reads until `n` `message` frames of `room` have arrived, within `deadline`; other frames
    /// (except errors, which panic) stay queued for later reads.
    pub async fn collect_messages(
        &mut self,
        room: &str,
        n: usize,
        deadline: Duration,
    ) -> Vec<Value> {
        let mut messages = Vec::with_capacity(n);
        self.collect_with(room, n, deadline, |m| messages.push(m))
            .await;
        messages
    }

    /// Like [`collect_messages`](Self::collect_messages) but keeps only each message's `seq`
    /// (for large volumes).
    pub async fn collect_seqs(&mut self, room: &str, n: usize, deadline: Duration) -> Vec<u64> {
        let mut seqs = Vec::with_capacity(n);
        self.collect_with(room, n, deadline, |m| {
            seqs.push(m["seq"].as_u64().expect("message seq"));
        })
        .await;
        seqs
    }

    async fn collect_with(
        &mut self,
        room: &str,
        n: usize,
        deadline: Duration,
        mut keep: impl FnMut(Value),
    ) {
        let until = Instant::now() + deadline;
        let mut count = 0;
        let mut last_seq = None;
        let mut other = Vec::new();
        while count < n {
            let remaining = until.saturating_duration_since(Instant::now());
            match self.next_event(remaining).await {
                Some(Event::Frame(frame))
                    if frame["type"] == "message" && frame["room"] == room =>
                {
                    last_seq = frame["seq"].as_u64();
                    count += 1;
                    keep(frame);
                }
                Some(Event::Frame(frame)) if frame["type"] == "error" => {
                    panic!("error frame while collecting messages of {room}: {frame}")
                }
                Some(Event::Frame(frame)) => other.push(frame),
                Some(event) => panic!(
                    "connection ended after {count} of {n} messages of {room} (last seq \
                     {last_seq:?}): {event:?}"
                ),
                None => panic!(
                    "only {count} of {n} messages of {room} within {deadline:?} (last seq \
                     {last_seq:?})"
                ),
            }
        }
        self.unread(other);
    }

    /// Reads (and discards) frames until the server closes; returns the close code, or panics if
    /// the connection just ends or nothing comes within `deadline`.
    pub async fn expect_close(&mut self, deadline: Duration) -> Option<u16> {
        match self.drain_until_end(deadline).await {
            (Event::Closed { code, .. }, _) => code,
            (other, frames) => {
                panic!(
                    "expected a close frame, got {other:?} after {} frames",
                    frames.len()
                )
            }
        }
    }

    /// Asserts the server closes with `code` within `deadline`.
    pub async fn expect_close_code(&mut self, code: u16, deadline: Duration) {
        let got = self.expect_close(deadline).await;
        assert_eq!(got, Some(code), "expected close code {code}, got {got:?}");
    }

    /// Reads until the connection closes or ends; returns how it ended and the JSON frames read
    /// before. Panics when it does not end within `deadline`.
    pub async fn drain_until_end(&mut self, deadline: Duration) -> (Event, Vec<Value>) {
        let until = Instant::now() + deadline;
        let mut frames = Vec::new();
        loop {
            let remaining = until.saturating_duration_since(Instant::now());
            match self.next_event(remaining).await {
                Some(Event::Frame(frame)) => frames.push(frame),
                Some(end) => return (end, frames),
                None => panic!(
                    "connection still open {deadline:?} later ({} frames read, last: {:?})",
                    frames.len(),
                    frames.last()
                ),
            }
        }
    }

    /// Sends `count` messages to `room` keeping up to `window` unacknowledged, and returns the
    /// acknowledged `seq` of each, in sending order. `body(i)` makes the i-th body. `message`
    /// frames arriving meanwhile (if this client is joined) stay queued.
    pub async fn send_pipelined(
        &mut self,
        room: &str,
        count: usize,
        window: usize,
        deadline: Duration,
        mut body: impl FnMut(usize) -> Value,
    ) -> Vec<u64> {
        self.send_pipelined_observed(room, count, window, deadline, &mut body, |_| {})
            .await
    }

    /// [`send_pipelined`](Self::send_pipelined) calling `on_ack(acked_so_far)` after each ack.
    pub async fn send_pipelined_observed(
        &mut self,
        room: &str,
        count: usize,
        window: usize,
        deadline: Duration,
        body: &mut impl FnMut(usize) -> Value,
        mut on_ack: impl FnMut(usize),
    ) -> Vec<u64> {
        assert!(window > 0);
        let until = Instant::now() + deadline;
        self.next_ref += 1;
        let base = self.next_ref;
        self.next_ref += count as u64;
        let mut seqs = vec![0_u64; count];
        let mut sent = 0;
        let mut acked = 0;
        let mut other = Vec::new();
        while acked < count {
            if sent < count && sent - acked < window {
                while sent < count && sent - acked < window {
                    let frame = json!({
                        "type": "send", "room": room, "body": body(sent),
                        "ref": base + sent as u64,
                    });
                    let fed = self.ws.feed(Message::text(frame.to_string()));
                    match tokio::time::timeout(until.saturating_duration_since(Instant::now()), fed)
                        .await
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => panic!("send {sent} of {count} failed: {e}"),
                        Err(_) => panic!("send {sent} of {count} blocked past the deadline"),
                    }
                    sent += 1;
                }
                let flushed = self.ws.flush();
                match tokio::time::timeout(until.saturating_duration_since(Instant::now()), flushed)
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => panic!("flush after {sent} of {count} failed: {e}"),
                    Err(_) => panic!("flush after {sent} of {count} blocked past the deadline"),
                }
            }
            let remaining = until.saturating_duration_since(Instant::now());
            match self.next_event(remaining).await {
                Some(Event::Frame(frame)) if frame["type"] == "ack" => {
                    let index = frame["ref"]
                        .as_u64()
                        .and_then(|r| r.checked_sub(base))
                        .and_then(|i| usize::try_from(i).ok())
                        .filter(|i| *i < count)
                        .unwrap_or_else(|| panic!("ack with an unknown ref: {frame}"));
                    assert_eq!(
                        seqs[index], 0,
                        "second ack for ref {}: {frame}",
                        frame["ref"]
                    );
                    seqs[index] = frame["seq"].as_u64().expect("ack seq");
                    acked += 1;
                    on_ack(acked);
                }
                Some(Event::Frame(frame)) if frame["type"] == "error" => {
                    panic!("error while sending {count} messages to {room}: {frame}")
                }
                Some(Event::Frame(frame)) => other.push(frame),
                Some(event) => panic!("connection ended after {acked} of {count} acks: {event:?}"),
                None => panic!("only {acked} of {count} acks within {deadline:?}"),
            }
        }
        self.unread(other);
        seqs
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let closed = tokio::time::timeout(RECV_DEADLINE, self.ws.close(None)).await;
        if let Ok(Err(e)) = closed {
            eprintln!("closing a test WebSocket: {e}");
        }
    }
}

/// Connects with `auth` and expects the upgrade to succeed, then an `unauthorized` error frame
/// and close 1008 (how seqcast refuses a token: in-band, so browsers can see why).
pub async fn expect_rejected(server: &TestServer, auth: Auth<'_>, what: &str) {
    let mut client = match WsClient::try_connect(&server.ws_url(), auth).await {
        Ok(client) => client,
        Err(e) => panic!("{what}: the upgrade should succeed, then be closed; got {e}"),
    };
    let (end, frames) = client.drain_until_end(RECV_DEADLINE).await;
    assert!(
        frames
            .iter()
            .any(|f| f["type"] == "error" && f["code"] == "unauthorized"),
        "{what}: expected an `unauthorized` error frame before the close, got {frames:?}"
    );
    match end {
        Event::Closed { code, .. } => assert_eq!(code, Some(1008), "{what}: close code"),
        other => panic!("{what}: expected close 1008, got {other:?}"),
    }
}
