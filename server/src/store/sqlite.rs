//! SQLite backend: the zero-configuration store for a single node. Same semantics as the
//! Postgres store; SQLite's single-writer model does the serializing that the counter row's lock
//! does there.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::query::Query;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, SqliteConnection};

use super::batch::{self, KeyedMessage};
use super::{
    Appended, NewMessage, ReadMark, RoomInfo, Store, StoreError, StoreResult, StoredMessage, Unread,
};

/// Read connections. WAL mode lets readers run alongside the writer and each other.
const READ_CONNECTIONS: u32 = 4;

/// How long a query waits for a pooled connection, and SQLite for a lock held by another
/// connection (another process on the same file, or a checkpoint), before giving up with
/// [`StoreError::Unavailable`].
const TIMEOUT: Duration = Duration::from_secs(5);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The only connection that writes. SQLite allows one writer at a time; queueing appends on
    /// this one-connection pool is cheaper than having several connections fight over the lock.
    writer: SqlitePool,
    /// Connections for reads (opened `query_only`).
    readers: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating it if missing) the database named by `url` (`sqlite://path`) and applies
    /// pending migrations.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        Self::open(url, true).await
    }

    /// [`SqliteStore::connect`]; with `migrate` false, pending migrations are not applied but
    /// make it fail with [`StoreError::SchemaNotCurrent`].
    pub async fn open(url: &str, migrate: bool) -> StoreResult<Self> {
        // WAL: readers never block the writer nor the writer readers. synchronous=FULL: the WAL
        // is fsynced at every commit, so a commit, which is what an ack promises, survives a
        // power loss (NORMAL, the usual WAL pairing, may lose the last commits).
        let options = SqliteConnectOptions::from_str(url)
            .map_err(classify)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(TIMEOUT);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(TIMEOUT)
            .connect_with(options.clone())
            .await
            .map_err(classify)?;
        if migrate {
            MIGRATOR.run(&writer).await?;
        } else {
            let mut conn = writer.acquire().await.map_err(classify)?;
            let exists: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master \
                 WHERE type = 'table' AND name = '_sqlx_migrations')",
            )
            .fetch_one(&mut *conn)
            .await
            .map_err(classify)?;
            super::check_schema(&MIGRATOR, &mut *conn, exists).await?;
        }
        let readers = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .acquire_timeout(TIMEOUT)
            .connect_with(options.pragma("query_only", "ON"))
            .await
            .map_err(classify)?;
        Ok(Self { writer, readers })
    }

    /// The body of [`Store::append`], inside a `BEGIN IMMEDIATE` transaction on the writer: the
    /// write lock is held from the first statement on, so the head read here cannot move before
    /// the commit, and seqs come out without holes (a rollback also rolls back the head).
    async fn append_in(
        conn: &mut SqliteConnection,
        room: &str,
        batch: &[NewMessage],
    ) -> Result<Vec<Appended>, sqlx::Error> {
        let head: Option<i64> = sqlx::query_scalar("SELECT head FROM rooms WHERE room = ?1")
            .bind(room)
            .fetch_optional(&mut *conn)
            .await?;
        let ts_ms = batch::now_ms();

        // Point lookups on the unique key index; in-process, one query per key costs little.
        let mut stored = Vec::new();
        for message in batch {
            let Some(idem) = &message.idem else { continue };
            let row = sqlx::query(
                "SELECT seq, id, sender, body, ts_ms FROM messages \
                 WHERE room = ?1 AND sender = ?2 AND idem = ?3",
            )
            .bind(room)
            .bind(&message.sender)
            .bind(idem)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(row) = row {
                stored.push(KeyedMessage {
                    idem: idem.clone(),
                    message: message_from_row(room, &row)?,
                });
            }
        }

        let head = batch::seq_from_db(head.unwrap_or(0))?;
        let plan = batch::plan(room, head, ts_ms, batch, stored);
        if plan.new.is_empty() {
            return Ok(plan.results);
        }
        for &i in &plan.new {
            let message = &plan.results[i].message;
            sqlx::query(
                "INSERT INTO messages (room, seq, id, sender, body, idem, ts_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .bind(room)
            .bind(batch::to_db(message.seq))
            .bind(message.id.to_string())
            .bind(&message.sender)
            .bind(&message.body)
            .bind(batch[i].idem.as_deref())
            .bind(ts_ms)
            .execute(&mut *conn)
            .await?;
        }
        sqlx::query(
            "INSERT INTO rooms (room, head) VALUES (?1, ?2) \
             ON CONFLICT (room) DO UPDATE SET head = excluded.head",
        )
        .bind(room)
        .bind(batch::to_db(plan.head))
        .execute(&mut *conn)
        .await?;
        Ok(plan.results)
    }

    /// Runs a query for [`message_from_row`]'s columns on a read connection.
    async fn fetch_messages<'q>(
        &self,
        room: &str,
        query: Query<'q, Sqlite, SqliteArguments<'q>>,
    ) -> StoreResult<Vec<StoredMessage>> {
        let rows = query.fetch_all(&self.readers).await.map_err(classify)?;
        rows.iter()
            .map(|row| message_from_row(room, row).map_err(classify))
            .collect()
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn append_rooms(
        &self,
        batches: &[(&str, &[NewMessage])],
    ) -> StoreResult<Vec<Vec<Appended>>> {
        // IMMEDIATE takes the write lock at BEGIN rather than at the first write, so the
        // transaction never has to upgrade a read snapshot that another writer made stale.
        // Dropping `tx` without committing (on error, or if this future is dropped) rolls back
        // before the connection is used again.
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(classify)?;
        let mut appended = Vec::with_capacity(batches.len());
        for (room, batch) in batches {
            appended.push(if batch.is_empty() {
                Vec::new()
            } else {
                Self::append_in(&mut tx, room, batch)
                    .await
                    .map_err(classify)?
            });
        }
        tx.commit().await.map_err(classify)?;
        Ok(appended)
    }

    async fn room_info(&self, room: &str) -> StoreResult<RoomInfo> {
        // One statement, so both numbers come from the same snapshot.
        let (head, first): (i64, Option<i64>) = sqlx::query_as(
            "SELECT COALESCE((SELECT head FROM rooms WHERE room = ?1), 0), \
                    (SELECT min(seq) FROM messages WHERE room = ?1)",
        )
        .bind(room)
        .fetch_one(&self.readers)
        .await
        .map_err(classify)?;
        let info = batch::room_info_from_db(head, first).map_err(classify)?;
        Ok(info)
    }

    async fn read_after(
        &self,
        room: &str,
        after: u64,
        up_to: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        let query = sqlx::query(
            "SELECT seq, id, sender, body, ts_ms FROM messages \
             WHERE room = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY seq LIMIT ?4",
        )
        .bind(room)
        .bind(batch::to_db(after))
        .bind(batch::to_db(up_to.unwrap_or(u64::MAX)))
        .bind(batch::limit_to_db(limit));
        self.fetch_messages(room, query).await
    }

    async fn read_before(
        &self,
        room: &str,
        before: u64,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        let query = sqlx::query(
            "SELECT seq, id, sender, body, ts_ms FROM messages \
             WHERE room = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
        )
        .bind(room)
        .bind(batch::to_db(before))
        .bind(batch::limit_to_db(limit));
        let mut messages = self.fetch_messages(room, query).await?;
        messages.reverse();
        Ok(messages)
    }

    async fn room_heads(&self, rooms: &[String]) -> StoreResult<Vec<(String, u64)>> {
        // The list travels as one JSON array: SQLite has no array parameters.
        let list =
            serde_json::to_string(rooms).map_err(|e| classify(sqlx::Error::Encode(Box::new(e))))?;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT room, head FROM rooms WHERE room IN (SELECT value FROM json_each(?1))",
        )
        .bind(list)
        .fetch_all(&self.readers)
        .await
        .map_err(classify)?;
        rows.into_iter()
            .map(|(room, head)| Ok((room, batch::seq_from_db(head).map_err(classify)?)))
            .collect()
    }

    async fn delete_before(&self, ts_ms: i64, limit: usize) -> StoreResult<u64> {
        let rooms: Vec<String> = sqlx::query_scalar(OLDEST_ROOMS)
            .bind(ts_ms)
            .bind(batch::limit_to_db(limit))
            .fetch_all(&self.readers)
            .await
            .map_err(classify)?;
        batch::delete_prefixes(rooms, limit, |room, budget| async move {
            let done = sqlx::query(DELETE_PREFIX)
                .bind(room)
                .bind(ts_ms)
                .bind(budget)
                .execute(&self.writer)
                .await?;
            Ok(done.rows_affected())
        })
        .await
        .map_err(classify)
    }

    async fn mark_read(&self, user: &str, room: &str, seq: u64) -> StoreResult<ReadMark> {
        // On the writer, in one transaction: the upsert raises the cursor only if the capped seq
        // is higher (its RETURNING then gives it), else the cursor as it stands is read.
        let mut tx = self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(classify)?;
        let raised: Option<i64> = sqlx::query_scalar(MARK_READ)
            .bind(user)
            .bind(room)
            .bind(batch::to_db(seq))
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
        let mark = match raised {
            Some(seq) => ReadMark {
                seq: batch::seq_from_db(seq).map_err(classify)?,
                moved: true,
            },
            None => {
                let seq: Option<i64> = sqlx::query_scalar(
                    "SELECT seq FROM read_cursors WHERE user_id = ?1 AND room = ?2",
                )
                .bind(user)
                .bind(room)
                .fetch_optional(&mut *tx)
                .await
                .map_err(classify)?;
                ReadMark {
                    seq: batch::seq_from_db(seq.unwrap_or(0)).map_err(classify)?,
                    moved: false,
                }
            }
        };
        tx.commit().await.map_err(classify)?;
        Ok(mark)
    }

    async fn room_info_with_read(&self, room: &str, user: &str) -> StoreResult<(RoomInfo, u64)> {
        // One statement, so the three numbers come from the same snapshot.
        let (head, first, read): (i64, Option<i64>, i64) = sqlx::query_as(
            "SELECT COALESCE((SELECT head FROM rooms WHERE room = ?1), 0), \
                    (SELECT min(seq) FROM messages WHERE room = ?1), \
                    COALESCE((SELECT seq FROM read_cursors WHERE user_id = ?2 AND room = ?1), 0)",
        )
        .bind(room)
        .bind(user)
        .fetch_one(&self.readers)
        .await
        .map_err(classify)?;
        let info = batch::room_info_from_db(head, first).map_err(classify)?;
        let read = batch::seq_from_db(read).map_err(classify)?;
        Ok((info, read))
    }

    async fn unread(&self, user: &str, after: &str, limit: usize) -> StoreResult<Vec<Unread>> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT c.room, r.head, c.seq FROM read_cursors c \
             JOIN rooms r ON r.room = c.room WHERE c.user_id = ?1 AND c.room > ?2 \
             ORDER BY c.room LIMIT ?3",
        )
        .bind(user)
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.readers)
        .await
        .map_err(classify)?;
        batch::unread_from_db(rows).map_err(classify)
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.readers)
            .await
            .map_err(classify)?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }
}

/// [`Store::delete_before`], first step: the rooms of the `?2` oldest messages older than `?1`;
/// the same query as the Postgres store's.
const OLDEST_ROOMS: &str = "\
    SELECT room FROM ( \
        SELECT room, ts_ms FROM messages WHERE ts_ms < ?1 ORDER BY ts_ms LIMIT ?2 \
    ) AS oldest \
    GROUP BY room ORDER BY min(ts_ms)";

/// [`Store::delete_before`], second step, once per room: deletes at most `?3` messages of the
/// prefix of room `?1` older than `?2`; the same query as the Postgres store's, which explains it.
const DELETE_PREFIX: &str = "\
    WITH first_n AS ( \
        SELECT seq, ts_ms FROM messages WHERE room = ?1 ORDER BY seq LIMIT ?3 \
    ) \
    DELETE FROM messages WHERE room = ?1 AND seq IN ( \
        SELECT seq FROM first_n WHERE seq < ( \
            SELECT COALESCE(min(CASE WHEN ts_ms >= ?2 THEN seq END), max(seq) + 1) \
            FROM first_n))";

/// [`Store::mark_read`]: raises the cursor of user `?1` in room `?2` to `?3` capped at the
/// room's head, if that is higher than the cursor (and above 0), and returns it; no row when
/// nothing moved. (The `WHERE` of the `SELECT` also keeps SQLite's parser from reading the
/// `ON CONFLICT` as part of a join.)
const MARK_READ: &str = "\
    INSERT INTO read_cursors (user_id, room, seq) \
    SELECT ?1, ?2, min(?3, head) FROM rooms WHERE room = ?2 AND min(?3, head) > 0 \
    ON CONFLICT (user_id, room) DO UPDATE SET seq = excluded.seq \
        WHERE excluded.seq > read_cursors.seq \
    RETURNING seq";

/// Reads the columns `seq, id, sender, body, ts_ms` of `row`.
fn message_from_row(room: &str, row: &SqliteRow) -> Result<StoredMessage, sqlx::Error> {
    Ok(StoredMessage {
        room: room.to_owned(),
        seq: batch::seq_from_db(row.try_get("seq")?)?,
        id: batch::id_from_db(row.try_get("id")?)?,
        sender: row.try_get("sender")?,
        body: row.try_get("body")?,
        ts_ms: row.try_get("ts_ms")?,
    })
}

/// Sorts a failure into "the database cannot serve now, retry later" and everything else.
fn classify(err: sqlx::Error) -> StoreError {
    let unavailable = match &err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| unavailable_result_code(code & 0xff)),
        _ => false,
    };
    if unavailable {
        StoreError::Unavailable(err)
    } else {
        StoreError::Other(err)
    }
}

/// SQLite primary result codes (sqlx reports the extended code; the low byte is the primary one)
/// that mean the write cannot happen now but may later.
fn unavailable_result_code(primary: i32) -> bool {
    const SQLITE_BUSY: i32 = 5;
    const SQLITE_LOCKED: i32 = 6;
    const SQLITE_IOERR: i32 = 10;
    const SQLITE_FULL: i32 = 13;
    matches!(
        primary,
        SQLITE_BUSY | SQLITE_LOCKED | SQLITE_IOERR | SQLITE_FULL
    )
}
