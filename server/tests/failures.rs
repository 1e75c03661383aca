//! Defined outcomes when the database fails, and retention's effect on joins (`truncated`).

mod support;

use std::time::Duration;

use serde_json::json;
use support::check::eventually;
use support::http::Http;
use support::postgres::TestPostgres;
use support::server::{ServerOptions, StoreKind, TestServer};
use support::ws::WsClient;

const DEADLINE: Duration = Duration::from_secs(20);

/// With the database gone, nothing is acknowledged: sends get `unavailable` (503 over HTTP),
/// joins too, `/ready` turns 503 while `/live` stays 200, and the connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_is_unavailable_not_acknowledged() {
    let mut pg = TestPostgres::start();
    let url = pg.fresh_database().await;
    let server = TestServer::start(ServerOptions::new(StoreKind::Postgres).database_url(url)).await;
    let http = Http::new(&server);
    let mut client = WsClient::connect(&server).await;
    client.join("r", None).await;
    let ack = client.send_msg("r", json!("before")).await;
    assert_eq!(ack["seq"], 1, "{ack}");

    pg.kill();

    let error = client
        .expect_error(
            json!({"type":"send","room":"r","body":"after"}),
            "unavailable",
        )
        .await;
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{error}"
    );
    client
        .expect_error(json!({"type":"join","room":"other"}), "unavailable")
        .await;
    let reply = http
        .post_json("/v1/rooms/r/messages", &json!({"body":"after"}))
        .await;
    reply.assert_error(503, "unavailable");
    eventually(DEADLINE, "/ready answers 503", || async {
        http.get("/ready").await.status == 503
    })
    .await;
    assert_eq!(http.get("/live").await.status, 200);
    // Still connected: the session answers.
    client.ping().await;
}

/// Retention deletes old messages but keeps the room's head: a join with `since` below what is
/// left is answered with `truncated: true` and replays only what is stored, then live messages
/// continue the same sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_below_retention_are_truncated() {
    let server = TestServer::start(
        ServerOptions::new(StoreKind::Sqlite)
            .env("SEQCAST_RETENTION", "500ms")
            .env("SEQCAST_JOB_INTERVAL", "100ms"),
    )
    .await;
    let http = Http::new(&server);
    for i in 0..5 {
        let reply = http
            .post_json("/v1/rooms/old/messages", &json!({"body": i}))
            .await;
        assert_eq!(reply.status, 201, "{:?}", reply.json());
    }
    eventually(DEADLINE, "retention deleted the old messages", || async {
        http.get("/v1/rooms/old").await.json()["first"] == 6
    })
    .await;
    assert_eq!(
        http.get("/v1/rooms/old").await.json()["head"],
        5,
        "the head is kept"
    );
    let page = http.get("/v1/rooms/old/messages?after=0").await.json();
    assert_eq!(page["messages"], json!([]), "{page}");
    assert_eq!(page["head"], 5);

    let mut client = WsClient::connect(&server).await;
    let joined = client.join("old", Some(2)).await;
    assert_eq!(
        (
            joined["head"].clone(),
            joined["first"].clone(),
            joined["truncated"].clone()
        ),
        (json!(5), json!(6), json!(true)),
        "{joined}"
    );
    // Nothing is replayed, and the next message continues the sequence.
    let reply = http
        .post_json("/v1/rooms/old/messages", &json!({"body": "new"}))
        .await;
    assert_eq!(reply.json()["seq"], 6);
    let seqs = client.collect_seqs("old", 1, DEADLINE).await;
    assert_eq!(seqs, vec![6]);

    // A join at the head is not truncated: nothing it asked for is missing.
    let mut other = WsClient::connect(&server).await;
    let joined = other.join("old", Some(6)).await;
    assert!(joined.get("truncated").is_none(), "{joined}");
}
