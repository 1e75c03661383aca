//! Every frame of the WebSocket contract (`protocol.md`, "WebSocket: GET /v1/ws"), against the
//! real binary, on SQLite and on Postgres.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use support::check::{assert_ack, assert_message};
use support::http::Http;
use support::server::{sign_claims, unsigned_token, Claims, ServerOptions, StoreKind, TestServer};
use support::ws::{expect_rejected, Auth, Event, WsClient, RECV_DEADLINE};

const SECRET: &str = "ws-protocol-test-secret";
const API_KEY: &str = "ws-protocol-test-api-key";

store_tests!(
    join_empty_room_reports_head_0_first_1,
    join_reports_head_and_first,
    join_since_replays_then_live,
    join_without_since_is_live_only,
    join_since_at_or_beyond_head_replays_nothing,
    leave_stops_delivery_and_not_joined,
    ack_echoes_number_and_string_refs,
    any_json_body_round_trips,
    joined_sender_receives_own_message,
    repeated_idem_returns_the_original,
    ping_pong,
    bad_request_errors_keep_the_connection,
    room_name_rules,
    invalid_token_gets_unauthorized_then_1008,
    expired_token_gets_unauthorized_then_1008,
    forbidden_rooms_and_read_only_patterns,
    room_pattern_matching,
    token_in_query_and_in_header,
    dev_mode_clients_are_anonymous,
    binary_frame_is_bad_request,
    oversized_frame_closes_1009_and_server_keeps_serving,
    too_large_body_is_refused_and_connection_stays,
);

async fn dev_server(store: StoreKind) -> TestServer {
    TestServer::start(ServerOptions::new(store)).await
}

async fn secured_server(store: StoreKind) -> TestServer {
    TestServer::start(
        ServerOptions::new(store)
            .jwt_secret(SECRET)
            .api_key(API_KEY),
    )
    .await
}

fn token(sub: &str, rooms: &[&str]) -> String {
    Claims::new(sub, rooms).sign(SECRET)
}

/// Sends `n` messages `{"n": i}` (i from `start`) one by one, returning their seqs.
async fn send_n(client: &mut WsClient, room: &str, start: u64, n: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in start..start + n {
        let ack = client.send_msg(room, json!({ "n": i })).await;
        seqs.push(ack["seq"].as_u64().unwrap());
    }
    seqs
}

async fn join_empty_room_reports_head_0_first_1(store: StoreKind) {
    let server = dev_server(store).await;
    let mut client = WsClient::connect(&server).await;
    client
        .send_json(json!({"type": "join", "room": "general", "ref": 1}))
        .await;
    let joined = client.expect_frame("joined").await;
    assert_eq!(joined["room"], "general");
    assert_eq!(joined["head"], 0, "empty room head: {joined}");
    assert_eq!(joined["first"], 1, "empty room first = head + 1: {joined}");
    assert_eq!(joined["ref"], 1, "ref echoed: {joined}");
    assert_ne!(joined["truncated"], true, "nothing truncated: {joined}");
}

async fn join_reports_head_and_first(store: StoreKind) {
    let server = dev_server(store).await;
    let mut sender = WsClient::connect(&server).await;
    assert_eq!(send_n(&mut sender, "general", 1, 3).await, vec![1, 2, 3]);
    let mut reader = WsClient::connect(&server).await;
    let joined = reader.join("general", None).await;
    assert_eq!(joined["head"], 3, "{joined}");
    assert_eq!(joined["first"], 1, "{joined}");
    // Another room is independent: its own seqs start at 1.
    assert_eq!(send_n(&mut sender, "other", 1, 2).await, vec![1, 2]);
    assert_eq!(reader.join("other", None).await["head"], 2);
}

async fn join_since_replays_then_live(store: StoreKind) {
    let server = dev_server(store).await;
    let mut sender = WsClient::connect(&server).await;
    send_n(&mut sender, "general", 1, 5).await;
    let sender_name = {
        let mut probe = WsClient::connect(&server).await;
        probe.join("general", Some(0)).await;
        let first = probe
            .collect_messages("general", 1, RECV_DEADLINE)
            .await
            .remove(0);
        first["from"].as_str().unwrap().to_owned()
    };

    let mut reader = WsClient::connect(&server).await;
    reader
        .send_json(json!({"type": "join", "room": "general", "since": 2, "ref": "j"}))
        .await;
    // No message of the room comes before its `joined`.
    let joined = reader.expect_frame("joined").await;
    assert_eq!(joined["head"], 5, "{joined}");
    assert_eq!(joined["first"], 1, "{joined}");
    assert_eq!(joined["ref"], "j", "{joined}");
    let replayed = reader.collect_messages("general", 3, RECV_DEADLINE).await;
    for (message, seq) in replayed.iter().zip(3..) {
        assert_message(message, "general", seq);
        assert_eq!(message["body"], json!({ "n": seq }), "{message}");
        assert_eq!(message["from"], sender_name.as_str(), "{message}");
    }

    // Then the live stream.
    send_n(&mut sender, "general", 6, 2).await;
    let live = reader.collect_messages("general", 2, RECV_DEADLINE).await;
    assert_message(&live[0], "general", 6);
    assert_message(&live[1], "general", 7);
    assert_eq!(live[1]["body"], json!({"n": 7}));

    // since = 0 replays everything.
    let mut all = WsClient::connect(&server).await;
    all.join("general", Some(0)).await;
    let seqs = all.collect_seqs("general", 7, RECV_DEADLINE).await;
    assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
    assert!(
        all.frames_until_pong().await.is_empty(),
        "nothing beyond the 7 messages"
    );
}

async fn join_without_since_is_live_only(store: StoreKind) {
    let server = dev_server(store).await;
    let mut sender = WsClient::connect(&server).await;
    send_n(&mut sender, "general", 1, 3).await;
    let mut reader = WsClient::connect(&server).await;
    assert_eq!(reader.join("general", None).await["head"], 3);
    send_n(&mut sender, "general", 4, 1).await;
    let first = reader.collect_messages("general", 1, RECV_DEADLINE).await;
    assert_message(&first[0], "general", 4);
}

async fn join_since_at_or_beyond_head_replays_nothing(store: StoreKind) {
    let server = dev_server(store).await;
    let mut sender = WsClient::connect(&server).await;
    send_n(&mut sender, "general", 1, 3).await;

    // since == head: nothing to replay; the next live message is the first one received.
    let mut at_head = WsClient::connect(&server).await;
    assert_eq!(at_head.join("general", Some(3)).await["head"], 3);

    // since > head: the client's state is not from this database; nothing is replayed.
    let mut beyond = WsClient::connect(&server).await;
    let joined = beyond.join("general", Some(10)).await;
    assert_eq!(joined["head"], 3, "{joined}");

    let mut witness = WsClient::connect(&server).await;
    witness.join("general", None).await;
    send_n(&mut sender, "general", 4, 1).await;
    witness.collect_messages("general", 1, RECV_DEADLINE).await;

    let first = at_head.collect_messages("general", 1, RECV_DEADLINE).await;
    assert_message(&first[0], "general", 4);

    let frames = beyond.frames_until_pong().await;
    let replayed: Vec<&Value> = frames
        .iter()
        .filter(|f| f["type"] == "message" && f["seq"].as_u64().is_some_and(|s| s <= 3))
        .collect();
    assert!(
        replayed.is_empty(),
        "join with since > head replayed old messages: {replayed:?}"
    );
}

async fn leave_stops_delivery_and_not_joined(store: StoreKind) {
    let server = dev_server(store).await;
    let mut sender = WsClient::connect(&server).await;
    let mut reader = WsClient::connect(&server).await;
    let mut witness = WsClient::connect(&server).await;
    reader.join("general", None).await;
    witness.join("general", None).await;

    send_n(&mut sender, "general", 1, 1).await;
    assert_message(
        &reader.collect_messages("general", 1, RECV_DEADLINE).await[0],
        "general",
        1,
    );
    witness.collect_messages("general", 1, RECV_DEADLINE).await;

    reader
        .send_json(json!({"type": "leave", "room": "general", "ref": 2}))
        .await;
    let left = reader.expect_frame("left").await;
    assert_eq!(left["room"], "general", "{left}");
    assert_eq!(left["ref"], 2, "{left}");

    send_n(&mut sender, "general", 2, 1).await;
    witness.collect_messages("general", 1, RECV_DEADLINE).await;
    let after_leave = reader.frames_until_pong().await;
    assert!(
        after_leave.iter().all(|f| f["type"] != "message"),
        "messages after leave: {after_leave:?}"
    );

    // Leaving again, or a room never joined: not_joined, with the ref.
    let error = reader
        .expect_error(
            json!({"type": "leave", "room": "general", "ref": 3}),
            "not_joined",
        )
        .await;
    assert_eq!(error["ref"], 3);
    reader
        .expect_error(
            json!({"type": "leave", "room": "never-joined", "ref": "x"}),
            "not_joined",
        )
        .await;

    // Joining again works.
    assert_eq!(reader.join("general", None).await["head"], 2);
}

async fn ack_echoes_number_and_string_refs(store: StoreKind) {
    let server = dev_server(store).await;
    let mut client = WsClient::connect(&server).await;

    client
        .send_json(json!({"type": "send", "room": "general", "body": "one", "ref": 7}))
        .await;
    let first = client.expect_frame("ack").await;
    assert_ack(&first, "general");
    assert_eq!(first["ref"], 7);
    assert_eq!(first["seq"], 1);

    client
        .send_json(json!({"type": "send", "room": "general", "body": "two", "ref": "abc-1"}))
        .await;
    let second = client.expect_frame("ack").await;
    assert_ack(&second, "general");
    assert_eq!(second["ref"], "abc-1");
    assert_eq!(second["seq"], 2);
    assert_ne!(first["id"], second["id"], "every message has its own id");

    // A send without ref is acknowledged too.
    client
        .send_json(json!({"type": "send", "room": "general", "body": false}))
        .await;
    let third = client.expect_frame("ack").await;
    assert_eq!(third["seq"], 3);

    // String refs on the other frames.
    client
        .send_json(json!({"type": "join", "room": "general", "ref": "j-1"}))
        .await;
    assert_eq!(client.expect_frame("joined").await["ref"], "j-1");
    client
        .send_json(json!({"type": "leave", "room": "general", "ref": "l-1"}))
        .await;
    assert_eq!(client.expect_frame("left").await["ref"], "l-1");

    // The stored bodies are exactly what was sent.
    let mut reader = WsClient::connect(&server).await;
    reader.join("general", Some(0)).await;
    let messages = reader.collect_messages("general", 3, RECV_DEADLINE).await;
    assert_eq!(messages[0]["body"], "one");
    assert_eq!(messages[1]["body"], "two");
    assert_eq!(messages[2]["body"], false);
    assert_eq!(messages[0]["id"], first["id"], "ack id = message id");
    assert_eq!(messages[0]["ts"], first["ts"], "ack ts = message ts");
}

async fn any_json_body_round_trips(store: StoreKind) {
    let server = dev_server(store).await;
    let mut client = WsClient::connect(&server).await;
    let bodies = [
        json!(false),
        json!(0),
        json!(-1.5),
        json!(9_007_199_254_740_993_u64),
        json!(""),
        json!("h\u{e9}llo \u{2713} \"quoted\" \\ \n"),
        json!([]),
        json!({}),
        json!({"a": [1, {"b": null}], "c": {"d": "e"}}),
        // Last, so the others are checked even if null were refused.
        json!(null),
    ];
    let mut sent = Vec::new();
    for (body, seq) in bodies.iter().zip(1..) {
        let reply = client
            .request(json!({"type": "send", "room": "general", "body": body}))
            .await;
        if reply["type"] != "ack" {
            eprintln!("body {body} refused: {reply}");
            break;
        }
        assert_eq!(reply["seq"], seq, "{reply}");
        sent.push(body.clone());
    }
    client.join("general", Some(0)).await;
    let messages = client
        .collect_messages("general", sent.len(), RECV_DEADLINE)
        .await;
    for (message, body) in messages.iter().zip(&sent) {
        assert_eq!(&message["body"], body, "the body comes back as sent");
    }
    assert_eq!(
        sent.len(),
        bodies.len(),
        "every JSON value is a valid body; refused: {}",
        bodies[sent.len().min(bodies.len() - 1)]
    );
}

async fn joined_sender_receives_own_message(store: StoreKind) {
    let server = secured_server(store).await;
    let alice_token = token("alice", &["general"]);
    let mut alice = WsClient::connect_with(&server, Auth::Query(&alice_token)).await;
    alice.join("general", None).await;
    let body = json!({"text": "hello", "nested": [1, 2.5, true, null, {"k": "v"}]});
    alice
        .send_json(json!({"type": "send", "room": "general", "body": body, "ref": 3}))
        .await;
    let mut ack = None;
    let mut message = None;
    for _ in 0..2 {
        let frame = alice.recv_json().await;
        match frame["type"].as_str() {
            Some("ack") => ack = Some(frame),
            Some("message") => message = Some(frame),
            _ => panic!("expected ack and message, got {frame}"),
        }
    }
    let ack = ack.expect("an ack");
    let message = message.expect("the sender's own message");
    assert_ack(&ack, "general");
    assert_eq!(ack["ref"], 3);
    assert_message(&message, "general", 1);
    assert_eq!(message["from"], "alice", "from = token sub: {message}");
    assert_eq!(message["body"], body);
    assert_eq!(message["id"], ack["id"]);
    assert_eq!(message["seq"], ack["seq"]);
    assert!(
        message.get("ref").is_none_or(Value::is_null),
        "a message frame is not a reply: {message}"
    );
}

async fn repeated_idem_returns_the_original(store: StoreKind) {
    let server = secured_server(store).await;
    let alice_token = token("alice", &["*"]);
    let bob_token = token("bob", &["*"]);
    let mut alice = WsClient::connect_with(&server, Auth::Header(&alice_token)).await;
    let mut bob = WsClient::connect_with(&server, Auth::Header(&bob_token)).await;
    let mut reader = WsClient::connect_with(&server, Auth::Header(&bob_token)).await;
    reader.join("general", None).await;

    let send = |body: &str, idem: &str| json!({"type": "send", "room": "general", "body": body, "idem": idem});
    let original = alice.request(send("first", "k-1")).await;
    assert_ack(&original, "general");
    let repeated = alice.request(send("first again", "k-1")).await;
    assert_ack(&repeated, "general");
    assert_eq!(repeated["seq"], original["seq"], "same idem: same seq");
    assert_eq!(repeated["id"], original["id"], "same idem: same id");

    let next = alice.send_msg("general", json!("no idem")).await;
    assert_eq!(next["seq"], 2, "the repeat stored nothing: {next}");
    // Idem is scoped to the sender and to the room.
    let bobs = bob.request(send("bob's", "k-1")).await;
    assert_eq!(
        bobs["seq"], 3,
        "another sender's k-1 is a new message: {bobs}"
    );
    let other_room = alice
        .request(json!({"type": "send", "room": "other", "body": 1, "idem": "k-1"}))
        .await;
    assert_ack(&other_room, "other");
    assert_eq!(other_room["seq"], 1);

    let seen = reader.collect_messages("general", 3, RECV_DEADLINE).await;
    let seqs: Vec<u64> = seen.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3], "the repeat was not delivered again");
    assert_eq!(seen[0]["body"], "first", "the original body is kept");
    assert!(reader.frames_until_pong().await.is_empty());

    let http = Http::new(&server).bearer(API_KEY);
    let room = http.room("general").await;
    assert_eq!(room["head"], 3, "{room}");
    let stored = http.messages("general", "after=0").await;
    assert_eq!(stored["messages"].as_array().unwrap().len(), 3, "{stored}");
}

async fn ping_pong(store: StoreKind) {
    let server = dev_server(store).await;
    let mut client = WsClient::connect(&server).await;
    client.send_json(json!({"type": "ping", "ref": 4})).await;
    let pong = client.expect_frame("pong").await;
    assert_eq!(pong["ref"], 4, "{pong}");
    client.send_json(json!({"type": "ping", "ref": "p"})).await;
    assert_eq!(client.expect_frame("pong").await["ref"], "p");
    client.send_json(json!({"type": "ping"})).await;
    client.expect_frame("pong").await;
}

async fn bad_request_errors_keep_the_connection(store: StoreKind) {
    let server = dev_server(store).await;
    let mut client = WsClient::connect(&server).await;

    for text in ["{not json", "[1, 2]", "\"ping\"", ""] {
        client.send_text(text).await;
        let error = client.expect_frame("error").await;
        assert_eq!(error["code"], "bad_request", "{text:?} -> {error}");
        assert!(error["message"].is_string(), "{error}");
    }

    let cases = [
        json!({"type": "dance", "ref": 1}),
        json!({"ref": 2}),
        json!({"type": "join", "ref": 3}),
        json!({"type": "leave", "ref": 4}),
        json!({"type": "send", "room": "general", "ref": 5}),
        json!({"type": "send", "body": 1, "ref": 6}),
        json!({"type": "join", "room": 42, "ref": 7}),
        json!({"type": "join", "room": "general", "since": "x", "ref": 8}),
        json!({"type": "join", "room": "general", "since": -1, "ref": 9}),
        json!({"type": 5, "ref": 10}),
    ];
    for case in cases {
        let reference = case["ref"].clone();
        let error = client.expect_error(case, "bad_request").await;
        assert_eq!(error["ref"], reference, "the ref is echoed: {error}");
    }

    // Still open and working.
    client.ping().await;
    assert_ack(&client.send_msg("general", json!(1)).await, "general");
}

async fn room_name_rules(store: StoreKind) {
    let server = dev_server(store).await;
    let mut client = WsClient::connect(&server).await;
    let too_long = "a".repeat(129);
    let bad = [
        "",
        too_long.as_str(),
        "a b",
        "a/b",
        "café",
        "a#b",
        "a*b",
        "a\u{0}b",
        "tab\t",
    ];
    for room in bad {
        for frame in [
            json!({"type": "join", "room": room}),
            json!({"type": "send", "room": room, "body": 1}),
            json!({"type": "leave", "room": room}),
        ] {
            client.expect_error(frame, "bad_request").await;
        }
    }
    let longest = "z".repeat(128);
    for room in ["a", "Az09_.:-x", "UPPER", "a.b:c-d_e", longest.as_str()] {
        client.join(room, None).await;
        assert_ack(&client.send_msg(room, json!(room)).await, room);
    }
}

async fn invalid_token_gets_unauthorized_then_1008(store: StoreKind) {
    let server = secured_server(store).await;
    let wrong_secret = Claims::new("alice", &["*"]).sign("another-secret");
    let unsigned = unsigned_token(&Claims::new("alice", &["*"]).to_json());
    let no_sub = sign_claims(
        &json!({"exp": jsonwebtoken::get_current_timestamp() + 3600, "rooms": ["*"]}),
        SECRET,
    );
    let no_exp = sign_claims(&json!({"sub": "alice", "rooms": ["*"]}), SECRET);

    // No token at all: the first frame must then be `auth` (tests/first_auth.rs).
    expect_rejected(&server, Auth::Query("garbage"), "garbage token").await;
    expect_rejected(&server, Auth::Query(&wrong_secret), "wrong secret").await;
    expect_rejected(
        &server,
        Auth::Header(&wrong_secret),
        "wrong secret (header)",
    )
    .await;
    expect_rejected(&server, Auth::Query(&unsigned), "alg none").await;
    expect_rejected(&server, Auth::Query(&no_sub), "no sub").await;
    expect_rejected(&server, Auth::Query(&no_exp), "no exp").await;

    // A valid token still works afterwards.
    let good = token("alice", &["*"]);
    let mut client = WsClient::connect_with(&server, Auth::Query(&good)).await;
    client.ping().await;
}

async fn expired_token_gets_unauthorized_then_1008(store: StoreKind) {
    let server = secured_server(store).await;
    let expired = Claims::new("alice", &["*"]).expires_in(-600).sign(SECRET);
    expect_rejected(&server, Auth::Query(&expired), "expired token (query)").await;
    expect_rejected(&server, Auth::Header(&expired), "expired token (header)").await;
}

async fn forbidden_rooms_and_read_only_patterns(store: StoreKind) {
    let server = secured_server(store).await;
    let alice_token = Claims::new("alice", &["general", "team-*"])
        .read(&["news-*"])
        .sign(SECRET);
    let mut alice = WsClient::connect_with(&server, Auth::Header(&alice_token)).await;

    let error = alice
        .expect_error(
            json!({"type": "join", "room": "random", "ref": 11}),
            "forbidden",
        )
        .await;
    assert_eq!(error["ref"], 11);
    let error = alice
        .expect_error(
            json!({"type": "send", "room": "random", "body": 1, "ref": "s"}),
            "forbidden",
        )
        .await;
    assert_eq!(error["ref"], "s");

    // Read-only: can join and read, cannot send.
    alice.join("news-1", None).await;
    alice
        .expect_error(
            json!({"type": "send", "room": "news-1", "body": 1}),
            "forbidden",
        )
        .await;
    let http = Http::new(&server).bearer(API_KEY);
    http.post_message("news-1", &json!({"body": "headline"}))
        .await;
    let news = alice.collect_messages("news-1", 1, RECV_DEADLINE).await;
    assert_message(&news[0], "news-1", 1);
    assert_eq!(news[0]["from"], "system");
    assert_eq!(news[0]["body"], "headline");

    // Full rights where granted; the connection survived the errors.
    alice.join("general", None).await;
    assert_ack(&alice.send_msg("general", json!(1)).await, "general");
    assert_ack(&alice.send_msg("team-a", json!(1)).await, "team-a");
    // Nothing was stored by the refused sends.
    assert_eq!(http.room("random").await["head"], 0);
    assert_eq!(http.room("news-1").await["head"], 1);
}

async fn room_pattern_matching(store: StoreKind) {
    let server = secured_server(store).await;
    let limited = token("carol", &["general", "team-*", "a*c"]);
    let mut carol = WsClient::connect_with(&server, Auth::Query(&limited)).await;
    for room in [
        "general", "team-", "team-x", "team-a-b", "abc", "ac", "a-long-c",
    ] {
        let ack = carol.send_msg(room, json!(room)).await;
        assert_ack(&ack, room);
    }
    for room in [
        "General", "general2", "xgeneral", "Team-x", "team", "xteam-a", "abd", "abcd", "bac",
    ] {
        carol
            .expect_error(
                json!({"type": "send", "room": room, "body": 1}),
                "forbidden",
            )
            .await;
        carol
            .expect_error(json!({"type": "join", "room": room}), "forbidden")
            .await;
    }

    let everything = token("dave", &["*"]);
    let mut dave = WsClient::connect_with(&server, Auth::Query(&everything)).await;
    for room in ["anything", "Z", "team-x", "a:b.c"] {
        dave.join(room, None).await;
        assert_ack(&dave.send_msg(room, json!(1)).await, room);
    }

    let nothing = token("erin", &[]);
    let mut erin = WsClient::connect_with(&server, Auth::Query(&nothing)).await;
    erin.expect_error(json!({"type": "join", "room": "general"}), "forbidden")
        .await;
}

async fn token_in_query_and_in_header(store: StoreKind) {
    let server = secured_server(store).await;
    let alice_token = token("alice", &["general"]);
    let bob_token = token("bob", &["general"]);
    let mut alice = WsClient::connect_with(&server, Auth::Query(&alice_token)).await;
    let mut bob = WsClient::connect_with(&server, Auth::Header(&bob_token)).await;
    alice.join("general", None).await;
    bob.join("general", None).await;
    alice.send_msg("general", json!("from alice")).await;
    bob.send_msg("general", json!("from bob")).await;
    for client in [&mut alice, &mut bob] {
        let messages = client.collect_messages("general", 2, RECV_DEADLINE).await;
        assert_eq!(messages[0]["from"], "alice", "{}", messages[0]);
        assert_eq!(messages[0]["body"], "from alice");
        assert_eq!(messages[1]["from"], "bob", "{}", messages[1]);
        assert_eq!(messages[1]["body"], "from bob");
    }
}

async fn dev_mode_clients_are_anonymous(store: StoreKind) {
    let server = dev_server(store).await;
    let mut one = WsClient::connect(&server).await;
    let mut two = WsClient::connect(&server).await;
    one.join("any-room", None).await;
    one.send_msg("any-room", json!(1)).await;
    two.send_msg("any-room", json!(2)).await;
    let messages = one.collect_messages("any-room", 2, RECV_DEADLINE).await;
    let names: Vec<&str> = messages
        .iter()
        .map(|m| m["from"].as_str().unwrap())
        .collect();
    for name in &names {
        let suffix = name
            .strip_prefix("anon-")
            .unwrap_or_else(|| panic!("dev-mode name {name:?} is not anon-xxxxxxxx"));
        assert_eq!(
            suffix.len(),
            8,
            "dev-mode name {name:?} is not anon-xxxxxxxx"
        );
    }
    assert_ne!(names[0], names[1], "each connection gets its own name");
}

async fn binary_frame_is_bad_request(store: StoreKind) {
    let server = dev_server(store).await;
    let mut client = WsClient::connect(&server).await;
    client
        .send_message(Message::binary(br#"{"type":"ping","ref":1}"#.to_vec()))
        .await;
    let error = client.expect_frame("error").await;
    assert_eq!(error["code"], "bad_request", "{error}");
    client.ping().await;
    client.join("general", None).await;
    assert_ack(
        &client.send_msg("general", json!("after binary")).await,
        "general",
    );
}

async fn oversized_frame_closes_1009_and_server_keeps_serving(store: StoreKind) {
    let server = dev_server(store).await;
    let mut bystander = WsClient::connect(&server).await;
    bystander.join("general", None).await;

    let mut offender = WsClient::connect(&server).await;
    offender.ping().await;
    let huge = json!({"type": "send", "room": "general", "body": "x".repeat(1 << 20)});
    if let Err(e) = offender
        .try_send_message(Message::text(huge.to_string()))
        .await
    {
        eprintln!("sending the 1 MiB frame failed ({e}); reading the close anyway");
    }
    let (end, frames) = offender.drain_until_end(RECV_DEADLINE).await;
    match end {
        Event::Closed { code, .. } => {
            assert_eq!(
                code,
                Some(1009),
                "a 1 MiB frame closes with 1009 (frames: {frames:?})"
            )
        }
        other => panic!("a 1 MiB frame should close with 1009, got {other:?} (frames: {frames:?})"),
    }

    // The server keeps serving the others, and new clients.
    bystander.ping().await;
    let mut newcomer = WsClient::connect(&server).await;
    let ack = newcomer.send_msg("general", json!("still here")).await;
    assert_eq!(ack["seq"], 1, "the oversized message was not stored: {ack}");
    let seen = bystander
        .collect_messages("general", 1, RECV_DEADLINE)
        .await;
    assert_eq!(seen[0]["body"], "still here");
}

async fn too_large_body_is_refused_and_connection_stays(store: StoreKind) {
    let server = dev_server(store).await;
    let mut client = WsClient::connect(&server).await;
    const LIMIT: usize = 65536;
    // A JSON string of n characters serializes to n + 2 bytes.
    let at_limit = json!("a".repeat(LIMIT - 2));
    let over_limit = json!("a".repeat(LIMIT - 1));
    assert_eq!(at_limit.to_string().len(), LIMIT);

    let error = client
        .expect_error(
            json!({"type": "send", "room": "general", "body": over_limit, "ref": 9}),
            "too_large",
        )
        .await;
    assert_eq!(error["ref"], 9);
    let ack = client.send_msg("general", at_limit.clone()).await;
    assert_eq!(ack["seq"], 1, "the refused body was not stored: {ack}");

    client.join("general", Some(0)).await;
    let stored = client.collect_messages("general", 1, RECV_DEADLINE).await;
    assert_eq!(stored[0]["body"], at_limit);
    client.ping().await;
    let room = Http::new(&server).room("general").await;
    assert_eq!(room["head"], 1, "{room}");
}
