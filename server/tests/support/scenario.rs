//! What the cluster test binaries share: one scenario at a time with a deadline, printed
//! figures, and the steps of a stream (subscribers, senders, the final check).
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;

use super::cluster::{
    check_stream, listen, wait_until, Cluster, DelayStats, Ledger, ListenSpec, Listening, Received,
    Sender,
};
use super::redis::TestRedis;

/// Deadline of one scenario, lock wait excluded.
pub const SCENARIO_DEADLINE: Duration = Duration::from_secs(150);
/// Deadline for the senders and subscribers of a stream.
pub const STREAM_DEADLINE: Duration = Duration::from_secs(90);
/// Slack allowed on top of an outage before a message must have arrived. Generous: CI boxes
/// have two loaded cores.
pub const DELIVERY_SLACK: Duration = Duration::from_secs(5);

/// Runs one scenario with [`SCENARIO_DEADLINE`], after every other scenario of this test binary has
/// finished: they measure delays, which concurrent clusters on two cores would distort.
pub async fn scenario(name: &str, body: impl Future<Output = ()>) {
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
pub fn figure(what: &str, value: impl std::fmt::Display) {
    eprintln!("FIGURE {what}: {value}");
}

pub fn ms(duration: Duration) -> String {
    format!("{:.0}ms", duration.as_secs_f64() * 1e3)
}

/// The subscribers' delays for messages sent from another node.
pub fn cross_node_delays(streams: &[Vec<Received>]) -> DelayStats {
    DelayStats::of(
        streams
            .iter()
            .flatten()
            .filter(|m| m.body["n"].as_u64() != Some(m.node as u64))
            .map(|m| m.delay),
    )
}

/// Waits for every subscriber to reach `ledger.head` and checks each stream from seq `first`.
pub async fn finish_and_check(
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
pub async fn listeners_on(
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

pub async fn join_senders(handles: Vec<tokio::task::JoinHandle<Sender>>) -> Vec<Sender> {
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

pub fn ledger_of(senders: &[Sender]) -> Ledger {
    Ledger::of(&senders.iter().collect::<Vec<_>>())
}

/// Waits until `progress` reaches `count`.
pub async fn progress_reaches(progress: &AtomicUsize, count: usize, what: &str) {
    wait_until(STREAM_DEADLINE, what, || async move {
        progress.load(Ordering::Relaxed) >= count
    })
    .await;
}

/// Waits until every subscriber has received `seq`; returns how long that took.
pub async fn all_reach(
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
pub async fn reaches(listening: &Listening, seq: u64, deadline: Duration, what: &str) {
    let last = &*listening.last_seq;
    wait_until(deadline, what, || async move {
        last.load(Ordering::Relaxed) >= seq
    })
    .await;
}

/// Whether `/ready` of every node in `nodes` shows a Redis bus in `state` (asserting 200).
pub async fn bus_state_is(cluster: &Cluster, nodes: &[usize], state: &str) -> bool {
    let mut all = true;
    for &node in nodes {
        let ready = ready_ok(cluster, node).await;
        assert_eq!(ready["bus"], "redis", "/ready of n{node}: {ready}");
        all &= ready["bus_state"] == state;
    }
    all
}

/// The number of pub/sub connections Redis has.
pub fn pubsub_clients(redis: &TestRedis) -> usize {
    redis
        .command(&["CLIENT", "LIST", "TYPE", "pubsub"])
        .lines()
        .filter(|line| line.contains("id="))
        .count()
}

/// `/ready` of `node` in a cluster, asserting 200.
pub async fn ready_ok(cluster: &Cluster, node: usize) -> Value {
    let (status, body) = cluster.ready(node).await;
    assert_eq!(status, 200, "/ready of n{node}: {body}");
    body
}
