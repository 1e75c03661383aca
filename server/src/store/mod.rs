//! Durable message storage: the single source of truth.
//!
//! Every message is committed here before anyone hears of it. A room's `seq` is assigned inside
//! the same transaction as the insert, so sequence numbers have no holes and become visible in
//! order. Two implementations sit behind [`Store`]: Postgres for clusters and SQLite for the
//! zero-config single node; both pass the same contract suite (`server/tests/store_contract.rs`).

mod batch;
#[cfg(test)]
pub(crate) mod instrumented;
mod postgres;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{Migrate, MigrateError, Migration, Migrator};

pub use postgres::{
    Beat, Listed, PostgresStore, Roster, DEFAULT_POOL_SIZE as DEFAULT_DB_POOL_SIZE,
    DEFAULT_TIMEOUT as DEFAULT_DB_TIMEOUT, PRESENCE_CHANNEL,
};
pub use sqlite::SqliteStore;

/// A message waiting to be committed.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// User id of the sender (the `from` of the message).
    pub sender: String,
    /// The message body as serialized JSON text; stored and replayed byte for byte.
    pub body: String,
    /// Optional idempotency key, unique per (room, sender, idem).
    pub idem: Option<String>,
}

pub use seqcast_protocol::StoredMessage;

/// The outcome of one message of an [`Store::append`] batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub message: StoredMessage,
    /// True when the (room, sender, idem) key was already stored (earlier, or earlier in the same
    /// batch): `message` is then the original and nothing new was stored.
    pub duplicate: bool,
}

/// What [`Store::held_rooms`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeldRooms {
    /// Rooms whose row another transaction has locked.
    pub held: Vec<String>,
    /// Rooms without a row this node can see: never written to, or being written to for the
    /// first time by a transaction that has not ended (its new row is invisible, and waited
    /// for). Which of the two cannot be told from here.
    pub unseen: Vec<String>,
}

/// A room's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomInfo {
    /// Last committed `seq`; 0 for a room never written to.
    pub head: u64,
    /// Oldest `seq` still stored; `head + 1` when none is stored.
    pub first: u64,
}

/// A user's read cursor after [`Store::mark_read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadMark {
    /// The cursor now (0: the user has none in the room).
    pub seq: u64,
    /// Whether this call raised it.
    pub moved: bool,
}

/// One room of a user's read cursors, as `GET /v1/unread` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unread {
    pub room: String,
    pub head: u64,
    pub read: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or cannot commit right now; nothing was stored. (One
    /// exception no client library can rule out: when the connection breaks while `COMMIT` is
    /// in flight, the commit may have happened. Retrying with the same `idem` is always safe: it
    /// then returns the original.)
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Other(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Opened with migrations off (`SEQCAST_MIGRATE=false`) and the database lacks some of the
    /// migrations this build carries: its statements could fail on the old schema.
    #[error(
        "schema not current: {pending} of {known} migrations not applied (apply them with \
         `seqcast migrate`)"
    )]
    SchemaNotCurrent { pending: usize, known: usize },
}

impl StoreError {
    /// A room's lock was waited for until `lock_timeout` (Postgres's 55P03): another
    /// transaction held it that long, typically an application's open `seqcast_publish`
    /// transaction. The database itself answered; only the rooms held are stuck.
    pub fn lock_timed_out(&self) -> bool {
        match self {
            StoreError::Unavailable(sqlx::Error::Database(db)) => {
                db.code().as_deref() == Some(LOCK_NOT_AVAILABLE)
            }
            _ => false,
        }
    }

    /// The database did not answer within the operation's deadline (`SEQCAST_DB_TIMEOUT`),
    /// waiting for a connection included: it is paused, overloaded or unreachable, rather than
    /// refusing this one operation (a deadlock, a broken connection). Callers use it to stop
    /// queueing more work behind a database that is not answering.
    pub fn timed_out(&self) -> bool {
        match self {
            StoreError::Unavailable(sqlx::Error::PoolTimedOut) => true,
            StoreError::Unavailable(sqlx::Error::Io(e)) => e.kind() == std::io::ErrorKind::TimedOut,
            _ => false,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Postgres's SQLSTATE for a lock wait cut off by `lock_timeout`.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// Storage backend. Implementations must be cheap to share (`Arc<dyn Store>`).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Commits `batch` to `room` in one transaction and returns one [`Appended`] per input, in
    /// input order. New messages get consecutive seqs after the room's head, in input order.
    /// Either the whole batch commits or nothing does. A group of one: [`Store::append_rooms`].
    async fn append(&self, room: &str, batch: &[NewMessage]) -> StoreResult<Vec<Appended>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut appended = self.append_rooms(&[(room, batch)]).await?;
        Ok(appended.pop().unwrap_or_default())
    }

    /// Commits several rooms' batches in one transaction: all of them or none. Returns, per
    /// room and in input order, what [`Store::append`] returns for it alone. Rooms must be
    /// distinct and listed in ascending byte order (how Rust orders `str`, Postgres's "C"
    /// collation): every writer then takes the rooms' locks in the same order, so two nodes
    /// committing overlapping groups cannot deadlock. Backends must lock in that order too,
    /// whatever collation the database uses.
    async fn append_rooms(
        &self,
        batches: &[(&str, &[NewMessage])],
    ) -> StoreResult<Vec<Vec<Appended>>>;

    /// The room's head and first stored seq (`head 0, first 1` for an unknown room).
    async fn room_info(&self, room: &str) -> StoreResult<RoomInfo>;

    /// Up to `limit` messages with `after < seq <= up_to` (no upper bound when `up_to` is None),
    /// ascending.
    async fn read_after(
        &self,
        room: &str,
        after: u64,
        up_to: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>>;

    /// The `limit` messages just below `before` (`seq < before`), returned in ascending order.
    async fn read_before(
        &self,
        room: &str,
        before: u64,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>>;

    /// The heads of those of `rooms` that were ever written to (others are left out), in one
    /// query: how a node finds messages it missed on the bus.
    async fn room_heads(&self, rooms: &[String]) -> StoreResult<Vec<(String, u64)>>;

    /// Retention: deletes at most `limit` messages committed before `ts_ms` (milliseconds since
    /// the Unix epoch), oldest first, from any rooms, and returns how many it deleted.
    ///
    /// Only a prefix of each room is ever deleted, so what is stored of a room stays one run of
    /// seqs, `first..=head`, and a replay from `first` has no gap. A message is deleted only
    /// together with, or after, every earlier message of its room: an old message stored after a
    /// newer one (the clocks of two nodes disagree) waits until that one is old too. Each room's
    /// prefix goes in one statement, so running this on several nodes at once is harmless.
    ///
    /// The room's head is never touched: seqs continue after it, and `room_info().first` moves
    /// up (to `head + 1` once nothing is left). The idempotency key lives on the message row, so
    /// it expires with its message: a retry with the same `idem` after that stores a new message.
    ///
    /// A result below `limit` means whatever old messages are left have to wait for a later call.
    async fn delete_before(&self, ts_ms: i64, limit: usize) -> StoreResult<u64>;

    /// Retention at volume: drops whole the time partitions of messages whose every message is
    /// older than `ts_ms`, and returns how many it dropped. Postgres only (migration 0006: one
    /// partition per UTC day); the default (SQLite) has none and drops nothing. What is left
    /// older than `ts_ms` (the partition straddling the cut, the DEFAULT partition) is for
    /// [`Store::delete_before`], which the retention job calls next.
    ///
    /// What a reader sees is as with [`Store::delete_before`]: a prefix of each room goes, at
    /// once, and `room_info().first` is right as soon as this returns. Relies on a room's
    /// `ts_ms` following its seqs, which the database's clock read under the room's lock gives.
    async fn drop_before(&self, _ts_ms: i64) -> StoreResult<u64> {
        Ok(0)
    }

    /// Maintenance: makes sure messages committed from `now_ms` to three days later have a
    /// partition of their own (Postgres; the default does nothing) rather than the DEFAULT
    /// partition, and returns how many partitions it created. Idempotent.
    async fn prepare_partitions(&self, _now_ms: i64) -> StoreResult<u64> {
        Ok(0)
    }

    /// Which of `rooms` another transaction holds locked right now: on Postgres, an
    /// application's transaction that called `seqcast_publish` and has not ended. The writer
    /// asks after a commit failed with [`StoreError::lock_timed_out`], to answer the rooms held
    /// `unavailable` and commit the others of the group. The default (SQLite, where the node is
    /// the only writer) is that none is.
    async fn held_rooms(&self, _rooms: &[&str]) -> StoreResult<HeldRooms> {
        Ok(HeldRooms::default())
    }

    /// Read cursors: raises `user`'s cursor in `room` to `seq`, capped at the room's head; a
    /// cursor never moves back. A cursor of 0 is never stored (a room never written to, or
    /// `seq` 0): the user then has none in the room. Two connections of one user marking at
    /// once end at the larger seq, and each is answered a cursor at least as high as its own
    /// (capped) seq, never an older one.
    async fn mark_read(&self, user: &str, room: &str, seq: u64) -> StoreResult<ReadMark>;

    /// [`Store::room_info`] and `user`'s read cursor in the room (0 if none), from one snapshot:
    /// what a `joined` carries.
    async fn room_info_with_read(&self, room: &str, user: &str) -> StoreResult<(RoomInfo, u64)>;

    /// The rooms where `user` has a read cursor, with each room's head, ordered by room name
    /// (bytewise): the first `limit` whose name is greater than `after` (`""` for the first).
    async fn unread(&self, user: &str, after: &str, limit: usize) -> StoreResult<Vec<Unread>>;

    /// Cheap liveness check used by `/ready`.
    async fn ping(&self) -> StoreResult<()>;

    /// Short name for logs and `/ready` ("postgres" or "sqlite").
    fn kind(&self) -> &'static str;

    /// The cluster's presence roster, on this store's connections: Postgres only (a SQLite
    /// node is a single node, whose presence is all in its memory).
    fn roster(&self) -> Option<Roster> {
        None
    }
}

/// How a node opens its store.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Deadline of every Postgres operation (`SEQCAST_DB_TIMEOUT`).
    pub timeout: Duration,
    /// Postgres connections at most (`SEQCAST_DB_POOL_SIZE`, at least 1); SQLite's are fixed.
    pub pool_size: u32,
    /// Apply pending migrations (`SEQCAST_MIGRATE`). Without, opening fails with
    /// [`StoreError::SchemaNotCurrent`] until someone else has applied them.
    pub migrate: bool,
    /// The largest `body` (`SEQCAST_MAX_MESSAGE_BYTES`), for a node: Postgres stores it in
    /// `seqcast_settings` at start-up, where `seqcast_publish` reads it. `None` (`seqcast
    /// migrate`, which serves nothing) leaves the row as the nodes wrote it.
    pub max_message_bytes: Option<usize>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            timeout: DEFAULT_DB_TIMEOUT,
            pool_size: DEFAULT_DB_POOL_SIZE,
            migrate: true,
            max_message_bytes: Some(DEFAULT_MAX_MESSAGE_BYTES),
        }
    }
}

/// The default of `SEQCAST_MAX_MESSAGE_BYTES`, also the `seqcast_settings` row a Postgres
/// database starts with (migration 0003).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 65536;

/// Opens the store named by `url` (`postgres://…` or `sqlite://path`) and applies migrations
/// (or, with `options.migrate` off, checks that they are applied).
pub async fn connect(url: &str, options: &StoreOptions) -> StoreResult<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::open(url, options).await?))
    } else {
        Ok(Arc::new(SqliteStore::open(url, options.migrate).await?))
    }
}

/// Fails with [`StoreError::SchemaNotCurrent`] unless every migration of `migrator` is applied
/// (and not left half-done) on `conn`. `table_exists`: whether the migrations table is there at
/// all (the dialects ask differently); reading it does not create it, so a node that does not
/// migrate writes nothing to the schema.
async fn check_schema(
    migrator: &Migrator,
    conn: &mut impl Migrate,
    table_exists: bool,
) -> StoreResult<()> {
    let known: Vec<&Migration> = migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .collect();
    let applied = if table_exists {
        if let Some(version) = conn.dirty_version().await? {
            return Err(MigrateError::Dirty(version).into());
        }
        conn.list_applied_migrations().await?
    } else {
        Vec::new()
    };
    let mut pending = 0;
    for migration in &known {
        match applied.iter().find(|a| a.version == migration.version) {
            // Changed since it was applied: `sqlx migrate run` would refuse it too.
            Some(a) if a.checksum != migration.checksum => {
                return Err(MigrateError::VersionMismatch(migration.version).into())
            }
            Some(_) => {}
            None => pending += 1,
        }
    }
    if pending > 0 {
        return Err(StoreError::SchemaNotCurrent {
            pending,
            known: known.len(),
        });
    }
    Ok(())
}
