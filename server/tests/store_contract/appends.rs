//! Appending and reading back: seqs, bodies, rooms, concurrency within one store.

use std::collections::HashSet;
use std::sync::Arc;

use seqcast::store::{NewMessage, RoomInfo, SqliteStore, Store, StoredMessage};

use crate::{appended_seqs, fill, keyed, msg, now_ms, seqs};

contract!(
    empty_room,
    append_assigns_consecutive_seqs,
    empty_batch_stores_nothing,
    body_is_stored_byte_for_byte,
    rooms_are_isolated,
    concurrent_appends_have_no_holes,
    room_names_use_every_allowed_character,
    large_batch_commits_at_once,
    room_heads_reads_many_rooms_at_once,
);

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
pub async fn append_concurrently(
    stores: &[Arc<dyn Store>],
    room: &str,
    tasks: usize,
    per_task: usize,
) {
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
