//! The delivery guarantees across a cluster (`protocol.md`, "Guarantees"): several nodes sharing
//! one Postgres and one Redis, and what happens when Redis pauses, dies or drops pub/sub
//! messages, when a node dies, and when there is no Redis at all. Also leader failover.
//!
//! Every scenario runs alone (see [`scenario`]) so the delays it measures are its own; the
//! figures are printed with a `FIGURE` prefix (`cargo test --test cluster -- --nocapture`).
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;

use support::cluster::{
    check_stream, listen, now_micros, spawn_sender, wait_until, Cluster, DelayStats, Ledger,
    ListenSpec, Listening, Pacing, Received, Sender,
};
use support::redis::TestRedis;

/// Deadline of one scenario, lock wait excluded.
const SCENARIO_DEADLINE: Duration = Duration::from_secs(150);
/// Deadline for the senders and subscribers of a stream.
const STREAM_DEADLINE: Duration = Duration::from_secs(90);
/// How long Redis stays paused in the pause scenario.
const REDIS_PAUSE: Duration = Duration::from_secs(5);
/// Slack allowed on top of an outage before a message must have arrived. Generous: CI boxes
/// have two loaded cores.
const DELIVERY_SLACK: Duration = Duration::from_secs(5);
/// Lifetime of the leader lock in the failover scenario (`SEQCAST_LEADER_TTL`).
const LEADER_TTL: Duration = Duration::from_secs(2);

/// Runs one scenario with [`SCENARIO_DEADLINE`], after every other scenario of this file has
/// finished: they measure delays, which concurrent clusters on two cores would distort.
async fn scenario(name: &str, body: impl Future<Output = ()>) {
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    eprintln!("=== {name}");
    let start = Instant::now();
    if tokio::time::timeout(SCENARIO_DEADLINE, body).await.is_err() {
        panic!("scenario {name} did not finish within {SCENARIO_DEADLINE:?}");
    }
    eprintln!("=== {name}: done in {:.1}s", start.elapsed().as_secs_f64());
}

/// Prints a measured figure.
fn figure(what: &str, value: impl std::fmt::Display) {
    eprintln!("FIGURE {what}: {value}");
}

fn ms(duration: Duration) -> String {
    format!("{:.0}ms", duration.as_secs_f64() * 1e3)
}

/// The subscribers' delays for messages sent from another node.
fn cross_node_delays(streams: &[Vec<Received>]) -> DelayStats {
    DelayStats::of(
        streams
            .iter()
            .flatten()
            .filter(|m| m.body["n"].as_u64() != Some(m.node as u64))
            .map(|m| m.delay),
    )
}

/// Waits for every subscriber to reach `ledger.head` and checks each stream from seq `first`.
async fn finish_and_check(
    listeners: Vec<(String, u64, Listening)>,
    target: &watch::Sender<u64>,
    ledger: &Ledger,
) -> Vec<Vec<Received>> {
    target.send_replace(ledger.head);
    let mut streams = Vec::new();
    for (label, first, listening) in listeners {
        let received = listening.finish().await;
        check_stream(&label, &received, first, ledger);
        streams.push(received);
    }
    streams
}

/// Starts a subscriber per `(label, node)`, each joined live from an empty room.
async fn listeners_on(
    cluster: &Cluster,
    room: &str,
    nodes: &[(&str, usize)],
    target: &watch::Receiver<u64>,
    until: Instant,
) -> Vec<(String, u64, Listening)> {
    let mut listeners = Vec::new();
    for &(label, node) in nodes {
        let spec = ListenSpec::new(label, room, cluster.ws(node));
        listeners.push((
            label.to_owned(),
            1,
            listen(spec, target.clone(), until).await,
        ));
    }
    listeners
}

async fn join_senders(handles: Vec<tokio::task::JoinHandle<Sender>>) -> Vec<Sender> {
    let mut senders = Vec::new();
    for handle in handles {
        match handle.await {
            Ok(sender) => senders.push(sender),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("sender task: {e}"),
        }
    }
    senders
}

fn ledger_of(senders: &[Sender]) -> Ledger {
    Ledger::of(&senders.iter().collect::<Vec<_>>())
}

/// Waits until `progress` reaches `count`.
async fn progress_reaches(progress: &AtomicUsize, count: usize, what: &str) {
    wait_until(STREAM_DEADLINE, what, || async move {
        progress.load(Ordering::Relaxed) >= count
    })
    .await;
}

/// Waits until every subscriber has received `seq`; returns how long that took.
async fn all_reach(
    listeners: &[(String, u64, Listening)],
    seq: u64,
    deadline: Duration,
) -> Duration {
    wait_until(
        deadline,
        &format!("seq {seq} at every subscriber"),
        || async move {
            listeners
                .iter()
                .all(|(_, _, l)| l.last_seq.load(Ordering::Relaxed) >= seq)
        },
    )
    .await
}

/// Waits until the subscriber `listening` has received `seq`.
async fn reaches(listening: &Listening, seq: u64, deadline: Duration, what: &str) {
    let last = &*listening.last_seq;
    wait_until(deadline, what, || async move {
        last.load(Ordering::Relaxed) >= seq
    })
    .await;
}

/// Whether `/ready` of every node in `nodes` shows a Redis bus in `state` (asserting 200).
async fn bus_state_is(cluster: &Cluster, nodes: &[usize], state: &str) -> bool {
    let mut all = true;
    for &node in nodes {
        let ready = ready_ok(cluster, node).await;
        assert_eq!(ready["bus"], "redis", "/ready of n{node}: {ready}");
        all &= ready["bus_state"] == state;
    }
    all
}

/// The number of pub/sub connections Redis has.
fn pubsub_clients(redis: &TestRedis) -> usize {
    redis
        .command(&["CLIENT", "LIST", "TYPE", "pubsub"])
        .lines()
        .filter(|line| line.contains("id="))
        .count()
}

/// `/ready` of `node` in a cluster, asserting 200.
async fn ready_ok(cluster: &Cluster, node: usize) -> Value {
    let (status, body) = cluster.ready(node).await;
    assert_eq!(status, 200, "/ready of n{node}: {body}");
    body
}

/// 1. A message sent on one node reaches the sessions on the others; then a light paced
/// stream measures the cross-node delivery latency in normal operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_sent_on_one_node_reaches_sessions_on_the_others() {
    scenario("one_message_reaches_every_node", async {
        const ROOM: &str = "c1";
        const PACED: usize = 200;
        let cluster = Cluster::start(3, Some(TestRedis::start()), &[]).await;
        let until = Instant::now() + STREAM_DEADLINE;
        let (target_tx, target) = watch::channel(0);
        let listeners = listeners_on(
            &cluster,
            ROOM,
            &[("n0-sub", 0), ("n1-sub", 1), ("n2-sub", 2)],
            &target,
            until,
        )
        .await;

        let progress = Arc::new(AtomicUsize::new(0));
        let one = Sender::new("one", ROOM, 1);
        let one = join_senders(vec![spawn_sender(
            one,
            vec![cluster.ws(0)],
            false,
            Pacing::pipelined(1),
            until,
            Arc::clone(&progress),
        )])
        .await;
        let reached = all_reach(&listeners, 1, Duration::from_secs(10)).await;
        figure(
            "first message on every node after its ack within",
            ms(reached),
        );

        let paced = Sender::new("paced", ROOM, PACED);
        let paced = join_senders(vec![spawn_sender(
            paced,
            vec![cluster.ws(0)],
            false,
            Pacing::paced(4, Duration::from_millis(10)),
            until,
            progress,
        )])
        .await;
        let senders: Vec<Sender> = one.into_iter().chain(paced).collect();
        let ledger = ledger_of(&senders);
        assert_eq!(ledger.head, 1 + PACED as u64);
        let streams = finish_and_check(listeners, &target_tx, &ledger).await;
        let paced_cross: Vec<Received> = streams
            .iter()
            .flatten()
            .filter(|m| m.body["w"] == "paced")
            .cloned()
            .collect();
        figure(
            "cross-node latency, normal mode, 100 msg/s (paced)",
            cross_node_delays(&[paced_cross]),
        );
    })
    .await;
}

/// 2. Four pipelined senders on each of three nodes, subscribers on every node: each
/// subscriber gets 1..N once, in order, with the acknowledged bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_on_every_node_deliver_every_seq_once_in_order() {
    scenario("concurrent_senders_on_every_node", async {
        const ROOM: &str = "c2";
        const PER_SENDER: usize = 150;
        const SENDERS_PER_NODE: usize = 4;
        let cluster = Cluster::start(3, Some(TestRedis::start()), &[]).await;
        let until = Instant::now() + STREAM_DEADLINE;
        let (target_tx, target) = watch::channel(0);
        let listeners = listeners_on(
            &cluster,
            ROOM,
            &[
                ("n0-a", 0),
                ("n0-b", 0),
                ("n1-a", 1),
                ("n1-b", 1),
                ("n2-a", 2),
                ("n2-b", 2),
            ],
            &target,
            until,
        )
        .await;

        let progress = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let mut handles = Vec::new();
        for node in 0..3 {
            for k in 0..SENDERS_PER_NODE {
                let sender = Sender::new(format!("n{node}-s{k}"), ROOM, PER_SENDER);
                handles.push(spawn_sender(
                    sender,
                    vec![cluster.ws(node)],
                    false,
                    Pacing::pipelined(8),
                    until,
                    Arc::clone(&progress),
                ));
            }
        }
        let senders = join_senders(handles).await;
        let ledger = ledger_of(&senders);
        let total = 3 * SENDERS_PER_NODE * PER_SENDER;
        assert_eq!(ledger.head, total as u64);
        let streams = finish_and_check(listeners, &target_tx, &ledger).await;
        let elapsed = start.elapsed();
        figure(
            "12 pipelined senders, 3 nodes",
            format!(
                "{total} messages to 6 subscribers in {:.2}s ({:.0} msg/s committed)",
                elapsed.as_secs_f64(),
                total as f64 / elapsed.as_secs_f64()
            ),
        );
        figure(
            "cross-node latency under saturation (12 pipelined senders)",
            cross_node_delays(&streams),
        );
        cluster.print_bus_metrics(&[0, 1, 2]).await;
    })
    .await;
}

/// 3. A subscriber hopping between nodes with `since` while two senders keep sending, and a late
/// joiner on another node: no gap, no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_to_another_node_with_since_loses_nothing() {
    scenario("reconnect_to_another_node_with_since", async {
        const ROOM: &str = "c3";
        const PER_SENDER: usize = 500;
        const LATE_SINCE: u64 = 100;
        let cluster = Cluster::start(3, Some(TestRedis::start()), &[]).await;
        let until = Instant::now() + STREAM_DEADLINE;
        let (target_tx, target) = watch::channel(0);
        let hopper = ListenSpec::new("hopper", ROOM, cluster.ws(2))
            .then(cluster.ws(0))
            .then(cluster.ws(1))
            .hop_every(90);
        let mut listeners = vec![(
            "hopper".to_owned(),
            1,
            listen(hopper, target.clone(), until).await,
        )];
        listeners.extend(listeners_on(&cluster, ROOM, &[("steady-n2", 2)], &target, until).await);

        let progress = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = [0, 1]
            .into_iter()
            .map(|node| {
                spawn_sender(
                    Sender::new(format!("n{node}"), ROOM, PER_SENDER),
                    vec![cluster.ws(node)],
                    false,
                    Pacing::paced(4, Duration::from_millis(4)),
                    until,
                    Arc::clone(&progress),
                )
            })
            .collect();
        progress_reaches(&progress, 300, "300 acks").await;
        let mut late = ListenSpec::new("late-n1", ROOM, cluster.ws(1));
        late.since = Some(LATE_SINCE);
        listeners.push((
            "late-n1".to_owned(),
            LATE_SINCE + 1,
            listen(late, target.clone(), until).await,
        ));

        let senders = join_senders(handles).await;
        let ledger = ledger_of(&senders);
        assert_eq!(ledger.head, 2 * PER_SENDER as u64);
        let streams = finish_and_check(listeners, &target_tx, &ledger).await;
        let hops = streams[0]
            .windows(2)
            .filter(|w| w[0].node != w[1].node)
            .count();
        eprintln!("the hopper changed node {hops} times");
        assert!(
            hops >= 5,
            "the hopper should have changed node several times"
        );
    })
    .await;
}

/// 4. Redis frozen (SIGSTOP) for five seconds, then killed and restarted, while a paced stream
/// flows from one node to subscribers on all three: nothing lost or duplicated, and every
/// message arrives within the pause plus [`DELIVERY_SLACK`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_then_killed_and_restarted_loses_nothing() {
    scenario("redis_paused_killed_restarted", async {
        const ROOM: &str = "c4";
        const COUNT: usize = 500;
        let mut cluster = Cluster::start(3, Some(TestRedis::start()), &[]).await;
        let until = Instant::now() + STREAM_DEADLINE;
        let (target_tx, target) = watch::channel(0);
        let listeners = listeners_on(
            &cluster,
            ROOM,
            &[("n0-sub", 0), ("n1-sub", 1), ("n2-sub", 2)],
            &target,
            until,
        )
        .await;
        let progress = Arc::new(AtomicUsize::new(0));
        let sending = spawn_sender(
            Sender::new("n0", ROOM, COUNT),
            vec![cluster.ws(0)],
            false,
            Pacing::paced(32, Duration::from_millis(20)),
            until,
            Arc::clone(&progress),
        );
        progress_reaches(&progress, 50, "50 acks before the pause").await;
        let nodes = [0, 1, 2];
        let paused_at = now_micros();
        cluster.redis().pause();
        let paused = Instant::now();
        let c = &cluster;
        let detected = wait_until(REDIS_PAUSE, "bus_state down while Redis is paused", || {
            bus_state_is(c, &nodes, "down")
        })
        .await;
        figure("paused Redis reported down by /ready within", ms(detected));
        // The rest of the outage: how long Redis stays frozen is what the scenario is about.
        tokio::time::sleep(REDIS_PAUSE.saturating_sub(paused.elapsed())).await;
        let acked_in_pause = progress.load(Ordering::Relaxed);
        cluster.redis_mut().kill();
        let resumed_at = now_micros();
        cluster.redis_mut().restart();
        let c = &cluster;
        let back = wait_until(
            Duration::from_secs(30),
            "bus_state up after the restart",
            || bus_state_is(c, &nodes, "up"),
        )
        .await;
        figure("restarted Redis reported up by /ready within", ms(back));

        let senders = join_senders(vec![sending]).await;
        let ledger = ledger_of(&senders);
        assert_eq!(ledger.head, COUNT as u64);
        let streams = finish_and_check(listeners, &target_tx, &ledger).await;
        let all = DelayStats::of(streams.iter().flatten().map(|m| m.delay));
        let in_outage = DelayStats::of(
            streams
                .iter()
                .flatten()
                .filter(|m| {
                    let sent = m.body["t"].as_u64().unwrap_or(0);
                    (paused_at..=resumed_at).contains(&sent)
                })
                .map(|m| m.delay),
        );
        figure(
            "delay, Redis paused 5s then killed and restarted (all)",
            all,
        );
        figure("delay, messages sent while Redis was paused", in_outage);
        figure(
            "worst ack delay with Redis paused",
            ms(senders[0].worst_ack_delay),
        );
        eprintln!("{acked_in_pause} acks by the end of the pause");
        cluster.print_bus_metrics(&[0, 1, 2]).await;
        assert!(
            all.max < REDIS_PAUSE + DELIVERY_SLACK,
            "worst delivery delay {} exceeds the pause ({}) plus {}",
            ms(all.max),
            ms(REDIS_PAUSE),
            ms(DELIVERY_SLACK)
        );
    })
    .await;
}

/// 5a. Redis drops every pub/sub connection (`CLIENT KILL TYPE pubsub`) again and again during a
/// stream: the nodes repair the gaps, every subscriber gets everything in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pubsub_connections_are_repaired() {
    scenario("killed_pubsub_connections", async {
        const ROOM: &str = "c5a";
        const COUNT: usize = 1_500;
        const KILLS: usize = 30;
        let cluster = Cluster::start(3, Some(TestRedis::start()), &[]).await;
        let until = Instant::now() + STREAM_DEADLINE;
        let (target_tx, target) = watch::channel(0);
        let listeners = listeners_on(
            &cluster,
            ROOM,
            &[("n0-sub", 0), ("n1-sub", 1), ("n2-sub", 2)],
            &target,
            until,
        )
        .await;
        let progress = Arc::new(AtomicUsize::new(0));
        let sending = spawn_sender(
            Sender::new("n0", ROOM, COUNT),
            vec![cluster.ws(0)],
            false,
            Pacing::paced(16, Duration::from_millis(2)),
            until,
            Arc::clone(&progress),
        );
        progress_reaches(&progress, 100, "100 acks before the kills").await;
        let mut killed = 0;
        for _ in 0..KILLS {
            let reply = cluster
                .redis()
                .command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
            killed += reply
                .trim()
                .trim_start_matches(':')
                .parse::<usize>()
                .unwrap_or(0);
            // The pace of the kills, not a synchronization.
            tokio::time::sleep(Duration::from_millis(80)).await;
        }
        let acked_by_then = progress.load(Ordering::Relaxed);
        eprintln!(
            "{killed} pub/sub connections killed over {KILLS} kills, {acked_by_then} acks by then"
        );
        assert!(
            acked_by_then < COUNT,
            "the stream ended before the kills did; make it longer"
        );

        let senders = join_senders(vec![sending]).await;
        let ledger = ledger_of(&senders);
        let streams = finish_and_check(listeners, &target_tx, &ledger).await;
        figure(
            "delay with pub/sub connections killed every 80ms",
            cross_node_delays(&streams),
        );
        cluster.print_bus_metrics(&[0, 1, 2]).await;
    })
    .await;
}

/// 5b. A node frozen while Redis has a tiny pub/sub output buffer limit: Redis drops the node's
/// subscription. Once thawed, the node repairs the gap and its clients get everything in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_dropped_by_output_buffer_limit_is_repaired() {
    scenario("subscription_dropped_by_output_buffer_limit", async {
        const ROOM: &str = "c5b";
        const BATCH: usize = 50;
        const MAX_BATCHES: usize = 80;
        const PAD: usize = 8 * 1024;
        let redis = TestRedis::start_with(&["--client-output-buffer-limit", "pubsub 64kb 32kb 1"]);
        let cluster = Cluster::start(2, Some(redis), &[]).await;
        let until = Instant::now() + STREAM_DEADLINE;
        let (target_tx, target) = watch::channel(0);
        let listeners = listeners_on(
            &cluster,
            ROOM,
            &[("n0-sub", 0), ("n1-a", 1), ("n1-b", 1)],
            &target,
            until,
        )
        .await;
        let progress = Arc::new(AtomicUsize::new(0));
        let mut senders = Vec::new();
        // One message first, so that both nodes have surely subscribed (both deliver it).
        senders.extend(
            join_senders(vec![spawn_sender(
                Sender::new("first", ROOM, 1),
                vec![cluster.ws(0)],
                false,
                Pacing::pipelined(1),
                until,
                Arc::clone(&progress),
            )])
            .await,
        );
        all_reach(&listeners, 1, Duration::from_secs(10)).await;
        let subscribed = pubsub_clients(cluster.redis());
        eprintln!("pub/sub connections before the freeze: {subscribed}");

        cluster.node(1).pause();
        let frozen = Instant::now();
        let mut batches = 0;
        let mut dropped = false;
        while batches < MAX_BATCHES {
            let batch = Sender::new(format!("b{batches}"), ROOM, BATCH).with_pad(PAD);
            senders.extend(
                join_senders(vec![spawn_sender(
                    batch,
                    vec![cluster.ws(0)],
                    false,
                    Pacing::pipelined(16),
                    until,
                    Arc::clone(&progress),
                )])
                .await,
            );
            batches += 1;
            if pubsub_clients(cluster.redis()) < subscribed {
                dropped = true;
                break;
            }
        }
        if !dropped {
            cluster.node(1).resume();
            panic!(
                "Redis did not drop the frozen node's subscription after {} messages of {PAD} \
                 bytes",
                batches * BATCH
            );
        }
        eprintln!(
            "Redis dropped the frozen node's subscription after {} messages, {:.1}s",
            batches * BATCH,
            frozen.elapsed().as_secs_f64()
        );
        // Published while the node has no subscription at all.
        senders.extend(
            join_senders(vec![spawn_sender(
                Sender::new("after-drop", ROOM, BATCH),
                vec![cluster.ws(0)],
                false,
                Pacing::pipelined(16),
                until,
                Arc::clone(&progress),
            )])
            .await,
        );
        cluster.node(1).resume();
        let resumed = Instant::now();

        let ledger = ledger_of(&senders);
        let streams = finish_and_check(listeners, &target_tx, &ledger).await;
        figure(
            "frozen node's clients complete after thaw within",
            ms(resumed.elapsed()),
        );
        figure(
            "delay at the frozen node's clients",
            DelayStats::of(streams[1..].iter().flatten().map(|m| m.delay)),
        );
        cluster.print_bus_metrics(&[0, 1]).await;
    })
    .await;
}

/// 6. A node killed (SIGKILL) while its clients are joined and one of its clients is sending with
/// `idem`: the subscribers rejoin elsewhere with `since` and lose nothing; the sender retries
/// what was not acknowledged on another node with the same `idem`, which stores nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_clients_fail_over_without_loss_or_duplicate() {
    scenario("killed_node_fail_over", async {
        const ROOM: &str = "c6";
        const PLAIN: usize = 500;
        const IDEM: usize = 400;
        let mut cluster = Cluster::start(3, Some(TestRedis::start()), &[]).await;
        let until = Instant::now() + STREAM_DEADLINE;
        let (target_tx, target) = watch::channel(0);
        let mut listeners = Vec::new();
        for (label, fallback) in [("n2-a", 0), ("n2-b", 1)] {
            let spec = ListenSpec::new(label, ROOM, cluster.ws(2)).then(cluster.ws(fallback));
            listeners.push((
                label.to_owned(),
                1,
                listen(spec, target.clone(), until).await,
            ));
        }
        listeners.extend(listeners_on(&cluster, ROOM, &[("n0-steady", 0)], &target, until).await);

        let progress = Arc::new(AtomicUsize::new(0));
        let handles = vec![
            spawn_sender(
                Sender::new("plain", ROOM, PLAIN),
                vec![cluster.ws(0)],
                false,
                Pacing::paced(8, Duration::from_millis(5)),
                until,
                Arc::clone(&progress),
            ),
            spawn_sender(
                Sender::new("idem", ROOM, IDEM).with_idem(),
                vec![cluster.ws(2), cluster.ws(1)],
                true,
                Pacing::paced(8, Duration::from_millis(5)),
                until,
                Arc::clone(&progress),
            ),
        ];
        progress_reaches(&progress, 300, "300 acks before the kill").await;
        cluster.node_mut(2).kill();
        let killed_at = Instant::now();
        eprintln!("n2 killed after {} acks", progress.load(Ordering::Relaxed));

        let senders = join_senders(handles).await;
        let ledger = ledger_of(&senders);
        assert_eq!(ledger.head, (PLAIN + IDEM) as u64, "one seq per message");
        let streams = finish_and_check(listeners, &target_tx, &ledger).await;
        figure(
            "failed-over subscribers complete after the kill within",
            ms(killed_at.elapsed()),
        );
        figure(
            "delay at the failed-over subscribers",
            DelayStats::of(streams[..2].iter().flatten().map(|m| m.delay)),
        );
        figure(
            "worst ack delay of the failing-over idem sender",
            ms(senders[1].worst_ack_delay),
        );

        // History: every idem key exactly once, and nothing else beyond the acknowledged.
        let http = cluster.http(1);
        let mut after = 0;
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut stored = 0;
        for _page in 0..10 {
            let page = http
                .messages(ROOM, &format!("after={after}&limit=1000"))
                .await;
            let messages = page["messages"].as_array().expect("messages array");
            for message in messages {
                stored += 1;
                if let Some(idem) = message["body"]["idem"].as_str() {
                    *seen.entry(idem.to_owned()).or_default() += 1;
                }
                after = message["seq"].as_u64().expect("seq");
            }
            if page["has_more"] != true {
                break;
            }
        }
        assert_eq!(stored, PLAIN + IDEM, "messages stored in the room");
        for index in 0..IDEM {
            let key = senders[1].idem_key(index);
            assert_eq!(
                seen.get(&key).copied().unwrap_or(0),
                1,
                "idem {key} stored once"
            );
        }
    })
    .await;
}

/// 7. No Redis at all: two nodes sharing Postgres find each other's messages by polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_nodes_deliver_across_nodes_by_polling() {
    scenario("no_redis_polling", async {
        const ROOM: &str = "c7";
        const COUNT: usize = 300;
        let cluster = Cluster::start(2, None, &[]).await;
        let ready = ready_ok(&cluster, 0).await;
        assert_eq!(ready["bus"], "none", "/ready without Redis: {ready}");
        let until = Instant::now() + STREAM_DEADLINE;
        let (target_tx, target) = watch::channel(0);
        let listeners = listeners_on(
            &cluster,
            ROOM,
            &[("n0-sub", 0), ("n1-sub", 1)],
            &target,
            until,
        )
        .await;
        let progress = Arc::new(AtomicUsize::new(0));
        let senders = join_senders(vec![spawn_sender(
            Sender::new("n0", ROOM, COUNT),
            vec![cluster.ws(0)],
            false,
            Pacing::paced(8, Duration::from_millis(10)),
            until,
            progress,
        )])
        .await;
        let ledger = ledger_of(&senders);
        let streams = finish_and_check(listeners, &target_tx, &ledger).await;
        let cross = cross_node_delays(&streams);
        figure("cross-node delay without Redis (polling)", cross);
        assert!(
            cross.max < DELIVERY_SLACK,
            "worst cross-node delay without Redis {} exceeds {}",
            ms(cross.max),
            ms(DELIVERY_SLACK)
        );
    })
    .await;
}

/// 8. Redis dies at runtime: `/ready` stays 200 and says the bus is down, delivery goes on
/// (by polling), and the bus is back up once Redis is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_runtime_keeps_ready_and_delivery() {
    scenario("redis_down_at_runtime", async {
        const ROOM: &str = "c8";
        const PHASE: usize = 150;
        let mut cluster = Cluster::start(2, Some(TestRedis::start()), &[]).await;
        let nodes = [0, 1];
        let c = &cluster;
        let up = wait_until(Duration::from_secs(15), "bus_state up", || {
            bus_state_is(c, &nodes, "up")
        })
        .await;
        figure("fresh nodes report the bus up within", ms(up));
        let until = Instant::now() + STREAM_DEADLINE;
        let (target_tx, target) = watch::channel(0);
        let listeners = listeners_on(
            &cluster,
            ROOM,
            &[("n0-sub", 0), ("n1-sub", 1)],
            &target,
            until,
        )
        .await;
        let progress = Arc::new(AtomicUsize::new(0));
        let n0 = cluster.ws(0);
        let phase = |label: &str| {
            spawn_sender(
                Sender::new(label, ROOM, PHASE),
                vec![n0.clone()],
                false,
                Pacing::paced(8, Duration::from_millis(10)),
                until,
                Arc::clone(&progress),
            )
        };
        let wait = Duration::from_secs(15);
        let mut senders = join_senders(vec![phase("up")]).await;
        reaches(&listeners[1].2, PHASE as u64, wait, "phase 1 on n1").await;

        cluster.redis_mut().kill();
        let c = &cluster;
        let detected = wait_until(wait, "bus_state down", || bus_state_is(c, &nodes, "down")).await;
        figure("Redis death reported by /ready within", ms(detected));
        assert_eq!(cluster.metric(0, "seqcast_bus_up").await, 0.0);
        senders.extend(join_senders(vec![phase("down")]).await);
        reaches(
            &listeners[1].2,
            2 * PHASE as u64,
            wait,
            "phase 2 (Redis down) on n1",
        )
        .await;

        cluster.redis_mut().restart();
        let c = &cluster;
        let back = wait_until(Duration::from_secs(30), "bus_state up again", || {
            bus_state_is(c, &nodes, "up")
        })
        .await;
        figure("Redis return reported by /ready within", ms(back));
        assert_eq!(cluster.metric(0, "seqcast_bus_up").await, 1.0);
        senders.extend(join_senders(vec![phase("again")]).await);

        let ledger = ledger_of(&senders);
        assert_eq!(ledger.head, 3 * PHASE as u64);
        let streams = finish_and_check(listeners, &target_tx, &ledger).await;
        let of_phase = |label: &str| {
            DelayStats::of(
                streams[1]
                    .iter()
                    .filter(|m| m.body["w"] == label)
                    .map(|m| m.delay),
            )
        };
        figure("cross-node delay, Redis up", of_phase("up"));
        figure("cross-node delay, Redis down", of_phase("down"));
        figure("cross-node delay, Redis back", of_phase("again"));
        cluster.print_bus_metrics(&[0, 1]).await;
        assert!(
            of_phase("down").max < DELIVERY_SLACK,
            "worst cross-node delay with Redis down exceeds {}",
            ms(DELIVERY_SLACK)
        );
    })
    .await;
}

/// 9. Exactly one leader; when it is killed another takes over within the lock's lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_fails_over_within_the_ttl() {
    scenario("leader_failover", async {
        let ttl = format!("{}s", LEADER_TTL.as_secs());
        let mut cluster =
            Cluster::start(3, Some(TestRedis::start()), &[("SEQCAST_LEADER_TTL", &ttl)]).await;
        async fn leaders(cluster: &Cluster, nodes: &[usize]) -> Vec<usize> {
            let mut leaders = Vec::new();
            for &node in nodes {
                let ready = ready_ok(cluster, node).await;
                assert!(ready["leader"].is_boolean(), "/ready of n{node}: {ready}");
                if ready["leader"] == true {
                    leaders.push(node);
                }
            }
            leaders
        }
        let all = [0, 1, 2];
        let c = &cluster;
        let elected = wait_until(
            Duration::from_secs(20),
            "exactly one leader",
            || async move {
                let found = leaders(c, &all).await;
                assert!(found.len() <= 1, "several leaders at once: {found:?}");
                found.len() == 1
            },
        )
        .await;
        figure("first leader elected within", ms(elected));
        let leader = leaders(&cluster, &all).await[0];
        for node in all {
            let expected = if node == leader { 1.0 } else { 0.0 };
            assert_eq!(
                cluster.metric(node, "seqcast_leader").await,
                expected,
                "seqcast_leader of n{node} (leader n{leader})"
            );
        }

        cluster.node_mut(leader).kill();
        let killed_at = Instant::now();
        let rest: Vec<usize> = all.into_iter().filter(|&n| n != leader).collect();
        let (c, rest) = (&cluster, &rest);
        wait_until(
            LEADER_TTL + DELIVERY_SLACK,
            "a new leader after the old one was killed",
            || async move {
                let found = leaders(c, rest).await;
                assert!(found.len() <= 1, "several leaders at once: {found:?}");
                found.len() == 1
            },
        )
        .await;
        figure(
            &format!("leader failover with SEQCAST_LEADER_TTL={ttl}"),
            ms(killed_at.elapsed()),
        );
    })
    .await;
}
