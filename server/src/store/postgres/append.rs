//! The three ways a group of rooms' batches is committed on Postgres.
//!
//! - [`unkeyed`]: no idempotency key in the group (one statement, one round trip).
//! - [`keyed`]: keys in the group, looked up and honoured in the same single statement; the
//!   path of real clients, which put an `idem` on every send.
//! - [`in_transaction`]: room by room in one transaction, each room's key lookup after its lock.
//!   Always correct; [`keyed`] falls back to it in the rare case where its statement's snapshot
//!   missed a key that another writer committed while this one waited for a room's lock.
//!
//! Every path takes the rooms' row locks in byte order (`COLLATE "C"`, how the writer lists
//! them), whatever the database's collation, so writers on any nodes cannot deadlock.

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use super::message_from_row;
use crate::store::batch::{self, KeyedMessage};
use crate::store::{Appended, NewMessage, StoredMessage};

/// The general path: one transaction, room by room in the listed order, so one commit (one WAL
/// flush) for the whole group. Dropping the transaction without committing (on error, or if
/// this future is dropped) rolls back.
pub(super) async fn in_transaction(
    conn: &mut PgConnection,
    batches: &[(&str, &[NewMessage])],
) -> Result<Vec<Vec<Appended>>, sqlx::Error> {
    let mut tx = Connection::begin(&mut *conn).await?;
    let mut appended = Vec::with_capacity(batches.len());
    for (room, batch) in batches {
        appended.push(room_in(&mut tx, room, batch).await?);
    }
    tx.commit().await?;
    Ok(appended)
}

/// One room's batch inside the transaction `tx`: the general path (see [`in_transaction`]).
///
/// Why seqs come out without holes and commit in seq order, even with many nodes writing:
/// the first statement inserts or touches the room's row in `rooms`, which takes that row's
/// lock until the transaction ends. Every other writer of the room, on any node, blocks on
/// that same statement, so one transaction at a time reads the head, inserts the seqs after
/// it and stores the new head. The next writer is let through only once this transaction
/// has committed (and its rows are visible), and then reads the new head: seqs are handed out
/// in commit order. Under READ COMMITTED each later statement of that writer sees what this
/// one committed, so its idempotency-key lookup finds keys stored a moment ago by another
/// node. If this transaction rolls back, its head bump rolls back with it and the next
/// writer reuses those seqs: no holes. (A Postgres `SEQUENCE` would not do: `nextval`
/// is not transactional, so a rollback leaves a hole, and concurrent writers could commit out
/// of seq order.)
async fn room_in(
    tx: &mut PgConnection,
    room: &str,
    batch: &[NewMessage],
) -> Result<Vec<Appended>, sqlx::Error> {
    // The commit timestamp is the database's clock, read under the lock: timestamps follow
    // seq order whichever node commits.
    let (head, ts_ms): (i64, i64) = sqlx::query_as(
        "INSERT INTO rooms (room, head) VALUES ($1, 0) \
         ON CONFLICT (room) DO UPDATE SET head = rooms.head \
         RETURNING head, (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
    )
    .bind(room)
    .fetch_one(&mut *tx)
    .await?;

    let (senders, idems): (Vec<&str>, Vec<&str>) = batch
        .iter()
        .filter_map(|m| Some((m.sender.as_str(), m.idem.as_deref()?)))
        .unzip();
    let stored = if idems.is_empty() {
        Vec::new()
    } else {
        let rows = sqlx::query(
            "SELECT m.idem, m.seq, m.id::text AS id, m.sender, m.body, m.ts_ms \
             FROM messages m \
             JOIN UNNEST($2::text[], $3::text[]) AS k (sender, idem) \
               ON m.sender = k.sender AND m.idem = k.idem \
             WHERE m.room = $1 AND m.idem IS NOT NULL",
        )
        .bind(room)
        .bind(&senders)
        .bind(&idems)
        .fetch_all(&mut *tx)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(KeyedMessage {
                    idem: row.try_get("idem")?,
                    message: message_from_row(room, row)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?
    };

    let plan = batch::plan(room, batch::seq_from_db(head)?, ts_ms, batch, stored);
    if plan.new.is_empty() {
        return Ok(plan.results);
    }

    let mut seqs = Vec::with_capacity(plan.new.len());
    let mut ids = Vec::with_capacity(plan.new.len());
    let mut senders = Vec::with_capacity(plan.new.len());
    let mut bodies = Vec::with_capacity(plan.new.len());
    let mut idems = Vec::with_capacity(plan.new.len());
    for &i in &plan.new {
        let message = &plan.results[i].message;
        seqs.push(batch::to_db(message.seq));
        ids.push(message.id.to_string());
        senders.push(message.sender.as_str());
        bodies.push(message.body.as_str());
        idems.push(batch[i].idem.as_deref());
    }
    // One statement for the whole batch, whatever its size: arrays, not one bind per value.
    sqlx::query(
        "INSERT INTO messages (room, seq, id, sender, body, idem, ts_ms) \
         SELECT $1, t.seq, t.id::uuid, t.sender, t.body, t.idem, $7 \
         FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[]) \
           AS t (seq, id, sender, body, idem)",
    )
    .bind(room)
    .bind(&seqs)
    .bind(&ids)
    .bind(&senders)
    .bind(&bodies)
    .bind(&idems)
    .bind(ts_ms)
    .execute(&mut *tx)
    .await?;

    sqlx::query("UPDATE rooms SET head = $2 WHERE room = $1")
        .bind(room)
        .bind(batch::to_db(plan.head))
        .execute(&mut *tx)
        .await?;
    Ok(plan.results)
}

/// [`Store::append_rooms`](super::super::Store::append_rooms) for batches without idempotency keys (the common case): nothing
/// to look up, so every room's counter bump and every insert are one statement, run as its
/// own transaction: one round trip and one commit for the whole group. The row locks of the
/// bump order it with every other writer of those rooms exactly as in [`room_in`];
/// they are taken in byte order (`COLLATE "C"`), as the keyed path takes them, whatever
/// the database's collation: under ICU or en_US `general` sorts before `Lobby`, and two
/// nodes locking in different orders deadlock.
pub(super) async fn unkeyed(
    conn: &mut PgConnection,
    batches: &[(&str, &[NewMessage])],
) -> Result<Vec<Vec<Appended>>, sqlx::Error> {
    let rooms: Vec<&str> = batches.iter().map(|(room, _)| *room).collect();
    let counts: Vec<i64> = batches.iter().map(|(_, b)| b.len() as i64).collect();
    let total = batches.iter().map(|(_, b)| b.len()).sum();
    let mut message_rooms = Vec::with_capacity(total);
    let mut ids = Vec::with_capacity(total);
    let mut senders = Vec::with_capacity(total);
    let mut bodies = Vec::with_capacity(total);
    for (room, batch) in batches {
        for m in batch.iter() {
            message_rooms.push(*room);
            ids.push(uuid::Uuid::now_v7());
            senders.push(m.sender.as_str());
            bodies.push(m.body.as_str());
        }
    }
    // Data-modifying CTEs run exactly once, whether or not the final SELECT reads them. The
    // timestamp aggregates over `bump`, so it is taken once every room's lock is held. A
    // message's seq is its room's new head minus the room's count plus its place in the room.
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "WITH counts AS ( \
             SELECT room, n FROM UNNEST($1::text[], $2::bigint[]) AS c (room, n)), \
         bump AS ( \
             INSERT INTO rooms (room, head) SELECT room, n FROM counts \
             ORDER BY room COLLATE \"C\" \
             ON CONFLICT (room) DO UPDATE SET head = rooms.head + EXCLUDED.head \
             RETURNING room, head), \
         stamp AS ( \
             SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS ts_ms, \
                    count(*) AS locked \
             FROM bump), \
         inserted AS ( \
             INSERT INTO messages (room, seq, id, sender, body, idem, ts_ms) \
             SELECT t.room, \
                    bump.head - counts.n \
                      + row_number() OVER (PARTITION BY t.room ORDER BY t.ord), \
                    t.id, t.sender, t.body, NULL, stamp.ts_ms \
             FROM UNNEST($3::text[], $4::uuid[], $5::text[], $6::text[]) WITH ORDINALITY \
                    AS t (room, id, sender, body, ord) \
             JOIN bump ON bump.room = t.room \
             JOIN counts ON counts.room = t.room \
             CROSS JOIN stamp) \
         SELECT bump.room, bump.head, stamp.ts_ms FROM bump, stamp",
    )
    .bind(&rooms)
    .bind(&counts)
    .bind(&message_rooms)
    // Binary UUIDs: no text to format here or to parse in the database.
    .bind(&ids)
    .bind(&senders)
    .bind(&bodies)
    .fetch_all(&mut *conn)
    .await?;
    let mut heads = std::collections::HashMap::with_capacity(rows.len());
    for (room, head, ts_ms) in rows {
        heads.insert(room, (batch::seq_from_db(head)?, ts_ms));
    }
    let mut ids = ids.into_iter();
    batches
        .iter()
        .map(|(room, batch)| {
            let Some(&(head, ts_ms)) = heads.get(*room) else {
                return Err(sqlx::Error::RowNotFound);
            };
            let first = head + 1 - batch.len() as u64;
            Ok(batch
                .iter()
                .zip(ids.by_ref())
                .enumerate()
                .map(|(i, (input, id))| Appended {
                    message: StoredMessage {
                        room: (*room).to_owned(),
                        seq: first + i as u64,
                        id,
                        sender: input.sender.clone(),
                        body: input.body.clone(),
                        ts_ms,
                    },
                    duplicate: false,
                })
                .collect())
        })
        .collect()
}

/// [`unkeyed`]'s statement with the idempotency keys honoured in it: in the database, each
/// message whose (room, sender, idem) is stored already, or occurs earlier in the group, is
/// answered with that original and not inserted; only the others are counted into the rooms'
/// heads and inserted.
///
/// The statement reads the stored keys with its snapshot, taken when it starts, before it waits
/// for any room's lock. A key that another writer committed after that (it held the room's lock
/// meanwhile: a client resending to two nodes at once) is missed by the lookup, and the insert
/// then hits the unique index on (room, sender, idem): the statement fails whole, nothing is
/// stored, and the caller runs the group again with [`in_transaction`], whose lookups come after
/// the locks. Returns `Ok(None)` in that case.
pub(super) async fn keyed(
    conn: &mut PgConnection,
    batches: &[(&str, &[NewMessage])],
) -> Result<Option<Vec<Vec<Appended>>>, sqlx::Error> {
    let total = batches.iter().map(|(_, b)| b.len()).sum();
    let mut rooms = Vec::with_capacity(total);
    let mut senders = Vec::with_capacity(total);
    let mut bodies = Vec::with_capacity(total);
    let mut idems = Vec::with_capacity(total);
    let mut ids = Vec::with_capacity(total);
    for (room, batch) in batches {
        for m in batch.iter() {
            rooms.push(*room);
            senders.push(m.sender.as_str());
            bodies.push(m.body.as_str());
            idems.push(m.idem.as_deref());
            ids.push(uuid::Uuid::now_v7());
        }
    }
    let rows = sqlx::query(KEYED_GROUP)
        .bind(&rooms)
        .bind(&senders)
        .bind(&bodies)
        .bind(&idems)
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNIQUE_VIOLATION) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    if rows.len() != total {
        return Err(sqlx::Error::RowNotFound);
    }
    // Rows come in input order (`ord` 1, 2, ...): the inputs flattened, room after room.
    let inputs: Vec<(&str, &NewMessage)> = batches
        .iter()
        .flat_map(|(room, batch)| batch.iter().map(move |m| (*room, m)))
        .collect();
    let mut answers = Vec::with_capacity(total);
    for (row, (room, input)) in rows.iter().zip(&inputs) {
        let first: i64 = row.try_get("first_ord")?;
        let ord: i64 = row.try_get("ord")?;
        let stored_body: Option<String> = row.try_get("stored_body")?;
        // A repeat within the group carries the body of its first occurrence.
        let original = usize::try_from(first - 1)
            .ok()
            .and_then(|i| inputs.get(i))
            .map_or(*input, |(_, m)| *m);
        answers.push(Appended {
            message: StoredMessage {
                room: (*room).to_owned(),
                seq: batch::seq_from_db(row.try_get("seq")?)?,
                id: row.try_get("id")?,
                sender: input.sender.clone(),
                body: stored_body.unwrap_or_else(|| original.body.clone()),
                ts_ms: row.try_get("ts_ms")?,
            },
            duplicate: row.try_get::<bool, _>("stored")? || first != ord,
        });
    }
    let mut answers = answers.into_iter();
    Ok(Some(
        batches
            .iter()
            .map(|(_, batch)| answers.by_ref().take(batch.len()).collect())
            .collect(),
    ))
}

/// `unique_violation`: here, only the index on (room, sender, idem) (seqs come from the locked
/// counter and ids are fresh UUIDv7s).
const UNIQUE_VIOLATION: &str = "23505";

/// The statement of [`keyed`]. `$1..$5`: room, sender, body, idem (NULL for none) and a fresh id
/// per input message, in input order. One row per input, in input order: its seq, id and
/// commit time (the original's for a repeat), whether the original was stored before this
/// statement (`stored`, with its body), and the place of the first input with its key
/// (`first_ord`, its own place when it is the first or has no key).
///
/// - `firsts`: each input with the first place of its key in the group.
/// - `stored`: inputs whose key the database holds (as of the statement's snapshot).
/// - `fresh`: what is inserted: first occurrences whose key is not stored, and unkeyed inputs.
/// - `bump`, `stamp`, `numbered`, `inserted`: as in [`unkeyed`], over `fresh`; rooms with
///   nothing fresh are neither locked nor bumped. Data-modifying CTEs run exactly once, whether
///   or not the final SELECT reads them.
const KEYED_GROUP: &str = "\
    WITH input AS ( \
        SELECT t.room, t.sender, t.body, t.idem, t.id, t.ord \
        FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::uuid[]) \
            WITH ORDINALITY AS t (room, sender, body, idem, id, ord)), \
    firsts AS ( \
        SELECT i.*, CASE WHEN i.idem IS NULL THEN i.ord \
                         ELSE min(i.ord) OVER (PARTITION BY i.room, i.sender, i.idem) \
                    END AS first_ord \
        FROM input i), \
    stored AS ( \
        SELECT f.ord, m.seq, m.id, m.body, m.ts_ms \
        FROM firsts f \
        JOIN messages m ON m.room = f.room AND m.sender = f.sender AND m.idem = f.idem \
        WHERE f.idem IS NOT NULL AND m.idem IS NOT NULL), \
    fresh AS ( \
        SELECT f.* FROM firsts f \
        WHERE f.first_ord = f.ord AND NOT EXISTS (SELECT 1 FROM stored s WHERE s.ord = f.ord)), \
    counts AS ( \
        SELECT room, count(*) AS n FROM fresh GROUP BY room), \
    bump AS ( \
        INSERT INTO rooms (room, head) SELECT room, n FROM counts \
        ORDER BY room COLLATE \"C\" \
        ON CONFLICT (room) DO UPDATE SET head = rooms.head + EXCLUDED.head \
        RETURNING room, head), \
    stamp AS ( \
        SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS ts_ms, \
               count(*) AS locked \
        FROM bump), \
    numbered AS ( \
        SELECT f.ord, f.room, f.sender, f.body, f.idem, f.id, \
               bump.head - counts.n + row_number() OVER (PARTITION BY f.room ORDER BY f.ord) \
                 AS seq \
        FROM fresh f \
        JOIN bump ON bump.room = f.room \
        JOIN counts ON counts.room = f.room), \
    inserted AS ( \
        INSERT INTO messages (room, seq, id, sender, body, idem, ts_ms) \
        SELECT n.room, n.seq, n.id, n.sender, n.body, n.idem, stamp.ts_ms \
        FROM numbered n CROSS JOIN stamp) \
    SELECT f.ord, f.first_ord, \
           COALESCE(s.seq, n.seq) AS seq, COALESCE(s.id, n.id) AS id, \
           COALESCE(s.ts_ms, stamp.ts_ms) AS ts_ms, \
           s.ord IS NOT NULL AS stored, s.body AS stored_body \
    FROM firsts f \
    LEFT JOIN stored s ON s.ord = f.first_ord \
    LEFT JOIN numbered n ON n.ord = f.first_ord \
    CROSS JOIN stamp \
    ORDER BY f.ord";
