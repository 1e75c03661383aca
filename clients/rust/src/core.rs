//! The client's state and its reactions, without I/O: commands from the handles, frames from
//! the server and timers go in; frames to write (`outbox`) and events come out. The driver
//! (`driver.rs`) owns the socket and feeds this.
//!
//! State that survives a reconnect: the rooms (with their `last` seq) and the unacked sends
//! (with their `idem`). Everything tied to one connection (`refs`, timers, `online`) is reset by
//! [`Core::teardown`].
//!
//! The v1.1 frames (signals, read cursors, presence) are handled in `core/v11.rs`.

mod v11;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::options::{Options, TokenSource};
use crate::presence::PresenceFrame;
use crate::room::{Room, Verdict};
use crate::types::{Ack, Error, Event, Joined, Message, Presence, State, Stats};

/// Error codes after which a send is retried (same idem) rather than failed.
const RETRYABLE: [&str; 3] = ["unavailable", "rate_limited", "internal"];

/// What a [`crate::Client`] handle asks of the background task.
pub(crate) enum Command {
    Join {
        room: String,
        since: Option<u64>,
        /// `None`: as before (`join`); `Some`: set it (`join_with`).
        presence: Option<bool>,
        reply: oneshot::Sender<Result<Joined, Error>>,
    },
    /// v1.1: answered `Ok` once written to the open connection, an error when offline.
    Signal {
        room: String,
        body: Value,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Read {
        room: String,
        seq: u64,
        reply: oneshot::Sender<Result<u64, Error>>,
    },
    ReadCursor {
        room: String,
        reply: oneshot::Sender<Option<u64>>,
    },
    Presence {
        room: String,
        reply: oneshot::Sender<Option<Presence>>,
    },
    Leave {
        room: String,
        reply: oneshot::Sender<()>,
    },
    Send {
        room: String,
        body: Value,
        idem: String,
        reply: oneshot::Sender<Result<Ack, Error>>,
    },
    LastSeq {
        room: String,
        reply: oneshot::Sender<Option<u64>>,
    },
    PendingSends {
        reply: oneshot::Sender<usize>,
    },
    Stats {
        reply: oneshot::Sender<Stats>,
    },
    /// An application `ping`, answered once its `pong` arrives (or failed when offline).
    Ping {
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Reconnect,
    Close {
        done: oneshot::Sender<()>,
    },
}

/// What the driver does after a command.
pub(crate) enum Flow {
    Continue,
    /// Drop the connection and connect again at once.
    Reconnect,
    /// Close for good; `done` is answered once everything is stopped.
    Close(oneshot::Sender<()>),
}

/// What a frame sent on the current connection is waiting for (keyed by its `ref`).
enum Pending {
    Auth,
    Ping,
    /// [`Command::Ping`]: dropped with the connection, which fails it.
    AppPing(oneshot::Sender<Result<(), Error>>),
    Join {
        room: String,
        epoch: u64,
    },
    Leave(oneshot::Sender<()>),
    Send(u64),
    /// v1.1 `read`: dropped with the connection, which fails it.
    Read(oneshot::Sender<Result<u64, Error>>),
}

struct PendingSend {
    room: String,
    body: Value,
    idem: String,
    reply: oneshot::Sender<Result<Ack, Error>>,
    retries: u32,
    /// Set after a retryable error: resent at that time, not at the next connect.
    retry_at: Option<Instant>,
}

/// Server frames, the fields the client reads (`ref` is read separately).
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Frame {
    Message(Message),
    Joined(JoinedFrame),
    Ack {
        room: String,
        seq: u64,
        id: String,
        ts: String,
    },
    Authed {
        exp: Option<u64>,
    },
    Pong,
    Left {
        room: String,
        reason: Option<String>,
    },
    Error {
        code: String,
        #[serde(default)]
        message: String,
    },
    Signal {
        room: String,
        from: String,
        #[serde(default)]
        body: Value,
    },
    Read {
        room: String,
        seq: u64,
    },
    Presence(PresenceFrame),
    /// Unknown frame types are ignored (forward compatibility).
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct JoinedFrame {
    room: String,
    head: u64,
    first: u64,
    #[serde(default)]
    truncated: bool,
    /// v1.1: the user's read cursor.
    #[serde(default)]
    read: u64,
    presence: Option<Vec<String>>,
    presence_count: Option<u64>,
}

/// What the timers asked for.
#[derive(Default)]
pub(crate) struct Due {
    /// No pong in time: the connection is dead.
    pub dead: bool,
    /// Time to fetch a fresh token.
    pub refresh: bool,
}

pub(crate) struct Core {
    pub opts: Arc<Options>,
    /// Events not handed to the application yet, in order; the driver moves them to the
    /// application's channel (and stops reading the socket while a bounded one is full).
    pub events: VecDeque<Event>,
    rooms: HashMap<String, Room>,
    /// v1.1: per room, the largest read cursor seen (joined or not); it never moves back.
    cursors: HashMap<String, u64>,
    /// v1.1: signals written on this connection (ref, room, when), oldest first, to report the
    /// `error` the server may answer one with; forgotten after a while.
    signals: VecDeque<(u64, String, Instant)>,
    /// Unacked sends in submission order (their ids only grow).
    sends: BTreeMap<u64, PendingSend>,
    refs: HashMap<u64, Pending>,
    next_ref: u64,
    next_epoch: u64,
    next_send: u64,
    /// Authenticated on the current connection: frames may be written.
    online: bool,
    /// Frames to write, as JSON text, in order.
    pub outbox: Vec<String>,
    /// Reconnect attempts since the last successful join.
    pub attempt: u32,
    /// Consecutive 1008 closes.
    pub auth_failures: u32,
    join_retries: Vec<(Instant, String, u64)>,
    stats: Stats,
    next_ping: Option<Instant>,
    pong_deadline: Option<Instant>,
    /// Since when the socket is not read because the application's bounded event channel is
    /// full: no pong can arrive meanwhile, so the pong deadline waits too.
    paused_since: Option<Instant>,
    refresh_at: Option<Instant>,
    state: State,
}

impl Core {
    pub fn new(opts: Arc<Options>) -> Core {
        Core {
            opts,
            events: VecDeque::new(),
            rooms: HashMap::new(),
            cursors: HashMap::new(),
            signals: VecDeque::new(),
            sends: BTreeMap::new(),
            refs: HashMap::new(),
            next_ref: 1,
            next_epoch: 1,
            next_send: 1,
            online: false,
            outbox: Vec::new(),
            attempt: 0,
            auth_failures: 0,
            join_retries: Vec::new(),
            stats: Stats::default(),
            next_ping: None,
            pong_deadline: None,
            paused_since: None,
            refresh_at: None,
            state: State::Connecting,
        }
    }

    pub fn emit(&mut self, event: Event) {
        self.events.push_back(event);
    }

    pub fn set_state(&mut self, state: State) {
        if self.state == state && !matches!(state, State::Reconnecting { .. }) {
            return;
        }
        self.state = state.clone();
        self.emit(Event::State(state));
    }

    // ---- commands ------------------------------------------------------------------------------

    pub fn command(&mut self, cmd: Command) -> Flow {
        match cmd {
            Command::Join {
                room,
                since,
                presence,
                reply,
            } => {
                let epoch = self.next_epoch;
                let r = self
                    .rooms
                    .entry(room.clone())
                    .or_insert_with(|| Room::new(epoch));
                if r.epoch == epoch {
                    self.next_epoch += 1;
                }
                if since.is_some() {
                    r.since = since;
                    r.last = None;
                }
                if let Some(presence) = presence {
                    r.presence = presence;
                }
                r.waiters.push(reply);
                if self.online {
                    self.send_join(&room);
                }
            }
            Command::Leave { room, reply } => {
                if let Some(r) = self.rooms.remove(&room) {
                    for w in r.waiters {
                        answer(w, Err(Error::Left(room.clone())));
                    }
                    if self.online {
                        // Done on `left`, or `not_joined` (a join still in flight), or the
                        // connection's end.
                        self.request(
                            json!({"type": "leave", "room": room}),
                            Pending::Leave(reply),
                        );
                        return Flow::Continue;
                    }
                }
                answer(reply, ());
            }
            Command::Send {
                room,
                body,
                idem,
                reply,
            } => {
                let id = self.next_send;
                self.next_send += 1;
                let entry = PendingSend {
                    room,
                    body,
                    idem,
                    reply,
                    retries: 0,
                    retry_at: None,
                };
                self.sends.insert(id, entry);
                if self.online {
                    self.transmit(id);
                }
            }
            Command::LastSeq { room, reply } => {
                answer(reply, self.rooms.get(&room).and_then(|r| r.last));
            }
            Command::PendingSends { reply } => answer(reply, self.sends.len()),
            Command::Stats { reply } => answer(reply, self.stats),
            Command::Ping { reply } => {
                if self.online {
                    self.request(json!({"type": "ping"}), Pending::AppPing(reply));
                } else {
                    answer(reply, Err(Error::Connection("not connected".to_owned())));
                }
            }
            Command::Signal { room, body, reply } => self.signal(room, body, reply),
            Command::Read { room, seq, reply } => self.read(room, seq, reply),
            Command::ReadCursor { room, reply } => {
                answer(reply, self.cursors.get(&room).copied());
            }
            Command::Presence { room, reply } => {
                let present = self.rooms.get(&room).and_then(|r| r.present.as_ref());
                answer(reply, present.map(|p| p.view()));
            }
            Command::Reconnect => {
                self.attempt = 0;
                return Flow::Reconnect;
            }
            Command::Close { done } => return Flow::Close(done),
        }
        Flow::Continue
    }

    // ---- connection lifecycle --------------------------------------------------------------------

    /// The connection is authenticated (`exp`: the token's expiry, if any): rejoin every room
    /// with `since = last`, then resend what is unacked, in submission order.
    pub fn on_authed(&mut self, url: &str, exp: Option<u64>) {
        self.online = true;
        self.auth_failures = 0;
        self.schedule_refresh(exp);
        self.next_ping = self.opts.ping_interval.map(|i| Instant::now() + i);
        self.set_state(State::Open {
            url: url.to_owned(),
        });
        if self.rooms.is_empty() {
            self.attempt = 0;
        }
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        for room in rooms {
            self.send_join(&room);
        }
        let ids: Vec<u64> = self
            .sends
            .iter()
            .filter(|(_, s)| s.retry_at.is_none())
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.transmit(id);
        }
    }

    /// Forgets the current connection; rooms and unacked sends stay for the next one.
    pub fn teardown(&mut self) {
        self.online = false;
        self.outbox.clear();
        for (_, pending) in self.refs.drain() {
            // A leave is complete once the socket is gone; joins and sends are redone.
            if let Pending::Leave(reply) = pending {
                answer(reply, ());
            }
        }
        for r in self.rooms.values_mut() {
            r.rejoining = false;
        }
        self.signals.clear();
        self.join_retries.clear();
        self.next_ping = None;
        self.pong_deadline = None;
        self.paused_since = None;
        self.refresh_at = None;
    }

    /// The driver stops reading the socket: the application has not taken its events yet.
    pub fn pause_reading(&mut self, now: Instant) {
        self.paused_since.get_or_insert(now);
    }

    /// The driver reads again: the pong deadline moves by the time reading was paused.
    pub fn resume_reading(&mut self, now: Instant) {
        if let Some(since) = self.paused_since.take() {
            if let Some(deadline) = &mut self.pong_deadline {
                *deadline += now.saturating_duration_since(since);
            }
        }
    }

    /// Fails every pending request: the client is closed for good.
    pub fn fail(&mut self, err: &Error) {
        for (_, s) in std::mem::take(&mut self.sends) {
            answer(s.reply, Err(err.clone()));
        }
        for (_, r) in self.rooms.drain() {
            for w in r.waiters {
                answer(w, Err(err.clone()));
            }
        }
    }

    /// Sends a refreshed token on the open connection.
    pub fn send_auth(&mut self, token: String) {
        if self.online {
            self.request(json!({"type": "auth", "token": token}), Pending::Auth);
        }
    }

    /// Fetching a fresh token failed: try again in a while (if the token runs out first, the
    /// server closes with 1008 and the reconnect fetches one).
    pub fn refresh_failed(&mut self) {
        if self.online {
            self.refresh_at = Some(Instant::now() + self.opts.retry_delay.base * 4);
        }
    }

    fn schedule_refresh(&mut self, exp: Option<u64>) {
        self.refresh_at = None;
        let (Some(exp), TokenSource::Callback(_)) = (exp, &self.opts.token) else {
            return;
        };
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let lifetime = u128::from(exp).saturating_mul(1000).saturating_sub(now_ms);
        let margin = self.opts.refresh_margin.as_millis();
        // `margin` before exp, or half-way for a token shorter than twice the margin.
        let at = if lifetime > 2 * margin {
            lifetime - margin
        } else {
            lifetime / 2
        };
        // At most a year ahead (a token that far out is as good as one that never expires).
        let at = Duration::from_millis(u64::try_from(at.min(365 * 86_400_000)).unwrap_or(0));
        self.refresh_at = Some(Instant::now() + at);
    }

    // ---- timers --------------------------------------------------------------------------------

    /// The earliest time [`Core::on_timers`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let sends = self.sends.values().filter_map(|s| s.retry_at);
        let joins = self.join_retries.iter().map(|(t, _, _)| *t);
        let pong = self.pong_deadline.filter(|_| self.paused_since.is_none());
        [self.next_ping, pong, self.refresh_at]
            .into_iter()
            .flatten()
            .chain(sends)
            .chain(joins)
            .min()
    }

    pub fn on_timers(&mut self, now: Instant) -> Due {
        let mut due = Due::default();
        if self.paused_since.is_none() && self.pong_deadline.is_some_and(|t| t <= now) {
            due.dead = true;
            return due;
        }
        if let (Some(at), Some(interval)) = (self.next_ping, self.opts.ping_interval) {
            if at <= now {
                self.next_ping = Some(now + interval);
                // One ping at a time: its deadline is not pushed back by the next one.
                if self.pong_deadline.is_none() {
                    self.pong_deadline = Some(now + self.opts.pong_timeout);
                    self.request(json!({"type": "ping"}), Pending::Ping);
                }
            }
        }
        if self.refresh_at.is_some_and(|t| t <= now) {
            self.refresh_at = None;
            due.refresh = true;
        }
        let resend: Vec<u64> = self
            .sends
            .iter()
            .filter(|(_, s)| s.retry_at.is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in resend {
            self.transmit(id);
        }
        let (ready, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.join_retries)
            .into_iter()
            .partition(|(t, _, _)| *t <= now);
        self.join_retries = later;
        for (_, room, epoch) in ready {
            if self.rooms.get(&room).is_some_and(|r| r.epoch == epoch) {
                self.send_join(&room);
            }
        }
        due
    }

    // ---- frames out ------------------------------------------------------------------------------

    fn request(&mut self, mut frame: Value, pending: Pending) {
        let reference = self.next_ref;
        self.next_ref += 1;
        frame["ref"] = json!(reference);
        self.refs.insert(reference, pending);
        self.outbox.push(frame.to_string());
    }

    fn send_join(&mut self, room: &str) {
        let Some(r) = self.rooms.get(room) else {
            return;
        };
        let mut frame = json!({"type": "join", "room": room});
        if let Some(since) = r.join_since() {
            frame["since"] = json!(since);
        }
        if r.presence {
            frame["presence"] = json!(true);
        }
        let pending = Pending::Join {
            room: room.to_owned(),
            epoch: r.epoch,
        };
        self.request(frame, pending);
    }

    fn transmit(&mut self, id: u64) {
        let Some(s) = self.sends.get_mut(&id) else {
            return;
        };
        s.retry_at = None;
        let frame = json!({"type": "send", "room": s.room, "body": s.body, "idem": s.idem});
        self.request(frame, Pending::Send(id));
    }

    // ---- frames in -------------------------------------------------------------------------------

    /// One text frame from the server.
    pub fn on_text(&mut self, text: &str) {
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("seqcast sent a frame that is not JSON: {e}");
                return;
            }
        };
        let reference = value.get("ref").and_then(Value::as_u64);
        let pending = reference.and_then(|r| self.refs.remove(&r));
        let frame = match serde_json::from_value::<Frame>(value) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("seqcast sent a frame this client cannot read: {e}");
                return;
            }
        };
        match frame {
            Frame::Message(m) => self.on_message(m),
            Frame::Joined(joined) => self.on_joined(joined, pending),
            Frame::Ack { room, seq, id, ts } => {
                if let Some(Pending::Send(sid)) = pending {
                    if let Some(s) = self.sends.remove(&sid) {
                        answer(s.reply, Ok(Ack { room, seq, id, ts }));
                    }
                }
            }
            Frame::Authed { exp } => self.schedule_refresh(exp),
            Frame::Pong => match pending {
                Some(Pending::AppPing(reply)) => answer(reply, Ok(())),
                _ => self.pong_deadline = None,
            },
            Frame::Left { room, reason } => match pending {
                Some(Pending::Leave(reply)) => answer(reply, ()),
                _ if reason.as_deref() == Some("forbidden") => {
                    // A refreshed token no longer allows the room.
                    if let Some(r) = self.rooms.remove(&room) {
                        let message = format!("left {room}: the new token does not allow it");
                        let err = Error::Server {
                            code: "forbidden".to_owned(),
                            message,
                        };
                        for w in r.waiters {
                            answer(w, Err(err.clone()));
                        }
                        self.emit(Event::Error(err));
                    }
                }
                _ => {}
            },
            Frame::Error { code, message } => {
                self.on_error_frame(code, message, reference, pending);
            }
            Frame::Signal { room, from, body } => {
                self.emit(Event::Signal(crate::types::Signal { room, from, body }));
            }
            Frame::Read { room, seq } => self.on_read(room, seq, pending),
            Frame::Presence(frame) => self.on_presence(frame),
            Frame::Other => {}
        }
    }

    fn on_message(&mut self, m: Message) {
        let Some(r) = self.rooms.get_mut(&m.room) else {
            return;
        };
        match r.on_message(m.seq) {
            Verdict::Deliver => self.emit(Event::Message(m)),
            Verdict::Drop => {
                if r.joined {
                    self.stats.duplicates += 1;
                }
            }
            Verdict::Rejoin => {
                if !r.rejoining && self.online {
                    self.stats.gaps += 1;
                    r.rejoining = true;
                    self.send_join(&m.room);
                }
            }
        }
    }

    fn on_joined(&mut self, f: JoinedFrame, pending: Option<Pending>) {
        let JoinedFrame {
            room,
            head,
            first,
            truncated,
            read,
            presence,
            presence_count,
        } = f;
        let Some(r) = self.rooms.get_mut(&room) else {
            return; // left meanwhile
        };
        if let Some(Pending::Join { epoch, .. }) = pending {
            if epoch != r.epoch {
                return; // the reply to a join of an earlier subscription
            }
        }
        let was_joined = r.joined;
        let lost_from = r.on_joined(head, first, truncated);
        let waiters = std::mem::take(&mut r.waiters);
        self.attempt = 0;
        if let Some(lost_from) = lost_from {
            self.emit(Event::Truncated {
                room: room.clone(),
                first,
                head,
                lost_from,
            });
        }
        let info = Joined {
            room,
            head,
            first,
            truncated,
            read,
            presence,
            presence_count,
        };
        self.raise_cursor(&info.room, read);
        self.joined_presence(&info);
        for w in waiters {
            answer(w, Ok(info.clone()));
        }
        if was_joined {
            self.emit(Event::Rejoined(info));
        }
    }

    fn on_error(&mut self, code: String, message: String, pending: Option<Pending>) {
        let retryable = RETRYABLE.contains(&code.as_str());
        let err = Error::Server { code, message };
        match pending {
            Some(Pending::Send(id)) => {
                let Some(s) = self.sends.get_mut(&id) else {
                    return;
                };
                if retryable || err.code() == Some("unauthorized") {
                    // Same idem, later; on a reconnect in between it is resent then.
                    let delay = self.opts.retry_delay.base + self.opts.retry_delay.delay(s.retries);
                    s.retries += 1;
                    s.retry_at = Some(Instant::now() + delay);
                } else if let Some(s) = self.sends.remove(&id) {
                    answer(s.reply, Err(err));
                }
            }
            Some(Pending::Join { room, epoch }) => {
                if self.rooms.get(&room).is_none_or(|r| r.epoch != epoch) {
                    return;
                }
                if retryable {
                    let delay = self.opts.retry_delay.delay(1);
                    self.join_retries
                        .push((Instant::now() + delay, room, epoch));
                    return;
                }
                let Some(r) = self.rooms.remove(&room) else {
                    return;
                };
                for w in r.waiters {
                    answer(w, Err(err.clone()));
                }
                if r.joined {
                    self.emit(Event::Error(err)); // a rejoin refused: nobody else awaits it
                }
            }
            Some(Pending::Leave(reply)) => answer(reply, ()),
            Some(Pending::Read(reply)) => answer(reply, Err(err)),
            // A refused refresh leaves the old token in force until it expires; a refused first
            // auth is followed by close 1008. No pending: e.g. unauthorized before a close.
            Some(Pending::AppPing(reply)) => answer(reply, Err(err)),
            Some(Pending::Auth | Pending::Ping) | None => self.emit(Event::Error(err)),
        }
    }
}

/// Answers a request; the caller may have stopped waiting (dropped its future), which is fine.
fn answer<T>(reply: oneshot::Sender<T>, value: T) {
    if reply.send(value).is_err() {
        tracing::trace!("a request's caller stopped waiting");
    }
}
