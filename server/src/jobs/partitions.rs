//! Partition maintenance (Postgres): the leader makes sure today and the next three days have a
//! partition of `messages` before rows arrive for them (migration 0006). Runs whether or not
//! retention is on. A day without a partition is not an error: its rows land in the DEFAULT
//! partition and are moved into the day's partition when it is created.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::Leadership;
use crate::store::Store;

/// Runs [`Store::prepare_partitions`] at once, then every `interval` (`SEQCAST_JOB_INTERVAL`)
/// while this node leads, until `shutdown` is cancelled. Errors are logged; the next run retries.
/// Three days ahead leave days of slack for a node, or Redis, that is down.
pub async fn run(
    store: Arc<dyn Store>,
    leadership: Leadership,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !leadership.is_leader() {
            continue;
        }
        match store
            .prepare_partitions(chrono::Utc::now().timestamp_millis())
            .await
        {
            Ok(0) => {}
            Ok(created) => tracing::info!(created, "partitions: created day partitions ahead"),
            Err(e) => tracing::warn!(error = %e, "partitions: creating day partitions failed"),
        }
    }
}
