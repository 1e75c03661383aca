//! The write half of a session: the only code that writes to the client's socket.
//!
//! Live frames arrive in the session's bounded [`Mailbox`] from the hub. Each joined room has a
//! [`Cursor`]; frames that are the next seq go out, the rest turn into database reads (catch-up),
//! done a page at a time between other work so replies and shutdown stay responsive during a long
//! replay.
//!
//! Slow-client policy: the socket must accept bytes at least once every `SEQCAST_WRITE_TIMEOUT`
//! while a write is pending (the listener's [`WriteProgress`] records when it last did). A client
//! that reads slowly keeps up with its own pace (it falls behind the live stream and is fed from
//! the database); one that accepts no bytes for the whole timeout is closed with 4008.
//!
//! It also pings the client every `SEQCAST_PING_INTERVAL` and closes the connection (1008) when
//! its token expires; an `auth` refresh moves that deadline and leaves the rooms the new token
//! does not allow.

use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::Bytes;
use futures_util::stream::SplitSink;
use futures_util::{Sink, SinkExt};
use tokio::time::{Instant, Sleep};

use super::control::{self, ControlQueue};
use super::cursor::{self, Cursor};
use super::rooms::Rooms;
use super::{close, store_error_frame, Control, JoinRequest, LeaveRequest};
use crate::app::AppState;
use crate::auth::Identity;
use crate::hub::{Delivery, Live, Mailbox, Notice, SessionId};
use crate::listener::WriteProgress;
use crate::metrics as m;
use crate::reads::ReadPermit;
use seqcast_protocol::{self as protocol, ErrorCode, Ref};

/// Messages read from the database per catch-up step.
const CATCH_UP_PAGE: usize = 500;
/// Frames (live messages, or queued replies) written per socket flush.
const WRITE_BATCH: usize = 64;
/// Pause before retrying a catch-up read that failed (database unreachable).
const CATCH_UP_RETRY: Duration = Duration::from_millis(500);

/// Why the session ends.
enum Stop {
    /// The inbound half ended (the client closed or went away).
    ClientGone,
    /// A write failed: the connection is broken.
    Broken,
    /// The client accepted no bytes for the write timeout.
    Slow,
    /// The node is draining.
    Draining,
    /// The token expired.
    Expired,
    /// Close with this code (requested by the inbound half).
    Close(u16, &'static str),
}

pub(super) struct Outbound<'a> {
    state: &'a AppState,
    id: SessionId,
    /// When the connection's token (plus leeway) expires; moved by a refresh.
    expires_at: Instant,
    /// When the next keep-alive ping is due; `None` when pings are off.
    next_ping: Option<Instant>,
    /// One timer for the three deadlines (expiry, ping, catch-up retry), armed for the earliest:
    /// a timer is over 100 bytes, held by every idle connection, and one made in the loop was
    /// made again for every live delivery.
    timer: Pin<Box<Sleep>>,
    sink: SplitSink<WebSocket, Message>,
    /// When the socket last accepted bytes: the write timeout counts from there.
    progress: WriteProgress,
    /// Live frames from the hub; shared with every room entry of this session.
    mailbox: Arc<Mailbox>,
    rooms: Rooms,
    /// Mirrors whether this session counts in the `sessions_catching_up` gauge.
    counted_catching_up: bool,
    /// Set after a failed catch-up read: no new read before then.
    retry_at: Option<Instant>,
    /// Counts catch-up pages: which of the rooms that are behind reads next (round robin).
    catch_up_turn: usize,
    /// The user whose read slots (`reads`) this session's database reads take; `None` for the
    /// server key.
    reader: Option<String>,
}

impl<'a> Outbound<'a> {
    pub(super) fn new(
        state: &'a AppState,
        id: SessionId,
        exp: Option<u64>,
        reader: Option<String>,
        sink: SplitSink<WebSocket, Message>,
        progress: WriteProgress,
        mailbox: Arc<Mailbox>,
    ) -> Self {
        // Deregistered on drop.
        state.hub.register(id, Arc::clone(&mailbox));
        // Where the user's read cursors reach this connection (the server key has none).
        if let Some(user) = &reader {
            state.hub.register_user(user, id, Arc::clone(&mailbox));
        }
        Outbound {
            state,
            id,
            expires_at: expiry_deadline(state, exp),
            next_ping: first_ping(state.config.ping_interval),
            timer: Box::pin(tokio::time::sleep(NEVER)),
            sink,
            progress,
            mailbox,
            rooms: Rooms::default(),
            counted_catching_up: false,
            retry_at: None,
            catch_up_turn: 0,
            reader,
        }
    }

    /// Not an `async fn`: one would move `self` into a local and keep both copies for the
    /// session's life; the `async move` block uses the captured `self` in place.
    pub(super) fn run<'c>(
        mut self,
        control: &'c ControlQueue,
    ) -> impl std::future::Future<Output = ()> + Send + 'c
    where
        'a: 'c,
    {
        async move {
            let mailbox = Arc::clone(&self.mailbox);
            self.rearm();
            let stop = loop {
                let catch_up = self.retry_at.is_none() && self.rooms.values().any(Cursor::behind);
                let step = tokio::select! {
                    biased;
                    // Before the live stream, which a busy room keeps ready. Boxed: rare, and
                    // it may handle queued commands (a join's future among them).
                    _ = &mut self.timer => Box::pin(self.timer_fired(control)).await,
                    cmd = control.recv() => match cmd {
                        Some(cmd) => self.controls(cmd, control).await,
                        None => Err(Stop::ClientGone),
                    },
                    delivery = mailbox.recv() => self.deliveries(delivery).await,
                    // Boxed, as every rare state here: inline, the largest state of this loop is room
                    // every idle session's task keeps (see `session::run`).
                    _ = std::future::ready(()), if catch_up => Box::pin(self.catch_up()).await,
                };
                self.update_catching_up_gauge();
                if let Err(stop) = step {
                    break stop;
                }
            };
            Box::pin(self.finish(stop)).await;
        }
    }

    /// Handles `first` and whatever else the inbound half has queued, up to a batch: replies
    /// that are waiting go out in one flush. A client that pipelines (or floods) gets one socket
    /// write per batch instead of one per reply; the syscall per reply was most of the node's CPU
    /// under a garbage-frame flood.
    async fn controls(&mut self, first: Control, queue: &ControlQueue) -> Result<(), Stop> {
        let mut replies = Vec::new();
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                Control::Reply(frame) => {
                    replies.push(Message::Text(frame.into()));
                    if replies.len() < WRITE_BATCH {
                        next = queue.try_recv();
                    }
                }
                // Anything else keeps its place in the order: the replies before it go first.
                other => {
                    if !replies.is_empty() {
                        self.write(std::mem::take(&mut replies)).await?;
                    }
                    // Boxed: replies are the common case; the rest is rare and larger.
                    return Box::pin(self.control(other)).await;
                }
            }
        }
        self.write(replies).await
    }

    async fn control(&mut self, cmd: Control) -> Result<(), Stop> {
        match cmd {
            Control::Join(join) => {
                // Boxed: a join is rare, and its future (a store read, then a write) would
                // otherwise make every idle session's task larger by its size.
                Box::pin(self.join(*join)).await
            }
            Control::Leave(leave) => {
                let LeaveRequest { room, reply_ref } = *leave;
                let frame = if self.leave(&room) {
                    protocol::left_frame(&room, reply_ref.as_ref())
                } else {
                    protocol::error_frame(
                        ErrorCode::NotJoined,
                        &format!("not joined to room {room:?}"),
                        reply_ref.as_ref(),
                    )
                };
                self.write(vec![Message::Text(frame.into())]).await
            }
            Control::Authed(authed) => {
                let (identity, reply_ref) = *authed;
                Box::pin(self.reauthenticated(&identity, reply_ref)).await
            }
            Control::Reply(frame) => self.write(vec![Message::Text(frame.into())]).await,
            Control::Close(code, reason) => Err(Stop::Close(code, reason)),
        }
    }

    /// Subscribe first, then read the head: a message committed in between is both in the
    /// queue and at or below the head, and the cursor sends it exactly once either way.
    async fn join(&mut self, join: JoinRequest) -> Result<(), Stop> {
        let JoinRequest {
            room,
            since,
            presence,
            reply_ref: r,
        } = join;
        // The hub's name for the room, shared: a copy per session was 48 bytes of every
        // joined connection.
        let joined = self.rooms.key(&room).cloned();
        let rejoin = joined.is_some();
        let limit = self.state.config.max_rooms_per_connection;
        if !rejoin && limit > 0 && self.rooms.len() >= limit {
            let frame = protocol::error_frame(
                ErrorCode::LimitExceeded,
                &format!("a connection may be joined to at most {limit} rooms; leave one first"),
                r.as_ref(),
            );
            return self.write(vec![Message::Text(frame.into())]).await;
        }
        let room: Arc<str> = match joined {
            Some(joined) => joined,
            None => {
                let mailbox = Arc::clone(&self.mailbox);
                let room = self.state.hub.subscribe(&room, self.id, mailbox).0;
                // Present from here on (a user is present while joined).
                if let Some(user) = &self.reader {
                    self.state.presence.enter(&room, user);
                }
                room
            }
        };
        let slot = self.read_slot().await;
        // With the user's read cursor (the server key has none: 0).
        let info = match &self.reader {
            Some(user) => self.state.store.room_info_with_read(&room, user).await,
            None => self
                .state
                .store
                .room_info(&room)
                .await
                .map(|info| (info, 0)),
        };
        drop(slot);
        // Watching presence (or, on a rejoin without it, no longer): from the same moment as
        // the subscription, so no change falls between the snapshot and the frames after it.
        let present = if presence {
            let mailbox = Arc::clone(&self.mailbox);
            Some(self.state.presence.watch(&room, self.id, mailbox).await)
        } else {
            self.state.presence.unwatch(&room, self.id);
            None
        };
        let (info, read, present) = match (info, present.transpose()) {
            (Ok((info, read)), Ok(present)) => (info, read, present),
            (Err(e), _) | (_, Err(e)) => {
                self.state.presence.unwatch(&room, self.id);
                if !rejoin {
                    self.state.hub.unsubscribe(&room, self.id);
                    if let Some(user) = &self.reader {
                        self.state.presence.exit(&room, user);
                    }
                }
                let frame = store_error_frame(&e, r.as_ref());
                return self.write(vec![Message::Text(frame.into())]).await;
            }
        };
        let (sent, truncated) = match since {
            None => (info.head, false),
            // The client's state is not from this database: live from here on.
            Some(since) if since > info.head => (info.head, false),
            // Retention deleted part of what was asked for: replay what is left.
            Some(since) if since.saturating_add(1) < info.first => (info.first - 1, true),
            Some(since) => (since, false),
        };
        // Every joiner seeds (or learns) the room's order, and catches up to what it already
        // counts as handed on.
        let target = self.state.hub.init_head(&room, info.head);
        self.rooms
            .insert(Arc::clone(&room), Cursor::new(sent, target));
        if !rejoin {
            metrics::gauge!(m::SESSIONS_JOINED).increment(1.0);
        }
        let frame = protocol::joined_frame_with(
            &room,
            &protocol::Joined {
                head: info.head,
                first: info.first,
                truncated,
                read: Some(read),
                presence: present.as_ref(),
            },
            r.as_ref(),
        );
        self.write(vec![Message::Text(frame.into())]).await
    }

    /// The timer fired: the token expired, a ping is due, or a failed catch-up read may be
    /// retried (any of them).
    async fn timer_fired(&mut self, control: &ControlQueue) -> Result<(), Stop> {
        let now = Instant::now();
        if self.retry_at.is_some_and(|at| at <= now) {
            self.retry_at = None;
        }
        if now >= self.expires_at {
            self.expired(control).await?;
        }
        // `next_ping` is set only when pings are on (see `first_ping`).
        if self.next_ping.is_some_and(|due| due <= now) {
            // From now, not from when it was due: a session stuck writing for a while sends one
            // ping afterwards, not a burst.
            self.next_ping = Some(now + self.state.config.ping_interval);
            self.write(vec![Message::Ping(Bytes::new())]).await?;
        }
        self.rearm();
        Ok(())
    }

    /// Arms the timer for the earliest of the expiry, the next ping and the catch-up retry.
    fn rearm(&mut self) {
        let at = [self.next_ping, self.retry_at]
            .into_iter()
            .flatten()
            .fold(self.expires_at, Instant::min);
        self.timer.as_mut().reset(at);
    }

    /// The token's deadline passed. A refresh the inbound half accepted before that may still
    /// be queued behind a write that blocked (or beside the timer, in this `select!`): what is
    /// queued arrived before now, so it is handled first, in order; the session expires only if
    /// the deadline still stands after it.
    async fn expired(&mut self, control: &ControlQueue) -> Result<(), Stop> {
        // At most a queue's worth: while a write waits, the inbound half may queue more, and a
        // client must not keep an expired connection open by sending pings.
        for _ in 0..control::CAPACITY {
            let Some(cmd) = control.try_recv() else {
                break;
            };
            self.control(cmd).await?;
        }
        if Instant::now() >= self.expires_at {
            Err(Stop::Expired)
        } else {
            Ok(())
        }
    }

    /// Unsubscribes from `room`; false if the session was not joined to it.
    fn leave(&mut self, room: &str) -> bool {
        if self.rooms.remove(room).is_none() {
            return false;
        }
        self.state.hub.unsubscribe(room, self.id);
        self.state.presence.unwatch(room, self.id);
        if let Some(user) = &self.reader {
            self.state.presence.exit(room, user);
        }
        metrics::gauge!(m::SESSIONS_JOINED).decrement(1.0);
        true
    }

    /// A refreshed token is in force: rooms it no longer allows are left (each with a `left`
    /// frame carrying `"reason":"forbidden"`), the expiry moves to its `exp`, then `authed`.
    async fn reauthenticated(&mut self, identity: &Identity, r: Option<Ref>) -> Result<(), Stop> {
        let revoked: Vec<Arc<str>> = self
            .rooms
            .keys()
            .filter(|room| !identity.can_read(room))
            .cloned()
            .collect();
        let mut frames = Vec::with_capacity(revoked.len() + 1);
        for room in revoked {
            self.leave(&room);
            frames.push(Message::Text(
                protocol::left_reason_frame(&room, "forbidden").into(),
            ));
        }
        self.expires_at = expiry_deadline(self.state, identity.exp);
        self.rearm();
        frames.push(Message::Text(
            protocol::authed_frame(identity.exp, r.as_ref()).into(),
        ));
        self.write(frames).await
    }

    /// Handles `first` and whatever else the mailbox holds, up to a batch: the frames that are
    /// next for their room go out in one flush; a lag makes every room catch up to the hub.
    async fn deliveries(&mut self, first: Delivery) -> Result<(), Stop> {
        let mut frames = Vec::new();
        let mut notices = 0;
        let mut next = Some(first);
        while let Some(delivery) = next.take() {
            match delivery {
                Delivery::Live(item) => self.live(&item, &mut frames),
                Delivery::Notice(notice) => {
                    if self.wants(&notice) {
                        frames.push(Message::Text(notice.frame.clone()));
                        notices += 1;
                    }
                }
                Delivery::Lagged => self.lagged(),
                // Whatever is queued is not written: the client rejoins with `since`.
                Delivery::Closing => return Err(Stop::Draining),
            }
            if frames.len() < WRITE_BATCH {
                next = self.mailbox.try_recv();
            }
        }
        let n = (frames.len() - notices) as u64;
        self.write(frames).await?;
        m::messages_delivered().increment(n);
        Ok(())
    }

    /// Whether `notice` is for this session: a signal only while its room is joined (it may
    /// have been queued before a `leave`); a read cursor always. (The hub already skipped the
    /// session it came from.)
    fn wants(&self, notice: &Notice) -> bool {
        notice.except != Some(self.id)
            && notice
                .room
                .as_ref()
                .is_none_or(|room| self.rooms.key(room).is_some())
    }

    /// Adds `item` to `frames` if it is its room's next seq; the cursor turns anything else into
    /// a catch-up (or drops it as already sent).
    fn live(&mut self, item: &Live, frames: &mut Vec<Message>) {
        if let Some(cursor) = self.rooms.get_mut(&item.room) {
            if cursor.live(item.seq) == cursor::Live::Send {
                frames.push(Message::Text(item.frame.clone()));
            }
        }
    }

    /// The hub dropped frames for this session: catch up to what it has published since.
    fn lagged(&mut self) {
        for (room, cursor) in self.rooms.iter_mut() {
            cursor.raise_target(self.state.hub.head(room));
        }
    }

    /// One of the user's read slots, waiting for it: a session's reads wait their turn behind
    /// the same user's other reads (see `reads`).
    async fn read_slot(&self) -> Option<ReadPermit> {
        match &self.reader {
            Some(user) => Some(self.state.user_reads.acquire(user).await),
            None => None,
        }
    }

    /// Reads one page of missed messages for one room that is behind, and writes it.
    ///
    /// The rooms that are behind take turns, a page each: served first-behind in the map's
    /// order, a room thousands of messages behind kept the session's quiet rooms waiting until
    /// it was through. (The map's order is stable while no room is joined or left, and a change
    /// of it only moves whose turn it is.)
    async fn catch_up(&mut self) -> Result<(), Stop> {
        let behind = self.rooms.values().filter(|c| c.behind()).count();
        if behind == 0 {
            return Ok(());
        }
        let turn = self.catch_up_turn % behind;
        self.catch_up_turn = self.catch_up_turn.wrapping_add(1);
        let Some((room, after, upto)) = self
            .rooms
            .iter()
            .filter(|(_, c)| c.behind())
            .nth(turn)
            .map(|(room, c)| (Arc::clone(room), c.sent(), c.target()))
        else {
            return Ok(());
        };
        let slot = self.read_slot().await;
        let page = self
            .state
            .store
            .read_after(&room, after, Some(upto), CATCH_UP_PAGE)
            .await;
        drop(slot);
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(session = self.id, room = %room, error = %e, "catch-up read failed; retrying");
                self.retry_at = Some(Instant::now() + CATCH_UP_RETRY);
                self.rearm();
                return Ok(());
            }
        };
        // The room may have been left while reading; the cursor then no longer exists.
        let Some(cursor) = self.rooms.get_mut(&room) else {
            return Ok(());
        };
        let full_page = page.len() == CATCH_UP_PAGE;
        // Retention deletes a room's oldest messages: if it deleted the next ones while this
        // session was behind, what is left starts past `after + 1` (or nothing is left up to the
        // target). The client is told as a join with `since` tells it: a fresh `joined` with
        // `truncated` and the `first` seq still stored, then the messages from there on.
        let first_stored = page.first().map_or(upto + 1, |msg| msg.seq);
        let truncated = first_stored > cursor.sent() + 1;
        let mut frames = Vec::with_capacity(page.len() + 1);
        if truncated {
            let joined = protocol::joined_frame(&room, upto, first_stored, true, None, None);
            frames.push(Message::Text(joined.into()));
        }
        frames.extend(
            page.iter()
                .filter(|msg| cursor.replayed(msg.seq))
                .map(|msg| Message::Text(protocol::message_frame(msg).into())),
        );
        if !full_page {
            // Everything stored up to the target was read; the rest was deleted by retention.
            cursor.exhausted();
        }
        let n = (frames.len() - usize::from(truncated)) as u64;
        self.write(frames).await?;
        m::messages_delivered().increment(n);
        Ok(())
    }

    /// Feeds frames to the socket and flushes them. The client is a slow consumer when its socket
    /// accepts no bytes for the write timeout, counted from the later of this call and the last
    /// bytes it accepted: a client that reads slowly but keeps reading is never cut off, however
    /// long a large batch takes to go out.
    async fn write(&mut self, frames: Vec<Message>) -> Result<(), Stop> {
        // Before writing: a write can block for the whole timeout, and the gauge should show
        // a session that fell behind while it is stuck there.
        self.update_catching_up_gauge();
        let limit = self.state.config.write_timeout;
        let start = Instant::now();
        let sink = &mut self.sink;
        let mut frames = frames.into_iter();
        // Feeds, then flushes, as one step polled by hand: a `feed` and a `flush` future each
        // took room of their own in the session's task.
        let step = std::future::poll_fn(|cx| {
            while !frames.as_slice().is_empty() {
                std::task::ready!(Pin::new(&mut *sink).poll_ready(cx))?;
                if let Some(frame) = frames.next() {
                    Pin::new(&mut *sink).start_send(frame)?;
                }
            }
            Pin::new(&mut *sink).poll_flush(cx)
        });
        progressing(limit, start, &self.progress, step).await
    }

    fn update_catching_up_gauge(&mut self) {
        let behind = self.rooms.values().any(Cursor::behind);
        if behind != self.counted_catching_up {
            self.counted_catching_up = behind;
            let delta = if behind { 1.0 } else { -1.0 };
            metrics::gauge!(m::SESSIONS_CATCHING_UP).increment(delta);
        }
    }

    async fn finish(&mut self, stop: Stop) {
        let (code, reason) = match stop {
            Stop::ClientGone | Stop::Broken => {
                // Flush any close reply tungstenite queued; the peer may already be gone.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.sink.close()).await;
                return;
            }
            Stop::Slow => {
                metrics::counter!(m::SESSIONS_CLOSED_SLOW).increment(1);
                tracing::info!(session = self.id, "closing slow consumer");
                (
                    close::SLOW_CONSUMER,
                    "slow consumer: reconnect and join with since",
                )
            }
            Stop::Draining => (close::RESTARTING, "server restarting"),
            Stop::Expired => {
                let frame = protocol::error_frame(ErrorCode::Unauthorized, "token expired", None);
                if self.write(vec![Message::Text(frame.into())]).await.is_err() {
                    return;
                }
                (close::POLICY, "token expired")
            }
            Stop::Close(code, reason) => (code, reason),
        };
        // The close frame queues behind whatever the socket still holds, so a slow client gets
        // one more write timeout to read its way to it.
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        let limit = self.state.config.write_timeout;
        if tokio::time::timeout(limit, self.sink.send(frame))
            .await
            .is_err()
        {
            tracing::debug!(session = self.id, code, "close frame not accepted in time");
        }
    }
}

impl Drop for Outbound<'_> {
    fn drop(&mut self) {
        self.state.hub.deregister(self.id);
        if let Some(user) = &self.reader {
            self.state.hub.deregister_user(user, self.id);
        }
        for room in self.rooms.keys() {
            self.state.hub.unsubscribe(room, self.id);
            self.state.presence.unwatch(room, self.id);
            if let Some(user) = &self.reader {
                self.state.presence.exit(room, user);
            }
        }
        metrics::gauge!(m::SESSIONS_JOINED).decrement(self.rooms.len() as f64);
        if self.counted_catching_up {
            metrics::gauge!(m::SESSIONS_CATCHING_UP).decrement(1.0);
        }
    }
}

/// What tokio itself uses for "never": about 30 years.
const NEVER: Duration = Duration::from_secs(86400 * 365 * 30);

/// When the identity's token stops being accepted; far away for identities that do not expire.
/// A token's `exp` can be anything up to 2^64 - 1 seconds, which no `Instant` can hold: anything
/// past [`NEVER`] is never.
fn expiry_deadline(state: &AppState, exp: Option<u64>) -> Instant {
    let left = exp.map_or(NEVER, |exp| state.auth.time_left(exp).min(NEVER));
    Instant::now() + left
}

/// When the first keep-alive ping is due (`SEQCAST_PING_INTERVAL` after the connection opens);
/// `None` when pings are off.
fn first_ping(period: Duration) -> Option<Instant> {
    (!period.is_zero()).then(|| Instant::now() + period)
}

/// Awaits one socket write step (a feed or a flush) until it completes: [`Stop::Slow`] once the
/// socket has accepted no bytes for `limit`, counted from `start` or the last bytes accepted,
/// whichever is later; [`Stop::Broken`] if it fails.
async fn progressing<E>(
    limit: Duration,
    start: Instant,
    progress: &WriteProgress,
    step: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), Stop> {
    let mut step = std::pin::pin!(step);
    // Most steps complete at once (the socket takes the bytes) and need no timer. The timer
    // (a `Sleep`, over 100 bytes) is boxed: inline, it would take room in every session's task
    // for the connection's whole life (see `session::run`).
    if let Poll::Ready(done) = futures_util::poll!(step.as_mut()) {
        return done.map_err(|_| Stop::Broken);
    }
    Box::pin(async move {
        loop {
            let since = progress.last().map_or(start, |last| last.max(start));
            match tokio::time::timeout_at(since + limit, step.as_mut()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(_)) => return Err(Stop::Broken),
                // Bytes went out meanwhile: the deadline moves with them.
                Err(_) if progress.last().is_some_and(|last| last > since) => {}
                Err(_) => return Err(Stop::Slow),
            }
        }
    })
    .await
}
