//! Checking what one subscriber received in one room against the protocol's guarantee: every
//! seq after the join point exactly once, in order.
//!
//! A [`SeqTracker`] starts at the join point `base` (the `since` of the join, or the `joined`
//! head for a live-only join) and keeps a bitset of the seqs seen after it, so that a message
//! arriving late is told apart from a lost one. At the end of a run, [`SeqTracker::lost`] counts
//! the holes up to the room's final head.

/// Seqs received by one subscriber in one room.
#[derive(Debug, Clone)]
pub struct SeqTracker {
    /// Seqs at or below it are not expected (they came before the join point).
    base: u64,
    /// Bit `i` = seq `base + 1 + i` was received.
    seen: Vec<u64>,
    /// Highest seq received.
    max_seen: u64,
    /// Every seq in `base + 1 ..= contiguous` was received.
    contiguous: u64,
    /// Distinct seqs received.
    pub received: u64,
    /// Seqs received a second time, and seqs at or below `base` (already held by the client).
    pub duplicates: u64,
    /// Seqs received after a higher one.
    pub out_of_order: u64,
}

/// Seqs this far past the join point are not tracked (the bitset would take 128 MiB): they count
/// as out of order. No scenario comes near it.
const MAX_SPAN: u64 = 1 << 30;

impl SeqTracker {
    pub fn new(base: u64) -> SeqTracker {
        SeqTracker {
            base,
            seen: Vec::new(),
            max_seen: base,
            contiguous: base,
            received: 0,
            duplicates: 0,
            out_of_order: 0,
        }
    }

    /// Records one delivered seq.
    pub fn record(&mut self, seq: u64) {
        if seq <= self.base {
            self.duplicates += 1;
            return;
        }
        let index = seq - self.base - 1;
        if index >= MAX_SPAN {
            self.out_of_order += 1;
            return;
        }
        let (word, bit) = (to_usize(index / 64), 1u64 << (index % 64));
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
            return;
        }
        self.seen[word] |= bit;
        self.received += 1;
        if seq < self.max_seen {
            self.out_of_order += 1;
        }
        self.max_seen = self.max_seen.max(seq);
        while self.has(self.contiguous + 1) {
            self.contiguous += 1;
        }
    }

    /// Every seq from the join point up to `head` has been received.
    pub fn complete(&self, head: u64) -> bool {
        self.contiguous >= head
    }

    /// Seqs in `base + 1 ..= head` never received.
    pub fn lost(&self, head: u64) -> u64 {
        if head <= self.contiguous {
            return 0;
        }
        let missing_after_contiguous = (self.contiguous + 1..=head.min(self.base + MAX_SPAN))
            .filter(|&seq| !self.has(seq))
            .count();
        u64::try_from(missing_after_contiguous).unwrap_or(u64::MAX)
            + head.saturating_sub(self.base + MAX_SPAN)
    }

    /// Distinct seqs received above `head` (the room's final head): messages nobody committed.
    pub fn beyond(&self, head: u64) -> u64 {
        if self.max_seen <= head {
            return 0;
        }
        let count = (head.max(self.base) + 1..=self.max_seen)
            .filter(|&seq| self.has(seq))
            .count();
        u64::try_from(count).unwrap_or(u64::MAX)
    }

    fn has(&self, seq: u64) -> bool {
        if seq <= self.base || seq - self.base > MAX_SPAN {
            return false;
        }
        let index = seq - self.base - 1;
        self.seen
            .get(to_usize(index / 64))
            .is_some_and(|word| word & (1u64 << (index % 64)) != 0)
    }
}

fn to_usize(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(base: u64, seqs: &[u64]) -> SeqTracker {
        let mut tracker = SeqTracker::new(base);
        for &seq in seqs {
            tracker.record(seq);
        }
        tracker
    }

    #[test]
    fn in_order_stream_is_clean() {
        let t = tracker(0, &(1..=200).collect::<Vec<_>>());
        assert_eq!(t.received, 200);
        assert_eq!((t.duplicates, t.out_of_order, t.lost(200)), (0, 0, 0));
        assert!(t.complete(200));
        assert!(!t.complete(201));
        assert_eq!(
            t.lost(203),
            3,
            "the three after the last received are missing"
        );
    }

    #[test]
    fn holes_are_lost_only_until_filled() {
        let t = tracker(0, &[1, 2, 5, 6, 9]);
        assert!(t.complete(2) && !t.complete(3));
        assert_eq!(t.lost(9), 4, "3, 4, 7, 8");
        assert_eq!(t.lost(10), 5);
        assert_eq!(t.out_of_order, 0);
        assert!(!t.complete(9));
    }

    #[test]
    fn late_messages_are_out_of_order_not_lost() {
        let t = tracker(0, &[1, 3, 2, 4, 6, 5]);
        assert_eq!(t.out_of_order, 2);
        assert_eq!(t.lost(6), 0);
        assert_eq!(t.duplicates, 0);
        assert!(t.complete(6));
    }

    #[test]
    fn duplicates_are_counted_once_each() {
        let t = tracker(0, &[1, 2, 2, 3, 1, 3, 3]);
        assert_eq!(t.received, 3);
        assert_eq!(t.duplicates, 4);
        assert_eq!(t.out_of_order, 0, "a duplicate is not also out of order");
        assert_eq!(t.lost(3), 0);
    }

    #[test]
    fn join_point_is_respected() {
        // Joined at head 100 without `since`: 101 is the first expected seq.
        let t = tracker(100, &[100, 101, 102, 104]);
        assert_eq!(t.duplicates, 1, "seq 100 was before the join point");
        assert_eq!(t.lost(104), 1);
        assert_eq!(t.lost(100), 0);
        assert!(t.complete(100));
    }

    #[test]
    fn seqs_beyond_the_final_head_are_reported() {
        let t = tracker(0, &[1, 2, 3, 7]);
        assert_eq!(t.beyond(3), 1);
        assert_eq!(t.beyond(7), 0);
        assert_eq!(t.lost(3), 0);
    }

    #[test]
    fn bitset_spans_word_boundaries() {
        let mut seqs: Vec<u64> = (1..=1000).filter(|s| s % 64 != 0).collect();
        seqs.reverse();
        let t = tracker(0, &seqs);
        assert_eq!(t.lost(1000), 15, "64, 128, ..., 960");
        assert_eq!(
            t.out_of_order, 984,
            "every seq after the first arrived after a higher one"
        );
    }
}
