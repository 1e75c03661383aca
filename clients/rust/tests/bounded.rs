//! `Client::bounded`: an application that stops reading its events holds a bounded number of
//! them; the client stops reading its socket meanwhile (no pong can arrive, and that is not a
//! dead connection), and once the application reads again every message arrives once, in order.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use seqcast_client::{Client, Event, Options, State};
use serde_json::json;
use support::Node;

const CAPACITY: usize = 4;
const MESSAGES: u64 = 300;

#[tokio::test]
async fn a_slow_application_holds_at_most_the_capacity_and_loses_nothing() {
    let node = Node::start(&[]).await;
    // Pings every 100 ms, dead after 300 ms without a pong: the pause below is far longer.
    let opts = Options::new(&node.ws)
        .token("dev:reader")
        .ping_interval(Some(Duration::from_millis(100)))
        .pong_timeout(Duration::from_millis(300));
    let (reader, mut events) = Client::bounded(opts, CAPACITY);
    reader.join("slow", None).await.unwrap();
    let (writer, _writer_events) = Client::new(Options::new(&node.ws).token("dev:writer"));
    let sends: Vec<_> = (1..=MESSAGES)
        .map(|i| writer.send("slow", json!({"i": i}), None))
        .collect();
    // seq -> i (a send refused with `rate_limited` is retried later, so seqs need not follow i).
    let mut acked = std::collections::HashMap::new();
    for (i, send) in (1..=MESSAGES).zip(sends) {
        acked.insert(send.await.unwrap().seq, i);
    }
    // The application does not read for a while: what is being tested, not a synchronization.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        events.len() <= CAPACITY,
        "{} events waiting, capacity {CAPACITY}",
        events.len()
    );

    let mut seqs = Vec::new();
    let mut others = Vec::new();
    while seqs.len() < MESSAGES as usize {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(Event::Message(m))) => {
                assert_eq!(m.body, json!({"i": acked[&m.seq]}), "seq {}", m.seq);
                seqs.push(m.seq);
            }
            Ok(Some(event)) => others.push(event),
            Ok(None) => panic!("the client closed"),
            Err(_) => panic!("{} of {MESSAGES} messages, then nothing", seqs.len()),
        }
    }
    assert!(seqs.iter().copied().eq(1..=MESSAGES), "once each, in order");
    // One connection all along: the paused reads were not taken for a dead connection.
    assert!(
        others
            .iter()
            .all(|e| matches!(e, Event::State(State::Connecting | State::Open { .. }))),
        "{others:?}"
    );
    reader.close().await;
    writer.close().await;
}
