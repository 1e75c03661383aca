//! One joined room's cursor: the exactly-once, in-order rule of docs/protocol.md ("Receiving").

use tokio::sync::oneshot;

use crate::presence::PresenceState;
use crate::types::{Error, Joined};

/// What to do with an incoming `message`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// `seq == last + 1`: hand it to the application (`last` is now `seq`).
    Deliver,
    /// `seq <= last` (around a rejoin), or the room is not joined yet: drop it.
    Drop,
    /// `seq > last + 1`: do not deliver out of order; rejoin with `since = last`.
    Rejoin,
}

pub(crate) struct Room {
    /// Identifies this subscription: a reply to a join sent for an earlier one (the room was
    /// left and joined again meanwhile) is ignored.
    pub epoch: u64,
    /// The last `seq` delivered; `None` before the first `joined`.
    pub last: Option<u64>,
    /// The `since` the application asked for (`None`: live only).
    pub since: Option<u64>,
    /// A `joined` arrived at least once.
    pub joined: bool,
    /// A rejoin after a gap is in flight: later messages past the gap are dropped until then.
    pub rejoining: bool,
    /// The callers of `join` waiting for the first `joined`.
    pub waiters: Vec<oneshot::Sender<Result<Joined, Error>>>,
    /// v1.1: joined with presence (asked again on every rejoin).
    pub presence: bool,
    /// Who is present, once a `joined` said (kept across a reconnect until the next one).
    pub present: Option<PresenceState>,
}

impl Room {
    pub fn new(epoch: u64) -> Room {
        Room {
            epoch,
            last: None,
            since: None,
            joined: false,
            rejoining: false,
            waiters: Vec::new(),
            presence: false,
            present: None,
        }
    }

    /// The `since` of the next join frame: what we hold, else what was asked for.
    pub fn join_since(&self) -> Option<u64> {
        self.last.or(self.since)
    }

    /// A `joined` for this room. Returns `Some(lost_from)` when it says retention deleted
    /// messages this client had not got (`truncated`): delivery continues at `first`.
    pub fn on_joined(&mut self, head: u64, first: u64, truncated: bool) -> Option<u64> {
        self.joined = true;
        self.rejoining = false;
        // Live only: continue after the head.
        let last = *self.last.get_or_insert(self.since.unwrap_or(head));
        if truncated {
            self.last = Some(first.saturating_sub(1));
            return Some(last + 1);
        }
        None
    }

    /// The verdict on a `message` with `seq`, updating `last` when it is delivered.
    pub fn on_message(&mut self, seq: u64) -> Verdict {
        let Some(last) = self.last.filter(|_| self.joined) else {
            return Verdict::Drop;
        };
        if seq <= last {
            Verdict::Drop
        } else if seq > last + 1 {
            Verdict::Rejoin
        } else {
            self.last = Some(seq);
            Verdict::Deliver
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_join_continues_after_the_head() {
        let mut r = Room::new(1);
        assert_eq!(r.on_message(5), Verdict::Drop, "nothing before joined");
        assert_eq!(r.on_joined(4, 1, false), None);
        assert_eq!(r.on_message(4), Verdict::Drop);
        assert_eq!(r.on_message(5), Verdict::Deliver);
        assert_eq!(r.on_message(5), Verdict::Drop, "a duplicate");
        assert_eq!(r.on_message(7), Verdict::Rejoin, "a gap");
        assert_eq!(r.join_since(), Some(5));
    }

    #[test]
    fn since_is_kept_until_the_first_delivery() {
        let mut r = Room::new(1);
        r.since = Some(2);
        assert_eq!(r.join_since(), Some(2));
        r.on_joined(10, 1, false);
        assert_eq!(r.on_message(3), Verdict::Deliver);
        assert_eq!(r.join_since(), Some(3));
    }

    #[test]
    fn truncated_moves_the_cursor_to_first() {
        let mut r = Room::new(1);
        r.since = Some(2);
        assert_eq!(r.on_joined(50, 20, true), Some(3));
        assert_eq!(r.on_message(19), Verdict::Drop);
        assert_eq!(r.on_message(20), Verdict::Deliver);
    }
}
