//! Signals (protocol v1.1): ephemeral frames relayed to a room's other joined sessions, on every
//! node, never stored, never replayed, at most once.
//!
//! - `signals_across_nodes`: two nodes sharing Postgres and Redis. A signal reaches sessions on
//!   both nodes but not its sender, carries no `seq`, is not replayed by a `join` with `since`
//!   nor listed in the history; a read-only token is refused (`forbidden`), a body over
//!   `SEQCAST_MAX_SIGNAL_BYTES` too (`too_large`), a lone surrogate too (`bad_request`). Then it
//!   measures cross-node delivery (one signal in flight at a time) and prints FIGURE lines.
//! - `signals_are_rate_limited_and_local_without_a_bus`: one SQLite node (no bus): signals still
//!   reach the node's own sessions, and count against `SEQCAST_SEND_RATE`.
//!
//! Negative checks wait for a later marker frame, never for a pause.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::cluster::{wait_until, Cluster, DelayStats};
use support::http::Http;
use support::redis::TestRedis;
use support::scenario::{figure, scenario};
use support::server::{Claims, ServerOptions, StoreKind, TestServer};
use support::ws::{Auth, WsClient};

const SECRET: &str = "signals-test-secret";
/// Signals timed for the figures.
const TIMED_SIGNALS: usize = 500;

async fn connect(url: &str, claims: Claims) -> WsClient {
    let token = claims.sign(SECRET);
    WsClient::try_connect(url, Auth::Query(&token))
        .await
        .unwrap()
}

/// Waits until every node of the cluster has subscribed to `channel` (a room's or a user's):
/// a subscription takes effect asynchronously after the join, and an ephemeral frame sent
/// before it is (by contract) lost.
pub async fn subscribed_on_all(redis: &TestRedis, channel: &str, nodes: usize) {
    wait_until(
        Duration::from_secs(10),
        &format!("{channel} subscribed by {nodes} nodes"),
        || async move {
            let reply = redis.command(&["PUBSUB", "NUMSUB", channel]);
            let count = reply.lines().last().and_then(|n| n.parse::<usize>().ok());
            count == Some(nodes)
        },
    )
    .await;
}

/// Reads frames until a `signal` whose body is `marker`, and returns the frames before it.
async fn until_signal(ws: &mut WsClient, marker: &Value) -> Vec<Value> {
    let mut before = Vec::new();
    loop {
        let frame = ws.recv_json().await;
        if frame["type"] == "signal" && frame["body"] == *marker {
            return before;
        }
        before.push(frame);
    }
}

fn signal(room: &str, body: Value) -> Value {
    json!({"type": "signal", "room": room, "body": body})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_across_nodes() {
    scenario("signals_across_nodes", async {
        let env = [
            ("SEQCAST_JWT_SECRET", SECRET),
            // The timed run sends 500 signals from one user in a few seconds.
            ("SEQCAST_USER_SEND_RATE", "0"),
        ];
        let cluster = Cluster::start(2, Some(TestRedis::start()), &env).await;
        let (n0, n1) = (cluster.node(0).ws_url(), cluster.node(1).ws_url());
        let mut alice = connect(&n0, Claims::new("alice", &["r"])).await;
        let mut neighbour = connect(&n0, Claims::new("nina", &["r"])).await;
        let mut bob = connect(&n1, Claims::new("bob", &["r"])).await;
        let mut reader = connect(&n1, Claims::new("rita", &[]).read(&["r"])).await;
        for ws in [&mut alice, &mut neighbour, &mut bob, &mut reader] {
            let joined = ws.join("r", None).await;
            assert_eq!(
                joined["read"], 0,
                "joined carries the read cursor: {joined}"
            );
        }
        subscribed_on_all(cluster.redis(), "seqcast:room:r", 2).await;

        // One message first, to see that a signal is not one (and is not replayed).
        alice.send_msg("r", json!("hello")).await;
        let typing = json!({"typing": true});
        let reference = alice.new_ref();
        let mut frame = signal("r", typing.clone());
        frame["ref"] = reference.clone();
        alice.send_json(frame).await;
        for ws in [&mut bob, &mut neighbour, &mut reader] {
            let before = until_signal(ws, &typing).await;
            assert!(
                before.iter().all(|f| f["type"] == "message"),
                "only the message before the signal: {before:?}"
            );
        }
        // The exact frame: from, room, body; no seq, no id, no ref.
        let marker = json!({"from": "bob"});
        bob.send_json(signal("r", marker.clone())).await;
        let before = until_signal(&mut alice, &marker).await;
        assert!(
            before.iter().all(|f| f["type"] == "message"),
            "the sender does not receive its own signal, nor a reply: {before:?}"
        );
        let mut frames = until_signal(&mut neighbour, &marker).await;
        frames.retain(|f| f["type"] == "signal");
        assert!(frames.is_empty(), "one signal each: {frames:?}");
        neighbour
            .send_json(signal("r", json!({"shape": "exact"})))
            .await;
        let got = bob.recv_json().await;
        assert_eq!(
            got,
            json!({"type": "signal", "room": "r", "from": "nina", "body": {"shape": "exact"}})
        );
        // Past the copies of the signals so far.
        until_signal(&mut reader, &json!({"shape": "exact"})).await;
        until_signal(&mut alice, &json!({"shape": "exact"})).await;

        // Refusals, each answered under its ref; the connection stays open.
        reader
            .expect_error(signal("r", json!(1)), "forbidden")
            .await;
        let big = "x".repeat(4096);
        bob.expect_error(signal("r", json!(big)), "too_large").await;
        let just_fits = "x".repeat(4094);
        bob.send_json(signal("r", json!(just_fits))).await;
        let got = alice.recv_json().await;
        assert_eq!(got["body"].as_str().map(str::len), Some(4094));
        // A lone surrogate escape, as raw text (a JSON library would not write one).
        let reference = bob.new_ref();
        bob.send_text(&format!(
            r#"{{"type":"signal","room":"r","body":"\udc00","ref":{reference}}}"#
        ))
        .await;
        let reply = bob.reply_to(&reference).await;
        assert_eq!(reply["code"], "bad_request", "{reply}");
        bob.expect_error(json!({"type": "signal", "room": "r"}), "bad_request")
            .await;
        // Rita's refused signal reached nobody: the next one alice sees is bob's marker.
        let marker = json!({"after": "refusals"});
        bob.send_json(signal("r", marker.clone())).await;
        let before = until_signal(&mut alice, &marker).await;
        assert!(before.is_empty(), "refused signals went out: {before:?}");

        // Never stored, never replayed.
        let mut late = connect(&n1, Claims::new("lena", &["r"])).await;
        let joined = late.join("r", Some(0)).await;
        assert_eq!(joined["head"], 1);
        let replayed = late.frames_until_pong().await;
        assert_eq!(replayed.len(), 1, "the message only: {replayed:?}");
        assert_eq!(replayed[0]["type"], "message");
        let history = Http::new(cluster.node(0))
            .bearer(support::cluster::API_KEY)
            .messages("r", "after=0")
            .await;
        assert_eq!(history["messages"].as_array().map(Vec::len), Some(1));

        // Timed: one signal in flight at a time, n0 to n1.
        let mut delays = Vec::with_capacity(TIMED_SIGNALS);
        for n in 0..TIMED_SIGNALS {
            let body = json!({"n": n});
            let sent = Instant::now();
            alice.send_json(signal("r", body.clone())).await;
            until_signal(&mut bob, &body).await;
            delays.push(sent.elapsed());
        }
        let stats = DelayStats::of(delays);
        figure(
            "signal delivery n0 -> n1 (one in flight, 500 signals)",
            stats,
        );
        figure(
            "signal delivery p50",
            format!("{:.2}ms", stats.p50.as_secs_f64() * 1e3),
        );
        figure(
            "signal delivery p99",
            format!("{:.2}ms", stats.p99.as_secs_f64() * 1e3),
        );
        cluster.print_bus_metrics(&[0, 1]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_are_rate_limited_and_local_without_a_bus() {
    let server = TestServer::start(
        ServerOptions::new(StoreKind::Sqlite)
            .jwt_secret(SECRET)
            .env("SEQCAST_SEND_RATE", "5")
            .env("SEQCAST_MAX_SIGNAL_BYTES", "64"),
    )
    .await;
    let url = server.ws_url();
    let mut alice = connect(&url, Claims::new("alice", &["r"])).await;
    let mut bob = connect(&url, Claims::new("bob", &["r"])).await;
    alice.join("r", None).await;
    bob.join("r", None).await;
    // The setting is in force.
    alice
        .expect_error(signal("r", json!("x".repeat(63))), "too_large")
        .await;
    // 5/s with a burst of 20 (two tokens went to the join and the refused signal): of 40
    // pipelined signals some are refused, each under its ref, and the rest reach bob.
    for n in 0..40 {
        alice
            .send_json(json!({"type": "signal", "room": "r", "body": n, "ref": n}))
            .await;
    }
    let replies = alice.frames_until_pong().await;
    let refused: Vec<&Value> = replies
        .iter()
        .filter(|f| f["type"] == "error" && f["code"] == "rate_limited")
        .collect();
    assert!(
        !refused.is_empty(),
        "no signal was rate limited: {replies:?}"
    );
    assert_eq!(replies.len(), refused.len(), "only refusals are answered");
    let passed = 40 - refused.len();
    let mut got = Vec::new();
    while got.len() < passed {
        let frame = bob.recv_json().await;
        assert_eq!(frame["type"], "signal", "{frame}");
        assert_eq!(frame["from"], "alice");
        got.push(frame["body"].as_u64().unwrap());
    }
    let refused_refs: Vec<u64> = refused.iter().map(|f| f["ref"].as_u64().unwrap()).collect();
    assert!(
        got.iter().all(|n| !refused_refs.contains(n)),
        "refused signals went out"
    );
    // Nothing else is on its way: after its ack, the next frame bob gets is its own message.
    bob.send_msg("r", json!("after")).await;
    assert_eq!(bob.recv_json().await["type"], "message");
}
