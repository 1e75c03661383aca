//! The HTTP endpoints of the contract (`protocol.md`, "HTTP"), on SQLite and on Postgres.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

use support::check::{assert_contiguous, assert_message, eventually};
use support::http::{metric_value, raw_post_status, Http};
use support::server::{Claims, ServerOptions, StoreKind, TestServer};
use support::ws::{Auth, WsClient, RECV_DEADLINE};

const SECRET: &str = "http-api-test-secret";
const API_KEY: &str = "http-api-test-api-key";

store_tests!(
    messages_after_limit_and_has_more,
    messages_before_pages_backwards_in_ascending_order,
    post_as_user_posts_as_itself_within_its_rooms,
    post_with_api_key_names_the_sender_and_scopes_idem,
    room_head_and_first,
    live_ready_and_metrics,
    error_statuses_and_shape,
);

/// Sends `n` messages `{"n": i}` over WebSocket (development mode), returns seq -> i.
async fn seed(server: &TestServer, room: &str, n: usize) -> HashMap<u64, usize> {
    let mut sender = WsClient::connect(server).await;
    let seqs = sender
        .send_pipelined(room, n, 64, Duration::from_secs(60), |i| json!({ "n": i }))
        .await;
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    assert_contiguous(&sorted, 1, n as u64, "seeded seqs");
    seqs.into_iter().enumerate().map(|(i, s)| (s, i)).collect()
}

/// The seqs of a messages answer, after checking each message and the answer's shape.
fn page_seqs(page: &Value, room: &str, bodies: &HashMap<u64, usize>) -> Vec<u64> {
    assert_eq!(page["room"], room, "{page}");
    assert!(page["head"].is_u64(), "head in {page}");
    assert!(page["has_more"].is_boolean(), "has_more in {page}");
    let messages = page["messages"].as_array().expect("messages array");
    messages
        .iter()
        .map(|m| {
            let seq = m["seq"].as_u64().expect("message seq");
            // Message objects are as on the WebSocket; `type` may be left out over HTTP.
            let mut frame = m.clone();
            frame["type"] = json!("message");
            assert_message(&frame, room, seq);
            if let Some(i) = bodies.get(&seq) {
                assert_eq!(m["body"], json!({ "n": i }), "body of seq {seq}");
            }
            seq
        })
        .collect()
}

async fn messages_after_limit_and_has_more(store: StoreKind) {
    // Seeding sends hundreds of messages on one connection: no per-connection rate limit.
    let server = TestServer::start(ServerOptions::new(store).env("SEQCAST_SEND_RATE", "0")).await;
    let bodies = seed(&server, "general", 1100).await;
    let http = Http::new(&server);

    let page = http.messages("general", "after=0").await;
    assert_eq!(page["head"], 1100);
    assert_contiguous(
        &page_seqs(&page, "general", &bodies),
        1,
        100,
        "default limit 100",
    );
    assert_eq!(page["has_more"], true);

    let page = http.messages("general", "after=0&limit=10").await;
    assert_contiguous(&page_seqs(&page, "general", &bodies), 1, 10, "limit=10");
    assert_eq!(page["has_more"], true);

    let page = http.messages("general", "after=100&limit=50").await;
    assert_contiguous(&page_seqs(&page, "general", &bodies), 101, 150, "after=100");

    let page = http.messages("general", "after=0&limit=1000").await;
    assert_contiguous(&page_seqs(&page, "general", &bodies), 1, 1000, "limit=1000");
    assert_eq!(page["has_more"], true);

    let page = http.messages("general", "after=1000&limit=1000").await;
    assert_contiguous(
        &page_seqs(&page, "general", &bodies),
        1001,
        1100,
        "the tail",
    );
    assert_eq!(page["has_more"], false, "nothing after the head");

    let page = http.messages("general", "after=1090").await;
    assert_contiguous(
        &page_seqs(&page, "general", &bodies),
        1091,
        1100,
        "the tail",
    );
    assert_eq!(page["has_more"], false);

    let page = http.messages("general", "after=1100").await;
    assert!(page_seqs(&page, "general", &bodies).is_empty());
    assert_eq!(page["has_more"], false);

    // limit is at most 1000: either clamped or refused.
    let reply = http
        .get("/v1/rooms/general/messages?after=0&limit=5000")
        .await;
    match reply.status {
        200 => {
            let page = reply.json();
            assert_contiguous(
                &page_seqs(&page, "general", &bodies),
                1,
                1000,
                "limit clamped",
            );
            assert_eq!(page["has_more"], true);
        }
        400 => reply.assert_error(400, "bad_request"),
        _ => panic!("limit=5000 should be clamped to 1000 or refused with 400: {reply:?}"),
    }
}

async fn messages_before_pages_backwards_in_ascending_order(store: StoreKind) {
    // Seeding sends hundreds of messages on one connection: no per-connection rate limit.
    let server = TestServer::start(ServerOptions::new(store).env("SEQCAST_SEND_RATE", "0")).await;
    let bodies = seed(&server, "general", 250).await;
    let http = Http::new(&server);

    let page = http.messages("general", "before=251&limit=100").await;
    assert_contiguous(
        &page_seqs(&page, "general", &bodies),
        151,
        250,
        "before=251",
    );
    assert_eq!(page["has_more"], true);
    assert_eq!(page["head"], 250);

    let page = http.messages("general", "before=151&limit=100").await;
    assert_contiguous(&page_seqs(&page, "general", &bodies), 51, 150, "before=151");
    assert_eq!(page["has_more"], true);

    let page = http.messages("general", "before=51&limit=100").await;
    assert_contiguous(&page_seqs(&page, "general", &bodies), 1, 50, "before=51");
    assert_eq!(page["has_more"], false, "nothing older than seq 1");

    let page = http.messages("general", "before=11&limit=10").await;
    assert_contiguous(&page_seqs(&page, "general", &bodies), 1, 10, "before=11");
    assert_eq!(page["has_more"], false, "nothing older than seq 1");

    let page = http.messages("general", "before=1").await;
    assert!(page_seqs(&page, "general", &bodies).is_empty());
    assert_eq!(page["has_more"], false);

    let page = http.messages("general", "before=251").await;
    assert_contiguous(
        &page_seqs(&page, "general", &bodies),
        151,
        250,
        "default limit",
    );

    let page = http.messages("general", "before=100000&limit=5").await;
    assert_contiguous(
        &page_seqs(&page, "general", &bodies),
        246,
        250,
        "before beyond head",
    );
    assert_eq!(page["has_more"], true);
}

async fn post_as_user_posts_as_itself_within_its_rooms(store: StoreKind) {
    let server = TestServer::start(
        ServerOptions::new(store)
            .jwt_secret(SECRET)
            .api_key(API_KEY),
    )
    .await;
    let alice_token = Claims::new("alice", &["general"])
        .read(&["news-*"])
        .sign(SECRET);
    let alice = Http::new(&server).bearer(&alice_token);

    let posted = alice
        .post_message("general", &json!({"body": {"x": 1}, "from": "mallory"}))
        .await;
    assert_eq!(posted["seq"], 1);
    let page = alice.messages("general", "after=0").await;
    assert_eq!(
        page["messages"][0]["from"], "alice",
        "a user posts as itself: {page}"
    );
    assert_eq!(page["messages"][0]["body"], json!({"x": 1}));
    assert_eq!(page["messages"][0]["id"], posted["id"]);

    // idem for a user.
    let first = alice
        .post_message("general", &json!({"body": 2, "idem": "i-1"}))
        .await;
    let again = alice
        .post_json(
            "/v1/rooms/general/messages",
            &json!({"body": 3, "idem": "i-1"}),
        )
        .await;
    assert!(
        (200..300).contains(&again.status),
        "a repeated idem succeeds: {again:?}"
    );
    assert_eq!(again.json()["seq"], first["seq"]);
    assert_eq!(again.json()["id"], first["id"]);
    assert_eq!(alice.room("general").await["head"], 2);

    // Read-only and foreign rooms.
    alice
        .post_json("/v1/rooms/news-1/messages", &json!({"body": 1}))
        .await
        .assert_error(403, "forbidden");
    alice
        .post_json("/v1/rooms/random/messages", &json!({"body": 1}))
        .await
        .assert_error(403, "forbidden");
    alice
        .get("/v1/rooms/random/messages?after=0")
        .await
        .assert_error(403, "forbidden");
    alice
        .get("/v1/rooms/random")
        .await
        .assert_error(403, "forbidden");
    let news = alice.messages("news-1", "after=0").await;
    assert_eq!(news["head"], 0);
    assert_eq!(alice.room("news-1").await["head"], 0);

    // The message also reached WebSocket readers.
    let mut reader = WsClient::connect_with(&server, Auth::Query(&alice_token)).await;
    reader.join("general", Some(0)).await;
    let seen = reader.collect_messages("general", 2, RECV_DEADLINE).await;
    assert_eq!(seen[0]["from"], "alice");
}

async fn post_with_api_key_names_the_sender_and_scopes_idem(store: StoreKind) {
    let server = TestServer::start(
        ServerOptions::new(store)
            .jwt_secret(SECRET)
            .api_key(API_KEY),
    )
    .await;
    let key = Http::new(&server).bearer(API_KEY);
    let reader_token = Claims::new("reader", &["alerts"]).sign(SECRET);
    let mut reader = WsClient::connect_with(&server, Auth::Header(&reader_token)).await;
    reader.join("alerts", None).await;

    let a = key.post_message("alerts", &json!({"body": "a"})).await;
    let b = key
        .post_message("alerts", &json!({"body": "b", "from": "bot-1"}))
        .await;
    assert_eq!((a["seq"].as_u64(), b["seq"].as_u64()), (Some(1), Some(2)));

    let idem = |from: Option<&str>| {
        let mut payload = json!({"body": "once", "idem": "x"});
        if let Some(from) = from {
            payload["from"] = json!(from);
        }
        payload
    };
    let system_first = key.post_message("alerts", &idem(None)).await;
    let system_again = key
        .post_json("/v1/rooms/alerts/messages", &idem(Some("system")))
        .await;
    assert!(
        (200..300).contains(&system_again.status),
        "{system_again:?}"
    );
    assert_eq!(
        system_again.json()["seq"],
        system_first["seq"],
        "idem from `system` (default and explicit) is the same key"
    );
    let bot_first = key.post_message("alerts", &idem(Some("bot-1"))).await;
    assert_ne!(
        bot_first["seq"], system_first["seq"],
        "idem is scoped to `from`"
    );
    let bot_again = key
        .post_json("/v1/rooms/alerts/messages", &idem(Some("bot-1")))
        .await;
    assert_eq!(bot_again.json()["seq"], bot_first["seq"]);
    assert_eq!(bot_again.json()["id"], bot_first["id"]);

    let page = key.messages("alerts", "after=0").await;
    let froms: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["from"].as_str().unwrap())
        .collect();
    assert_eq!(froms, vec!["system", "bot-1", "system", "bot-1"], "{page}");
    assert_eq!(page["has_more"], false);

    // Fan-out of HTTP posts to WebSocket readers, exactly once each.
    let live = reader.collect_messages("alerts", 4, RECV_DEADLINE).await;
    let seqs: Vec<u64> = live.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    assert_eq!(live[1]["from"], "bot-1");
    assert!(reader.frames_until_pong().await.is_empty());

    // The key reads any room.
    assert_eq!(key.room("anything-at-all").await["head"], 0);
}

async fn room_head_and_first(store: StoreKind) {
    let server = TestServer::start(ServerOptions::new(store)).await;
    let http = Http::new(&server);
    let room = http.room("never-written").await;
    assert_eq!(
        room,
        json!({"room": "never-written", "head": 0, "first": 1}),
        "a never-written room"
    );
    let page = http.messages("never-written", "after=0").await;
    assert_eq!(page["head"], 0);
    assert_eq!(page["messages"], json!([]));
    assert_eq!(page["has_more"], false);

    for i in 0..3 {
        let posted = http.post_message("general", &json!({ "body": i })).await;
        assert_eq!(posted["seq"], i + 1);
    }
    let room = http.room("general").await;
    assert_eq!(room["head"], 3, "{room}");
    assert_eq!(room["first"], 1, "{room}");

    // Dev mode: HTTP without auth acts as the server key, `from` defaults to `system`.
    let page = http.messages("general", "after=0").await;
    assert_eq!(page["messages"][0]["from"], "system", "{page}");
}

async fn live_ready_and_metrics(store: StoreKind) {
    let server = TestServer::start(ServerOptions::new(store)).await;
    let http = Http::new(&server);
    assert_eq!(http.get("/live").await.status, 200);
    let ready = http.get("/ready").await;
    assert_eq!(ready.status, 200, "{ready:?}");
    assert!(
        ready.json().is_object(),
        "/ready answers a JSON object: {ready:?}"
    );

    // Some activity so every metric has a sample.
    let mut reader = WsClient::connect(&server).await;
    reader.join("general", None).await;
    let mut sender = WsClient::connect(&server).await;
    sender.send_msg("general", json!(1)).await;
    reader.collect_messages("general", 1, RECV_DEADLINE).await;

    let metrics = http.metrics().await;
    for name in [
        "seqcast_connections_open",
        "seqcast_sessions_joined",
        "seqcast_messages_committed_total",
        "seqcast_messages_delivered_total",
        "seqcast_commit_seconds_count",
        "seqcast_sessions_catching_up",
        "seqcast_sessions_closed_slow_total",
    ] {
        assert!(
            metric_value(&metrics, name).is_some(),
            "/metrics has no sample of {name}:\n{metrics}"
        );
    }
    eventually(Duration::from_secs(5), "metric values", || async {
        let metrics = http.metrics().await;
        let value = |name| metric_value(&metrics, name).unwrap_or(0.0);
        value("seqcast_connections_open") >= 2.0
            && value("seqcast_sessions_joined") >= 1.0
            && value("seqcast_messages_committed_total") >= 1.0
            && value("seqcast_messages_delivered_total") >= 1.0
            && value("seqcast_commit_seconds_count") >= 1.0
    })
    .await;
}

async fn error_statuses_and_shape(store: StoreKind) {
    let server = TestServer::start(
        ServerOptions::new(store)
            .jwt_secret(SECRET)
            .api_key(API_KEY),
    )
    .await;
    let anonymous = Http::new(&server);
    let key = anonymous.bearer(API_KEY);
    let alice = anonymous.bearer(&Claims::new("alice", &["general"]).sign(SECRET));
    let expired = anonymous.bearer(
        &Claims::new("alice", &["general"])
            .expires_in(-600)
            .sign(SECRET),
    );

    // 401
    for (who, client) in [
        ("no auth", &anonymous),
        ("expired", &expired),
        ("garbage", &anonymous.bearer("garbage")),
    ] {
        let reply = client.get("/v1/rooms/general/messages?after=0").await;
        assert_eq!(reply.status, 401, "{who}: {reply:?}");
        reply.assert_error(401, "unauthorized");
        client
            .post_json("/v1/rooms/general/messages", &json!({"body": 1}))
            .await
            .assert_error(401, "unauthorized");
    }
    // 403
    alice
        .post_json("/v1/rooms/other/messages", &json!({"body": 1}))
        .await
        .assert_error(403, "forbidden");
    // 400
    let too_long = "a".repeat(129);
    for path in [
        "/v1/rooms/bad%20name".to_owned(),
        format!("/v1/rooms/{too_long}"),
        "/v1/rooms/a%2Fb/messages?after=0".to_owned(),
        "/v1/rooms/general/messages?after=abc".to_owned(),
        "/v1/rooms/general/messages?limit=-1".to_owned(),
    ] {
        key.get(&path).await.assert_error(400, "bad_request");
    }
    key.try_post_raw("/v1/rooms/general/messages", b"{not json".to_vec())
        .await
        .expect("an answer")
        .assert_error(400, "bad_request");
    key.post_json("/v1/rooms/general/messages", &json!({"no_body": 1}))
        .await
        .assert_error(400, "bad_request");
    key.post_json("/v1/rooms/bad%20name/messages", &json!({"body": 1}))
        .await
        .assert_error(400, "bad_request");
    // 413: a body over SEQCAST_MAX_MESSAGE_BYTES (65536 by default).
    key.post_json(
        "/v1/rooms/general/messages",
        &json!({"body": "a".repeat(70_000)}),
    )
    .await
    .assert_error(413, "too_large");
    let status = raw_post_status(
        &server,
        "/v1/rooms/general/messages",
        Some(API_KEY),
        4 << 20,
    )
    .await;
    assert_eq!(status, 413, "a 4 MiB POST");
    // Nothing was stored by any of these.
    assert_eq!(key.room("general").await["head"], 0);
    // 404 for unknown paths.
    assert_eq!(key.get("/v1/nothing-here").await.status, 404);
    // The server is still fine.
    let posted = alice.post_message("general", &json!({"body": "ok"})).await;
    assert_eq!(posted["seq"], 1);
}

/// axum's own refusals answer in the protocol's JSON error shape too: a path parameter that does
/// not decode (400 `bad_request`), a method a path does not serve (405 `method_not_allowed` with
/// `Allow`), a plain GET of the WebSocket endpoint; and a request body that does not arrive within
/// `SEQCAST_HANDSHAKE_TIMEOUT` is 408 `request_timeout`, not 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_refusals_and_slow_bodies_are_json_errors() {
    let server = TestServer::start(
        ServerOptions::new(StoreKind::Sqlite)
            .jwt_secret(SECRET)
            .api_key(API_KEY)
            .env("SEQCAST_HANDSHAKE_TIMEOUT", "1s"),
    )
    .await;
    let key = Http::new(&server).bearer(API_KEY);
    for path in [
        "/v1/rooms/%FF/messages?after=0",
        "/v1/rooms/%C3%28",
        "/v1/rooms/a%FFb",
    ] {
        key.get(path).await.assert_error(400, "bad_request");
    }
    key.post_json("/v1/rooms/%FF/messages", &json!({"body": 1}))
        .await
        .assert_error(400, "bad_request");

    let client = reqwest::Client::new();
    for (method, path, allowed) in [
        (
            reqwest::Method::DELETE,
            "/v1/rooms/general/messages",
            "POST",
        ),
        (reqwest::Method::PUT, "/v1/rooms/general", "GET"),
        (reqwest::Method::POST, "/ready", "GET"),
        (reqwest::Method::POST, "/v1/ws", "GET"),
    ] {
        let response = client
            .request(method.clone(), format!("{}{path}", server.http_url()))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        let allow = response
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("{method} {path}: 405 without Allow"));
        assert!(allow.contains(allowed), "{method} {path}: Allow {allow:?}");
        let reply = support::http::HttpReply {
            status: response.status().as_u16(),
            content_type: String::new(),
            text: response.text().await.unwrap(),
        };
        reply.assert_error(405, "method_not_allowed");
    }
    // A GET of the WebSocket endpoint without the handshake headers.
    let reply = key.get("/v1/ws").await;
    assert!((400..500).contains(&reply.status), "{reply:?}");
    reply.assert_error(reply.status, "bad_request");

    // A complete head promising 100 bytes of body, then 10 of them, then nothing.
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /v1/rooms/general/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"body\":1"
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer),
    )
    .await
    .expect("the server answers and closes within its handshake timeout")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 408"), "{answer}");
    let reply = support::http::HttpReply {
        status: 408,
        content_type: String::new(),
        text: body.to_owned(),
    };
    reply.assert_error(408, "request_timeout");
    assert_eq!(key.room("general").await["head"], 0, "nothing was stored");
}
