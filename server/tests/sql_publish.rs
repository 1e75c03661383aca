//! `seqcast_publish` (issue 14, item 4): an application publishes inside its own transaction,
//! on real nodes sharing an ICU-collated Postgres, with and without Redis.
//!
//! - A transaction that commits: its message is delivered on every node, in seq order with the
//!   messages sent over WebSocket meanwhile (by the nodes' writers, into the same room), with
//!   the same id and ts format as theirs. One that rolls back: nothing delivered, no seq used.
//! - Head checks and polls are set to a minute, so the only way a published message reaches a
//!   node in time is the node's LISTEN connection: without it these tests fail. (Without Redis,
//!   the WebSocket messages reach the other node only through the reads that notifications
//!   trigger: a node reads from what it has up to the seq notified. The last message of each
//!   phase is therefore a published one.)
//! - Hostile calls: bad arguments get their SQLSTATEs, the body limit is the node's
//!   `SEQCAST_MAX_MESSAGE_BYTES`, and a caller that never commits blocks its room only:
//!   WebSocket senders of that room get `unavailable` after `SEQCAST_DB_TIMEOUT`, other rooms
//!   carry on.
//!
//! Prints FIGURE lines: commit-to-delivery delay of 200 publishes with and without Redis.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, Row};

use support::cluster::{Cluster, DelayStats, API_KEY};
use support::postgres::TestPostgres;
use support::redis::TestRedis;
use support::scenario::{figure, scenario};
use support::ws::{Auth, Event, WsClient};

/// Head checks and polls out of the way (see the module comment).
const QUIET: [(&str, &str); 2] = [
    ("SEQCAST_HEAD_CHECK_INTERVAL", "60s"),
    ("SEQCAST_POLL_INTERVAL", "60s"),
];
/// How long a subscriber may take to see a room's last message: far below the minute a head
/// check would take, far above what a loaded 2-core box needs.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(15);
const ROOM: &str = "orders";
/// WebSocket messages sent while the application transactions run.
const WS_SENDS: usize = 30;
/// Application connections publishing at once, and committed transactions each.
const APP_CONNECTIONS: usize = 4;
const APP_COMMITS: usize = 5;
/// Publishes measured for the figures, one transaction each, one every [`PACE`]: a latency
/// figure, not a throughput one (back to back, the reads they trigger queue up on a loaded box).
const MEASURED: usize = 200;
const PACE: Duration = Duration::from_millis(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_in_transactions_with_redis() {
    scenario("sql_publish_redis", publish_in_transactions(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_in_transactions_without_redis() {
    scenario("sql_publish_no_redis", publish_in_transactions(false)).await;
}

async fn publish_in_transactions(with_redis: bool) {
    let label = if with_redis { "redis" } else { "no redis" };
    let database = TestPostgres::shared().fresh_icu_database().await;
    let redis = with_redis.then(TestRedis::start);
    let cluster = Cluster::start_on(database.clone(), 2, redis, &QUIET).await;
    let mut app = PgConnection::connect(&database).await.unwrap();
    sqlx::query("CREATE TABLE app_orders (id TEXT PRIMARY KEY)")
        .execute(&mut app)
        .await
        .unwrap();

    let mut subscribers = Vec::new();
    for node in 0..2 {
        let mut client = WsClient::try_connect(&cluster.ws(node).1, Auth::None)
            .await
            .unwrap();
        let joined = client.join(ROOM, Some(0)).await;
        assert_eq!(joined["head"], 0, "{joined}");
        subscribers.push(client);
    }

    // WebSocket sends on n0 while four connections publish (each commits five transactions and
    // rolls one back) into the same room.
    let ws_url = cluster.ws(0).1;
    let sending = tokio::spawn(async move {
        let mut client = WsClient::try_connect(&ws_url, Auth::None).await.unwrap();
        for i in 0..WS_SENDS {
            client.send_msg(ROOM, json!({"ws": i})).await;
        }
    });
    let publishing: Vec<_> = (0..APP_CONNECTIONS)
        .map(|c| {
            let database = database.clone();
            tokio::spawn(async move {
                let mut conn = PgConnection::connect(&database).await.unwrap();
                for t in 0..=APP_COMMITS {
                    let commit = t != 2;
                    let order = format!("o-{c}-{t}");
                    let mut tx = conn.begin().await.unwrap();
                    sqlx::query("INSERT INTO app_orders (id) VALUES ($1)")
                        .bind(&order)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    let body = json!({"order": order, "commit": commit});
                    publish(&mut tx, ROOM, &body, Some(&order)).await.unwrap();
                    if commit {
                        tx.commit().await.unwrap();
                    } else {
                        tx.rollback().await.unwrap();
                    }
                }
            })
        })
        .collect();
    sending.await.unwrap();
    for task in publishing {
        task.await.unwrap();
    }
    let last = publish(&mut app, ROOM, &json!({"last": true}), None)
        .await
        .unwrap();
    let total = (WS_SENDS + APP_CONNECTIONS * APP_COMMITS + 1) as u64;
    assert_eq!(last, total, "rolled-back publishes took no seq");

    let mut streams = Vec::new();
    for (node, client) in subscribers.iter_mut().enumerate() {
        let received = receive_until(client, total).await;
        let seqs: Vec<u64> = received
            .iter()
            .map(|(m, _)| m["seq"].as_u64().unwrap())
            .collect();
        support::check::assert_contiguous(&seqs, 1, total, &format!("n{node} ({label})"));
        streams.push(received);
    }
    let bodies: Vec<&Value> = streams[0].iter().map(|(m, _)| &m["body"]).collect();
    for c in 0..APP_CONNECTIONS {
        for t in 0..=APP_COMMITS {
            let order = format!("o-{c}-{t}");
            let found = bodies
                .iter()
                .filter(|b| b["order"] == order.as_str())
                .count();
            assert_eq!(
                found,
                usize::from(t != 2),
                "{order} delivered iff committed"
            );
        }
    }
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM app_orders")
        .fetch_one(&mut app)
        .await
        .unwrap();
    assert_eq!(orders, (APP_CONNECTIONS * APP_COMMITS) as i64);
    // Both nodes got the same frames; published ones look like the writer's, and like what the
    // history endpoint reads back.
    assert_eq!(
        streams[0].iter().map(|(m, _)| m).collect::<Vec<_>>(),
        streams[1].iter().map(|(m, _)| m).collect::<Vec<_>>()
    );
    let history = cluster
        .http(1)
        .bearer(API_KEY)
        .messages(ROOM, "after=0&limit=1000")
        .await;
    let shape = |m: &Value| {
        let id = m["id"].as_str().unwrap().to_owned();
        let ts = m["ts"].as_str().unwrap().to_owned();
        (id.len(), id.chars().nth(14), ts.len(), ts.ends_with('Z'))
    };
    let writer_made = &streams[0]
        .iter()
        .find(|(m, _)| m["from"] != "shop")
        .unwrap()
        .0;
    for ((live, _), stored) in streams[0]
        .iter()
        .zip(history["messages"].as_array().unwrap())
    {
        support::check::assert_message(live, ROOM, stored["seq"].as_u64().unwrap());
        for field in ["seq", "id", "from", "body", "ts"] {
            assert_eq!(live[field], stored[field], "{field} of {live} vs {stored}");
        }
        assert_eq!(shape(live), shape(writer_made), "{live} vs {writer_made}");
        assert_eq!(shape(live).1, Some('7'), "a UUIDv7: {live}");
    }

    // The same idem again, with another body: the original seq, nothing stored.
    let original = streams[0]
        .iter()
        .find(|(m, _)| m["body"]["order"] == "o-1-3")
        .unwrap()
        .0["seq"]
        .as_u64()
        .unwrap();
    let again = publish(&mut app, ROOM, &json!({"other": 1}), Some("o-1-3"))
        .await
        .unwrap();
    assert_eq!(again, original, "a repeated idem returns the original seq");

    // Figures: one transaction per publish, paced.
    let start = total;
    let expected = start + MEASURED as u64;
    let mut collectors = Vec::new();
    for client in subscribers {
        collectors.push(tokio::spawn(async move {
            let mut client = client;
            receive_until(&mut client, expected).await
        }));
    }
    let mut committed = Vec::with_capacity(MEASURED);
    let mut pace = tokio::time::interval(PACE);
    for i in 0..MEASURED {
        pace.tick().await;
        let mut tx = app.begin().await.unwrap();
        publish(&mut tx, ROOM, &json!({"measured": i}), None)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        committed.push(Instant::now());
    }
    let mut delays = Vec::new();
    for collector in collectors {
        let received = collector.await.unwrap();
        // The repeat above stored nothing: the first frame here is the first measured publish.
        let seqs: Vec<u64> = received
            .iter()
            .map(|(m, _)| m["seq"].as_u64().unwrap())
            .collect();
        support::check::assert_contiguous(&seqs, start + 1, expected, label);
        for (message, at) in received {
            let i = message["body"]["measured"].as_u64().unwrap() as usize;
            delays.push(at.saturating_duration_since(committed[i]));
        }
    }
    figure(
        &format!("seqcast_publish commit-to-delivery, 2 nodes, {label}, LISTEN alone"),
        DelayStats::of(delays),
    );
}

/// A caller that never commits blocks its room, and only its room; bad arguments are refused
/// with their SQLSTATEs; the body limit is the node's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_callers() {
    scenario("sql_publish_hostile", async {
        let database = TestPostgres::shared().fresh_icu_database().await;
        let env = [
            QUIET[0],
            QUIET[1],
            ("SEQCAST_DB_TIMEOUT", "1s"),
            ("SEQCAST_MAX_MESSAGE_BYTES", "1000"),
            ("SEQCAST_COMMIT_CONCURRENCY", "1"),
        ];
        let cluster = Cluster::start_on(database.clone(), 1, None, &env).await;
        let mut app = PgConnection::connect(&database).await.unwrap();

        let long_room = "r".repeat(129);
        let refused = [
            ("bad room", json!(1), "bad room", "22023"),
            ("", json!(1), "empty room", "22023"),
            (long_room.as_str(), json!(1), "room of 129", "22023"),
            ("caf\u{e9}", json!(1), "room not ASCII", "22023"),
            ("r", json!("x".repeat(1000)), "body over the node's limit", "54000"),
        ];
        for (room, body, what, code) in refused {
            let error = publish(&mut app, room, &body, None).await.unwrap_err();
            assert_eq!(sqlstate(&error), code, "{what}: {error}");
        }
        let error = publish_as(&mut app, "r", "", &json!(1), None).await.unwrap_err();
        assert_eq!(sqlstate(&error), "22023", "empty sender: {error}");
        let error = sqlx::query("SELECT seqcast_publish('r', 'a', NULL)")
            .execute(&mut app)
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&error), "22004", "NULL body: {error}");
        // jsonb itself refuses U+0000, before the function runs.
        let error = sqlx::query("SELECT seqcast_publish('r', 'a', $1::text::jsonb)")
            .bind(r#"{"a":"\u0000"}"#)
            .execute(&mut app)
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&error), "22P05", "U+0000: {error}");
        let head: Option<i64> = sqlx::query_scalar("SELECT head FROM rooms WHERE room = 'r'")
            .fetch_optional(&mut app)
            .await
            .unwrap();
        assert_eq!(head, None, "nothing refused left a trace");

        // Transactions that publish to `gate` and to `held` (rooms with a message already) and
        // stay open, while one connection sends to `gate`, `held` and `free` back to back. One
        // committer (`SEQCAST_COMMIT_CONCURRENCY=1`): whether it takes all three in one commit
        // or waits on `gate` while the other two queue and then takes those together, `free`
        // shares a commit with a held room, and must not fail with it (before, it was answered
        // `unavailable` too).
        let mut subscriber = WsClient::try_connect(&cluster.ws(0).1, Auth::None)
            .await
            .unwrap();
        subscriber.join("held", Some(0)).await;
        let mut sender = WsClient::try_connect(&cluster.ws(0).1, Auth::None)
            .await
            .unwrap();
        sender.send_msg("held", json!("ws first")).await;
        sender.send_msg("gate", json!("ws first")).await;
        let mut gate = PgConnection::connect(&database).await.unwrap();
        let mut gate_tx = gate.begin().await.unwrap();
        assert_eq!(publish(&mut gate_tx, "gate", &json!("app"), None).await.unwrap(), 2);
        let mut tx = app.begin().await.unwrap();
        assert_eq!(publish(&mut tx, "held", &json!("app"), None).await.unwrap(), 2);
        let started = Instant::now();
        for room in ["gate", "held", "free"] {
            sender
                .send_json(json!({"type": "send", "room": room, "body": "ws", "ref": room}))
                .await;
        }
        let free = sender.reply_to(&json!("free")).await;
        let free_after = started.elapsed();
        assert_eq!(free["type"], "ack", "a room beside the held one commits: {free}");
        let held = sender.reply_to(&json!("held")).await;
        let held_after = started.elapsed();
        assert_eq!(held["code"], "unavailable", "{held}");
        let reply = sender.reply_to(&json!("gate")).await;
        assert_eq!(reply["code"], "unavailable", "{reply}");
        gate_tx.rollback().await.unwrap();
        tx.commit().await.unwrap();
        let received = receive_until(&mut subscriber, 2).await;
        assert_eq!(received[1].0["body"], "app");
        let ack = sender.send_msg("held", json!("ws again")).await;
        assert_eq!(ack["seq"], 3, "the refused send took no seq: {ack}");

        // The same with a room the open transaction creates: its row is invisible to the
        // writer until then, so the room is tried once more on its own before the answer.
        let mut tx = app.begin().await.unwrap();
        assert_eq!(publish(&mut tx, "fresh", &json!("app"), None).await.unwrap(), 1);
        let started = Instant::now();
        let reply = sender
            .request(json!({"type": "send", "room": "fresh", "body": "ws"}))
            .await;
        let fresh_after = started.elapsed();
        assert_eq!(reply["code"], "unavailable", "{reply}");
        tx.rollback().await.unwrap();
        let ack = sender.send_msg("fresh", json!("ws")).await;
        assert_eq!(ack["seq"], 1, "the rolled-back publish took no seq: {ack}");

        figure(
            "rooms held by an open seqcast_publish transaction (SEQCAST_DB_TIMEOUT=1s, lock_timeout 750ms, one committer)",
            format!(
                "sends to two held rooms and a free one, back to back: the held ones answered unavailable (the later after {}), the free one, in a commit with a held one, acked after {}; a send to a new room the transaction created answered unavailable after {}",
                support::scenario::ms(held_after),
                support::scenario::ms(free_after),
                support::scenario::ms(fresh_after),
            ),
        );
    })
    .await;
}

/// The node's LISTEN connection is killed (as a failover or an operator would): it is opened
/// again, and a message published around that time is still delivered, by the notification if
/// it came after the new LISTEN, else by the head check the node makes once listening again.
/// Head checks are a minute apart here, so without either this fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listen_connection_is_reopened() {
    scenario("sql_publish_listen_lost", async {
        let database = TestPostgres::shared().fresh_icu_database().await;
        let cluster = Cluster::start_on(database.clone(), 1, None, &QUIET).await;
        let mut app = PgConnection::connect(&database).await.unwrap();
        let mut subscriber = WsClient::try_connect(&cluster.ws(0).1, Auth::None)
            .await
            .unwrap();
        subscriber.join(ROOM, Some(0)).await;
        let listeners = "SELECT pid FROM pg_stat_activity \
                         WHERE datname = current_database() AND query LIKE 'LISTEN%'";
        let mut killed = Vec::new();
        for round in 1..=3u64 {
            let pids: Vec<i32> = sqlx::query_scalar(listeners)
                .fetch_all(&mut app)
                .await
                .unwrap();
            assert_eq!(pids.len(), 1, "one LISTEN connection per node: {pids:?}");
            assert!(!killed.contains(&pids[0]), "a new connection each time");
            sqlx::query("SELECT pg_terminate_backend($1)")
                .bind(pids[0])
                .execute(&mut app)
                .await
                .unwrap();
            killed.push(pids[0]);
            // At once, most likely before the node listens again.
            let seq = publish(&mut app, ROOM, &json!({"round": round}), None)
                .await
                .unwrap();
            assert_eq!(seq, round);
            let received = receive_until(&mut subscriber, round).await;
            assert_eq!(received.last().unwrap().0["body"]["round"], round);
            support::cluster::wait_until(DELIVERY_DEADLINE, "a new LISTEN connection", || {
                let (database, killed) = (database.clone(), killed.clone());
                async move {
                    let mut conn = PgConnection::connect(&database).await.unwrap();
                    let pids: Vec<i32> = sqlx::query_scalar(listeners)
                        .fetch_all(&mut conn)
                        .await
                        .unwrap();
                    pids.len() == 1 && !killed.contains(&pids[0])
                }
            })
            .await;
        }
    })
    .await;
}

/// `seqcast_publish(room, 'shop', body, idem)` on `conn`.
async fn publish(
    conn: &mut PgConnection,
    room: &str,
    body: &Value,
    idem: Option<&str>,
) -> Result<u64, sqlx::Error> {
    publish_as(conn, room, "shop", body, idem).await
}

async fn publish_as(
    conn: &mut PgConnection,
    room: &str,
    sender: &str,
    body: &Value,
    idem: Option<&str>,
) -> Result<u64, sqlx::Error> {
    let row = sqlx::query("SELECT seqcast_publish($1, $2, $3::text::jsonb, $4)")
        .bind(room)
        .bind(sender)
        .bind(body.to_string())
        .bind(idem)
        .fetch_one(conn)
        .await?;
    let seq: i64 = row.try_get(0)?;
    Ok(u64::try_from(seq).unwrap())
}

fn sqlstate(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(e) => e.code().map(|c| c.into_owned()).unwrap_or_default(),
        other => panic!("not a database error: {other}"),
    }
}

/// Every `message` frame `client` receives, with its arrival time, until one with seq `last`;
/// panics on any other frame or after [`DELIVERY_DEADLINE`] (with what it had).
async fn receive_until(client: &mut WsClient, last: u64) -> Vec<(Value, Instant)> {
    let until = Instant::now() + DELIVERY_DEADLINE;
    let mut received = Vec::new();
    let mut seen = BTreeSet::new();
    loop {
        let remaining = until.saturating_duration_since(Instant::now());
        match client.next_event(remaining).await {
            Some(Event::Frame(frame)) if frame["type"] == "message" => {
                let seq = frame["seq"].as_u64().unwrap();
                assert!(seen.insert(seq), "seq {seq} twice");
                received.push((frame, Instant::now()));
                if seq == last {
                    return received;
                }
            }
            Some(other) => panic!("expected messages, got {other:?}"),
            None => panic!(
                "seq {last} not delivered within {DELIVERY_DEADLINE:?}; got {:?}",
                seen.iter().collect::<Vec<_>>()
            ),
        }
    }
}
