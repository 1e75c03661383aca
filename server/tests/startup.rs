//! Start-up and the database (issue 12 item 4): a node started before Postgres listens, is live
//! and not ready, and serves once Postgres is there; `seqcast migrate` and `SEQCAST_MIGRATE=false`
//! (a node that waits for someone else to migrate); `SEQCAST_DB_POOL_SIZE`.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde_json::json;
use sqlx::Connection;

use support::check::{assert_ack, eventually};
use support::http::Http;
use support::postgres::{free_port, TestPostgres};
use support::server::{run_seqcast, ServerOptions, StoreKind, TestServer};
use support::ws::{Auth, WsClient};

const DEADLINE: Duration = Duration::from_secs(30);

/// A send on a new WebSocket connection is acknowledged and comes back as a message.
async fn send_round_trips(server: &TestServer, room: &str) {
    let mut client = WsClient::connect(server).await;
    client.join(room, None).await;
    let ack = client.send_msg(room, json!("hello")).await;
    assert_ack(&ack, room);
    let messages = client
        .collect_messages(room, 1, Duration::from_secs(10))
        .await;
    assert_eq!(messages[0]["body"], "hello");
}

/// `/ready` is 503 `starting` with a reason that starts with `prefix`.
/// Waits until `/ready` gives a reason starting with `prefix` (several attempts fail first).
async fn wait_for_reason(http: &Http, prefix: &str) {
    eventually(
        DEADLINE,
        &format!("/ready gives {prefix:?} as the reason"),
        || async {
            let body = http.get("/ready").await.json();
            body["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with(prefix))
        },
    )
    .await;
}

async fn assert_starting(http: &Http, prefix: &str) {
    let ready = http.get("/ready").await;
    assert_eq!(ready.status, 503, "{ready:?}");
    let body = ready.json();
    assert_eq!(body["status"], "starting", "{body}");
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(prefix),
        "reason {reason:?}, not {prefix:?}..."
    );
}

/// Started while nothing listens on its database's port, the node does not exit: it listens,
/// `/live` is 200, `/ready` 503 with the reason, the API and WebSocket upgrades 503; once
/// Postgres comes up on that port it connects, migrates and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_postgres_waits_for_it_then_serves() {
    let port = free_port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let mut server = TestServer::start(
        ServerOptions::new(StoreKind::Postgres)
            .database_url(url)
            .no_wait_started(),
    )
    .await;
    let http = Http::new(&server);
    // Several attempts have failed by now (the first retries come within a second).
    wait_for_reason(&http, "database unreachable: ").await;
    assert_eq!(http.get("/live").await.status, 200);
    assert_starting(&http, "database unreachable: ").await;
    http.post_json("/v1/rooms/r/messages", &json!({"body": 1}))
        .await
        .assert_error(503, "unavailable");
    http.get("/v1/rooms/r")
        .await
        .assert_error(503, "unavailable");
    match WsClient::try_connect(&server.ws_url(), Auth::None).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        Err(other) => panic!("the upgrade failed otherwise than with 503: {other}"),
        Ok(_) => panic!("a WebSocket upgrade was accepted before the database was open"),
    }
    assert_eq!(server.try_exit_status(), None, "the node exited");

    let _postgres = TestPostgres::start_with(Some(port), None);
    eventually(
        DEADLINE,
        "/ready answers 200 once Postgres is up",
        || async { http.get("/ready").await.status == 200 },
    )
    .await;
    send_round_trips(&server, "after-start").await;
}

/// SIGTERM to a node that is still waiting for its database ends it at once, with exit 0: a
/// rollout that gives up on it is not held for the retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_node_stops_on_sigterm() {
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    let mut server = TestServer::start(
        ServerOptions::new(StoreKind::Postgres)
            .database_url(url)
            .no_wait_started(),
    )
    .await;
    let http = Http::new(&server);
    assert_starting(&http, "").await;
    server.sigterm();
    let status = server.wait_exit(Duration::from_secs(5)).await;
    assert!(
        status.success(),
        "exited {status} after SIGTERM while starting"
    );
}

/// `seqcast migrate` applies every migration and exits 0; a node with `SEQCAST_MIGRATE=false`
/// then serves on that database.
/// A configuration that can never work stops the node at once, even while its database is
/// unreachable (it used to be found only once the database had opened, after the node had sat
/// "starting" meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_configuration_stops_the_node_before_it_waits_for_its_database() {
    let unreachable = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    for (name, value) in [
        ("SEQCAST_ALLOWED_ORIGINS", "not-an-origin"),
        ("SEQCAST_TRUSTED_PROXIES", "10.0.0.0/99"),
        ("SEQCAST_JWT_PUBLIC_KEY", "/nonexistent/key.pem"),
    ] {
        let (status, _, stderr) = run_seqcast(
            &["serve"],
            &[
                ("DATABASE_URL", unreachable.as_str()),
                ("SEQCAST_LISTEN", "127.0.0.1:0"),
                (name, value),
            ],
            Duration::from_secs(10),
        )
        .await;
        assert!(!status.success(), "{name}={value}: exited {status}");
        assert!(
            stderr.contains(name) || stderr.contains("key"),
            "{name}={value}: the error does not name the setting:\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seqcast_migrate_applies_the_migrations_and_exits() {
    let postgres = TestPostgres::shared();
    let url = postgres.fresh_database().await;
    let (status, stdout, stderr) =
        run_seqcast(&["migrate"], &[("DATABASE_URL", url.as_str())], DEADLINE).await;
    assert!(
        status.success(),
        "seqcast migrate: {status}\n{stdout}\n{stderr}"
    );
    assert_eq!(applied_migrations(&url).await, Some(known_migrations()));

    let server = TestServer::start(
        ServerOptions::new(StoreKind::Postgres)
            .database_url(url)
            .env("SEQCAST_MIGRATE", "false"),
    )
    .await;
    assert_eq!(Http::new(&server).get("/ready").await.status, 200);
    send_round_trips(&server, "migrated").await;
}

/// With `SEQCAST_MIGRATE=false` on an empty database the node touches nothing, stays not ready
/// ("schema not current") and retries; once `seqcast migrate` has run, it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_migrate_waits_for_the_schema() {
    let postgres = TestPostgres::shared();
    let url = postgres.fresh_database().await;
    let server = TestServer::start(
        ServerOptions::new(StoreKind::Postgres)
            .database_url(url.clone())
            .env("SEQCAST_MIGRATE", "false")
            .no_wait_started(),
    )
    .await;
    let http = Http::new(&server);
    wait_for_reason(&http, "schema not current").await;
    assert_starting(&http, "schema not current").await;
    assert_eq!(http.get("/live").await.status, 200);
    assert_eq!(
        applied_migrations(&url).await,
        None,
        "a node that does not migrate created the migrations table"
    );

    let (status, stdout, stderr) =
        run_seqcast(&["migrate"], &[("DATABASE_URL", url.as_str())], DEADLINE).await;
    assert!(
        status.success(),
        "seqcast migrate: {status}\n{stdout}\n{stderr}"
    );
    eventually(DEADLINE, "/ready answers 200 once migrated", || async {
        http.get("/ready").await.status == 200
    })
    .await;
    send_round_trips(&server, "waited").await;
}

/// `SEQCAST_DB_POOL_SIZE` bounds the node's pooled connections (its LISTEN connection comes on
/// top): 40 history reads at once (with the
/// server key, which no per-user read limit holds back) go through one connection. The pool
/// keeps its connections open once made, so counting them afterwards counts the most it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_size_bounds_the_connections() {
    let postgres = TestPostgres::shared();
    let url = postgres.fresh_database().await;
    let server = TestServer::start(
        ServerOptions::new(StoreKind::Postgres)
            .database_url(url.clone())
            .env("SEQCAST_DB_POOL_SIZE", "1"),
    )
    .await;
    let http = Http::new(&server);
    let reply = http
        .post_json("/v1/rooms/r/messages", &json!({"body": 1}))
        .await;
    assert_eq!(reply.status, 201, "{reply:?}");
    let reads = (0..40).map(|_| http.messages("r", "after=0"));
    for page in futures_util::future::join_all(reads).await {
        assert_eq!(page["messages"].as_array().map(Vec::len), Some(1), "{page}");
    }
    let database = url.rsplit('/').next().unwrap();
    let mut admin = sqlx::PgConnection::connect(&postgres.url("postgres"))
        .await
        .unwrap();
    // Besides the pool, the one connection that LISTENs for `seqcast_publish` (relay/listen.rs).
    let (open, listening): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE query NOT LIKE 'LISTEN%'), \
                count(*) FILTER (WHERE query LIKE 'LISTEN%') \
         FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'",
    )
    .bind(database)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(open, 1, "connections of a node with SEQCAST_DB_POOL_SIZE=1");
    assert_eq!(listening, 1, "and its LISTEN connection");

    let (status, _, stderr) = run_seqcast(
        &[],
        &[
            ("DATABASE_URL", url.as_str()),
            ("SEQCAST_DB_POOL_SIZE", "0"),
        ],
        DEADLINE,
    )
    .await;
    assert!(!status.success(), "SEQCAST_DB_POOL_SIZE=0 must be refused");
    assert!(stderr.contains("SEQCAST_DB_POOL_SIZE"), "{stderr}");
}

/// Versions in `_sqlx_migrations` (applied successfully), or `None` without that table.
async fn applied_migrations(url: &str) -> Option<Vec<i64>> {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    if !exists {
        return None;
    }
    let versions =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    Some(versions)
}

/// The versions of the files in `migrations/postgres/` (`0001_init.sql` is 1).
fn known_migrations() -> Vec<i64> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/postgres");
    let mut versions: Vec<i64> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            name.split('_').next()?.parse().ok()
        })
        .collect();
    versions.sort_unstable();
    versions
}
