//! A rolling restart of a 3-node cluster behind a real nginx, as `deploy/local/cluster.sh` runs it
//! (throwaway Postgres with an ICU collation, Redis, nginx as deploy/nginx/ configures it), while
//! clients connected through nginx send and receive: every node gets SIGTERM in turn, drains
//! (`/ready` 503, sessions served for the drain delay, then 1012 spread over the drain window), is
//! started again and waited for until `/ready` answers 200.
//!
//! Checked: no acknowledged message is lost, every subscriber ends gap-free and duplicate-free,
//! every client was moved at least once (so the roll really went through them), and nginx
//! answered no upgrade with 502/504 (the trap of `max_fails`, docs/operations.md "Load
//! balancer"). Reported (`cargo test --test rolling_restart -- --nocapture`, lines `FIGURE`): the
//! longest delivery pause a subscriber saw, delivery delays, and how the reconnects spread over
//! the roll.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use support::cluster::{listen, spawn_sender, DelayStats, ListenSpec, Pacing, Sender, API_KEY};
use support::scenario::{figure, finish_and_check, join_senders, ledger_of, ms};

const ROOMS: [&str; 2] = ["roll-a", "roll-b"];
const SENDERS_PER_ROOM: usize = 2;
const LISTENERS_PER_ROOM: usize = 3;
/// Per sender: one message per [`PACE`], so the streams outlast the roll (about 3 x (drain delay
/// 2 s + spread 2 s + restart)) with room to spare on a slow machine.
const MESSAGES: usize = 1_500;
const PACE: Duration = Duration::from_millis(20);
const DEADLINE: Duration = Duration::from_secs(150);

/// `deploy/local/cluster.sh` running `up` in a directory of its own; stopped (and its directory
/// removed, unless the test failed) when dropped.
struct LocalCluster {
    up: Child,
    dir: PathBuf,
    url: String,
}

impl LocalCluster {
    async fn start(nodes: usize) -> LocalCluster {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("seqcast-roll-{}-{port}", std::process::id()));
        let mut up = Command::new("bash")
            .arg(script())
            .args([
                "up",
                "--nodes",
                &nodes.to_string(),
                "--port",
                &port.to_string(),
            ])
            .arg("--dir")
            .arg(&dir)
            .args(["--binary", env!("CARGO_BIN_EXE_seqcast")])
            // One identity for every sender on every node, so that `idem` dedupes a retry made
            // on another node (anonymous clients get a random name per connection).
            .env("SEQCAST_API_KEY", API_KEY)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(false)
            .spawn()
            .expect("running deploy/local/cluster.sh with bash");
        let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
        let started = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                eprintln!("{line}");
                if line.starts_with("seqcast cluster of") {
                    return true;
                }
            }
            false
        })
        .await;
        let cluster = LocalCluster {
            up,
            dir,
            url: format!("ws://127.0.0.1:{port}/v1/ws"),
        };
        assert!(
            matches!(started, Ok(true)),
            "deploy/local/cluster.sh up did not report a running cluster within 120 s (its \
             messages are above; nginx, Postgres and redis-server must be installed: \
             apt-get install -y nginx postgresql redis-server)"
        );
        cluster
    }

    /// Runs `cluster.sh roll`, returning its output lines.
    async fn roll(&self) -> String {
        let output = Command::new("bash")
            .arg(script())
            .arg("roll")
            .arg("--dir")
            .arg(&self.dir)
            .output()
            .await
            .expect("running cluster.sh roll");
        let log = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "cluster.sh roll failed:\n{log}");
        log
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nginx-access.log")).unwrap_or_default()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // A `keep` file tells the clean-up to leave the logs of a failed test in place.
        if std::thread::panicking() {
            let _ = std::fs::write(self.dir.join("keep"), b"");
            eprintln!("test failed: cluster logs kept in {}", self.dir.display());
        }
        // SIGTERM to `up` runs its clean-up (nodes drained, nginx, Redis and Postgres stopped);
        // if it has not finished within a minute, `down` does the same from outside.
        if let Some(pid) = self.up.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while matches!(self.up.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.up.start_kill();
        }
        let _ = std::process::Command::new("bash")
            .arg(script())
            .arg("down")
            .arg("--dir")
            .arg(&self.dir)
            .status();
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/cluster.sh")
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Seconds since `start`, for the report.
fn secs(at: Instant, start: Instant) -> f64 {
    at.saturating_duration_since(start).as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_behind_nginx_loses_nothing_and_nginx_never_answers_502() {
    let cluster = LocalCluster::start(3).await;
    let through_nginx = (0, cluster.url.clone());
    // Every reconnect goes through nginx again (two entries: a route of one does not fail over).
    let route = vec![through_nginx.clone(), through_nginx.clone()];
    let until = Instant::now() + DEADLINE;
    let (target_tx, target) = watch::channel(0);

    let mut listeners = Vec::new();
    for room in ROOMS {
        let mut room_listeners = Vec::new();
        for i in 0..LISTENERS_PER_ROOM {
            let label = format!("{room}-listener{i}");
            let spec = ListenSpec::new(label.clone(), room, through_nginx.clone())
                .then(through_nginx.clone());
            room_listeners.push((label, 1, listen(spec, target.clone(), until).await));
        }
        listeners.push(room_listeners);
    }
    let progress = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for room in ROOMS {
        let mut room_senders = Vec::new();
        for i in 0..SENDERS_PER_ROOM {
            let sender = Sender::new(format!("{room}-sender{i}"), room, MESSAGES).with_idem();
            room_senders.push(spawn_sender(
                sender,
                route.clone(),
                true,
                Pacing::paced(8, PACE),
                until,
                Arc::clone(&progress),
            ));
        }
        senders.push(room_senders);
    }
    let total = ROOMS.len() * SENDERS_PER_ROOM * MESSAGES;
    support::cluster::wait_until(Duration::from_secs(30), "first acks", || async {
        progress.load(Ordering::Relaxed) >= 100
    })
    .await;

    let roll_start = Instant::now();
    let roll_log = cluster.roll().await;
    let roll_end = Instant::now();
    let acked_at_roll_end = progress.load(Ordering::Relaxed);
    eprint!("{roll_log}");
    assert!(
        acked_at_roll_end < total,
        "the streams ended before the roll did ({acked_at_roll_end} of {total} acks): the test \
         did not send through the whole roll; raise MESSAGES"
    );

    let mut all_streams = Vec::new();
    let mut reconnects = Vec::new();
    let mut failovers = Vec::new();
    for (room_senders, room_listeners) in senders.into_iter().zip(listeners) {
        let room_senders = join_senders(room_senders).await;
        for sender in &room_senders {
            assert!(
                !sender.failovers.is_empty(),
                "{}: never moved to another node during the roll",
                sender.label
            );
            failovers.extend(sender.failovers.iter().copied());
        }
        let ledger = ledger_of(&room_senders);
        assert_eq!(
            ledger.head as usize,
            SENDERS_PER_ROOM * MESSAGES,
            "every message acked once"
        );
        for (label, _, listening) in &room_listeners {
            let moved = listening.reconnects.lock().unwrap().clone();
            assert!(
                !moved.is_empty(),
                "{label}: never moved to another node during the roll"
            );
            reconnects.extend(moved);
        }
        all_streams.extend(finish_and_check(room_listeners, &target_tx, &ledger).await);
    }

    // nginx itself answers 502 (or 504) only when no node took the request: that must not happen.
    let log = cluster.access_log();
    let lines: Vec<Vec<&str>> = log.lines().map(|l| l.split(' ').collect()).collect();
    let refused: Vec<&Vec<&str>> = lines
        .iter()
        .filter(|f| matches!(f.get(1), Some(&"502" | &"504")))
        .collect();
    assert!(
        refused.is_empty(),
        "nginx answered {} upgrades with 502/504 during the roll, from {} to {}; the first: {:?}",
        refused.len(),
        refused.first().map_or("?", |f| f[0]),
        refused.last().map_or("?", |f| f[0]),
        &refused[..refused.len().min(5)]
    );
    let upgrades = lines.iter().filter(|f| f.get(1) == Some(&"101")).count();
    let retried = lines
        .iter()
        .filter(|f| f.get(3).is_some_and(|s| s.contains(',')))
        .count();

    // The report.
    let gaps = all_streams.iter().flat_map(|stream| {
        stream
            .windows(2)
            .map(|pair| pair[1].arrived.saturating_duration_since(pair[0].arrived))
    });
    let longest_pause = gaps.max().unwrap_or_default();
    let delays = DelayStats::of(all_streams.iter().flatten().map(|m| m.delay));
    let away = DelayStats::of(
        reconnects
            .iter()
            .map(|(ended, joined)| joined.saturating_duration_since(*ended)),
    );
    figure("roll duration", ms(roll_end - roll_start));
    figure(
        "longest delivery pause at a subscriber (between two arrivals)",
        ms(longest_pause),
    );
    figure("delivery delay, send to arrival, all subscribers", delays);
    figure("subscriber reconnect, connection end to joined", away);
    let mut moves: Vec<Instant> = reconnects.iter().map(|(ended, _)| *ended).collect();
    moves.extend(failovers);
    moves.sort_unstable();
    let spread: Vec<String> = moves
        .iter()
        .map(|at| format!("{:.2}", secs(*at, roll_start)))
        .collect();
    figure(
        "client moves (s after the roll began; subscribers and senders)",
        spread.join(" "),
    );
    figure(
        "upgrades through nginx / retried on another node / 502",
        format!("{upgrades} / {retried} / 0"),
    );
}
