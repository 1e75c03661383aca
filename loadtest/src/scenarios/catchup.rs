//! `catchup`: publishers fill a fresh room with N messages, then a client on another node joins
//! with `since=0` and the time from its `join` to holding seq N, in order and complete, is the
//! replay time. The replayed messages are checked like any delivery; their end-to-end latency is
//! not reported (their send times are from the filling).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::json;
use tokio::sync::watch;

use super::publish::{
    add_publishers, add_subscribers, connect_publishers, run_publishers, settle_heads,
};
use super::Ctx;
use crate::cli::Catchup;
use crate::client;
use crate::publisher::PublisherSpec;
use crate::report::Report;
use crate::stats::{self, CpuMeter};
use crate::subscriber::{Finals, Subscriber};

/// The replaying client reads as fast as it can: a large read buffer.
const REPLAY_READ_BUFFER: usize = 256 * 1024;

pub async fn run(ctx: &Ctx, args: &Catchup) -> Result<Report> {
    ensure!(
        args.messages > 0 && args.publishers > 0,
        "--messages and --publishers must be positive"
    );
    let mut report = Report::new(
        "catchup",
        json!({
            "messages": args.messages,
            "publishers": args.publishers,
            "window": args.window,
            "idem": ctx.idem,
        }),
    );
    report.nodes = ctx.node_urls();
    let rooms = ctx.rooms("catchup", 1);
    let room = rooms[0].clone();

    // Filling.
    let budget = Arc::new(AtomicU64::new(args.messages));
    let specs = (0..args.publishers)
        .map(|p| PublisherSpec {
            id: u32::try_from(p).unwrap_or(u32::MAX),
            node: ctx.node(p).clone(),
            rooms: vec![(0, room.clone())],
            window: args.window.max(1),
            interval: None,
            start_offset: Duration::ZERO,
            budget: Some(budget.clone()),
            pad: Arc::from(""),
            idem: ctx.idem,
        })
        .collect();
    let publishers = connect_publishers(ctx, specs, &mut report).await;
    ensure!(
        !publishers.is_empty(),
        "no publisher could connect: {:?}",
        report.error_samples
    );
    let fill_start = Instant::now();
    let stop_at = fill_start + args.fill_timeout;
    let (published, fill_end) = run_publishers(ctx, publishers, stop_at, &mut report).await;
    let heads = settle_heads(ctx, &rooms, &published, &mut report).await;
    let head = heads[0];
    if head != args.messages {
        report.error(format!(
            "the room holds {head} messages after filling, not {}",
            args.messages
        ));
    }
    add_publishers(&mut report, &published, fill_start, fill_end);
    report.extra("fill_secs", report.measured_secs);
    report.extra("fill_commits_per_sec", report.commits_per_sec);

    // Replay, from the last node (the filling went round-robin over all of them).
    let node = &ctx.nodes[ctx.nodes.len() - 1];
    let ws = client::connect(
        node,
        &ctx.auth,
        "loadtest-catchup",
        None,
        client::ws_config(REPLAY_READ_BUFFER),
        ctx.io_timeout,
    )
    .await?;
    let cpu = CpuMeter::start(&ctx.server_pids, &ctx.watched);
    let join_sent = Instant::now();
    let subscriber = Subscriber::join_on(ws, 0, room, Some(0), ctx.io_timeout).await?;
    let joined = Instant::now();
    let (_finals_tx, finals_rx) = watch::channel(Some(Finals {
        heads: Arc::new(heads),
        deadline: joined + ctx.drain_timeout,
    }));
    let outcome = subscriber.run(finals_rx, joined + ctx.drain_timeout).await;
    let cpu_use = cpu.stop();
    let done = outcome.completed;
    add_subscribers(
        &mut report,
        std::slice::from_ref(&outcome),
        join_sent,
        joined,
    );
    report.e2e_latency = None;
    report.cpu = Some(cpu_use);
    report.loadgen_rss_kib = stats::rss_kib(None);
    report.extra(
        "joined_ms",
        joined.duration_since(join_sent).as_secs_f64() * 1000.0,
    );
    match done {
        Some(done) => {
            let secs = done.duration_since(join_sent).as_secs_f64().max(1e-6);
            report.measured_secs = secs;
            report.deliveries_per_sec = outcome.delivered as f64 / secs;
            report.extra("replay_messages", outcome.delivered);
            report.extra("replay_secs", secs);
            report.extra("replay_msgs_per_sec", head as f64 / secs);
        }
        None => report.error(format!(
            "the replay did not reach seq {head} within {:?}",
            ctx.drain_timeout
        )),
    }
    Ok(report)
}
