-- seqcast_publish: an application commits a message in its own transaction (issue 14, item 4).
--
-- SELECT seqcast_publish(room, sender, body, idem) inside the application's transaction gives
-- the message its seq there; it becomes visible, and is delivered, when that transaction
-- commits, and a rollback takes it back without consuming a seq. Postgres only (SQLite has no
-- other writer than the node). See docs/protocol.md ("Publishing from SQL") and
-- docs/operations.md ("Publishing from SQL") for the lock it holds until the caller commits.

-- Settings the SQL side needs from the nodes' configuration. Each node writes its own values at
-- start-up (server/src/store/postgres/mod.rs), so nodes sharing a database should share them;
-- the last node started wins. The row below is the default until a node has started.
CREATE TABLE seqcast_settings (
    name  TEXT COLLATE "C" PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO seqcast_settings (name, value) VALUES ('max_message_bytes', 65536);

-- A UUIDv7 (RFC 9562) for the millisecond `ms`: what the node's writer makes (`Uuid::now_v7`),
-- so that ids sort by time whoever committed them. The 48-bit timestamp replaces the first six
-- bytes of a random (v4) UUID, and bits 4 and 5 of byte 6 turn its version nibble 0100 into
-- 0111; the variant bits stay as v4 has them (10). Postgres 17 and older have no uuidv7().
CREATE FUNCTION seqcast_uuid_v7(ms BIGINT) RETURNS UUID
LANGUAGE sql VOLATILE
AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid()) PLACING substring(int8send(ms) FROM 3) FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

-- The function. Same steps, same rows and same order of locks as the node's writer
-- (server/src/store/postgres/append.rs, `in_transaction`), so the two interleave in one room
-- with no hole and no duplicate:
--
-- 1. Checks its arguments as a WebSocket `send` is checked (SQLSTATEs below).
-- 2. Locks the room's counter row in `rooms` (creating it at head 0). The lock is held until the
--    CALLER's transaction ends: every other writer of the room, node or application, waits.
-- 3. Looks the idempotency key up, under that lock and in a fresh snapshot (each statement of a
--    VOLATILE function under READ COMMITTED takes one), so a key committed a moment ago by any
--    writer is found: then it returns the original seq and stores nothing.
-- 4. Inserts the message at head + 1 and stores the new head. A rollback undoes both: the next
--    writer gets the same seq, so no hole.
-- 5. pg_notify('seqcast', '{"room":...,"seq":...}'): delivered to the nodes' LISTEN
--    connections only if and when the transaction commits.
--
-- The body is stored as `body::text` (jsonb's own text form, e.g. `{"a": 1}`: Postgres has
-- already normalized spacing, key order and duplicate keys), and that is what clients receive.
-- `ts` is the database clock when the function ran (under the lock), not the commit time.
--
-- Errors (nothing stored; the caller's transaction is aborted as by any error):
--   22004 null_value_not_allowed   room, sender or body is NULL
--   22023 invalid_parameter_value  room not 1-128 of A-Z a-z 0-9 _ . : -; sender or idem not
--                                  1-256 bytes
--   54000 program_limit_exceeded   body::text longer than max_message_bytes (seqcast_settings)
--   55P03 lock_not_available       the room stayed locked for the caller's lock_timeout
--   40001 serialization_failure    under REPEATABLE READ/SERIALIZABLE, another writer of the
--                                  room committed after the caller's snapshot: retry
--   40P01 deadlock_detected        rooms locked in different orders by two transactions
-- A body with \u0000 or a lone surrogate never reaches the function: the jsonb cast refuses it
-- (22P05 untranslatable_character, 22P02 invalid_text_representation).
--
-- SECURITY INVOKER: the caller needs EXECUTE, and the privileges of the statements (INSERT,
-- UPDATE and SELECT on rooms, INSERT and SELECT on messages, SELECT on seqcast_settings).
-- `search_path` is pinned to the migration's, so the tables are found whatever the caller's.
CREATE FUNCTION seqcast_publish(room TEXT, sender TEXT, body JSONB, idem TEXT DEFAULT NULL)
RETURNS BIGINT
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    text_body TEXT;
    max_bytes BIGINT;
    head_now  BIGINT;
    original  BIGINT;
    now_ms    BIGINT;
BEGIN
    IF seqcast_publish.room IS NULL OR seqcast_publish.sender IS NULL
       OR seqcast_publish.body IS NULL THEN
        RAISE EXCEPTION 'seqcast_publish: room, sender and body must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- In "C": a range such as A-Z must mean bytes, whatever the database's collation.
    IF NOT (seqcast_publish.room COLLATE "C" ~ '^[A-Za-z0-9_.:-]{1,128}$') THEN
        RAISE EXCEPTION 'seqcast_publish: bad room name %', quote_literal(left(seqcast_publish.room, 140))
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'a room name is 1 to 128 characters of A-Z a-z 0-9 _ . : -';
    END IF;
    IF octet_length(seqcast_publish.sender) NOT BETWEEN 1 AND 256 THEN
        RAISE EXCEPTION 'seqcast_publish: sender must be 1 to 256 bytes'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF seqcast_publish.idem IS NOT NULL
       AND octet_length(seqcast_publish.idem) NOT BETWEEN 1 AND 256 THEN
        RAISE EXCEPTION 'seqcast_publish: idem must be NULL or 1 to 256 bytes'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    text_body := seqcast_publish.body::text;
    SELECT s.value INTO max_bytes FROM seqcast_settings s WHERE s.name = 'max_message_bytes';
    IF octet_length(text_body) > COALESCE(max_bytes, 65536) THEN
        RAISE EXCEPTION 'seqcast_publish: body is % bytes; the limit is %',
                octet_length(text_body), COALESCE(max_bytes, 65536)
            USING ERRCODE = 'program_limit_exceeded',
                  HINT = 'the limit is SEQCAST_MAX_MESSAGE_BYTES, measured on body::text';
    END IF;

    -- The room's lock, until the caller's transaction ends (see 2. above).
    INSERT INTO rooms AS r (room, head) VALUES (seqcast_publish.room, 0)
        ON CONFLICT ON CONSTRAINT rooms_pkey DO UPDATE SET head = r.head
        RETURNING r.head INTO head_now;

    IF seqcast_publish.idem IS NOT NULL THEN
        SELECT m.seq INTO original FROM messages m
        WHERE m.room = seqcast_publish.room AND m.sender = seqcast_publish.sender
          AND m.idem = seqcast_publish.idem AND m.idem IS NOT NULL;
        IF FOUND THEN
            RETURN original;
        END IF;
    END IF;

    now_ms := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    INSERT INTO messages (room, seq, id, sender, body, idem, ts_ms)
        VALUES (seqcast_publish.room, head_now + 1, seqcast_uuid_v7(now_ms),
                seqcast_publish.sender, text_body, seqcast_publish.idem, now_ms);
    UPDATE rooms r SET head = head_now + 1 WHERE r.room = seqcast_publish.room;
    PERFORM pg_notify('seqcast',
        json_build_object('room', seqcast_publish.room, 'seq', head_now + 1)::text);
    RETURN head_now + 1;
END
$$;
