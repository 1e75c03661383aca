//! Background jobs, and which node runs them.
//!
//! - [`leader`]: leader election over Redis ([`Leadership`], [`Election`]).
//! - [`retention`]: deletes messages older than `SEQCAST_RETENTION`.
//! - [`partitions`]: creates the day partitions of `messages` ahead (Postgres).
//!
//! [`spawn`] starts them for a node. New periodic work goes in a module of its own here, runs
//! on the interval `SEQCAST_JOB_INTERVAL`, checks [`Leadership::is_leader`] before each step,
//! and must be idempotent, for the reasons below.
//!
//! # Who leads
//!
//! With Redis, the nodes elect a leader: the lock is a key, `{SEQCAST_REDIS_PREFIX}leader`,
//! acquired with `SET key value NX PX ttl` (`SEQCAST_LEADER_TTL`, default 10 s), where the value
//! is unique to one node's election (`{node_id}:{random uuid}`). The leader renews it every third
//! of the TTL with a script that extends it only if it still holds that value, and releases it
//! at shutdown with a script that deletes it only if it still holds that value. So at any moment
//! at most one node holds the key in Redis, and only the holder can prolong or drop it.
//!
//! Holding the key is not yet knowing it. A node believes it leads until `sent + ttl - margin`:
//! `sent` is read from its monotonic clock just before it sent the last acquire or renewal that
//! succeeded, and the margin is a fifth of the TTL. Redis ran that command after `sent`, so the
//! key lives until at least `sent + ttl`; the node therefore stops believing before the key can
//! expire, and so before any other node can acquire it. [`Leadership::is_leader`] compares with
//! the clock at each call, not with a flag the election loop sets, so a node whose loop is stuck
//! (Redis paused, unreachable, slow) stops leading on time all the same. Two nodes never believe
//! they lead at the same instant, provided their clocks and Redis's run at the same rate to
//! within the margin, and Redis does not lose the key: a restart without persistence, a failover
//! to a replica that missed the write or a `FLUSHALL` can give two leaders for up to one lease.
//! Each Redis command times out after `SEQCAST_REDIS_TIMEOUT`.
//!
//! # Why jobs are idempotent anyway
//!
//! Believing is checked before each step of a job, and a step under way (one batch of deletes)
//! may end just after the lease did. Every job is therefore safe to run on several nodes at once,
//! the election only keeps the work from being done many times over. That is also what makes a
//! cluster without Redis correct: every node is then leader ([`Leadership::always`]) and runs
//! every job. When Redis is configured but down, no node leads and the jobs wait; retention is
//! only late, nothing else depends on it.

pub mod leader;
pub mod partitions;
pub mod retention;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use leader::{Election, ElectionConfig, Leadership};
pub use retention::RetentionConfig;

use crate::config::Config;
use crate::redis::RedisLink;
use crate::store::Store;

/// The background jobs of a node, started by [`spawn`]. Cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    leadership: Leadership,
    tasks: TaskTracker,
}

impl Jobs {
    /// Whether this node leads right now (for `/ready` and the jobs).
    pub fn is_leader(&self) -> bool {
        self.leadership.is_leader()
    }

    pub fn leadership(&self) -> &Leadership {
        &self.leadership
    }

    /// Resolves once every job has stopped, after the `shutdown` token given to [`spawn`] was
    /// cancelled: the leader lock is released by then. Bounded by the Redis command timeout and
    /// the store's timeouts.
    pub async fn stopped(&self) {
        self.tasks.wait().await;
    }
}

/// Starts the election (on the node's Redis link when given, else every node leads) and the jobs
/// the configuration asks for: retention when `config.retention` is set, partition maintenance
/// on Postgres. They run until `shutdown` is cancelled.
pub fn spawn(
    config: &Config,
    store: Arc<dyn Store>,
    redis: Option<RedisLink>,
    shutdown: CancellationToken,
) -> Jobs {
    let tasks = TaskTracker::new();
    let leadership = match redis {
        Some(redis) => {
            let (leadership, election) =
                Leadership::elect(redis, ElectionConfig::from_config(config));
            tasks.spawn(election.run(shutdown.clone()));
            leadership
        }
        None => Leadership::always(),
    };
    if store.kind() == "postgres" {
        tasks.spawn(partitions::run(
            Arc::clone(&store),
            leadership.clone(),
            config.job_interval,
            shutdown.clone(),
        ));
    }
    if let Some(max_age) = config.retention {
        let retention = RetentionConfig {
            max_age,
            interval: config.job_interval,
        };
        tasks.spawn(retention::run(
            store,
            leadership.clone(),
            retention,
            shutdown,
        ));
    }
    tasks.close();
    Jobs { leadership, tasks }
}
