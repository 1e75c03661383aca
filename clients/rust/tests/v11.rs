//! v1.1 against a real seqcast node (SQLite, tokens): signals, read cursors and presence between
//! two clients.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use seqcast_client::{Client, Error, Event, JoinOptions, Options, Signal};
use serde_json::json;
use support::{mint_token, next_matching, wait_for, Node};
use tokio::sync::mpsc;

const SECRET: &str = "rust-client-v11-secret";
const WAIT: Duration = Duration::from_secs(10);

async fn node() -> Node {
    Node::start(&[("SEQCAST_JWT_SECRET", SECRET)]).await
}

fn client(node: &Node, sub: &str) -> (Client, mpsc::UnboundedReceiver<Event>) {
    Client::new(Options::new(&node.ws).token(mint_token(SECRET, sub, 600)))
}

async fn next_signal(events: &mut mpsc::UnboundedReceiver<Event>) -> Signal {
    next_matching(events, WAIT, "a signal", |e| match e {
        Event::Signal(s) => Some(s),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn signals_reach_the_other_client_not_the_sender_and_a_refusal_is_an_event() {
    let node = node().await;
    let (alice, mut alice_events) = client(&node, "alice");
    let (bob, mut bob_events) = client(&node, "bob");
    alice.join("sig", None).await.unwrap();
    bob.join("sig", None).await.unwrap();
    alice.signal("sig", json!({"typing": true})).await.unwrap();
    let got = next_signal(&mut bob_events).await;
    let expected = Signal {
        room: "sig".into(),
        from: "alice".into(),
        body: json!({"typing": true}),
    };
    assert_eq!(got, expected);
    // Over SEQCAST_MAX_SIGNAL_BYTES (4096).
    alice.signal("sig", json!("x".repeat(5000))).await.unwrap();
    let refused = next_matching(&mut alice_events, WAIT, "the refusal", |e| match e {
        Event::Error(e @ Error::SignalRefused { .. }) => Some(e),
        Event::Signal(s) => panic!("alice got a signal before bob's marker: {s:?}"),
        _ => None,
    })
    .await;
    assert_eq!(refused.code(), Some("too_large"));
    bob.signal("sig", json!("marker")).await.unwrap();
    let marker = next_signal(&mut alice_events).await;
    assert_eq!(
        (marker.from.as_str(), &marker.body),
        ("bob", &json!("marker"))
    );
    // Bob got nothing else meanwhile: his next signal is alice's next one.
    alice.signal("sig", json!("second")).await.unwrap();
    assert_eq!(next_signal(&mut bob_events).await.body, json!("second"));
    println!("signals: relayed both ways, too_large refused and not relayed");
    alice.close().await;
    bob.close().await;
}

#[tokio::test]
async fn read_cursors_move_across_a_users_clients_and_never_back() {
    let node = node().await;
    let (phone, _phone_events) = client(&node, "carol");
    let (laptop, mut laptop_events) = client(&node, "carol");
    let (dave, _dave_events) = client(&node, "dave");
    for i in 1..=5 {
        phone.send("rd", json!(i), None).await.unwrap();
    }
    assert_eq!(phone.join("rd", None).await.unwrap().read, 0);
    laptop.join("rd", None).await.unwrap();
    dave.join("rd", None).await.unwrap();
    assert_eq!(phone.read("rd", 3).await.unwrap(), 3);
    assert_eq!(phone.read_cursor("rd").await, Some(3));
    let moved = next_matching(&mut laptop_events, WAIT, "the move", |e| match e {
        Event::Read { room, seq } => Some((room, seq)),
        _ => None,
    })
    .await;
    assert_eq!(moved, ("rd".to_owned(), 3));
    assert_eq!(laptop.read_cursor("rd").await, Some(3));
    assert_eq!(
        laptop.read("rd", 2).await.unwrap(),
        3,
        "a lower seq leaves it"
    );
    assert_eq!(
        laptop.read("rd", 99).await.unwrap(),
        5,
        "capped at the head"
    );
    wait_for(WAIT, "the phone's cursor at 5", || async {
        (phone.read_cursor("rd").await == Some(5)).then_some(())
    })
    .await;
    let (tablet, _tablet_events) = client(&node, "carol");
    assert_eq!(
        tablet.join("rd", None).await.unwrap().read,
        5,
        "from joined"
    );
    assert_eq!(tablet.read_cursor("rd").await, Some(5));
    assert_eq!(
        dave.read("rd", 1).await.unwrap(),
        1,
        "dave's cursor is his own"
    );
    println!("read cursors: 3 then 5 reached the user's other clients");
    for c in [phone, laptop, dave, tablet] {
        c.close().await;
    }
}

#[tokio::test]
async fn presence_shows_the_other_client_join_and_leave() {
    let node = node().await;
    let (erin, mut events) = client(&node, "erin");
    let (frank, _frank_events) = client(&node, "frank");
    let opts = JoinOptions {
        presence: true,
        since: None,
    };
    let joined = erin.join_with("pres", opts).await.unwrap();
    // The joiner is present; frank is not yet.
    assert_eq!(joined.presence, Some(vec!["erin".to_owned()]));
    assert_eq!(
        erin.presence("pres").await.and_then(|p| p.users),
        Some(vec!["erin".to_owned()])
    );
    frank.join("pres", None).await.unwrap();
    let arrived = next_matching(&mut events, WAIT, "frank joining", |e| match e {
        Event::Presence(p) if p.joined.contains(&"frank".to_owned()) => Some(p),
        _ => None,
    })
    .await;
    assert!(arrived.users.unwrap().contains(&"frank".to_owned()));
    frank.leave("pres").await;
    let gone = next_matching(&mut events, WAIT, "frank leaving", |e| match e {
        Event::Presence(p) if p.left.contains(&"frank".to_owned()) => Some(p),
        _ => None,
    })
    .await;
    assert!(!gone.users.unwrap().contains(&"frank".to_owned()));
    erin.close().await;
    frank.close().await;
}
