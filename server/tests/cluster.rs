//! The delivery guarantees across a cluster (`protocol.md`, "Guarantees"): several nodes sharing
//! one Postgres and one Redis, in normal operation, when a client moves between nodes, when a
//! node dies; also leader failover. Redis faults and polling are in `cluster_faults.rs`.
//!
//! Every scenario runs alone (see `support::scenario`) so the delays it measures are its own;
//! the figures are printed with a `FIGURE` prefix (`cargo test --test cluster -- --nocapture`).
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use support::cluster::{
    listen, spawn_sender, wait_until, Cluster, DelayStats, ListenSpec, Pacing, Received, Sender,
};
use support::redis::TestRedis;
use support::scenario::*;

/// Lifetime of the leader lock in the failover scenario (`SEQCAST_LEADER_TTL`).
const LEADER_TTL: Duration = Duration::from_secs(2);

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

/// 6. A node killed (SIGKILL) while its clients are joined and one of its clients is sending:
/// the subscribers' client library rejoins elsewhere with `since` and they lose nothing; the
/// sender's resends what was not acknowledged on another node with the same `idem`, which
/// stores nothing twice.
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
                Pacing::paced(8, Duration::from_millis(5)),
                until,
                Arc::clone(&progress),
            ),
            spawn_sender(
                Sender::new("idem", ROOM, IDEM),
                vec![cluster.ws(2), cluster.ws(1)],
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
        for sender in &senders {
            for index in 0..sender.count() {
                let key = sender.idem_key(index);
                assert_eq!(
                    seen.get(&key).copied().unwrap_or(0),
                    1,
                    "idem {key} stored once"
                );
            }
        }
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
