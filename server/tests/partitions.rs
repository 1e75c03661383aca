//! Postgres at volume (issue "Scale-out", part 2): `messages` partitioned by day (migration
//! 0006), retention dropping whole partitions.
//!
//! - `retention_drops_partitions_while_readers_page_history`: six days of history in eight
//!   rooms; readers page every room forward (`read_after`) and backward (`read_before`) without
//!   pause while retention moves its cut forward day by day, dropping the days wholly older
//!   (`drop_before`) and deleting the rest of the straddling day in batches (`delete_before`).
//!   No read fails, no page has a hole or a duplicate or a wrong message, pages only move in
//!   their direction, and what is left of each room is one run of seqs, `first..=head`.
//! - `the_jobs_create_partitions_ahead_and_drop_old_ones`: the same through the node's jobs.
//! - `the_migration_keeps_existing_messages`: migration 0006 on a database with messages.
//! - `retention_cost_rows_against_partitions` (ignored: minutes; see docs/operations.md,
//!   "Postgres at volume"): the cost of one retention run removing half of the same data, on the
//!   schema before migration 0006 (row deletes) and after (partition drops), and the time
//!   migration 0006 takes to convert that table. Prints FIGURE lines.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use seqcast::store::{NewMessage, PostgresStore, Store, StoredMessage};
use sqlx::{Connection, Executor, PgConnection};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use support::postgres::TestPostgres;
use support::scenario::{figure, ms};

const DAY_MS: i64 = 86_400_000;
/// The retention job's batch (`jobs::retention::BATCH`).
const BATCH: usize = 1000;
/// Deadline of the concurrent test, seeding included.
const DEADLINE: Duration = Duration::from_secs(120);

/// Synthetic history: `total` messages over the `days` whole UTC days before today, spread
/// evenly in time, dealt to `rooms` rooms in turn. Message `i` is seq `i / rooms + 1` of room
/// `room{i % rooms}`, body `{"i":i}`, at `start + i * span / total`: within a room, time follows
/// seq, as the database's clock under the room's lock makes it.
#[derive(Debug, Clone, Copy)]
struct History {
    rooms: i64,
    days: i64,
    total: i64,
    start: i64,
}

impl History {
    fn new(rooms: i64, days: i64, total: i64) -> History {
        assert_eq!(total % rooms, 0);
        History {
            rooms,
            days,
            total,
            start: day_start(days),
        }
    }

    fn ts(&self, i: i64) -> i64 {
        self.start + i * (self.days * DAY_MS) / self.total
    }

    fn head(&self) -> u64 {
        (self.total / self.rooms) as u64
    }

    /// The message `room` must hold at `seq`, as its body says.
    fn body(&self, room: i64, seq: u64) -> String {
        format!("{{\"i\":{}}}", (seq as i64 - 1) * self.rooms + room)
    }

    /// What is left of `room` once everything older than `cut` is gone: its first seq.
    fn first_after(&self, room: i64, cut: i64) -> u64 {
        (1..=self.head())
            .find(|&seq| self.ts((seq as i64 - 1) * self.rooms + room) >= cut)
            .unwrap_or(self.head() + 1)
    }

    /// Writes the history straight into the database (partitions for its days first, when the
    /// schema has them), and the rooms' heads.
    async fn seed(&self, conn: &mut PgConnection, partitioned: bool) {
        if partitioned {
            sqlx::query("SELECT seqcast_create_partitions($1, $2)")
                .bind(self.start)
                .bind(day_start(0))
                .execute(&mut *conn)
                .await
                .unwrap();
        }
        sqlx::query(
            "INSERT INTO messages (room, seq, id, sender, body, idem, ts_ms) \
             SELECT 'room' || (i % $1), i / $1 + 1, gen_random_uuid(), 'alice', \
                    '{\"i\":' || i || '}', 'k' || i, $2 + i * ($3 * 86400000) / $4 \
             FROM generate_series(0::bigint, $4 - 1) AS i",
        )
        .bind(self.rooms)
        .bind(self.start)
        .bind(self.days)
        .bind(self.total)
        .execute(&mut *conn)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO rooms (room, head) SELECT 'room' || r, $2 FROM generate_series(0, $1 - 1) r \
             ON CONFLICT (room) DO UPDATE SET head = EXCLUDED.head",
        )
        .bind(self.rooms)
        .bind(self.total / self.rooms)
        .execute(&mut *conn)
        .await
        .unwrap();
        conn.execute("VACUUM ANALYZE messages").await.unwrap();
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The start of the UTC day `days_ago` days before today.
fn day_start(days_ago: i64) -> i64 {
    (now_ms().div_euclid(DAY_MS) - days_ago) * DAY_MS
}

async fn day_partitions(conn: &mut PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'messages'::regclass AND c.relname ~ '^messages_p[0-9]{8}$'",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

/// Checks one page: consecutive seqs, each message the one its seq must hold.
fn check_page(history: &History, room: i64, page: &[StoredMessage]) {
    for (k, m) in page.iter().enumerate() {
        assert_eq!(
            m.seq,
            page[0].seq + k as u64,
            "a hole or a duplicate in {page:?}"
        );
        assert_eq!(
            m.body,
            history.body(room, m.seq),
            "room{room} seq {}",
            m.seq
        );
    }
}

/// Pages room `room` from its first message to its head; returns the pages read.
async fn page_forward(store: &dyn Store, history: &History, room: i64) -> usize {
    let name = format!("room{room}");
    let mut cursor = store.room_info(&name).await.unwrap().first - 1;
    let mut pages = 0;
    loop {
        let page = store.read_after(&name, cursor, None, 17).await.unwrap();
        let Some(next) = page.first() else {
            assert_eq!(cursor, history.head(), "stopped short of the head");
            return pages;
        };
        check_page(history, room, &page);
        assert!(
            next.seq > cursor,
            "went back: after {cursor} came {}",
            next.seq
        );
        if next.seq != cursor + 1 {
            // Skipped: only because retention took those messages meanwhile, as a prefix.
            let first = store.room_info(&name).await.unwrap().first;
            assert!(
                first > cursor + 1,
                "room{room}: {cursor} then {}, first {first}",
                next.seq
            );
        }
        cursor = page.last().unwrap().seq;
        pages += 1;
    }
}

/// Pages room `room` from its head down to its first message; returns the pages read.
async fn page_backward(store: &dyn Store, history: &History, room: i64) -> usize {
    let name = format!("room{room}");
    let mut cursor = history.head() + 1;
    let mut pages = 0;
    loop {
        let page = store.read_before(&name, cursor, 17).await.unwrap();
        let Some(last) = page.last() else {
            let first = store.room_info(&name).await.unwrap().first;
            assert!(
                first >= cursor,
                "room{room}: nothing below {cursor}, first {first}"
            );
            return pages;
        };
        check_page(history, room, &page);
        // Below the cursor, nothing newer can have gone.
        assert_eq!(last.seq, cursor - 1, "room{room}: a hole below {cursor}");
        cursor = page[0].seq;
        pages += 1;
    }
}

/// [`Store::drop_before`], tried again (as the job does at its next sweep) when its lock was
/// not granted within its short `lock_timeout`: on a loaded box a read can run that long.
async fn drop_before(store: &dyn Store, cut: i64) -> u64 {
    for _ in 0..20 {
        match store.drop_before(cut).await {
            Ok(dropped) => return dropped,
            Err(e) if e.lock_timed_out() => continue,
            Err(e) => panic!("drop_before: {e}"),
        }
    }
    panic!("drop_before: no lock in 20 tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_partitions_while_readers_page_history() {
    tokio::time::timeout(DEADLINE, drops_while_reading())
        .await
        .expect("the test took too long");
}

async fn drops_while_reading() {
    let url = TestPostgres::shared().fresh_database().await;
    let store: Arc<dyn Store> = Arc::new(PostgresStore::connect(&url).await.unwrap());
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let history = History::new(8, 6, 8 * 6 * 60);
    history.seed(&mut conn, true).await;
    let partitions_before = day_partitions(&mut conn).await;

    // Pages read so far, by all readers; `done` once retention has finished.
    let (pages_tx, pages_rx) = watch::channel(0usize);
    let pages_tx = Arc::new(pages_tx);
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for reader in 0..4 {
        let (store, pages, done) = (Arc::clone(&store), Arc::clone(&pages_tx), Arc::clone(&done));
        readers.push(tokio::spawn(async move {
            // Until retention is done, then one more pass over every room.
            let mut last_pass = false;
            loop {
                last_pass |= done.load(Ordering::SeqCst);
                for room in 0..history.rooms {
                    let read = if reader % 2 == 0 {
                        page_forward(&*store, &history, room).await
                    } else {
                        page_backward(&*store, &history, room).await
                    };
                    pages.send_modify(|n| *n += read);
                }
                if last_pass {
                    return;
                }
            }
        }));
    }

    // The cut moves from the middle of the oldest day but one to the middle of the day before
    // yesterday: each step drops the days now wholly older and deletes half of the day it cuts.
    // Before every step the readers have read more pages, so steps and reads interleave.
    let mut dropped = 0;
    let mut deleted = 0;
    let mut last_cut = 0;
    for days_ago in (2..history.days).rev() {
        let mut rx = pages_rx.clone();
        let seen = *rx.borrow_and_update();
        rx.wait_for(|&n| n >= seen + 8).await.unwrap();
        let cut = day_start(days_ago) + DAY_MS / 2;
        dropped += drop_before(&*store, cut).await;
        loop {
            let n = store.delete_before(cut, 50).await.unwrap();
            deleted += n;
            if n < 50 {
                break;
            }
        }
        last_cut = cut;
    }
    done.store(true, Ordering::SeqCst);
    for reader in readers {
        reader.await.unwrap();
    }

    // Days 6 to 3 before today dropped whole; half of each day cut deleted row by row.
    assert_eq!(dropped, 4);
    assert_eq!(day_partitions(&mut conn).await, partitions_before - 4);
    assert_eq!(deleted as i64, 4 * history.total / history.days / 2);
    for room in 0..history.rooms {
        let name = format!("room{room}");
        let info = store.room_info(&name).await.unwrap();
        assert_eq!(info.head, history.head());
        assert_eq!(info.first, history.first_after(room, last_cut), "{name}");
        let left = store.read_after(&name, 0, None, 10_000).await.unwrap();
        check_page(&history, room, &left);
        assert_eq!(left[0].seq, info.first);
        assert_eq!(left.last().unwrap().seq, info.head);
    }
}

/// The name of the day partition holding `ms`.
fn partition_name(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .format("messages_p%Y%m%d")
        .to_string()
}

/// The node's jobs on Postgres, as `jobs::spawn` starts them: maintenance creates a missing
/// partition ahead, and retention (`SEQCAST_RETENTION=3d`) drops the days wholly older and
/// deletes the older part of the day it cuts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jobs_create_partitions_ahead_and_drop_old_ones() {
    let url = TestPostgres::shared().fresh_database().await;
    let store: Arc<dyn Store> = Arc::new(PostgresStore::connect(&url).await.unwrap());
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let history = History::new(4, 6, 4 * 6 * 10);
    history.seed(&mut conn, true).await;
    // The day after tomorrow, as if maintenance had not run since the migration.
    let ahead = partition_name(day_start(-2));
    conn.execute(format!("DROP TABLE {ahead}").as_str())
        .await
        .unwrap();

    let max_age = 3 * DAY_MS;
    let earliest_cut = now_ms() - max_age;
    let config = seqcast::Config {
        retention: Some(Duration::from_millis(max_age as u64)),
        job_interval: Duration::from_millis(100),
        ..seqcast::Config::default()
    };
    let shutdown = CancellationToken::new();
    let jobs = seqcast::jobs::spawn(&config, Arc::clone(&store), None, shutdown.clone());

    let oldest_kept = partition_name(earliest_cut);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (created, older): (bool, i64) = sqlx::query_as(
            "SELECT to_regclass($1) IS NOT NULL, \
                    (SELECT count(*) FROM pg_class WHERE relname ~ '^messages_p[0-9]{8}$' \
                       AND relname < $2)",
        )
        .bind(&ahead)
        .bind(&oldest_kept)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        let mut trimmed = true;
        for room in 0..history.rooms {
            let first = store.room_info(&format!("room{room}")).await.unwrap().first;
            trimmed &= first >= history.first_after(room, earliest_cut);
        }
        if created && older == 0 && trimmed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{ahead} created: {created}; {older} partitions older than {oldest_kept}; \
             rooms trimmed: {trimmed}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing younger than the cut went.
    for room in 0..history.rooms {
        let first = store.room_info(&format!("room{room}")).await.unwrap().first;
        assert!(first <= history.first_after(room, now_ms() - max_age));
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), jobs.stopped())
        .await
        .expect("the jobs stop at shutdown");
}

/// Upgrading: a database at migration 0005 with messages in it (old days, today, keys) is
/// migrated by a node's start; every message survives in its day's partition, keys still answer
/// their original, seqs continue, and reads page through as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_keeps_existing_messages() {
    let url = TestPostgres::shared().fresh_database().await;
    let old = tempfile::tempdir().unwrap();
    let migrations = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations/postgres");
    for entry in std::fs::read_dir(migrations).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.as_str() < "0006" {
            std::fs::copy(&path, old.path().join(name)).unwrap();
        }
    }
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::migrate::Migrator::new(old.path())
        .await
        .unwrap()
        .run(&mut conn)
        .await
        .unwrap();
    let history = History::new(3, 4, 3 * 4 * 25);
    history.seed(&mut conn, false).await;
    let today: i64 =
        sqlx::query_scalar("SELECT seqcast_publish('room0', 'bob', '{\"today\": 1}', 'today-key')")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    let today = today as u64;
    assert_eq!(today, history.head() + 1);

    let store = PostgresStore::connect(&url).await.unwrap();
    let stored: Vec<(String, i64)> = sqlx::query_as(
        "SELECT tableoid::regclass::text, count(*) FROM messages GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let days: Vec<String> = (0..=history.days)
        .rev()
        .map(|d| partition_name(day_start(d)))
        .collect();
    let per_day = history.total / history.days;
    let mut expected: Vec<(String, i64)> = days[..4].iter().map(|d| (d.clone(), per_day)).collect();
    expected.push((days[4].clone(), 1));
    assert_eq!(stored, expected, "every message in its day's partition");

    for room in 0..history.rooms {
        let name = format!("room{room}");
        let page = store
            .read_after(&name, 0, Some(history.head()), 1000)
            .await
            .unwrap();
        assert_eq!(page.len() as u64, history.head());
        check_page(&history, room, &page);
    }
    // A key from before the upgrade answers its original; seqs continue after the head.
    let again = store
        .append("room1", &[keyed_message("alice", "k4")])
        .await
        .unwrap();
    assert!(again[0].duplicate);
    assert_eq!(again[0].message.seq, 2);
    let again = store
        .append("room0", &[keyed_message("bob", "today-key")])
        .await
        .unwrap();
    assert!(again[0].duplicate);
    assert_eq!(again[0].message.seq, today);
    let next = store
        .append("room0", &[keyed_message("bob", "new-key")])
        .await
        .unwrap();
    assert!(!next[0].duplicate);
    assert_eq!(next[0].message.seq, today + 1);
}

fn keyed_message(sender: &str, idem: &str) -> NewMessage {
    NewMessage {
        sender: sender.to_owned(),
        body: "{}".to_owned(),
        idem: Some(idem.to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes: the retention figures of docs/operations.md"]
async fn retention_cost_rows_against_partitions() {
    let total: i64 = std::env::var("SEQCAST_FIGURE_MESSAGES")
        .map(|v| v.parse().unwrap())
        .unwrap_or(1_000_000);
    let history = History::new(100, 10, total);
    // At a day's boundary, removing the five oldest of the ten days: half the messages.
    let cut = day_start(history.days / 2);
    let removed = total / 2;

    // Before: migration 0006 undone, `messages` as 0001 and 0002 made it.
    let before_url = TestPostgres::shared().fresh_database().await;
    let before = PostgresStore::connect(&before_url).await.unwrap();
    let mut conn = PgConnection::connect(&before_url).await.unwrap();
    conn.execute(OLD_SCHEMA).await.unwrap();
    history.seed(&mut conn, false).await;
    let wal = wal_position(&mut conn).await;
    let start = Instant::now();
    let (mut rows, mut statements) = (0, 0);
    loop {
        let n = before.delete_before(cut, BATCH).await.unwrap();
        rows += n;
        statements += 1;
        if n < BATCH as u64 {
            break;
        }
    }
    let rows_time = start.elapsed();
    let rows_wal = wal_since(&mut conn, &wal).await;
    assert_eq!(rows as i64, removed);
    figure(
        &format!("retention of {removed} of {total} messages, rows (before 0006)"),
        format!(
            "{rows} rows deleted in {statements} calls, {}, {} MiB of WAL",
            ms(rows_time),
            rows_wal / (1 << 20)
        ),
    );

    // The upgrade: migration 0006 on the old table, refilled.
    conn.execute("TRUNCATE messages").await.unwrap();
    history.seed(&mut conn, false).await;
    let start = Instant::now();
    let mut tx = conn.begin().await.unwrap();
    tx.execute(MIGRATION).await.unwrap();
    tx.commit().await.unwrap();
    figure(
        &format!("migration 0006 converting {total} messages"),
        ms(start.elapsed()),
    );

    // After: the same data, partitioned.
    let after_url = TestPostgres::shared().fresh_database().await;
    let after = PostgresStore::connect(&after_url).await.unwrap();
    let mut conn = PgConnection::connect(&after_url).await.unwrap();
    history.seed(&mut conn, true).await;
    let wal = wal_position(&mut conn).await;
    let start = Instant::now();
    let dropped = after.drop_before(cut).await.unwrap();
    let left = after.delete_before(cut, BATCH).await.unwrap();
    let drop_time = start.elapsed();
    let drop_wal = wal_since(&mut conn, &wal).await;
    assert_eq!(dropped as i64, history.days / 2);
    assert_eq!(left, 0);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored, total - removed);
    figure(
        &format!("retention of {removed} of {total} messages, partitions (after 0006)"),
        format!(
            "{dropped} partitions dropped, 0 rows deleted, {}, {} KiB of WAL",
            ms(drop_time),
            drop_wal / 1024
        ),
    );
    figure(
        "retention speed-up",
        format!("{:.0}x", rows_time.as_secs_f64() / drop_time.as_secs_f64()),
    );
}

/// The server's WAL position now. The server is shared by this binary's tests only: run this
/// test alone (by name) for the WAL figures to be its own.
async fn wal_position(conn: &mut PgConnection) -> String {
    sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(conn)
        .await
        .unwrap()
}

/// WAL bytes written since `position`.
async fn wal_since(conn: &mut PgConnection, position: &str) -> i64 {
    sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::bigint")
        .bind(position)
        .fetch_one(conn)
        .await
        .unwrap()
}

/// `messages` as migrations 0001 and 0002 left it.
const OLD_SCHEMA: &str = "\
    DROP TABLE messages; \
    CREATE TABLE messages ( \
        room TEXT COLLATE \"C\" NOT NULL, seq BIGINT NOT NULL, id UUID NOT NULL, \
        sender TEXT COLLATE \"C\" NOT NULL, body TEXT NOT NULL, idem TEXT COLLATE \"C\", \
        ts_ms BIGINT NOT NULL, PRIMARY KEY (room, seq)); \
    CREATE UNIQUE INDEX messages_room_sender_idem ON messages (room, sender, idem) \
        WHERE idem IS NOT NULL; \
    CREATE INDEX messages_ts_ms ON messages (ts_ms);";

const MIGRATION: &str = include_str!("../../migrations/postgres/0006_message_partitions.sql");
