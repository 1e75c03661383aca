//! The per-user rate limit right after start (issue 10, item 3): a node that answers `/ready`
//! enforces the cluster-wide limit. Three Postgres nodes on one Redis, one user, a burst of 100
//! sends on each node as soon as that node answers `/ready`: the cluster-wide number of acks
//! stays within one burst plus the rate over the elapsed time (+10%).
//!
//! Before the fix each node's limiter counted alone until its own Redis probe answered (up to
//! 0.5 s after start), so each node granted a whole burst of its own: 80-120 acks for a limit of
//! about 50.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::http::Http;
use support::postgres::TestPostgres;
use support::redis::TestRedis;
use support::server::{Claims, ServerOptions, StoreKind, TestServer};
use support::ws::{Auth, WsClient};

const SECRET: &str = "ratelimit-startup-secret";
const NODES: usize = 3;
/// `SEQCAST_USER_SEND_RATE` of the test; the burst is 4x.
const RATE: f64 = 10.0;
const BURST: f64 = 4.0 * RATE;
const SENDS_PER_NODE: usize = 100;
const DEADLINE: Duration = Duration::from_secs(120);
/// How long a node may take to answer `/ready` after it listens.
const READY_DEADLINE: Duration = Duration::from_secs(20);

/// Polls `/ready` until it answers 200.
async fn wait_ready(node: &TestServer) {
    let http = Http::new(node);
    let deadline = Instant::now() + READY_DEADLINE;
    loop {
        if http.get("/ready").await.status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} not ready within {READY_DEADLINE:?}",
            node.addr
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Sends `SENDS_PER_NODE` frames at once, then counts the acks among the replies (anything but
/// an ack or `rate_limited` fails the test). Returns the acks and when the last reply came.
async fn burst(mut client: WsClient) -> (usize, Instant) {
    let mut refs = std::collections::HashSet::new();
    for _ in 0..SENDS_PER_NODE {
        let r = client.new_ref();
        refs.insert(r.to_string());
        let frame = json!({"type": "send", "room": "startup", "body": {"n": 1}, "ref": r});
        client.send_json(frame).await;
    }
    let mut acks = 0;
    while !refs.is_empty() {
        let frame: Value = client.recv_json().await;
        assert!(refs.remove(&frame["ref"].to_string()), "unexpected {frame}");
        match frame["type"].as_str() {
            Some("ack") => acks += 1,
            Some("error") if frame["code"] == "rate_limited" => {}
            _ => panic!("expected an ack or rate_limited, got {frame}"),
        }
    }
    (acks, Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_right_after_ready_gets_the_cluster_wide_limit() {
    let scenario = async {
        let redis = TestRedis::start();
        let database = TestPostgres::shared().fresh_database().await;
        let token = Claims::new("grace", &["*"]).sign(SECRET);
        let mut nodes = Vec::new();
        let mut bursts = Vec::new();
        let mut first_send = None;
        // One after another (the first applies the migrations), each burst as soon as its node
        // is ready, while the next node starts.
        for index in 0..NODES {
            let options = ServerOptions::new(StoreKind::Postgres)
                .database_url(database.clone())
                .node_id(format!("n{index}"))
                .jwt_secret(SECRET)
                .redis_url(redis.url())
                .env("SEQCAST_SEND_RATE", "0")
                .env("SEQCAST_USER_SEND_RATE", "10");
            let node = TestServer::start(options).await;
            wait_ready(&node).await;
            let client = WsClient::connect_with(&node, Auth::Header(&token)).await;
            first_send.get_or_insert_with(Instant::now);
            bursts.push(tokio::spawn(burst(client)));
            nodes.push(node);
        }
        let first_send = first_send.unwrap();
        let mut total = 0;
        let mut last_reply = first_send;
        let mut per_node = Vec::new();
        for burst in bursts {
            let (acks, at) = burst.await.unwrap();
            per_node.push(acks);
            total += acks;
            last_reply = last_reply.max(at);
        }
        let elapsed = last_reply.duration_since(first_send).as_secs_f64();
        let allowed = (BURST + RATE * elapsed) * 1.1;
        eprintln!(
            "burst right after /ready on {NODES} nodes: acks per node {per_node:?}, total \
             {total} in {elapsed:.3} s (allowed {allowed:.1})"
        );
        assert!(
            total as f64 <= allowed,
            "the cluster granted {total} sends in {elapsed:.3} s: more than one burst ({BURST}) \
             plus {RATE}/s (+10%) = {allowed:.1}; per node {per_node:?}"
        );
        // The limit is not a refusal of everything either.
        assert!(total as f64 >= BURST * 0.9, "only {total} acks");
    };
    tokio::time::timeout(DEADLINE, scenario)
        .await
        .expect("the scenario ends within its deadline");
}
