-- seqcast schema, Postgres.

-- One row per room ever written to. `head` is the room's last committed seq. `append` locks this
-- row first and bumps it in the same transaction as its inserts, which serializes the writers of
-- one room and keeps seqs free of holes (see server/src/store/postgres.rs).
CREATE TABLE rooms (
    room TEXT   PRIMARY KEY,
    head BIGINT NOT NULL
);

CREATE TABLE messages (
    room   TEXT   NOT NULL,
    seq    BIGINT NOT NULL,
    id     UUID   NOT NULL,
    sender TEXT   NOT NULL,
    -- Serialized JSON exactly as sent. TEXT, not JSONB: JSONB would normalize spacing, key order
    -- and duplicate keys, and replay must be byte for byte.
    body   TEXT   NOT NULL,
    -- Idempotency key, scoped to (room, sender).
    idem   TEXT,
    -- Commit time, milliseconds since the Unix epoch.
    ts_ms  BIGINT NOT NULL,
    -- History paging (seq > after / seq < before within a room) is a range scan of this index.
    PRIMARY KEY (room, seq)
);

CREATE UNIQUE INDEX messages_room_sender_idem ON messages (room, sender, idem) WHERE idem IS NOT NULL;

-- For retention: deleting messages older than some time.
CREATE INDEX messages_ts_ms ON messages (ts_ms);
