-- The one-statement append checks its idempotency keys in two steps: in its snapshot before it
-- takes the rooms' locks, then, once they are held, only against what other writers committed
-- to those rooms while it waited.
--
-- Why: since 0006 no UNIQUE index catches a stored key on insert, and the statement's snapshot
-- is taken before it waits for the rooms' locks, so a key another writer committed during that
-- wait is not in it. 0006's guard (`seqcast_check_keys`) therefore refused any keyed group whose
-- room another writer had touched during the wait. In a busy room written by several nodes that
-- is nearly every group: measured on two nodes writing one room, 63% of the groups were refused
-- and committed a second time in a transaction (five round trips, and the first statement's
-- work thrown away): 28,053 commits/s, against 41,900 before partitioning (same machine).
--
-- Now (server/src/store/postgres/append.rs, ONE_STATEMENT):
-- 1. Before any lock, the keys are looked up in the statement's snapshot (one index probe per
--    key and partition), outside the rooms' locks, so the other writers of the room are not
--    held up by it. A key found there is stored: `seqcast_check_keys` raises, as in 0006.
-- 2. Once every lock is held, `seqcast_check_keys_waited` (below) looks at the seqs each keyed
--    room gained between the snapshot and the lock, which are exactly the rows other writers
--    committed during the wait (every writer bumps the head in the transaction that inserts).
--    A VOLATILE function takes a new snapshot for each query it runs (under READ COMMITTED, the
--    isolation the node uses), so it sees them; the statement passes it the ranges, which are
--    empty when nobody wrote in between.
-- A stored key raises unique_violation (23505): the statement stores nothing and the node
-- commits the group again in a transaction that answers the key with its original.
--
-- Nodes of the previous version (during a rolling upgrade) keep 0006's guard; both are correct
-- side by side, since each writer checks its own keys under its own locks.
CREATE OR REPLACE FUNCTION seqcast_check_keys_waited(
    rooms   TEXT[],
    after   BIGINT[],
    upto    BIGINT[],
    k_rooms TEXT[],
    senders TEXT[],
    idems   TEXT[]
) RETURNS BOOLEAN
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    -- The rows of the ranges are read first (the pkey's range scans; OFFSET 0 keeps the
    -- planner from turning the join around into one idem probe per key and partition, which
    -- costs several times as much), then matched against the keys in a hash.
    IF rooms IS NOT NULL AND EXISTS (
        SELECT 1
        FROM (SELECT m.room, m.sender, m.idem
              FROM UNNEST(rooms, after, upto) AS w (room, after, upto)
              CROSS JOIN LATERAL (
                  SELECT m.room, m.sender, m.idem FROM messages m
                  WHERE m.room = w.room AND m.seq > w.after AND m.seq <= w.upto
                  OFFSET 0) AS m) AS c
        JOIN UNNEST(k_rooms, senders, idems) AS k (room, sender, idem)
          ON k.room = c.room AND k.sender = c.sender AND k.idem = c.idem
    ) THEN
        RAISE EXCEPTION 'seqcast: an idempotency key of the group was stored while it waited'
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN TRUE;
END
$$;
