//! Message retention (`SEQCAST_RETENTION`): the leader deletes messages older than the retention
//! period. On Postgres it first drops the day partitions that are wholly older
//! ([`Store::drop_before`]), then deletes what is left older, in bounded batches, oldest first.
//! Rooms keep their head, so seqs continue and a client that asks for deleted messages is told
//! so (`joined` with `truncated`).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::Leadership;
use crate::store::Store;

use crate::metrics::RETENTION_DELETED;

/// Messages deleted per statement: small enough that a batch holds no lock for long.
pub const BATCH: usize = 1000;

/// Settings of the retention job.
#[derive(Debug, Clone, Copy)]
pub struct RetentionConfig {
    /// `SEQCAST_RETENTION`: messages older than this are deleted.
    pub max_age: Duration,
    /// `SEQCAST_JOB_INTERVAL`, default 60 s: how often a sweep starts.
    pub interval: Duration,
}

/// Runs a sweep every `config.interval` until `shutdown` is cancelled. A sweep deletes batch
/// after batch while this node leads, until none is left.
pub async fn run(
    store: Arc<dyn Store>,
    leadership: Leadership,
    config: RetentionConfig,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        sweep(&*store, &leadership, config.max_age, &shutdown).await;
    }
}

/// Deletes messages older than `max_age` in batches of [`BATCH`]. Leadership and shutdown are
/// checked before every batch; a batch under way finishes (the store bounds it in time). Errors
/// end the sweep: the next one retries.
async fn sweep(
    store: &dyn Store,
    leadership: &Leadership,
    max_age: Duration,
    shutdown: &CancellationToken,
) {
    let max_age_ms = i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
    let cutoff = chrono::Utc::now()
        .timestamp_millis()
        .saturating_sub(max_age_ms);
    if leadership.is_leader() && !shutdown.is_cancelled() {
        match store.drop_before(cutoff).await {
            Ok(0) => {}
            Ok(dropped) => {
                tracing::info!(
                    dropped,
                    cutoff_ms = cutoff,
                    "retention: dropped old partitions"
                );
            }
            // Typically a lock not granted in time (busy readers): the rows go by the batches
            // below meanwhile, and the next sweep tries the drop again.
            Err(e) => tracing::warn!(error = %e, "retention: dropping old partitions failed"),
        }
    }
    let mut total = 0;
    while leadership.is_leader() && !shutdown.is_cancelled() {
        match store.delete_before(cutoff, BATCH).await {
            Ok(deleted) => {
                total += deleted;
                metrics::counter!(RETENTION_DELETED).increment(deleted);
                if deleted < BATCH as u64 {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention: deleting old messages failed");
                break;
            }
        }
    }
    if total > 0 {
        tracing::info!(
            deleted = total,
            cutoff_ms = cutoff,
            "retention: deleted old messages"
        );
    }
}
