//! Several `seqcast` nodes sharing one Postgres database and, optionally, one Redis, plus the
//! clients the cluster tests drive through them.
//!
//! - [`Cluster`] starts the nodes (`n0`, `n1`, ...) on a fresh database of the shared test
//!   Postgres, all with the server key [`API_KEY`] (so a sender can keep one identity, and thus
//!   its `idem` scope, across nodes).
//! - [`Sender`] and [`listen`] play the application: they use the client library
//!   (`clients/rust`), which reconnects, rejoins with `since` and resends unacknowledged sends
//!   with the same `idem`, as any application's client does. What they check is the server's
//!   side, from outside: the acks and deliveries, and the library's counts of duplicates it
//!   dropped and gaps it repaired (both must stay 0). Tests of the wire protocol itself use the
//!   raw frames of `ws.rs` instead.
//! - [`Sender`] sends numbered messages whose body carries the send time, pipelined and
//!   optionally paced, records every ack, and fails over to the other nodes of its route.
//! - [`listen`] runs a subscriber in a task: it records every message with its delivery delay
//!   until the room's final head is reached, failing over when its node dies, or hopping
//!   between nodes when told to.
//! - [`Ledger`] gathers the acks of all senders; [`check_stream`] holds what a subscriber got
//!   against it: every seq once, in order, with the acknowledged id and body.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::stream::{FuturesUnordered, StreamExt};
use seqcast_client::{Client, Event, Options, State};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::check::assert_contiguous;
use super::http::Http;
use super::postgres::TestPostgres;
use super::redis::TestRedis;
use super::server::{ServerOptions, StoreKind, TestServer};

/// The server key of every node.
pub const API_KEY: &str = "cluster-test-api-key";

/// Reconnect delay of the clients (the backoff's base; its cap is ten times this).
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

/// Nodes sharing one database and, optionally, one Redis.
pub struct Cluster {
    pub database_url: String,
    redis: Option<TestRedis>,
    nodes: Vec<TestServer>,
}

impl Cluster {
    /// Starts `count` nodes on a fresh Postgres database, with `REDIS_URL` pointing at `redis`
    /// when given, and the extra environment `env` on every node. The first node starts alone
    /// (it applies the migrations), the others after it.
    pub async fn start(count: usize, redis: Option<TestRedis>, env: &[(&str, &str)]) -> Cluster {
        let database_url = TestPostgres::shared().fresh_database().await;
        Cluster::start_on(database_url, count, redis, env).await
    }

    /// [`Cluster::start`] on the database at `database_url` (e.g. one with an ICU collation).
    pub async fn start_on(
        database_url: String,
        count: usize,
        redis: Option<TestRedis>,
        env: &[(&str, &str)],
    ) -> Cluster {
        let mut nodes = Vec::with_capacity(count);
        for index in 0..count {
            // Senders pipeline thousands of messages per connection, some as anonymous
            // development-mode clients: no per-connection rate limit (`env` may set one).
            let mut options = ServerOptions::new(StoreKind::Postgres)
                .database_url(database_url.clone())
                .node_id(format!("n{index}"))
                .api_key(API_KEY)
                .env("SEQCAST_SEND_RATE", "0");
            if let Some(redis) = &redis {
                options = options.redis_url(redis.url());
            }
            for (key, value) in env {
                options = options.env(*key, *value);
            }
            let node = TestServer::start(options).await;
            eprintln!("cluster node n{index}: pid {} at {}", node.pid, node.addr);
            nodes.push(node);
        }
        Cluster {
            database_url,
            redis,
            nodes,
        }
    }

    pub fn node(&self, index: usize) -> &TestServer {
        &self.nodes[index]
    }

    pub fn node_mut(&mut self, index: usize) -> &mut TestServer {
        &mut self.nodes[index]
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// `(index, ws url)` of node `index`, as [`listen`] and [`Sender`] take them.
    pub fn ws(&self, index: usize) -> (usize, String) {
        (index, self.nodes[index].ws_url())
    }

    /// The Redis; panics for a cluster started without one.
    pub fn redis(&self) -> &TestRedis {
        self.redis.as_ref().expect("this cluster has no Redis")
    }

    pub fn redis_mut(&mut self) -> &mut TestRedis {
        self.redis.as_mut().expect("this cluster has no Redis")
    }

    pub fn http(&self, index: usize) -> Http {
        Http::new(&self.nodes[index])
    }

    /// `GET /ready` of node `index`: (status, JSON body).
    pub async fn ready(&self, index: usize) -> (u16, Value) {
        let reply = self.http(index).get("/ready").await;
        (reply.status, reply.json())
    }

    /// Sum of metric `name` on node `index`, 0 when absent.
    pub async fn metric(&self, index: usize, name: &str) -> f64 {
        let text = self.http(index).metrics().await;
        super::http::metric_value(&text, name).unwrap_or(0.0)
    }

    /// Prints the bus metrics of the nodes in `indices`.
    pub async fn print_bus_metrics(&self, indices: &[usize]) {
        const NAMES: [&str; 6] = [
            "seqcast_bus_published_total",
            "seqcast_bus_received_total",
            "seqcast_gaps_detected_total",
            "seqcast_messages_repaired_total",
            "seqcast_bus_up",
            "seqcast_leader",
        ];
        for &index in indices {
            let text = self.http(index).metrics().await;
            let values: Vec<String> = NAMES
                .iter()
                .map(|name| {
                    let short = name.trim_start_matches("seqcast_");
                    match super::http::metric_value(&text, name) {
                        Some(value) => format!("{short}={value}"),
                        None => format!("{short}=absent"),
                    }
                })
                .collect();
            eprintln!("metrics n{index}: {}", values.join(" "));
        }
    }
}

/// Microseconds since the Unix epoch: the send time carried in bodies (all processes share the
/// clock of this machine).
pub fn now_micros() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    u64::try_from(since_epoch.as_micros()).expect("micros fit in u64")
}

/// One acknowledgement.
#[derive(Debug, Clone)]
pub struct Ack {
    pub seq: u64,
    pub id: String,
}

/// Client options shared by the senders and subscribers: the Rust client library
/// (`seqcast-client`) as an application uses it, with `dev:{label}` as its identity (so that
/// its `idem` keys keep their scope across reconnects) and `route[1..]` as the nodes to fail
/// over to, in turn. Reconnect delays are short: the tests measure the server, not the backoff.
fn client_options(label: &str, route: &[(usize, String)]) -> Options {
    let mut options = Options::new(route[0].1.clone())
        .token(format!("dev:{label}"))
        .backoff(RECONNECT_PAUSE, RECONNECT_PAUSE * 10)
        .drain_jitter(RECONNECT_PAUSE);
    for (_, url) in &route[1..] {
        options = options.fallback_url(url.clone());
    }
    options
}

/// The node of `route` at `url`.
fn node_of(route: &[(usize, String)], url: &str) -> usize {
    route
        .iter()
        .find(|(_, u)| u == url)
        .map(|(node, _)| *node)
        .unwrap_or_else(|| panic!("{url} is not on the route {route:?}"))
}

/// A client sending `count` numbered messages to one room through the client library. Bodies
/// are `{"w": label, "n": node, "i": index, "t": send time in µs, "idem": key, "pad"?: "xx.."}`;
/// the library resends what was not acknowledged, with the same `idem` `{label}-{index}`, after
/// any reconnect.
pub struct Sender {
    pub label: String,
    pub room: String,
    /// Length of the `pad` string in each body.
    pad: usize,
    bodies: Vec<Option<Value>>,
    acks: Vec<Option<Ack>>,
    /// Longest time from a send to its ack.
    pub worst_ack_delay: Duration,
    /// When each connection was lost (the library then failed over).
    pub failovers: Vec<Instant>,
}

/// How a [`Sender`] sends: at most `window` unacknowledged, at most one send per `pace`.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    pub window: usize,
    pub pace: Option<Duration>,
}

impl Pacing {
    /// As fast as the acks allow.
    pub fn pipelined(window: usize) -> Pacing {
        Pacing { window, pace: None }
    }

    /// One send per `pace` at most.
    pub fn paced(window: usize, pace: Duration) -> Pacing {
        Pacing {
            window,
            pace: Some(pace),
        }
    }
}

impl Sender {
    pub fn new(label: impl Into<String>, room: &str, count: usize) -> Sender {
        Sender {
            label: label.into(),
            room: room.to_owned(),
            pad: 0,
            bodies: vec![None; count],
            acks: vec![None; count],
            worst_ack_delay: Duration::ZERO,
            failovers: Vec::new(),
        }
    }

    pub fn with_pad(mut self, bytes: usize) -> Sender {
        self.pad = bytes;
        self
    }

    pub fn count(&self) -> usize {
        self.acks.len()
    }

    pub fn idem_key(&self, index: usize) -> String {
        format!("{}-{index}", self.label)
    }

    /// Acknowledged messages: (ack, body).
    pub fn acked(&self) -> impl Iterator<Item = (&Ack, &Value)> {
        self.acks
            .iter()
            .zip(&self.bodies)
            .filter_map(|(ack, body)| Some((ack.as_ref()?, body.as_ref()?)))
    }

    pub fn acked_count(&self) -> usize {
        self.acks.iter().filter(|ack| ack.is_some()).count()
    }

    /// Sends everything through a client connected to `route[0]` (a `(node index, ws url)`)
    /// that fails over to the rest of `route`; with a single node, a lost connection is a
    /// failure. `progress` counts acks. Panics past `until`.
    pub async fn run(
        &mut self,
        route: &[(usize, String)],
        pacing: Pacing,
        until: Instant,
        progress: &AtomicUsize,
    ) {
        let (client, mut events) = Client::new(client_options(&self.label, route));
        let label = self.label.clone();
        // The client's own events: only its lost connections matter to a sender.
        let watcher = tokio::spawn(async move {
            let mut lost = Vec::new();
            while let Some(event) = events.recv().await {
                match event {
                    Event::State(State::Reconnecting { code, reason, .. }) => {
                        eprintln!("{label}: connection lost ({code:?} {reason}); failing over");
                        lost.push(Instant::now());
                    }
                    Event::Error(e) => eprintln!("{label}: {e}"),
                    _ => {}
                }
            }
            lost
        });
        let node = route[0].0;
        let sending = self.send_all(&client, node, pacing, progress);
        if tokio::time::timeout_at(until.into(), sending)
            .await
            .is_err()
        {
            panic!(
                "{}: only {} of {} acks before the deadline",
                self.label,
                self.acked_count(),
                self.count()
            );
        }
        client.close().await;
        self.failovers = watcher.await.expect("the event watcher");
        assert!(
            route.len() > 1 || self.failovers.is_empty(),
            "{}: the connection to n{node} broke, with no other node to go to",
            self.label
        );
    }

    /// Every message through `client`, at most `pacing.window` in flight.
    async fn send_all(
        &mut self,
        client: &Client,
        node: usize,
        pacing: Pacing,
        progress: &AtomicUsize,
    ) {
        let mut in_flight = FuturesUnordered::new();
        let mut next = 0;
        let mut next_send = tokio::time::Instant::now();
        while next < self.count() || !in_flight.is_empty() {
            let can_send = next < self.count() && in_flight.len() < pacing.window;
            tokio::select! {
                () = tokio::time::sleep_until(next_send), if can_send => {
                    let body = self.body(next, node);
                    let send = client.send(&self.room, body, Some(self.idem_key(next)));
                    let (index, sent) = (next, Instant::now());
                    in_flight.push(async move { (index, sent, send.await) });
                    next += 1;
                    if let Some(pace) = pacing.pace {
                        next_send += pace;
                    }
                }
                Some((index, sent, ack)) = in_flight.next() => {
                    let ack = ack.unwrap_or_else(|e| panic!("{}: send {index}: {e}", self.label));
                    self.worst_ack_delay = self.worst_ack_delay.max(sent.elapsed());
                    assert_eq!(ack.room, self.room, "{}: ack room", self.label);
                    assert!(
                        self.acks[index].is_none(),
                        "{}: second ack for message {index}",
                        self.label
                    );
                    self.acks[index] = Some(Ack {
                        seq: ack.seq,
                        id: ack.id,
                    });
                    progress.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The body of message `index`, made once.
    fn body(&mut self, index: usize, node: usize) -> Value {
        let mut body = json!({
            "w": self.label, "n": node, "i": index, "t": now_micros(), "idem": self.idem_key(index),
        });
        if self.pad > 0 {
            body["pad"] = json!("x".repeat(self.pad));
        }
        self.bodies[index] = Some(body.clone());
        body
    }
}

/// Runs `sender` in a task (see [`Sender::run`]), returning it when done.
pub fn spawn_sender(
    mut sender: Sender,
    route: Vec<(usize, String)>,
    pacing: Pacing,
    until: Instant,
    progress: Arc<AtomicUsize>,
) -> JoinHandle<Sender> {
    tokio::spawn(async move {
        sender.run(&route, pacing, until, &progress).await;
        sender
    })
}

/// Every acknowledged message of a room, by seq.
pub struct Ledger {
    pub by_seq: HashMap<u64, (Ack, Value)>,
    /// The highest seq, which is also the number of messages (checked: no hole).
    pub head: u64,
}

impl Ledger {
    /// Gathers the acks of `senders`; asserts each seq was given to one message only and the
    /// seqs are exactly `1..=count`.
    pub fn of(senders: &[&Sender]) -> Ledger {
        let mut by_seq = HashMap::new();
        for sender in senders {
            for (ack, body) in sender.acked() {
                if let Some((_, other)) = by_seq.insert(ack.seq, (ack.clone(), body.clone())) {
                    panic!(
                        "seq {} acknowledged for two messages: {other} and {body}",
                        ack.seq
                    );
                }
            }
        }
        let head = by_seq.len() as u64;
        let mut seqs: Vec<u64> = by_seq.keys().copied().collect();
        seqs.sort_unstable();
        assert_contiguous(&seqs, 1, head, "acknowledged seqs");
        Ledger { by_seq, head }
    }
}

/// One message as a subscriber got it.
#[derive(Debug, Clone)]
pub struct Received {
    pub seq: u64,
    pub id: String,
    pub body: Value,
    /// The node that delivered it.
    pub node: usize,
    /// From the send time in the body to its arrival here.
    pub delay: Duration,
    pub arrived: Instant,
}

/// Asserts `received` is exactly `first..=ledger.head` in order, each with the acknowledged id
/// and body.
pub fn check_stream(label: &str, received: &[Received], first: u64, ledger: &Ledger) {
    let seqs: Vec<u64> = received.iter().map(|m| m.seq).collect();
    assert_contiguous(&seqs, first, ledger.head, label);
    for message in received {
        let (ack, body) = &ledger.by_seq[&message.seq];
        assert_eq!(message.id, ack.id, "{label}: id of seq {}", message.seq);
        assert_eq!(&message.body, body, "{label}: body of seq {}", message.seq);
    }
}

/// What a subscriber does.
#[derive(Debug, Clone)]
pub struct ListenSpec {
    pub label: String,
    pub room: String,
    /// `(node index, ws url)`: the first is joined at once; when the connection ends (or at a
    /// hop) the subscriber moves to the next one, round robin, joining with `since`.
    pub route: Vec<(usize, String)>,
    /// `since` of the first join.
    pub since: Option<u64>,
    /// Leave for the next node after this many messages on one connection.
    pub hop_every: Option<usize>,
    /// Reconnect when the connection ends; otherwise that is a failure.
    pub reconnect: bool,
}

impl ListenSpec {
    pub fn new(label: impl Into<String>, room: &str, node: (usize, String)) -> ListenSpec {
        ListenSpec {
            label: label.into(),
            room: room.to_owned(),
            route: vec![node],
            since: None,
            hop_every: None,
            reconnect: false,
        }
    }

    /// Where to go when the connection ends (also enables reconnecting).
    pub fn then(mut self, node: (usize, String)) -> ListenSpec {
        self.route.push(node);
        self.reconnect = true;
        self
    }

    pub fn hop_every(mut self, messages: usize) -> ListenSpec {
        self.hop_every = Some(messages);
        self
    }
}

/// A subscriber running in a task.
pub struct Listening {
    /// The last seq received so far.
    pub last_seq: Arc<AtomicU64>,
    handle: JoinHandle<Vec<Received>>,
}

impl Listening {
    /// Waits for the task, which ends once the target head is reached (or panics).
    pub async fn finish(self) -> Vec<Received> {
        match self.handle.await {
            Ok(received) => received,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("listener task: {e}"),
        }
    }
}

/// Connects a client library and joins as `spec` says (the join is done when this returns),
/// then receives in a task until the seq published on `target` (0 = not known yet) has
/// arrived, panicking past `until`.
pub async fn listen(spec: ListenSpec, target: watch::Receiver<u64>, until: Instant) -> Listening {
    let (client, events) = Client::new(client_options(&spec.label, &spec.route));
    let joined = client
        .join(&spec.room, spec.since)
        .await
        .unwrap_or_else(|e| panic!("{}: join on n{}: {e}", spec.label, spec.route[0].0));
    assert!(
        joined.head >= spec.since.unwrap_or(0),
        "{}: {joined:?}",
        spec.label
    );
    let last_seq = Arc::new(AtomicU64::new(spec.since.unwrap_or(0)));
    let shared = Arc::clone(&last_seq);
    let handle = tokio::spawn(receive(spec, client, events, target, until, shared));
    Listening { last_seq, handle }
}

async fn receive(
    spec: ListenSpec,
    client: Client,
    mut events: UnboundedReceiver<Event>,
    mut target: watch::Receiver<u64>,
    until: Instant,
    last_seq: Arc<AtomicU64>,
) -> Vec<Received> {
    let label = &spec.label;
    let mut received: Vec<Received> = Vec::new();
    let mut node = spec.route[0].0;
    let mut on_this_connection = 0;
    // The connection ended (a hop or the node's end) and the room is not rejoined yet.
    let mut away = false;
    loop {
        let last = received.last().map_or(spec.since.unwrap_or(0), |m| m.seq);
        let goal = *target.borrow_and_update();
        if goal > 0 && last >= goal {
            break;
        }
        let hop_due = spec
            .hop_every
            .is_some_and(|every| on_this_connection >= every);
        if hop_due && !away {
            // Leave for the next node of the route: the library rejoins there with `since`.
            away = true;
            client.reconnect();
        }
        let event = tokio::select! {
            event = events.recv() => event.unwrap_or_else(|| panic!("{label}: the client closed")),
            _ = target.changed() => continue,
            () = tokio::time::sleep_until(until.into()) => panic!(
                "{label}: reached seq {last} of {} by the deadline ({} messages, on n{node})",
                if goal > 0 { goal.to_string() } else { "(unknown)".to_owned() },
                received.len()
            ),
        };
        match event {
            Event::Message(m) if m.room == spec.room => {
                let sent = m.body["t"].as_u64().unwrap_or(0);
                received.push(Received {
                    seq: m.seq,
                    id: m.id,
                    delay: Duration::from_micros(now_micros().saturating_sub(sent)),
                    arrived: Instant::now(),
                    body: m.body,
                    node,
                });
                last_seq.store(m.seq, Ordering::Relaxed);
                on_this_connection += 1;
            }
            Event::State(State::Reconnecting { code, reason, .. }) => {
                let hop = away;
                assert!(
                    hop || spec.reconnect,
                    "{label}: connection to n{node} ended after seq {last}: {code:?} {reason}"
                );
                if !hop {
                    eprintln!(
                        "{label}: connection to n{node} ended after seq {last}: {code:?} {reason}"
                    );
                }
                away = true;
            }
            Event::State(State::Open { url }) => node = node_of(&spec.route, &url),
            Event::Rejoined(joined) => {
                assert!(
                    joined.head >= last,
                    "{label}: rejoined n{node} since {last}: {joined:?}"
                );
                away = false;
                on_this_connection = 0;
            }
            Event::State(State::Connecting) => {}
            Event::Error(e) if spec.reconnect => eprintln!("{label}: {e} (reconnecting)"),
            other => panic!("{label}: unexpected event on n{node}: {other:?}"),
        }
    }
    // Nothing may follow the last seq, and nothing was dropped or repaired on the way: a
    // duplicate or a gap from the server shows in the client's counts by the time its pong is in.
    if let Err(e) = client.ping().await {
        panic!("{label}: final ping on n{node}: {e}");
    }
    let stats = client.stats().await;
    assert_eq!(
        (stats.duplicates, stats.gaps),
        (0, 0),
        "{label}: duplicates dropped and gaps repaired by the client library"
    );
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(event, Event::Message(_)),
            "{label}: message after the last seq: {event:?}"
        );
    }
    client.close().await;
    received
}

/// p50, p99 and maximum of a set of delays.
#[derive(Debug, Clone, Copy)]
pub struct DelayStats {
    pub count: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl DelayStats {
    pub fn of(delays: impl IntoIterator<Item = Duration>) -> DelayStats {
        let mut delays: Vec<Duration> = delays.into_iter().collect();
        delays.sort_unstable();
        let at = |q: f64| -> Duration {
            if delays.is_empty() {
                return Duration::ZERO;
            }
            let rank = ((delays.len() as f64) * q).ceil() as usize;
            delays[rank.clamp(1, delays.len()) - 1]
        };
        DelayStats {
            count: delays.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: delays.last().copied().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for DelayStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} p50={:.1}ms p99={:.1}ms max={:.1}ms",
            self.count,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.max.as_secs_f64() * 1e3
        )
    }
}

/// Polls `condition` every 50 ms until it holds; returns how long that took, or panics with
/// `what` after `deadline`.
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut condition: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if condition().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < deadline,
            "{what}: not true within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
