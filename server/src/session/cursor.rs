//! A session's position in one room: the rule that makes delivery exactly-once and in order.
//!
//! `sent` is the last seq written to the client. A frame goes out only if it is `sent + 1`.
//! Anything at or below `sent` is a duplicate and is skipped; anything beyond `sent + 1` means
//! the session is behind (it joined with `since`, a frame was dropped because its queue was full,
//! or frames arrived out of order), so `target` is raised and the session reads
//! `(sent, target]` from the database, in pages, before it takes live frames again. Replay, gap
//! repair and slow consumers are all this one mechanism.

/// What to do with a live frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    /// Write it now (it is the next seq).
    Send,
    /// Already sent: drop it.
    Skip,
    /// The session is behind: the frame will be read from the database instead.
    Behind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    sent: u64,
    target: u64,
}

impl Cursor {
    /// A cursor that has sent everything up to `sent` and must catch up to `head`.
    pub fn new(sent: u64, head: u64) -> Cursor {
        Cursor {
            sent,
            target: head.max(sent),
        }
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }

    pub fn target(&self) -> u64 {
        self.target
    }

    /// True while the database has messages this session must send before live ones.
    pub fn behind(&self) -> bool {
        self.target > self.sent
    }

    /// Decides about a live frame and advances the cursor if it is sent.
    pub fn live(&mut self, seq: u64) -> Live {
        if seq <= self.sent {
            Live::Skip
        } else if seq == self.sent + 1 && !self.behind() {
            self.sent = seq;
            self.target = seq;
            Live::Send
        } else {
            self.target = self.target.max(seq);
            Live::Behind
        }
    }

    /// Something at least up to `seq` exists (a lag signal): catch up to it.
    pub fn raise_target(&mut self, seq: u64) {
        self.target = self.target.max(seq);
    }

    /// Records a frame read from the database; false if it was already sent.
    pub fn replayed(&mut self, seq: u64) -> bool {
        if seq <= self.sent {
            return false;
        }
        self.sent = seq;
        true
    }

    /// The database had nothing more in `(sent, target]` (retention deleted it; the session has
    /// told the client with a `joined` carrying `truncated`): stop looking.
    pub fn exhausted(&mut self) {
        self.sent = self.target;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_live_frames_go_straight_out() {
        let mut c = Cursor::new(5, 5);
        assert!(!c.behind());
        assert_eq!(c.live(6), Live::Send);
        assert_eq!(c.live(6), Live::Skip);
        assert_eq!(c.live(4), Live::Skip);
        assert_eq!(c.sent(), 6);
    }

    #[test]
    fn a_gap_switches_to_the_database_until_caught_up() {
        let mut c = Cursor::new(5, 5);
        assert_eq!(c.live(8), Live::Behind);
        assert_eq!((c.sent(), c.target()), (5, 8));
        // 9 arrives live while 6..8 are still being read: it must wait for the database too,
        // or the client would see 9 before 6.
        assert_eq!(c.live(9), Live::Behind);
        for seq in 6..=9 {
            assert!(c.replayed(seq));
        }
        assert!(!c.behind());
        assert_eq!(
            c.live(9),
            Live::Skip,
            "the live copy of a replayed frame is a duplicate"
        );
        assert_eq!(c.live(10), Live::Send);
    }

    #[test]
    fn join_with_since_replays_up_to_the_head() {
        let mut c = Cursor::new(41, 57);
        assert!(c.behind());
        assert_eq!(c.live(58), Live::Behind);
        assert!(!c.replayed(41));
        assert!(c.replayed(42));
        c.raise_target(60);
        assert_eq!(c.target(), 60);
        c.exhausted();
        assert!(!c.behind());
        assert_eq!(c.live(61), Live::Send);
    }
}
