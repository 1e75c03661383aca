//! The delivery guarantees under load (`protocol.md`, "Guarantees" and the 4008 close code):
//! joins racing a live sender, a large replay, and slow consumers. On SQLite and on Postgres.
//! Every node runs with `SEQCAST_SEND_RATE=0`: these senders pipeline thousands of messages on
//! one connection, far past the default per-connection rate.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;

use support::check::{assert_contiguous, eventually};
use support::http::{metric_value, Http};
use support::server::{rss_kib_of, ServerOptions, StoreKind, TestServer};
use support::ws::{Event, WsClient};

/// Messages in the large-replay test.
const BIG_ROOM: usize = 100_000;
/// Messages that flow past a stalled client.
const FLOOD: usize = 20_000;
/// Body size of the flood: large enough that socket buffers fill quickly.
const FLOOD_BODY_BYTES: usize = 4096;
/// Upper bound for the server's resident memory while a client is stalled.
const RSS_LIMIT_KIB: u64 = 200 * 1024;

store_tests!(
    joins_racing_a_live_sender_get_every_seq_exactly_once,
    join_since_0_replays_a_large_room_in_order,
    stalled_reader_resumes_and_loses_nothing,
    stalled_reader_is_closed_with_4008,
    tiny_outbound_queue_falls_back_to_the_database_without_loss,
);

/// Nodes sharing one Postgres database (no Redis): a client receives every message exactly once
/// in order whichever node it and the sender are on (`protocol.md`, "Guarantees").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_sharing_postgres_deliver_across_nodes() {
    support::server::run_scenario("nodes_sharing_postgres_deliver_across_nodes", async {
        const TOTAL: usize = 2_000;
        let a = TestServer::start(
            ServerOptions::new(StoreKind::Postgres)
                .env("SEQCAST_SEND_RATE", "0")
                .node_id("node-a"),
        )
        .await;
        let b = TestServer::start(
            ServerOptions::new(StoreKind::Postgres)
                .env("SEQCAST_SEND_RATE", "0")
                .node_id("node-b")
                .database_url(a.database_url.clone()),
        )
        .await;
        let mut on_b = WsClient::connect(&b).await;
        on_b.join("shared", None).await;
        let mut on_a = WsClient::connect(&a).await;
        on_a.join("shared", None).await;

        let (progress_tx, mut progress) = tokio::sync::watch::channel(0_usize);
        let mut sender = WsClient::connect(&a).await;
        let sending = tokio::spawn(async move {
            let mut body = |i: usize| json!({ "i": i });
            sender
                .send_pipelined_observed(
                    "shared",
                    TOTAL,
                    64,
                    Duration::from_secs(60),
                    &mut body,
                    |acked| {
                        progress_tx.send_replace(acked);
                    },
                )
                .await
        });
        tokio::time::timeout(
            Duration::from_secs(60),
            progress.wait_for(|acked| *acked >= TOTAL / 2),
        )
        .await
        .expect("the sender reached half way within 60 s")
        .expect("the sender is alive");
        // A client reconnecting to the other node mid-stream.
        let mut late_on_b = WsClient::connect(&b).await;
        late_on_b.join("shared", Some(10)).await;

        sending.await.expect("the sender task");
        let deadline = Duration::from_secs(60);
        let seqs = on_b.collect_seqs("shared", TOTAL, deadline).await;
        assert_contiguous(&seqs, 1, TOTAL as u64, "live on the other node");
        let seqs = on_a.collect_seqs("shared", TOTAL, deadline).await;
        assert_contiguous(&seqs, 1, TOTAL as u64, "live on the sender's node");
        let seqs = late_on_b.collect_seqs("shared", TOTAL - 10, deadline).await;
        assert_contiguous(&seqs, 11, TOTAL as u64, "joined since=10 on the other node");
        for client in [&mut on_b, &mut on_a, &mut late_on_b] {
            let extra = client.frames_until_pong().await;
            assert!(extra.is_empty(), "frames beyond the last seq: {extra:?}");
        }
        // Both nodes see the same head.
        assert_eq!(Http::new(&a).room("shared").await["head"], TOTAL as u64);
        assert_eq!(Http::new(&b).room("shared").await["head"], TOTAL as u64);
    })
    .await;
}

async fn joins_racing_a_live_sender_get_every_seq_exactly_once(store: StoreKind) {
    const TOTAL: usize = 10_000;
    let server = TestServer::start(ServerOptions::new(store).env("SEQCAST_SEND_RATE", "0")).await;
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0_usize);
    let mut sender = WsClient::connect(&server).await;
    let sending = tokio::spawn(async move {
        let mut body = |i: usize| json!({ "i": i });
        sender
            .send_pipelined_observed(
                "race",
                TOTAL,
                128,
                Duration::from_secs(120),
                &mut body,
                |acked| {
                    progress_tx.send_replace(acked);
                },
            )
            .await
    });

    let reached = |n: usize| move |acked: &usize| *acked >= n;
    tokio::time::timeout(
        Duration::from_secs(60),
        progress.wait_for(reached(TOTAL / 2)),
    )
    .await
    .expect("the sender reached half way within 60 s")
    .expect("the sender is alive");
    // Joins while the sender keeps going: full replay, partial replay, live only.
    let mut from_zero = WsClient::connect(&server).await;
    let mut from_quarter = WsClient::connect(&server).await;
    let mut live_only = WsClient::connect(&server).await;
    from_zero.join("race", Some(0)).await;
    from_quarter.join("race", Some(TOTAL as u64 / 4)).await;
    let live_head = live_only.join("race", None).await["head"].as_u64().unwrap();

    let late_since = 100;
    tokio::time::timeout(
        Duration::from_secs(60),
        progress.wait_for(reached(TOTAL * 3 / 4)),
    )
    .await
    .expect("the sender reached three quarters within 60 s")
    .expect("the sender is alive");
    let mut late = WsClient::connect(&server).await;
    let late_joined = late.join("race", Some(late_since)).await;
    assert!(
        late_joined["head"].as_u64().unwrap() < TOTAL as u64,
        "the late join happened while sending: {late_joined}"
    );

    let total = TOTAL as u64;
    let deadline = Duration::from_secs(90);
    let collect = |mut client: WsClient, since: u64, what: &'static str| {
        tokio::spawn(async move {
            let n = usize::try_from(total - since).unwrap();
            let seqs = client.collect_seqs("race", n, deadline).await;
            assert_contiguous(&seqs, since + 1, total, what);
            let extra = client.frames_until_pong().await;
            assert!(
                extra.iter().all(|f| f["type"] != "message"),
                "{what}: messages beyond the last seq: {extra:?}"
            );
        })
    };
    let readers = [
        collect(from_zero, 0, "join since=0"),
        collect(from_quarter, total / 4, "join since=2500"),
        collect(live_only, live_head, "live-only join"),
        collect(late, late_since, "late join since=100"),
    ];
    let acked = sending.await.expect("the sender task");
    let mut sorted = acked.clone();
    sorted.sort_unstable();
    assert_contiguous(&sorted, 1, total, "acknowledged seqs");
    for reader in readers {
        reader.await.expect("a reader task");
    }
}

async fn join_since_0_replays_a_large_room_in_order(store: StoreKind) {
    const SENDERS: usize = 4;
    let server = TestServer::start(ServerOptions::new(store).env("SEQCAST_SEND_RATE", "0")).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let mut sender = WsClient::connect(&server).await;
        tasks.push(tokio::spawn(async move {
            sender
                .send_pipelined(
                    "big",
                    BIG_ROOM / SENDERS,
                    256,
                    Duration::from_secs(120),
                    |i| json!({ "s": s, "i": i }),
                )
                .await
        }));
    }
    let mut acked = Vec::with_capacity(BIG_ROOM);
    for task in tasks {
        acked.extend(task.await.expect("a sender task"));
    }
    acked.sort_unstable();
    assert_contiguous(&acked, 1, BIG_ROOM as u64, "acknowledged seqs");
    eprintln!(
        "seeded {BIG_ROOM} messages with {SENDERS} pipelined senders in {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let mut reader = WsClient::connect(&server).await;
    let joined = reader.join("big", Some(0)).await;
    assert_eq!(joined["head"], BIG_ROOM as u64, "{joined}");
    let seqs = reader
        .collect_seqs("big", BIG_ROOM, Duration::from_secs(90))
        .await;
    assert_contiguous(&seqs, 1, BIG_ROOM as u64, "replay since=0");
    eprintln!("replayed {BIG_ROOM} messages in {:?}", started.elapsed());
    let extra = reader.frames_until_pong().await;
    assert!(extra.is_empty(), "frames beyond the replay: {extra:?}");
}

/// A flood of [`FLOOD`] messages of [`FLOOD_BODY_BYTES`] past a client that stopped reading.
struct Flood {
    /// Joined to `flood` before the flood, then never polled until the test says so.
    stalled: WsClient,
    /// A client that reads everything; checks it got every seq once, in order.
    reader: tokio::task::JoinHandle<()>,
    /// The pipelining sender; yields the largest server RSS seen while sending.
    sender: tokio::task::JoinHandle<u64>,
}

async fn start_flood(server: &TestServer) -> Flood {
    let mut stalled = WsClient::connect(server).await;
    assert_eq!(stalled.join("flood", None).await["head"], 0);
    let mut reader = WsClient::connect(server).await;
    reader.join("flood", None).await;
    let reader = tokio::spawn(async move {
        let seqs = reader
            .collect_seqs("flood", FLOOD, Duration::from_secs(120))
            .await;
        assert_contiguous(&seqs, 1, FLOOD as u64, "the reading client");
    });

    let mut sender = WsClient::connect(server).await;
    let pid = server.pid;
    let sender = tokio::spawn(async move {
        let filler = "x".repeat(FLOOD_BODY_BYTES);
        let mut body = |i: usize| json!({ "i": i, "pad": filler });
        let mut max_rss = rss_kib_of(pid);
        let acked = sender
            .send_pipelined_observed(
                "flood",
                FLOOD,
                64,
                Duration::from_secs(120),
                &mut body,
                |acked| {
                    if acked % 500 == 0 {
                        max_rss = max_rss.max(rss_kib_of(pid));
                    }
                },
            )
            .await;
        let mut sorted = acked;
        sorted.sort_unstable();
        assert_contiguous(&sorted, 1, FLOOD as u64, "acknowledged seqs");
        max_rss.max(rss_kib_of(pid))
    });
    Flood {
        stalled,
        reader,
        sender,
    }
}

impl Flood {
    /// Waits for the sender and the reader; asserts the RSS bound. Returns the stalled client.
    async fn finish(self) -> WsClient {
        let max_rss = self.sender.await.expect("the sender task");
        self.reader.await.expect("the reading client's task");
        eprintln!("max server RSS with a stalled client: {max_rss} KiB");
        assert!(
            max_rss < RSS_LIMIT_KIB,
            "server RSS reached {max_rss} KiB with a stalled client (limit {RSS_LIMIT_KIB} KiB)"
        );
        self.stalled
    }
}

async fn stalled_reader_resumes_and_loses_nothing(store: StoreKind) {
    let server = TestServer::start(
        ServerOptions::new(store)
            .env("SEQCAST_SEND_RATE", "0")
            .write_timeout("300s"),
    )
    .await;
    let mut stalled = start_flood(&server).await.finish().await;

    // Resume reading: everything, in order, exactly once.
    let seqs = stalled
        .collect_seqs("flood", FLOOD, Duration::from_secs(90))
        .await;
    assert_contiguous(&seqs, 1, FLOOD as u64, "the resumed client");
    let extra = stalled.frames_until_pong().await;
    assert!(extra.is_empty(), "frames beyond the flood: {extra:?}");

    let metrics = Http::new(&server).metrics().await;
    assert_eq!(
        metric_value(&metrics, "seqcast_sessions_closed_slow_total").unwrap_or(0.0),
        0.0,
        "no session was cut off with a 300 s write timeout"
    );
}

async fn stalled_reader_is_closed_with_4008(store: StoreKind) {
    let server = TestServer::start(
        ServerOptions::new(store)
            .env("SEQCAST_SEND_RATE", "0")
            .write_timeout("2s"),
    )
    .await;
    let mut flood = start_flood(&server).await;

    // The server gives up on the stalled client after the write timeout; it then queues the
    // 4008 close behind what the socket holds. Resume reading as soon as that happens.
    let http = Http::new(&server);
    eventually(
        Duration::from_secs(60),
        "seqcast_sessions_closed_slow_total >= 1",
        || async {
            let metrics = http.metrics().await;
            metric_value(&metrics, "seqcast_sessions_closed_slow_total").unwrap_or(0.0) >= 1.0
        },
    )
    .await;
    let (end, frames) = flood.stalled.drain_until_end(Duration::from_secs(60)).await;
    let seqs: Vec<u64> = frames
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    let received = seqs.len() as u64;
    assert!(
        received < FLOOD as u64,
        "a client stalled past the write timeout was not cut off"
    );
    assert_contiguous(&seqs, 1, received, "messages before the cut");
    match &end {
        Event::Closed { code, .. } => assert_eq!(*code, Some(4008), "slow consumer close code"),
        other => panic!(
            "a client that resumes reading right after the cut should read the 4008 close, \
             got {other:?} after {received} messages"
        ),
    }
    flood.finish().await;

    // Reconnecting with since = last seq held gets exactly the rest.
    let mut again = WsClient::connect(&server).await;
    again.join("flood", Some(received)).await;
    let rest = again
        .collect_seqs("flood", FLOOD - seqs.len(), Duration::from_secs(90))
        .await;
    assert_contiguous(&rest, received + 1, FLOOD as u64, "after reconnecting");
    assert!(again.frames_until_pong().await.is_empty());
}

/// With a per-session queue of 4 frames, readers keep overflowing it and switch between the
/// live stream and the database; a reader that paces itself falls behind on purpose. All get
/// every seq exactly once, in order.
async fn tiny_outbound_queue_falls_back_to_the_database_without_loss(store: StoreKind) {
    const TOTAL: usize = 10_000;
    let server = TestServer::start(
        ServerOptions::new(store)
            .env("SEQCAST_SEND_RATE", "0")
            .outbound_queue(4)
            .write_timeout("60s"),
    )
    .await;
    let deadline = Duration::from_secs(90);
    let mut readers = Vec::new();
    for pace in [false, false, true] {
        let mut reader = WsClient::connect(&server).await;
        reader.join("tiny", None).await;
        readers.push(tokio::spawn(async move {
            let mut seqs = Vec::with_capacity(TOTAL);
            while seqs.len() < TOTAL {
                let n = (TOTAL - seqs.len()).min(20);
                seqs.extend(reader.collect_seqs("tiny", n, deadline).await);
                if pace {
                    // Pacing, not synchronization: this reader reads slowly but keeps reading.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            assert_contiguous(&seqs, 1, TOTAL as u64, "a reader behind a queue of 4");
            assert!(reader.frames_until_pong().await.is_empty());
        }));
    }
    let mut sender = WsClient::connect(&server).await;
    sender
        .send_pipelined("tiny", TOTAL, 128, deadline, |i| json!({ "i": i }))
        .await;
    for reader in readers {
        reader.await.expect("a reader task");
    }
    let metrics = Http::new(&server).metrics().await;
    assert_eq!(
        metric_value(&metrics, "seqcast_sessions_closed_slow_total").unwrap_or(0.0),
        0.0,
        "readers that keep reading are not cut off"
    );
}
