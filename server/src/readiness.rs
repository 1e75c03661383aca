//! The database check behind `/ready` (`ops`): shared by the requests, so that a node checks
//! its database about once a second for readiness however often it is asked.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::time::Instant;

use crate::store::Store;

/// How long `/ready` waits for the database before calling it unreachable.
const READY_DB_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one database check answers `/ready`. `/ready` is on the public port and needs no
/// credentials, so without this every request took a pooled database connection: a client
/// flooding it could take the connections commits need.
pub const READY_DB_FRESH: Duration = Duration::from_secs(1);

/// What a database check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbCheck {
    Ok,
    Failed,
    TimedOut,
}

impl DbCheck {
    fn as_str(self) -> &'static str {
        match self {
            DbCheck::Ok => "ok",
            DbCheck::Failed => "failed",
            DbCheck::TimedOut => "timeout",
        }
    }
}

/// The database check behind `/ready`: at most one in flight (concurrent requests wait for the
/// same one), and its outcome reused for [`READY_DB_FRESH`]. So a node pings its database at
/// most about once a second for readiness, however often it is asked.
#[derive(Default)]
pub struct ReadyCheck(Mutex<ReadySlot>);

#[derive(Default)]
struct ReadySlot {
    last: Option<(Instant, DbCheck)>,
    running: Option<Shared<BoxFuture<'static, DbCheck>>>,
}

impl ReadyCheck {
    pub async fn check(&self, store: &Arc<dyn Store>) -> DbCheck {
        let running = {
            let mut slot = self.slot();
            if let Some((at, outcome)) = slot.last {
                if at.elapsed() < READY_DB_FRESH {
                    return outcome;
                }
            }
            // Polled by whichever of its waiters is still there; a check whose waiters all
            // went away is resumed by the next request.
            slot.running
                .get_or_insert_with(|| ping(Arc::clone(store)).boxed().shared())
                .clone()
        };
        let outcome = running.await;
        let mut slot = self.slot();
        if slot.running.is_some() {
            // The first waiter back records it; the others find it recorded.
            slot.running = None;
            slot.last = Some((Instant::now(), outcome));
        }
        outcome
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, ReadySlot> {
        // Held to look and to swap, never across an `.await`.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn ping(store: Arc<dyn Store>) -> DbCheck {
    let outcome = match tokio::time::timeout(READY_DB_TIMEOUT, store.ping()).await {
        Ok(Ok(())) => DbCheck::Ok,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: database check failed");
            DbCheck::Failed
        }
        Err(_) => DbCheck::TimedOut,
    };
    metrics::counter!(crate::metrics::READY_DB_CHECKS, "outcome" => outcome.as_str()).increment(1);
    outcome
}
