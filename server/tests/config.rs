//! Configuration that helps (issue 12 item 5), through the real binary: flags that mirror the
//! variables and win over them, `--help` listing every setting with its default, a warning for
//! unknown `SEQCAST_*` names, `seqcast config` (redacted), the admin listener
//! (`SEQCAST_ADMIN_LISTEN`) and CORS by `SEQCAST_ALLOWED_ORIGINS`.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
};
use reqwest::Method;

use support::check::eventually;
use support::http::Http;
use support::server::{run_seqcast, ServerOptions, StoreKind, TestServer};

const DEADLINE: Duration = Duration::from_secs(20);

/// Every setting name the configuration code reads: the quoted `SEQCAST_*` names of
/// `server/src/config/` (unit tests left out), plus `DATABASE_URL` and `REDIS_URL`. Read from the
/// source so that a setting added there cannot be missing from `--help` unnoticed.
fn setting_names() -> BTreeSet<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config");
    let mut names = BTreeSet::from(["DATABASE_URL".to_owned(), "REDIS_URL".to_owned()]);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let source = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let code = source.split("#[cfg(test)]").next().unwrap();
        for piece in code.split("\"SEQCAST_").skip(1) {
            let Some(end) = piece.find('"') else { continue };
            let rest = &piece[..end];
            if !rest.is_empty()
                && rest
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            {
                names.insert(format!("SEQCAST_{rest}"));
            }
        }
    }
    assert!(
        names.len() > 40,
        "the scan of {} found too few names: {names:?}",
        dir.display()
    );
    names
}

/// The help entry of `--flag`: from the flag to the next flag.
fn help_entry<'a>(help: &'a str, flag: &str) -> &'a str {
    let start = help
        .find(&format!("--{flag} "))
        .unwrap_or_else(|| panic!("--{flag} missing from the help:\n{help}"));
    let rest = &help[start..];
    let end = rest[2..].find("\n      --").map_or(rest.len(), |i| i + 2);
    &rest[..end]
}

async fn seqcast_ok(args: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let (status, stdout, stderr) = run_seqcast(args, env, DEADLINE).await;
    assert!(
        status.success(),
        "seqcast {args:?} failed: {status}\n{stderr}"
    );
    (stdout, stderr)
}

#[tokio::test]
async fn help_lists_every_setting_with_its_flag_default_and_variable() {
    let names = setting_names();
    for args in [&["--help"][..], &["serve", "--help"]] {
        let (help, _) = seqcast_ok(args, &[]).await;
        for name in &names {
            let flag = name
                .strip_prefix("SEQCAST_")
                .unwrap_or(name)
                .to_ascii_lowercase()
                .replace('_', "-");
            let entry = help_entry(&help, &flag);
            assert!(
                entry.contains(&format!("[env: {name}]")),
                "`seqcast {args:?}`: --{flag} does not name {name}: {entry:?}"
            );
            assert!(
                entry.contains("[default: "),
                "`seqcast {args:?}`: --{flag} states no default: {entry:?}"
            );
        }
        for (flag, default) in [
            ("listen", "127.0.0.1:8080"),
            ("database-url", "sqlite://seqcast.db"),
            ("drain-delay", "2s"),
            ("max-message-bytes", "65536"),
            ("write-timeout", "10s"),
            ("admin-listen", "unset"),
        ] {
            let entry = help_entry(&help, flag);
            assert!(
                entry.contains(&format!("[default: {default}]")),
                "--{flag} default {default}: {entry:?}"
            );
        }
    }
}

#[tokio::test]
async fn flags_override_the_environment() {
    let env = [
        ("SEQCAST_DRAIN_DELAY", "3s"),
        ("SEQCAST_NODE_ID", "env-node"),
    ];
    for args in [
        &["config", "--drain-delay", "7s"][..],
        &["--drain-delay", "7s", "config"],
    ] {
        let (stdout, _) = seqcast_ok(args, &env).await;
        assert!(
            stdout.contains("\nSEQCAST_DRAIN_DELAY=7s\n"),
            "{args:?}: {stdout}"
        );
        assert!(
            stdout.contains("\nSEQCAST_NODE_ID=env-node\n"),
            "{args:?}: {stdout}"
        );
    }

    // A node started with flags: with no subcommand (it serves) and with `serve`.
    for args in [
        &["--node-id", "flag-node"][..],
        &["serve", "--node-id", "flag-node"],
    ] {
        let mut options = ServerOptions::new(StoreKind::Sqlite).node_id("env-node");
        for arg in args {
            options = options.arg(*arg);
        }
        let server = TestServer::start(options).await;
        let ready = Http::new(&server).get("/ready").await;
        assert_eq!(ready.status, 200, "{ready:?}");
        assert_eq!(
            ready.json()["node"],
            "flag-node",
            "`seqcast {args:?}`: {ready:?}"
        );
    }
}

#[tokio::test]
async fn an_unknown_variable_is_reported_with_a_suggestion() {
    let server = TestServer::start(
        ServerOptions::new(StoreKind::Sqlite)
            .env("SEQCAST_LISTN", "127.0.0.1:9999")
            .capture_logs(),
    )
    .await;
    // Not fatal: the node serves.
    assert_eq!(Http::new(&server).get("/ready").await.status, 200);
    eventually(DEADLINE, "a warning about SEQCAST_LISTN", || {
        let logs = server.logs();
        async move {
            logs.iter().any(|line| {
                line.contains("WARN")
                    && line.contains("SEQCAST_LISTN ")
                    && line.contains("did you mean SEQCAST_LISTEN?")
            })
        }
    })
    .await;
}

#[tokio::test]
async fn config_prints_the_effective_configuration_with_secrets_redacted() {
    let secrets = [
        "jwt-secret-hunter2",
        "api-key-swordfish",
        "db-password-opensesame",
        "redis-password-letmein",
    ];
    let database = format!("postgres://seqcast:{}@db.internal:5432/chat", secrets[2]);
    let redis = format!("redis://:{}@cache.internal:6379", secrets[3]);
    let env = [
        ("SEQCAST_JWT_SECRET", secrets[0]),
        ("SEQCAST_API_KEY", secrets[1]),
        ("DATABASE_URL", database.as_str()),
        ("REDIS_URL", redis.as_str()),
        ("SEQCAST_RETENTION", "30d"),
    ];
    let (stdout, stderr) = seqcast_ok(&["config", "--listen", "0.0.0.0:8080"], &env).await;
    for secret in secrets {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} printed:\n{stdout}\n{stderr}"
        );
    }
    for line in [
        "SEQCAST_JWT_SECRET=[redacted]",
        "SEQCAST_API_KEY=[redacted]",
        "DATABASE_URL=postgres://seqcast:[redacted]@db.internal:5432/chat",
        "REDIS_URL=redis://:[redacted]@cache.internal:6379",
        "SEQCAST_LISTEN=0.0.0.0:8080",
        "SEQCAST_RETENTION=30d",
        "SEQCAST_WRITE_TIMEOUT=10s",
        "SEQCAST_ADMIN_LISTEN=",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "no line {line:?} in:\n{stdout}"
        );
    }
    // One line per setting, each NAME=value.
    let names = setting_names();
    assert_eq!(stdout.lines().count(), names.len(), "{stdout}");
    for line in stdout.lines() {
        let (name, _) = line.split_once('=').unwrap();
        assert!(names.contains(name), "{line}");
    }
}

#[tokio::test]
async fn config_fails_on_an_invalid_configuration() {
    for (args, env, named) in [
        (
            &["config"][..],
            &[("SEQCAST_DRAIN_DELAY", "soon")][..],
            "SEQCAST_DRAIN_DELAY",
        ),
        (
            &["config", "--max-connections", "many"],
            &[],
            "SEQCAST_MAX_CONNECTIONS",
        ),
        // Development mode (no secret) stays on loopback, the admin listener included.
        (
            &["config", "--listen", "0.0.0.0:8080"],
            &[],
            "development mode",
        ),
        (
            &["config"],
            &[("SEQCAST_ADMIN_LISTEN", "0.0.0.0:9090")],
            "SEQCAST_ADMIN_LISTEN",
        ),
        (
            &["config"],
            &[("SEQCAST_ALLOWED_ORIGINS", "example.com")],
            "SEQCAST_ALLOWED_ORIGINS",
        ),
    ] {
        let (status, stdout, stderr) = run_seqcast(args, env, DEADLINE).await;
        assert!(
            !status.success(),
            "{args:?} {env:?} must fail, printed {stdout}"
        );
        assert!(stdout.is_empty(), "{args:?} {env:?}: {stdout}");
        assert!(stderr.contains(named), "{args:?} {env:?}: {stderr}");
    }
}

#[tokio::test]
async fn the_admin_listener_takes_the_metrics_off_the_public_port() {
    // Without one (the default), nothing changes: the metrics are on the public port.
    let plain = TestServer::start(ServerOptions::new(StoreKind::Sqlite)).await;
    assert_eq!(plain.admin_addr(), None);
    let metrics = Http::new(&plain).get("/metrics").await;
    assert_eq!(metrics.status, 200, "{metrics:?}");
    assert!(metrics.text.contains("# TYPE"), "{metrics:?}");
    drop(plain);

    let mut server = TestServer::start(
        ServerOptions::new(StoreKind::Sqlite).env("SEQCAST_ADMIN_LISTEN", "127.0.0.1:0"),
    )
    .await;
    let admin_addr = server.admin_addr().expect("an admin listening line");
    let admin = Http::for_base(format!("http://{admin_addr}"));
    let public = Http::new(&server);

    let metrics = admin.get("/metrics").await;
    assert_eq!(metrics.status, 200, "{metrics:?}");
    assert!(metrics.text.contains("# TYPE"), "{metrics:?}");
    public.get("/metrics").await.assert_error(404, "not_found");
    for path in ["/ready", "/live"] {
        assert_eq!(admin.get(path).await.status, 200, "admin {path}");
        assert_eq!(public.get(path).await.status, 200, "public {path}");
    }
    admin
        .get("/v1/rooms/general")
        .await
        .assert_error(404, "not_found");

    // It stops with the node.
    server.sigterm();
    let status = server.wait_exit(DEADLINE).await;
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(
        tokio::net::TcpStream::connect(admin_addr).await.is_err(),
        "the admin port still accepts after the node exited"
    );
}

/// `(status, Access-Control-Allow-Origin, response)` of a request with `Origin: origin`.
async fn with_origin(
    server: &TestServer,
    method: Method,
    path: &str,
    origin: &str,
) -> (u16, Option<String>, reqwest::Response) {
    let mut request = reqwest::Client::new()
        .request(method.clone(), format!("{}{path}", server.http_url()))
        .header(ORIGIN, origin);
    if method == Method::OPTIONS {
        request = request
            .header(ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(ACCESS_CONTROL_REQUEST_HEADERS, "authorization,content-type");
    }
    let response = request.send().await.unwrap();
    let allow = response
        .headers()
        .get(ACCESS_CONTROL_ALLOW_ORIGIN)
        .map(|v| v.to_str().unwrap().to_owned());
    (response.status().as_u16(), allow, response)
}

#[tokio::test]
async fn cors_follows_the_allowed_origins() {
    const APP: &str = "https://app.example.com";
    const EVIL: &str = "https://evil.example";
    const MESSAGES: &str = "/v1/rooms/general/messages";
    let server = TestServer::start(
        ServerOptions::new(StoreKind::Sqlite).env("SEQCAST_ALLOWED_ORIGINS", APP),
    )
    .await;

    // A preflight from an allowed origin: answered (not 405) with what the API takes.
    let (status, allow, response) = with_origin(&server, Method::OPTIONS, MESSAGES, APP).await;
    assert!((200..300).contains(&status), "preflight status {status}");
    assert_eq!(allow.as_deref(), Some(APP));
    let header = |name| {
        response
            .headers()
            .get(name)
            .map(|v: &reqwest::header::HeaderValue| v.to_str().unwrap().to_ascii_lowercase())
            .unwrap_or_default()
    };
    assert!(header(ACCESS_CONTROL_ALLOW_METHODS).contains("post"));
    assert!(header(ACCESS_CONTROL_ALLOW_METHODS).contains("get"));
    assert!(header(ACCESS_CONTROL_ALLOW_HEADERS).contains("authorization"));
    assert!(header(ACCESS_CONTROL_ALLOW_HEADERS).contains("content-type"));
    assert_eq!(header(ACCESS_CONTROL_MAX_AGE), "600");

    // A simple request from it carries the header too; other origins get none.
    let (status, allow, _) = with_origin(&server, Method::GET, "/v1/rooms/general", APP).await;
    assert_eq!((status, allow.as_deref()), (200, Some(APP)));
    for method in [Method::OPTIONS, Method::GET] {
        let (_, allow, _) = with_origin(&server, method.clone(), MESSAGES, EVIL).await;
        assert_eq!(allow, None, "{method} from {EVIL}");
    }

    // Unset, as for WebSockets, no other origin is allowed.
    let closed = TestServer::start(ServerOptions::new(StoreKind::Sqlite)).await;
    let (status, allow, _) = with_origin(&closed, Method::OPTIONS, MESSAGES, APP).await;
    assert!((200..300).contains(&status), "preflight status {status}");
    assert_eq!(allow, None);
}
