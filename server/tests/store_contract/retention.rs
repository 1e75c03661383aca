//! Retention: `delete_before` deletes old prefixes of rooms and never touches a head.

use std::sync::Arc;
use std::time::{Duration, Instant};

use seqcast::store::{RoomInfo, Store, StoredMessage};

use crate::{appended_seqs, fill, keyed, now_ms, postgres_backend, seqs, sqlite_backend, Backend};

contract!(
    delete_before_deletes_old_messages_only,
    delete_before_is_bounded_by_limit,
    delete_before_everything_keeps_the_head,
    idem_expires_with_its_message,
);

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
