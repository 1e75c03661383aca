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

/// A message the database refuses (Postgres text cannot hold NUL, in a key, a sender or a body)
/// fails alone: the writer retries a failed group in halves, down to the message at fault, so
/// every other room's and user's message of the same group commits, with gap-free seqs in
/// submission order.
#[tokio::test]
async fn postgres_refused_message_fails_alone() {
    use std::sync::Arc;

    use seqcast::hub::Hub;
    use seqcast::store::NewMessage;
    use seqcast::writer::{CommitError, Writers};

    let url = TestPostgres::shared().fresh_database().await;
    let store: Arc<dyn Store> = Arc::new(PostgresStore::connect(&url).await.unwrap());
    let writers = Writers::new(Arc::clone(&store), Hub::new(), None, 1);
    let bad = |sender: &str, body: &str, idem: Option<&str>| NewMessage {
        sender: sender.to_owned(),
        body: body.to_owned(),
        idem: idem.map(str::to_owned),
    };
    // (room, message, refused); on this single-threaded runtime every submit is queued before
    // the committer runs, so they all start out in one group.
    let mut sends: Vec<(&str, NewMessage, bool)> = Vec::new();
    for round in 0..3 {
        for room in ["a", "b", "c", "d"] {
            sends.push((
                room,
                msg(&format!("user-{room}"), &format!("{round}")),
                false,
            ));
            sends.push((
                room,
                crate::keyed("bob", &format!("k{round}"), &format!("{room}{round}")),
                false,
            ));
        }
        if round == 1 {
            sends.push(("a", bad("mallory", "1", Some("\u{0}")), true));
            sends.push(("b", bad("mal\u{0}lory", "1", None), true));
            sends.push(("c", bad("mallory", "\"\u{0}\"", None), true));
        }
    }
    let outcomes: Vec<_> = sends
        .iter()
        .map(|(room, m, _)| writers.submit(room, m.clone()))
        .collect();
    let mut committed: std::collections::HashMap<&str, Vec<String>> = Default::default();
    for ((room, m, refused), outcome) in sends.iter().zip(outcomes) {
        let outcome = outcome.await.unwrap();
        if *refused {
            assert_eq!(outcome.unwrap_err(), CommitError::Internal, "{m:?}");
        } else {
            let appended = outcome.unwrap_or_else(|e| panic!("{room} {m:?}: {e}"));
            let mine = committed.entry(room).or_default();
            mine.push(m.body.clone());
            assert_eq!(appended.message.seq, mine.len() as u64, "{room} {m:?}");
        }
    }
    for (room, bodies) in committed {
        let stored = store.read_after(room, 0, None, 100).await.unwrap();
        assert_eq!(
            seqs(&stored),
            (1..=bodies.len() as u64).collect::<Vec<_>>(),
            "{room}"
        );
        let stored: Vec<String> = stored.into_iter().map(|m| m.body).collect();
        assert_eq!(stored, bodies, "{room}: submission order");
    }
}

/// A paused database (SIGSTOP: connections open, nothing answered) turns every operation into
/// `Unavailable` by the store's deadline, not a hang; service is back soon after it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_paused_is_unavailable_within_the_deadline() {
    let postgres = TestPostgres::start();
    let url = postgres.fresh_database().await;
    let deadline = Duration::from_secs(2);
    let store = PostgresStore::connect_with_timeout(&url, deadline)
        .await
        .unwrap();
    fill(&store, "general", 1).await;

    // A commit caught mid-statement: another session holds the room's lock, so the append is
    // inside the database, waiting, when it freezes (a connection the pool would not test).
    use sqlx::Connection;
    let mut locker = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("SELECT head FROM rooms WHERE room = 'general' FOR UPDATE")
        .execute(&mut locker)
        .await
        .unwrap();
    let batch = [msg("alice", "lost")];
    let keyed = [crate::keyed("alice", "lost", "k")];
    let in_flight = store.append("general", &keyed);
    let waiting = async {
        let mut watcher = sqlx::PgConnection::connect(&url).await.unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
            )
            .fetch_one(&mut watcher)
            .await
            .unwrap();
            if n > 0 {
                break;
            }
            assert!(
                Instant::now() < until,
                "the append never waited on the lock"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        postgres.pause();
        Instant::now()
    };
    let (append_keyed, paused) = tokio::join!(in_flight, waiting);
    let in_flight_elapsed = paused.elapsed();
    let started = Instant::now();
    let (append, read, ping) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(
            store.append("general", &batch),
            store.read_after("general", 0, None, 10),
            store.ping()
        )
    })
    .await
    .expect("calls against a paused database must not hang");
    let elapsed = started.elapsed();
    eprintln!(
        "paused: the commit in flight answered {in_flight_elapsed:?} after the pause, \
         new calls in {elapsed:?}"
    );
    for (what, unavailable) in [
        ("append", matches!(append, Err(StoreError::Unavailable(_)))),
        (
            "keyed append",
            matches!(append_keyed, Err(StoreError::Unavailable(_))),
        ),
        ("read", matches!(read, Err(StoreError::Unavailable(_)))),
        ("ping", matches!(ping, Err(StoreError::Unavailable(_)))),
    ] {
        assert!(
            unavailable,
            "{what}: expected Unavailable, got {append:?} {append_keyed:?} {read:?} {ping:?}"
        );
    }
    for took in [in_flight_elapsed, elapsed] {
        assert!(
            took < deadline + Duration::from_secs(1),
            "took {took:?} with a deadline of {deadline:?}"
        );
    }

    postgres.resume();
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    let resumed = Instant::now();
    loop {
        match store.append("general", &batch).await {
            Ok(appended) => {
                assert_eq!(appended[0].message.seq, 2);
                break;
            }
            Err(StoreError::Unavailable(_)) if resumed.elapsed() < Duration::from_secs(10) => {}
            Err(e) => panic!("not back {:?} after resuming: {e}", resumed.elapsed()),
        }
    }
    eprintln!("resumed: committing again after {:?}", resumed.elapsed());
}
