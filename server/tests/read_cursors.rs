//! Read cursors (protocol v1.1): `read` frames, `joined.read` and `GET /v1/unread`.
//!
//! - `read_cursors_across_nodes`: two nodes sharing Postgres and Redis, one user connected to
//!   both. A cursor never moves back and stops at the head; the reply carries it and the `ref`;
//!   the user's connection on the other node receives each move (and nothing when it did not
//!   move), the connection that sent it only its reply; a new connection's `joined` carries it;
//!   `/v1/unread` lists it. Refusals: a negative or non-integer seq (`bad_request`), a room the
//!   token may not read (`forbidden`), the server key (`forbidden`, 403 over HTTP).
//! - `read_cursors_on_a_single_node`: the same on SQLite, where there is no bus: the user's
//!   other connections on the node get the moves all the same.
//! - `without_redis_other_nodes_see_the_cursor_at_their_next_join`: two Postgres nodes without
//!   Redis: a move reaches the node's own connections of the user; the other node's see it in
//!   their next `joined` and in `/v1/unread`.
//! - `unread_pages_by_room_name`: `/v1/unread?after=&limit=` (extension) pages through a user's
//!   rooms; a page's `next` moves past rooms the token no longer reads.
//!
//! Negative checks wait for a later marker frame, never for a pause.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::time::Duration;

use serde_json::{json, Value};

use support::cluster::{wait_until, Cluster, API_KEY};
use support::http::Http;
use support::redis::TestRedis;
use support::scenario::scenario;
use support::server::{Claims, ServerOptions, StoreKind, TestServer};
use support::ws::{Auth, WsClient};

const SECRET: &str = "read-cursors-test-secret";

async fn connect(url: &str, claims: &Claims) -> WsClient {
    let token = claims.sign(SECRET);
    WsClient::try_connect(url, Auth::Query(&token))
        .await
        .unwrap()
}

fn read(room: &str, seq: Value) -> Value {
    json!({"type": "read", "room": room, "seq": seq})
}

/// Sends `read` and checks the reply: `{"type":"read","room":..,"seq":cursor,"ref":..}`.
async fn mark(ws: &mut WsClient, room: &str, seq: u64, cursor: u64) {
    let reference = ws.new_ref();
    let mut frame = read(room, json!(seq));
    frame["ref"] = reference.clone();
    let reply = ws.request(frame).await;
    assert_eq!(
        reply,
        json!({"type": "read", "room": room, "seq": cursor, "ref": reference}),
        "read {seq}"
    );
}

/// The next frame, which must be the cursor update `{"type":"read","room":..,"seq":..}`.
async fn expect_update(ws: &mut WsClient, room: &str, seq: u64) {
    let frame = ws.recv_json().await;
    assert_eq!(frame, json!({"type": "read", "room": room, "seq": seq}));
}

/// The next cursor update (a `read` frame without a `ref`), skipping messages.
async fn next_update(ws: &mut WsClient) -> Value {
    loop {
        let frame = ws.recv_json().await;
        match frame["type"].as_str() {
            Some("message") => continue,
            Some("read") if frame.get("ref").is_none() => return frame,
            _ => panic!("expected a cursor update, got {frame}"),
        }
    }
}

/// A SQLite node with the test's secret and server key.
async fn single_node() -> TestServer {
    TestServer::start(
        ServerOptions::new(StoreKind::Sqlite)
            .jwt_secret(SECRET)
            .api_key(API_KEY),
    )
    .await
}

/// Posts `n` messages to `room` with the server key.
async fn post(http: &Http, room: &str, n: usize) {
    let http = http.bearer(API_KEY);
    for i in 0..n {
        http.post_message(room, &json!({"body": i})).await;
    }
}

/// The rooms of `GET /v1/unread`.
async fn unread(http: &Http, claims: &Claims) -> Value {
    let reply = http.bearer(&claims.sign(SECRET)).get("/v1/unread").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.json()["rooms"].clone()
}

/// What both tests check, with `a` and `b` two connections of alice (on two nodes, or one),
/// `http` a node's HTTP API, and room `r` holding 10 messages.
async fn contract(a: &mut WsClient, b: &mut WsClient, http: &Http, alice: &Claims) {
    mark(a, "r", 4, 4).await;
    expect_update(b, "r", 4).await;
    mark(a, "r", 2, 4).await;
    mark(a, "r", 4, 4).await;
    // Unmoved, so nothing went to b: its next frame is the marker, 7.
    mark(a, "r", 7, 7).await;
    expect_update(b, "r", 7).await;
    mark(a, "r", 99, 10).await;
    expect_update(b, "r", 10).await;
    mark(a, "r", u64::MAX, 10).await;
    // The other way round. a gets b's move: its first update (replies were taken by `mark`),
    // so none of its own moves came back to it.
    post(http, "r", 3).await;
    mark(b, "r", 12, 12).await;
    assert_eq!(
        next_update(a).await,
        json!({"type": "read", "room": "r", "seq": 12})
    );
    // Nor do b's own come back to b: its next update is a's 13.
    mark(a, "r", 13, 13).await;
    assert_eq!(
        next_update(b).await,
        json!({"type": "read", "room": "r", "seq": 13})
    );
    post(http, "r", 1).await;

    // Refusals, under their ref; the connection stays open.
    for bad in [json!(-1), json!(1.5), json!("3"), json!(null)] {
        a.expect_error(read("r", bad), "bad_request").await;
    }
    a.expect_error(json!({"type": "read", "room": "r"}), "bad_request")
        .await;
    a.expect_error(read("secret", json!(1)), "forbidden").await;

    assert_eq!(
        unread(http, alice).await,
        json!([{"room": "r", "head": 14, "read": 13, "unread": 1}])
    );
    let reply = http.bearer(API_KEY).get("/v1/unread").await;
    reply.assert_error(403, "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_cursors_across_nodes() {
    scenario("read_cursors_across_nodes", async {
        let env = [("SEQCAST_JWT_SECRET", SECRET)];
        let cluster = Cluster::start(2, Some(TestRedis::start()), &env).await;
        let (n0, n1) = (cluster.node(0).ws_url(), cluster.node(1).ws_url());
        let alice = Claims::new("alice", &["r", "q"]);
        let mut a = connect(&n0, &alice).await;
        let mut b = connect(&n1, &alice).await;
        // b is not joined to `r`: read cursors go to every connection of the user.
        assert_eq!(a.join("r", None).await["read"], 0);
        // Both nodes listen to alice's channel: a move before that would be lost (at most
        // once), and would show up only at the next `joined`.
        let redis = cluster.redis();
        wait_until(
            Duration::from_secs(10),
            "alice's channel on 2 nodes",
            || async {
                let reply = redis.command(&["PUBSUB", "NUMSUB", "seqcast:user:alice"]);
                reply.lines().last() == Some("2")
            },
        )
        .await;
        let http = cluster.http(1);
        post(&http, "r", 10).await;
        contract(&mut a, &mut b, &http, &alice).await;

        // A new connection, on either node, starts from the stored cursor.
        let mut c = connect(&n1, &alice).await;
        let joined = c.join("r", Some(14)).await;
        assert_eq!(
            (joined["head"].clone(), joined["read"].clone()),
            (json!(14), json!(13))
        );
        assert_eq!(c.join("q", None).await["read"], 0, "no cursor in q");
        // Another user's cursors are their own.
        let bob = Claims::new("bob", &["r"]);
        let mut other = connect(&n0, &bob).await;
        assert_eq!(other.join("r", None).await["read"], 0);
        assert_eq!(unread(&cluster.http(0), &bob).await, json!([]));
        // n1 unsubscribes from alice's channel with her last connection there.
        b.close().await;
        c.close().await;
        wait_until(
            Duration::from_secs(10),
            "alice's channel on 1 node",
            || async {
                let reply = redis.command(&["PUBSUB", "NUMSUB", "seqcast:user:alice"]);
                reply.lines().last() == Some("1")
            },
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_cursors_on_a_single_node() {
    let server = single_node().await;
    let alice = Claims::new("alice", &["r"]);
    let mut a = connect(&server.ws_url(), &alice).await;
    let mut b = connect(&server.ws_url(), &alice).await;
    let http = Http::new(&server);
    post(&http, "r", 10).await;
    contract(&mut a, &mut b, &http, &alice).await;
    let joined = b.join("r", None).await;
    assert_eq!(joined["read"], 13);
    // A token that lost the room no longer lists it.
    let narrowed = Claims::new("alice", &["other"]);
    assert_eq!(unread(&http, &narrowed).await, json!([]));
}

/// Postgres without Redis: no bus between the nodes. A move reaches the user's connections on
/// the node it was made on; the other node's see the cursor at their next `joined` (and in
/// `/v1/unread`), since it is in the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_other_nodes_see_the_cursor_at_their_next_join() {
    scenario("read_cursors_without_redis", async {
        let cluster = Cluster::start(2, None, &[("SEQCAST_JWT_SECRET", SECRET)]).await;
        let (n0, n1) = (cluster.node(0).ws_url(), cluster.node(1).ws_url());
        let alice = Claims::new("alice", &["r"]);
        let mut a = connect(&n0, &alice).await;
        let mut same_node = connect(&n0, &alice).await;
        let mut elsewhere = connect(&n1, &alice).await;
        post(&cluster.http(0), "r", 5).await;
        mark(&mut a, "r", 3, 3).await;
        expect_update(&mut same_node, "r", 3).await;
        // The other node's connection answers its own (unmoving) read with the stored cursor,
        // and got nothing else.
        mark(&mut elsewhere, "r", 1, 3).await;
        let frames = elsewhere.frames_until_pong().await;
        assert!(frames.is_empty(), "no bus, yet: {frames:?}");
        assert_eq!(elsewhere.join("r", None).await["read"], 3);
        assert_eq!(
            unread(&cluster.http(1), &alice).await,
            json!([{"room": "r", "head": 5, "read": 3, "unread": 2}])
        );
    })
    .await;
}

/// `GET /v1/unread` pages (an extension): `limit` rooms after `after`, `has_more`, and `next` to
/// ask for the following page. Without parameters it lists every room (up to 10,000), as the
/// protocol says. A room left out because the token no longer reads it still moves `next`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_pages_by_room_name() {
    let server = single_node().await;
    let http = Http::new(&server);
    let erin = Claims::new("erin", &["u*"]);
    let mut ws = connect(&server.ws_url(), &erin).await;
    for room in ["u1", "u2", "u3", "u4", "u5"] {
        post(&http, room, 2).await;
        mark(&mut ws, room, 1, 1).await;
    }
    let get = |claims: &Claims, query: &str| {
        let http = http.bearer(&claims.sign(SECRET));
        let path = format!("/v1/unread{query}");
        async move {
            let reply = http.get(&path).await;
            assert_eq!(reply.status, 200, "{path}: {reply:?}");
            let body = reply.json();
            let rooms: Vec<String> = body["rooms"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["room"].as_str().unwrap().to_owned())
                .collect();
            (rooms, body["has_more"].clone(), body.get("next").cloned())
        }
    };
    assert_eq!(
        get(&erin, "").await,
        (
            vec!["u1", "u2", "u3", "u4", "u5"]
                .into_iter()
                .map(String::from)
                .collect(),
            json!(false),
            None
        )
    );
    let mut pages = Vec::new();
    let mut query = "?limit=2".to_owned();
    loop {
        let (rooms, has_more, next) = get(&erin, &query).await;
        pages.push(rooms);
        if has_more == json!(false) {
            assert_eq!(next, None, "no next on the last page");
            break;
        }
        query = format!("?limit=2&after={}", next.unwrap().as_str().unwrap());
    }
    assert_eq!(pages, [vec!["u1", "u2"], vec!["u3", "u4"], vec!["u5"]]);

    // u2 is no longer erin's to read: left out, and the page still ends at it.
    let narrowed = Claims::new("erin", &["u1", "u3", "u4", "u5"]);
    let (rooms, has_more, next) = get(&narrowed, "?limit=2").await;
    assert_eq!(
        (rooms, has_more, next),
        (vec!["u1".to_owned()], json!(true), Some(json!("u2")))
    );

    for query in ["limit=0", "after=%00", "after=a%20b", "after=%F0%9F%92%A9"] {
        let refused = http
            .bearer(&erin.sign(SECRET))
            .get(&format!("/v1/unread?{query}"))
            .await;
        refused.assert_error(400, "bad_request");
    }
}
