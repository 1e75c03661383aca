//! Tenfold abuse of a connection's rate, which closes the connection.

use std::time::Duration;

use tokio::time::Instant;

/// "Tenfold": a window is abusive when more than this many times the connection's rate of
/// rate-counted frames arrive in it.
pub const ABUSE_FACTOR: u64 = 10;
/// Length of one abuse window.
pub const ABUSE_WINDOW: Duration = Duration::from_secs(1);
/// Consecutive abusive windows that close a connection (1008): ten seconds of abuse.
pub const ABUSE_WINDOWS: u32 = 10;

/// Tenfold abuse of a connection's rate, precisely: time is cut into one-second windows
/// ([`ABUSE_WINDOW`]) starting at the connection's first rate-counted frame (after a window
/// without any such frame, at the next one). A window is *abusive* when more than
/// [`ABUSE_FACTOR`] x `SEQCAST_SEND_RATE` rate-counted frames (accepted and refused together)
/// arrive in it. The connection is closed at the moment [`ABUSE_WINDOWS`] consecutive windows
/// are abusive, i.e. during the tenth, as soon as its count passes the threshold. A window that
/// is not abusive (an empty one included) ends the streak. A client that stops at the first
/// `rate_limited` error, or merely sends at up to ten times its rate, is never closed.
#[derive(Debug)]
pub struct AbuseWatch {
    threshold: u64,
    window_start: Option<Instant>,
    count: u64,
    /// Abusive windows just before the current one.
    streak: u32,
}

impl AbuseWatch {
    pub fn new(rate: u32) -> AbuseWatch {
        AbuseWatch {
            threshold: u64::from(rate) * ABUSE_FACTOR,
            window_start: None,
            count: 0,
            streak: 0,
        }
    }

    /// Records one rate-counted frame at `now`; true when the connection must be closed.
    pub fn record(&mut self, now: Instant) -> bool {
        let start = *self.window_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= ABUSE_WINDOW {
            let adjacent = elapsed < ABUSE_WINDOW * 2;
            let abusive = self.count > self.threshold;
            self.streak = if abusive && adjacent {
                self.streak + 1
            } else {
                0
            };
            // After a gap the streak is over anyway: start a new window here.
            self.window_start = Some(if adjacent { start + ABUSE_WINDOW } else { now });
            self.count = 0;
        }
        self.count += 1;
        self.count > self.threshold && self.streak + 1 >= ABUSE_WINDOWS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn abuse_needs_ten_consecutive_tenfold_windows() {
        let rate = 5; // threshold: more than 50 frames per window
        let t0 = Instant::now();
        let mut watch = AbuseWatch::new(rate);
        let mut closed_at = None;
        'seconds: for second in 0..20u64 {
            for i in 0..60u64 {
                if watch.record(t0 + Duration::from_secs(second) + ms(i * 10)) {
                    closed_at = Some((second, i));
                    break 'seconds;
                }
            }
        }
        // The tenth window (second 9) closes on its 51st frame.
        assert_eq!(closed_at, Some((9, 50)));

        // Exactly tenfold (50 per window) is not past the threshold.
        let mut watch = AbuseWatch::new(rate);
        for second in 0..20u64 {
            for i in 0..50u64 {
                assert!(!watch.record(t0 + Duration::from_secs(second) + ms(i * 10)));
            }
        }

        // A quiet window in between ends the streak.
        let mut watch = AbuseWatch::new(rate);
        for second in (0..9u64).chain(10..19) {
            for i in 0..60u64 {
                assert!(
                    !watch.record(t0 + Duration::from_secs(second) + ms(i * 10)),
                    "closed at second {second}"
                );
            }
        }
    }
}
