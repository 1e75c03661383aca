//! The command line: `seqcast token` mints tokens the server accepts, and development mode (no
//! `SEQCAST_JWT_SECRET`) refuses to listen beyond loopback.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};

use support::server::{run_seqcast, ServerOptions, StoreKind, TestDatabase, TestServer};
use support::ws::{assert_ack, Auth, WsClient};

const SECRET: &str = "cli-test-secret";
const DEADLINE: Duration = Duration::from_secs(20);

/// Runs `seqcast token ARGS` with the secret and returns the printed token.
async fn mint(args: &[&str]) -> String {
    let mut all = vec!["token"];
    all.extend_from_slice(args);
    let (status, stdout, stderr) =
        run_seqcast(&all, &[("SEQCAST_JWT_SECRET", SECRET)], DEADLINE).await;
    assert!(
        status.success(),
        "seqcast {all:?} failed: {status}\n{stderr}"
    );
    let token = stdout.trim();
    assert_eq!(
        token.lines().count(),
        1,
        "one token on stdout, got {stdout:?}"
    );
    assert_eq!(
        token.split('.').count(),
        3,
        "a JWT has three parts: {token:?}"
    );
    token.to_owned()
}

fn verify(token: &str, secret: &str) -> jsonwebtoken::errors::Result<Value> {
    let validation = Validation::new(Algorithm::HS256);
    jsonwebtoken::decode::<Value>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map(|data| data.claims)
}

fn now() -> i64 {
    i64::try_from(jsonwebtoken::get_current_timestamp()).unwrap()
}

#[tokio::test]
async fn token_carries_the_claims_and_verifies_with_the_secret() {
    let token = mint(&[
        "--sub",
        "alice",
        "--rooms",
        "general,team-*",
        "--read",
        "news-*",
        "--ttl",
        "1h",
    ])
    .await;
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, Algorithm::HS256);
    let claims = verify(&token, SECRET).expect("the token verifies with SEQCAST_JWT_SECRET");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["rooms"], json!(["general", "team-*"]));
    assert_eq!(claims["read"], json!(["news-*"]));
    let exp = claims["exp"].as_i64().expect("numeric exp");
    assert!(
        (exp - (now() + 3600)).abs() <= 60,
        "--ttl 1h gives exp about an hour from now: exp {exp}, now {}",
        now()
    );
    assert!(
        verify(&token, "some-other-secret").is_err(),
        "the token must not verify with another secret"
    );
}

#[tokio::test]
async fn token_ttl_and_optional_read() {
    let token = mint(&["--sub", "bob", "--rooms", "*", "--ttl", "30m"]).await;
    let claims = verify(&token, SECRET).unwrap();
    assert_eq!(claims["sub"], "bob");
    assert_eq!(claims["rooms"], json!(["*"]));
    assert!(
        claims
            .get("read")
            .is_none_or(|r| r.is_null() || r == &json!([])),
        "no --read: no read patterns, got {claims}"
    );
    let exp = claims["exp"].as_i64().unwrap();
    assert!((exp - (now() + 1800)).abs() <= 60, "--ttl 30m: exp {exp}");

    let default_ttl = mint(&["--sub", "carol", "--rooms", "general"]).await;
    let claims = verify(&default_ttl, SECRET).unwrap();
    assert!(
        claims["exp"].as_i64().unwrap() > now(),
        "a default TTL in the future"
    );
}

#[tokio::test]
async fn token_without_a_secret_fails() {
    let (status, stdout, stderr) =
        run_seqcast(&["token", "--sub", "alice", "--rooms", "*"], &[], DEADLINE).await;
    assert!(
        !status.success(),
        "minting without SEQCAST_JWT_SECRET must fail, printed {stdout:?}"
    );
    assert!(!stderr.trim().is_empty(), "and say why on stderr");
}

#[tokio::test]
async fn a_minted_token_is_accepted_by_the_server() {
    let server = TestServer::start(ServerOptions::new(StoreKind::Sqlite).jwt_secret(SECRET)).await;
    let token = mint(&[
        "--sub",
        "alice",
        "--rooms",
        "general,team-*",
        "--read",
        "news-*",
    ])
    .await;
    let mut alice = WsClient::connect_with(&server, Auth::Header(&token)).await;
    alice.join("general", None).await;
    let ack = alice.send_msg("general", json!("hi")).await;
    assert_ack(&ack, "general");
    let message = alice
        .collect_messages("general", 1, Duration::from_secs(10))
        .await;
    assert_eq!(message[0]["from"], "alice");
    assert_ack(&alice.send_msg("team-x", json!(1)).await, "team-x");
    alice.join("news-1", None).await;
    alice
        .expect_error(
            json!({"type": "send", "room": "news-1", "body": 1}),
            "forbidden",
        )
        .await;
    alice
        .expect_error(json!({"type": "join", "room": "random"}), "forbidden")
        .await;
}

#[tokio::test]
async fn development_mode_refuses_non_loopback_addresses() {
    let database = TestDatabase::fresh(StoreKind::Sqlite).await;
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let (status, stdout, stderr) = run_seqcast(
            &[],
            &[
                ("SEQCAST_LISTEN", listen),
                ("DATABASE_URL", database.url.as_str()),
            ],
            DEADLINE,
        )
        .await;
        assert!(
            !status.success(),
            "dev mode must refuse SEQCAST_LISTEN={listen}; exited {status}, stdout {stdout:?}"
        );
        assert!(
            !stdout.contains("seqcast listening on"),
            "dev mode listened on {listen}: {stdout:?}"
        );
        assert!(
            !stderr.trim().is_empty(),
            "the refusal of {listen} is explained on stderr"
        );
    }
}
