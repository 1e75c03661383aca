//! The v1.1 frames of [`Core`]: signals (at most once: written only to an open connection, never
//! queued, never resent), read cursors (the largest seen per room, never moving back) and
//! presence (the set, or the count, per room joined with presence).

use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{answer, Core, Pending};
use crate::presence::{self, PresenceFrame, PresenceState};
use crate::types::{Error, Event, Joined};

/// How long a signal's ref is remembered, to report the `error` the server may answer it with.
const SIGNAL_ERROR_WINDOW: Duration = Duration::from_secs(30);

impl Core {
    /// Writes a signal on the open connection; offline it is dropped (and the caller told).
    pub(super) fn signal(
        &mut self,
        room: String,
        body: Value,
        reply: oneshot::Sender<Result<(), Error>>,
    ) {
        if !self.online {
            answer(reply, Err(Error::Connection("not connected".to_owned())));
            return;
        }
        let now = Instant::now();
        while self
            .signals
            .front()
            .is_some_and(|(_, _, at)| now.duration_since(*at) > SIGNAL_ERROR_WINDOW)
        {
            self.signals.pop_front();
        }
        // Not in `refs`: no reply comes when it is relayed.
        let reference = self.next_ref;
        self.next_ref += 1;
        let frame = json!({"type": "signal", "room": room, "body": body, "ref": reference});
        self.outbox.push(frame.to_string());
        self.signals.push_back((reference, room, now));
        answer(reply, Ok(()));
    }

    /// An `error` frame: a refused signal (reported as an event), else the reply to a request.
    pub(super) fn on_error_frame(
        &mut self,
        code: String,
        message: String,
        reference: Option<u64>,
        pending: Option<Pending>,
    ) {
        let signal = match pending {
            None => self.signal_of(reference),
            Some(_) => None,
        };
        match signal {
            Some(room) => self.emit(Event::Error(Error::SignalRefused {
                room,
                code,
                message,
            })),
            None => self.on_error(code, message, pending),
        }
    }

    /// The room of the signal sent with `reference` on this connection, forgotten from now on.
    fn signal_of(&mut self, reference: Option<u64>) -> Option<String> {
        let reference = reference?;
        // Refs only grow: the deque is sorted.
        let i = self
            .signals
            .binary_search_by_key(&reference, |(r, _, _)| *r)
            .ok()?;
        self.signals.remove(i).map(|(_, room, _)| room)
    }

    pub(super) fn read(
        &mut self,
        room: String,
        seq: u64,
        reply: oneshot::Sender<Result<u64, Error>>,
    ) {
        if self.online {
            let frame = json!({"type": "read", "room": room, "seq": seq});
            self.request(frame, Pending::Read(reply));
        } else {
            answer(reply, Err(Error::Connection("not connected".to_owned())));
        }
    }

    /// Raises the cursor of `room` to `seq` if that is larger; `true` when it moved.
    pub(super) fn raise_cursor(&mut self, room: &str, seq: u64) -> bool {
        match self.cursors.get_mut(room) {
            Some(cur) if *cur >= seq => false,
            Some(cur) => {
                *cur = seq;
                true
            }
            None => {
                self.cursors.insert(room.to_owned(), seq);
                true
            }
        }
    }

    /// A `read` frame: the reply to our `read`, or another connection of the user moving it.
    pub(super) fn on_read(&mut self, room: String, seq: u64, pending: Option<Pending>) {
        let moved = self.raise_cursor(&room, seq);
        match pending {
            Some(Pending::Read(reply)) => answer(reply, Ok(seq)),
            // An older move arriving late is not reported.
            _ if moved => self.emit(Event::Read { room, seq }),
            _ => {}
        }
    }

    /// A `joined` replaces the room's presence: who left or arrived meanwhile is reported.
    pub(super) fn joined_presence(&mut self, joined: &Joined) {
        let Some(r) = self.rooms.get_mut(&joined.room) else {
            return;
        };
        if !r.presence {
            return;
        }
        let list = joined.presence.as_deref();
        let Some(next) = PresenceState::from_joined(list, joined.presence_count) else {
            return; // a server without presence
        };
        let change = presence::replace(&joined.room, r.present.as_ref(), &next);
        r.present = Some(next);
        if let Some(change) = change {
            self.emit(Event::Presence(change));
        }
    }

    pub(super) fn on_presence(&mut self, frame: PresenceFrame) {
        let room = frame.room.clone();
        let Some(state) = self
            .rooms
            .get_mut(&room)
            .filter(|r| r.presence)
            .and_then(|r| r.present.as_mut())
        else {
            return; // not asked, or before its joined
        };
        if let Some(change) = presence::apply(&room, state, frame) {
            self.emit(Event::Presence(change));
        }
    }
}
