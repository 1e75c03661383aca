-- Presence (protocol v1.1): which users have a connection joined to which room, per node, for
-- the other nodes of a cluster to read (a node keeps its own share in memory and writes it here
-- in batches, `server/src/presence/roster.rs`).
--
-- Soft state: a node's rows count only while its heartbeat (`presence_nodes.expires_at`, set
-- from the database's clock) is in the future, so a node that dies stops counting within
-- SEQCAST_PRESENCE_TTL without anyone cleaning up after it. Rows of a node expired for a minute
-- are deleted with it (ON DELETE CASCADE) by any other node's heartbeat. Nothing here is
-- history: the table holds the present only, and losing it costs nothing that the nodes do not
-- write again.
--
-- Identifiers compare by their bytes, as everywhere else (0002_identifier_collation.sql).
CREATE TABLE presence_nodes (
    node       TEXT        COLLATE "C" PRIMARY KEY,
    expires_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE presence (
    room    TEXT COLLATE "C" NOT NULL,
    user_id TEXT COLLATE "C" NOT NULL,
    node    TEXT COLLATE "C" NOT NULL REFERENCES presence_nodes (node) ON DELETE CASCADE,
    PRIMARY KEY (room, user_id, node)
);

-- A node's own rows: the cascade, and a node writing its share again.
CREATE INDEX presence_by_node ON presence (node);
