-- seqcast schema, SQLite. Same shape as the Postgres schema; STRICT tables so a wrongly typed bind
-- fails loudly instead of being stored as whatever type it came in.

-- One row per room ever written to. `head` is the room's last committed seq, bumped in the same
-- transaction as the inserts of `append` (see server/src/store/sqlite.rs).
CREATE TABLE rooms (
    room TEXT    NOT NULL PRIMARY KEY,
    head INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE messages (
    room   TEXT    NOT NULL,
    seq    INTEGER NOT NULL,
    -- UUID in its hyphenated lower-case text form.
    id     TEXT    NOT NULL,
    sender TEXT    NOT NULL,
    -- Serialized JSON exactly as sent, byte for byte.
    body   TEXT    NOT NULL,
    -- Idempotency key, scoped to (room, sender).
    idem   TEXT,
    -- Commit time, milliseconds since the Unix epoch.
    ts_ms  INTEGER NOT NULL,
    -- History paging (seq > after / seq < before within a room) is a range scan of this index.
    PRIMARY KEY (room, seq)
) STRICT;

CREATE UNIQUE INDEX messages_room_sender_idem ON messages (room, sender, idem) WHERE idem IS NOT NULL;

-- For retention: deleting messages older than some time.
CREATE INDEX messages_ts_ms ON messages (ts_ms);
