//! `connections`: C idle connections, each joined to a room, held for `--duration`; reports the
//! servers' RSS growth per connection (`--server-pid`, `VmRSS` of `/proc/<pid>/status`).
//!
//! One source address has about 28,000 ephemeral ports (32768-60999) towards one server port,
//! so connections are spread over the source addresses 127.0.0.1 .. 127.0.0.N (all of 127/8 is
//! loopback on Linux). Each connection lives in its own task, which keeps reading (so the
//! WebSocket stack answers the server's pings) and waits for the phase to change: after the
//! hold, every connection sends an application `ping` and must get its `pong`, which proves it
//! is still open and served; then all close.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use super::Ctx;
use crate::cli::Connections;
use crate::client::{self, Incoming, Ws};
use crate::report::Report;
use crate::stats::{self, CpuMeter};
use crate::subscriber::Subscriber;

/// Connections per source address when `--source-ips` is 0.
const PER_SOURCE_IP: usize = 20_000;

/// Idle connections read almost nothing: a small buffer each.
const IDLE_READ_BUFFER: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Hold,
    Ping,
    Close,
}

pub async fn run(ctx: &Ctx, args: &Connections) -> Result<Report> {
    ensure!(
        args.connections > 0 && args.rooms > 0,
        "--connections and --rooms must be positive"
    );
    let source_ips = if args.source_ips == 0 {
        u8::try_from(args.connections.div_ceil(PER_SOURCE_IP).clamp(1, 250)).unwrap_or(250)
    } else {
        args.source_ips
    };
    let mut report = Report::new(
        "connections",
        json!({
            "connections": args.connections,
            "rooms": args.rooms,
            "source_ips": source_ips,
            "hold_secs": ctx.duration.as_secs_f64(),
        }),
    );
    report.nodes = ctx.node_urls();
    let rooms = ctx.rooms("idle", args.rooms);

    let rss_before: Vec<Option<u64>> = ctx
        .server_pids
        .iter()
        .map(|&pid| stats::rss_kib(Some(pid)))
        .collect();
    let own_before = stats::rss_kib(None);
    let cpu = CpuMeter::start(&ctx.server_pids, &ctx.watched);

    // Connect and join.
    let connect_start = Instant::now();
    let (phase_tx, phase_rx) = watch::channel(Phase::Hold);
    let (result_tx, mut result_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let jobs = (0..args.connections).map(|k| {
        let source = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (k % usize::from(source_ips)) as u8,
        ));
        (k, source, rooms[k % rooms.len()].clone())
    });
    let opened: Vec<_> = futures_util::stream::iter(jobs)
        .map(|(k, source, room)| async move {
            let sub = format!("loadtest-idle-{k}");
            let ws = client::connect(
                ctx.node(k),
                &ctx.auth,
                &sub,
                Some(source),
                client::ws_config(IDLE_READ_BUFFER),
                ctx.io_timeout,
            )
            .await?;
            let joined = Subscriber::join_on(ws, 0, room, None, ctx.io_timeout).await?;
            joined
                .into_ws()
                .ok_or_else(|| anyhow::anyhow!("join_on gives a raw subscriber"))
        })
        .buffer_unordered(ctx.connect_concurrency)
        .collect()
        .await;
    let connect_secs = connect_start.elapsed().as_secs_f64();
    let mut holders = Vec::with_capacity(opened.len());
    for result in opened {
        match result {
            Ok(ws) => holders.push(tokio::spawn(hold(
                ws,
                phase_rx.clone(),
                result_tx.clone(),
                ctx.io_timeout,
            ))),
            Err(e) => report.error(format!("connection: {e:#}")),
        }
    }
    drop(result_tx);
    let open = holders.len();

    // Hold: the point of the scenario is to sit idle for a while.
    tokio::time::sleep(ctx.duration).await;
    let rss_after: Vec<Option<u64>> = ctx
        .server_pids
        .iter()
        .map(|&pid| stats::rss_kib(Some(pid)))
        .collect();
    let own_after = stats::rss_kib(None);

    // Every connection must still answer.
    let ping_start = Instant::now();
    if phase_tx.send(Phase::Ping).is_err() {
        // No holder left: the count below reports it.
    }
    let mut answered = 0usize;
    let mut results = 0usize;
    let ping_deadline = ping_start + ctx.io_timeout + Duration::from_secs(5);
    while results < open {
        match tokio::time::timeout_at(ping_deadline.into(), result_rx.recv()).await {
            Ok(Some(Ok(()))) => answered += 1,
            Ok(Some(Err(e))) => report.error(e),
            Ok(None) | Err(_) => break,
        }
        results += 1;
    }
    if results < open {
        report.error(format!(
            "{} connections neither answered nor failed in time",
            open - results
        ));
    }
    let ping_secs = ping_start.elapsed().as_secs_f64();
    if phase_tx.send(Phase::Close).is_err() {
        // No holder left to close.
    }
    let closing = tokio::time::timeout(ctx.io_timeout, join_all(holders)).await;
    if closing.is_err() {
        report.error("closing the connections took longer than the I/O timeout");
    }
    let cpu_use = cpu.stop();

    report.measured_secs = connect_secs + ctx.duration.as_secs_f64();
    report.cpu = Some(cpu_use);
    report.loadgen_rss_kib = own_after;
    report.extra("connections_open", open);
    report.extra("connections_failed", args.connections - open);
    report.extra("connections_answering", answered);
    report.extra("connect_secs", connect_secs);
    report.extra("connects_per_sec", open as f64 / connect_secs.max(1e-3));
    report.extra("ping_round_secs", ping_secs);
    let before: Option<u64> = rss_before.iter().copied().sum();
    let after: Option<u64> = rss_after.iter().copied().sum();
    if let (Some(before), Some(after)) = (before, after) {
        report.extra("server_rss_before_kib", before);
        report.extra("server_rss_after_kib", after);
        if open > 0 {
            report.extra(
                "server_kib_per_connection",
                after.saturating_sub(before) as f64 / open as f64,
            );
        }
    } else if !ctx.server_pids.is_empty() {
        report.error("cannot read the RSS of every --server-pid");
    }
    if let (Some(before), Some(after), true) = (own_before, own_after, open > 0) {
        report.extra(
            "loadgen_kib_per_connection",
            after.saturating_sub(before) as f64 / open as f64,
        );
    }
    Ok(report)
}

/// One idle connection: reads until told to ping, reports whether its pong came, and closes
/// when told to. A connection that ends before it has reported reports that instead; each
/// connection reports exactly once.
async fn hold(
    mut ws: Ws,
    mut phase: watch::Receiver<Phase>,
    results: mpsc::UnboundedSender<Result<(), String>>,
    timeout: Duration,
) {
    let mut reported = false;
    let mut tell = |result: Result<(), String>| {
        if !reported && results.send(result).is_err() {
            // The scenario stopped listening (its deadline passed): nothing left to tell.
        }
        reported = true;
    };
    let mut pinged = false;
    loop {
        tokio::select! {
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    if pinged && Incoming::parse(&text).is_ok_and(|f| f.kind == "pong") {
                        tell(Ok(()));
                        pinged = false;
                    }
                }
                Some(Ok(Message::Close(close))) => {
                    tell(Err(format!("connection closed by the server: {close:?}")));
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tell(Err(format!("connection failed: {e}")));
                    return;
                }
                None => {
                    tell(Err("connection ended".to_owned()));
                    return;
                }
            },
            changed = phase.changed() => {
                let now = if changed.is_ok() { *phase.borrow_and_update() } else { Phase::Close };
                match now {
                    Phase::Hold => {}
                    Phase::Ping => {
                        if let Err(e) = ws.send(Message::text(client::ping_frame(2))).await {
                            tell(Err(format!("ping failed: {e}")));
                            return;
                        }
                        pinged = true;
                    }
                    Phase::Close => {
                        // Best effort: the figures are taken; the server sees the end either way.
                        let _closed = tokio::time::timeout(timeout, ws.close(None)).await;
                        return;
                    }
                }
            }
        }
    }
}
