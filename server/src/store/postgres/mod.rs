//! Postgres backend: the store for clusters. Any number of nodes may share one database; the
//! per-room counter row (see `append::in_transaction`) keeps seqs gap-free across all of them.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::query::Query;
use sqlx::{ConnectOptions, Connection, Postgres, Row};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::{timeout_at, Instant};

mod append;
mod roster;

pub use roster::{Beat, Listed, Roster, CHANNEL as PRESENCE_CHANNEL};

use super::batch;
use super::{
    Appended, HeldRooms, NewMessage, ReadMark, RoomInfo, Store, StoreError, StoreOptions,
    StoreResult, StoredMessage, Unread,
};
use crate::metrics as m;

/// The default of `SEQCAST_DB_POOL_SIZE`: connections per node. Appends to one room serialize
/// on its counter row anyway, so more connections mostly help reads and appends to many rooms at
/// once.
pub const DEFAULT_POOL_SIZE: u32 = 16;

/// Connections kept for commits: reads (`room_info`, `read_after`, `read_before`,
/// `room_heads`) may hold all but this many at once, so a burst of history reads and catch-ups
/// cannot keep messages from being committed. A small pool keeps half of its connections (none
/// of one), so reads still get at least one.
const COMMIT_RESERVE: u32 = 4;

/// How many connections of a pool of `pool_size` reads may hold at once.
fn read_permits(pool_size: u32) -> usize {
    let pool_size = pool_size.max(1);
    (pool_size - COMMIT_RESERVE.min(pool_size / 2)) as usize
}

/// The default of `SEQCAST_DB_TIMEOUT`: how long one store operation (waiting for a
/// connection included) may take before it fails as [`StoreError::Unavailable`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(4);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Deadline of every operation, from its start (`SEQCAST_DB_TIMEOUT`).
    timeout: Duration,
    /// Permits for reads: see [`COMMIT_RESERVE`].
    reads: Arc<Semaphore>,
    /// Groups committed a second time (see [`PostgresStore::keyed_retries`]).
    keyed_retries: Arc<AtomicU64>,
}

impl PostgresStore {
    /// [`PostgresStore::connect_with_timeout`] with [`DEFAULT_TIMEOUT`].
    pub async fn connect(url: &str) -> StoreResult<Self> {
        Self::connect_with_timeout(url, DEFAULT_TIMEOUT).await
    }

    /// Connects to `url` and applies pending migrations, with the default pool size.
    pub async fn connect_with_timeout(url: &str, timeout: Duration) -> StoreResult<Self> {
        let options = StoreOptions {
            timeout,
            ..StoreOptions::default()
        };
        Self::open(url, &options).await
    }

    /// Connects to `url` and applies pending migrations (or, with `options.migrate` off, fails
    /// with [`StoreError::SchemaNotCurrent`] while some are pending). Several nodes may start at
    /// once: sqlx holds an advisory lock while it migrates, so exactly one of them applies each
    /// migration. The pool holds `options.pool_size` connections at most.
    ///
    /// Every later operation must finish within `timeout` or fails as unavailable, and its
    /// connection is thrown away (a paused or unreachable database would otherwise hold the
    /// caller until TCP gives up, minutes later). As a second line of defence the database
    /// itself cancels a statement, a lock wait or an idle open transaction after `timeout`
    /// (`statement_timeout`, `lock_timeout`, `idle_in_transaction_session_timeout`): a node
    /// that stalls mid-transaction cannot hold its rooms' locks for longer.
    pub async fn open(url: &str, store_options: &StoreOptions) -> StoreResult<Self> {
        let timeout = store_options.timeout;
        let pool_size = store_options.pool_size.max(1);
        let options = PgConnectOptions::from_str(url).map_err(classify)?;
        // Migrations get a connection of their own, without those timeouts: a migration may
        // legitimately run long.
        let deadline = Instant::now() + timeout;
        let mut conn = timeout_at(deadline, options.connect())
            .await
            .map_err(|_| timed_out())?
            .map_err(classify)?;
        if store_options.migrate {
            MIGRATOR.run(&mut conn).await?;
        } else {
            let check = async {
                let exists: bool =
                    sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                        .fetch_one(&mut conn)
                        .await
                        .map_err(classify)?;
                super::check_schema(&MIGRATOR, &mut conn, exists).await
            };
            timeout_at(Instant::now() + timeout, check)
                .await
                .map_err(|_| timed_out())??;
        }
        conn.close().await.map_err(classify)?;

        let ms = timeout.as_millis().max(1).to_string();
        // Below the deadline, so that a lock held by another transaction (an application's
        // open `seqcast_publish` one) is reported by the database, as 55P03, before the node's
        // own deadline cuts the statement off: the writer then answers the rooms held and
        // commits the rest (`Store::held_rooms`), where a deadline would have counted as a
        // database not answering and failed every message queued on the node.
        let lock_ms = (timeout.as_millis() * 3 / 4).max(1).to_string();
        let options = options.options([
            ("statement_timeout", ms.as_str()),
            ("lock_timeout", lock_ms.as_str()),
            ("idle_in_transaction_session_timeout", ms.as_str()),
        ]);
        let pool = timeout_at(
            Instant::now() + timeout,
            PgPoolOptions::new()
                .max_connections(pool_size)
                .acquire_timeout(timeout)
                .connect_with(options),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(classify)?;
        write_settings(&pool, store_options, Instant::now() + timeout).await?;
        Ok(Self {
            pool,
            timeout,
            reads: Arc::new(Semaphore::new(read_permits(pool_size))),
            keyed_retries: Arc::new(AtomicU64::new(0)),
        })
    }

    /// How many groups this store committed a second time, in a transaction that looks their
    /// keys up, because a key of the group was stored already (what
    /// `seqcast_commit_keyed_retries_total` counts, for this store alone).
    pub fn keyed_retries(&self) -> u64 {
        self.keyed_retries.load(Ordering::Relaxed)
    }

    /// The deadline of an operation starting now.
    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// A pooled connection, by `deadline`.
    async fn conn(&self, deadline: Instant) -> StoreResult<PoolConnection<Postgres>> {
        timeout_at(deadline, self.pool.acquire())
            .await
            .map_err(|_| timed_out())?
            .map_err(classify)
    }

    /// What a read runs on: one of the read permits (held until the read is done), then a
    /// connection, both by the read's deadline, which is returned too.
    async fn read_conn(
        &self,
    ) -> StoreResult<(SemaphorePermit<'_>, PoolConnection<Postgres>, Instant)> {
        let deadline = self.deadline();
        let permit = timeout_at(deadline, self.reads.acquire())
            .await
            .map_err(|_| timed_out())?
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?;
        let conn = self.conn(deadline).await?;
        Ok((permit, conn, deadline))
    }

    /// Runs one of migration 0006's partition functions, `sql` taking `ms` and returning a
    /// count, in a transaction of its own with a short `lock_timeout`
    /// ([`PARTITION_LOCK_TIMEOUT`]).
    async fn partition_ddl(&self, sql: &'static str, ms: i64) -> StoreResult<u64> {
        let deadline = self.deadline();
        let mut conn = self.conn(deadline).await?;
        let outcome = timeout_at(deadline, async {
            let mut tx = Connection::begin(&mut *conn).await?;
            sqlx::query(PARTITION_LOCK_TIMEOUT)
                .execute(&mut *tx)
                .await?;
            let count: i32 = sqlx::query_scalar(sql).bind(ms).fetch_one(&mut *tx).await?;
            tx.commit().await?;
            Ok(u64::try_from(count).unwrap_or(0))
        })
        .await;
        settle(conn, outcome)
    }

    /// Runs a query for [`message_from_row`]'s columns.
    /// Up to `limit` messages of `room` with `floor <= seq < before`, newest first.
    async fn read_below(
        &self,
        room: &str,
        before: u64,
        floor: u64,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        let query = sqlx::query(
            "SELECT seq, id::text AS id, sender, body, ts_ms FROM messages \
             WHERE room = $1 AND seq < $2 AND seq >= $3 ORDER BY seq DESC LIMIT $4",
        )
        .bind(room)
        .bind(batch::to_db(before))
        .bind(batch::to_db(floor))
        .bind(batch::limit_to_db(limit));
        self.fetch_messages(room, query).await
    }

    /// Up to `limit` messages of `room` with `after < seq <= up_to`, in seq order.
    async fn read_range(
        &self,
        room: &str,
        after: u64,
        up_to: u64,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        let query = sqlx::query(
            "SELECT seq, id::text AS id, sender, body, ts_ms FROM messages \
             WHERE room = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4",
        )
        .bind(room)
        .bind(batch::to_db(after))
        .bind(batch::to_db(up_to))
        .bind(batch::limit_to_db(limit));
        self.fetch_messages(room, query).await
    }

    async fn fetch_messages(
        &self,
        room: &str,
        query: Query<'_, Postgres, PgArguments>,
    ) -> StoreResult<Vec<StoredMessage>> {
        let (_permit, mut conn, deadline) = self.read_conn().await?;
        let outcome = timeout_at(deadline, query.fetch_all(&mut *conn)).await;
        let rows = settle(conn, outcome)?;
        rows.iter()
            .map(|row| message_from_row(room, row).map_err(classify))
            .collect()
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn append_rooms(
        &self,
        batches: &[(&str, &[NewMessage])],
    ) -> StoreResult<Vec<Vec<Appended>>> {
        let nonempty: Vec<(&str, &[NewMessage])> = batches
            .iter()
            .copied()
            .filter(|(_, b)| !b.is_empty())
            .collect();
        let mut appended = if nonempty.is_empty() {
            Vec::new()
        } else {
            let deadline = self.deadline();
            let mut conn = self.conn(deadline).await?;
            let outcome = timeout_at(deadline, async {
                match append::one_statement(&mut conn, &nonempty).await? {
                    Some(appended) => Ok(appended),
                    None => {
                        metrics::counter!(m::STORE_KEYED_RETRIES).increment(1);
                        self.keyed_retries.fetch_add(1, Ordering::Relaxed);
                        append::in_transaction(&mut conn, &nonempty).await
                    }
                }
            })
            .await;
            settle(conn, outcome)?
        }
        .into_iter();
        // Empty batches answer with nothing, in their place.
        Ok(batches
            .iter()
            .map(|(_, b)| {
                if b.is_empty() {
                    Vec::new()
                } else {
                    appended.next().unwrap_or_default()
                }
            })
            .collect())
    }

    async fn room_info(&self, room: &str) -> StoreResult<RoomInfo> {
        // One statement, so both numbers come from the same snapshot.
        let query = sqlx::query_as::<_, (i64, Option<i64>)>(
            "SELECT COALESCE((SELECT head FROM rooms WHERE room = $1), 0), \
                    (SELECT min(seq) FROM messages WHERE room = $1)",
        )
        .bind(room);
        let (_permit, mut conn, deadline) = self.read_conn().await?;
        let outcome = timeout_at(deadline, query.fetch_one(&mut *conn)).await;
        let (head, first) = settle(conn, outcome)?;
        let info = batch::room_info_from_db(head, first).map_err(classify)?;
        Ok(info)
    }

    /// Seqs are dense from a room's oldest stored message to its head (retention deletes only
    /// the oldest), so the `limit` messages after `after` have seqs in `(after, after + limit]`.
    /// The read is bounded to that range: on `messages`' day partitions the planner, with the
    /// statistics of a day that was empty when last analyzed, sorts every row of the room past
    /// `after` rather than walking the index in order (a 100,000-message catch-up went from
    /// 340,000 to 35,000 messages/s). When retention deleted the start of the range, the page
    /// is read again without the bound.
    async fn read_after(
        &self,
        room: &str,
        after: u64,
        up_to: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        let up_to = up_to.unwrap_or(u64::MAX);
        let bounded = up_to.min(after.saturating_add(limit as u64));
        let page = self.read_range(room, after, bounded, limit).await?;
        let starts_at_next = page.first().is_some_and(|m| m.seq == after + 1);
        if starts_at_next || bounded >= up_to {
            return Ok(page);
        }
        self.read_range(room, after, up_to, limit).await
    }

    async fn read_before(
        &self,
        room: &str,
        before: u64,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        // Bounded to the `limit` seqs below `before`, for the reason given at `read_after`.
        // Exact when the page reaches `before - 1`: nothing below the oldest stored seq exists.
        // Otherwise `before` is past the head, and the page is read again without the bound.
        let floor = before.saturating_sub(limit as u64);
        let mut messages = self.read_below(room, before, floor, limit).await?;
        let touches = messages.first().is_some_and(|m| m.seq + 1 == before);
        if !touches && floor > 0 {
            messages = self.read_below(room, before, 0, limit).await?;
        }
        messages.reverse();
        Ok(messages)
    }

    async fn room_heads(&self, rooms: &[String]) -> StoreResult<Vec<(String, u64)>> {
        let query =
            sqlx::query_as::<_, (String, i64)>("SELECT room, head FROM rooms WHERE room = ANY($1)")
                .bind(rooms);
        let (_permit, mut conn, deadline) = self.read_conn().await?;
        let outcome = timeout_at(deadline, query.fetch_all(&mut *conn)).await;
        let rows = settle(conn, outcome)?;
        rows.into_iter()
            .map(|(room, head)| Ok((room, batch::seq_from_db(head).map_err(classify)?)))
            .collect()
    }

    async fn delete_before(&self, ts_ms: i64, limit: usize) -> StoreResult<u64> {
        let deadline = self.deadline();
        let mut conn = self.conn(deadline).await?;
        let query = sqlx::query_scalar::<_, String>(OLDEST_ROOMS)
            .bind(ts_ms)
            .bind(batch::limit_to_db(limit));
        let outcome = timeout_at(deadline, query.fetch_all(&mut *conn)).await;
        let rooms = settle(conn, outcome)?;
        // One deadline per room's statement: retention may have many rooms to go through.
        batch::delete_prefixes(rooms, limit, |room, budget| async move {
            let deadline = self.deadline();
            let mut conn = timeout_at(deadline, self.pool.acquire())
                .await
                .map_err(|_| timeout_error())??;
            let query = sqlx::query(DELETE_PREFIX)
                .bind(room)
                .bind(ts_ms)
                .bind(budget);
            let outcome = timeout_at(deadline, query.execute(&mut *conn)).await;
            Ok(settle_raw(conn, outcome)?.rows_affected())
        })
        .await
        .map_err(classify)
    }

    async fn drop_before(&self, ts_ms: i64) -> StoreResult<u64> {
        self.partition_ddl("SELECT seqcast_drop_partitions($1)", ts_ms)
            .await
    }

    async fn prepare_partitions(&self, now_ms: i64) -> StoreResult<u64> {
        self.partition_ddl(
            "SELECT seqcast_create_partitions($1, $1 + 3 * 86400000 + 1)",
            now_ms,
        )
        .await
    }

    async fn held_rooms(&self, rooms: &[&str]) -> StoreResult<HeldRooms> {
        // SKIP LOCKED takes the locks it can get: in a transaction of its own, rolled back at
        // once, so that they do not outlive this look.
        let deadline = self.deadline();
        let mut conn = self.conn(deadline).await?;
        let outcome = timeout_at(deadline, async {
            let mut tx = Connection::begin(&mut *conn).await?;
            let seen: Vec<String> =
                sqlx::query_scalar("SELECT room FROM rooms WHERE room = ANY($1)")
                    .bind(rooms)
                    .fetch_all(&mut *tx)
                    .await?;
            let free: Vec<String> = sqlx::query_scalar(
                "SELECT room FROM rooms WHERE room = ANY($1) FOR UPDATE SKIP LOCKED",
            )
            .bind(rooms)
            .fetch_all(&mut *tx)
            .await?;
            tx.rollback().await?;
            Ok((seen, free))
        })
        .await;
        let (seen, free) = settle(conn, outcome)?;
        Ok(HeldRooms {
            held: seen.iter().filter(|r| !free.contains(r)).cloned().collect(),
            unseen: rooms
                .iter()
                .filter(|r| !seen.iter().any(|s| s == *r))
                .map(|r| (*r).to_owned())
                .collect(),
        })
    }

    async fn mark_read(&self, user: &str, room: &str, seq: u64) -> StoreResult<ReadMark> {
        // A write: on the commit side of the pool, not a read permit.
        let deadline = self.deadline();
        let mut conn = self.conn(deadline).await?;
        let outcome = timeout_at(deadline, async {
            let raised: Option<i64> = sqlx::query_scalar(MARK_READ)
                .bind(user)
                .bind(room)
                .bind(batch::to_db(seq))
                .fetch_optional(&mut *conn)
                .await?;
            if let Some(seq) = raised {
                return Ok((seq, true));
            }
            // Not raised: read the cursor in a statement of its own. Within the upsert's
            // statement the snapshot may predate a concurrent mark that inserted the row (the
            // upsert waited for it, then found nothing to raise), and would answer 0.
            let current: Option<i64> =
                sqlx::query_scalar("SELECT seq FROM read_cursors WHERE user_id = $1 AND room = $2")
                    .bind(user)
                    .bind(room)
                    .fetch_optional(&mut *conn)
                    .await?;
            Ok::<_, sqlx::Error>((current.unwrap_or(0), false))
        })
        .await;
        let (seq, moved) = settle(conn, outcome)?;
        Ok(ReadMark {
            seq: batch::seq_from_db(seq).map_err(classify)?,
            moved,
        })
    }

    async fn room_info_with_read(&self, room: &str, user: &str) -> StoreResult<(RoomInfo, u64)> {
        // One statement, so the three numbers come from the same snapshot.
        let query = sqlx::query_as::<_, (i64, Option<i64>, i64)>(
            "SELECT COALESCE((SELECT head FROM rooms WHERE room = $1), 0), \
                    (SELECT min(seq) FROM messages WHERE room = $1), \
                    COALESCE((SELECT seq FROM read_cursors WHERE user_id = $2 AND room = $1), 0)",
        )
        .bind(room)
        .bind(user);
        let (_permit, mut conn, deadline) = self.read_conn().await?;
        let outcome = timeout_at(deadline, query.fetch_one(&mut *conn)).await;
        let (head, first, read) = settle(conn, outcome)?;
        let info = batch::room_info_from_db(head, first).map_err(classify)?;
        let read = batch::seq_from_db(read).map_err(classify)?;
        Ok((info, read))
    }

    async fn unread(&self, user: &str, after: &str, limit: usize) -> StoreResult<Vec<Unread>> {
        // read_cursors.room is COLLATE "C" (0004): bytewise, as SQLite orders, whatever the
        // database's collation; a range scan of the table's key.
        let query = sqlx::query_as::<_, (String, i64, i64)>(
            "SELECT c.room, r.head, c.seq FROM read_cursors c \
             JOIN rooms r ON r.room = c.room \
             WHERE c.user_id = $1 AND c.room > $2 ORDER BY c.room LIMIT $3",
        )
        .bind(user)
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        let (_permit, mut conn, deadline) = self.read_conn().await?;
        let outcome = timeout_at(deadline, query.fetch_all(&mut *conn)).await;
        let rows = settle(conn, outcome)?;
        batch::unread_from_db(rows).map_err(classify)
    }

    async fn ping(&self) -> StoreResult<()> {
        let deadline = self.deadline();
        let mut conn = self.conn(deadline).await?;
        let outcome = timeout_at(deadline, sqlx::query("SELECT 1").execute(&mut *conn)).await;
        settle(conn, outcome)?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn roster(&self) -> Option<Roster> {
        Some(Roster::new(self.pool.clone(), self.timeout))
    }
}

/// Stores what `seqcast_publish` needs of this node's configuration in `seqcast_settings`
/// (migration 0003), so that a message published from SQL is held to the same limits as one
/// sent over a WebSocket. Nodes sharing a database should share these settings: the last node
/// started wins.
async fn write_settings(
    pool: &PgPool,
    options: &StoreOptions,
    deadline: Instant,
) -> StoreResult<()> {
    let Some(max_message_bytes) = options.max_message_bytes else {
        return Ok(());
    };
    let query = sqlx::query(
        "INSERT INTO seqcast_settings (name, value) VALUES ('max_message_bytes', $1) \
         ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value \
         WHERE seqcast_settings.value IS DISTINCT FROM EXCLUDED.value",
    )
    .bind(i64::try_from(max_message_bytes).unwrap_or(i64::MAX));
    timeout_at(deadline, query.execute(pool))
        .await
        .map_err(|_| timed_out())?
        .map_err(classify)?;
    Ok(())
}

/// Dropping or attaching a partition locks `messages` (or its DEFAULT partition) exclusively,
/// and must first wait for the statements under way on it; every statement arriving meanwhile
/// queues behind that wait. Giving up after this long bounds how long reads and commits can be
/// held up; the job tries again at its next run.
const PARTITION_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '500ms'";

/// [`Store::delete_before`], first step: the rooms of the `$2` oldest messages older than `$1`,
/// the room of the oldest first. Reads no more than `$2` entries of the `ts_ms` index.
const OLDEST_ROOMS: &str = "\
    SELECT room FROM ( \
        SELECT room, ts_ms FROM messages WHERE ts_ms < $1 ORDER BY ts_ms LIMIT $2 \
    ) AS oldest \
    GROUP BY room ORDER BY min(ts_ms)";

/// [`Store::delete_before`], second step, once per room: deletes the prefix of room `$1` that is
/// older than `$2`, at most `$3` messages. It looks at the room's `$3` first messages (in seq
/// order, through the primary key) and deletes those below the first one that is not older than
/// `$2` (all of them when there is none), so the room loses a prefix and never a message from
/// the middle.
const DELETE_PREFIX: &str = "\
    WITH first_n AS ( \
        SELECT seq, ts_ms FROM messages WHERE room = $1 ORDER BY seq LIMIT $3 \
    ) \
    DELETE FROM messages WHERE room = $1 AND seq IN ( \
        SELECT seq FROM first_n WHERE seq < ( \
            SELECT COALESCE(min(CASE WHEN ts_ms >= $2 THEN seq END), max(seq) + 1) \
            FROM first_n))";

/// [`Store::mark_read`]: raises the cursor of user `$1` in room `$2` to `$3` capped at the
/// room's head, if that is higher than the cursor (and above 0), and returns it; no row when
/// nothing moved. Concurrent calls for one cursor serialize on its row, and the `ON CONFLICT
/// ... WHERE` is checked against the row's latest version, so the larger seq wins whatever the
/// order.
const MARK_READ: &str = "\
    INSERT INTO read_cursors (user_id, room, seq) \
    SELECT $1, $2, LEAST($3, head) FROM rooms WHERE room = $2 AND LEAST($3, head) > 0 \
    ON CONFLICT (user_id, room) DO UPDATE SET seq = excluded.seq \
        WHERE excluded.seq > read_cursors.seq \
    RETURNING seq";

/// Reads the columns `seq, id, sender, body, ts_ms` of `row`. The `UUID` travels as text
/// (`id::text`): sqlx is built without its `uuid` feature.
fn message_from_row(room: &str, row: &PgRow) -> Result<StoredMessage, sqlx::Error> {
    Ok(StoredMessage {
        room: room.to_owned(),
        seq: batch::seq_from_db(row.try_get("seq")?)?,
        id: batch::id_from_db(row.try_get("id")?)?,
        sender: row.try_get("sender")?,
        body: row.try_get("body")?,
        ts_ms: row.try_get("ts_ms")?,
    })
}

/// The error of an operation that missed its deadline: the database may be paused, overloaded
/// or unreachable; nothing is known to be stored, retry. An I/O error, so [`classify`] makes it
/// [`StoreError::Unavailable`].
fn timeout_error() -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the database did not answer in time",
    ))
}

fn timed_out() -> StoreError {
    classify(timeout_error())
}

/// The result of an operation on `conn` run under a deadline. When the deadline cut the
/// operation off, `conn` is mid-statement: it is detached from the pool and dropped (its socket
/// closed) rather than handed back, where the pool would test it with a ping that a paused
/// database never answers, holding the connection's slot that long.
fn settle_raw<T>(
    conn: PoolConnection<Postgres>,
    outcome: Result<Result<T, sqlx::Error>, tokio::time::error::Elapsed>,
) -> Result<T, sqlx::Error> {
    match outcome {
        Ok(result) => result,
        Err(_) => {
            drop(conn.detach());
            Err(timeout_error())
        }
    }
}

/// [`settle_raw`], classified.
fn settle<T>(
    conn: PoolConnection<Postgres>,
    outcome: Result<Result<T, sqlx::Error>, tokio::time::error::Elapsed>,
) -> StoreResult<T> {
    settle_raw(conn, outcome).map_err(classify)
}

/// Sorts a failure into "the database cannot serve now, retry later" and everything else.
fn classify(err: sqlx::Error) -> StoreError {
    let unavailable = match &err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| unavailable_sqlstate(&code)),
        _ => false,
    };
    if unavailable {
        StoreError::Unavailable(err)
    } else {
        StoreError::Other(err)
    }
}

/// SQLSTATEs that mean the server cannot take the write now, whatever the statement.
fn unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources: disk full, out of memory, too many connections
        || code.starts_with("57P0") // shutting down, crashed, starting up, database dropped
        || code == "25006" // read-only transaction: connected to a standby, e.g. right after a failover
        // The transaction was rolled back or the statement cancelled, nothing stored; the same
        // write may well succeed when retried:
        || code == "40P01" // deadlock detected
        || code == "40001" // serialization failure
        || code == "57014" // query canceled (statement_timeout, or an operator's cancel)
        || code == "55P03" // lock not available (lock_timeout)
}

#[cfg(test)]
mod tests {
    use super::{read_permits, unavailable_sqlstate};

    #[test]
    fn reads_leave_connections_for_commits() {
        assert_eq!(read_permits(16), 12);
        assert_eq!(read_permits(8), 4);
        assert_eq!(read_permits(4), 2);
        assert_eq!(read_permits(2), 1);
        assert_eq!(read_permits(1), 1);
    }

    #[test]
    fn retryable_sqlstates_are_unavailable() {
        for code in [
            "08006", "53100", "53300", "57P01", "57P03", "25006", "40P01", "40001", "57014",
            "55P03",
        ] {
            assert!(unavailable_sqlstate(code), "{code}");
        }
        // Bad data (a NUL in text, a broken encoding) and constraint violations are not.
        for code in ["22021", "22P05", "23505", "42601", "42P01"] {
            assert!(!unavailable_sqlstate(code), "{code}");
        }
    }
}
