//! Lock order under a collation that is not byte order: every path of `append_rooms` must lock
//! rooms in the same order, or two nodes committing overlapping groups deadlock.

use std::sync::Arc;

use seqcast::store::{NewMessage, PostgresStore, RoomInfo, Store};

use crate::support::postgres::TestPostgres;
use crate::{keyed, msg};

/// Pairs of rooms whose byte order ("C") differs from, or is close to, their ICU en-US order.
const ROOMS: [&str; 4] = ["Lobby", "general", "team-1", "team1"];

/// Two nodes on an ICU database, one committing groups with idempotency keys (a transaction,
/// room by room), the other groups without (one statement), over the same rooms at once. Both
/// must lock the rooms in the same order, whatever the collation: no `deadlock detected`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_icu_keyed_and_unkeyed_groups_do_not_deadlock() {
    let url = TestPostgres::shared().fresh_icu_database().await;
    let keyed_node: Arc<dyn Store> = Arc::new(PostgresStore::connect(&url).await.unwrap());
    let plain_node: Arc<dyn Store> = Arc::new(PostgresStore::connect(&url).await.unwrap());
    // The writer hands groups over in byte order, as Rust sorts `str`.
    let mut rooms = ROOMS.to_vec();
    rooms.sort_unstable();
    const ROUNDS: usize = 300;
    let run = |store: Arc<dyn Store>, with_keys: bool| {
        let rooms = rooms.clone();
        tokio::spawn(async move {
            for round in 0..ROUNDS {
                let batches: Vec<Vec<NewMessage>> = rooms
                    .iter()
                    .map(|_| {
                        if with_keys {
                            vec![keyed("k", "1", &round.to_string())]
                        } else {
                            vec![msg("p", "1")]
                        }
                    })
                    .collect();
                let group: Vec<(&str, &[NewMessage])> = rooms
                    .iter()
                    .zip(&batches)
                    .map(|(room, b)| (*room, b.as_slice()))
                    .collect();
                if let Err(err) = store.append_rooms(&group).await {
                    panic!("round {round} (keys: {with_keys}): {err}");
                }
            }
        })
    };
    let a = run(keyed_node, true);
    let b = run(Arc::clone(&plain_node), false);
    a.await.unwrap();
    b.await.unwrap();
    let n = (2 * ROUNDS) as u64;
    for room in ROOMS {
        assert_eq!(
            plain_node.room_info(room).await.unwrap(),
            RoomInfo { head: n, first: 1 }
        );
    }
}

/// Room names, senders and idempotency keys are identifiers: on a database whose collation is
/// linguistic (ICU here, as most deployments), their columns still compare by bytes, so no
/// index comparison goes through the collation library (migration 0002; about a fifth of
/// Postgres's CPU per insert under ICU, measured in docs/operations.md's note on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_icu_identifier_columns_compare_by_bytes() {
    use sqlx::Connection;
    let url = TestPostgres::shared().fresh_icu_database().await;
    // Connecting applies the migrations.
    let _store = PostgresStore::connect(&url).await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let columns: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, collation_name::text \
         FROM information_schema.columns \
         WHERE table_schema = 'public' AND data_type = 'text' \
           AND table_name IN ('rooms', 'messages') AND column_name IN ('room', 'sender', 'idem') \
         ORDER BY 1, 2",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let expected = [
        ("messages", "idem"),
        ("messages", "room"),
        ("messages", "sender"),
        ("rooms", "room"),
    ];
    let got: Vec<(&str, &str)> = columns
        .iter()
        .map(|(t, c, _)| (t.as_str(), c.as_str()))
        .collect();
    assert_eq!(got, expected);
    for (table, column, collation) in &columns {
        assert_eq!(
            collation.as_deref(),
            Some("C"),
            "{table}.{column} must compare by bytes"
        );
    }
}
