//! The command line: `seqcast token` mints tokens the server accepts, development mode (no
//! `SEQCAST_JWT_SECRET`) refuses to listen beyond loopback, and `seqcast health` tells a ready
//! node from one that is not. (`seqcast migrate` is tested in `startup.rs`.)
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};

use support::check::{assert_ack, eventually};
use support::server::{run_seqcast, ServerOptions, StoreKind, TestDatabase, TestServer};
use support::ws::{Auth, WsClient};

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

/// The README's quick start, run exactly as written: its first shell command (`cargo run
/// --release`) from the repository root must build and start the server. A workspace with two
/// binaries once made it stop at "could not determine which binary to run".
///
/// Only the environment is adjusted, never the command: `SEQCAST_LISTEN=127.0.0.1:0` (the README's
/// 8080 may be taken on a test machine; the server prints the port it got) and a throwaway SQLite
/// `DATABASE_URL` (the default `seqcast.db` would land in the checkout). It is the one test that
/// builds the release binary: about 9 minutes on a busy 2-core machine from a cold release cache,
/// seconds when it is current. A cheaper check (`cargo metadata`, `--bin`) would not run what the
/// README tells a newcomer to run. In the broken case it fails at once: cargo refuses before
/// building anything.
#[tokio::test]
async fn the_readme_quick_start_command_serves() {
    // A fresh clone builds every dependency in release mode first.
    const BUILD_AND_START: Duration = Duration::from_secs(30 * 60);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let command = readme_first_command(&readme);
    assert!(
        command.starts_with("cargo run"),
        "the README's first command is expected to start the server: {command:?}"
    );

    let database = TestDatabase::fresh(StoreKind::Sqlite).await;
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c").arg(&command).current_dir(root);
    for (key, _) in std::env::vars() {
        if key.starts_with("SEQCAST_") || key == "DATABASE_URL" || key == "REDIS_URL" {
            cmd.env_remove(key);
        }
    }
    cmd.env("SEQCAST_LISTEN", "127.0.0.1:0")
        .env("DATABASE_URL", &database.url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // Its own process group, so the guard ends `sh`, cargo and the server together.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().unwrap();
    let guard = GroupGuard(child.id());

    let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let err_pipe = child.stderr.take().unwrap();
    let err_lines = stderr.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(err_pipe)
            .lines()
            .map_while(Result::ok)
        {
            err_lines.lock().unwrap().push(line);
        }
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let out_pipe = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out_pipe)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let tail = |stderr: &std::sync::Mutex<Vec<String>>| {
        let lines = stderr.lock().unwrap();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    let addr = tokio::time::timeout(BUILD_AND_START, async {
        while let Some(line) = rx.recv().await {
            if let Some(addr) = line.strip_prefix("seqcast listening on http://") {
                return Some(addr.trim().to_owned());
            }
        }
        None
    })
    .await;
    let addr = match addr {
        Ok(Some(addr)) => addr,
        Ok(None) => panic!(
            "`{command}` exited without serving ({:?}); its stderr ends with:\n{}",
            child.wait().unwrap(),
            tail(&stderr)
        ),
        Err(_) => panic!(
            "`{command}` printed no listening line within {BUILD_AND_START:?}; stderr:\n{}",
            tail(&stderr)
        ),
    };

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // The node listens before its database is open (/ready says "starting" until then).
    let ready_by = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ready = http
            .get(format!("http://{addr}/ready"))
            .send()
            .await
            .unwrap();
        if ready.status() == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < ready_by,
            "GET /ready of the README's server still answers {} after 30 s: {}",
            ready.status(),
            ready.text().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The demo page the README points a browser at.
    let page = http.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(page.status(), 200, "GET / (the demo page)");
    let page = page.text().await.unwrap();
    assert!(
        page.contains("<title>seqcast demo</title>") && page.contains("/demo/app.js"),
        "GET / is not the demo page: {page:.200}"
    );
    // The README's two curl lines.
    let posted = http
        .post(format!("http://{addr}/v1/rooms/general/messages"))
        .body(r#"{"body":"hello"}"#)
        .send()
        .await
        .unwrap();
    assert!(posted.status().is_success(), "POST: {}", posted.status());
    let history: Value = http
        .get(format!("http://{addr}/v1/rooms/general/messages?after=0"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(history["messages"][0]["body"], "hello", "{history}");
    drop(guard);
    let _status = child.wait();
}

/// The first command of the README's first `sh` code block.
fn readme_first_command(readme: &str) -> String {
    let block = readme
        .split("```sh\n")
        .nth(1)
        .expect("the README has a ```sh code block");
    block
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))
        .expect("the first ```sh block has a command")
        .to_owned()
}

/// Kills a process group with SIGKILL when dropped (through the `kill` command: the workspace
/// denies `unsafe`).
struct GroupGuard(u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let _status = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .status();
    }
}

/// Logs written to a pipe or a file (stderr not a terminal: how every service manager, container
/// runtime and log collector runs the node) are plain text, without colour codes (issue 12).
#[tokio::test]
async fn logs_off_a_terminal_carry_no_colour_codes() {
    let server = TestServer::start(
        ServerOptions::new(StoreKind::Sqlite)
            .env("RUST_LOG", "debug")
            .capture_logs(),
    )
    .await;
    eventually(DEADLINE, "the node logs something", || {
        let logged = server.logs().iter().any(|l| l.contains("INFO"));
        async move { logged }
    })
    .await;
    let logs = server.logs();
    let coloured: Vec<&String> = logs.iter().filter(|l| l.contains('\u{1b}')).collect();
    assert!(
        coloured.is_empty(),
        "{} of {} log lines carry escape codes, e.g. {:?}",
        coloured.len(),
        logs.len(),
        coloured.first()
    );
}

/// `seqcast health`, the container health check (the image has no curl): exit 0 when the node's
/// `/ready` answers 200; exit 1 when it answers anything else (503 while the node starts), when
/// nothing listens, and when the peer never answers (within about 3 s, not a hung check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_0_only_when_the_node_is_ready() {
    let server = TestServer::start(ServerOptions::new(StoreKind::Sqlite)).await;
    let health = |args: Vec<String>, listen: Option<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = listen
            .as_deref()
            .map(|l| vec![("SEQCAST_LISTEN", l)])
            .unwrap_or_default();
        let (status, stdout, stderr) = run_seqcast(&args, &env, DEADLINE).await;
        (status.code(), format!("{stdout}{stderr}"))
    };
    let url = |base: String| vec!["health".to_owned(), "--url".to_owned(), base + "/ready"];

    let (code, out) = health(url(server.http_url()), None).await;
    assert_eq!(code, Some(0), "a ready node: {out}");
    // Without --url: SEQCAST_LISTEN's port, through loopback for an any-address.
    let port = server.addr.port();
    for listen in [server.addr.to_string(), format!("0.0.0.0:{port}")] {
        let (code, out) = health(vec!["health".to_owned()], Some(listen.clone())).await;
        assert_eq!(code, Some(0), "SEQCAST_LISTEN={listen}: {out}");
    }

    // A node that is starting (its Postgres is not there): 503.
    let absent = support::postgres::free_port();
    let starting = TestServer::start(
        ServerOptions::new(StoreKind::Postgres)
            .database_url(format!("postgres://postgres@127.0.0.1:{absent}/postgres"))
            .no_wait_started(),
    )
    .await;
    let (code, out) = health(url(starting.http_url()), None).await;
    assert_eq!(code, Some(1), "a starting node: {out}");
    assert!(out.contains("503"), "{out}");

    // Nothing listening.
    let closed = support::postgres::free_port();
    let (code, out) = health(url(format!("http://127.0.0.1:{closed}")), None).await;
    assert_eq!(code, Some(1), "nothing listening: {out}");

    // A peer that takes the connection (the kernel's backlog) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let started = std::time::Instant::now();
    let (code, out) = health(url(silent_url), None).await;
    let took = started.elapsed();
    assert_eq!(code, Some(1), "a silent peer: {out}");
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(6),
        "gave up on a silent peer after {took:?}, not about 3 s: {out}"
    );
    drop(silent);
}
