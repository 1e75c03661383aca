//! Postgres failures: a statement the database refuses, a database that goes away.

use std::time::{Duration, Instant};

use seqcast::store::{PostgresStore, RoomInfo, Store, StoreError};

use crate::support::postgres::TestPostgres;
use crate::{fill, msg, seqs};

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

/// right after the last committed seq.
/// Several rooms in one call: each gets what `append` would have given it (consecutive seqs

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
