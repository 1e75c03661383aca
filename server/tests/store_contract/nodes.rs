//! Several nodes (stores, pools) on one Postgres database.

use std::sync::Arc;

use seqcast::store::{PostgresStore, Store};

use crate::appends::append_concurrently;
use crate::fill;
use crate::support::postgres::TestPostgres;

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
