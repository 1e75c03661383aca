//! The storage contract: one set of test functions, each taking an `Arc<dyn Store>`, run against
//! every backend (a fresh Postgres database from the test server of `support::postgres`, and a
//! SQLite file in a temporary directory). Postgres-only behaviour (several nodes on one database,
//! a database that goes away) is tested at the end.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use seqcast::store::{
    Appended, NewMessage, PostgresStore, RoomInfo, SqliteStore, Store, StoreError, StoredMessage,
};
use support::postgres::TestPostgres;

/// A store under test, with what must live as long as it.
struct Backend {
    store: Arc<dyn Store>,
    /// For tests that reach into the database behind the store's back.
    url: String,
    /// The SQLite file's directory; `None` for Postgres.
    _dir: Option<tempfile::TempDir>,
}

async fn postgres_backend() -> Backend {
    let url = TestPostgres::shared().fresh_database().await;
    let store = PostgresStore::connect(&url).await.unwrap();
    assert_eq!(store.kind(), "postgres");
    Backend {
        store: Arc::new(store),
        url,
        _dir: None,
    }
}

async fn sqlite_backend() -> Backend {
    let dir = tempfile::Builder::new()
        .prefix("seqcast-store-")
        .tempdir()
        .unwrap();
    let url = format!("sqlite://{}", dir.path().join("seqcast.db").display());
    let store = SqliteStore::connect(&url).await.unwrap();
    assert_eq!(store.kind(), "sqlite");
    Backend {
        store: Arc::new(store),
        url,
        _dir: Some(dir),
    }
}

/// For each contract function `async fn name(store: Arc<dyn Store>)`, generates the tests
/// `postgres::name` and `sqlite::name`.
macro_rules! contract {
    ($($name:ident),+ $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = super::postgres_backend().await;
                    super::$name(backend.store.clone()).await;
                }
            )+
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = super::sqlite_backend().await;
                    super::$name(backend.store.clone()).await;
                }
            )+
        }
    };
}

contract!(
    empty_room,
    append_assigns_consecutive_seqs,
    empty_batch_stores_nothing,
    repeated_idem_returns_the_original,
    idem_is_scoped_to_sender_and_room,
    repeated_idem_within_one_batch,
    body_is_stored_byte_for_byte,
    read_after_bounds_and_limit,
    read_before_is_ascending,
    rooms_are_isolated,
    concurrent_appends_have_no_holes,
    room_names_use_every_allowed_character,
    large_batch_commits_at_once,
    delete_before_deletes_old_messages_only,
    delete_before_is_bounded_by_limit,
    delete_before_everything_keeps_the_head,
    idem_expires_with_its_message,
    room_heads_reads_many_rooms_at_once,
    append_rooms_commits_each_room_as_append_would,
    append_rooms_groups_concurrently_without_holes,
);

fn msg(sender: &str, body: &str) -> NewMessage {
    NewMessage {
        sender: sender.to_owned(),
        body: body.to_owned(),
        idem: None,
    }
}

fn keyed(sender: &str, body: &str, idem: &str) -> NewMessage {
    NewMessage {
        idem: Some(idem.to_owned()),
        ..msg(sender, body)
    }
}

fn seqs(messages: &[StoredMessage]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

fn appended_seqs(appended: &[Appended]) -> Vec<u64> {
    appended.iter().map(|a| a.message.seq).collect()
}

/// Appends `n` plain messages with bodies `0..n`.
async fn fill(store: &dyn Store, room: &str, n: usize) -> Vec<Appended> {
    let batch: Vec<NewMessage> = (0..n).map(|i| msg("alice", &i.to_string())).collect();
    store.append(room, &batch).await.unwrap()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .try_into()
        .unwrap()
}

async fn empty_room(store: Arc<dyn Store>) {
    store.ping().await.unwrap();
    assert_eq!(
        store.room_info("nobody-here").await.unwrap(),
        RoomInfo { head: 0, first: 1 }
    );
    assert!(store
        .read_after("nobody-here", 0, None, 100)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .read_before("nobody-here", u64::MAX, 100)
        .await
        .unwrap()
        .is_empty());
}

async fn append_assigns_consecutive_seqs(store: Arc<dyn Store>) {
    let before = now_ms();
    let first = store
        .append(
            "general",
            &[msg("alice", "1"), msg("bob", "2"), msg("alice", "3")],
        )
        .await
        .unwrap();
    let after = now_ms();
    assert_eq!(appended_seqs(&first), [1, 2, 3]);
    for (appended, (sender, body)) in
        first
            .iter()
            .zip([("alice", "1"), ("bob", "2"), ("alice", "3")])
    {
        assert!(!appended.duplicate);
        assert_eq!(appended.message.room, "general");
        assert_eq!(appended.message.sender, sender);
        assert_eq!(appended.message.body, body);
        assert!((before..=after).contains(&appended.message.ts_ms));
    }
    let second = store
        .append("general", &[msg("carol", "4"), msg("alice", "5")])
        .await
        .unwrap();
    assert_eq!(appended_seqs(&second), [4, 5]);
    assert!(second[0].message.ts_ms >= first[2].message.ts_ms);

    assert_eq!(
        store.room_info("general").await.unwrap(),
        RoomInfo { head: 5, first: 1 }
    );
    let stored = store.read_after("general", 0, None, 100).await.unwrap();
    let returned: Vec<StoredMessage> = first.into_iter().chain(second).map(|a| a.message).collect();
    assert_eq!(stored, returned);
    let ids: HashSet<_> = stored.iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), 5, "ids are unique");
}

async fn empty_batch_stores_nothing(store: Arc<dyn Store>) {
    assert!(store.append("general", &[]).await.unwrap().is_empty());
    assert_eq!(
        store.room_info("general").await.unwrap(),
        RoomInfo { head: 0, first: 1 }
    );
}

async fn repeated_idem_returns_the_original(store: Arc<dyn Store>) {
    let original = store
        .append("general", &[keyed("alice", r#""first""#, "k1")])
        .await
        .unwrap()
        .remove(0);
    assert!(!original.duplicate);
    store.append("general", &[msg("bob", "2")]).await.unwrap();

    // Same sender, same key, other body: the original comes back, nothing new is stored.
    let repeat = store
        .append("general", &[keyed("alice", r#""second""#, "k1")])
        .await
        .unwrap();
    assert_eq!(
        repeat,
        [Appended {
            message: original.message.clone(),
            duplicate: true
        }]
    );
    assert_eq!(
        store.room_info("general").await.unwrap(),
        RoomInfo { head: 2, first: 1 }
    );
    assert_eq!(
        seqs(&store.read_after("general", 0, None, 100).await.unwrap()),
        [1, 2]
    );

    // A repeat within a batch of new messages: those still get the next seqs.
    let mixed = store
        .append(
            "general",
            &[
                msg("carol", "3"),
                keyed("alice", r#""third""#, "k1"),
                keyed("alice", "4", "k2"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(appended_seqs(&mixed), [3, 1, 4]);
    assert_eq!(
        mixed.iter().map(|a| a.duplicate).collect::<Vec<_>>(),
        [false, true, false]
    );
    assert_eq!(mixed[1].message, original.message);
    assert_eq!(store.room_info("general").await.unwrap().head, 4);
}

async fn idem_is_scoped_to_sender_and_room(store: Arc<dyn Store>) {
    let alice = store
        .append("general", &[keyed("alice", "1", "k")])
        .await
        .unwrap();
    let bob = store
        .append("general", &[keyed("bob", "2", "k")])
        .await
        .unwrap();
    let elsewhere = store
        .append("random", &[keyed("alice", "3", "k")])
        .await
        .unwrap();
    assert!(!alice[0].duplicate && !bob[0].duplicate && !elsewhere[0].duplicate);
    assert_eq!(alice[0].message.seq, 1);
    assert_eq!(bob[0].message.seq, 2);
    assert_eq!(elsewhere[0].message.seq, 1);
    assert_ne!(alice[0].message.id, elsewhere[0].message.id);
}

async fn repeated_idem_within_one_batch(store: Arc<dyn Store>) {
    let appended = store
        .append(
            "general",
            &[
                keyed("alice", "1", "k"),
                keyed("bob", "2", "k"),
                keyed("alice", "3", "k"),
                msg("alice", "4"),
                keyed("bob", "5", "k"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(appended_seqs(&appended), [1, 2, 1, 3, 2]);
    assert_eq!(
        appended.iter().map(|a| a.duplicate).collect::<Vec<_>>(),
        [false, false, true, false, true]
    );
    assert_eq!(appended[2].message, appended[0].message);
    assert_eq!(appended[2].message.body, "1");
    assert_eq!(appended[4].message, appended[1].message);
    let stored = store.read_after("general", 0, None, 100).await.unwrap();
    assert_eq!(
        stored.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        ["1", "2", "4"]
    );
}

async fn body_is_stored_byte_for_byte(store: Arc<dyn Store>) {
    let bodies = [
        r#"{"b":1,  "a":[1,2]}"#,
        "{ \"text\" : \"h\u{e9}llo w\u{f6}rld \u{1f600} \u{65e5}\u{672c}\" ,\n\t\"n\": 1.50 }",
        r#"{"escaped":"\u00e9\n\"quoted\"\\","big":1e400,"dup":1,"dup":2}"#,
        r#"  "just a string"  "#,
        "null",
    ];
    let batch: Vec<NewMessage> = bodies.iter().map(|b| msg("alice", b)).collect();
    let appended = store.append("general", &batch).await.unwrap();
    let stored = store.read_after("general", 0, None, 100).await.unwrap();
    let stored_before = store.read_before("general", 100, 100).await.unwrap();
    for (i, body) in bodies.iter().enumerate() {
        assert_eq!(appended[i].message.body, *body);
        assert_eq!(stored[i].body, *body);
        assert_eq!(stored_before[i].body, *body);
    }
}

async fn read_after_bounds_and_limit(store: Arc<dyn Store>) {
    fill(&*store, "general", 10).await;
    let read = |after, up_to, limit| {
        let store = store.clone();
        async move {
            seqs(
                &store
                    .read_after("general", after, up_to, limit)
                    .await
                    .unwrap(),
            )
        }
    };
    assert_eq!(read(0, None, 100).await, (1..=10).collect::<Vec<_>>());
    assert_eq!(read(3, None, 4).await, [4, 5, 6, 7]);
    assert_eq!(read(8, None, 100).await, [9, 10]);
    assert_eq!(read(3, Some(5), 100).await, [4, 5]);
    assert_eq!(read(3, Some(9), 2).await, [4, 5]);
    assert_eq!(read(0, Some(0), 100).await, Vec::<u64>::new());
    assert_eq!(read(5, Some(5), 100).await, Vec::<u64>::new());
    assert_eq!(read(10, None, 100).await, Vec::<u64>::new());
    assert_eq!(read(u64::MAX, None, 100).await, Vec::<u64>::new());
    assert_eq!(read(0, Some(u64::MAX), 3).await, [1, 2, 3]);
    assert_eq!(read(0, None, 0).await, Vec::<u64>::new());
}

async fn read_before_is_ascending(store: Arc<dyn Store>) {
    fill(&*store, "general", 10).await;
    let read = |before, limit| {
        let store = store.clone();
        async move { seqs(&store.read_before("general", before, limit).await.unwrap()) }
    };
    assert_eq!(read(11, 3).await, [8, 9, 10]);
    assert_eq!(read(u64::MAX, 2).await, [9, 10]);
    assert_eq!(read(5, 100).await, [1, 2, 3, 4]);
    assert_eq!(read(5, 2).await, [3, 4]);
    assert_eq!(read(1, 100).await, Vec::<u64>::new());
    assert_eq!(read(0, 100).await, Vec::<u64>::new());
    assert_eq!(read(11, 0).await, Vec::<u64>::new());
    let messages = store.read_before("general", 4, 100).await.unwrap();
    assert_eq!(
        messages.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        ["0", "1", "2"]
    );
}

async fn rooms_are_isolated(store: Arc<dyn Store>) {
    fill(&*store, "a", 3).await;
    let b = store
        .append("b", &[msg("bob", "b1"), msg("bob", "b2")])
        .await
        .unwrap();
    assert_eq!(appended_seqs(&b), [1, 2]);
    // Room names are case-sensitive.
    let upper = store.append("A", &[msg("carol", "A1")]).await.unwrap();
    assert_eq!(appended_seqs(&upper), [1]);

    assert_eq!(
        store.room_info("a").await.unwrap(),
        RoomInfo { head: 3, first: 1 }
    );
    assert_eq!(
        store.room_info("b").await.unwrap(),
        RoomInfo { head: 2, first: 1 }
    );
    assert_eq!(
        store.room_info("A").await.unwrap(),
        RoomInfo { head: 1, first: 1 }
    );
    let in_a = store.read_after("a", 0, None, 100).await.unwrap();
    assert_eq!(seqs(&in_a), [1, 2, 3]);
    assert!(in_a.iter().all(|m| m.room == "a" && m.sender == "alice"));
    let in_b = store.read_before("b", 100, 100).await.unwrap();
    assert_eq!(
        in_b.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        ["b1", "b2"]
    );
    assert!(in_b.iter().all(|m| m.room == "b"));
}

/// Runs `tasks` tasks that each append `per_task` single-message batches to `room`, spreading
/// the tasks over `stores` round-robin, and checks the seqs each task got.
async fn append_concurrently(stores: &[Arc<dyn Store>], room: &str, tasks: usize, per_task: usize) {
    let mut handles = Vec::new();
    for task in 0..tasks {
        let store = stores[task % stores.len()].clone();
        let room = room.to_owned();
        handles.push(tokio::spawn(async move {
            let mut got = Vec::with_capacity(per_task);
            for i in 0..per_task {
                let appended = store
                    .append(&room, &[msg(&format!("task{task}"), &i.to_string())])
                    .await
                    .unwrap();
                got.push(appended[0].message.seq);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for handle in handles {
        let got = handle.await.unwrap();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "one task's appends get increasing seqs: {got:?}"
        );
        all.extend(got);
    }
    all.sort_unstable();
    let n = u64::try_from(tasks * per_task).unwrap();
    assert_eq!(all, (1..=n).collect::<Vec<_>>(), "no holes, no duplicates");
    for store in stores {
        assert_eq!(
            store.room_info(room).await.unwrap(),
            RoomInfo { head: n, first: 1 }
        );
        let stored = store.read_after(room, 0, None, 10_000).await.unwrap();
        assert_eq!(seqs(&stored), (1..=n).collect::<Vec<_>>());
    }
}

async fn concurrent_appends_have_no_holes(store: Arc<dyn Store>) {
    append_concurrently(&[store], "busy", 8, 50).await;
}

async fn room_names_use_every_allowed_character(store: Arc<dyn Store>) {
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-";
    let room: String = alphabet.chars().cycle().take(128).collect();
    assert_eq!(room.len(), 128);
    let appended = fill(&*store, &room, 2).await;
    assert!(appended.iter().all(|a| a.message.room == room));
    assert_eq!(
        store.room_info(&room).await.unwrap(),
        RoomInfo { head: 2, first: 1 }
    );
    let stored = store.read_after(&room, 0, None, 100).await.unwrap();
    assert_eq!(seqs(&stored), [1, 2]);
    assert!(stored.iter().all(|m| m.room == room));
    // A prefix of the name is another room.
    assert_eq!(
        store.room_info(&room[..127]).await.unwrap(),
        RoomInfo { head: 0, first: 1 }
    );
}

async fn large_batch_commits_at_once(store: Arc<dyn Store>) {
    let batch: Vec<NewMessage> = (0..500)
        .map(|i| {
            keyed(
                &format!("user{}", i % 7),
                &format!("{{\"i\":{i}}}"),
                &i.to_string(),
            )
        })
        .collect();
    let appended = store.append("bulk", &batch).await.unwrap();
    assert_eq!(appended_seqs(&appended), (1..=500).collect::<Vec<_>>());
    assert!(appended.iter().all(|a| !a.duplicate));
    let stored = store.read_after("bulk", 0, None, 1000).await.unwrap();
    assert_eq!(
        stored,
        appended
            .iter()
            .map(|a| a.message.clone())
            .collect::<Vec<_>>()
    );

    // The same batch again: all duplicates of the originals, nothing stored.
    let again = store.append("bulk", &batch).await.unwrap();
    assert!(again.iter().all(|a| a.duplicate));
    assert_eq!(
        again.iter().map(|a| a.message.clone()).collect::<Vec<_>>(),
        stored
    );
    assert_eq!(
        store.room_info("bulk").await.unwrap(),
        RoomInfo {
            head: 500,
            first: 1
        }
    );
}

/// Waits (with a deadline) until the wall clock has passed `ts_ms`, so that messages appended
/// from now on are younger than those stamped `ts_ms`.
async fn clock_past(ts_ms: i64) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while now_ms() <= ts_ms {
        assert!(Instant::now() < deadline, "the clock does not advance");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn delete_before_deletes_old_messages_only(store: Arc<dyn Store>) {
    fill(&*store, "a", 3).await;
    let old = fill(&*store, "b", 2).await;
    clock_past(old[1].message.ts_ms).await;
    let young = fill(&*store, "a", 2).await;
    let cutoff = young[0].message.ts_ms;
    assert!(old.iter().all(|a| a.message.ts_ms < cutoff));

    assert_eq!(store.delete_before(cutoff, 100).await.unwrap(), 5);
    assert_eq!(
        store.room_info("a").await.unwrap(),
        RoomInfo { head: 5, first: 4 }
    );
    let left: Vec<StoredMessage> = young.into_iter().map(|a| a.message).collect();
    assert_eq!(store.read_after("a", 0, None, 100).await.unwrap(), left);
    assert_eq!(
        store.room_info("b").await.unwrap(),
        RoomInfo { head: 2, first: 3 }
    );
    assert_eq!(store.delete_before(cutoff, 100).await.unwrap(), 0);

    // Seqs continue after the head, not after what is left.
    let next = fill(&*store, "a", 1).await;
    assert_eq!(appended_seqs(&next), [6]);
    let next = fill(&*store, "b", 1).await;
    assert_eq!(appended_seqs(&next), [3]);
    assert_eq!(
        store.room_info("b").await.unwrap(),
        RoomInfo { head: 3, first: 3 }
    );
}

async fn delete_before_is_bounded_by_limit(store: Arc<dyn Store>) {
    fill(&*store, "general", 10).await;
    let cutoff = now_ms() + 1000;
    assert_eq!(store.delete_before(cutoff, 0).await.unwrap(), 0);
    for (deleted, first) in [(4, 5), (4, 9), (2, 11), (0, 11)] {
        assert_eq!(store.delete_before(cutoff, 4).await.unwrap(), deleted);
        assert_eq!(
            store.room_info("general").await.unwrap(),
            RoomInfo { head: 10, first }
        );
        // Oldest first: what is left is the newest run of seqs.
        let left = store.read_after("general", 0, None, 100).await.unwrap();
        assert_eq!(seqs(&left), (first..=10).collect::<Vec<_>>());
    }
}

async fn delete_before_everything_keeps_the_head(store: Arc<dyn Store>) {
    fill(&*store, "general", 3).await;
    assert_eq!(store.delete_before(now_ms() + 1000, 1000).await.unwrap(), 3);
    assert_eq!(
        store.room_info("general").await.unwrap(),
        RoomInfo { head: 3, first: 4 }
    );
    assert!(store
        .read_after("general", 0, None, 100)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .read_before("general", u64::MAX, 100)
        .await
        .unwrap()
        .is_empty());
    let next = fill(&*store, "general", 1).await;
    assert_eq!(appended_seqs(&next), [4]);
    assert_eq!(
        store.room_info("general").await.unwrap(),
        RoomInfo { head: 4, first: 4 }
    );
}

/// The idempotency key lives on the message row: once retention deleted the message, the same
/// key stores a new message.
async fn idem_expires_with_its_message(store: Arc<dyn Store>) {
    let original = store
        .append("general", &[keyed("alice", "1", "k")])
        .await
        .unwrap();
    assert_eq!(store.delete_before(now_ms() + 1000, 1000).await.unwrap(), 1);
    let again = store
        .append("general", &[keyed("alice", "1", "k")])
        .await
        .unwrap();
    assert!(!again[0].duplicate);
    assert_eq!(again[0].message.seq, 2);
    assert_ne!(again[0].message.id, original[0].message.id);
}

/// Retention never opens a hole in a room, even when timestamps are out of seq order (nodes
/// whose clocks disagree): an old message waits behind a newer one with a lower seq.
async fn delete_before_deletes_prefixes_only(backend: Backend) {
    let store = &*backend.store;
    fill(store, "skewed", 6).await;
    fill(store, "plain", 2).await;
    let now = now_ms();
    // skewed: seqs 2, 3, 5 and 6 are old, 1 and 4 are not.
    for (seq, ts_ms) in [(1, now), (2, 10), (3, 20), (4, now), (5, 10), (6, 30)] {
        set_ts(&backend.url, "skewed", seq, ts_ms).await;
    }
    for seq in [1, 2] {
        set_ts(&backend.url, "plain", seq, 10).await;
    }
    assert_eq!(store.delete_before(1000, 100).await.unwrap(), 2);
    assert_eq!(
        store.room_info("skewed").await.unwrap(),
        RoomInfo { head: 6, first: 1 }
    );
    assert_eq!(store.room_info("plain").await.unwrap().first, 3);

    // Once seq 1 is old too, the run up to the next newer message goes, and no further; a limit
    // that cuts through the run deletes its beginning.
    set_ts(&backend.url, "skewed", 1, 40).await;
    assert_eq!(store.delete_before(1000, 2).await.unwrap(), 2);
    assert_eq!(store.room_info("skewed").await.unwrap().first, 3);
    assert_eq!(store.delete_before(1000, 100).await.unwrap(), 1);
    let left = store.read_after("skewed", 0, None, 100).await.unwrap();
    assert_eq!(seqs(&left), [4, 5, 6]);

    set_ts(&backend.url, "skewed", 4, 50).await;
    assert_eq!(store.delete_before(1000, 100).await.unwrap(), 3);
    assert_eq!(
        store.room_info("skewed").await.unwrap(),
        RoomInfo { head: 6, first: 7 }
    );
}

/// Sets a message's commit time directly in the database.
async fn set_ts(url: &str, room: &str, seq: i64, ts_ms: i64) {
    use sqlx::Connection;
    let updated = if url.starts_with("postgres") {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query("UPDATE messages SET ts_ms = $1 WHERE room = $2 AND seq = $3")
            .bind(ts_ms)
            .bind(room)
            .bind(seq)
            .execute(&mut conn)
            .await
            .unwrap()
            .rows_affected()
    } else {
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query("UPDATE messages SET ts_ms = ?1 WHERE room = ?2 AND seq = ?3")
            .bind(ts_ms)
            .bind(room)
            .bind(seq)
            .execute(&mut conn)
            .await
            .unwrap()
            .rows_affected()
    };
    assert_eq!(updated, 1, "no message {room}/{seq}");
}

#[tokio::test]
async fn sqlite_delete_before_deletes_prefixes_only() {
    delete_before_deletes_prefixes_only(sqlite_backend().await).await;
}

#[tokio::test]
async fn postgres_delete_before_deletes_prefixes_only() {
    delete_before_deletes_prefixes_only(postgres_backend().await).await;
}

// ---- SQLite only ----

#[tokio::test]
async fn sqlite_reopen_keeps_messages_and_head() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("seqcast.db").display());
    let store = SqliteStore::connect(&url).await.unwrap();
    let first = fill(&store, "general", 3).await;
    drop(store);

    let store = SqliteStore::connect(&url).await.unwrap();
    assert_eq!(
        store.room_info("general").await.unwrap(),
        RoomInfo { head: 3, first: 1 }
    );
    let stored = store.read_after("general", 0, None, 100).await.unwrap();
    assert_eq!(
        stored,
        first.into_iter().map(|a| a.message).collect::<Vec<_>>()
    );
    let next = store.append("general", &[msg("bob", "x")]).await.unwrap();
    assert_eq!(next[0].message.seq, 4);
}

// ---- Postgres only ----

/// Two nodes (two stores, two pools) on one database share the seqs of a room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_nodes_append_without_holes() {
    let url = TestPostgres::shared().fresh_database().await;
    let node_a: Arc<dyn Store> = Arc::new(PostgresStore::connect(&url).await.unwrap());
    // The second node's startup runs the (already applied) migrations again.
    let node_b: Arc<dyn Store> = Arc::new(PostgresStore::connect(&url).await.unwrap());
    append_concurrently(&[node_a, node_b], "shared", 8, 50).await;
}

/// Nodes starting at the same time on an empty database migrate it once between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_nodes_start_concurrently() {
    let url = TestPostgres::shared().fresh_database().await;
    let (a, b, c) = tokio::join!(
        PostgresStore::connect(&url),
        PostgresStore::connect(&url),
        PostgresStore::connect(&url)
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    fill(&a, "general", 1).await;
    fill(&b, "general", 1).await;
    assert_eq!(c.room_info("general").await.unwrap().head, 2);
}

/// A batch that fails part-way stores nothing and leaves no hole: the next append continues
/// right after the last committed seq.
/// Several rooms in one call: each gets what `append` would have given it (consecutive seqs
/// after its own head, idempotency keys honoured per room), in input order.
async fn append_rooms_commits_each_room_as_append_would(store: Arc<dyn Store>) {
    fill(&*store, "b", 3).await;
    let a = [msg("alice", "1"), keyed("alice", "2", "k")];
    let b = [
        msg("bob", "4"),
        keyed("bob", "5", "k"),
        keyed("bob", "5 again", "k"),
    ];
    let empty: [NewMessage; 0] = [];
    let out = store
        .append_rooms(&[("a", &a), ("b", &b), ("c", &empty)])
        .await
        .unwrap();
    assert_eq!(out.len(), 3);
    assert_eq!(appended_seqs(&out[0]), [1, 2]);
    assert_eq!(appended_seqs(&out[1]), [4, 5, 5]);
    assert!(
        out[1][2].duplicate,
        "a key repeated in the batch is the original"
    );
    assert!(out[2].is_empty());
    assert_eq!(out[0][1].message.room, "a");
    assert_eq!(out[1][0].message.body, "4");
    assert_eq!(
        store.room_info("a").await.unwrap(),
        RoomInfo { head: 2, first: 1 }
    );
    assert_eq!(
        store.room_info("b").await.unwrap(),
        RoomInfo { head: 5, first: 1 }
    );
    assert_eq!(
        store.room_info("c").await.unwrap(),
        RoomInfo { head: 0, first: 1 }
    );
    // Keys stored by a group are found by a later plain append.
    let again = store
        .append("a", &[keyed("alice", "2", "k")])
        .await
        .unwrap();
    assert!(again[0].duplicate);
    assert_eq!(again[0].message.seq, 2);
}

/// Groups without idempotency keys (one statement on Postgres), several writers at once over
/// overlapping rooms: every room ends up with consecutive seqs, each message stored once, in
/// its writer's order, and the timestamps follow the seqs.
async fn append_rooms_groups_concurrently_without_holes(store: Arc<dyn Store>) {
    fill(&*store, "r2", 5).await;
    let rooms = ["r0", "r1", "r2", "r3"];
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                for round in 0..20 {
                    let batches: Vec<Vec<NewMessage>> = rooms
                        .iter()
                        .map(|_| {
                            (0..3)
                                .map(|i| msg(&format!("w{w}"), &format!("{round}.{i}")))
                                .collect()
                        })
                        .collect();
                    let group: Vec<(&str, &[NewMessage])> = rooms
                        .iter()
                        .zip(&batches)
                        .map(|(room, b)| (*room, b.as_slice()))
                        .collect();
                    let out = store.append_rooms(&group).await.unwrap();
                    for (appended, room) in out.iter().zip(rooms) {
                        let s = appended_seqs(appended);
                        assert_eq!(s.len(), 3);
                        assert!(s.windows(2).all(|p| p[1] == p[0] + 1), "{room}: {s:?}");
                        assert!(appended.iter().all(|a| a.message.room == room));
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    for room in rooms {
        let base = if room == "r2" { 5 } else { 0 };
        let head = base + 4 * 20 * 3;
        assert_eq!(
            store.room_info(room).await.unwrap(),
            RoomInfo { head, first: 1 }
        );
        let stored = store.read_after(room, 0, None, 1000).await.unwrap();
        assert_eq!(seqs(&stored), (1..=head).collect::<Vec<_>>(), "{room}");
        assert!(
            stored.windows(2).all(|p| p[0].ts_ms <= p[1].ts_ms),
            "{room}: ts follow seqs"
        );
        let ids: HashSet<_> = stored.iter().map(|m| m.id).collect();
        assert_eq!(ids.len(), stored.len());
        // Each writer's messages keep their order within the room.
        for w in 0..4 {
            let mine: Vec<&str> = stored
                .iter()
                .filter(|m| m.sender == format!("w{w}"))
                .map(|m| m.body.as_str())
                .collect();
            let expected: Vec<String> = (0..20)
                .flat_map(|r| (0..3).map(move |i| format!("{r}.{i}")))
                .collect();
            assert_eq!(mine, expected, "{room}, writer {w}");
        }
    }
}

/// A group is one transaction: one room's failure stores nothing for any of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_failed_group_stores_nothing() {
    let url = TestPostgres::shared().fresh_database().await;
    let store = PostgresStore::connect(&url).await.unwrap();
    fill(&store, "a", 1).await;
    let good = [msg("alice", "2")];
    // Postgres text cannot hold NUL: the second room's insert fails.
    let bad = [msg("bob", "\"nul \0 here\"")];
    let result = store.append_rooms(&[("a", &good), ("b", &bad)]).await;
    assert!(
        matches!(result, Err(StoreError::Other(_))),
        "got {result:?}"
    );
    assert_eq!(
        store.room_info("a").await.unwrap(),
        RoomInfo { head: 1, first: 1 }
    );
    assert_eq!(
        store.room_info("b").await.unwrap(),
        RoomInfo { head: 0, first: 1 }
    );
}

#[tokio::test]
async fn postgres_failed_batch_stores_nothing() {
    let url = TestPostgres::shared().fresh_database().await;
    let store = PostgresStore::connect(&url).await.unwrap();
    fill(&store, "general", 2).await;
    // Postgres text cannot hold NUL, so the insert fails after the counter row was locked.
    let result = store
        .append(
            "general",
            &[msg("alice", "3"), msg("alice", "\"nul \0 here\"")],
        )
        .await;
    assert!(
        matches!(result, Err(StoreError::Other(_))),
        "expected Other, got {result:?}"
    );
    assert_eq!(
        store.room_info("general").await.unwrap(),
        RoomInfo { head: 2, first: 1 }
    );
    let next = store.append("general", &[msg("alice", "3")]).await.unwrap();
    assert_eq!(next[0].message.seq, 3);
    assert_eq!(
        seqs(&store.read_after("general", 0, None, 100).await.unwrap()),
        [1, 2, 3]
    );
}

/// A database that goes away turns into `Unavailable` within a few seconds, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_is_unavailable() {
    let mut postgres = TestPostgres::start();
    let url = postgres.fresh_database().await;
    let store = PostgresStore::connect(&url).await.unwrap();
    fill(&store, "general", 1).await;

    postgres.kill();
    let started = Instant::now();
    let batch = [msg("alice", "lost")];
    let (append, ping, connect) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(
            store.append("general", &batch),
            store.ping(),
            PostgresStore::connect(&url)
        )
    })
    .await
    .expect("calls against a dead database must not hang");
    let elapsed = started.elapsed();
    assert!(
        matches!(append, Err(StoreError::Unavailable(_))),
        "append: expected Unavailable, got {append:?}"
    );
    assert!(
        matches!(ping, Err(StoreError::Unavailable(_))),
        "ping: expected Unavailable, got {ping:?}"
    );
    assert!(
        matches!(connect, Err(StoreError::Unavailable(_))),
        "connect: expected Unavailable, got {:?}",
        connect.map(|_| ())
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "took {elapsed:?} to report the database unavailable"
    );
}

async fn room_heads_reads_many_rooms_at_once(store: Arc<dyn Store>) {
    fill(store.as_ref(), "heads-a", 3).await;
    fill(store.as_ref(), "heads-b", 5).await;
    let asked = ["heads-a", "heads-b", "heads-never-written"].map(String::from);
    let mut heads = store.room_heads(&asked).await.unwrap();
    heads.sort();
    assert_eq!(
        heads,
        vec![("heads-a".to_string(), 3), ("heads-b".to_string(), 5)],
        "rooms never written to are left out"
    );
    assert!(store.room_heads(&[]).await.unwrap().is_empty());
}
