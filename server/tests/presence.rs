//! Presence (protocol v1.1): a user is present in a room while at least one of their
//! connections, on any node, is joined to it.
//!
//! - `presence_on_one_node`: SQLite. `joined` lists who is there; `presence` frames tell
//!   arrivals and departures once per user (not per connection); a server-key connection does
//!   not count; a rejoin without `"presence":true` stops the frames; `GET .../presence`; a room
//!   over `SEQCAST_PRESENCE_MAX_USERS` is counted, then listed again.
//! - `presence_across_three_nodes_with_a_kill`: Postgres and Redis, three nodes. A user with
//!   connections on two nodes arrives once and leaves once, when the last one goes; watchers on
//!   two nodes agree; a SIGKILLed node's users leave within the stated bound
//!   (`SEQCAST_PRESENCE_TTL` x 4/3 + an interval), measured (FIGURE lines).
//! - `presence_through_overlapping_faults`: three nodes; Redis is killed (reports go by NOTIFY),
//!   then, with Redis still down, a node is SIGKILLed (its users leave within the bound), then
//!   Redis comes back (reports go by the bus again).
//! - `a_join_storm_is_batched_and_counted`: 600 users join one watched room on two nodes at once
//!   (`SEQCAST_PRESENCE_MAX_USERS=100`): the watcher gets a handful of frames, not 600, a count
//!   once the room is large, the exact count at the end, and the list again when they are gone.
//! - `presence_without_redis`: two Postgres nodes and no Redis: the same through the roster
//!   and NOTIFY, measured.
//!
//! "Nothing happened" is checked with a later marker (another user's arrival), never a pause.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::cluster::{wait_until, Cluster};
use support::http::Http;
use support::redis::TestRedis;
use support::scenario::{figure, scenario};
use support::server::{Claims, ServerOptions, StoreKind, TestServer};
use support::ws::{Auth, WsClient};

const SECRET: &str = "presence-test-secret";
const API_KEY: &str = support::cluster::API_KEY;
/// A short TTL, so that the kill is noticed within seconds: heartbeats every second.
const TTL_SECS: u64 = 3;

async fn connect(url: &str, user: &str) -> WsClient {
    let token = Claims::new(user, &["r*"]).sign(SECRET);
    WsClient::try_connect(url, Auth::Query(&token))
        .await
        .unwrap()
}

/// Joins `room` watching its presence; returns the users listed in `joined`, sorted.
async fn watch(ws: &mut WsClient, room: &str) -> Vec<String> {
    let joined = ws
        .request(json!({"type": "join", "room": room, "presence": true}))
        .await;
    assert_eq!(joined["type"], "joined", "{joined}");
    names(&joined["presence"])
}

fn names(list: &Value) -> Vec<String> {
    let mut out: Vec<String> = list
        .as_array()
        .unwrap_or_else(|| panic!("a list of users: {list}"))
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

/// The next `presence` frame, skipping anything else; within `deadline`.
async fn next_presence(ws: &mut WsClient, deadline: Duration) -> Value {
    let until = Instant::now() + deadline;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no presence frame within {deadline:?}");
        let frame = ws.recv_json_timeout(left).await;
        if frame["type"] == "presence" {
            return frame;
        }
    }
}

/// The next presence frame: exactly these arrivals and departures.
async fn expect_presence(ws: &mut WsClient, joined: &[&str], left: &[&str]) -> Value {
    let frame = next_presence(ws, Duration::from_secs(10)).await;
    let list = |key: &str| match frame.get(key) {
        Some(v) => names(v),
        None => Vec::new(),
    };
    assert_eq!(list("joined"), joined, "arrivals in {frame}");
    assert_eq!(list("left"), left, "departures in {frame}");
    frame
}

/// Waits until the roster holds `n` rows of `user` (one per node it is joined on): a node writes
/// its changes every `SEQCAST_PRESENCE_INTERVAL`, and a user who moves from one node to another
/// faster than that may be seen to leave and come back.
async fn roster_rows(db: &sqlx::PgPool, user: &str, n: i64) {
    wait_until(
        Duration::from_secs(10),
        &format!("{n} roster rows of {user}"),
        || async move {
            let (rows,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM presence WHERE user_id = $1")
                    .bind(user)
                    .fetch_one(db)
                    .await
                    .unwrap();
            rows == n
        },
    )
    .await;
}

async fn present(http: Http, room: &str) -> Value {
    let reply = http
        .bearer(API_KEY)
        .get(&format!("/v1/rooms/{room}/presence"))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_on_one_node() {
    let server = TestServer::start(
        ServerOptions::new(StoreKind::Sqlite)
            .jwt_secret(SECRET)
            .api_key(API_KEY)
            .env("SEQCAST_PRESENCE_MAX_USERS", "3"),
    )
    .await;
    let url = server.ws_url();
    let mut alice = connect(&url, "alice").await;
    assert_eq!(
        watch(&mut alice, "r").await,
        ["alice"],
        "the joiner is present"
    );
    // Bob's two connections: one arrival.
    let mut bob1 = connect(&url, "bob").await;
    let mut bob2 = connect(&url, "bob").await;
    bob1.join("r", None).await;
    expect_presence(&mut alice, &["bob"], &[]).await;
    bob2.join("r", None).await;
    // A server-key connection is nobody.
    let mut service = WsClient::try_connect(&url, Auth::Query(API_KEY))
        .await
        .unwrap();
    assert_eq!(watch(&mut service, "r").await, ["alice", "bob"]);
    bob1.leave("r").await;
    let mut carol = connect(&url, "carol").await;
    carol.join("r", None).await;
    // The marker: carol's arrival is the next frame, so neither bob's second connection nor
    // bob leaving one of two made one.
    expect_presence(&mut alice, &["carol"], &[]).await;
    expect_presence(&mut service, &["carol"], &[]).await;
    assert_eq!(
        present(Http::new(&server), "r").await,
        json!({"room": "r", "users": ["alice", "bob", "carol"], "count": 3})
    );
    bob2.close().await;
    expect_presence(&mut alice, &[], &["bob"]).await;
    expect_presence(&mut service, &[], &["bob"]).await;
    // A rejoin without presence stops the frames; the service still gets them.
    alice.join("r", None).await;
    let mut dan = connect(&url, "dan").await;
    dan.join("r", None).await;
    expect_presence(&mut service, &["dan"], &[]).await;
    let mut erin = connect(&url, "erin").await;
    erin.join("r", None).await;
    // Over 3 present: counted.
    let frame = next_presence(&mut service, Duration::from_secs(10)).await;
    assert_eq!(frame, json!({"type": "presence", "room": "r", "count": 4}));
    let counted = service
        .request(json!({"type": "join", "room": "r", "presence": true}))
        .await;
    assert_eq!(counted["presence_count"], 4, "{counted}");
    assert!(counted.get("presence").is_none(), "{counted}");
    assert_eq!(
        present(Http::new(&server), "r").await,
        json!({"room": "r", "count": 4})
    );
    erin.close().await;
    let frame = next_presence(&mut service, Duration::from_secs(10)).await;
    assert_eq!(frame["type"], "presence");
    assert_eq!(names(&frame["users"]), ["alice", "carol", "dan"], "{frame}");
    // Alice stopped watching: the first frame she has is none of these.
    alice.ping().await;
    let seen = alice.frames_until_pong().await;
    assert!(
        seen.iter().all(|f| f["type"] != "presence"),
        "alice rejoined without presence: {seen:?}"
    );
    // Not a boolean: refused.
    alice
        .expect_error(
            json!({"type": "join", "room": "r", "presence": "yes"}),
            "bad_request",
        )
        .await;
}

/// Three nodes on Postgres and Redis, with the short TTL.
async fn three_nodes() -> Cluster {
    let ttl = format!("{TTL_SECS}s");
    let env = [
        ("SEQCAST_JWT_SECRET", SECRET),
        ("SEQCAST_PRESENCE_TTL", ttl.as_str()),
    ];
    Cluster::start(3, Some(TestRedis::start()), &env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_across_three_nodes_with_a_kill() {
    scenario("presence_across_three_nodes_with_a_kill", async {
        let mut cluster = three_nodes().await;
        let [n0, n1, n2] = [0, 1, 2].map(|i| cluster.node(i).ws_url());
        let db = sqlx::PgPool::connect(&cluster.database_url).await.unwrap();
        let mut alice = connect(&n0, "alice").await;
        let mut watcher2 = connect(&n2, "wendy").await;
        assert_eq!(watch(&mut alice, "r").await, ["alice"]);
        roster_rows(&db, "alice", 1).await;
        assert_eq!(watch(&mut watcher2, "r").await, ["alice", "wendy"]);
        expect_presence(&mut alice, &["wendy"], &[]).await;

        // Bob on two nodes: one arrival for each watcher, and one departure, at the last.
        let mut bob1 = connect(&n1, "bob").await;
        let mut bob2 = connect(&n2, "bob").await;
        let arrived = Instant::now();
        bob1.join("r", None).await;
        expect_presence(&mut alice, &["bob"], &[]).await;
        let cross_node = arrived.elapsed();
        expect_presence(&mut watcher2, &["bob"], &[]).await;
        bob2.join("r", None).await;
        roster_rows(&db, "bob", 2).await;
        bob1.close().await;
        let mut carol = connect(&n1, "carol").await;
        carol.join("r", None).await;
        expect_presence(&mut alice, &["carol"], &[]).await;
        expect_presence(&mut watcher2, &["carol"], &[]).await;
        bob2.close().await;
        expect_presence(&mut alice, &[], &["bob"]).await;
        expect_presence(&mut watcher2, &[], &["bob"]).await;
        let listed = present(cluster.http(1), "r").await;
        assert_eq!(
            names(&listed["users"]),
            ["alice", "carol", "wendy"],
            "{listed}"
        );

        // Node 1 dies with carol and dan on it.
        let mut dan = connect(&n1, "dan").await;
        dan.join("r", None).await;
        expect_presence(&mut alice, &["dan"], &[]).await;
        expect_presence(&mut watcher2, &["dan"], &[]).await;
        let killed = Instant::now();
        cluster.node_mut(1).kill();
        let bound = Duration::from_millis(TTL_SECS * 1000 * 4 / 3 + 100);
        // The bound plus room for a loaded CI machine; the figure says how long it took.
        let deadline = bound + Duration::from_secs(5);
        let mut gone = Vec::new();
        for ws in [&mut alice, &mut watcher2] {
            let frame = next_presence(ws, deadline.saturating_sub(killed.elapsed())).await;
            gone.push(killed.elapsed());
            assert_eq!(names(&frame["left"]), ["carol", "dan"], "{frame}");
            assert!(frame.get("joined").is_none(), "{frame}");
        }
        let listed = present(cluster.http(2), "r").await;
        assert_eq!(names(&listed["users"]), ["alice", "wendy"], "{listed}");
        figure(
            "presence arrival, other node (Redis)",
            format!("{:.1}ms", cross_node.as_secs_f64() * 1e3),
        );
        figure(
            "presence after SIGKILL, users gone at the watchers",
            format!(
                "{:.2}s and {:.2}s (TTL {TTL_SECS}s, bound {:.2}s)",
                gone[0].as_secs_f64(),
                gone[1].as_secs_f64(),
                bound.as_secs_f64()
            ),
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_without_redis() {
    scenario("presence_without_redis", async {
        let env = [("SEQCAST_JWT_SECRET", SECRET)];
        let cluster = Cluster::start(2, None, &env).await;
        let (n0, n1) = (cluster.node(0).ws_url(), cluster.node(1).ws_url());
        let mut alice = connect(&n0, "alice").await;
        assert_eq!(watch(&mut alice, "r").await, ["alice"]);
        let mut arrivals = Vec::new();
        for n in 0..20 {
            let user = format!("u{n:02}");
            let mut ws = connect(&n1, &user).await;
            let start = Instant::now();
            ws.join("r", None).await;
            expect_presence(&mut alice, &[user.as_str()], &[]).await;
            arrivals.push(start.elapsed());
            ws.close().await;
            expect_presence(&mut alice, &[], &[user.as_str()]).await;
        }
        // A watcher on the other node sees alice (its snapshot comes from the roster).
        let mut bob = connect(&n1, "bob").await;
        assert_eq!(watch(&mut bob, "r").await, ["alice", "bob"]);
        arrivals.sort();
        figure(
            "presence arrival, other node, no Redis (NOTIFY), 20 users",
            format!(
                "p50 {:.1}ms, max {:.1}ms",
                arrivals[arrivals.len() / 2].as_secs_f64() * 1e3,
                arrivals[arrivals.len() - 1].as_secs_f64() * 1e3
            ),
        );
    })
    .await;
}

/// Waits until every listed node's `/ready` shows `bus_state` = `state`.
async fn bus_state(cluster: &Cluster, nodes: &[usize], state: &'static str) {
    for &i in nodes {
        wait_until(
            Duration::from_secs(10),
            &format!("n{i} bus {state}"),
            || async move { cluster.ready(i).await.1["bus_state"] == state },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_through_overlapping_faults() {
    scenario("presence_through_overlapping_faults", async {
        let mut cluster = three_nodes().await;
        let [n0, n1, n2] = [0, 1, 2].map(|i| cluster.node(i).ws_url());
        let mut alice = connect(&n0, "alice").await;
        assert_eq!(watch(&mut alice, "r").await, ["alice"]);

        cluster.redis_mut().kill();
        bus_state(&cluster, &[0, 1, 2], "down").await;
        let mut dan = connect(&n1, "dan").await;
        let start = Instant::now();
        dan.join("r", None).await;
        expect_presence(&mut alice, &["dan"], &[]).await;
        let notify = start.elapsed();

        // A second fault on top of the first: dan's node dies while Redis is still down.
        let killed = Instant::now();
        cluster.node_mut(1).kill();
        let bound = Duration::from_millis(TTL_SECS * 1000 * 4 / 3 + 100);
        let frame = next_presence(&mut alice, bound + Duration::from_secs(5)).await;
        let gone = killed.elapsed();
        assert_eq!(names(&frame["left"]), ["dan"], "{frame}");

        cluster.redis_mut().restart();
        bus_state(&cluster, &[0, 2], "up").await;
        let mut eve = connect(&n2, "eve").await;
        eve.join("r", None).await;
        expect_presence(&mut alice, &["eve"], &[]).await;
        figure(
            "presence with Redis down: arrival from another node (NOTIFY)",
            format!("{:.1}ms", notify.as_secs_f64() * 1e3),
        );
        figure(
            "presence with Redis down and a node SIGKILLed: its user gone after",
            format!(
                "{:.2}s (TTL {TTL_SECS}s, bound {:.2}s)",
                gone.as_secs_f64(),
                bound.as_secs_f64()
            ),
        );
    })
    .await;
}

/// Users in the storm, half on each node.
const STORM: usize = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_storm_is_batched_and_counted() {
    scenario("a_join_storm_is_batched_and_counted", async {
        let env = [
            ("SEQCAST_JWT_SECRET", SECRET),
            ("SEQCAST_PRESENCE_MAX_USERS", "100"),
        ];
        let cluster = Cluster::start(2, Some(TestRedis::start()), &env).await;
        let urls = [cluster.node(0).ws_url(), cluster.node(1).ws_url()];
        let mut watcher = connect(&urls[0], "watcher").await;
        assert_eq!(watch(&mut watcher, "r").await, ["watcher"]);
        let started = Instant::now();
        let joins: Vec<_> = (0..STORM)
            .map(|i| {
                let url = urls[i % 2].clone();
                tokio::spawn(async move {
                    let mut ws = connect(&url, &format!("s{i:04}")).await;
                    ws.join("r", None).await;
                    ws
                })
            })
            .collect();
        let mut storm = Vec::with_capacity(STORM);
        for join in joins {
            storm.push(join.await.unwrap());
        }
        let joined = started.elapsed();
        // Frames until the count is exact: every user of both nodes, and the watcher.
        let mut frames = 0;
        loop {
            let frame = next_presence(&mut watcher, Duration::from_secs(15)).await;
            frames += 1;
            if frame["count"] == json!(STORM + 1) {
                break;
            }
        }
        let counted = started.elapsed();
        // One frame per interval at most while joins arrive (plus the first report of the
        // other node's share): far fewer than one per user.
        let bound = (counted.as_millis() / 100) as usize + 3;
        assert!(frames <= bound, "{frames} frames in {counted:?} (at most {bound})");
        let listed = present(cluster.http(1), "r").await;
        assert_eq!(listed, json!({"room": "r", "count": STORM + 1}));
        for ws in storm {
            ws.close().await;
        }
        // Back under the limit: the full list again (`users`), then departures, down to the
        // watcher alone. The client's view, as a client library keeps it:
        let mut view: Option<std::collections::BTreeSet<String>> = None;
        while view.as_ref().map(|v| v.len()) != Some(1) {
            let frame = next_presence(&mut watcher, Duration::from_secs(15)).await;
            if frame.get("count").is_some() {
                view = None;
            } else if let Some(users) = frame.get("users") {
                view = Some(names(users).into_iter().collect());
            } else {
                let view = view.as_mut().unwrap_or_else(|| panic!("a change to a count: {frame}"));
                assert!(frame.get("joined").is_none(), "nobody arrives: {frame}");
                for user in names(&frame["left"]) {
                    assert!(view.remove(&user), "{user} left twice: {frame}");
                }
            }
        }
        assert_eq!(view.unwrap().into_iter().collect::<Vec<_>>(), ["watcher"]);
        figure(
            "presence join storm (600 users on 2 nodes, 1 watcher)",
            format!(
                "joins done in {:.2}s, exact count at the watcher after {:.2}s, {frames} presence frames",
                joined.as_secs_f64(),
                counted.as_secs_f64()
            ),
        );
    })
    .await;
}
