//! A rolling restart of a 3-node cluster behind a real nginx, as `deploy/local/cluster.sh` runs it
//! (throwaway Postgres with an ICU collation, Redis, nginx as deploy/nginx/ configures it), while
//! clients connected through nginx send and receive: every node gets SIGTERM in turn, drains
//! (`/ready` 503, sessions served for the drain delay, then 1012 spread over the drain window), is
//! started again and waited for until `/ready` answers 200.
//!
//! The clients are the Rust client library (`clients/rust`, `seqcast-client`), as an application
//! would use it: it reconnects through nginx by itself, rejoins with `since` and resends what was
//! not acknowledged with the same `idem` (each client names itself with a `dev:NAME` token, so
//! its user, to which `idem` is scoped, survives a reconnect).
//!
//! Checked: every message acknowledged exactly once with seqs 1..=N per room, every subscriber
//! received exactly those messages once each and in order (the library's promise, checked here
//! from outside), every client was moved at least once (so the roll really went through them),
//! and nginx answered no upgrade with 502/504 (the trap of `max_fails`, docs/operations.md "Load
//! balancer"). Reported (`cargo test --test rolling_restart -- --nocapture`, lines `FIGURE`): the
//! longest delivery pause a subscriber saw, delivery delays, and how the reconnects spread over
//! the roll.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::stream::{FuturesUnordered, StreamExt};
use seqcast_client::{Client, Event, Options, State};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

use support::cluster::DelayStats;
use support::scenario::{figure, ms};

const ROOMS: [&str; 2] = ["roll-a", "roll-b"];
const SENDERS_PER_ROOM: usize = 2;
const LISTENERS_PER_ROOM: usize = 3;
/// Per sender: one message per [`PACE`], so the streams outlast the roll (about 3 x (drain delay
/// 2 s + spread 2 s + restart)) with room to spare on a slow machine.
const MESSAGES: usize = 1_500;
const PACE: Duration = Duration::from_millis(20);
/// Sends in flight per sender at most.
const WINDOW: usize = 8;
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

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// A client's connection history: when each connection was lost and when the next one opened.
#[derive(Default)]
struct Moves {
    lost: Vec<Instant>,
    /// Lost to open again, per reconnect.
    away: Vec<Duration>,
}

impl Moves {
    fn observe(&mut self, state: &State, lost_at: &mut Option<Instant>) {
        match state {
            State::Reconnecting { .. } if lost_at.is_none() => {
                let now = Instant::now();
                self.lost.push(now);
                *lost_at = Some(now);
            }
            State::Open { .. } => {
                if let Some(at) = lost_at.take() {
                    self.away.push(at.elapsed());
                }
            }
            _ => {}
        }
    }
}

/// What a subscriber received: (seq, body, arrival).
type Received = Vec<(u64, Value, Instant)>;

/// Reads a subscriber's events until it has `until_seq`, recording messages and moves.
fn subscribe(
    label: String,
    mut events: UnboundedReceiver<Event>,
    until_seq: u64,
) -> JoinHandle<(Received, Moves)> {
    tokio::spawn(async move {
        let mut received = Vec::new();
        let mut moves = Moves::default();
        let mut lost_at = None;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while received.last().map_or(0, |(seq, _, _)| *seq) < until_seq {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(Event::Message(m))) => received.push((m.seq, m.body, Instant::now())),
                Ok(Some(Event::State(state))) => moves.observe(&state, &mut lost_at),
                Ok(Some(_)) => {}
                Ok(None) => panic!("{label}: the client closed"),
                Err(_) => panic!(
                    "{label}: {} messages within {DEADLINE:?}, wanted up to seq {until_seq}",
                    received.len()
                ),
            }
        }
        (received, moves)
    })
}

/// Sends `MESSAGES` bodies `{w, i, t}` with `idem` `{label}-{i}`, paced and windowed; returns
/// each one's acked seq (by index) and the client's moves.
fn send_all(
    label: String,
    client: Client,
    room: &'static str,
    mut events: UnboundedReceiver<Event>,
    progress: Arc<AtomicUsize>,
) -> JoinHandle<(Vec<(u64, Value)>, Moves)> {
    // The sender's own events: only its moves matter.
    let moves = Arc::new(Mutex::new(Moves::default()));
    let watcher = Arc::clone(&moves);
    tokio::spawn(async move {
        let mut lost_at = None;
        while let Some(event) = events.recv().await {
            if let Event::State(state) = event {
                watcher.lock().unwrap().observe(&state, &mut lost_at);
            }
        }
    });
    tokio::spawn(async move {
        let mut acked: Vec<Option<(u64, Value)>> = vec![None; MESSAGES];
        let mut in_flight = FuturesUnordered::new();
        let mut next = 0;
        let mut pace = tokio::time::interval(PACE);
        while next < MESSAGES || !in_flight.is_empty() {
            tokio::select! {
                _ = pace.tick(), if next < MESSAGES && in_flight.len() < WINDOW => {
                    let body = json!({"w": label, "i": next, "t": now_micros()});
                    let send = client.send(room, body.clone(), Some(format!("{label}-{next}")));
                    let index = next;
                    in_flight.push(async move { (index, body, send.await) });
                    next += 1;
                }
                Some((index, body, ack)) = in_flight.next() => {
                    let ack = ack.unwrap_or_else(|e| panic!("{label}: send {index} failed: {e}"));
                    assert!(acked[index].is_none(), "{label}: send {index} resolved twice");
                    acked[index] = Some((ack.seq, body));
                    progress.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        client.close().await;
        let acked = acked
            .into_iter()
            .map(|a| a.expect("every send acked"))
            .collect();
        let moves = std::mem::take(&mut *moves.lock().unwrap());
        (acked, moves)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_behind_nginx_loses_nothing_and_nginx_never_answers_502() {
    let cluster = LocalCluster::start(3).await;
    let connect =
        |label: &str| Client::new(Options::new(cluster.url.clone()).token(format!("dev:{label}")));
    let per_room = (SENDERS_PER_ROOM * MESSAGES) as u64;

    let mut subscribers = Vec::new();
    for room in ROOMS {
        for i in 0..LISTENERS_PER_ROOM {
            let label = format!("{room}-listener{i}");
            let (client, events) = connect(&label);
            client.join(room, Some(0)).await.unwrap();
            subscribers.push((
                room,
                label.clone(),
                client,
                subscribe(label, events, per_room),
            ));
        }
    }
    let progress = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for room in ROOMS {
        for i in 0..SENDERS_PER_ROOM {
            let label = format!("{room}-sender{i}");
            let (client, events) = connect(&label);
            let task = send_all(label.clone(), client, room, events, Arc::clone(&progress));
            senders.push((room, label, task));
        }
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

    // Every message acknowledged once, under seqs 1..=N of its room.
    let mut by_seq: HashMap<&str, HashMap<u64, Value>> = HashMap::new();
    let mut all_moves = Vec::new();
    for (room, label, task) in senders {
        let (acked, moves) = task.await.unwrap();
        assert!(
            !moves.lost.is_empty(),
            "{label}: never moved during the roll"
        );
        all_moves.push(moves);
        for (seq, body) in acked {
            let previous = by_seq.entry(room).or_default().insert(seq, body.clone());
            assert!(previous.is_none(), "{room}: seq {seq} acked twice ({body})");
        }
    }
    for room in ROOMS {
        let seqs = &by_seq[room];
        assert!(
            (1..=per_room).all(|seq| seqs.contains_key(&seq)),
            "{room}: the acked seqs are not 1..={per_room}"
        );
    }
    // Every subscriber got exactly those, once each, in order.
    let mut streams = Vec::new();
    for (room, label, client, task) in subscribers {
        let (received, moves) = task.await.unwrap();
        client.close().await;
        let seqs: Vec<u64> = received.iter().map(|(seq, _, _)| *seq).collect();
        assert!(
            seqs.iter().copied().eq(1..=per_room),
            "{label}: not 1..={per_room} once each in order (got {} messages)",
            seqs.len()
        );
        for (seq, body, _) in &received {
            assert_eq!(
                &by_seq[room][seq], body,
                "{label}: seq {seq} is another message"
            );
        }
        assert!(
            !moves.lost.is_empty(),
            "{label}: never moved during the roll"
        );
        all_moves.push(moves);
        streams.push(received);
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
    let longest_pause = streams
        .iter()
        .flat_map(|stream| {
            stream
                .windows(2)
                .map(|pair| pair[1].2.saturating_duration_since(pair[0].2))
        })
        .max()
        .unwrap_or_default();
    // Send time (in the body) to arrival, on the wall clock of this one machine.
    let delays = DelayStats::of(streams.iter().flatten().map(|(_, body, arrived)| {
        let sent = body["t"].as_u64().unwrap();
        let arrived_at = now_micros().saturating_sub(arrived.elapsed().as_micros() as u64);
        Duration::from_micros(arrived_at.saturating_sub(sent))
    }));
    let away = DelayStats::of(all_moves.iter().flat_map(|m| m.away.iter().copied()));
    figure("roll duration", ms(roll_end - roll_start));
    figure(
        "longest delivery pause at a subscriber (between two arrivals)",
        ms(longest_pause),
    );
    figure("delivery delay, send to arrival, all subscribers", delays);
    figure("client reconnect, connection lost to open again", away);
    let mut lost: Vec<Instant> = all_moves
        .iter()
        .flat_map(|m| m.lost.iter().copied())
        .collect();
    lost.sort_unstable();
    let spread: Vec<String> = lost
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
