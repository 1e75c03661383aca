//! A publisher: one client sending numbered messages round-robin to its rooms, with at most
//! `window` unacknowledged, either as fast as the acks allow or paced to a rate.
//!
//! It is the Rust client library (`clients/rust`), as an application uses it: every send carries
//! an `idem` key, and after a lost connection the library reconnects and resends what was not
//! acknowledged, with the same key. (`--no-idem` runs use [`crate::raw_publisher`] instead: the
//! library never sends without a key.)
//!
//! It records the ack latency of every send (from the call to the resolved ack, as the
//! application sees it) and the seq of every ack per room, which the scenario checks against the
//! room heads (every acknowledged message is committed, and no two acks of a room share a seq).
//! Pacing keeps the long-run rate exact: a late tick is made up by sending the missed messages
//! at once rather than dropping them.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use futures_util::stream::{FuturesUnordered, StreamExt};
use seqcast_client::{Client, Event, Options, State};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

use crate::client::{self, Auth, Node};
use crate::pacing::Pacing;
use crate::raw_publisher::RawPublisher;
use crate::stats::Latency;

/// What a publisher sends, where and when.
#[derive(Debug, Clone)]
pub struct PublisherSpec {
    /// Carried in every body as `p`.
    pub id: u32,
    pub node: Node,
    /// `(room index, room name)`, sent to in turn.
    pub rooms: Vec<(usize, Arc<str>)>,
    /// Unacknowledged sends allowed.
    pub window: usize,
    /// Time between two sends; `None` = as fast as the window allows.
    pub interval: Option<Duration>,
    /// Delay before the first paced send, so that publishers started together spread their
    /// sends over the interval instead of all sending at the same instants.
    pub start_offset: Duration,
    /// Shared count of sends left to all publishers of a run; `None` = until `stop_at`.
    pub budget: Option<Arc<AtomicU64>>,
    /// Padding appended to every body.
    pub pad: Arc<str>,
    /// Whether every send carries an `idem` key (the client library); `false`: the raw,
    /// keyless publisher.
    pub idem: bool,
}

/// What a publisher did.
#[derive(Debug, Default)]
pub struct PublisherOutcome {
    pub sent: u64,
    pub acked: u64,
    pub ack_latency: Latency,
    /// Acknowledged seqs per room index.
    pub acked_seqs: HashMap<usize, Vec<u64>>,
    pub last_ack: Option<Instant>,
    /// Connections the client library lost (and reconnected, resending what was unacked).
    pub reconnects: u64,
    pub error_count: u64,
    pub errors: Vec<String>,
}

impl PublisherOutcome {
    pub(crate) fn error(&mut self, text: String) {
        self.error_count += 1;
        if self.errors.len() < 5 {
            self.errors.push(text);
        }
    }
}

pub enum Publisher {
    Library(LibraryPublisher),
    Raw(Box<RawPublisher>),
}

impl Publisher {
    pub async fn connect(
        spec: PublisherSpec,
        auth: &Auth,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        if spec.idem {
            Ok(Publisher::Library(
                LibraryPublisher::connect(spec, auth, timeout).await?,
            ))
        } else {
            let raw = RawPublisher::connect(spec, auth, timeout).await?;
            Ok(Publisher::Raw(Box::new(raw)))
        }
    }

    /// Sends until `stop_at` (or until the budget is spent), then waits up to `drain` for the
    /// outstanding acks. A wait of `io_timeout` without any ack while acks are due is an error.
    pub async fn run(
        self,
        stop_at: Instant,
        drain: Duration,
        io_timeout: Duration,
    ) -> PublisherOutcome {
        match self {
            Publisher::Library(p) => p.run(stop_at, drain, io_timeout).await,
            Publisher::Raw(p) => (*p).run(stop_at, drain, io_timeout).await,
        }
    }
}

pub struct LibraryPublisher {
    spec: PublisherSpec,
    client: Client,
    /// Counts the connections lost, until the client closes.
    watcher: JoinHandle<(u64, Vec<String>)>,
}

impl LibraryPublisher {
    /// Starts the client and waits, up to `timeout`, for its connection to open.
    async fn connect(spec: PublisherSpec, auth: &Auth, timeout: Duration) -> anyhow::Result<Self> {
        let sub = format!("loadtest-pub-{}", spec.id);
        // A JWT of its own, or in development mode a `dev:` name: a stable identity, which the
        // scope of its `idem` keys needs across reconnects.
        let token = auth.token(&sub)?.unwrap_or_else(|| format!("dev:{sub}"));
        // Pings and reconnect delays as a real client's; the publisher reads only acks.
        let options = Options::new(spec.node.ws.clone())
            .token(token)
            .read_buffer_size(64 * 1024)
            .connect_timeout(timeout);
        let (client, mut events) = Client::new(options);
        let opened = tokio::time::timeout(timeout, async {
            while let Some(event) = events.recv().await {
                match event {
                    Event::State(State::Open { .. }) => return Ok(()),
                    Event::State(State::Closed { .. }) => break,
                    Event::Error(e) => return Err(anyhow!("publisher {}: {e}", spec.id)),
                    _ => {}
                }
            }
            Err(anyhow!("publisher {}: the client closed", spec.id))
        })
        .await;
        match opened {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                client.close().await;
                return Err(e);
            }
            Err(_) => {
                client.close().await;
                return Err(anyhow!(
                    "connecting to {} took over {timeout:?}",
                    spec.node.ws
                ));
            }
        }
        let watcher = tokio::spawn(watch(events));
        Ok(LibraryPublisher {
            spec,
            client,
            watcher,
        })
    }

    async fn run(
        self,
        stop_at: Instant,
        drain: Duration,
        io_timeout: Duration,
    ) -> PublisherOutcome {
        let spec = &self.spec;
        let mut out = PublisherOutcome::default();
        let mut in_flight = FuturesUnordered::new();
        let mut pacing = Pacing::new(spec, stop_at, drain, io_timeout);
        let mut last_ack = Instant::now();
        loop {
            let now = Instant::now();
            while let Some((index, room)) = pacing.next_send(in_flight.len(), now) {
                let send = self.client.send(
                    room,
                    body(spec.id, out.sent, &spec.pad),
                    Some(client::idem_key(spec.id, out.sent)),
                );
                let (index, sent_at) = (*index, Instant::now());
                in_flight.push(async move { (index, sent_at, send.await) });
                out.sent += 1;
            }
            let Some(wake) = pacing.wake(in_flight.len(), last_ack, now, &mut out) else {
                break;
            };
            let first = tokio::select! {
                Some(done) = in_flight.next() => done,
                () = tokio::time::sleep_until(wake.into()) => continue,
            };
            // This ack and every one already resolved, before sending again.
            let mut next = Some(first);
            while let Some((room, sent_at, ack)) = next {
                last_ack = Instant::now();
                match ack {
                    Ok(ack) => {
                        out.ack_latency.record(last_ack - sent_at);
                        out.acked += 1;
                        out.last_ack = Some(last_ack);
                        out.acked_seqs.entry(room).or_default().push(ack.seq);
                    }
                    Err(e) => out.error(format!("publisher {}: send failed: {e}", spec.id)),
                }
                next = futures_util::FutureExt::now_or_never(in_flight.next()).flatten();
            }
        }
        // Unacked sends are failed by the close (after a deadline error); the figures are taken.
        self.client.close().await;
        match self.watcher.await {
            Ok((reconnects, lost)) => {
                out.reconnects = reconnects;
                for why in lost {
                    // Nothing in the benchmark should cost a connection: say so, even though
                    // the library made up for it.
                    out.error(format!("publisher {}: connection lost: {why}", spec.id));
                }
            }
            Err(e) => out.error(format!("publisher {}: event task failed: {e}", spec.id)),
        }
        out
    }
}

/// Reads a publisher client's events until it closes: the connections it lost, and why.
async fn watch(mut events: UnboundedReceiver<Event>) -> (u64, Vec<String>) {
    let mut lost = Vec::new();
    let mut count = 0;
    while let Some(event) = events.recv().await {
        if let Event::State(State::Reconnecting { code, reason, .. }) = event {
            count += 1;
            if lost.len() < 5 {
                lost.push(format!("close {code:?} {reason}"));
            }
        }
    }
    (count, lost)
}

/// A body `{"t":..,"p":..,"n":..}` (plus `"x": pad`): the send time in ns since the Unix epoch,
/// the publisher and its counter.
fn body(publisher: u32, counter: u64, pad: &str) -> Value {
    let mut body = json!({"t": client::unix_nanos(), "p": publisher, "n": counter});
    if !pad.is_empty() {
        body["x"] = Value::from(pad);
    }
    body
}
