//! The node-wide allowance for frames of over-rate connections (`SEQCAST_EXCESS_FRAME_RATE`).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// The node-wide allowance for *excess* frames: those read from a connection that is over its
/// own `SEQCAST_SEND_RATE` (its bucket is empty, so the frame will be refused or is free
/// anyway). Each costs a permit of one node-wide semaphore that a ticker refills at
/// `SEQCAST_EXCESS_FRAME_RATE` per second (holding at most a tenth of a second of it); until it
/// gets one, the connection is not read (the kernel's buffers fill and TCP slows the sender
/// down).
///
/// Why: answering a refused frame costs the node about as much as serving a good one (read,
/// parse, error frame, write), and a few hundred connections flooding at once could otherwise
/// take all of the node's CPU from the clients within their rate. With the allowance the node
/// spends a bounded share on floods, whatever their size; one abuser alone still gets far more
/// than ten times its rate, so the tenfold-abuse close ([`AbuseWatch`]) still finds it. The
/// semaphore queues its waiters in order, so each permit wakes one connection, not all of them.
#[derive(Clone)]
pub struct ExcessAllowance {
    permits: Option<Arc<tokio::sync::Semaphore>>,
}

/// How often the excess allowance is refilled.
const EXCESS_REFILL_EVERY: Duration = Duration::from_millis(10);

impl ExcessAllowance {
    /// `rate` excess frames per second for the node; 0 = no limit. The refill task stops with
    /// `stop`.
    pub fn new(rate: u32, stop: CancellationToken) -> ExcessAllowance {
        if rate == 0 {
            return ExcessAllowance { permits: None };
        }
        let burst = (rate / 10).max(1) as usize;
        let semaphore = Arc::new(tokio::sync::Semaphore::new(burst));
        let refill = Arc::clone(&semaphore);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EXCESS_REFILL_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Whole permits per tick, the remainder carried over (rates below 100/s included).
            let per_tick = f64::from(rate) * EXCESS_REFILL_EVERY.as_secs_f64();
            let mut owed = 0.0_f64;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                owed += per_tick;
                let whole = owed.floor();
                owed -= whole;
                let room = burst.saturating_sub(refill.available_permits());
                refill.add_permits((whole as usize).min(room));
            }
        });
        ExcessAllowance {
            permits: Some(semaphore),
        }
    }

    /// Waits for a permit for one excess frame; at once when the allowance is off.
    pub async fn acquire(&self) {
        let Some(permits) = &self.permits else {
            return;
        };
        if let Ok(permit) = permits.try_acquire() {
            permit.forget();
            return;
        }
        metrics::counter!(m::EXCESS_DEFERRED).increment(1);
        // The semaphore is never closed.
        if let Ok(permit) = permits.acquire().await {
            permit.forget();
        }
    }
}
