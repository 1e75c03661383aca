//! Test helpers: real seqcast processes (a single SQLite node, or a loopback cluster started by
//! deploy/local/cluster.sh with Postgres, Redis and nginx), HS256 tokens, and waiting on
//! conditions instead of sleeping.
#![allow(dead_code, clippy::unwrap_used)] // each test binary uses part of this

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub mod fake;

use seqcast_client::Event;
use serde_json::json;
use tokio::sync::mpsc;

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The seqcast binary: `SEQCAST_BIN`, else the debug binary next to this test's own target
/// directory (`cargo test --workspace` builds it, for the server's tests).
pub fn seqcast_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SEQCAST_BIN") {
        return PathBuf::from(bin);
    }
    // This test runs as target/debug/deps/<name>-<hash>.
    let exe = std::env::current_exe().unwrap();
    let beside = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("seqcast"));
    let bin = beside
        .filter(|p| p.exists())
        .unwrap_or_else(|| repo().join("target/debug/seqcast"));
    assert!(
        bin.exists(),
        "no seqcast binary at {}: build it: cargo build -p seqcast (or set SEQCAST_BIN)",
        bin.display()
    );
    bin
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token for `sub`, allowed in every room, valid `ttl` seconds.
pub fn mint_token(secret: &str, sub: &str, ttl: u64) -> String {
    let claims = json!({"sub": sub, "exp": now_secs() + ttl, "rooms": ["*"]});
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
}

/// Waits until `cond()` is `Some`, polling every 20 ms; panics after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next event matching `pick` within `timeout` (others are skipped).
pub async fn next_matching<T>(
    events: &mut mpsc::UnboundedReceiver<Event>,
    timeout: Duration,
    what: &str,
    mut pick: impl FnMut(Event) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(e)) => {
                if let Some(v) = pick(e) {
                    return v;
                }
            }
            Ok(None) => panic!("events ended while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

async fn http_status(url: &str) -> Option<u16> {
    reqwest::get(url).await.ok().map(|r| r.status().as_u16())
}

/// Waits until `GET {base}/ready` answers 200.
pub async fn wait_ready(base: &str, timeout: Duration) {
    let url = format!("{base}/ready");
    wait_for(timeout, &url, || async {
        (http_status(&url).await == Some(200)).then_some(())
    })
    .await;
}

/// Open WebSocket connections on the node on `port` (its /metrics gauge); 0 when it is down.
pub async fn connections_open(port: u16) -> u64 {
    let Ok(res) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return 0;
    };
    let text = res.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("seqcast_connections_open "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Reads `child`'s stdout on a thread until a line containing `marker`, returning the rest of
/// that line; keeps draining it afterwards so the child never blocks on a full pipe.
fn line_after(child: &mut Child, marker: &'static str, timeout: Duration) -> Option<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut found = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !found {
                if let Some(i) = line.find(marker) {
                    found = true;
                    // The test may have given up waiting: nothing to tell then.
                    tx.send(line[i + marker.len()..].to_owned()).ok();
                }
            }
        }
    });
    rx.recv_timeout(timeout).ok()
}

/// One seqcast node on SQLite in a temp dir, on a free port; killed on drop.
pub struct Node {
    child: Child,
    pub http: String,
    pub ws: String,
    _dir: tempfile::TempDir,
}

impl Node {
    pub async fn start(env: &[(&str, &str)]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(seqcast_bin());
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("SEQCAST_LISTEN", "127.0.0.1:0")
            .env(
                "DATABASE_URL",
                format!("sqlite://{}/db.sqlite", dir.path().display()),
            )
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let addr = line_after(
            &mut child,
            "seqcast listening on http://",
            Duration::from_secs(30),
        )
        .expect("seqcast did not print its address");
        let addr = addr.split_whitespace().next().unwrap().to_owned();
        let http = format!("http://{addr}");
        // It listens before its database is ready (503 "starting" until then).
        wait_ready(&http, Duration::from_secs(30)).await;
        Node {
            child,
            ws: format!("ws://{addr}/v1/ws"),
            http,
            _dir: dir,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.child.kill().is_ok() {
            self.child.wait().ok();
        }
    }
}

/// A loopback cluster from deploy/local/cluster.sh: Postgres, Redis, `nodes` seqcast nodes and
/// nginx in front. Dropping it sends SIGTERM to the script, which stops everything it started
/// (restarted nodes too, through their pid files) and removes its directory.
pub struct Cluster {
    child: Child,
    pub dir: PathBuf,
    pub nodes: usize,
    pub ws: String,
    pub http: String,
}

impl Cluster {
    pub fn start(nodes: usize, env: &[(&str, &str)]) -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "seqcast-rs-cluster-{}-{}",
            std::process::id(),
            now_secs()
        ));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("deploy/local/cluster.sh"))
            .args([
                "up",
                "--nodes",
                &nodes.to_string(),
                "--port",
                &port.to_string(),
            ])
            .arg("--dir")
            .arg(&dir)
            .arg("--binary")
            .arg(seqcast_bin())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let up = line_after(&mut child, "seqcast cluster of ", Duration::from_secs(120));
        // Built before the check, so that a failed start is cleaned up by Drop.
        let cluster = Cluster {
            child,
            dir,
            nodes,
            ws: format!("ws://127.0.0.1:{port}/v1/ws"),
            http: format!("http://127.0.0.1:{port}"),
        };
        assert!(
            up.is_some(),
            "cluster.sh did not come up (see its stderr above)"
        );
        cluster
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name))
            .unwrap()
            .trim()
            .to_owned()
    }

    pub fn node_port(&self, i: usize) -> u16 {
        self.file(&format!("node-{i}.port")).parse().unwrap()
    }

    /// Open connections on every node, in node order (index 0 is node-1).
    pub async fn counts(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for i in 1..=self.nodes {
            out.push(connections_open(self.node_port(i)).await);
        }
        out
    }

    /// `cluster.sh kill|stop|start --dir D I`, waited for.
    pub async fn node(&self, action: &'static str, i: usize) {
        self.node_task(action, i).await.unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        if Command::new("kill").args(["-TERM", &pid]).status().is_ok() {
            self.child.wait().ok();
        }
    }
}

impl Cluster {
    /// [`Cluster::node`] as a `'static` future, to run in a task of its own.
    pub fn node_task(&self, action: &'static str, i: usize) -> tokio::task::JoinHandle<()> {
        let dir = self.dir.clone();
        tokio::spawn(async move {
            let status = tokio::process::Command::new("bash")
                .arg(repo().join("deploy/local/cluster.sh"))
                .arg(action)
                .arg("--dir")
                .arg(&dir)
                .arg(i.to_string())
                .status()
                .await
                .unwrap();
            assert!(status.success(), "cluster.sh {action} {i} failed");
        })
    }
}
