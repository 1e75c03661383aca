//! The token bucket of every rate limit.

use std::time::Duration;

use tokio::time::Instant;

use super::BURST_FACTOR;

/// A token bucket: refills at `rate` tokens per second, holds at most [`BURST_FACTOR`] x `rate`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket, or `None` for rate 0 (no limit).
    pub fn new(rate: u32, now: Instant) -> Option<TokenBucket> {
        (rate > 0).then(|| {
            let per_sec = f64::from(rate);
            let burst = per_sec * f64::from(BURST_FACTOR);
            TokenBucket {
                per_sec,
                burst,
                tokens: burst,
                updated: now,
            }
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.updated = self.updated.max(now);
    }

    /// Whether a token is there to take at `now`.
    pub fn has_token(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    /// Takes one token, or says how long until there is one.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn bucket_bursts_then_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0).unwrap();
        for _ in 0..40 {
            assert!(b.try_take(t0).is_ok(), "the burst is 4x the rate");
        }
        let wait = b.try_take(t0).unwrap_err();
        assert!(wait > ms(99) && wait <= ms(100), "{wait:?}");
        assert!(b.try_take(t0 + ms(100)).is_ok(), "one token per 100 ms");
        assert!(b.try_take(t0 + ms(150)).is_err());
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| b.try_take(later).is_ok()).count(), 40);
        assert!(TokenBucket::new(0, t0).is_none(), "rate 0 = off");
    }
}
