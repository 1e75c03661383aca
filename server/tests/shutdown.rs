//! SIGTERM on the real process (`protocol.md`, "Starting it" and close code 1012): joined clients
//! are drained with 1012, `/ready` turns 503, the process exits 0 within
//! `SEQCAST_SHUTDOWN_TIMEOUT`, and what was acknowledged is still there after a restart.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;

use support::http::{metric_value, Http};
use support::server::{ServerOptions, StoreKind, TestServer};
use support::ws::{WsClient, RECV_DEADLINE};

store_tests!(
    sigterm_drains_clients_with_1012_and_exits_0,
    sigterm_exits_within_the_timeout_despite_an_unresponsive_client,
    sigterm_on_an_idle_server_exits_0,
);

const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// The drain's delay and spread in `sigterm_serves_through_the_delay_then_spreads_the_closes`.
const DRAIN_STEP: Duration = Duration::from_secs(1);
/// Time for the process to notice the signal and exit, beyond its own timeout.
const SLACK: Duration = Duration::from_secs(3);

async fn sigterm_drains_clients_with_1012_and_exits_0(store: StoreKind) {
    let mut server = TestServer::start(ServerOptions::new(store).shutdown_timeout("5s")).await;
    let mut general = WsClient::connect(&server).await;
    let mut replaying = WsClient::connect(&server).await;
    let mut other = WsClient::connect(&server).await;
    let mut unjoined = WsClient::connect(&server).await;
    general.join("general", None).await;
    let mut acked = 0;
    for i in 0..20 {
        general.send_msg("general", json!({ "i": i })).await;
        acked += 1;
    }
    general
        .collect_messages("general", acked, RECV_DEADLINE)
        .await;
    replaying.join("general", Some(0)).await;
    replaying
        .collect_messages("general", acked, RECV_DEADLINE)
        .await;
    other.join("other", None).await;
    unjoined.ping().await;

    let signalled = Instant::now();
    server.sigterm();
    for (name, client) in [
        ("general", &mut general),
        ("replaying", &mut replaying),
        ("other", &mut other),
        ("unjoined", &mut unjoined),
    ] {
        let code = client.expect_close(SHUTDOWN_TIMEOUT + SLACK).await;
        assert_eq!(code, Some(1012), "{name}: drain close code");
    }

    // Draining has begun: /ready must not say ready any more, if the listener still answers.
    match Http::new(&server).try_get("/ready").await {
        Ok(reply) => {
            assert_eq!(reply.status, 503, "/ready while draining: {reply:?}");
            assert!(
                reply.json().is_object(),
                "/ready gives a JSON reason: {reply:?}"
            );
        }
        Err(e) => eprintln!("/ready not observable during drain (listener closed): {e}"),
    }

    let status = server.wait_exit(SHUTDOWN_TIMEOUT + SLACK).await;
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(
        signalled.elapsed() < SHUTDOWN_TIMEOUT + SLACK,
        "exited {:?} after SIGTERM",
        signalled.elapsed()
    );

    // Everything acknowledged before the signal survives a restart.
    let restarted =
        TestServer::start(ServerOptions::new(store).database_url(server.database_url.clone()))
            .await;
    let room = Http::new(&restarted).room("general").await;
    assert_eq!(room["head"], acked as u64, "{room}");
}

async fn sigterm_exits_within_the_timeout_despite_an_unresponsive_client(store: StoreKind) {
    let mut server = TestServer::start(ServerOptions::new(store).shutdown_timeout("2s")).await;
    // This client joins, then is never polled again: it answers no close handshake.
    let mut unresponsive = WsClient::connect(&server).await;
    unresponsive.join("general", None).await;
    let mut polite = WsClient::connect(&server).await;
    polite.join("general", None).await;

    let signalled = Instant::now();
    server.sigterm();
    polite
        .expect_close_code(1012, Duration::from_secs(2) + SLACK)
        .await;
    let status = server.wait_exit(Duration::from_secs(2) + SLACK).await;
    eprintln!(
        "exited with {status} {:?} after SIGTERM",
        signalled.elapsed()
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(2) + SLACK,
        "SEQCAST_SHUTDOWN_TIMEOUT=2s, exited after {:?}",
        signalled.elapsed()
    );
    // The unresponsive client was sent its 1012 too.
    let code = unresponsive.expect_close(RECV_DEADLINE).await;
    assert_eq!(code, Some(1012));
}

async fn sigterm_on_an_idle_server_exits_0(store: StoreKind) {
    let mut server = TestServer::start(ServerOptions::new(store)).await;
    assert_eq!(Http::new(&server).get("/ready").await.status, 200);
    server.sigterm();
    let status = server.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

/// A load balancer polling `/ready` must see the 503 while the node still serves, and the node's
/// clients must not all reconnect elsewhere at once (issue 12): after SIGTERM, `/ready` is 503 at
/// once, sessions keep sending and receiving for `SEQCAST_DRAIN_DELAY`, then their 1012s are
/// spread over `SEQCAST_DRAIN_SPREAD`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_serves_through_the_delay_then_spreads_the_closes() {
    let step = format!("{}ms", DRAIN_STEP.as_millis());
    let mut server = TestServer::start(
        ServerOptions::new(StoreKind::Sqlite)
            .shutdown_timeout("10s")
            .env("SEQCAST_DRAIN_DELAY", step.clone())
            .env("SEQCAST_DRAIN_SPREAD", step),
    )
    .await;
    let mut sender = WsClient::connect(&server).await;
    sender.join("general", None).await;
    let mut listeners = Vec::new();
    for _ in 0..20 {
        let mut client = WsClient::connect(&server).await;
        client.join("general", None).await;
        listeners.push(client);
    }

    let http = Http::new(&server);
    let draining = |metrics: String| metric_value(&metrics, "seqcast_draining");
    assert_eq!(draining(http.metrics().await), Some(0.0), "before SIGTERM");
    let signalled = Instant::now();
    server.sigterm();
    let deadline = signalled + DRAIN_STEP / 2;
    loop {
        let status = http.try_get("/ready").await.map(|r| r.status);
        if status.as_ref().is_ok_and(|s| *s == 503) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/ready still {status:?} {:?} after SIGTERM",
            signalled.elapsed()
        );
    }
    // Operators see it in the metrics too.
    assert_eq!(
        draining(http.metrics().await),
        Some(1.0),
        "during the drain"
    );
    // Still served: a send is acknowledged and delivered to everyone before any close.
    sender
        .send_msg("general", json!({ "during": "drain delay" }))
        .await;
    let acked_after = signalled.elapsed();
    assert!(
        acked_after < DRAIN_STEP,
        "acked {acked_after:?} after SIGTERM"
    );

    let waits: Vec<_> = listeners
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                client.collect_messages("general", 1, RECV_DEADLINE).await;
                let code = client.expect_close(2 * DRAIN_STEP + SLACK).await;
                (code, signalled.elapsed())
            })
        })
        .collect();
    let mut closed_at = Vec::new();
    for wait in waits {
        let (code, at) = wait.await.unwrap();
        assert_eq!(code, Some(1012));
        closed_at.push(at);
    }
    closed_at.sort();
    let (first, last) = (closed_at[0], closed_at[closed_at.len() - 1]);
    eprintln!("closes from {first:?} to {last:?} after SIGTERM");
    assert!(
        first >= DRAIN_STEP * 9 / 10,
        "the first 1012 came {first:?} after SIGTERM, before the delay ended"
    );
    assert!(
        last - first >= DRAIN_STEP / 2,
        "21 closes spread over a {DRAIN_STEP:?} window came within {:?}",
        last - first
    );
    sender.expect_close_code(1012, SLACK).await;
    let status = server.wait_exit(SHUTDOWN_TIMEOUT + SLACK).await;
    assert!(status.success(), "exit status after SIGTERM: {status}");
}
