//! Input a hostile (or careless) client controls, against the real binary: values the stores
//! cannot hold (U+0000), text that is not Unicode (lone surrogate escapes), token claims at the
//! edge of their range, and frames that cost the node work.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use support::server::{run_scenario, sign_claims, ServerOptions, StoreKind, TestServer};
use support::ws::{eventually, expect_rejected, metric_value, Auth, Http, WsClient, RECV_DEADLINE};

const SECRET: &str = "hostile-input-test-secret";
const API_KEY: &str = "hostile-input-test-api-key";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(sub: &str, exp: u64) -> String {
    sign_claims(&json!({"sub": sub, "exp": exp, "rooms": ["*"]}), SECRET)
}

async fn server(store: StoreKind, env: &[(&str, &str)]) -> TestServer {
    let mut options = ServerOptions::new(store)
        .jwt_secret(SECRET)
        .api_key(API_KEY);
    for (key, value) in env {
        options = options.env(*key, *value);
    }
    TestServer::start(options).await
}

store_tests!(nul_and_lone_surrogates_are_refused_at_the_edge);

/// U+0000 in an `idem` (WebSocket and HTTP), in a server-key `from` and in a token's `sub`, and a
/// lone surrogate escape in a body, are refused before they reach the database; a client
/// sending them while another sends does not fail the other's sends (on Postgres a NUL used to
/// fail the whole group commit it was in).
async fn nul_and_lone_surrogates_are_refused_at_the_edge(store: StoreKind) {
    // No rate limits: the point is many sends side by side.
    let limits_off = [("SEQCAST_SEND_RATE", "0"), ("SEQCAST_USER_SEND_RATE", "0")];
    let server = server(store, &limits_off).await;
    let alice_token = token("alice", now() + 3600);
    let mut alice = WsClient::connect_with(&server, Auth::Query(&alice_token)).await;
    for frame in [
        json!({"type": "send", "room": "r", "body": 1, "idem": "\u{0}"}),
        json!({"type": "send", "room": "r", "body": 1, "idem": "key\u{0}"}),
    ] {
        alice.expect_error(frame, "bad_request").await;
    }
    // Raw text: serde_json would not write a lone surrogate.
    for (reference, text) in [
        (
            "s1",
            r#"{"type":"send","room":"r","body":"\udead","ref":"s1"}"#,
        ),
        (
            "s2",
            r#"{"type":"send","room":"r","body":{"a":["\ud83d"]},"ref":"s2"}"#,
        ),
        (
            "s3",
            r#"{"type":"send","room":"r","body":1,"idem":"\udead","ref":"s3"}"#,
        ),
    ] {
        alice.send_text(text).await;
        let reply = alice.reply_to(&json!(reference)).await;
        assert_eq!(reply["code"], "bad_request", "{text}: {reply}");
    }
    // A pair is one character, and a NUL escape in a body is six ASCII characters: both fine.
    alice
        .send_text(r#"{"type":"send","room":"r","body":["\ud83d\ude00","\u0000"],"ref":"ok"}"#)
        .await;
    let ack = alice.reply_to(&json!("ok")).await;
    assert_eq!(ack["type"], "ack", "{ack}");

    let http = Http::new(&server).bearer(&alice_token);
    let path = "/v1/rooms/r/messages";
    http.post_json(path, &json!({"body": 1, "idem": "\u{0}"}))
        .await
        .assert_error(400, "bad_request");
    for raw in [r#"{"body":"\udead"}"#, r#"{"body":1,"idem":"\udead"}"#] {
        let reply = http
            .try_post_raw(path, raw.as_bytes().to_vec())
            .await
            .unwrap();
        reply.assert_error(400, "bad_request");
    }
    let server_key = Http::new(&server).bearer(API_KEY);
    server_key
        .post_json(path, &json!({"body": 1, "from": "bot\u{0}"}))
        .await
        .assert_error(400, "bad_request");
    let raw = br#"{"body":1,"from":"\udead"}"#.to_vec();
    server_key
        .try_post_raw(path, raw)
        .await
        .unwrap()
        .assert_error(400, "bad_request");

    let nul_sub = token("mallory\u{0}", now() + 3600);
    expect_rejected(&server, Auth::Query(&nul_sub), "a NUL in sub").await;
    Http::new(&server)
        .bearer(&nul_sub)
        .get("/v1/rooms/r")
        .await
        .assert_error(401, "unauthorized");
    let stored = http.room("r").await;
    assert_eq!(
        stored["head"], 1,
        "only the good message was stored: {stored}"
    );

    // The blast radius: bob's sends all succeed while alice sends NULs beside them.
    let bob_token = token("bob", now() + 3600);
    let mut bob = WsClient::connect_with(&server, Auth::Query(&bob_token)).await;
    const NULS: usize = 150;
    let nuls = async {
        for i in 0..NULS {
            let frame = json!({"type": "send", "room": "r", "body": i, "idem": "\u{0}", "ref": i});
            alice.send_json(frame).await;
        }
        for _ in 0..NULS {
            let reply = alice.recv_json().await;
            assert_eq!(reply["code"], "bad_request", "{reply}");
        }
    };
    let sends = bob.send_pipelined("r", 300, 32, Duration::from_secs(60), |i| json!(i));
    let ((), seqs) = tokio::join!(nuls, sends);
    assert_eq!(seqs.len(), 300, "every send of bob's was acknowledged");
}

/// A token whose `exp` no clock can hold (2^63 + 5) is accepted like any far-future token: the
/// session used to panic computing its deadline, with no close frame and its counters never
/// given back, so the user could not connect again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_an_enormous_exp_connects_and_frees_its_place() {
    run_scenario("a_token_with_an_enormous_exp", async {
        let server = server(
            StoreKind::Sqlite,
            &[("SEQCAST_MAX_CONNECTIONS_PER_USER", "1")],
        )
        .await;
        for exp in [(1_u64 << 63) + 5, u64::MAX] {
            let huge = token("alice", exp);
            let mut alice = connect_when_free(&server, &huge).await;
            alice.join("general", None).await;
            let ack = alice.send_msg("general", json!("hi")).await;
            let got = alice.collect_messages("general", 1, RECV_DEADLINE).await;
            assert_eq!(got[0]["seq"], ack["seq"]);
            // A refresh to another enormous exp moves the deadline the same way.
            let reply = alice.request(json!({"type": "auth", "token": huge})).await;
            assert_eq!(reply["type"], "authed", "{reply}");
            assert_eq!(reply["exp"], exp);
            alice.close().await;
        }
        // One place per user: it must have been given back each time.
        let normal = token("alice", now() + 3600);
        connect_when_free(&server, &normal).await.close().await;
        let http = Http::new(&server);
        eventually(RECV_DEADLINE, "no connection counted open", || async {
            let metrics = http.metrics().await;
            metric_value(&metrics, "seqcast_connections_open") == Some(0.0)
        })
        .await;
    })
    .await;
}

/// Connects as soon as the server admits the token's user: a closed connection's place is given
/// back when its session has ended, a moment after the client's close.
async fn connect_when_free(server: &TestServer, token: &str) -> WsClient {
    let until = Instant::now() + RECV_DEADLINE;
    loop {
        match WsClient::try_connect(&server.ws_url(), Auth::Query(token)).await {
            Ok(client) => return client,
            Err(e) if Instant::now() > until => {
                panic!("not admitted again within {RECV_DEADLINE:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// `auth` frames cost a signature check each: they are charged to the connection's rate like
/// `join`, so a flood of them is refused with `rate_limited` (they used to be free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_auth_frames_is_rate_limited() {
    run_scenario("a_flood_of_auth_frames_is_rate_limited", async {
        // Rate 10/s: a burst of 40, and 100 frames stay under the tenfold abuse cut-off.
        let server = server(StoreKind::Sqlite, &[("SEQCAST_SEND_RATE", "10")]).await;
        let token = token("alice", now() + 3600);
        let mut alice = WsClient::connect_with(&server, Auth::Query(&token)).await;
        const FRAMES: u64 = 100;
        for i in 0..FRAMES {
            alice
                .send_json(json!({"type": "auth", "token": token, "ref": i}))
                .await;
        }
        let (mut authed, mut limited) = (0, 0);
        for _ in 0..FRAMES {
            let reply = alice.recv_json().await;
            match (reply["type"].as_str(), reply["code"].as_str()) {
                (Some("authed"), _) => authed += 1,
                (Some("error"), Some("rate_limited")) => limited += 1,
                _ => panic!("unexpected reply {reply}"),
            }
        }
        assert!(authed >= 40, "the burst is allowed: {authed} authed");
        assert!(
            limited >= 40,
            "past the burst, refused: {limited} of {FRAMES}"
        );
        alice.ping().await;
    })
    .await;
}
