//! Groups with idempotency keys: every kind of input in one group, and, on Postgres, a key that
//! another node commits while the group waits for its room. On Postgres a group whose keys are
//! all new commits in one statement; one that repeats a stored key is committed again in a
//! transaction that looks the keys up: both paths are run here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use seqcast::store::{Appended, NewMessage, PostgresStore, RoomInfo, Store};
use sqlx::{Connection, Executor, PgConnection};

use crate::support::postgres::TestPostgres;
use crate::{appended_seqs, keyed, msg};

contract!(a_keyed_group_answers_every_kind_of_input_as_append_would);

/// Stored keys, keys repeated within the group, the same key from another sender or in another
/// room, unkeyed messages, and a room whose every input is a repeat (not bumped), in one group.
async fn a_keyed_group_answers_every_kind_of_input_as_append_would(store: Arc<dyn Store>) {
    let stored_a = store
        .append("a", &[keyed("alice", "a1", "k1")])
        .await
        .unwrap()
        .remove(0);
    let stored_c = store
        .append("c", &[keyed("carol", "c1", "kc")])
        .await
        .unwrap()
        .remove(0);
    let a = [
        keyed("alice", "a1 resent", "k1"),
        msg("bob", "plain"),
        keyed("alice", "n", "k2"),
        keyed("alice", "n resent", "k2"),
        keyed("bob", "b", "k1"),
    ];
    let b = [keyed("alice", "x", "k1"), keyed("alice", "x resent", "k1")];
    let c = [keyed("carol", "c1 resent", "kc")];
    let out = store
        .append_rooms(&[("a", &a), ("b", &b), ("c", &c)])
        .await
        .unwrap();

    let flags = |room: &[Appended]| room.iter().map(|x| x.duplicate).collect::<Vec<_>>();
    assert_eq!(appended_seqs(&out[0]), [1, 2, 3, 3, 4]);
    assert_eq!(flags(&out[0]), [true, false, false, true, false]);
    assert_eq!(
        out[0][0].message, stored_a.message,
        "a stored key is answered with the original, body and all"
    );
    assert_eq!(
        out[0][3].message, out[0][2].message,
        "a repeat in the group"
    );
    assert_eq!(out[0][3].message.body, "n");
    assert_eq!(out[0][4].message.sender, "bob");
    assert_eq!(appended_seqs(&out[1]), [1, 1]);
    assert_eq!(flags(&out[1]), [false, true]);
    assert_eq!(out[1][1].message.body, "x");
    assert_eq!(out[2].len(), 1);
    assert_eq!(out[2][0].message, stored_c.message);
    assert!(out[2][0].duplicate);
    assert_eq!(out[1][0].message.room, "b");

    for (room, head) in [("a", 4), ("b", 1), ("c", 1)] {
        assert_eq!(
            store.room_info(room).await.unwrap(),
            RoomInfo { head, first: 1 },
            "room {room}"
        );
    }
    // What the group stored is what a later read returns.
    let read = store.read_after("a", 0, None, 10).await.unwrap();
    let bodies: Vec<&str> = read.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["a1", "plain", "n", "b"]);
    assert_eq!(read[2], out[0][2].message);
}

/// How long the test waits for the store's statement to queue behind its lock.
const WAIT_DEADLINE: Duration = Duration::from_secs(10);

/// Appends `batch` to room `r` (head 1) while "another node" holds the room's counter row, and
/// lets it commit seq 2 (`theirs`, from `sender` with the key `k`, id `id`, ts 42) once the
/// append waits for the row: what the group sees of a room written during its wait.
async fn append_during_another_commit(
    url: &str,
    store: &Arc<PostgresStore>,
    batch: Vec<NewMessage>,
    (sender, id): (&str, &str),
) -> Vec<Appended> {
    let mut other = PgConnection::connect(url).await.unwrap();
    other.execute("BEGIN").await.unwrap();
    other
        .execute("SELECT head FROM rooms WHERE room = 'r' FOR UPDATE")
        .await
        .unwrap();
    let appending = {
        let store = Arc::clone(store);
        tokio::spawn(async move { store.append("r", &batch).await })
    };
    let mut watch = PgConnection::connect(url).await.unwrap();
    let until = Instant::now() + WAIT_DEADLINE;
    loop {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut watch)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the append never waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sqlx::query(
        "INSERT INTO messages (room, seq, id, sender, body, idem, ts_ms) \
         VALUES ('r', 2, $1::uuid, $2, 'theirs', 'k', 42)",
    )
    .bind(id)
    .bind(sender)
    .execute(&mut other)
    .await
    .unwrap();
    other
        .execute("UPDATE rooms SET head = 2 WHERE room = 'r'")
        .await
        .unwrap();
    other.execute("COMMIT").await.unwrap();
    appending.await.unwrap().expect("the group commits")
}

/// Another node commits a key while this node's keyed group waits for the room's lock. The
/// group must still answer with that node's original and store nothing: its one statement is
/// refused by its key check, which runs once the locks are held (migration 0007; before 0006,
/// the unique index on (room, sender, idem)), and the group is committed again with key
/// lookups under the lock (without that retry it failed whole as `internal`, and without a
/// check after the lock it stored the key twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_key_committed_by_another_node_during_the_wait_is_the_original() {
    let url = TestPostgres::shared().fresh_database().await;
    let store = Arc::new(PostgresStore::connect(&url).await.unwrap());
    store.append("r", &[msg("bob", "0")]).await.unwrap();
    let batch = vec![keyed("alice", "mine", "k"), msg("bob", "after")];
    let out = append_during_another_commit(
        &url,
        &store,
        batch,
        ("alice", "0190e3a0-0000-7000-8000-000000000001"),
    )
    .await;
    assert!(out[0].duplicate, "{out:?}");
    assert_eq!(out[0].message.seq, 2);
    assert_eq!(out[0].message.body, "theirs");
    assert_eq!(
        out[0].message.id.to_string(),
        "0190e3a0-0000-7000-8000-000000000001"
    );
    assert_eq!(out[0].message.ts_ms, 42);
    assert!(!out[1].duplicate);
    assert_eq!(out[1].message.seq, 3, "no hole, nothing stored twice");
    assert_eq!(
        store.room_info("r").await.unwrap(),
        RoomInfo { head: 3, first: 1 }
    );
    assert_eq!(store.keyed_retries(), 1, "answered by the transaction path");
}

/// The common case in a room busy on several nodes: another node commits other messages (other
/// keys) while this node's keyed group waits for the room. The group's keys are new, so it
/// commits in its one statement, not a second time in a transaction. (Under migration 0006's
/// guard, which refused a keyed group whenever its room was written during the wait, 63% of
/// the groups of two nodes writing one room were committed twice.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_room_written_during_the_wait_does_not_refuse_new_keys() {
    let url = TestPostgres::shared().fresh_database().await;
    let store = Arc::new(PostgresStore::connect(&url).await.unwrap());
    store.append("r", &[msg("bob", "0")]).await.unwrap();
    let batch = vec![keyed("alice", "mine", "k"), keyed("bob", "also", "k")];
    let out = append_during_another_commit(
        &url,
        &store,
        batch,
        ("carol", "0190e3a0-0000-7000-8000-000000000002"),
    )
    .await;
    assert!(!out[0].duplicate && !out[1].duplicate, "{out:?}");
    assert_eq!(out[0].message.seq, 3);
    assert_eq!(out[1].message.seq, 4);
    assert_eq!(out[0].message.body, "mine");
    assert_eq!(
        store.room_info("r").await.unwrap(),
        RoomInfo { head: 4, first: 1 }
    );
    assert_eq!(store.keyed_retries(), 0, "committed in one statement");
}
