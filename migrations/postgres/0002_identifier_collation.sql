-- Room names, senders and idempotency keys compare by their bytes (collation "C").
--
-- They are identifiers: compared for equality, and ordered only to take the rooms' row locks in
-- one order (which the queries already spell `COLLATE "C"`), never sorted for people to read.
-- Under the database's own collation, which in most deployments is a linguistic one (ICU or
-- libc en_US), every comparison in the primary keys and in the idempotency index went through
-- the collation library: several microseconds of Postgres CPU for each keyed insert. Equality
-- is the same either way (both are deterministic), so no stored key changes meaning.
--
-- On an existing database this rebuilds the indexes on these columns, under an exclusive lock
-- on each table for as long as that takes (see docs/operations.md, "Upgrading").
ALTER TABLE rooms ALTER COLUMN room TYPE TEXT COLLATE "C";
ALTER TABLE messages
    ALTER COLUMN room TYPE TEXT COLLATE "C",
    ALTER COLUMN sender TYPE TEXT COLLATE "C",
    ALTER COLUMN idem TYPE TEXT COLLATE "C";
