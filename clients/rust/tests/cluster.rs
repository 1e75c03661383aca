//! A 3-node cluster (Postgres, Redis, nginx in front: deploy/local/cluster.sh). A sender and a
//! receiver, each a `Client` through the load balancer on different nodes, while the sender
//! streams N paced messages: the sender's node and then the receiver's node are SIGKILLed
//! (scenario 1) or drained with SIGTERM, i.e. closed with 1012 (scenario 2). The receiving
//! application must see every acked message exactly once and in order, and every send future
//! must resolve once, with its ack. The same as clients/js/test/cluster.test.js.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use seqcast_client::{Ack, Client, Event, Message, Options, State};
use serde_json::json;
use support::{mint_token, wait_for, Cluster};
use tokio::time::Instant;

// With tokens: a send's idem is scoped to its user, and in development mode every connection is
// a new anonymous user, so a send resent after a reconnect would be stored a second time there.
const SECRET: &str = "rust-cluster-test-secret";
const N: usize = 600;
/// Sends per second: paced, so the stream outlasts both disruptions and a drain's delay.
const RATE: f64 = 50.0;
/// Sends in flight at most.
const WINDOW: usize = 10;

/// What a client's event stream showed, with the time each thing arrived.
#[derive(Default)]
struct Record {
    messages: Vec<(Instant, Message)>,
    states: Vec<(Instant, State)>,
}

struct Tracked {
    client: Client,
    record: Arc<Mutex<Record>>,
    /// The node it landed on (1-based).
    node: usize,
}

/// Connects a client through the load balancer and finds the node it landed on (the node whose
/// open-connection gauge went up by one).
async fn connect_tracked(cluster: &Cluster, user: &'static str, room: &str) -> Tracked {
    let before = cluster.counts().await;
    let opts = Options::new(&cluster.ws)
        .token_fn(move || async move { Ok(mint_token(SECRET, user, 3600)) });
    let (client, mut events) = Client::new(opts);
    let record = Arc::new(Mutex::new(Record::default()));
    let sink = Arc::clone(&record);
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            let mut r = sink.lock().unwrap();
            match e {
                Event::Message(m) => r.messages.push((Instant::now(), m)),
                Event::State(s) => r.states.push((Instant::now(), s)),
                _ => {} // reconnect noise (timeouts, refused upgrades) is expected here
            }
        }
    });
    if user == "receiver" {
        client.join(room, None).await.unwrap();
    } else {
        client
            .send(&format!("{room}-warmup"), json!(0), None)
            .await
            .unwrap();
    }
    let node = wait_for(
        Duration::from_secs(5),
        "the node a client landed on",
        || async {
            let now = cluster.counts().await;
            now.iter()
                .zip(&before)
                .position(|(n, b)| *n == b + 1)
                .map(|i| i + 1)
        },
    )
    .await;
    Tracked {
        client,
        record,
        node,
    }
}

struct Disruption {
    at: Instant,
    node: usize,
    who: &'static str,
}

/// Streams N messages from a sender to a receiver (different nodes); `action` (`kill` or
/// `stop`) is applied to the sender's node after N/4 acks and to the receiver's node after N/2.
/// Returns the disrupted nodes.
async fn scenario(cluster: &Cluster, room: &str, action: &'static str) -> Vec<usize> {
    let receiver = connect_tracked(cluster, "receiver", room).await;
    let sender = connect_tracked(cluster, "sender", room).await;
    assert_ne!(
        sender.node, receiver.node,
        "sender and receiver on different nodes"
    );
    println!(
        "{room}: receiver on node-{}, sender on node-{}",
        receiver.node, sender.node
    );

    let mut acks: Vec<Option<Ack>> = vec![None; N];
    let mut ack_times = Vec::new();
    let mut disruptions: Vec<Disruption> = Vec::new();
    let mut tasks = Vec::new();
    let mut inflight = FuturesUnordered::new();
    let (mut next, mut settled) = (0, 0);
    let started = Instant::now();
    while settled < N {
        let done = if next < N && inflight.len() < WINDOW {
            let due = started + Duration::from_secs_f64(next as f64 / RATE);
            tokio::select! {
                () = tokio::time::sleep_until(due) => {
                    let i = next;
                    next += 1;
                    let send = sender.client.send(room, json!({"i": i}), None);
                    inflight.push(async move { (i, send.await) });
                    continue;
                }
                Some(done) = inflight.next(), if !inflight.is_empty() => done,
            }
        } else {
            inflight.next().await.unwrap()
        };
        let (i, result) = done;
        settled += 1;
        let ack = result.unwrap_or_else(|e| panic!("send {i} failed: {e}"));
        assert!(acks[i].is_none(), "send {i} resolved twice");
        acks[i] = Some(ack);
        ack_times.push(Instant::now());
        let (node, who) = match disruptions.len() {
            0 if settled >= N / 4 => (sender.node, "sender"),
            1 if settled >= N / 2 => (receiver.node, "receiver"),
            _ => continue,
        };
        disruptions.push(Disruption {
            at: Instant::now(),
            node,
            who,
        });
        tasks.push(cluster.node_task(action, node));
    }
    let send_seconds = started.elapsed().as_secs_f64();
    for t in tasks {
        t.await.unwrap();
    }
    let received = || receiver.record.lock().unwrap().messages.len();
    wait_for(
        Duration::from_secs(60),
        "the receiver to see every message",
        || async { (received() >= N).then_some(()) },
    )
    .await;
    // A little longer: anything beyond N would be a duplicate or an extra message.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Every send resolved once, with distinct seqs 1..N.
    let acks: Vec<Ack> = acks.into_iter().map(Option::unwrap).collect();
    let mut ack_seqs: Vec<u64> = acks.iter().map(|a| a.seq).collect();
    ack_seqs.sort_unstable();
    let expected: Vec<u64> = (1..=N as u64).collect();
    assert_eq!(ack_seqs, expected);
    // The receiver saw seq 1..N once each, in order, each matching its ack.
    let messages = receiver.record.lock().unwrap().messages.clone();
    let seqs: Vec<u64> = messages.iter().map(|(_, m)| m.seq).collect();
    let duplicates = seqs.len() - seqs.iter().collect::<std::collections::BTreeSet<_>>().len();
    assert_eq!(duplicates, 0);
    assert_eq!(seqs, expected, "every acked message once, in order");
    for (_, m) in &messages {
        let i = usize::try_from(m.body["i"].as_u64().unwrap()).unwrap();
        assert_eq!(acks[i].seq, m.seq, "message matches its ack");
        assert_eq!(m.from, "sender");
    }
    let receiver_times: Vec<Instant> = messages.iter().map(|(t, _)| *t).collect();

    println!(
        "{room}: {N} sent in {send_seconds:.1} s, {N} acked, {} messages seen, {duplicates} duplicates, 0 out of order",
        seqs.len()
    );
    // Resumption of the disrupted client: when it saw its connection close, when it was open
    // again (authenticated; rooms rejoined, unacked sends resent), and its first ack or message
    // after that.
    for d in &disruptions {
        let (c, times) = if d.who == "sender" {
            (&sender, &ack_times)
        } else {
            (&receiver, &receiver_times)
        };
        let states = c.record.lock().unwrap().states.clone();
        let (closed_at, code) = states
            .iter()
            .find_map(|(t, s)| match s {
                State::Reconnecting { code, .. } if *t >= d.at => Some((*t, *code)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("the {} lost its connection", d.who));
        let open_at = states
            .iter()
            .find(|(t, s)| *t >= closed_at && matches!(s, State::Open { .. }))
            .map(|(t, _)| *t)
            .unwrap_or_else(|| panic!("the {} reconnected", d.who));
        let resumed = times
            .iter()
            .find(|t| **t >= open_at)
            .unwrap_or_else(|| panic!("the {} got traffic after reconnecting", d.who));
        let ms = |t: Instant| t.duration_since(d.at).as_millis();
        println!(
            "{room}: node-{} (the {}'s): close {code:?} seen after {} ms, open again after {} ms, first {} after {} ms (times from the signal)",
            d.node,
            d.who,
            ms(closed_at),
            ms(open_at),
            if d.who == "sender" { "ack" } else { "message" },
            ms(*resumed),
        );
    }
    sender.client.close().await;
    receiver.client.close().await;
    disruptions.iter().map(|d| d.node).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_drained_nodes_mid_stream() {
    let cluster = Cluster::start(3, &[("SEQCAST_JWT_SECRET", SECRET)]);
    let killed = scenario(&cluster, "killed", "kill").await;
    // The next scenario needs three nodes again.
    for node in killed {
        cluster.node("start", node).await;
    }
    scenario(&cluster, "drained", "stop").await;
}
