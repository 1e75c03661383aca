//! A node whose Postgres stops answering (issue 10, item 2.6), measured from outside against the
//! real binary: with Postgres SIGSTOPped under load, every WebSocket send and every HTTP POST is
//! answered (`unavailable` / 503, or committed) within 10 s, `/ready` within 5 s, joins with
//! `since` and history GETs get a defined answer within 10 s too; and once Postgres is continued,
//! service resumes (a send is acknowledged and delivered, `/ready` is 200) within 10 s.
//!
//! The load is what a busy node sees: WebSocket clients pipelining sends with `idem` over 640
//! rooms (more than two rounds of group commits take: each round answered only after its own
//! deadline once took 12 s) and retrying refused ones with the same `idem`, HTTP publishers, new
//! sessions joining with `since`, history readers and a load balancer polling `/ready`; Redis is
//! up, as in production.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::check::eventually;
use support::http::Http;
use support::load::{self, Recorder};
use support::postgres::TestPostgres;
use support::redis::TestRedis;
use support::server::{ServerOptions, StoreKind, TestServer};
use support::ws::{Event, WsClient};

/// How long Postgres stays stopped: longer than any answer may take, so that an answer held for
/// the whole pause shows.
const PAUSE: Duration = Duration::from_secs(15);
/// Sends, POSTs, joins and reads: answered within this, whatever the database does.
const ANSWER_TARGET: Duration = Duration::from_secs(10);
/// `/ready`: answered within this.
const READY_TARGET: Duration = Duration::from_secs(5);
/// After SIGCONT: a send acknowledged and delivered, and `/ready` 200, within this.
const RESUME_TARGET: Duration = Duration::from_secs(10);

/// WebSocket senders, each with its own rooms, and how many sends each keeps unanswered.
const SENDERS: usize = 10;
const ROOMS_PER_SENDER: usize = 64;
const WINDOW: usize = 64;
/// Messages in the room that joins replay and readers page through.
const HISTORY: usize = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_paused_under_load_every_request_is_answered_in_time() {
    let pg = TestPostgres::start();
    let redis = TestRedis::start();
    let server = TestServer::start(
        ServerOptions::new(StoreKind::Postgres)
            .database_url(pg.fresh_database().await)
            .redis_url(redis.url())
            // Rates are not what this test is about: let every client send as fast as it can.
            .env("SEQCAST_SEND_RATE", "0")
            .env("SEQCAST_USER_SEND_RATE", "0"),
    )
    .await;
    let http = Http::new(&server);
    let url = server.ws_url();

    // A room with a history to replay and page through.
    let mut seeder = WsClient::connect(&server).await;
    let seqs = seeder
        .send_pipelined("hist", HISTORY, 64, Duration::from_secs(30), |i| json!(i))
        .await;
    assert_eq!(seqs.last(), Some(&(HISTORY as u64)));
    // A subscriber for the check that service resumes.
    let mut subscriber = WsClient::connect(&server).await;
    subscriber.join("after", None).await;

    let recorder = Recorder::default();
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let rooms = (0..ROOMS_PER_SENDER).map(|r| format!("s{s}-{r}")).collect();
        tasks.push(tokio::spawn(load::ws_sender(
            url.clone(),
            None,
            rooms,
            WINDOW,
            Duration::from_millis(50),
            recorder.clone(),
        )));
    }
    for p in 0..4 {
        tasks.push(tokio::spawn(load::http_poster(
            http.clone(),
            format!("post{p}"),
            Duration::from_millis(50),
            recorder.clone(),
        )));
    }
    // A load balancer's health check.
    tasks.push(tokio::spawn(load::http_getter(
        http.clone(),
        "/ready".to_owned(),
        "http ready",
        Duration::from_millis(200),
        recorder.clone(),
    )));
    eventually(
        Duration::from_secs(30),
        "every sender and poster has been acknowledged",
        || async {
            recorder.count("ws send", "ack") >= SENDERS * WINDOW
                && recorder.count("http post", "201") >= 4
        },
    )
    .await;

    let paused_at = Instant::now();
    pg.pause();
    // Sessions joining with `since` and history readers, as the pause begins.
    for _ in 0..4 {
        tasks.push(tokio::spawn(load::ws_joiner(
            url.clone(),
            "hist".to_owned(),
            0,
            Duration::from_millis(100),
            recorder.clone(),
        )));
        tasks.push(tokio::spawn(load::http_getter(
            http.clone(),
            "/v1/rooms/hist/messages?after=0&limit=1000".to_owned(),
            "http get history",
            Duration::from_millis(100),
            recorder.clone(),
        )));
    }
    // The fault's duration: what is measured is what the load saw meanwhile.
    tokio::time::sleep(PAUSE).await;
    pg.resume();
    let resumed_at = Instant::now();

    // Service resumes: a send is acknowledged and delivered to a subscriber, `/ready` is 200.
    let mut probe = WsClient::connect(&server).await;
    let acked_seq = loop {
        assert!(
            resumed_at.elapsed() < RESUME_TARGET,
            "no send acknowledged within {RESUME_TARGET:?} of SIGCONT"
        );
        let reply = probe
            .request(json!({"type":"send","room":"after","body":"back","idem":"resume"}))
            .await;
        if reply["type"] == "ack" {
            break reply["seq"].as_u64().unwrap();
        }
        assert_eq!(reply["code"], "unavailable", "{reply}");
    };
    let delivered = loop {
        let left = RESUME_TARGET.saturating_sub(resumed_at.elapsed());
        match subscriber.next_event(left).await {
            Some(Event::Frame(frame)) if frame["type"] == "message" => {
                if frame["seq"] == acked_seq {
                    break resumed_at.elapsed();
                }
            }
            Some(Event::Frame(_)) => {}
            other => panic!(
                "the subscriber got no message {acked_seq} within {RESUME_TARGET:?} of SIGCONT: {other:?}"
            ),
        }
    };
    eventually(
        RESUME_TARGET.saturating_sub(resumed_at.elapsed()),
        "/ready is 200 again",
        || async { http.try_get("/ready").await.is_ok_and(|r| r.status == 200) },
    )
    .await;
    let ready_again = resumed_at.elapsed();

    recorder.stop();
    for task in tasks {
        task.await.unwrap();
    }

    let during = |kind| recorder.overlapping(kind, paused_at, resumed_at);
    let report = load::summary(&recorder.samples());
    eprintln!("pause {PAUSE:?}; answers per kind (all samples): count, worst wait, outcomes:");
    for (kind, (n, worst, outcomes)) in &report {
        eprintln!("  {kind:18} {n:6} worst {worst:>8.3?}  {outcomes:?}");
    }
    eprintln!("after SIGCONT: send acknowledged and delivered in {delivered:.3?}, /ready 200 in {ready_again:.3?}");

    for (kind, target, answered) in [
        ("ws send", ANSWER_TARGET, &["ack", "unavailable"][..]),
        ("http post", ANSWER_TARGET, &["201", "503"][..]),
        (
            "ws join since",
            ANSWER_TARGET,
            &["joined", "unavailable"][..],
        ),
        ("http get history", ANSWER_TARGET, &["200", "503"][..]),
        ("http ready", READY_TARGET, &["200", "503"][..]),
    ] {
        let samples = during(kind);
        assert!(!samples.is_empty(), "no {kind} during the pause");
        let refused = samples.iter().filter(|s| s.outcome == answered[1]).count();
        assert!(
            refused > 0,
            "no {kind} was refused during the pause: {:?}",
            report.get(kind)
        );
        for s in &samples {
            assert!(
                answered.contains(&s.outcome.as_str()),
                "a {kind} got {:?} after {:?}",
                s.outcome,
                s.waited
            );
            assert!(
                s.waited <= target,
                "a {kind} started {:?} after the pause began was answered after {:?} ({}), over {target:?}",
                s.started.saturating_duration_since(paused_at),
                s.waited,
                s.outcome
            );
        }
    }
    drop(redis);
}
