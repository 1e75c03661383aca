//! One node (on Postgres) keeps serving an honest client while 2,000 garbage connections flood
//! it.
//!
//! The honest client (its own thread and runtime) measures send -> receive latency of its own
//! messages, paced under the default per-connection send rate, three times: on a quiet node;
//! while the same flood is aimed at another node on the machine (the machine's floor: the
//! attacker takes a core, but this node does none of the flood's work); and while the garbage
//! (another thread and runtime with one worker, so the attacker has one of the machine's two
//! cores) holds 2,000 connections open to this node:
//! - 800 silent TCP connections that never send a byte (slowloris; the handshake timeout reaps
//!   them);
//! - 600 TCP connections that send junk: random bytes, endless header lines, upgrades without a
//!   key;
//! - 400 WebSocket connections that say nothing (but answer pings);
//! - 200 WebSocket connections that send garbage as fast as they can: text that is not JSON, JSON
//!   that is not a frame, invalid rooms, too large bodies, deep nesting, binary frames, pings,
//!   and (one in eight) frames over the frame limit; a quarter never read what the server sends.
//!
//! Every connection that ends is reopened, a bounded number of times; every loop ends at the
//! flood's stop signal or its hard deadline. The test asserts the honest client receives every
//! message, in order, that a newcomer can connect and catch up during the flood, and that the
//! flood really happened. It prints the three latency figures on `FIGURE` lines (shown without
//! `--nocapture`) and whether the p99 under the flood is within 2x of the unloaded one; timing is
//! not asserted here (see the end of the test).
#![allow(clippy::unwrap_used)]

mod garbage;
#[path = "../support/mod.rs"]
mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use garbage::Flood;
use serde_json::json;
use support::server::{ServerOptions, StoreKind, TestServer};
use support::ws::{Event, WsClient, RECV_DEADLINE};

/// Garbage connections held open at once.
const GARBAGE_CONNECTIONS: usize = 2_000;
/// Honest messages per measurement (10 s at 40/s): p99 is then the 4th worst, not one hiccup.
const HONEST_MESSAGES: usize = 400;
/// One honest send every 25 ms: 40/s, under the default per-connection rate (50/s).
const HONEST_INTERVAL: Duration = Duration::from_millis(25);
/// File descriptors kept free for everything but the garbage sockets (per process).
const FD_RESERVE: usize = 300;

#[test]
fn honest_client_keeps_its_latency_under_a_garbage_flood() {
    let garbage = garbage_connections_for_fd_limit();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(300), scenario(garbage))
            .await
            .expect("the flood scenario did not finish within 5 minutes");
    });
}

async fn scenario(garbage: usize) {
    let server = TestServer::start(
        // Postgres (the test server runs without fsync): the latency measured is the node's,
        // not the disk's. SQLite's fsync per commit swings by seconds on a machine whose disk
        // is busy with something else.
        ServerOptions::new(StoreKind::Postgres)
            // Garbage makes for a lot of debug/warn lines; errors still show.
            .env("RUST_LOG", "error"),
    )
    .await;
    let room = "flood-honest";
    let mut honest = WsClient::connect(&server).await;
    honest.join(room, None).await;
    let rss_before = server.rss_kib();

    let unloaded = measure(&mut honest, room, 0, 0).await;

    // The machine's floor: the same flood aimed at another node on this machine, so the honest
    // client and its node share the CPU with the attacker exactly as below, but the node does
    // none of the flood's work. What the node adds under the flood is the difference.
    let floor = {
        let decoy =
            TestServer::start(ServerOptions::new(StoreKind::Postgres).env("RUST_LOG", "error"))
                .await;
        let flood = Flood::start(decoy.addr, garbage);
        flood.in_full_swing(garbage).await;
        let floor = measure(&mut honest, room, HONEST_MESSAGES, unloaded.last_seq).await;
        flood.alive("the floor measurement");
        flood.stop().await;
        floor
    };

    let flood = Flood::start(server.addr, garbage);
    flood.in_full_swing(garbage).await;
    let stats = Arc::clone(&flood.stats);
    let open_at_start = stats.open.load(Ordering::Relaxed);
    let frames_at_start = stats.ws_frames.load(Ordering::Relaxed);
    let measuring = Instant::now();

    let loaded = measure(&mut honest, room, 2 * HONEST_MESSAGES, floor.last_seq).await;

    let flood_rate = (stats.ws_frames.load(Ordering::Relaxed) - frames_at_start) as f64
        / measuring.elapsed().as_secs_f64();
    let open_at_end = stats.open.load(Ordering::Relaxed);
    flood.alive("the measurement");

    // A newcomer connects during the flood and catches up from the database.
    let mut newcomer = WsClient::connect(&server).await;
    let since = loaded.last_seq - 10;
    newcomer.join(room, Some(since)).await;
    let replayed = newcomer.collect_seqs(room, 10, RECV_DEADLINE).await;
    assert_eq!(
        replayed,
        (since + 1..=loaded.last_seq).collect::<Vec<_>>(),
        "a newcomer during the flood replays what it asked for"
    );
    let rss_during = server.rss_kib();

    flood.stop().await;
    honest.ping().await;

    let summary = |m: &Measurement| {
        format!(
            "p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
            ms(m.percentile(50)),
            ms(m.p99()),
            ms(m.max())
        )
    };
    figure(format!(
        "FIGURE flood: honest send->receive latency over {HONEST_MESSAGES} messages at 40/s: \
         unloaded {}; flood aimed at another node (the machine's floor) {}; flood aimed at this \
         node {}",
        summary(&unloaded),
        summary(&floor),
        summary(&loaded),
    ));
    figure(format!(
        "FIGURE flood: garbage {garbage} connections (first connected: {:?}); open when \
         measuring {open_at_start} -> {open_at_end}; {} connections opened in all, {} WebSocket \
         frames sent ({flood_rate:.0}/s while measuring), {} junk bytes, {} server frames read; \
         upgrades refused {:?}; closes {:?}; server RSS {rss_before} KiB -> {rss_during} KiB",
        stats.first_connected.lock().unwrap(),
        stats.connected.load(Ordering::Relaxed),
        stats.ws_frames.load(Ordering::Relaxed),
        stats.junk_bytes.load(Ordering::Relaxed),
        stats.replies.load(Ordering::Relaxed),
        stats.refused.lock().unwrap(),
        stats.closes.lock().unwrap(),
    ));

    assert!(
        stats.first_connected() >= garbage * 95 / 100,
        "the flood must have made its {garbage} connections: {:?}",
        stats.first_connected.lock().unwrap()
    );
    assert!(
        flood_rate > 1_000.0,
        "the flood must keep sending while the honest client measures: {flood_rate:.0} frames/s"
    );
    // Timing is reported, not asserted: `cargo test` runs a debug build on a shared two-core box,
    // and the brief keeps timing assertions out of `cargo test`. The target (p99 within 2x of
    // unloaded) and the measured figures are in docs/security.md, "Flood test".
    let two_x = 2 * unloaded.p99();
    figure(format!(
        "FIGURE flood: honest p99 {:.1} ms under the flood vs {:.1} ms unloaded ({:.1}x; 2x {}) and \
         {:.1} ms with the flood aimed elsewhere (the node adds {:+.1} ms)",
        ms(loaded.p99()),
        ms(unloaded.p99()),
        loaded.p99().as_secs_f64() / unloaded.p99().as_secs_f64(),
        if loaded.p99() <= two_x { "met" } else { "not met" },
        ms(floor.p99()),
        ms(loaded.p99()) - ms(floor.p99()),
    ));
}

/// Latencies of one measurement and the last seq it saw.
struct Measurement {
    latencies: Vec<Duration>,
    last_seq: u64,
}

impl Measurement {
    fn percentile(&self, p: usize) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let rank = (sorted.len() * p).div_ceil(100).max(1);
        sorted[rank - 1]
    }
    fn p99(&self) -> Duration {
        self.percentile(99)
    }
    fn max(&self) -> Duration {
        self.latencies.iter().copied().max().unwrap_or_default()
    }
}

/// Sends [`HONEST_MESSAGES`] messages (bodies `first..`), one every [`HONEST_INTERVAL`], each
/// timed from its send to the arrival of its own `message` frame. Asserts each comes back with
/// the next seq after `after_seq`, with its body, and is acknowledged with that seq.
async fn measure(client: &mut WsClient, room: &str, first: usize, after_seq: u64) -> Measurement {
    let mut pace = tokio::time::interval(HONEST_INTERVAL);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut latencies = Vec::with_capacity(HONEST_MESSAGES);
    let mut last_seq = after_seq;
    for i in first..first + HONEST_MESSAGES {
        pace.tick().await;
        let reference = client.new_ref();
        let sent = Instant::now();
        client
            .send_json(json!({"type": "send", "room": room, "body": {"i": i}, "ref": reference}))
            .await;
        let mut ack_seq = None;
        let mut message_seq = None;
        while ack_seq.is_none() || message_seq.is_none() {
            let remaining = RECV_DEADLINE.saturating_sub(sent.elapsed());
            match client.next_event(remaining).await {
                Some(Event::Frame(frame)) if frame["type"] == "message" => {
                    latencies.push(sent.elapsed());
                    assert_eq!(
                        frame["body"],
                        json!({"i": i}),
                        "message {i} out of order: {frame}"
                    );
                    assert_eq!(frame["seq"], last_seq + 1, "message {i} seq: {frame}");
                    last_seq += 1;
                    message_seq = Some(last_seq);
                }
                Some(Event::Frame(frame)) if frame["ref"] == reference => {
                    assert_eq!(frame["type"], "ack", "reply to message {i}: {frame}");
                    ack_seq = frame["seq"].as_u64();
                }
                Some(other) => panic!("honest client, message {i}: unexpected {other:?}"),
                None => panic!("honest client: message {i} not back within {RECV_DEADLINE:?}"),
            }
        }
        assert_eq!(
            ack_seq, message_seq,
            "ack and message of {i} agree on the seq"
        );
    }
    Measurement {
        latencies,
        last_seq,
    }
}

/// Prints a `FIGURE` line past the test harness's output capture, so that it shows in every
/// run's log, not only with `--nocapture`.
fn figure(line: String) {
    use std::io::Write as _;
    writeln!(std::io::stderr(), "{line}").expect("write a FIGURE line to stderr");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The garbage connection count that fits this process's open-file limit, which is first
/// raised to its hard limit (with `prlimit`, since the workspace forbids `unsafe`); the server,
/// spawned afterwards, inherits it. Each process holds one socket per garbage connection.
fn garbage_connections_for_fd_limit() -> usize {
    let hard = nofile_limits().1;
    let raised = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={hard}:{hard}"))
        .status()
        .is_ok_and(|s| s.success());
    let (soft, hard) = nofile_limits();
    let fits = soft.saturating_sub(FD_RESERVE);
    if fits < GARBAGE_CONNECTIONS {
        eprintln!(
            "flood: open-file limit {soft} (hard {hard}, raised: {raised}) leaves room for {fits} \
             garbage connections, not {GARBAGE_CONNECTIONS}: scaled down"
        );
    }
    assert!(
        fits >= 200,
        "open-file limit {soft} is too low for a flood test"
    );
    fits.min(GARBAGE_CONNECTIONS)
}

/// (soft, hard) `Max open files` of this process; `unlimited` reads as `usize::MAX`.
fn nofile_limits() -> (usize, usize) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files in /proc/self/limits");
    let mut numbers = line["Max open files".len()..]
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(usize::MAX));
    (numbers.next().unwrap(), numbers.next().unwrap())
}
