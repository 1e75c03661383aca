//! The two ways a group of rooms' batches is committed on Postgres.
//!
//! - [`one_statement`]: every room's counter bump and every insert in one statement, one round
//!   trip, one commit, with or without idempotency keys (real clients put one on every send).
//!   A key repeated within the group is answered from its first occurrence without a database
//!   lookup. A key that may be stored *before* the group (a resend of a message whose ack was
//!   lost) makes the statement fail whole, storing nothing (see [`ONE_STATEMENT`]'s key checks).
//! - [`in_transaction`]: one transaction that locks every room, then looks the keys up, then
//!   inserts, so a stored key is answered with its original. The fallback for the groups that
//!   [`one_statement`] refused; always correct, five round trips whatever the number of rooms.
//!
//! Every path takes the rooms' row locks in byte order (`COLLATE "C"`, how the writer lists
//! them), whatever the database's collation, so writers on any nodes cannot deadlock.

use std::collections::HashMap;

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use super::message_from_row;
use crate::store::batch::{self, KeyedMessage};
use crate::store::{Appended, NewMessage};

/// The key lookups' bound on `ts_ms`: what they can find was committed before their snapshot,
/// taken about when their statement began, so its commit time (the database's clock, read by
/// the statement that stored it) is before `statement_timestamp()`. The bound lets Postgres
/// skip the day partitions created ahead (three, empty): half of a lookup's index pages
/// without retention (today's partition and DEFAULT are left). The hour of slack covers a
/// database clock stepped back by less than that.
macro_rules! stored_before {
    () => {
        "(extract(epoch FROM statement_timestamp()) * 1000)::bigint + 3600000"
    };
}

/// The general path: one transaction of three statements whatever the number of rooms, so one
/// commit (one WAL flush) and five round trips (with `BEGIN` and `COMMIT`) for the whole group.
/// Dropping the transaction without committing (on error, or if this future is dropped) rolls
/// back.
///
/// Why seqs come out without holes and commit in seq order, even with many nodes writing: the
/// first statement inserts or touches every room's row in `rooms`, which takes those rows'
/// locks (in byte order) until the transaction ends. Every other writer of a room, on any node,
/// blocks on that same row, so one transaction at a time reads the head, inserts the seqs after
/// it and stores the new head. The next writer is let through only once this transaction has
/// committed (and its rows are visible), and then reads the new head: seqs are handed out in
/// commit order. Under READ COMMITTED each later statement takes a new snapshot, so the key
/// lookup, which runs after the locks are held, finds keys stored a moment ago by another node.
/// If this transaction rolls back, its head bumps roll back with it and the next writer reuses
/// those seqs: no holes. (A Postgres `SEQUENCE` would not do: `nextval` is not transactional,
/// so a rollback leaves a hole, and concurrent writers could commit out of seq order.)
pub(super) async fn in_transaction(
    conn: &mut PgConnection,
    batches: &[(&str, &[NewMessage])],
) -> Result<Vec<Vec<Appended>>, sqlx::Error> {
    let mut tx = Connection::begin(&mut *conn).await?;
    let rooms: Vec<&str> = batches.iter().map(|(room, _)| *room).collect();
    // The commit timestamp is the database's clock, read under the locks (the last row's is
    // read once every lock is held): timestamps follow seq order whichever node commits.
    let locked: Vec<(String, i64, i64)> = sqlx::query_as(
        "INSERT INTO rooms (room, head) \
         SELECT room, 0 FROM UNNEST($1::text[]) AS r (room) ORDER BY room COLLATE \"C\" \
         ON CONFLICT (room) DO UPDATE SET head = rooms.head \
         RETURNING room, head, (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
    )
    .bind(&rooms)
    .fetch_all(&mut *tx)
    .await?;
    let ts_ms = locked.iter().map(|(_, _, ts)| *ts).max().unwrap_or(0);
    let heads: HashMap<String, i64> = locked
        .into_iter()
        .map(|(room, head, _)| (room, head))
        .collect();

    let (mut key_rooms, mut key_senders, mut key_idems) = (Vec::new(), Vec::new(), Vec::new());
    for (room, batch) in batches {
        for m in batch.iter() {
            if let Some(idem) = m.idem.as_deref() {
                key_rooms.push(*room);
                key_senders.push(m.sender.as_str());
                key_idems.push(idem);
            }
        }
    }
    let mut stored: HashMap<String, Vec<KeyedMessage>> = HashMap::new();
    if !key_idems.is_empty() {
        let rows = sqlx::query(concat!(
            "SELECT m.room, m.idem, m.seq, m.id::text AS id, m.sender, m.body, m.ts_ms \
                 FROM UNNEST($1::text[], $2::text[], $3::text[]) AS k (room, sender, idem) \
                 JOIN messages m \
                   ON m.room = k.room AND m.sender = k.sender AND m.idem = k.idem \
                 WHERE m.idem IS NOT NULL AND m.ts_ms < ",
            stored_before!()
        ))
        .bind(&key_rooms)
        .bind(&key_senders)
        .bind(&key_idems)
        .fetch_all(&mut *tx)
        .await?;
        for row in &rows {
            let room: String = row.try_get("room")?;
            let keyed = KeyedMessage {
                idem: row.try_get("idem")?,
                message: message_from_row(&room, row)?,
            };
            stored.entry(room).or_default().push(keyed);
        }
    }

    let mut appended = Vec::with_capacity(batches.len());
    let (mut new_rooms, mut seqs, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    let (mut senders, mut bodies, mut idems) = (Vec::new(), Vec::new(), Vec::new());
    let (mut head_rooms, mut new_heads) = (Vec::new(), Vec::new());
    for (room, batch) in batches {
        let head = heads.get(*room).copied().ok_or(sqlx::Error::RowNotFound)?;
        let originals = stored.remove(*room).unwrap_or_default();
        let plan = batch::plan(room, batch::seq_from_db(head)?, ts_ms, batch, originals);
        for &i in &plan.new {
            let message = &plan.results[i].message;
            new_rooms.push(*room);
            seqs.push(batch::to_db(message.seq));
            ids.push(message.id);
            senders.push(batch[i].sender.as_str());
            bodies.push(batch[i].body.as_str());
            idems.push(batch[i].idem.as_deref());
        }
        if !plan.new.is_empty() {
            head_rooms.push(*room);
            new_heads.push(batch::to_db(plan.head));
        }
        appended.push(plan.results);
    }
    if !new_rooms.is_empty() {
        // One statement for the whole group, whatever its size: arrays, not one bind per value.
        sqlx::query(
            "WITH inserted AS ( \
                 INSERT INTO messages (room, seq, id, sender, body, idem, ts_ms) \
                 SELECT t.room, t.seq, t.id, t.sender, t.body, t.idem, $7 \
                 FROM UNNEST($1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::text[], \
                             $6::text[]) AS t (room, seq, id, sender, body, idem)) \
             UPDATE rooms SET head = h.head \
             FROM UNNEST($8::text[], $9::bigint[]) AS h (room, head) \
             WHERE rooms.room = h.room",
        )
        .bind(&new_rooms)
        .bind(&seqs)
        .bind(&ids)
        .bind(&senders)
        .bind(&bodies)
        .bind(&idems)
        .bind(ts_ms)
        .bind(&head_rooms)
        .bind(&new_heads)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(appended)
}

/// `unique_violation`: what the statement's key checks raise (`seqcast_check_keys` and
/// `seqcast_check_keys_waited`, migrations 0006 and 0007) when a key of the group is stored
/// already. Nothing else in the statement can: seqs come
/// from the locked counter and ids are fresh UUIDv7s.
const UNIQUE_VIOLATION: &str = "23505";

/// Commits the group in one statement, run as its own transaction: one round trip and one
/// commit whatever the number of rooms. The row locks of the bump order it with every other
/// writer of those rooms exactly as in [`in_transaction`]; they are taken in byte order
/// (`COLLATE "C"`), as that path takes them, whatever the database's collation: under ICU or
/// en_US `general` sorts before `Lobby`, and two nodes locking in different orders deadlock.
///
/// Returns `Ok(None)`, having stored nothing, when a message's key may be stored already: then
/// the caller commits the group with [`in_transaction`], which answers it with the original. A
/// repeat of a stored key is rare (a resend after a lost ack), so the fallback costs little.
///
/// `messages` is partitioned by time (migration 0006), so no UNIQUE index on (room, sender,
/// idem) can catch a stored key on insert any more, and the statement's snapshot was taken
/// *before* it waited for the rooms' locks: a key another writer committed during that wait is
/// not in it. So the keys are checked twice (migration 0007): in the snapshot, before the
/// locks are taken (so that other writers of the rooms do not wait for the lookups), and once
/// the locks are held, against the rows other writers committed to the rooms during the wait
/// only, by a VOLATILE function, which reads with a snapshot of its own. (0006 refused a keyed
/// group whenever its room was written during the wait, which in a room busy on several nodes
/// was most groups.)
pub(super) async fn one_statement(
    conn: &mut PgConnection,
    batches: &[(&str, &[NewMessage])],
) -> Result<Option<Vec<Vec<Appended>>>, sqlx::Error> {
    // Each room planned as if its head were 0, with nothing stored: `plan` answers a key
    // repeated within the batch with its first occurrence and numbers only the new messages
    // 1, 2, ...; the statement returns the real head, and the seqs are moved up to it below.
    let mut plans: Vec<batch::Plan> = batches
        .iter()
        .map(|(room, batch)| batch::plan(room, 0, 0, batch, Vec::new()))
        .collect();
    let total = plans.iter().map(|plan| plan.new.len()).sum();
    let mut rooms = Vec::with_capacity(batches.len());
    let mut counts = Vec::with_capacity(batches.len());
    let mut message_rooms = Vec::with_capacity(total);
    let mut ids = Vec::with_capacity(total);
    let mut senders = Vec::with_capacity(total);
    let mut bodies = Vec::with_capacity(total);
    let mut idems = Vec::with_capacity(total);
    // The new messages that carry a key: what the function looks up.
    let (mut key_rooms, mut key_senders, mut key_idems) = (Vec::new(), Vec::new(), Vec::new());
    for ((room, batch), plan) in batches.iter().zip(&plans) {
        rooms.push(*room);
        counts.push(batch::to_db(plan.head));
        for &i in &plan.new {
            message_rooms.push(*room);
            ids.push(plan.results[i].message.id);
            senders.push(batch[i].sender.as_str());
            bodies.push(batch[i].body.as_str());
            idems.push(batch[i].idem.as_deref());
            if let Some(idem) = batch[i].idem.as_deref() {
                key_rooms.push(*room);
                key_senders.push(batch[i].sender.as_str());
                key_idems.push(idem);
            }
        }
    }
    let rows: Vec<(String, i64, i64)> = match sqlx::query_as(ONE_STATEMENT)
        .bind(&rooms)
        .bind(&counts)
        .bind(&message_rooms)
        // Binary UUIDs: no text to format here or to parse in the database.
        .bind(&ids)
        .bind(&senders)
        .bind(&bodies)
        .bind(&idems)
        .bind(&key_rooms)
        .bind(&key_senders)
        .bind(&key_idems)
        .fetch_all(&mut *conn)
        .await
    {
        Ok(rows) => rows,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNIQUE_VIOLATION) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let mut heads = HashMap::with_capacity(rows.len());
    for (room, head, ts_ms) in rows {
        heads.insert(room, (batch::seq_from_db(head)?, ts_ms));
    }
    // The room's new messages take the seqs after the head it had; everything here, repeats
    // included, was committed now.
    for ((room, _), plan) in batches.iter().zip(&mut plans) {
        let &(head, ts_ms) = heads.get(*room).ok_or(sqlx::Error::RowNotFound)?;
        let before = head
            .checked_sub(plan.head)
            .ok_or(sqlx::Error::RowNotFound)?;
        for result in &mut plan.results {
            result.message.seq += before;
            result.message.ts_ms = ts_ms;
        }
    }
    Ok(Some(plans.into_iter().map(|plan| plan.results).collect()))
}

/// The statement of [`one_statement`]. `$1, $2`: the rooms (in byte order) and how many new
/// messages each gets; `$3..$7`: per new message, in input order, its room, id, sender, body and
/// idem (NULL for none); `$8..$10`: per new message with a key, its room, sender and key. One
/// row per room: its new head and the commit time.
///
/// Data-modifying CTEs run exactly once, whether or not the final SELECT reads them. The
/// timestamp aggregates over `bump`, so it is taken once every room's lock is held. A message's
/// seq is its room's new head minus the room's count plus its place in the room.
///
/// The key checks (see [`one_statement`]), each raising unique_violation, which undoes the
/// whole statement, bumps and inserts included:
/// - `stored`, in the statement's snapshot: `bump` reads its rows through the check, so it is
///   computed before the first lock is asked for.
/// - `waited`, once every lock is held (it aggregates over `bump`): per keyed room, the seqs it
///   gained between the snapshot (`snap`, which reads `rooms` in that snapshot whenever it
///   runs) and its lock, which `seqcast_check_keys_waited` reads with a fresh snapshot. A CTE
///   that calls a VOLATILE function is computed once, never inlined.
const ONE_STATEMENT: &str = concat!(
    "\
    WITH counts AS ( \
        SELECT room, n FROM UNNEST($1::text[], $2::bigint[]) AS c (room, n)), \
    keys AS ( \
        SELECT k.room, k.sender, k.idem \
        FROM UNNEST($8::text[], $9::text[], $10::text[]) AS k (room, sender, idem)), \
    snap AS ( \
        SELECT counts.room, COALESCE(rooms.head, 0) AS head \
        FROM counts LEFT JOIN rooms ON rooms.room = counts.room), \
    stored AS MATERIALIZED ( \
        SELECT EXISTS ( \
            SELECT 1 FROM keys JOIN messages m \
              ON m.room = keys.room AND m.sender = keys.sender AND m.idem = keys.idem \
            WHERE m.idem IS NOT NULL AND m.ts_ms < ",
    stored_before!(),
    ") AS seen), \
    bump AS ( \
        INSERT INTO rooms (room, head) SELECT room, n FROM counts, stored \
        WHERE seqcast_check_keys(stored.seen) \
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
               t.id, t.sender, t.body, t.idem, stamp.ts_ms \
        FROM UNNEST($3::text[], $4::uuid[], $5::text[], $6::text[], $7::text[]) WITH ORDINALITY \
               AS t (room, id, sender, body, idem, ord) \
        JOIN bump ON bump.room = t.room \
        JOIN counts ON counts.room = t.room \
        CROSS JOIN stamp), \
    waited AS ( \
        SELECT seqcast_check_keys_waited( \
                   array_agg(bump.room), array_agg(snap.head), \
                   array_agg(bump.head - counts.n), $8::text[], $9::text[], $10::text[]) AS ok \
        FROM bump \
        JOIN counts ON counts.room = bump.room \
        JOIN snap ON snap.room = bump.room \
        WHERE bump.head - counts.n > snap.head \
          AND bump.room IN (SELECT room FROM keys)) \
    SELECT bump.room, bump.head, stamp.ts_ms FROM bump, stamp, waited \
    WHERE waited.ok"
);
