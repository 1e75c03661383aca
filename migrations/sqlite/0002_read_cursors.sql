-- Read cursors (protocol v1.1): per user and room, the highest seq the user has read. Only ever
-- raised (`mark_read`), capped at the room's head when it is written; a cursor of 0 is not
-- stored. Keyed by user first: `GET /v1/unread` lists one user's rooms, a range of this key.
CREATE TABLE read_cursors (
    user_id TEXT    NOT NULL,
    room    TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (user_id, room)
) STRICT, WITHOUT ROWID;
