//! Single node (SQLite, development mode): join, send, ack, message, idem, history, reconnect.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use seqcast_client::{Client, Event, HistoryQuery, Message, Options};
use serde_json::json;
use support::{next_matching, Node};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

fn message(e: Event) -> Option<Message> {
    match e {
        Event::Message(m) => Some(m),
        _ => None,
    }
}

async fn messages(events: &mut mpsc::UnboundedReceiver<Event>, n: usize) -> Vec<Message> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(next_matching(events, WAIT, "a message", message).await);
    }
    out
}

#[tokio::test]
async fn join_send_ack_and_message() {
    let node = Node::start(&[]).await;
    let (c, mut events) = Client::new(Options::new(&node.ws).token("dev:alice"));
    let joined = c.join("basic", None).await.unwrap();
    assert_eq!((joined.head, joined.first, joined.truncated), (0, 1, false));
    // Queued at once, in call order: acked 1, 2, 3.
    let sends: Vec<_> = (1..=3)
        .map(|i| c.send("basic", json!({"text": format!("m{i}")}), None))
        .collect();
    let mut acks = Vec::new();
    for s in sends {
        acks.push(s.await.unwrap());
    }
    assert_eq!(acks.iter().map(|a| a.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(acks
        .iter()
        .all(|a| a.room == "basic" && !a.id.is_empty() && !a.ts.is_empty()));
    let seen = messages(&mut events, 3).await;
    let got: Vec<_> = seen
        .iter()
        .map(|m| (m.seq, m.body["text"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [(1, "m1"), (2, "m2"), (3, "m3")]);
    assert_eq!(seen[0].from, "alice", "dev:NAME names the user");
    assert_eq!(seen[0].id, acks[0].id);
    assert_eq!(c.last_seq("basic").await, Some(3));
    assert_eq!(c.pending_sends().await, 0);
    println!(
        "basic: {} messages seen, acks {:?}",
        seen.len(),
        acks.iter().map(|a| a.seq).collect::<Vec<_>>()
    );
    c.close().await;
    let err = c.send("basic", json!(1), None).await.unwrap_err();
    assert_eq!(err, seqcast_client::Error::Closed);
}

#[tokio::test]
async fn a_repeated_idem_is_stored_once() {
    let node = Node::start(&[]).await;
    let (c, _events) = Client::new(Options::new(&node.ws).token("dev:bob"));
    let first = c
        .send("idem", json!({"text": "once"}), Some("fixed-1".into()))
        .await
        .unwrap();
    let again = c
        .send("idem", json!({"text": "once"}), Some("fixed-1".into()))
        .await
        .unwrap();
    assert_eq!(again, first);
    // Generated idems differ: two identical bodies are two messages.
    let a = c
        .send("idem", json!({"text": "twice"}), None)
        .await
        .unwrap();
    let b = c
        .send("idem", json!({"text": "twice"}), None)
        .await
        .unwrap();
    assert_eq!(b.seq, a.seq + 1);
    assert_eq!(a.seq, first.seq + 1);
    c.close().await;
}

#[tokio::test]
async fn refused_sends_and_joins_fail() {
    let node = Node::start(&[]).await;
    let (c, _events) = Client::new(Options::new(&node.ws).token("dev:carol"));
    let err = c.send("bad room!", json!(1), None).await.unwrap_err();
    assert_eq!(err.code(), Some("bad_request"));
    let err = c
        .send("ok", json!("x".repeat(70_000)), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("too_large"));
    let err = c.join("bad room!", None).await.unwrap_err();
    assert_eq!(err.code(), Some("bad_request"));
    assert_eq!(c.pending_sends().await, 0);
    c.close().await;
}

#[tokio::test]
async fn history_pages_over_http() {
    let node = Node::start(&[]).await;
    let (c, _events) = Client::new(Options::new(&node.ws).token("dev:dave"));
    for i in 1..=5 {
        c.send("hist", json!({"i": i}), None).await.unwrap();
    }
    let page = c
        .history(
            "hist",
            HistoryQuery {
                after: Some(0),
                limit: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((page.head, page.has_more), (5, true));
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [1, 2]
    );
    let page = c
        .history(
            "hist",
            HistoryQuery {
                before: Some(5),
                limit: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [3, 4]
    );
    assert_eq!(page.messages[0].body, json!({"i": 3}));
    let err = c
        .history(
            "hist",
            HistoryQuery {
                limit: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("bad_request"));
    c.close().await;
}

/// `reconnect()` drops the socket; the room is rejoined with `since` = last, so what was sent
/// meanwhile is replayed, once each, in order.
#[tokio::test]
async fn reconnect_rejoins_with_since() {
    let node = Node::start(&[]).await;
    let (reader, mut events) = Client::new(Options::new(&node.ws).token("dev:erin"));
    let (writer, _writer_events) = Client::new(Options::new(&node.ws).token("dev:frank"));
    reader.join("re", None).await.unwrap();
    writer.send("re", json!(1), None).await.unwrap();
    assert_eq!(messages(&mut events, 1).await[0].seq, 1);
    reader.reconnect();
    let sends: Vec<_> = (2..=10)
        .map(|i| writer.send("re", json!(i), None))
        .collect();
    for s in sends {
        s.await.unwrap();
    }
    let seen = messages(&mut events, 9).await;
    assert_eq!(
        seen.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (2..=10).collect::<Vec<_>>()
    );
    writer.send("re", json!(11), None).await.unwrap();
    // Nothing doubled: the next message is 11.
    assert_eq!(messages(&mut events, 1).await[0].seq, 11);
    reader.close().await;
    writer.close().await;
}
