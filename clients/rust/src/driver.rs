//! The background task: the only owner of the socket. It loops over three phases, serving the
//! handles' commands in each: waiting out a reconnect delay, opening a connection (token,
//! WebSocket, first-frame `auth`), and the open connection, where one `select!` reads frames,
//! takes commands, runs the timers (ping, pong deadline, token refresh, retries) and receives a
//! refreshed token. The state and its rules live in [`Core`]; this file only does I/O.
//!
//! Events reach the application through [`EventSink`]. With a bounded channel that is full, the
//! open connection stops reading the socket until the application takes an event: TCP then
//! pushes back to the server, which feeds a slow reader from its database once it catches up
//! (and cuts one that accepts nothing for its write timeout: the client reconnects and rejoins
//! with `since`). Memory stays bounded by the channel's capacity either way.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::core::{Command, Core, Flow};
use crate::options::{Options, TokenSource};
use crate::types::{Error, Event, State};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Frames read, or commands taken, at most in one go before what they call for is written.
const BATCH: usize = 256;

/// The token the connection uses now, shared with the handles for `history`. A plain mutex:
/// held only to copy a string in or out, never across an `.await`.
pub(crate) type TokenSlot = Arc<Mutex<Option<String>>>;

/// Where events go: the application's channel.
pub(crate) enum EventSink {
    Unbounded(mpsc::UnboundedSender<Event>),
    /// At most its capacity waiting; when full, the socket is not read.
    Bounded(mpsc::Sender<Event>),
}

/// How a connection (or an attempt at one) ended.
struct Lost {
    /// The close code, `None` when the connection broke or never opened.
    code: Option<u16>,
    reason: String,
}

/// How a phase ended, besides normally.
enum End {
    Lost(Lost),
    /// `reconnect()`: connect again at once.
    Reconnect,
    /// `close()` (with its `done`), or every handle dropped (`None`).
    Close(Option<oneshot::Sender<()>>),
}

pub(crate) struct Driver {
    core: Core,
    commands: mpsc::UnboundedReceiver<Command>,
    events: EventSink,
    /// Connection attempts so far: attempt `n` goes to `opts.endpoint(n)`.
    attempts: usize,
    token: TokenSlot,
    /// A token being fetched for a refresh on the open connection.
    refresh: Option<oneshot::Receiver<Result<String, String>>>,
}

impl Driver {
    pub fn new(
        core: Core,
        commands: mpsc::UnboundedReceiver<Command>,
        events: EventSink,
        token: TokenSlot,
    ) -> Driver {
        Driver {
            core,
            commands,
            events,
            attempts: 0,
            token,
            refresh: None,
        }
    }

    pub async fn run(mut self) {
        // The core starts in this state; said once, for the application.
        self.core.emit(Event::State(State::Connecting));
        let mut delay = None;
        loop {
            if let Some(delay) = delay.take() {
                if let Some(end) = self.wait(delay).await {
                    match end {
                        End::Close(done) => return self.finish(done).await,
                        End::Reconnect | End::Lost(_) => {}
                    }
                }
            }
            let end = match self.open().await {
                Ok(ws) => self.session(ws).await,
                Err(end) => end,
            };
            match end {
                End::Close(done) => return self.finish(done).await,
                End::Reconnect => {
                    self.core.teardown();
                    self.refresh = None;
                    self.core.set_state(State::Reconnecting {
                        code: None,
                        reason: "reconnect()".to_owned(),
                        delay: Duration::ZERO,
                    });
                }
                End::Lost(lost) => match self.after_close(lost) {
                    Some(d) => delay = Some(d),
                    None => return self.deliver_the_rest().await,
                },
            }
        }
    }

    /// Serves commands until `delay` has passed (or `reconnect()` cuts it short).
    async fn wait(&mut self, delay: Duration) -> Option<End> {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            let queued = !self.flush_events();
            tokio::select! {
                () = &mut sleep => return None,
                () = room_for_events(&self.events), if queued => {}
                cmd = self.commands.recv() => match self.offline_command(cmd) {
                    Some(End::Reconnect) => return None,
                    Some(end) => return Some(end),
                    None => {}
                },
            }
        }
    }

    /// A command while no connection is open (it is queued in the core for the next one).
    fn offline_command(&mut self, cmd: Option<Command>) -> Option<End> {
        match cmd.map(|c| self.core.command(c)) {
            None => Some(End::Close(None)),
            Some(Flow::Continue) => None,
            Some(Flow::Reconnect) => Some(End::Reconnect),
            Some(Flow::Close(done)) => Some(End::Close(Some(done))),
        }
    }

    /// Opens and authenticates a connection, serving commands meanwhile.
    async fn open(&mut self) -> Result<Ws, End> {
        let opts = Arc::clone(&self.core.opts);
        let slot = Arc::clone(&self.token);
        let url = opts.endpoint(self.attempts).to_owned();
        self.attempts += 1;
        let attempt = tokio::time::timeout(
            opts.connect_timeout,
            connect(opts.clone(), url.clone(), slot),
        );
        tokio::pin!(attempt);
        loop {
            let queued = !self.flush_events();
            tokio::select! {
                () = room_for_events(&self.events), if queued => {}
                res = &mut attempt => {
                    let res = res.unwrap_or_else(|_| {
                        Err((lost(None, "connect timeout"), Some(Error::Timeout("connect timeout".into()))))
                    });
                    return match res {
                        Ok((ws, exp)) => {
                            self.core.on_authed(&url, exp);
                            Ok(ws)
                        }
                        Err((lost, err)) => {
                            if let Some(err) = err {
                                self.core.emit(Event::Error(err));
                            }
                            Err(End::Lost(lost))
                        }
                    };
                }
                cmd = self.commands.recv() => match self.offline_command(cmd) {
                    // Connecting already: nothing to cut short.
                    Some(End::Reconnect) | None => {}
                    Some(end) => return Err(end),
                },
            }
        }
    }

    /// The open connection, until it ends.
    async fn session(&mut self, mut ws: Ws) -> End {
        loop {
            for frame in std::mem::take(&mut self.core.outbox) {
                if let Err(e) = ws.feed(WsMessage::text(frame)).await {
                    return End::Lost(lost(None, &format!("write failed: {e}")));
                }
            }
            if let Err(e) = ws.flush().await {
                return End::Lost(lost(None, &format!("write failed: {e}")));
            }
            // Read the socket only once the application has room for what it brings.
            let reading = self.flush_events();
            if reading {
                self.core.resume_reading(Instant::now());
            } else {
                self.core.pause_reading(Instant::now());
            }
            let deadline = self.core.next_deadline();
            // Far enough never to fire; the branch is disabled anyway without a deadline.
            let sleep_until =
                deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
            tokio::select! {
                () = room_for_events(&self.events), if !reading => {}
                msg = ws.next(), if reading => {
                    // This frame and those already received, while the application has room
                    // for their events: what they call for is then written in one go.
                    let mut msg = msg;
                    let mut left = BATCH;
                    loop {
                        if let Some(end) = self.on_frame(msg) {
                            return end;
                        }
                        left -= 1;
                        if left == 0 || !self.flush_events() {
                            break;
                        }
                        match ws.next().now_or_never() {
                            Some(next) => msg = next,
                            None => break,
                        }
                    }
                }
                cmd = self.commands.recv() => {
                    // This command and those already queued (a burst of sends becomes one
                    // write, not one per send).
                    let mut cmd = cmd;
                    let mut left = BATCH;
                    let end = loop {
                        match cmd.map(|c| self.core.command(c)) {
                            Some(Flow::Continue) => {}
                            None => break Some(End::Close(None)),
                            Some(Flow::Reconnect) => break Some(End::Reconnect),
                            Some(Flow::Close(done)) => break Some(End::Close(Some(done))),
                        }
                        left -= 1;
                        match self.commands.try_recv() {
                            _ if left == 0 => break None,
                            Ok(next) => cmd = Some(next),
                            Err(mpsc::error::TryRecvError::Empty) => break None,
                            Err(mpsc::error::TryRecvError::Disconnected) => cmd = None,
                        }
                    };
                    if let Some(end) = end {
                        close_politely(&mut ws).await;
                        return end;
                    }
                }
                () = tokio::time::sleep_until(sleep_until), if deadline.is_some() => {
                    let due = self.core.on_timers(Instant::now());
                    if due.dead {
                        self.core.emit(Event::Error(Error::Timeout("no pong".into())));
                        return End::Lost(lost(None, "no pong"));
                    }
                    if due.refresh {
                        self.fetch_refresh_token();
                    }
                }
                token = next_token(&mut self.refresh) => {
                    self.refresh = None;
                    match token {
                        Ok(token) => {
                            store_token(&self.token, &token);
                            self.core.send_auth(token);
                        }
                        Err(e) => {
                            self.core.emit(Event::Error(Error::Token(e)));
                            self.core.refresh_failed();
                        }
                    }
                }
            }
        }
    }

    /// One read from the socket; `Some` when the connection ended.
    fn on_frame(&mut self, msg: Option<Result<WsMessage, WsError>>) -> Option<End> {
        match msg {
            Some(Ok(WsMessage::Text(text))) => self.core.on_text(text.as_str()),
            Some(Ok(WsMessage::Close(frame))) => {
                let code = frame.as_ref().map(|f| u16::from(f.code));
                let reason = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                return Some(End::Lost(Lost {
                    code: code.or(Some(1005)),
                    reason,
                }));
            }
            // tungstenite answers pings itself; seqcast sends no binary frames.
            Some(Ok(_)) => {}
            Some(Err(e)) => return Some(End::Lost(lost(None, &e.to_string()))),
            None => return Some(End::Lost(lost(None, "connection ended"))),
        }
        None
    }

    /// Starts fetching a fresh token in a task of its own, so the connection keeps being served.
    fn fetch_refresh_token(&mut self) {
        let TokenSource::Callback(f) = &self.core.opts.token else {
            return;
        };
        let fetch = f();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            // Nobody waits any more when the connection ended meanwhile (its reconnect fetched
            // a token of its own).
            if tx.send(fetch.await).is_err() {
                tracing::trace!("refreshed token no longer needed");
            }
        });
        self.refresh = Some(rx);
    }

    /// After a lost connection: the delay before the next attempt, or `None` to give up.
    fn after_close(&mut self, lost: Lost) -> Option<Duration> {
        self.core.teardown();
        self.refresh = None;
        let opts = Arc::clone(&self.core.opts);
        if lost.code == Some(1008) {
            // A bad or expired token: never loop on it. With a callback a fresh one is fetched on
            // the next connect; a fixed token cannot get better.
            self.core.auth_failures += 1;
            let callback = matches!(opts.token, TokenSource::Callback(_));
            if !callback || self.core.auth_failures > opts.max_auth_failures {
                let reason = format!("closed 1008 {}", lost.reason).trim().to_owned();
                self.core.emit(Event::Error(Error::Unauthorized(reason)));
                self.core
                    .fail(&Error::Unauthorized("the server refused the token".into()));
                self.core.set_state(State::Closed { code: Some(1008) });
                return None;
            }
        }
        let delay = if lost.code == Some(1012) {
            // A drain: the other nodes are ready now.
            opts.drain_jitter.mul_f64(fastrand::f64())
        } else {
            // 1013 (overloaded) backs off further than a plain failure.
            let extra = if lost.code == Some(1013) { 2 } else { 0 };
            let d = opts.backoff.delay(self.core.attempt + extra);
            self.core.attempt += 1;
            d
        };
        self.core.set_state(State::Reconnecting {
            code: lost.code,
            reason: lost.reason,
            delay,
        });
        Some(delay)
    }

    /// Closed for good: fail what is pending and say so.
    async fn finish(mut self, done: Option<oneshot::Sender<()>>) {
        self.core.teardown();
        self.core.fail(&Error::Closed);
        self.core.set_state(State::Closed { code: Some(1000) });
        if let Some(done) = done {
            if done.send(()).is_err() {
                tracing::trace!("close() caller stopped waiting");
            }
        }
        self.deliver_the_rest().await;
    }

    /// Hands the application every queued event that fits now; `true` when none is left. An
    /// application that dropped its receiver does not want events any more (the requests'
    /// replies still work): they are dropped.
    fn flush_events(&mut self) -> bool {
        while let Some(event) = self.core.events.pop_front() {
            let gone = match &self.events {
                EventSink::Unbounded(tx) => tx.send(event).is_err(),
                EventSink::Bounded(tx) => match tx.try_send(event) {
                    Ok(()) => false,
                    Err(mpsc::error::TrySendError::Full(event)) => {
                        self.core.events.push_front(event);
                        return false;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => true,
                },
            };
            if gone {
                tracing::trace!("event receiver dropped");
                self.core.events.clear();
            }
        }
        true
    }

    /// The last events (the final state), once the application takes them or drops its
    /// receiver; `close()` has been answered already, so nobody waits on this task.
    async fn deliver_the_rest(mut self) {
        while !self.flush_events() {
            room_for_events(&self.events).await;
        }
    }
}

/// Resolves once a bounded event channel has room (or its receiver is gone); never for an
/// unbounded one, which always has room.
async fn room_for_events(sink: &EventSink) {
    match sink {
        // The permit goes back at once: the next flush takes the free slot (the driver is the
        // only sender).
        EventSink::Bounded(tx) => drop(tx.reserve().await),
        EventSink::Unbounded(_) => std::future::pending().await,
    }
}

fn lost(code: Option<u16>, reason: &str) -> Lost {
    Lost {
        code,
        reason: reason.to_owned(),
    }
}

fn store_token(slot: &TokenSlot, token: &str) {
    // A poisoned slot only means a panic elsewhere while copying a string: the value is fine.
    let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
    *guard = Some(token.to_owned());
}

/// The refreshed token, once fetched; never resolves when no fetch is under way.
async fn next_token(
    rx: &mut Option<oneshot::Receiver<Result<String, String>>>,
) -> Result<String, String> {
    match rx {
        Some(rx) => match rx.await {
            Ok(res) => res,
            Err(_) => Err("token fetch task ended".to_owned()),
        },
        None => std::future::pending().await,
    }
}

/// Best effort: a close frame 1000, within a second (the socket may be dead already).
async fn close_politely(ws: &mut Ws) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    let close = ws.close(Some(frame));
    if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(1), close).await {
        tracing::debug!("closing the socket: {e}");
    }
}

/// One connection attempt: a token (fresh from the callback), the WebSocket, and the first-frame
/// `auth` answered `authed`. Returns the socket and the token's `exp`; or how it failed, with the
/// error to report.
async fn connect(
    opts: Arc<Options>,
    url: String,
    slot: TokenSlot,
) -> Result<(Ws, Option<u64>), (Lost, Option<Error>)> {
    let token = match &opts.token {
        TokenSource::None => None,
        TokenSource::Fixed(t) => Some(t.clone()),
        TokenSource::Callback(f) => match f().await {
            Ok(t) => Some(t),
            Err(e) => return Err((lost(None, "token callback failed"), Some(Error::Token(e)))),
        },
    };
    if let Some(t) = &token {
        store_token(&slot, t);
    }
    let config = WebSocketConfig::default().read_buffer_size(opts.read_buffer_size);
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), false)
            .await
            .map_err(|e| {
                (
                    lost(None, &e.to_string()),
                    Some(Error::Connection(e.to_string())),
                )
            })?;
    let Some(token) = token else {
        return Ok((ws, None));
    };
    // First-frame auth: the token never appears in the URL (and so in no access log).
    let frame = json!({"type": "auth", "token": token, "ref": 0}).to_string();
    ws.send(WsMessage::text(frame))
        .await
        .map_err(|e| (lost(None, &e.to_string()), None))?;
    let mut refused = None;
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(text))) => {
                let v: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                match v.get("type").and_then(Value::as_str) {
                    Some("authed") => return Ok((ws, v.get("exp").and_then(Value::as_u64))),
                    Some("error") => {
                        let code = v.get("code").and_then(Value::as_str).unwrap_or("error");
                        let message = v.get("message").and_then(Value::as_str).unwrap_or("");
                        refused = Some(format!("{code}: {message}"));
                    }
                    _ => {}
                }
            }
            Some(Ok(WsMessage::Close(frame))) => {
                let code = frame.as_ref().map(|f| u16::from(f.code)).or(Some(1005));
                let reason = refused
                    .unwrap_or_else(|| frame.map(|f| f.reason.to_string()).unwrap_or_default());
                return Err((Lost { code, reason }, None));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err((lost(None, &e.to_string()), None)),
            None => return Err((lost(None, "connection ended before authed"), None)),
        }
    }
}
