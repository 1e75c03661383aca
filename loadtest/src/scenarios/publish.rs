//! The flow behind `fanout` and `throughput`: subscribers join fresh rooms with `since=0`,
//! publishers send for `--duration`, the rooms' final heads are read over HTTP, and every
//! subscriber must then reach its room's head within `--drain-timeout`.
//!
//! Since the rooms are fresh and only this run writes to them, the acks of a room must be
//! exactly the seqs `1..=head`, each once; a subscriber joined with `since=0` must receive the
//! same seqs, each once, in order. Anything else is counted.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use futures_util::future::join_all;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::watch;

use super::Ctx;
use crate::publisher::{Publisher, PublisherOutcome, PublisherSpec};
use crate::report::Report;
use crate::stats::{self, CpuMeter, Latency};
use crate::subscriber::{Finals, Subscriber, SubscriberOutcome};

/// Subscribers read a few frames at a time; small buffers keep thousands of them cheap.
/// tungstenite zero-fills the buffer's free space before every socket read, so this is also a
/// cost per read: at 16 KiB, zero-filling was 6% of the load generator's CPU in the fan-out run.
const SUBSCRIBER_READ_BUFFER: usize = 2 * 1024;

/// One run's shape.
pub struct Plan {
    pub scenario: &'static str,
    pub params: Value,
    pub rooms: usize,
    pub subscribers_per_room: usize,
    pub publishers: usize,
    pub window: usize,
    /// Time between two sends of one publisher; `None` = as fast as acks allow.
    pub interval: Option<Duration>,
    pub pad: usize,
}

pub async fn run(ctx: &Ctx, plan: Plan) -> Result<Report> {
    let mut params = plan.params.clone();
    params["idem"] = ctx.idem.into();
    let mut report = Report::new(plan.scenario, params);
    report.nodes = ctx.node_urls();
    let rooms = ctx.rooms(plan.scenario, plan.rooms);

    let subscribers =
        connect_subscribers(ctx, &rooms, plan.subscribers_per_room, &mut report).await;
    let specs = publisher_specs(ctx, &rooms, &plan);
    let publishers = connect_publishers(ctx, specs, &mut report).await;
    ensure!(
        !publishers.is_empty(),
        "no publisher could connect: {:?}",
        report.error_samples
    );
    report.extra("subscribers_connected", subscribers.len());
    report.extra("publishers_connected", publishers.len());

    let (finals_tx, finals_rx) = watch::channel(None);
    // Backstop only: subscribers normally stop at the finals' own deadline.
    let hard_stop = Instant::now() + ctx.duration + 2 * ctx.drain_timeout + ctx.io_timeout;
    let subscriber_tasks: Vec<_> = subscribers
        .into_iter()
        .map(|s| tokio::spawn(s.run(finals_rx.clone(), hard_stop)))
        .collect();
    drop(finals_rx);

    let cpu = CpuMeter::start(&ctx.server_pids, &ctx.watched);
    let start = Instant::now();
    let stop_at = start + ctx.duration;
    let (published, send_end) = run_publishers(ctx, publishers, stop_at, &mut report).await;

    let heads = settle_heads(ctx, &rooms, &published, &mut report).await;
    let drain_start = Instant::now();
    // Ignored error: no subscriber left to tell (they all failed to connect).
    let _no_receivers = finals_tx.send(Some(Finals {
        heads: Arc::new(heads),
        deadline: drain_start + ctx.drain_timeout,
    }));
    let mut received = Vec::with_capacity(subscriber_tasks.len());
    for outcome in join_all(subscriber_tasks).await {
        match outcome {
            Ok(outcome) => received.push(outcome),
            Err(e) => report.error(format!("a subscriber task failed: {e}")),
        }
    }
    let cpu_use = cpu.stop();

    add_publishers(&mut report, &published, start, send_end);
    add_subscribers(&mut report, &received, start, drain_start);
    report.cpu = Some(cpu_use);
    report.loadgen_rss_kib = stats::rss_kib(None);
    Ok(report)
}

/// Connects `per_room` subscribers to every room (spread over the nodes), joined with
/// `since=0`. Failures are recorded in `report`; the others are returned.
async fn connect_subscribers(
    ctx: &Ctx,
    rooms: &[Arc<str>],
    per_room: usize,
    report: &mut Report,
) -> Vec<Subscriber> {
    let jobs = rooms.iter().enumerate().flat_map(|(slot, room)| {
        (0..per_room).map(move |j| (slot * per_room + j, slot, room.clone()))
    });
    let results: Vec<_> = futures_util::stream::iter(jobs)
        .map(|(k, slot, room)| async move {
            let sub = format!("loadtest-sub-{k}");
            Subscriber::join(
                ctx.node(k),
                &ctx.auth,
                &sub,
                slot,
                room,
                Some(0),
                SUBSCRIBER_READ_BUFFER,
                ctx.io_timeout,
                ctx.library_subscribers,
            )
            .await
        })
        .buffer_unordered(ctx.connect_concurrency)
        .collect()
        .await;
    let mut subscribers = Vec::with_capacity(results.len());
    for result in results {
        match result {
            Ok(subscriber) => subscribers.push(subscriber),
            Err(e) => report.error(format!("subscriber: {e:#}")),
        }
    }
    subscribers
}

/// Publisher `p` goes to node `p mod nodes`; with at least as many publishers as rooms it sends
/// to room `p mod rooms`, else to every room `r` with `r mod publishers = p`.
fn publisher_specs(ctx: &Ctx, rooms: &[Arc<str>], plan: &Plan) -> Vec<PublisherSpec> {
    let pad: Arc<str> = Arc::from("x".repeat(plan.pad));
    (0..plan.publishers)
        .map(|p| {
            let own: Vec<(usize, Arc<str>)> = if plan.publishers >= rooms.len() {
                vec![(p % rooms.len(), rooms[p % rooms.len()].clone())]
            } else {
                (p..rooms.len())
                    .step_by(plan.publishers)
                    .map(|r| (r, rooms[r].clone()))
                    .collect()
            };
            PublisherSpec {
                id: u32::try_from(p).unwrap_or(u32::MAX),
                node: ctx.node(p).clone(),
                rooms: own,
                window: plan.window,
                interval: plan.interval,
                // Publisher p of P starts p/P of an interval late: the total rate arrives as a
                // steady stream, not in bursts of P sends at once.
                start_offset: plan
                    .interval
                    .map(|i| {
                        i * u32::try_from(p).unwrap_or(0)
                            / u32::try_from(plan.publishers).unwrap_or(1).max(1)
                    })
                    .unwrap_or_default(),
                budget: None,
                pad: pad.clone(),
                idem: ctx.idem,
            }
        })
        .collect()
}

/// Runs every publisher (each its own task) until `stop_at`, then until its acks are in. Returns
/// their outcomes and the time of the last ack (`stop_at` if none came); failed tasks are
/// recorded in `report`.
pub async fn run_publishers(
    ctx: &Ctx,
    publishers: Vec<Publisher>,
    stop_at: Instant,
    report: &mut Report,
) -> (Vec<PublisherOutcome>, Instant) {
    let tasks: Vec<_> = publishers
        .into_iter()
        .map(|p| tokio::spawn(p.run(stop_at, ctx.drain_timeout, ctx.io_timeout)))
        .collect();
    let mut published = Vec::with_capacity(tasks.len());
    for outcome in join_all(tasks).await {
        match outcome {
            Ok(outcome) => published.push(outcome),
            Err(e) => report.error(format!("a publisher task failed: {e}")),
        }
    }
    let last_ack = published
        .iter()
        .filter_map(|p| p.last_ack)
        .max()
        .unwrap_or(stop_at);
    (published, last_ack)
}

/// Connects every publisher; failures are recorded in `report`.
pub async fn connect_publishers(
    ctx: &Ctx,
    specs: Vec<PublisherSpec>,
    report: &mut Report,
) -> Vec<Publisher> {
    let results: Vec<_> = futures_util::stream::iter(specs)
        .map(|spec| Publisher::connect(spec, &ctx.auth, ctx.io_timeout))
        .buffer_unordered(ctx.connect_concurrency)
        .collect()
        .await;
    let mut publishers = Vec::with_capacity(results.len());
    for result in results {
        match result {
            Ok(publisher) => publishers.push(publisher),
            Err(e) => report.error(format!("publisher: {e:#}")),
        }
    }
    publishers
}

/// Head reads in flight at once in [`settle_heads`]: within the server's default per-user read
/// limit (4).
const HEAD_READS_AT_ONCE: usize = 4;

/// Reads every room's head over HTTP and checks the acks against it: each seq `1..=head`
/// acknowledged once. Returns the heads by room index (the highest ack where HTTP failed).
pub async fn settle_heads(
    ctx: &Ctx,
    rooms: &[Arc<str>],
    published: &[PublisherOutcome],
    report: &mut Report,
) -> Vec<u64> {
    let node = &ctx.nodes[0];
    // A few at a time: the server lets one user have only a few reads in flight
    // (`SEQCAST_USER_READ_CONCURRENCY`, default 4) and refuses the rest with 429.
    let answers: Vec<_> =
        futures_util::stream::iter(rooms.iter().map(|room| ctx.http.head(node, room)))
            .buffered(HEAD_READS_AT_ONCE)
            .collect()
            .await;
    let mut heads = Vec::with_capacity(rooms.len());
    for (index, (room, answer)) in rooms.iter().zip(answers).enumerate() {
        let acks: Vec<u64> = published
            .iter()
            .filter_map(|p| p.acked_seqs.get(&index))
            .flatten()
            .copied()
            .collect();
        let distinct: HashSet<u64> = acks.iter().copied().collect();
        let highest = distinct.iter().copied().max().unwrap_or(0);
        let head = match answer {
            Ok(head) => head,
            Err(e) => {
                report.error(format!(
                    "room {room}: cannot read the head ({e:#}); using the highest ack"
                ));
                highest
            }
        };
        let repeated = (acks.len() - distinct.len()) as u64;
        if repeated > 0 {
            report.duplicates += repeated;
            report.error(format!("room {room}: {repeated} seqs acknowledged twice"));
        }
        if highest > head {
            report.error(format!(
                "room {room}: ack seq {highest} above the head {head}"
            ));
        }
        let unacked = head.saturating_sub(distinct.len() as u64);
        if unacked > 0 {
            report.error(format!(
                "room {room}: head {head} but {} distinct acks ({unacked} commits not acknowledged)",
                distinct.len()
            ));
        }
        heads.push(head);
    }
    heads
}

/// Adds the publishers' figures to `report`: sends, commits and their rate over the sending
/// phase (start to last ack), ack latency, connections the client library had to reopen.
pub fn add_publishers(
    report: &mut Report,
    published: &[PublisherOutcome],
    start: Instant,
    send_end: Instant,
) {
    let mut ack_latency = Latency::new();
    let mut reconnects = 0;
    for p in published {
        reconnects += p.reconnects;
        report.sent += p.sent;
        report.commits += p.acked;
        ack_latency.merge(&p.ack_latency);
        report.errors_from(p.error_count, p.errors.clone());
    }
    let secs = send_end.duration_since(start).as_secs_f64().max(1e-3);
    report.measured_secs = secs;
    report.commits_per_sec = report.commits as f64 / secs;
    report.ack_latency = ack_latency.summary();
    report.extra("publisher_reconnects", reconnects);
}

/// Adds the subscribers' figures to `report`: deliveries and their rate (start to last
/// delivery), end-to-end latency, losses, duplicates, reordering, and how long the slowest
/// subscriber took after the final heads were known.
pub fn add_subscribers(
    report: &mut Report,
    received: &[SubscriberOutcome],
    start: Instant,
    drain_start: Instant,
) {
    let mut e2e = Latency::new();
    let mut last_delivery = None;
    let mut last_complete = None;
    let mut incomplete = 0u64;
    for s in received {
        report.deliveries += s.delivered;
        report.lost += s.lost;
        report.duplicates += s.duplicates;
        report.out_of_order += s.out_of_order;
        e2e.merge(&s.latency);
        report.errors_from(s.error_count, s.errors.clone());
        last_delivery = last_delivery.max(s.last_delivery);
        match s.completed {
            Some(done) => last_complete = last_complete.max(Some(done)),
            None => incomplete += 1,
        }
    }
    if let Some(last) = last_delivery {
        report.deliveries_per_sec =
            report.deliveries as f64 / last.duration_since(start).as_secs_f64().max(1e-3);
    }
    report.e2e_latency = e2e.summary();
    report.extra("subscribers_incomplete", incomplete);
    if let Some(done) = last_complete {
        report.extra(
            "drain_secs",
            done.saturating_duration_since(drain_start).as_secs_f64(),
        );
    }
}
