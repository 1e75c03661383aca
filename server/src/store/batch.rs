//! The backend-independent half of [`Store::append`](super::Store::append): given what the
//! database already holds, decide which messages of a batch are new, which repeat an idempotency
//! key, and which seqs the new ones get. Both backends call [`plan`] inside their transaction,
//! after taking the room's write lock, so the seqs and keys it sees cannot change under it.
//! Postgres's one-statement commit also calls it up front, with head 0 and nothing stored, to
//! answer keys repeated within a batch, and moves the seqs up once the statement has locked the
//! room (see `postgres::append::one_statement`).

use std::collections::HashMap;

use uuid::Uuid;

use super::{Appended, NewMessage, RoomInfo, StoredMessage, Unread};

/// A stored message that carries an idempotency key, as found by a backend's key lookup.
pub(super) struct KeyedMessage {
    pub idem: String,
    pub message: StoredMessage,
}

/// What an append batch does to the room.
pub(super) struct Plan {
    /// One entry per input message, in input order: what `append` returns.
    pub results: Vec<Appended>,
    /// Indexes (into `results` and the batch alike) of the messages to insert, in seq order.
    pub new: Vec<usize>,
    /// The room's head once the new messages are inserted.
    pub head: u64,
}

/// Plans `batch` for `room`, whose current head is `head`. `stored` holds the already stored
/// messages whose (sender, idem) key occurs in the batch (extra ones do no harm). New messages get
/// seqs `head + 1, head + 2, ...` in input order, a fresh UUIDv7 and `ts_ms`. A key that is
/// stored, or that occurs earlier in the batch, makes the message a duplicate of that original.
pub(super) fn plan(
    room: &str,
    head: u64,
    ts_ms: i64,
    batch: &[NewMessage],
    stored: Vec<KeyedMessage>,
) -> Plan {
    let mut originals: HashMap<(String, String), StoredMessage> = stored
        .into_iter()
        .map(|k| ((k.message.sender.clone(), k.idem), k.message))
        .collect();
    let mut results = Vec::with_capacity(batch.len());
    let mut new = Vec::with_capacity(batch.len());
    let mut head = head;
    for input in batch {
        let key = input
            .idem
            .as_ref()
            .map(|idem| (input.sender.clone(), idem.clone()));
        if let Some(original) = key.as_ref().and_then(|key| originals.get(key)) {
            results.push(Appended {
                message: original.clone(),
                duplicate: true,
            });
            continue;
        }
        head += 1;
        let message = StoredMessage {
            room: room.to_owned(),
            seq: head,
            id: Uuid::now_v7(),
            sender: input.sender.clone(),
            body: input.body.clone(),
            ts_ms,
        };
        if let Some(key) = key {
            originals.insert(key, message.clone());
        }
        new.push(results.len());
        results.push(Appended {
            message,
            duplicate: false,
        });
    }
    Plan { results, new, head }
}

/// The current time in milliseconds since the Unix epoch: a batch's commit timestamp.
pub(super) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A seq or bound as the databases store it (`BIGINT`). Saturates: no real seq comes near.
pub(super) fn to_db(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A `limit` as the databases take it.
pub(super) fn limit_to_db(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// A seq read back from the database; seqs are never negative, so an error means corrupt data.
pub(super) fn seq_from_db(value: i64) -> Result<u64, sqlx::Error> {
    u64::try_from(value).map_err(|err| sqlx::Error::Decode(Box::new(err)))
}

/// A room's head and oldest stored seq as one statement reads them (`min(seq)` is NULL when no
/// message is stored: `first` is then `head + 1`).
pub(super) fn room_info_from_db(head: i64, first: Option<i64>) -> Result<RoomInfo, sqlx::Error> {
    let head = seq_from_db(head)?;
    let first = match first {
        Some(first) => seq_from_db(first)?,
        None => head + 1,
    };
    Ok(RoomInfo { head, first })
}

/// `Store::unread`'s rows as both stores select them: (room, head, read cursor).
pub(super) fn unread_from_db(rows: Vec<(String, i64, i64)>) -> Result<Vec<Unread>, sqlx::Error> {
    rows.into_iter()
        .map(|(room, head, read)| {
            Ok(Unread {
                room,
                head: seq_from_db(head)?,
                read: seq_from_db(read)?,
            })
        })
        .collect()
}

/// A message id read back as text (Postgres casts its `UUID` to text, SQLite stores text).
pub(super) fn id_from_db(value: &str) -> Result<Uuid, sqlx::Error> {
    Uuid::parse_str(value).map_err(|err| sqlx::Error::Decode(Box::new(err)))
}

/// The budget loop of `Store::delete_before`, shared by both stores: deletes the old prefix of
/// each room in turn (`delete(room, budget)` returns how many rows it removed) until `limit`
/// messages are gone or the rooms run out. Returns how many were deleted.
pub(super) async fn delete_prefixes<F, Fut>(
    rooms: Vec<String>,
    limit: usize,
    mut delete: F,
) -> Result<u64, sqlx::Error>
where
    F: FnMut(String, i64) -> Fut,
    Fut: std::future::Future<Output = Result<u64, sqlx::Error>>,
{
    let mut deleted = 0usize;
    for room in rooms {
        let budget = limit.saturating_sub(deleted);
        if budget == 0 {
            break;
        }
        let done = delete(room, limit_to_db(budget)).await?;
        deleted = deleted.saturating_add(usize::try_from(done).unwrap_or(usize::MAX));
    }
    Ok(u64::try_from(deleted).unwrap_or(u64::MAX))
}
