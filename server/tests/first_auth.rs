//! First-frame authentication (contract v1.1, "First-frame authentication"; docs/protocol.md): a
//! WebSocket opened without a token on a node that requires tokens sends `auth` as its first
//! frame, so browsers need not put the token in the URL. Against the real binary (SQLite: token
//! handling does not touch the store).
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use support::check::assert_ack;
use support::server::{run_scenario, Claims, ServerOptions, StoreKind, TestServer};
use support::ws::{Auth, Event, WsClient, RECV_DEADLINE};

const SECRET: &str = "first-auth-test-secret";
const API_KEY: &str = "first-auth-test-api-key";

async fn secured(extra: &[(&str, &str)]) -> TestServer {
    let mut options = ServerOptions::new(StoreKind::Sqlite)
        .jwt_secret(SECRET)
        .api_key(API_KEY);
    for (key, value) in extra {
        options = options.env(*key, *value);
    }
    TestServer::start(options).await
}

/// A connection without a token: the upgrade itself must succeed.
async fn tokenless(server: &TestServer) -> WsClient {
    WsClient::try_connect(&server.ws_url(), Auth::None)
        .await
        .expect("a WebSocket without a token is accepted, to authenticate in its first frame")
}

/// Asserts the next frames are one `error` with `code` (and `ref`, when given), then close
/// `close`; returns the error frame.
async fn expect_refusal(client: &mut WsClient, code: &str, reply_ref: Option<Value>, close: u16) {
    let (end, frames) = client.drain_until_end(RECV_DEADLINE).await;
    assert_eq!(
        frames.len(),
        1,
        "one error frame before the close: {frames:?}"
    );
    let error = &frames[0];
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], code, "{error}");
    if let Some(reply_ref) = reply_ref {
        assert_eq!(
            error["ref"], reply_ref,
            "the error answers the frame: {error}"
        );
    }
    match end {
        Event::Closed { code, .. } => assert_eq!(code, Some(close), "close code"),
        other => panic!("expected close {close}, got {other:?}"),
    }
}

#[tokio::test]
async fn an_auth_first_frame_authenticates_the_connection() {
    run_scenario("an_auth_first_frame_authenticates_the_connection", async {
        let server = secured(&[]).await;
        let claims = Claims::new("alice", &["general"]).expires_in(3600);
        let exp = claims.to_json()["exp"].as_u64().unwrap();
        let mut client = tokenless(&server).await;
        client
            .send_json(json!({"type": "auth", "token": claims.sign(SECRET), "ref": "a1"}))
            .await;
        let authed = client.recv_json().await;
        assert_eq!(authed, json!({"type": "authed", "exp": exp, "ref": "a1"}));

        // The connection now acts as alice, with alice's rooms.
        client.join("general", Some(0)).await;
        let ack = client.send_msg("general", json!("hello")).await;
        assert_ack(&ack, "general");
        let message = client.expect_frame("message").await;
        assert_eq!(message["from"], "alice");
        client
            .expect_error(json!({"type": "join", "room": "secret"}), "forbidden")
            .await;

        // A later `auth` is a refresh, as on any connection.
        let fresh = Claims::new("alice", &["general"])
            .expires_in(7200)
            .sign(SECRET);
        let reply = client
            .request(json!({"type": "auth", "token": fresh}))
            .await;
        assert_eq!(reply["type"], "authed", "{reply}");

        // The server key authenticates the same way.
        let mut backend = tokenless(&server).await;
        backend
            .send_json(json!({"type": "auth", "token": API_KEY, "ref": 1}))
            .await;
        assert_eq!(
            backend.recv_json().await,
            json!({"type": "authed", "ref": 1})
        );
        backend.join("anything", None).await;
    })
    .await;
}

#[tokio::test]
async fn any_other_first_frame_is_refused_with_1008() {
    run_scenario("any_other_first_frame_is_refused_with_1008", async {
        let server = secured(&[]).await;
        for (first, reply_ref) in [
            (
                json!({"type": "join", "room": "general", "ref": 7}),
                Some(json!(7)),
            ),
            (
                json!({"type": "send", "room": "general", "body": 1, "ref": "s"}),
                Some(json!("s")),
            ),
            (json!({"type": "ping", "ref": 9}), Some(json!(9))),
            (json!({"type": "auth", "ref": 3}), Some(json!(3))),
            (json!({"type": "nonsense"}), None),
        ] {
            let mut client = tokenless(&server).await;
            client.send_json(first.clone()).await;
            expect_refusal(&mut client, "unauthorized", reply_ref, 1008).await;
        }
        // Not JSON, and binary.
        let mut client = tokenless(&server).await;
        client.send_text("{not json").await;
        expect_refusal(&mut client, "unauthorized", None, 1008).await;
        let mut client = tokenless(&server).await;
        client
            .send_message(Message::Binary(vec![1, 2, 3].into()))
            .await;
        expect_refusal(&mut client, "unauthorized", None, 1008).await;

        // Nothing was stored by the refused send.
        let mut reader = WsClient::connect_with(&server, Auth::Header(API_KEY)).await;
        let joined = reader.join("general", Some(0)).await;
        assert_eq!(joined["head"], 0, "{joined}");
    })
    .await;
}

#[tokio::test]
async fn a_bad_token_in_the_auth_frame_is_refused_with_1008() {
    run_scenario(
        "a_bad_token_in_the_auth_frame_is_refused_with_1008",
        async {
            let server = secured(&[]).await;
            let expired = Claims::new("alice", &["*"]).expires_in(-600).sign(SECRET);
            let forged = Claims::new("alice", &["*"]).sign("not-the-secret");
            for token in [expired.as_str(), forged.as_str(), "garbage", ""] {
                let mut client = tokenless(&server).await;
                client
                    .send_json(json!({"type": "auth", "token": token, "ref": "t"}))
                    .await;
                expect_refusal(&mut client, "unauthorized", Some(json!("t")), 1008).await;
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_connection_that_never_authenticates_is_closed_after_the_handshake_timeout() {
    run_scenario(
        "a_connection_that_never_authenticates_is_closed_after_the_handshake_timeout",
        async {
            let server = secured(&[("SEQCAST_HANDSHAKE_TIMEOUT", "1s")]).await;
            let opened = Instant::now();
            let mut client = tokenless(&server).await;
            // A WebSocket ping is not a frame of the protocol: it neither authenticates nor
            // extends the wait.
            client.send_message(Message::Ping(vec![1].into())).await;
            expect_refusal(&mut client, "unauthorized", None, 1008).await;
            let waited = opened.elapsed();
            assert!(
                waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
                "closed {waited:?} after opening; the handshake timeout is 1 s"
            );
        },
    )
    .await;
}

#[tokio::test]
async fn the_per_user_connection_limit_applies_once_the_auth_frame_names_the_user() {
    run_scenario(
        "the_per_user_connection_limit_applies_once_the_auth_frame_names_the_user",
        async {
            let server = secured(&[("SEQCAST_MAX_CONNECTIONS_PER_USER", "1")]).await;
            let alice = Claims::new("alice", &["*"]).sign(SECRET);
            let mut first = WsClient::connect_with(&server, Auth::Header(&alice)).await;
            first.ping().await;

            let mut second = tokenless(&server).await;
            second
                .send_json(json!({"type": "auth", "token": alice, "ref": 1}))
                .await;
            expect_refusal(&mut second, "limit_exceeded", Some(json!(1)), 1013).await;

            // Another user is not affected; and alice's slot is free again once she leaves.
            let bob = Claims::new("bob", &["*"]).sign(SECRET);
            let mut other = tokenless(&server).await;
            other.send_json(json!({"type": "auth", "token": bob})).await;
            assert_eq!(other.recv_json().await["type"], "authed");
            first.close().await;
            let deadline = Instant::now() + RECV_DEADLINE;
            loop {
                let mut again = tokenless(&server).await;
                again
                    .send_json(json!({"type": "auth", "token": alice}))
                    .await;
                match again.next_event(RECV_DEADLINE).await {
                    Some(Event::Frame(frame)) if frame["type"] == "authed" => break,
                    other => assert!(
                        Instant::now() < deadline,
                        "alice's slot not freed after her connection closed: {other:?}"
                    ),
                }
            }
        },
    )
    .await;
}

#[tokio::test]
async fn development_mode_needs_no_auth_frame_and_accepts_one() {
    run_scenario(
        "development_mode_needs_no_auth_frame_and_accepts_one",
        async {
            let server = TestServer::start(ServerOptions::new(StoreKind::Sqlite)).await;
            // A client library always sends `auth` first; in development mode it changes nothing.
            let mut client = tokenless(&server).await;
            client
                .send_json(json!({"type": "auth", "token": "anything", "ref": 1}))
                .await;
            assert_eq!(
                client.recv_json().await,
                json!({"type": "authed", "ref": 1})
            );
            client.join("general", None).await;
            // And without it the connection serves at once.
            let mut plain = tokenless(&server).await;
            plain.join("general", None).await;

            // `dev:NAME` picks the name (the demo page): in the first frame, or with the upgrade.
            let mut bob = tokenless(&server).await;
            bob.send_json(json!({"type": "auth", "token": "dev:bob", "ref": 2}))
                .await;
            assert_eq!(bob.recv_json().await, json!({"type": "authed", "ref": 2}));
            let carol_url = format!("{}?token=dev:carol", server.ws_url());
            let mut carol = WsClient::try_connect(&carol_url, Auth::None).await.unwrap();
            for (client, name) in [(&mut bob, "bob"), (&mut carol, "carol")] {
                client.join("general", None).await;
                client.send_msg("general", json!(name)).await;
                let message = client.expect_frame("message").await;
                assert_eq!(message["from"], name, "{message}");
            }
            // Names that are not allowed leave the client anonymous: not the server key's name,
            // not an empty or odd one.
            for token in ["dev:system", "dev:", "dev:a b", "dev:<script>"] {
                let mut client = tokenless(&server).await;
                client
                    .send_json(json!({"type": "auth", "token": token}))
                    .await;
                assert_eq!(client.recv_json().await["type"], "authed");
                client.join("odd", None).await;
                client.send_msg("odd", json!(token)).await;
                let message = client.expect_frame("message").await;
                let from = message["from"].as_str().unwrap();
                assert!(from.starts_with("anon-"), "{token}: sent as {from}");
            }
        },
    )
    .await;
}
