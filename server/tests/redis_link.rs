//! One Redis link per node (issue 10, item 4): the bus, the per-user limit and the leader
//! election go by one state, which `/ready` (`bus_state`) and `seqcast_bus_up` show; a node
//! without Redis says "not configured" and has no `seqcast_bus_up` at all.
//!
//! Before, the bus and the limiter each kept their own idea of Redis's health: with Redis paused
//! the bus said down within a second while the limiter still believed Redis usable, so a new
//! user's first send waited the whole Redis timeout for a call that could not be answered.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::check::eventually;
use support::http::{metric_value, Http};
use support::postgres::TestPostgres;
use support::redis::TestRedis;
use support::server::{Claims, ServerOptions, StoreKind, TestServer};
use support::ws::{Auth, WsClient};

const SECRET: &str = "redis-link-secret";
const BUS_UP: &str = "seqcast_bus_up";
/// `SEQCAST_REDIS_TIMEOUT` of the node: long, so that a send that asks a paused Redis is plainly
/// slower than one decided on the node.
const REDIS_TIMEOUT: &str = "2s";
/// Well under the Redis timeout: a send answered this fast did not wait for Redis.
const NO_REDIS_WAIT: Duration = Duration::from_millis(1000);
const DEADLINE: Duration = Duration::from_secs(120);

async fn ready(http: &Http) -> Value {
    let reply = http.get("/ready").await;
    assert_eq!(reply.status, 200, "/ready: {}", reply.text);
    reply.json()
}

/// Waits until `/ready` shows `bus_state` = `state` and returns the gauge read right after.
async fn wait_bus_state(http: &Http, state: &str) -> Option<f64> {
    eventually(
        Duration::from_secs(20),
        &format!("bus_state {state}"),
        || {
            let http = http.clone();
            async move { ready(&http).await["bus_state"] == state }
        },
    )
    .await;
    metric_value(&http.get("/metrics").await.text, BUS_UP)
}

/// Sends `count` frames at once as `user`, then counts acks; returns them and how long the
/// first reply took.
async fn burst(node: &TestServer, user: &str, count: usize) -> (usize, Duration) {
    let token = Claims::new(user, &["*"]).sign(SECRET);
    let mut client = WsClient::connect_with(node, Auth::Header(&token)).await;
    let start = Instant::now();
    for _ in 0..count {
        let r = client.new_ref();
        let frame = json!({"type": "send", "room": "link", "body": {"n": 1}, "ref": r});
        client.send_json(frame).await;
    }
    let mut first = None;
    let mut acks = 0;
    for _ in 0..count {
        let frame = client.recv_json().await;
        first.get_or_insert_with(|| start.elapsed());
        match frame["type"].as_str() {
            Some("ack") => acks += 1,
            Some("error") if frame["code"] == "rate_limited" => {}
            _ => panic!("expected an ack or rate_limited, got {frame}"),
        }
    }
    (acks, first.unwrap())
}

/// Redis paused: `/ready`, the gauge, the user limit and the leader all turn together; resumed:
/// all back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_limiter_and_election_share_one_redis_state() {
    let scenario = async {
        let redis = TestRedis::start();
        let database = TestPostgres::shared().fresh_database().await;
        let options = ServerOptions::new(StoreKind::Postgres)
            .database_url(database)
            .node_id("n0")
            .jwt_secret(SECRET)
            .redis_url(redis.url())
            .env("SEQCAST_SEND_RATE", "0")
            .env("SEQCAST_USER_SEND_RATE", "10")
            .env("SEQCAST_REDIS_TIMEOUT", REDIS_TIMEOUT)
            .env("SEQCAST_LEADER_TTL", "3s")
            .capture_logs();
        let node = TestServer::start(options).await;
        let http = Http::new(&node);

        assert_eq!(wait_bus_state(&http, "up").await, Some(1.0));
        eventually(Duration::from_secs(20), "leader", || {
            let http = http.clone();
            async move { ready(&http).await["leader"] == true }
        })
        .await;
        // Redis was up all along: nothing to warn about (the election used to send its first
        // claim before the link had connected and warn of a failed command).
        let warnings: Vec<String> = node
            .logs()
            .into_iter()
            .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
            .collect();
        assert!(warnings.is_empty(), "warnings at start-up: {warnings:#?}");

        redis.pause();
        assert_eq!(wait_bus_state(&http, "down").await, Some(0.0));
        // The limiter goes by the same state: a new user is decided on the node at once (a
        // burst of its own, 4x the rate), without a call to the paused Redis.
        let (acks, first) = burst(&node, "ivy", 60).await;
        eprintln!("Redis paused: ivy got {acks} of 60, first reply after {first:?}");
        assert_eq!(acks, 40, "counted per node while the link is down");
        assert!(
            first < NO_REDIS_WAIT,
            "the first send waited {first:?} for Redis although the link was down"
        );
        // And the election: no lock renewal answers, the lease runs out.
        eventually(Duration::from_secs(20), "no leader while paused", || {
            let http = http.clone();
            async move { ready(&http).await["leader"] == false }
        })
        .await;
        assert_eq!(ready(&http).await["bus_state"], "down");

        redis.resume();
        assert_eq!(wait_bus_state(&http, "up").await, Some(1.0));
        let (acks, first) = burst(&node, "jay", 60).await;
        eprintln!("Redis back: jay got {acks} of 60, first reply after {first:?}");
        assert!(acks <= 44, "{acks}");
        assert_eq!(
            redis.command(&["EXISTS", "seqcast:rate:jay"]),
            "1",
            "counted in Redis again once the link is up"
        );
        assert_eq!(
            redis.command(&["EXISTS", "seqcast:rate:ivy"]),
            "0",
            "nothing was asked of Redis while it was down"
        );
        eventually(Duration::from_secs(20), "leader again", || {
            let http = http.clone();
            async move { ready(&http).await["leader"] == true }
        })
        .await;
    };
    tokio::time::timeout(DEADLINE, scenario).await.unwrap();
}

/// Without Redis there is nothing to be down: "not configured", and no gauge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_link_is_not_configured() {
    let scenario = async {
        let sqlite = TestServer::start(ServerOptions::new(StoreKind::Sqlite)).await;
        let database = TestPostgres::shared().fresh_database().await;
        let postgres =
            TestServer::start(ServerOptions::new(StoreKind::Postgres).database_url(database)).await;
        for (node, bus) in [(&sqlite, "local"), (&postgres, "none")] {
            let http = Http::new(node);
            let body = ready(&http).await;
            assert_eq!(body["bus"], bus, "{body}");
            assert_eq!(body["bus_state"], "not configured", "{body}");
            let metrics = http.get("/metrics").await.text;
            assert_eq!(
                metric_value(&metrics, BUS_UP),
                None,
                "{BUS_UP} on a node without Redis"
            );
        }
    };
    tokio::time::timeout(DEADLINE, scenario).await.unwrap();
}
