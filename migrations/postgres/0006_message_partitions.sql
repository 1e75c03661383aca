-- Messages partitioned by time (issue "Scale-out", part 2: Postgres at volume).
--
-- Why: retention used to DELETE old rows, 1000 at a time: every row written to the WAL,
-- index entries left behind for VACUUM, and the table and its indexes bloated by the churn.
-- With `messages` partitioned by RANGE on `ts_ms`, retention drops whole partitions (a catalog
-- change and a file unlink, whatever the number of rows) and deletes rows only where it must:
-- in the partition that straddles the cut, and in the DEFAULT partition (below).
--
-- Width: one partition per UTC day, fixed (named messages_pYYYYMMDD, bounds [00:00, 24:00)
-- UTC in milliseconds). Retention periods are counted in days, and a day keeps the number of
-- partitions that a room's read has to visit small: with `SEQCAST_RETENTION=30d` about 34 (30
-- kept, the one straddling the cut, three created ahead). Without retention partitions only
-- accumulate, one a day: see docs/operations.md, "Postgres at volume".
--
-- Keys and indexes, local to each partition (Postgres has no global index):
-- - PRIMARY KEY (room, seq, ts_ms): a unique index on a partitioned table must contain the
--   partition key. Its leading columns are the old (room, seq) key, so history paging
--   (`room = $1 AND seq > $2 ORDER BY seq LIMIT n`) is still an index range scan in each
--   partition, merged in seq order (Merge Append) across them. (room, seq) itself stays
--   unique because seqs come from the room's counter row in `rooms`, taken under its lock.
-- - (room, sender, idem) WHERE idem IS NOT NULL: no longer UNIQUE, for the same reason.
--   Idempotency rests on the room's row lock instead, which every writer (the node's two
--   append paths, `seqcast_publish`) takes before it looks the key up or inserts: a lookup
--   under that lock, in a snapshot taken after it was granted, cannot race another writer of
--   the room. The node's one-statement path cannot take a new snapshot after the lock, so it
--   checks that nobody wrote to a keyed room between its snapshot and its lock, and otherwise
--   gives way to the transaction path (`seqcast_check_keys` below and
--   server/src/store/postgres/append.rs).
-- - (ts_ms): what the row deletes of retention scan, now only in the partitions below the cut
--   that are not dropped whole.
--
-- Every statement on messages filters by room, so on a database sharded by room (Citus) it
-- goes to one shard; the exceptions are retention's, which are about time across all rooms.
--
-- Upgrading: the existing rows are copied into the new table here, in the migration's
-- transaction, which holds an ACCESS EXCLUSIVE lock on `messages` from the RENAME to the
-- commit: nothing can read or write messages meanwhile (nodes answer `unavailable` and retry).
-- The copy writes every row and its indexes once: roughly as long as inserting them did, see
-- docs/operations.md ("Postgres at volume", "Upgrading an existing database").
--
-- (Functions are CREATE OR REPLACE so that server/tests/partitions.rs can run this file again,
-- on a table of the old shape, to time the upgrade.)

ALTER TABLE messages RENAME TO messages_unpartitioned;
ALTER TABLE messages_unpartitioned RENAME CONSTRAINT messages_pkey TO messages_unpartitioned_pkey;
ALTER INDEX messages_room_sender_idem RENAME TO messages_unpartitioned_room_sender_idem;
ALTER INDEX messages_ts_ms RENAME TO messages_unpartitioned_ts_ms;

CREATE TABLE messages (
    room   TEXT   COLLATE "C" NOT NULL,
    seq    BIGINT NOT NULL,
    id     UUID   NOT NULL,
    sender TEXT   COLLATE "C" NOT NULL,
    -- Serialized JSON exactly as sent (see 0001_init.sql).
    body   TEXT   NOT NULL,
    -- Idempotency key, scoped to (room, sender).
    idem   TEXT   COLLATE "C",
    -- Commit time, milliseconds since the Unix epoch: the database's clock read under the
    -- room's lock, so it follows seq order within a room (retention relies on it, below).
    ts_ms  BIGINT NOT NULL,
    PRIMARY KEY (room, seq, ts_ms)
) PARTITION BY RANGE (ts_ms);

CREATE INDEX messages_room_sender_idem ON messages (room, sender, idem) WHERE idem IS NOT NULL;
CREATE INDEX messages_ts_ms ON messages (ts_ms);

-- The safety net: a row whose day has no partition (maintenance has not run for days, or the
-- clock is far off) lands here instead of failing the insert. It is an ordinary partition: read
-- like the others, its old rows deleted one by one by retention (never dropped), and its rows
-- of a day moved into that day's partition when maintenance creates it.
CREATE TABLE messages_default PARTITION OF messages DEFAULT;

-- Creates the missing day partitions that overlap [from_ms, to_ms), moving into each the rows
-- of its day that landed in the DEFAULT partition, and returns how many it created. Run at
-- migration time (below), and by the leader's maintenance job (server/src/jobs/partitions.rs,
-- when the node starts and every SEQCAST_JOB_INTERVAL) for today and the next three days.
--
-- A new partition is created apart, filled from the DEFAULT partition and attached in one
-- transaction: readers see the rows in one place or the other, never in neither. ATTACH takes
-- SHARE UPDATE EXCLUSIVE on `messages` (reads and writes go on) and scans the DEFAULT
-- partition under an exclusive lock: short, since it is normally empty. The advisory lock
-- serializes concurrent callers (every node runs maintenance when there is no leader).
CREATE OR REPLACE FUNCTION seqcast_create_partitions(from_ms BIGINT, to_ms BIGINT) RETURNS INTEGER
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    day_ms  CONSTANT BIGINT := 86400000;
    lo      BIGINT := floor(from_ms::numeric / day_ms)::bigint * day_ms;
    name    TEXT;
    created INTEGER := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('seqcast_partitions'));
    WHILE lo < to_ms LOOP
        name := 'messages_p' || to_char(to_timestamp(lo / 1000) AT TIME ZONE 'UTC', 'YYYYMMDD');
        IF to_regclass(name) IS NULL THEN
            EXECUTE format('CREATE TABLE %I (LIKE messages INCLUDING DEFAULTS)', name);
            EXECUTE format(
                'WITH moved AS (DELETE FROM messages_default WHERE ts_ms >= %s AND ts_ms < %s '
                'RETURNING *) INSERT INTO %I SELECT * FROM moved', lo, lo + day_ms, name);
            EXECUTE format('ALTER TABLE messages ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)',
                name, lo, lo + day_ms);
            created := created + 1;
        END IF;
        lo := lo + day_ms;
    END LOOP;
    RETURN created;
END
$$;

-- Drops the day partitions that end at or before `before_ms` (every row in them is older), and
-- returns how many it dropped. Only partitions named as `seqcast_create_partitions` names
-- them; the DEFAULT partition is never dropped.
--
-- Dropping a partition takes an ACCESS EXCLUSIVE lock on `messages` until the transaction
-- ends: it waits for the statements under way (milliseconds) and holds up those that come
-- after for as long, which is why the node runs it with a short lock_timeout and retries at
-- the next sweep. The drop is atomic: a reader sees the rows before it or not at all, and a
-- room's `first` (min(seq) over what is left) is right at once.
--
-- A room loses a prefix only, as `delete_before` promises, because a room's ts_ms follows its
-- seqs (the database's clock, read under the room's lock). A database clock stepped back
-- across midnight UTC could break that for the messages written in that step; the row path
-- (`delete_before`) stays exact, the drop does not look.
CREATE OR REPLACE FUNCTION seqcast_drop_partitions(before_ms BIGINT) RETURNS INTEGER
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    day_ms  CONSTANT BIGINT := 86400000;
    part    RECORD;
    dropped INTEGER := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('seqcast_partitions'));
    FOR part IN
        SELECT c.relname,
               (extract(epoch FROM to_date(substring(c.relname FROM 11), 'YYYYMMDD')::timestamp
                    AT TIME ZONE 'UTC') * 1000)::bigint + day_ms AS upper_ms
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'messages'::regclass AND c.relname ~ '^messages_p[0-9]{8}$'
        ORDER BY c.relname
    LOOP
        IF part.upper_ms <= before_ms THEN
            EXECUTE format('DROP TABLE %I', part.relname);
            dropped := dropped + 1;
        END IF;
    END LOOP;
    RETURN dropped;
END
$$;

-- The guard of the node's one-statement append (append.rs, ONE_STATEMENT): `seen` is true when
-- a key of the group may be stored already. Raising unique_violation (23505) is what the
-- UNIQUE index on (room, sender, idem) did in that case before this migration: the statement
-- stores nothing and the node commits the group again in a transaction that answers the key
-- with its original.
CREATE OR REPLACE FUNCTION seqcast_check_keys(seen BOOLEAN) RETURNS BOOLEAN
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF seen THEN
        RAISE EXCEPTION 'seqcast: an idempotency key of the group may be stored already'
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN TRUE;
END
$$;

-- The existing rows: partitions for every day that has some and for today and the next three
-- days, then the copy. The DISTINCT is one scan of the old table's ts_ms index.
SELECT seqcast_create_partitions(d * 86400000, d * 86400000 + 1)
FROM (SELECT DISTINCT ts_ms / 86400000 AS d FROM messages_unpartitioned) AS days;
SELECT seqcast_create_partitions((extract(epoch FROM now()) * 1000)::bigint,
                                 (extract(epoch FROM now()) * 1000)::bigint + 3 * 86400000 + 1);
INSERT INTO messages (room, seq, id, sender, body, idem, ts_ms)
SELECT room, seq, id, sender, body, idem, ts_ms FROM messages_unpartitioned;
DROP TABLE messages_unpartitioned;
