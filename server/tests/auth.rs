//! Tokens (`SEQCAST_JWT_SECRET`, `SEQCAST_JWT_PUBLIC_KEY`, `_AUDIENCE`, `_ISSUER`, `_LEEWAY`) and
//! the `auth` frame, against the real binary (SQLite: token handling does not touch the store).
//!
//! RSA and EC keys are generated per test run with the `openssl` command-line tool.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use support::server::{
    run_scenario, run_seqcast, sign_claims, unsigned_token, ServerOptions, StoreKind, TestServer,
};
use support::ws::{expect_rejected, Auth, Event, Http, WsClient, RECV_DEADLINE};

const SECRET: &str = "auth-test-secret";
const API_KEY: &str = "auth-test-api-key";
const AUDIENCE: &str = "seqcast-test";
const ISSUER: &str = "https://issuer.test";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A key pair made by `openssl` in a temporary directory: `private.pem` (PKCS#8) signs test
/// tokens, `public.pem` is what the server is given.
struct KeyPair {
    dir: tempfile::TempDir,
    alg: Algorithm,
}

impl KeyPair {
    fn rsa() -> KeyPair {
        KeyPair::generate(
            Algorithm::RS256,
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        )
    }

    fn p256() -> KeyPair {
        KeyPair::generate(
            Algorithm::ES256,
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        )
    }

    fn generate(alg: Algorithm, genpkey_args: &[&str]) -> KeyPair {
        let dir = tempfile::Builder::new()
            .prefix("seqcast-keys-")
            .tempdir()
            .unwrap();
        let private = dir.path().join("private.pem");
        let public = dir.path().join("public.pem");
        openssl(&[&["genpkey"], genpkey_args, &["-out", path(&private)]].concat());
        openssl(&[
            "pkey",
            "-in",
            path(&private),
            "-pubout",
            "-out",
            path(&public),
        ]);
        KeyPair { dir, alg }
    }

    fn public_path(&self) -> PathBuf {
        self.dir.path().join("public.pem")
    }

    fn public_pem(&self) -> Vec<u8> {
        std::fs::read(self.public_path()).unwrap()
    }

    /// Signs `claims` with the private key, under the key's own algorithm.
    fn sign(&self, claims: &Value) -> String {
        let pem = std::fs::read(self.dir.path().join("private.pem")).unwrap();
        let key = match self.alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        jsonwebtoken::encode(&Header::new(self.alg), claims, &key).unwrap()
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn openssl(args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("these tests generate keys with the `openssl` command, which failed to run: {e}")
        });
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Claims every server here accepts: `aud` and `iss` as configured, valid for an hour.
fn claims(sub: &str, rooms: &[&str]) -> Value {
    json!({"sub": sub, "exp": now() + 3600, "rooms": rooms, "aud": AUDIENCE, "iss": ISSUER})
}

/// Claims with one field replaced (`null` removes it).
fn with(mut claims: Value, field: &str, value: Value) -> Value {
    if value.is_null() {
        claims.as_object_mut().unwrap().remove(field);
    } else {
        claims[field] = value;
    }
    claims
}

/// A server with the HS256 secret, the RSA public key, audience and issuer, and a 1 s leeway.
async fn strict_server(rsa: &KeyPair) -> TestServer {
    TestServer::start(
        ServerOptions::new(StoreKind::Sqlite)
            .jwt_secret(SECRET)
            .api_key(API_KEY)
            .env("SEQCAST_JWT_PUBLIC_KEY", path(&rsa.public_path()))
            .env("SEQCAST_JWT_AUDIENCE", AUDIENCE)
            .env("SEQCAST_JWT_ISSUER", ISSUER)
            .env("SEQCAST_JWT_LEEWAY", "1s"),
    )
    .await
}

/// The token opens a working connection.
async fn expect_accepted(server: &TestServer, token: &str, what: &str) -> WsClient {
    let mut client = WsClient::try_connect(&server.ws_url(), Auth::Header(token))
        .await
        .unwrap_or_else(|e| panic!("{what}: handshake failed: {e}"));
    let reply = client.request(json!({"type": "ping"})).await;
    assert_eq!(reply["type"], "pong", "{what}: {reply}");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_kind_is_refused_with_1008() {
    run_scenario("every_bad_token_kind_is_refused_with_1008", async {
        let rsa = KeyPair::rsa();
        let other_rsa = KeyPair::rsa();
        let server = strict_server(&rsa).await;
        let good = claims("alice", &["*"]);
        let t = now();
        let public_pem = String::from_utf8(rsa.public_pem()).unwrap();

        let bad: Vec<(&str, String)> = vec![
            ("alg none", unsigned_token(&good)),
            (
                "algorithm confusion: HS256 keyed with the public key file",
                sign_claims(&good, &public_pem),
            ),
            (
                "missing exp",
                sign_claims(&with(good.clone(), "exp", Value::Null), SECRET),
            ),
            (
                "exp as a string",
                sign_claims(
                    &with(good.clone(), "exp", json!((t + 3600).to_string())),
                    SECRET,
                ),
            ),
            (
                "nbf as a string",
                sign_claims(&with(good.clone(), "nbf", json!(t.to_string())), SECRET),
            ),
            (
                "nbf in the future (beyond the leeway)",
                sign_claims(&with(good.clone(), "nbf", json!(t + 60)), SECRET),
            ),
            (
                "expired beyond the leeway",
                sign_claims(&with(good.clone(), "exp", json!(t - 5)), SECRET),
            ),
            (
                "wrong aud",
                sign_claims(&with(good.clone(), "aud", json!("another-service")), SECRET),
            ),
            (
                "missing aud",
                sign_claims(&with(good.clone(), "aud", Value::Null), SECRET),
            ),
            (
                "wrong iss",
                sign_claims(
                    &with(good.clone(), "iss", json!("https://evil.test")),
                    SECRET,
                ),
            ),
            (
                "missing iss",
                sign_claims(&with(good.clone(), "iss", Value::Null), SECRET),
            ),
            ("wrong HS256 secret", sign_claims(&good, "not-the-secret")),
            ("RS256 signed by another key", other_rsa.sign(&good)),
            (
                "missing sub",
                sign_claims(&with(good.clone(), "sub", Value::Null), SECRET),
            ),
            ("garbage", "garbage".to_owned()),
            ("three garbage parts", "a.b.c".to_owned()),
        ];
        for (what, token) in &bad {
            expect_rejected(&server, Auth::Query(token), what).await;
        }

        // Both keys are in force at once, each for its own algorithm.
        expect_accepted(&server, &sign_claims(&good, SECRET), "HS256").await;
        expect_accepted(&server, &rsa.sign(&good), "RS256").await;
        // Within the leeway (1 s) on nbf.
        let early = with(good.clone(), "nbf", json!(now() + 1));
        expect_accepted(
            &server,
            &sign_claims(&early, SECRET),
            "nbf within the leeway",
        )
        .await;

        // `seqcast token` signs with the secret and adds the configured aud and iss.
        let env = [
            ("SEQCAST_JWT_SECRET", SECRET),
            ("SEQCAST_JWT_AUDIENCE", AUDIENCE),
            ("SEQCAST_JWT_ISSUER", ISSUER),
        ];
        let (status, stdout, stderr) =
            run_seqcast(&["token", "--sub", "carol"], &env, Duration::from_secs(10)).await;
        assert!(status.success(), "seqcast token: {stderr}");
        expect_accepted(&server, stdout.trim(), "seqcast token").await;

        // HTTP checks tokens the same way.
        let http = Http::new(&server);
        let reply = http
            .bearer(&unsigned_token(&good))
            .get("/v1/rooms/general")
            .await;
        reply.assert_error(401, "unauthorized");
        let reply = http.bearer(&rsa.sign(&good)).get("/v1/rooms/general").await;
        assert_eq!(reply.status, 200, "{reply:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_key_alone_pins_its_algorithm() {
    run_scenario("a_public_key_alone_pins_its_algorithm", async {
        let rsa = KeyPair::rsa();
        let ec = KeyPair::p256();
        let plain = |sub: &str| json!({"sub": sub, "exp": now() + 3600, "rooms": ["*"]});

        let rsa_server = TestServer::start(
            ServerOptions::new(StoreKind::Sqlite)
                .env("SEQCAST_JWT_PUBLIC_KEY", path(&rsa.public_path())),
        )
        .await;
        let mut alice = expect_accepted(&rsa_server, &rsa.sign(&plain("alice")), "RS256").await;
        let ack = alice.send_msg("general", json!("hi")).await;
        assert_eq!(ack["seq"], 1);
        let rsa_pem = String::from_utf8(rsa.public_pem()).unwrap();
        for (what, token) in [
            ("ES256 on an RSA key", ec.sign(&plain("alice"))),
            (
                "HS256 keyed with the public key",
                sign_claims(&plain("alice"), &rsa_pem),
            ),
            (
                "HS256 with any secret",
                sign_claims(&plain("alice"), SECRET),
            ),
            ("alg none", unsigned_token(&plain("alice"))),
        ] {
            expect_rejected(&rsa_server, Auth::Query(&token), what).await;
        }
        // The public key ends development mode: no anonymous clients.
        expect_rejected(&rsa_server, Auth::Query(""), "no token").await;

        let ec_server = TestServer::start(
            ServerOptions::new(StoreKind::Sqlite)
                .env("SEQCAST_JWT_PUBLIC_KEY", path(&ec.public_path())),
        )
        .await;
        expect_accepted(&ec_server, &ec.sign(&plain("bob")), "ES256").await;
        let ec_pem = String::from_utf8(ec.public_pem()).unwrap();
        for (what, token) in [
            ("RS256 on an EC key", rsa.sign(&plain("bob"))),
            (
                "HS256 keyed with the public key",
                sign_claims(&plain("bob"), &ec_pem),
            ),
        ] {
            expect_rejected(&ec_server, Auth::Query(&token), what).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_key_file_stops_start_up() {
    run_scenario("a_bad_key_file_stops_start_up", async {
        let rsa = KeyPair::rsa();
        let dir = tempfile::Builder::new()
            .prefix("seqcast-badkey-")
            .tempdir()
            .unwrap();
        let db = format!("sqlite://{}", dir.path().join("seqcast.db").display());
        let p384 = KeyPair::generate(
            Algorithm::ES384,
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
        );
        let missing = dir.path().join("missing.pem");
        let private = rsa.dir.path().join("private.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a key").unwrap();
        for (what, file, expected) in [
            ("a missing file", path(&missing), "cannot read"),
            ("a private key", path(&private), "private key"),
            ("an EC key on P-384", path(&p384.public_path()), "P-256"),
            ("not PEM", path(&garbage), "PEM"),
        ] {
            let env = [
                ("DATABASE_URL", db.as_str()),
                ("SEQCAST_LISTEN", "127.0.0.1:0"),
                ("SEQCAST_JWT_PUBLIC_KEY", file),
            ];
            let (status, stdout, stderr) = run_seqcast(&[], &env, Duration::from_secs(20)).await;
            assert!(
                !status.success(),
                "{what}: the server must not start (stdout {stdout:?})"
            );
            assert!(
                stderr.contains("SEQCAST_JWT_PUBLIC_KEY") && stderr.contains(expected),
                "{what}: the error names the setting and says {expected:?}: {stderr}"
            );
        }
    })
    .await;
}

/// A refresh with the same `sub` is answered `authed` with the new `exp`; rooms the new token
/// does not allow are left with `"reason":"forbidden"`. A token for another user is `forbidden`
/// and an invalid one `unauthorized`; both leave the old token in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_frame_refreshes_the_token() {
    run_scenario("auth_frame_refreshes_the_token", async {
        let server = TestServer::start(
            ServerOptions::new(StoreKind::Sqlite)
                .jwt_secret(SECRET)
                .api_key(API_KEY),
        )
        .await;
        let token = |sub: &str, rooms: &[&str], exp: u64| {
            sign_claims(&json!({"sub": sub, "exp": exp, "rooms": rooms}), SECRET)
        };
        let first_exp = now() + 3600;
        let mut alice = WsClient::connect_with(
            &server,
            Auth::Query(&token("alice", &["general", "team-*"], first_exp)),
        )
        .await;
        alice.join("general", None).await;
        alice.join("team-a", None).await;

        // Another user's valid token: forbidden, nothing changes.
        let reply = alice
            .expect_error(
                json!({"type": "auth", "token": token("bob", &["*"], now() + 7200), "ref": "b"}),
                "forbidden",
            )
            .await;
        assert_eq!(reply["ref"], "b");
        // An invalid token: unauthorized, nothing changes.
        let reply = alice
            .expect_error(
                json!({"type": "auth", "token": sign_claims(&json!({"sub": "alice", "exp": now() + 60}), "wrong"), "ref": 1}),
                "unauthorized",
            )
            .await;
        assert_eq!(reply["ref"], 1);
        alice
            .expect_error(
                json!({"type": "auth", "token": token("alice", &["*"], now() - 600)}),
                "unauthorized",
            )
            .await;
        alice
            .expect_error(json!({"type": "auth"}), "bad_request")
            .await;
        // The old token is still in force: team-* rooms can be joined.
        alice.join("team-b", None).await;

        // Same user, fewer rooms: team-a and team-b are left, then `authed`.
        let second_exp = now() + 7200;
        alice
            .send_json(json!({"type": "auth", "token": token("alice", &["general"], second_exp), "ref": 7}))
            .await;
        let mut left = Vec::new();
        let authed = loop {
            let frame = alice.recv_json().await;
            match frame["type"].as_str() {
                Some("left") => {
                    assert_eq!(frame["reason"], "forbidden", "{frame}");
                    assert!(frame.get("ref").is_none(), "an unasked-for left has no ref: {frame}");
                    left.push(frame["room"].as_str().unwrap().to_owned());
                }
                Some("authed") => break frame,
                _ => panic!("expected left frames then authed, got {frame}"),
            }
        };
        left.sort();
        assert_eq!(left, ["team-a", "team-b"]);
        assert_eq!(authed, json!({"type": "authed", "exp": second_exp, "ref": 7}));

        // The new token governs from now on.
        alice
            .expect_error(json!({"type": "join", "room": "team-a"}), "forbidden")
            .await;
        alice
            .expect_error(json!({"type": "send", "room": "team-a", "body": 1}), "forbidden")
            .await;
        alice
            .expect_error(json!({"type": "leave", "room": "team-a"}), "not_joined")
            .await;
        // Still joined to general: a message there arrives; nothing from team-a does.
        let http = Http::new(&server).bearer(API_KEY);
        http.post_message("team-a", &json!({"body": "secret"})).await;
        http.post_message("general", &json!({"body": "hello"})).await;
        let messages = alice.collect_messages("general", 1, RECV_DEADLINE).await;
        assert_eq!(messages[0]["body"], "hello");
        let rest = alice.frames_until_pong().await;
        assert!(rest.is_empty(), "nothing else arrives: {rest:?}");

        // The server key refreshes as itself, and never expires.
        let mut system = WsClient::connect_with(&server, Auth::Header(API_KEY)).await;
        let reply = system
            .request(json!({"type": "auth", "token": API_KEY}))
            .await;
        assert_eq!(reply["type"], "authed", "{reply}");
        assert!(reply.get("exp").is_none(), "{reply}");
        system
            .expect_error(
                json!({"type": "auth", "token": token("system", &["*"], now() + 60)}),
                "forbidden",
            )
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_accepts_auth_frames_without_change() {
    run_scenario("dev_mode_accepts_auth_frames_without_change", async {
        let server = TestServer::start(ServerOptions::new(StoreKind::Sqlite)).await;
        let mut client = WsClient::connect(&server).await;
        let reply = client
            .request(json!({"type": "auth", "token": "anything", "ref": "x"}))
            .await;
        assert_eq!(reply, json!({"type": "authed", "ref": "x"}));
        client.join("general", None).await;
        let ack = client.send_msg("general", json!(1)).await;
        let message = client.collect_messages("general", 1, RECV_DEADLINE).await;
        assert_eq!(message[0]["seq"], ack["seq"]);
        assert!(
            message[0]["from"].as_str().unwrap().starts_with("anon-"),
            "still anonymous: {}",
            message[0]
        );
    })
    .await;
}

/// Seconds since the epoch, with a fraction.
fn now_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

async fn short_leeway_server() -> TestServer {
    TestServer::start(
        ServerOptions::new(StoreKind::Sqlite)
            .jwt_secret(SECRET)
            .env("SEQCAST_JWT_LEEWAY", "1s"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_token_closes_1008_after_the_leeway() {
    run_scenario("an_expiring_token_closes_1008_after_the_leeway", async {
        let server = short_leeway_server().await;
        let exp = now() + 2;
        let token = sign_claims(&json!({"sub": "alice", "exp": exp, "rooms": ["*"]}), SECRET);
        let mut alice = WsClient::connect_with(&server, Auth::Query(&token)).await;
        alice.join("general", None).await;

        let (end, frames) = alice.drain_until_end(Duration::from_secs(10)).await;
        let closed_at = now_f64();
        let deadline = exp as f64 + 1.0; // exp + leeway
        assert!(
            closed_at >= deadline - 0.2,
            "closed {:.2} s before exp + leeway",
            deadline - closed_at
        );
        assert!(
            closed_at <= deadline + 2.0,
            "closed {:.2} s after exp + leeway",
            closed_at - deadline
        );
        assert!(
            frames
                .iter()
                .any(|f| f["type"] == "error" && f["code"] == "unauthorized"),
            "an `unauthorized` error precedes the close: {frames:?}"
        );
        match end {
            Event::Closed { code, .. } => assert_eq!(code, Some(1008)),
            other => panic!("expected close 1008, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_token_outlives_the_old_expiry() {
    run_scenario("a_refreshed_token_outlives_the_old_expiry", async {
        let server = short_leeway_server().await;
        let old_exp = now() + 2;
        let old = sign_claims(
            &json!({"sub": "alice", "exp": old_exp, "rooms": ["*"]}),
            SECRET,
        );
        let mut alice = WsClient::connect_with(&server, Auth::Query(&old)).await;
        alice.join("general", None).await;
        let new_exp = now() + 600;
        let fresh = sign_claims(
            &json!({"sub": "alice", "exp": new_exp, "rooms": ["*"]}),
            SECRET,
        );
        let reply = alice.request(json!({"type": "auth", "token": fresh})).await;
        assert_eq!(reply["type"], "authed", "{reply}");
        assert_eq!(reply["exp"], new_exp);

        // Well past the old exp + leeway (3 s from the start), nothing arrives: no error, no close.
        let quiet_until = old_exp as f64 + 1.0 + 2.0;
        let wait = Duration::from_secs_f64((quiet_until - now_f64()).max(0.0));
        let event = alice.next_event(wait).await;
        assert!(event.is_none(), "the connection must stay open: {event:?}");
        let ack = alice.send_msg("general", json!("still here")).await;
        let message = alice.collect_messages("general", 1, RECV_DEADLINE).await;
        assert_eq!(message[0]["seq"], ack["seq"]);
        assert_eq!(message[0]["from"], "alice");
    })
    .await;
}

/// A refresh that arrived before the token's deadline wins over the deadline, even when the
/// session handles it only afterwards: here the session is stuck writing to a client that does
/// not read (tens of MB of messages wait for it) when the refresh comes in, and the deadline
/// passes before the client reads again. Expiry used to win that race (the timer came first in
/// the session's `select!`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_queued_before_the_deadline_beats_it() {
    run_scenario("a_refresh_queued_before_the_deadline_beats_it", async {
        let server = TestServer::start(
            ServerOptions::new(StoreKind::Sqlite)
                .jwt_secret(SECRET)
                .api_key(API_KEY)
                .write_timeout("60s")
                .env("SEQCAST_JWT_LEEWAY", "1s"),
        )
        .await;
        let exp = now() + 8;
        let claims = |exp: u64| json!({"sub": "alice", "exp": exp, "rooms": ["*"]});
        let token = sign_claims(&claims(exp), SECRET);
        let mut alice = WsClient::connect_with(&server, Auth::Query(&token)).await;
        alice.join("big", None).await;

        // Far more than the socket buffers hold: alice's session blocks writing to her.
        const MESSAGES: usize = 600;
        let body = "x".repeat(60_000);
        let mut writer = WsClient::connect_with(&server, Auth::Query(API_KEY)).await;
        writer
            .send_pipelined("big", MESSAGES, 32, Duration::from_secs(60), |_| {
                json!(body)
            })
            .await;
        let fresh = sign_claims(&claims(now() + 600), SECRET);
        alice
            .send_json(json!({"type": "auth", "token": fresh, "ref": "refresh"}))
            .await;
        assert!(
            now() < exp,
            "the construction took too long: the refresh must go out before the deadline"
        );
        // Not reading until the deadline (exp + 1 s leeway) has surely passed.
        let after_deadline = Duration::from_secs_f64((exp as f64 + 2.5 - now_f64()).max(0.0));
        tokio::time::sleep(after_deadline).await;

        let mut messages = 0;
        loop {
            match alice.next_event(RECV_DEADLINE).await {
                Some(Event::Frame(f)) if f["type"] == "message" => messages += 1,
                Some(Event::Frame(f)) if f["ref"] == "refresh" => {
                    assert_eq!(f["type"], "authed", "{f}");
                    break;
                }
                other => panic!("after {messages} messages: {other:?}"),
            }
        }
        assert!(
            messages > 0,
            "the session was not blocked writing; the test proves nothing"
        );
        alice.ping().await;
    })
    .await;
}
