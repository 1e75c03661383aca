//! TLS to Postgres and Redis (issue 12 item 4), as a managed database and Redis with a private
//! CA need: `DATABASE_URL` with `sslmode=verify-full&sslrootcert=...`, `REDIS_URL=rediss://...`
//! with `SEQCAST_REDIS_CA_FILE`. The certificates are made for the test by `openssl`; Postgres
//! runs with `ssl=on` and Redis with a TLS port only.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::Connection;

use support::check::{assert_ack, eventually};
use support::http::Http;
use support::postgres::TestPostgres;
use support::redis::TestRedis;
use support::server::{ServerOptions, StoreKind, TestServer};
use support::tls::TestCa;
use support::ws::WsClient;

const DEADLINE: Duration = Duration::from_secs(30);

/// `url` (a `postgres://` URL without a query) verifying the server against `ca`.
fn verify_full(url: &str, ca: &std::path::Path) -> String {
    format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display())
}

async fn ready_body(http: &Http) -> Value {
    http.get("/ready").await.json()
}

/// Both links over TLS, verified against the test's CA: the node is ready with the bus up, a
/// message round-trips, and Postgres counts the node's connections as encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_over_tls_to_postgres_and_redis() {
    let ca = TestCa::new("seqcast test CA");
    let cert = ca.issue_server();
    let postgres = TestPostgres::start_with(None, Some(&cert));
    let redis = TestRedis::start_tls(&cert, &ca.cert);
    let plain_url = postgres.fresh_database().await;
    let server = TestServer::start(
        ServerOptions::new(StoreKind::Postgres)
            .database_url(verify_full(&plain_url, &ca.cert))
            .redis_url(redis.url())
            .env("SEQCAST_REDIS_CA_FILE", ca.cert.display().to_string()),
    )
    .await;
    let http = Http::new(&server);
    eventually(DEADLINE, "/ready 200 with the bus up", || async {
        let reply = http.get("/ready").await;
        reply.status == 200 && reply.json()["bus_state"] == "up"
    })
    .await;

    let mut client = WsClient::connect(&server).await;
    client.join("tls", None).await;
    assert_ack(&client.send_msg("tls", json!("sealed")).await, "tls");
    let messages = client
        .collect_messages("tls", 1, Duration::from_secs(10))
        .await;
    assert_eq!(messages[0]["body"], "sealed");

    let database = plain_url.rsplit('/').next().unwrap();
    let mut admin = sqlx::PgConnection::connect(&postgres.url("postgres"))
        .await
        .unwrap();
    let (all, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
         JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1",
    )
    .bind(database)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(all > 0, "the node holds no connection to its database");
    assert_eq!(encrypted, all, "connections of the node not encrypted");
}

/// A Postgres whose certificate is not signed by the CA the node trusts: the node never opens
/// its store, and `/ready` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_with_an_untrusted_certificate_is_not_used() {
    let ca = TestCa::new("seqcast test CA");
    let other = TestCa::new("some other CA");
    let postgres = TestPostgres::start_with(None, Some(&ca.issue_server()));
    let url = postgres.fresh_database().await;
    let server = TestServer::start(
        ServerOptions::new(StoreKind::Postgres)
            .database_url(verify_full(&url, &other.cert))
            .no_wait_started(),
    )
    .await;
    let http = Http::new(&server);
    eventually(DEADLINE, "/ready says the certificate failed", || async {
        let body = ready_body(&http).await;
        body["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("database unreachable: ") && r.contains("certificate"))
    })
    .await;
    let ready = http.get("/ready").await;
    assert_eq!(ready.status, 503, "{ready:?}");
    assert_eq!(ready.json()["status"], "starting");
}

/// A Redis whose certificate is not signed by `SEQCAST_REDIS_CA_FILE`'s CA: the node serves
/// (Redis is not needed for that) and reports the bus down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_with_an_untrusted_certificate_is_down() {
    let ca = TestCa::new("seqcast test CA");
    let other = TestCa::new("some other CA");
    let redis = TestRedis::start_tls(&ca.issue_server(), &ca.cert);
    let server = TestServer::start(
        ServerOptions::new(StoreKind::Postgres)
            .redis_url(redis.url())
            .env("SEQCAST_REDIS_CA_FILE", other.cert.display().to_string()),
    )
    .await;
    let http = Http::new(&server);
    eventually(DEADLINE, "the first Redis probe has decided", || async {
        ready_body(&http).await["bus_state"] != "connecting"
    })
    .await;
    let ready = http.get("/ready").await;
    assert_eq!(ready.status, 200, "{ready:?}");
    assert_eq!(ready.json()["bus_state"], "down", "{ready:?}");
}
