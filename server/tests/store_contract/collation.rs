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
