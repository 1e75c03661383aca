//! The v1.1 frames against a scripted fake server (`support::fake`, not seqcast): signals (sent,
//! received, refused, never buffered nor resent), read cursors (never moving back, set by
//! `joined` too) and presence (set, deltas, count-only mode, full lists, rejoin with presence
//! after a reconnect). Unsolicited frames are queued in `push` and written by the fake server
//! just before its answer to the next `ping()`, so that `ping()` returning means they were handled.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use seqcast_client::{Client, Error, Event, JoinOptions, Options, PresenceChange, Signal};
use serde_json::{json, Value};
use support::fake::{fake, frames_of};
use support::next_matching;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(5);

type Push = Arc<Mutex<Vec<Value>>>;

/// Answers `ping` with the pushed frames then `pong`, `leave` with `left`, `read` with
/// `read_reply(seq)`, and `join` with `joined(conn, frame)` (plus `ref`).
fn script(
    push: &Push,
    joined: impl Fn(usize, &Value) -> Value + Send + Sync + 'static,
    read_reply: impl Fn(u64) -> Value + Send + Sync + 'static,
) -> impl Fn(usize, &Value) -> Vec<Value> + Send + Sync + 'static {
    let push = Arc::clone(push);
    move |conn, f| {
        let mut reply = match f["type"].as_str() {
            Some("ping") => {
                let mut out = std::mem::take(&mut *push.lock().unwrap());
                out.push(json!({"type": "pong"}));
                out
            }
            Some("leave") => vec![json!({"type": "left", "room": f["room"]})],
            Some("join") => {
                let mut j = joined(conn, f);
                j["type"] = json!("joined");
                j["room"] = f["room"].clone();
                vec![j]
            }
            Some("read") => vec![read_reply(f["seq"].as_u64().unwrap())],
            Some("signal") if f["body"] == "too big" => {
                vec![json!({"type": "error", "code": "too_large", "message": "signal too large"})]
            }
            _ => vec![],
        };
        if let Some(last) = reply.last_mut() {
            last["ref"] = f["ref"].clone();
        }
        reply
    }
}

fn fast(url: String) -> Options {
    Options::new(url)
        .backoff(Duration::from_millis(10), Duration::from_millis(20))
        .drain_jitter(Duration::from_millis(10))
}

async fn presence_change(events: &mut mpsc::UnboundedReceiver<Event>) -> PresenceChange {
    next_matching(events, WAIT, "a presence change", |e| match e {
        Event::Presence(p) => Some(p),
        _ => None,
    })
    .await
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn signals_are_sent_received_and_refused_never_buffered_nor_resent() {
    let push = Push::default();
    let joined = |_: usize, _: &Value| json!({"head": 0, "first": 1});
    let read = |_| json!({"type": "read", "room": "r", "seq": 0});
    let (url, log) = fake(script(&push, joined, read)).await;
    let (c, mut events) = Client::new(fast(url));
    c.join("r", None).await.unwrap();
    c.signal("r", json!({"typing": true})).await.unwrap();
    c.signal("r", json!("too big")).await.unwrap();
    let refused = next_matching(&mut events, WAIT, "the refusal", |e| match e {
        Event::Error(e @ Error::SignalRefused { .. }) => Some(e),
        _ => None,
    })
    .await;
    assert_eq!(refused.code(), Some("too_large"));
    assert!(matches!(&refused, Error::SignalRefused { room, .. } if room == "r"));
    push.lock()
        .unwrap()
        .push(json!({"type": "signal", "room": "r", "from": "bob", "body": {"typing": true}}));
    c.ping().await.unwrap();
    let got = next_matching(&mut events, WAIT, "a signal", |e| match e {
        Event::Signal(s) => Some(s),
        _ => None,
    })
    .await;
    let expected = Signal {
        room: "r".into(),
        from: "bob".into(),
        body: json!({"typing": true}),
    };
    assert_eq!(got, expected);
    let sent = frames_of(&log, "signal");
    assert_eq!(sent.len(), 2);
    let mut keys: Vec<_> = sent[0].1.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["body", "ref", "room", "type"]);
    // A reconnect: nothing resent. Round trips on the new connection show it.
    c.reconnect();
    next_matching(&mut events, WAIT, "the rejoin", |e| match e {
        Event::Rejoined(_) => Some(()),
        _ => None,
    })
    .await;
    c.read("r", 0).await.unwrap();
    assert_eq!(frames_of(&log, "signal").len(), 2, "no signal resent");
    c.close().await;
    assert_eq!(c.signal("r", json!(1)).await, Err(Error::Closed));
}

#[tokio::test]
async fn a_signal_while_offline_is_dropped_and_the_caller_told() {
    // Nobody listens: the client never gets online.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("ws://{}/v1/ws", listener.local_addr().unwrap())
    };
    let (c, _events) = Client::new(fast(dead));
    let res = c.signal("r", json!({"typing": true})).await;
    assert!(matches!(res, Err(Error::Connection(_))), "{res:?}");
    assert!(matches!(c.read("r", 1).await, Err(Error::Connection(_))));
    c.close().await;
}

#[tokio::test]
async fn the_read_cursor_keeps_the_largest_seen_and_never_moves_back() {
    let push = Push::default();
    // The rejoin's joined carries an older cursor (another node, behind): kept at the largest.
    let joined = |conn: usize, _: &Value| json!({"head": 60, "first": 1, "read": if conn == 0 { 40 } else { 30 }});
    let read = |seq: u64| json!({"type": "read", "room": "r", "seq": seq.clamp(50, 60)});
    let (url, log) = fake(script(&push, joined, read)).await;
    let (c, mut events) = Client::new(fast(url));
    assert_eq!(c.read_cursor("r").await, None);
    let j = c.join("r", None).await.unwrap();
    assert_eq!(j.read, 40);
    assert_eq!(c.read_cursor("r").await, Some(40), "joined sets it");
    assert_eq!(c.read("r", 57).await.unwrap(), 57);
    let sent = &frames_of(&log, "read")[0].1;
    assert_eq!((&sent["room"], &sent["seq"]), (&json!("r"), &json!(57)));
    assert_eq!(c.read_cursor("r").await, Some(57));
    // Another device's moves, out of order, and one in a room not joined.
    push.lock().unwrap().extend([
        json!({"type": "read", "room": "r", "seq": 59}),
        json!({"type": "read", "room": "r", "seq": 58}),
        json!({"type": "read", "room": "other", "seq": 3}),
    ]);
    c.ping().await.unwrap();
    assert_eq!(c.read_cursor("r").await, Some(59), "never moves back");
    assert_eq!(c.read_cursor("other").await, Some(3));
    let mut moves = Vec::new();
    while moves.len() < 2 {
        let m = next_matching(&mut events, WAIT, "a move", |e| match e {
            Event::Read { room, seq } => Some((room, seq)),
            _ => None,
        })
        .await;
        moves.push(m);
    }
    assert_eq!(moves, [("r".to_owned(), 59), ("other".to_owned(), 3)]);
    c.reconnect();
    let rejoined = next_matching(&mut events, WAIT, "the rejoin", |e| match e {
        Event::Rejoined(j) => Some(j.read),
        Event::Read { .. } => panic!("the late 58 or the rejoin's 30 reported as a move"),
        _ => None,
    })
    .await;
    assert_eq!(rejoined, 30);
    assert_eq!(c.read_cursor("r").await, Some(59));
    c.close().await;
}

#[tokio::test]
async fn presence_set_deltas_count_only_full_lists_and_rejoin_after_a_reconnect() {
    let push = Push::default();
    let joined = |conn: usize, f: &Value| {
        if f["presence"] != true {
            return json!({"head": 0, "first": 1});
        }
        // After the reconnect: bob left and dan arrived meanwhile.
        let list = if conn == 0 {
            json!(["bob", "alice"])
        } else {
            json!(["alice", "carol", "dan"])
        };
        json!({"head": 0, "first": 1, "presence": list})
    };
    let (url, log) = fake(script(&push, joined, |_| json!({}))).await;
    let (c, mut events) = Client::new(fast(url));
    let opts = JoinOptions {
        presence: true,
        ..JoinOptions::default()
    };
    let j = c.join_with("r", opts).await.unwrap();
    assert_eq!(j.presence, Some(names(&["bob", "alice"])));
    assert_eq!(frames_of(&log, "join")[0].1["presence"], true);
    let first = presence_change(&mut events).await;
    assert_eq!(first.joined, names(&["alice", "bob"]));
    let p = c.presence("r").await.unwrap();
    assert_eq!((p.users, p.count), (Some(names(&["alice", "bob"])), 2));
    push.lock().unwrap().extend([
        json!({"type": "presence", "room": "r", "joined": ["carol"]}),
        json!({"type": "presence", "room": "r", "left": ["nobody"], "joined": []}),
        json!({"type": "presence", "room": "other", "joined": ["x"]}),
    ]);
    c.ping().await.unwrap();
    let carol = presence_change(&mut events).await;
    assert_eq!((carol.joined, carol.left), (names(&["carol"]), vec![]));
    c.reconnect();
    let diff = presence_change(&mut events).await;
    assert_eq!((diff.joined, diff.left), (names(&["dan"]), names(&["bob"])));
    let joins = frames_of(&log, "join");
    assert_eq!(joins.len(), 2);
    assert_eq!(joins[1].1["presence"], true, "the rejoin asks again");
    // Very large: only the count; small again: a full list.
    push.lock().unwrap().extend([
        json!({"type": "presence", "room": "r", "count": 20000}),
        json!({"type": "presence", "room": "r", "users": ["erin"]}),
    ]);
    c.ping().await.unwrap();
    let big = presence_change(&mut events).await;
    assert_eq!((big.users, big.count), (None, 20000));
    let small = presence_change(&mut events).await;
    assert_eq!(
        (small.joined, small.users),
        (names(&["erin"]), Some(names(&["erin"])))
    );
    // A room joined without presence tracks none, and its join does not ask.
    c.join("plain", None).await.unwrap();
    assert_eq!(c.presence("plain").await, None);
    assert_eq!(frames_of(&log, "join")[2].1.get("presence"), None);
    c.leave("r").await;
    assert_eq!(c.presence("r").await, None);
    c.close().await;
}

#[tokio::test]
async fn a_joined_with_presence_count_tracks_only_the_count() {
    let push = Push::default();
    let joined = |_: usize, _: &Value| json!({"head": 0, "first": 1, "presence_count": 70000});
    let (url, _log) = fake(script(&push, joined, |_| json!({}))).await;
    let (c, mut events) = Client::new(fast(url));
    let opts = JoinOptions {
        presence: true,
        since: None,
    };
    let j = c.join_with("big", opts).await.unwrap();
    assert_eq!((j.presence, j.presence_count), (None, Some(70000)));
    assert_eq!(presence_change(&mut events).await.count, 70000);
    push.lock()
        .unwrap()
        .push(json!({"type": "presence", "room": "big", "count": 70001}));
    c.ping().await.unwrap();
    let p = c.presence("big").await.unwrap();
    assert_eq!((p.users, p.count), (None, 70001));
    c.close().await;
}
