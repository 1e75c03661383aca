//! The real `seqcast` binary as a child process, configured per test.
//!
//! [`TestServer::start`] spawns `CARGO_BIN_EXE_seqcast` with a hermetic environment (every
//! inherited `SEQCAST_*`, `DATABASE_URL` and `REDIS_URL` is removed), `SEQCAST_LISTEN=127.0.0.1:0`
//! and a fresh database, then waits (with a deadline) for the line
//! `seqcast listening on http://127.0.0.1:PORT` on the child's stdout, and for the node to have
//! started (its database open: `/ready` no longer says `starting`) unless
//! [`ServerOptions::no_wait_started`]. The child's stderr (its
//! logs) is forwarded line by line to the test's stderr, so a failing test shows what the server
//! said. The child is killed when the [`TestServer`] is dropped.
//!
//! [`store_tests!`](crate::store_tests) turns scenario functions `async fn(StoreKind)` into one
//! `#[tokio::test]` per store, so every scenario runs against SQLite and Postgres.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long a server may take from spawn to printing its listening line (migrations included).
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(30);

/// A deadline for a whole scenario, used by [`store_tests!`](crate::store_tests).
pub const SCENARIO_DEADLINE: Duration = Duration::from_secs(180);

/// Path of the binary under test: `SEQCAST_TEST_BIN` when set (a copy of the binary that no other
/// build sharing the target directory can replace while the tests run), else the one cargo built.
pub fn seqcast_bin() -> String {
    std::env::var("SEQCAST_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_seqcast").to_owned())
}

/// Which database the server under test uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

/// Generates, for each scenario `async fn name(store: StoreKind)` in scope, the tests
/// `sqlite::name` and `postgres::name`, each bounded by [`SCENARIO_DEADLINE`].
#[macro_export]
macro_rules! store_tests {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::support::server::run_scenario(
                        stringify!($name),
                        super::$name($crate::support::server::StoreKind::Sqlite),
                    )
                    .await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::support::server::run_scenario(
                        stringify!($name),
                        super::$name($crate::support::server::StoreKind::Postgres),
                    )
                    .await;
                }
            )+
        }
    };
}

/// Runs one scenario with the [`SCENARIO_DEADLINE`].
pub async fn run_scenario(name: &str, scenario: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(SCENARIO_DEADLINE, scenario)
        .await
        .is_err()
    {
        panic!("scenario {name} did not finish within {SCENARIO_DEADLINE:?}");
    }
}

/// A database for a server: a SQLite file in a temporary directory, or a fresh Postgres database.
#[derive(Debug)]
pub struct TestDatabase {
    pub url: String,
    /// Keeps the SQLite file's directory alive; `None` for Postgres.
    _dir: Option<tempfile::TempDir>,
}

impl TestDatabase {
    /// A new empty database of the given kind.
    pub async fn fresh(store: StoreKind) -> TestDatabase {
        match store {
            StoreKind::Sqlite => {
                let dir = tempfile::Builder::new()
                    .prefix("seqcast-test-")
                    .tempdir()
                    .expect("create a temporary directory for SQLite");
                let path = dir.path().join("seqcast.db");
                TestDatabase {
                    url: format!("sqlite://{}", path.display()),
                    _dir: Some(dir),
                }
            }
            StoreKind::Postgres => {
                let url = crate::support::postgres::TestPostgres::shared()
                    .fresh_database()
                    .await;
                TestDatabase { url, _dir: None }
            }
        }
    }
}

/// Options for [`TestServer::start`]; builder style, every unset option is left to the server's
/// default.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub store: StoreKind,
    /// Use this database URL instead of a fresh one (e.g. to restart on the same data).
    pub database_url: Option<String>,
    pub jwt_secret: Option<String>,
    pub api_key: Option<String>,
    pub write_timeout: Option<String>,
    pub shutdown_timeout: Option<String>,
    pub max_message_bytes: Option<usize>,
    pub outbound_queue: Option<usize>,
    pub redis_url: Option<String>,
    pub node_id: Option<String>,
    /// `SEQCAST_LISTEN`; default `127.0.0.1:0`.
    pub listen: String,
    /// Any further environment variables.
    pub env: Vec<(String, String)>,
    /// Keep the child's stderr lines for [`TestServer::logs`] (they are forwarded either way).
    pub capture_logs: bool,
    /// Wait for the node to have started (database open), not only for it to listen.
    pub wait_started: bool,
    /// Command-line arguments (a subcommand, flags); none = `seqcast` alone, which serves.
    pub args: Vec<String>,
}

impl ServerOptions {
    pub fn new(store: StoreKind) -> ServerOptions {
        ServerOptions {
            store,
            database_url: None,
            jwt_secret: None,
            api_key: None,
            write_timeout: None,
            shutdown_timeout: None,
            max_message_bytes: None,
            outbound_queue: None,
            redis_url: None,
            node_id: None,
            listen: "127.0.0.1:0".to_owned(),
            env: Vec::new(),
            capture_logs: false,
            wait_started: true,
            args: Vec::new(),
        }
    }

    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.database_url = Some(url.into());
        self
    }
    pub fn jwt_secret(mut self, secret: impl Into<String>) -> Self {
        self.jwt_secret = Some(secret.into());
        self
    }
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }
    pub fn write_timeout(mut self, d: impl Into<String>) -> Self {
        self.write_timeout = Some(d.into());
        self
    }
    pub fn shutdown_timeout(mut self, d: impl Into<String>) -> Self {
        self.shutdown_timeout = Some(d.into());
        self
    }
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = Some(n);
        self
    }
    pub fn outbound_queue(mut self, n: usize) -> Self {
        self.outbound_queue = Some(n);
        self
    }
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(url.into());
        self
    }
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.node_id = Some(id.into());
        self
    }
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen = addr.into();
        self
    }
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    pub fn capture_logs(mut self) -> Self {
        self.capture_logs = true;
        self
    }
    /// A command-line argument, after those already given.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }
    /// Return as soon as the node listens, while it may still be opening its database.
    pub fn no_wait_started(mut self) -> Self {
        self.wait_started = false;
        self
    }
}

/// A running `seqcast` process.
#[derive(Debug)]
pub struct TestServer {
    pub addr: SocketAddr,
    pub pid: u32,
    pub database_url: String,
    pub options: ServerOptions,
    child: Child,
    _database: Option<TestDatabase>,
    /// The child's stderr lines so far, when [`ServerOptions::capture_logs`] was set.
    logs: Arc<Mutex<Vec<String>>>,
    /// The child's stdout lines so far (the listening lines among them).
    stdout: Arc<Mutex<Vec<String>>>,
}

impl TestServer {
    /// Spawns the server and waits for its listening line; panics (with the exit status if the
    /// child died) when it does not come within [`STARTUP_DEADLINE`].
    pub async fn start(options: ServerOptions) -> TestServer {
        let database = match &options.database_url {
            Some(_) => None,
            None => Some(TestDatabase::fresh(options.store).await),
        };
        let database_url = options
            .database_url
            .clone()
            .or_else(|| database.as_ref().map(|db| db.url.clone()))
            .expect("a database URL");

        let mut cmd = base_command();
        cmd.args(&options.args);
        cmd.env("DATABASE_URL", &database_url)
            .env("SEQCAST_LISTEN", &options.listen);
        let optional = [
            ("SEQCAST_JWT_SECRET", options.jwt_secret.clone()),
            ("SEQCAST_API_KEY", options.api_key.clone()),
            ("SEQCAST_WRITE_TIMEOUT", options.write_timeout.clone()),
            ("SEQCAST_SHUTDOWN_TIMEOUT", options.shutdown_timeout.clone()),
            (
                "SEQCAST_MAX_MESSAGE_BYTES",
                options.max_message_bytes.map(|n| n.to_string()),
            ),
            (
                "SEQCAST_OUTBOUND_QUEUE",
                options.outbound_queue.map(|n| n.to_string()),
            ),
            ("REDIS_URL", options.redis_url.clone()),
            ("SEQCAST_NODE_ID", options.node_id.clone()),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                cmd.env(key, value);
            }
        }
        for (key, value) in &options.env {
            cmd.env(key, value);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", seqcast_bin()));
        let pid = child.id();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let capture = options.capture_logs.then(|| Arc::clone(&logs));
        forward_stderr(pid, child.stderr.take().expect("piped stderr"), capture);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        watch_stdout(
            pid,
            child.stdout.take().expect("piped stdout"),
            tx,
            Arc::clone(&stdout),
        );

        let addr = match tokio::time::timeout(STARTUP_DEADLINE, rx).await {
            Ok(Ok(addr)) => addr,
            Ok(Err(_closed)) => {
                let status = wait_child(&mut child, Duration::from_secs(5));
                panic!(
                    "seqcast (pid {pid}) closed stdout without a listening line; exit status: \
                     {status:?} (its stderr is above)"
                );
            }
            Err(_elapsed) => {
                let _kill_result = child.kill();
                panic!(
                    "seqcast (pid {pid}) printed no `seqcast listening on http://...` line within \
                     {STARTUP_DEADLINE:?}"
                );
            }
        };
        let server = TestServer {
            addr,
            pid,
            database_url,
            options,
            child,
            _database: database,
            logs,
            stdout,
        };
        if server.options.wait_started {
            server.wait_started().await;
        }
        server
    }

    /// Waits (within [`STARTUP_DEADLINE`]) until `/ready` no longer answers `starting`: the
    /// node listens before its database is open, and answers 503 to everything meanwhile.
    pub async fn wait_started(&self) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client");
        let url = format!("{}/ready", self.http_url());
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            let body = match client.get(&url).send().await {
                Ok(reply) => reply.json::<Value>().await.ok(),
                Err(_) => None,
            };
            let status = body.as_ref().and_then(|b| b["status"].as_str());
            if status.is_some_and(|s| s != "starting") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "seqcast (pid {}) still not started after {STARTUP_DEADLINE:?}: {body:?}",
                self.pid
            );
            // Polling the condition itself, every 20 ms.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The log lines (stderr) written so far; empty unless [`ServerOptions::capture_logs`].
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("log buffer lock").clone()
    }

    /// The address of the admin listener (`SEQCAST_ADMIN_LISTEN`), from the line the node
    /// prints before its listening line; `None` without one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        let lines = self.stdout.lock().expect("stdout buffer lock");
        lines.iter().find_map(|line| {
            let rest = line
                .trim()
                .strip_prefix("seqcast admin listening on http://")?;
            rest.trim_end_matches('/').parse().ok()
        })
    }

    /// `ws://127.0.0.1:PORT/v1/ws`
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Resident set size of the server process, in KiB (`VmRSS` of `/proc/PID/status`).
    pub fn rss_kib(&self) -> u64 {
        rss_kib_of(self.pid)
    }

    /// Sends SIGTERM through the `kill` command (the workspace denies `unsafe`).
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM {} failed: {status}", self.pid);
    }

    /// Sends `signal` (a name such as `STOP`) through the `kill` command.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("run kill -{signal}: {e}"));
        assert!(
            status.success(),
            "kill -{signal} {} failed: {status}",
            self.pid
        );
    }

    /// Freezes the process (SIGSTOP): its sockets stay open but nothing is read or written.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaws a process frozen by [`pause`](Self::pause) (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// Kills the process at once (SIGKILL, also when paused), as a crash would, and reaps it.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.child
                .kill()
                .unwrap_or_else(|e| panic!("SIGKILL seqcast (pid {}): {e}", self.pid));
        }
        self.child
            .wait()
            .unwrap_or_else(|e| panic!("wait for the killed seqcast (pid {}): {e}", self.pid));
    }

    /// Waits for the process to exit, at most `deadline`; panics if it is still running then.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_exit_status() {
                return status;
            }
            if start.elapsed() > deadline {
                panic!(
                    "seqcast (pid {}) still running {deadline:?} after wait_exit began",
                    self.pid
                );
            }
            // Polling the process's state: the condition itself, checked every 20 ms.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The exit status if the process has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait on seqcast")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Err(e) = self.child.kill() {
                eprintln!("[seqcast {}] kill on drop failed: {e}", self.pid);
            }
            if let Err(e) = self.child.wait() {
                eprintln!("[seqcast {}] wait on drop failed: {e}", self.pid);
            }
        }
    }
}

/// Resident set size of process `pid`, in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// A `seqcast` command with the inherited configuration removed, quiet-ish logs in text.
pub fn base_command() -> Command {
    let mut cmd = Command::new(seqcast_bin());
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("SEQCAST_") || key == "DATABASE_URL" || key == "REDIS_URL" {
            cmd.env_remove(key);
        }
    }
    let log = std::env::var("SEQCAST_TEST_LOG").unwrap_or_else(|_| "warn".to_owned());
    cmd.env("RUST_LOG", log).env("SEQCAST_LOG_FORMAT", "text");
    cmd
}

/// Runs `seqcast ARGS` to completion with extra environment, killing it after `deadline`.
/// Returns (status, stdout, stderr).
pub async fn run_seqcast(
    args: &[&str],
    env: &[(&str, &str)],
    deadline: Duration,
) -> (ExitStatus, String, String) {
    let mut cmd = tokio::process::Command::from(base_command());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, value) in env {
        cmd.env(key, value);
    }
    let output = match tokio::time::timeout(deadline, cmd.output()).await {
        Ok(output) => output.expect("run seqcast"),
        Err(_) => panic!(
            "`seqcast {}` did not exit within {deadline:?}",
            args.join(" ")
        ),
    };
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn forward_stderr(
    pid: u32,
    stderr: impl Read + Send + 'static,
    capture: Option<Arc<Mutex<Vec<String>>>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            match line {
                Ok(line) => {
                    eprintln!("[seqcast {pid}] {line}");
                    if let Some(capture) = &capture {
                        capture.lock().expect("log buffer lock").push(line);
                    }
                }
                Err(_) => break,
            }
        }
    });
}

/// Reads stdout until the listening line, reports the address, then keeps draining (forwarded to
/// stderr) so the child never blocks on a full pipe.
fn watch_stdout(
    pid: u32,
    stdout: impl Read + Send + 'static,
    tx: tokio::sync::oneshot::Sender<SocketAddr>,
    lines: Arc<Mutex<Vec<String>>>,
) {
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            eprintln!("[seqcast {pid} stdout] {line}");
            // Kept before the listening line is reported: it follows the lines printed first.
            lines.lock().expect("stdout buffer lock").push(line.clone());
            if let Some(addr) = parse_listening_line(&line) {
                if let Some(tx) = tx.take() {
                    // The receiver is gone only if the test already gave up waiting.
                    if tx.send(addr).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Parses `seqcast listening on http://127.0.0.1:PORT`.
pub fn parse_listening_line(line: &str) -> Option<SocketAddr> {
    let rest = line.trim().strip_prefix("seqcast listening on http://")?;
    rest.trim_end_matches('/').parse().ok()
}

fn wait_child(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if start.elapsed() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _kill_result = child.kill();
                return None;
            }
        }
    }
}

/// Claims of a seqcast token.
#[derive(Debug, Clone)]
pub struct Claims {
    pub sub: String,
    pub rooms: Vec<String>,
    pub read: Option<Vec<String>>,
    /// Seconds from now until `exp`; negative for an expired token.
    pub expires_in: i64,
}

impl Claims {
    /// A token for `sub` allowed in `rooms`, valid for an hour.
    pub fn new(sub: &str, rooms: &[&str]) -> Claims {
        Claims {
            sub: sub.to_owned(),
            rooms: rooms.iter().map(|r| (*r).to_owned()).collect(),
            read: None,
            expires_in: 3600,
        }
    }
    pub fn read(mut self, patterns: &[&str]) -> Claims {
        self.read = Some(patterns.iter().map(|r| (*r).to_owned()).collect());
        self
    }
    pub fn expires_in(mut self, seconds: i64) -> Claims {
        self.expires_in = seconds;
        self
    }
    pub fn to_json(&self) -> Value {
        let now = i64::try_from(jsonwebtoken::get_current_timestamp()).expect("timestamp fits");
        let mut claims = json!({
            "sub": self.sub,
            "exp": now + self.expires_in,
            "rooms": self.rooms,
        });
        if let Some(read) = &self.read {
            claims["read"] = json!(read);
        }
        claims
    }
    /// Signed with HS256 and `secret`.
    pub fn sign(&self, secret: &str) -> String {
        sign_claims(&self.to_json(), secret)
    }
}

/// Signs arbitrary claims with HS256.
pub fn sign_claims(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign a token")
}

/// An unsigned `alg: none` token carrying `claims` (which seqcast must reject).
pub fn unsigned_token(claims: &Value) -> String {
    let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = base64url(claims.to_string().as_bytes());
    format!("{header}.{payload}.")
}

fn base64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            let index = (n >> (18 - 6 * i)) & 0x3f;
            out.push(char::from(ALPHABET[index as usize]));
        }
    }
    out
}

#[test]
fn base64url_matches_known_vectors() {
    assert_eq!(base64url(b""), "");
    assert_eq!(base64url(b"f"), "Zg");
    assert_eq!(base64url(b"fo"), "Zm8");
    assert_eq!(base64url(b"foo"), "Zm9v");
    assert_eq!(base64url(b"foob"), "Zm9vYg");
    assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
}

#[test]
fn parses_listening_line() {
    assert_eq!(
        parse_listening_line("seqcast listening on http://127.0.0.1:4321"),
        Some("127.0.0.1:4321".parse().expect("addr"))
    );
    assert_eq!(parse_listening_line("something else"), None);
}
