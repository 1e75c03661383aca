//! Prometheus metrics: the names, in one place, and the exporter behind `GET /metrics`.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Open WebSocket connections (gauge).
pub const CONNECTIONS_OPEN: &str = "seqcast_connections_open";
/// Bytes of one session's future, set at the first upgrade (gauge).
pub const SESSION_FUTURE_BYTES: &str = "seqcast_session_future_bytes";
/// (session, room) joins currently in force (gauge).
pub const SESSIONS_JOINED: &str = "seqcast_sessions_joined";
/// Messages committed by this node, duplicates excluded (counter).
pub const MESSAGES_COMMITTED: &str = "seqcast_messages_committed_total";
/// `message` frames written to WebSocket clients, live or replayed (counter).
pub const MESSAGES_DELIVERED: &str = "seqcast_messages_delivered_total";
/// Duration of one commit transaction (histogram).
pub const COMMIT_SECONDS: &str = "seqcast_commit_seconds";
/// Messages per commit transaction (histogram): how much group commit batches.
pub const COMMIT_BATCH: &str = "seqcast_commit_batch_size";
/// Rooms per commit transaction (histogram): how much the node-wide group commit groups.
pub const COMMIT_ROOMS: &str = "seqcast_commit_rooms";
/// Commits that failed (counter, label `reason`: `unavailable`, `internal`, or `locked`: rooms
/// held by another transaction, such as an open `seqcast_publish` one, for the lock timeout).
pub const COMMIT_ERRORS: &str = "seqcast_commit_errors_total";
/// Groups committed a second time, in a transaction that looks keys up, because a message
/// repeated an idempotency key stored before the group (a resend after a lost ack, or the same
/// key racing on another node), which the one-statement commit refuses (counter; Postgres
/// only).
pub const STORE_KEYED_RETRIES: &str = "seqcast_commit_keyed_retries_total";
/// Sessions reading the database because they are behind the live stream (gauge).
pub const SESSIONS_CATCHING_UP: &str = "seqcast_sessions_catching_up";
/// Sessions closed with 4008 because they accepted no bytes for the write timeout (counter).
pub const SESSIONS_CLOSED_SLOW: &str = "seqcast_sessions_closed_slow_total";
/// HTTP connections closed because their socket accepted none of a response's bytes for the
/// write timeout (counter).
pub const HTTP_WRITE_TIMEOUTS: &str = "seqcast_http_write_timeouts_total";
/// Database checks made for `/ready` (counter, label `outcome`: `ok`, `failed`, `timeout`);
/// at most about one a second however often `/ready` is asked.
pub const READY_DB_CHECKS: &str = "seqcast_ready_db_checks_total";
/// Messages handed to the bus for other nodes (counter).
pub const BUS_PUBLISHED: &str = "seqcast_bus_published_total";
/// Messages not published because the bus was down or its queue full (counter); other nodes
/// repair them from the database.
pub const BUS_PUBLISH_DROPPED: &str = "seqcast_bus_publish_dropped_total";
/// Messages received from other nodes through the bus (counter).
pub const BUS_RECEIVED: &str = "seqcast_bus_received_total";
/// Redis Cluster only: times the cluster's slot map was found to differ from the one the node
/// subscribes by (a slot moved, or a replica took over), each followed by the subscriptions in
/// the slots that moved renewed and their rooms' heads checked (counter).
pub const BUS_SLOT_MOVES: &str = "seqcast_bus_slot_moves_total";
/// Signals accepted from this node's clients (counter).
pub const SIGNALS: &str = "seqcast_signals_total";
/// Ephemeral frames (signals, read cursors) dropped (counter, label `at`: `bus` when the bus
/// was down or its queue half full, `session` when a session's queue was half full). Nothing
/// repairs them: at most once.
pub const EPHEMERAL_DROPPED: &str = "seqcast_ephemeral_dropped_total";
/// Read cursors moved by `read` frames (counter).
pub const READ_CURSORS_MOVED: &str = "seqcast_read_cursors_moved_total";
/// `presence` frames queued for watching sessions (counter; one per watcher; those a session's
/// half-full queue did not take count in `seqcast_ephemeral_dropped_total{at="session"}`).
pub const PRESENCE_FRAMES: &str = "seqcast_presence_frames_total";
/// Failed presence roster operations (counter, label `op`: `write`, `read`, `heartbeat`). Each
/// is retried; a node whose heartbeats keep failing stops being counted by the others after
/// `SEQCAST_PRESENCE_TTL`.
pub const PRESENCE_ROSTER_ERRORS: &str = "seqcast_presence_roster_errors_total";
/// The node's Redis link (gauge): 1 while it is up, 0 while it is down or still connecting (the
/// bus then relies on database polling and the user limit counts per node). Absent on a node
/// without Redis (SQLite, or Postgres without `REDIS_URL`): nothing there is down, and an alert
/// on `== 0` must not fire for it, nor a `min`/`avg` across nodes be pulled by a made-up value.
pub const BUS_UP: &str = "seqcast_bus_up";
/// Times a room was found behind the database (a message the bus lost or never carried) (counter).
pub const GAPS_DETECTED: &str = "seqcast_gaps_detected_total";
/// Messages read from the database to fill such gaps (counter).
pub const MESSAGES_REPAIRED: &str = "seqcast_messages_repaired_total";
/// 1 while the node's `LISTEN` connection (messages published from SQL) is open, 0 while it is
/// being opened again (gauge). Absent on SQLite.
pub const SQL_LISTEN_UP: &str = "seqcast_sql_listen_up";
/// Notifications of `seqcast_publish` commits received (counter).
pub const SQL_NOTIFICATIONS: &str = "seqcast_sql_notifications_total";
/// Messages read from the database after such a notification (counter).
pub const SQL_MESSAGES_READ: &str = "seqcast_sql_messages_read_total";
/// 1 while this node holds the leader lock for background jobs (gauge).
pub const LEADER: &str = "seqcast_leader";
/// 1 once this node has begun draining (SIGTERM/SIGINT), until it exits (gauge).
pub const DRAINING: &str = "seqcast_draining";
/// Messages deleted by the retention job (counter).
pub const RETENTION_DELETED: &str = "seqcast_retention_deleted_total";
/// `rate_limited` errors sent and 429s answered (counter, label `limit`: `connection` or `user`).
pub const RATE_LIMITED: &str = "seqcast_rate_limited_total";
/// Connections closed (1008) for sustained tenfold abuse of their rate (counter).
pub const RATE_LIMIT_CLOSED: &str = "seqcast_rate_limit_closed_total";
/// Times an over-rate connection was not read because the node's allowance for excess frames
/// (`SEQCAST_EXCESS_FRAME_RATE`) was spent (counter).
pub const EXCESS_DEFERRED: &str = "seqcast_excess_frames_deferred_total";

/// The `messages_delivered` counter, looked up once: it counts every socket write of messages,
/// and a lookup by name (hashing the key into the registry) for each was a visible share of a
/// fan-out's CPU. Made at first use, which is in a session, after [`install`].
pub fn messages_delivered() -> &'static metrics::Counter {
    static COUNTER: OnceLock<metrics::Counter> = OnceLock::new();
    COUNTER.get_or_init(|| metrics::counter!(MESSAGES_DELIVERED))
}

/// Installs the process-wide recorder once and returns its handle. The recorder is global to the
/// process, so a second server in the same process (tests) shares it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let commit_buckets = [
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
            ];
            let batch_buckets = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(COMMIT_SECONDS.into()), &commit_buckets)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(COMMIT_BATCH.into()), &batch_buckets)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(COMMIT_ROOMS.into()), &batch_buckets)
                })
                .and_then(|b| b.install_recorder());
            match handle {
                Ok(handle) => {
                    describe();
                    handle
                }
                // Another recorder is installed (an embedding application): serve an empty
                // registry rather than fail to start.
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            }
        })
        .clone()
}

/// Keeps histograms from growing without bound between scrapes.
pub async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(CONNECTIONS_OPEN, "Open WebSocket connections");
    describe_gauge!(
        SESSION_FUTURE_BYTES,
        Unit::Bytes,
        "Bytes of one WebSocket session's future, held by every open connection (set at the first upgrade)"
    );
    describe_gauge!(SESSIONS_JOINED, "Room joins currently in force");
    describe_counter!(MESSAGES_COMMITTED, "Messages committed by this node");
    describe_counter!(
        MESSAGES_DELIVERED,
        "Message frames written to WebSocket clients"
    );
    describe_histogram!(
        COMMIT_SECONDS,
        Unit::Seconds,
        "Duration of one commit transaction"
    );
    describe_histogram!(COMMIT_BATCH, "Messages per commit transaction");
    describe_histogram!(COMMIT_ROOMS, "Rooms per commit transaction");
    describe_counter!(COMMIT_ERRORS, "Failed commits");
    describe_counter!(
        STORE_KEYED_RETRIES,
        "Groups committed again with key lookups because a message repeated a stored idempotency key"
    );
    describe_gauge!(
        SESSIONS_CATCHING_UP,
        "Sessions reading the database to catch up"
    );
    describe_counter!(
        SESSIONS_CLOSED_SLOW,
        "Sessions closed with 4008 (slow consumer)"
    );
    describe_counter!(
        READY_DB_CHECKS,
        "Database checks made for /ready, by outcome"
    );
    describe_counter!(
        HTTP_WRITE_TIMEOUTS,
        "HTTP connections closed: a response went unread for the write timeout"
    );
    describe_counter!(BUS_PUBLISHED, "Messages published to other nodes");
    describe_counter!(
        BUS_PUBLISH_DROPPED,
        "Messages not published (bus down or queue full)"
    );
    describe_counter!(BUS_RECEIVED, "Messages received from other nodes");
    describe_counter!(
        BUS_SLOT_MOVES,
        "Redis Cluster slot map changes seen (subscriptions renewed)"
    );
    describe_counter!(SIGNALS, "Signals accepted from this node's clients");
    describe_counter!(
        EPHEMERAL_DROPPED,
        "Signals and read-cursor updates dropped (at most once)"
    );
    describe_counter!(READ_CURSORS_MOVED, "Read cursors moved by read frames");
    describe_counter!(PRESENCE_FRAMES, "Presence frames queued for watchers");
    describe_counter!(
        PRESENCE_ROSTER_ERRORS,
        "Failed presence roster operations (retried)"
    );
    describe_gauge!(
        BUS_UP,
        "1 while the Redis link is up (absent without Redis)"
    );
    describe_counter!(GAPS_DETECTED, "Rooms found behind the database");
    describe_counter!(
        MESSAGES_REPAIRED,
        "Messages read from the database to fill gaps"
    );
    describe_gauge!(
        SQL_LISTEN_UP,
        "1 while the LISTEN connection for seqcast_publish is open (absent on SQLite)"
    );
    describe_counter!(
        SQL_NOTIFICATIONS,
        "Notifications of seqcast_publish commits received"
    );
    describe_counter!(
        SQL_MESSAGES_READ,
        "Messages read from the database after a seqcast_publish notification"
    );
    describe_gauge!(LEADER, "1 while this node is the leader");
    describe_gauge!(
        DRAINING,
        "1 once this node has begun draining (SIGTERM), until it exits"
    );
    describe_counter!(RETENTION_DELETED, "Messages deleted by retention");
    describe_counter!(RATE_LIMITED, "Frames and requests refused as rate_limited");
    describe_counter!(
        RATE_LIMIT_CLOSED,
        "Connections closed for tenfold abuse of their rate"
    );
    describe_counter!(
        EXCESS_DEFERRED,
        "Reads of over-rate connections put off (node excess allowance spent)"
    );
    // Make every series visible from the first scrape, before anything happened.
    metrics::gauge!(CONNECTIONS_OPEN).set(0.0);
    metrics::gauge!(SESSIONS_JOINED).set(0.0);
    metrics::gauge!(SESSIONS_CATCHING_UP).set(0.0);
    metrics::counter!(MESSAGES_COMMITTED).absolute(0);
    metrics::counter!(MESSAGES_DELIVERED).absolute(0);
    metrics::counter!(SESSIONS_CLOSED_SLOW).absolute(0);
    metrics::counter!(HTTP_WRITE_TIMEOUTS).absolute(0);
    metrics::counter!(BUS_PUBLISHED).absolute(0);
    metrics::counter!(BUS_RECEIVED).absolute(0);
    metrics::counter!(GAPS_DETECTED).absolute(0);
    metrics::counter!(MESSAGES_REPAIRED).absolute(0);
    metrics::counter!(SQL_NOTIFICATIONS).absolute(0);
    metrics::counter!(SQL_MESSAGES_READ).absolute(0);
    // Not BUS_UP: it exists only on a node with Redis (set by `crate::redis`).
    metrics::gauge!(LEADER).set(0.0);
    metrics::gauge!(DRAINING).set(0.0);
}
