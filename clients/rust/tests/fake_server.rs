//! A scripted fake server for what a healthy seqcast does not do on demand: a gap in seqs, a
//! missing pong, `unavailable`.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use seqcast_client::{Client, Event, Options, State};
use serde_json::{json, Value};
use support::fake::{fake, frames_of};
use support::{next_matching, wait_for};
use tokio::sync::mpsc;

fn msg(seq: u64) -> Value {
    json!({"type": "message", "room": "r", "seq": seq, "id": format!("id-{seq}"), "from": "x", "body": seq, "ts": "t"})
}

#[tokio::test]
async fn unavailable_is_retried_with_the_same_idem() {
    let sends = Arc::new(Mutex::new(0));
    let (url, log) = fake(move |_, f| match f["type"].as_str() {
        Some("send") => {
            let mut n = sends.lock().unwrap();
            *n += 1;
            if *n == 1 {
                vec![json!({"type": "error", "code": "unavailable", "message": "db down", "ref": f["ref"]})]
            } else {
                vec![json!({"type": "ack", "room": "r", "seq": 1, "id": "i", "ts": "t", "ref": f["ref"]})]
            }
        }
        _ => vec![],
    })
    .await;
    let opts = Options::new(url).retry_delay(Duration::from_millis(20), Duration::from_millis(50));
    let (c, _events) = Client::new(opts);
    let ack = c.send("r", json!("hi"), None).await.unwrap();
    assert_eq!(ack.seq, 1);
    let sent = frames_of(&log, "send");
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].1["idem"], sent[1].1["idem"]);
    c.close().await;
}

#[tokio::test]
async fn a_gap_makes_the_client_rejoin_with_since() {
    let (url, log) = fake(|_, f| match (f["type"].as_str(), f.get("since")) {
        (Some("join"), None) => vec![
            json!({"type": "joined", "room": "r", "head": 0, "first": 1, "ref": f["ref"]}),
            msg(1),
            msg(3), // seq 2 is missing
        ],
        (Some("join"), Some(_)) => vec![
            json!({"type": "joined", "room": "r", "head": 3, "first": 1, "ref": f["ref"]}),
            msg(2),
            msg(3),
        ],
        _ => vec![],
    })
    .await;
    let (c, mut events) = Client::new(Options::new(url));
    c.join("r", None).await.unwrap();
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        let m = next_matching(
            &mut events,
            Duration::from_secs(5),
            "a message",
            |e| match e {
                Event::Message(m) => Some(m.seq),
                _ => None,
            },
        )
        .await;
        seqs.push(m);
    }
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(c.stats().await.gaps, 1, "the gap is counted");
    let joins = frames_of(&log, "join");
    assert_eq!(joins.len(), 2);
    assert_eq!(joins[1].1["since"], 1);
    c.close().await;
}

#[tokio::test]
async fn a_missing_pong_reconnects_and_rejoins() {
    let (url, log) = fake(|_, f| match f["type"].as_str() {
        Some("join") => {
            vec![json!({"type": "joined", "room": "r", "head": 0, "first": 1, "ref": f["ref"]})]
        }
        _ => vec![], // pings go unanswered
    })
    .await;
    let opts = Options::new(url)
        .ping_interval(Some(Duration::from_millis(100)))
        .pong_timeout(Duration::from_millis(200))
        .backoff(Duration::from_millis(10), Duration::from_millis(50));
    let (c, mut events) = Client::new(opts);
    c.join("r", None).await.unwrap();
    next_matching(
        &mut events,
        Duration::from_secs(5),
        "a timeout",
        |e| match e {
            Event::Error(seqcast_client::Error::Timeout(_)) => Some(()),
            _ => None,
        },
    )
    .await;
    wait_for(
        Duration::from_secs(5),
        "a join on the second connection",
        || async {
            frames_of(&log, "join")
                .iter()
                .any(|(conn, _)| *conn == 1)
                .then_some(())
        },
    )
    .await;
    c.close().await;
}

/// The address of the next connection that opens.
async fn opened(events: &mut mpsc::UnboundedReceiver<Event>) -> String {
    next_matching(
        events,
        Duration::from_secs(5),
        "an open connection",
        |e| match e {
            Event::State(State::Open { url }) => Some(url),
            _ => None,
        },
    )
    .await
}

#[tokio::test]
async fn connections_go_to_the_fallback_urls_in_turn() {
    let (a, _) = fake(|_, _| vec![]).await;
    let (b, _) = fake(|_, _| vec![]).await;
    // A port nobody listens on any more: refused.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("ws://{}/v1/ws", listener.local_addr().unwrap())
    };
    let opts = Options::new(dead)
        .fallback_url(a.clone())
        .fallback_url(b.clone())
        .backoff(Duration::from_millis(10), Duration::from_millis(50));
    let (c, mut events) = Client::new(opts);
    assert_eq!(
        opened(&mut events).await,
        a,
        "the dead first address, then a"
    );
    c.reconnect();
    assert_eq!(opened(&mut events).await, b, "reconnect() moves on");
    c.reconnect();
    assert_eq!(
        opened(&mut events).await,
        a,
        "round robin, past the dead one"
    );
    c.close().await;
}

#[tokio::test]
async fn a_duplicate_is_dropped_and_counted_and_ping_waits_for_the_frames_before_its_pong() {
    let (url, _log) = fake(|_, f| match f["type"].as_str() {
        Some("join") => vec![
            json!({"type": "joined", "room": "r", "head": 0, "first": 1, "ref": f["ref"]}),
            msg(1),
        ],
        // The duplicate comes just before the pong: ping() returns once it is handled.
        Some("ping") => vec![msg(1), json!({"type": "pong", "ref": f["ref"]})],
        _ => vec![],
    })
    .await;
    let (c, mut events) = Client::new(Options::new(url));
    c.join("r", None).await.unwrap();
    c.ping().await.unwrap();
    let first = next_matching(&mut events, Duration::from_secs(5), "seq 1", |e| match e {
        Event::Message(m) => Some(m.seq),
        _ => None,
    })
    .await;
    assert_eq!(first, 1);
    let stats = c.stats().await;
    assert_eq!((stats.duplicates, stats.gaps), (1, 0));
    c.close().await;
    assert!(c.ping().await.is_err(), "no ping once closed");
}
