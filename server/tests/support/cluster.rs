//! Several `seqcast` nodes sharing one Postgres database and, optionally, one Redis, plus the
//! clients the cluster tests drive through them.
//!
//! - [`Cluster`] starts the nodes (`n0`, `n1`, ...) on a fresh database of the shared test
//!   Postgres, all with the server key [`API_KEY`] (so a sender can keep one identity, and thus
//!   its `idem` scope, across nodes).
//! - [`Sender`] sends numbered messages whose body carries the send time, pipelined and
//!   optionally paced, records every ack, and can fail over to another node, retrying what was
//!   not acknowledged with the same `idem`.
//! - [`listen`] runs a subscriber in a task: it records every `message` with its delivery delay
//!   until the room's final head is reached, reconnecting (with `since`) when its node dies or
//!   when told to hop between nodes.
//! - [`Ledger`] gathers the acks of all senders; [`check_stream`] holds what a subscriber got
//!   against it: every seq once, in order, with the acknowledged id and body.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use super::check::assert_contiguous;
use super::http::Http;
use super::postgres::TestPostgres;
use super::redis::TestRedis;
use super::server::{ServerOptions, StoreKind, TestServer};
use super::ws::{Auth, Event, WsClient};

/// The server key of every node.
pub const API_KEY: &str = "cluster-test-api-key";

/// Pause between attempts at reconnecting to a node.
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

/// A client sending `count` numbered messages to one room. Bodies are
/// `{"w": label, "n": node, "i": index, "t": send time in µs, "idem"?: key, "pad"?: "xx.."}`,
/// made at the first attempt and reused by retries.
pub struct Sender {
    pub label: String,
    pub room: String,
    /// Send `idem` keys `{label}-{index}`, and allow failing over to another node.
    idem: bool,
    /// Length of the `pad` string in each body.
    pad: usize,
    bodies: Vec<Option<Value>>,
    acks: Vec<Option<Ack>>,
    /// Longest time from a send to its ack.
    pub worst_ack_delay: Duration,
    /// When each broken connection was noticed (the sender then failed over).
    pub failovers: Vec<Instant>,
}

/// How a [`Sender`] sends: at most `window` unacknowledged, at most one frame per `pace`.
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

    /// One frame per `pace` at most.
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
            idem: false,
            pad: 0,
            bodies: vec![None; count],
            acks: vec![None; count],
            worst_ack_delay: Duration::ZERO,
            failovers: Vec::new(),
        }
    }

    pub fn with_idem(mut self) -> Sender {
        self.idem = true;
        self
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

    /// Connects to `route[0]` (a `(node index, ws url)`) and sends everything; when the
    /// connection breaks, a sender with `idem` reconnects to the next node of `route` and sends
    /// again whatever was not acknowledged. `progress` counts acks. Panics past `until`.
    pub async fn run(
        &mut self,
        route: &[(usize, String)],
        auth: Auth<'_>,
        pacing: Pacing,
        until: Instant,
        progress: &AtomicUsize,
    ) {
        let mut hop = 0;
        loop {
            let (node, url) = &route[hop % route.len()];
            let mut client = match WsClient::try_connect(url, auth).await {
                Ok(client) => client,
                Err(e) => {
                    assert!(
                        Instant::now() < until,
                        "{}: cannot connect to n{node} ({e}) and the deadline passed",
                        self.label
                    );
                    hop += 1;
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
            };
            match self
                .send_unacked(&mut client, *node, pacing, until, progress)
                .await
            {
                Ok(()) => {
                    client.close().await;
                    return;
                }
                Err(broken) => {
                    assert!(
                        self.idem && route.len() > 1,
                        "{}: the connection to n{node} broke ({broken}) after {} of {} acks",
                        self.label,
                        self.acked_count(),
                        self.count()
                    );
                    eprintln!(
                        "{}: connection to n{node} broke ({broken}) after {} of {} acks; failing \
                         over",
                        self.label,
                        self.acked_count(),
                        self.count()
                    );
                    self.failovers.push(Instant::now());
                    hop += 1;
                }
            }
        }
    }

    /// Sends every unacknowledged message on `client`; `Err` when the connection breaks.
    async fn send_unacked(
        &mut self,
        client: &mut WsClient,
        node: usize,
        pacing: Pacing,
        until: Instant,
        progress: &AtomicUsize,
    ) -> Result<(), String> {
        let mut todo: VecDeque<usize> = (0..self.count())
            .filter(|&i| self.acks[i].is_none())
            .collect();
        // ref -> (index, sent at)
        let mut outstanding: HashMap<String, (usize, Instant)> = HashMap::new();
        let mut next_send = Instant::now();
        loop {
            if todo.is_empty() && outstanding.is_empty() {
                return Ok(());
            }
            while outstanding.len() < pacing.window
                && Instant::now() >= next_send
                && !todo.is_empty()
            {
                let index = todo.pop_front().expect("not empty");
                let frame = self.send_frame(index, node);
                let reference = frame["ref"].as_str().expect("string ref").to_owned();
                client
                    .try_send_message(Message::text(frame.to_string()))
                    .await
                    .map_err(|e| format!("send failed: {e}"))?;
                outstanding.insert(reference, (index, Instant::now()));
                if let Some(pace) = pacing.pace {
                    next_send = Instant::now() + pace;
                }
            }
            let now = Instant::now();
            assert!(
                now < until,
                "{}: only {} of {} acks before the deadline ({} outstanding)",
                self.label,
                self.acked_count(),
                self.count(),
                outstanding.len()
            );
            let can_send = outstanding.len() < pacing.window && !todo.is_empty();
            let wait = if can_send {
                next_send.saturating_duration_since(now)
            } else {
                Duration::from_millis(500)
            };
            match client.next_event(wait.min(until - now)).await {
                Some(Event::Frame(frame)) if frame["type"] == "ack" => {
                    let reference = frame["ref"].as_str().unwrap_or_default();
                    let (index, sent) = outstanding
                        .remove(reference)
                        .unwrap_or_else(|| panic!("{}: unexpected ack {frame}", self.label));
                    self.worst_ack_delay = self.worst_ack_delay.max(sent.elapsed());
                    assert_eq!(frame["room"], self.room.as_str(), "ack room: {frame}");
                    assert!(
                        self.acks[index].is_none(),
                        "{}: second ack for message {index}: {frame}",
                        self.label
                    );
                    self.acks[index] = Some(Ack {
                        seq: frame["seq"].as_u64().expect("ack seq"),
                        id: frame["id"].as_str().expect("ack id").to_owned(),
                    });
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                Some(Event::Frame(frame)) if frame["type"] == "error" => {
                    panic!("{}: error reply: {frame}", self.label)
                }
                Some(Event::Frame(_)) | None => {}
                Some(ended) => return Err(format!("{ended:?}")),
            }
        }
    }

    /// The `send` frame for message `index` (its body is made on the first attempt).
    fn send_frame(&mut self, index: usize, node: usize) -> Value {
        let idem = self.idem.then(|| self.idem_key(index));
        let (label, pad) = (self.label.clone(), self.pad);
        let body = self.bodies[index]
            .get_or_insert_with(|| {
                let mut body = json!({"w": label, "n": node, "i": index, "t": now_micros()});
                if let Some(idem) = &idem {
                    body["idem"] = json!(idem);
                }
                if pad > 0 {
                    body["pad"] = json!("x".repeat(pad));
                }
                body
            })
            .clone();
        let mut frame = json!({
            "type": "send", "room": self.room, "body": body, "ref": format!("s{index}"),
        });
        if let Some(idem) = idem {
            frame["idem"] = json!(idem);
        }
        frame
    }
}

/// Runs `sender` in a task (see [`Sender::run`]), returning it when done.
pub fn spawn_sender(
    mut sender: Sender,
    route: Vec<(usize, String)>,
    api_key: bool,
    pacing: Pacing,
    until: Instant,
    progress: Arc<AtomicUsize>,
) -> JoinHandle<Sender> {
    tokio::spawn(async move {
        let auth = if api_key {
            Auth::Header(API_KEY)
        } else {
            Auth::None
        };
        sender.run(&route, auth, pacing, until, &progress).await;
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

/// A listener's reconnects: (when its connection ended, when it had joined again).
pub type Reconnects = Arc<std::sync::Mutex<Vec<(Instant, Instant)>>>;

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
    /// When each connection ended and when the next join was answered (hops included).
    pub reconnects: Reconnects,
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

/// Connects and joins as `spec` says (the join is done when this returns), then receives in a
/// task until the seq published on `target` (0 = not known yet) has arrived, panicking past
/// `until`.
pub async fn listen(spec: ListenSpec, target: watch::Receiver<u64>, until: Instant) -> Listening {
    let (node, url) = spec.route[0].clone();
    let mut client = WsClient::try_connect(&url, Auth::None)
        .await
        .unwrap_or_else(|e| panic!("{}: connect to n{node}: {e}", spec.label));
    let joined = client.join(&spec.room, spec.since).await;
    if spec.since.is_none() {
        assert!(joined["head"].is_u64(), "{}: {joined}", spec.label);
    }
    let last_seq = Arc::new(AtomicU64::new(spec.since.unwrap_or(0)));
    let reconnects = Arc::default();
    let handle = tokio::spawn(receive(
        spec,
        client,
        node,
        target,
        until,
        (Arc::clone(&last_seq), Arc::clone(&reconnects)),
    ));
    Listening {
        last_seq,
        reconnects,
        handle,
    }
}

async fn receive(
    spec: ListenSpec,
    mut client: WsClient,
    mut node: usize,
    target: watch::Receiver<u64>,
    until: Instant,
    (last_seq, reconnects): (Arc<AtomicU64>, Reconnects),
) -> Vec<Received> {
    let label = &spec.label;
    let mut received: Vec<Received> = Vec::new();
    let mut on_this_connection = 0;
    let mut route_index = 0;
    let mut hops = 0_usize;
    loop {
        let last = received.last().map_or(spec.since.unwrap_or(0), |m| m.seq);
        let goal = *target.borrow();
        if goal > 0 && last >= goal {
            break;
        }
        let now = Instant::now();
        assert!(
            now < until,
            "{label}: reached seq {last} of {} by the deadline ({} messages, on n{node})",
            if goal > 0 {
                goal.to_string()
            } else {
                "(unknown)".to_owned()
            },
            received.len()
        );
        let hop_due = spec
            .hop_every
            .is_some_and(|every| on_this_connection >= every);
        let ended = if hop_due {
            if hops % 2 == 0 {
                client.close().await;
            } else {
                drop(client);
            }
            None
        } else {
            match client
                .next_event(Duration::from_millis(250).min(until - now))
                .await
            {
                Some(Event::Frame(frame))
                    if frame["type"] == "message" && frame["room"] == spec.room.as_str() =>
                {
                    let body = frame["body"].clone();
                    let sent = body["t"].as_u64().unwrap_or(0);
                    received.push(Received {
                        seq: frame["seq"].as_u64().expect("message seq"),
                        id: frame["id"].as_str().unwrap_or_default().to_owned(),
                        delay: Duration::from_micros(now_micros().saturating_sub(sent)),
                        arrived: Instant::now(),
                        body,
                        node,
                    });
                    last_seq.store(frame["seq"].as_u64().unwrap_or(0), Ordering::Relaxed);
                    on_this_connection += 1;
                    continue;
                }
                Some(Event::Frame(frame)) if frame["type"] == "error" => {
                    panic!("{label}: error frame on n{node}: {frame}")
                }
                Some(Event::Frame(_)) | None => continue,
                Some(end) => Some(end),
            }
        };
        // The connection is gone (a hop or the node's end): join again elsewhere.
        if let Some(end) = &ended {
            assert!(
                spec.reconnect,
                "{label}: connection to n{node} ended after seq {last}: {end:?}"
            );
            eprintln!("{label}: connection to n{node} ended after seq {last}: {end:?}");
        }
        hops += 1;
        let ended_at = Instant::now();
        let (next, joined_client) = loop {
            assert!(
                Instant::now() < until,
                "{label}: could not rejoin any node by the deadline"
            );
            route_index = (route_index + 1) % spec.route.len();
            let (next, url) = &spec.route[route_index];
            match WsClient::try_connect(url, Auth::None).await {
                Ok(client) => break (*next, client),
                Err(e) => {
                    eprintln!("{label}: cannot connect to n{next}: {e}");
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                }
            }
        };
        client = joined_client;
        node = next;
        let joined = client.join(&spec.room, Some(last)).await;
        assert!(
            joined["head"].as_u64().is_some_and(|head| head >= last),
            "{label}: rejoined n{node} since {last}: {joined}"
        );
        reconnects
            .lock()
            .expect("not poisoned")
            .push((ended_at, Instant::now()));
        on_this_connection = 0;
    }
    // Nothing may follow the last seq: a late duplicate would show up before the pong.
    let extra: Vec<Value> = client
        .frames_until_pong()
        .await
        .into_iter()
        .filter(|frame| frame["type"] == "message")
        .collect();
    assert!(
        extra.is_empty(),
        "{label}: messages after the last seq: {extra:?}"
    );
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
