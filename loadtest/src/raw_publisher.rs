//! A publisher: one WebSocket connection sending numbered messages round-robin to its rooms,
//! with at most `window` unacknowledged, either as fast as the acks allow or paced to a rate.
//!
//! It records the ack latency of every send and the seq of every ack per room, which the
//! scenario checks against the room heads (every acknowledged message is committed, and no two
//! acks of a room share a seq). Pacing keeps the long-run rate exact: a late tick is made up by
//! sending the missed messages at once rather than dropping them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Auth, Incoming, Node, Ws};
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
    /// Whether every send carries an `idem` key.
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
    pub error_count: u64,
    pub errors: Vec<String>,
}

impl PublisherOutcome {
    fn error(&mut self, text: String) {
        self.error_count += 1;
        if self.errors.len() < 5 {
            self.errors.push(text);
        }
    }
}

pub struct Publisher {
    spec: PublisherSpec,
    ws: Ws,
}

impl Publisher {
    pub async fn connect(
        spec: PublisherSpec,
        auth: &Auth,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        // A write buffer, so a burst of sends becomes one write; `run` flushes after each burst.
        let config = client::ws_config(64 * 1024).write_buffer_size(64 * 1024);
        let sub = format!("loadtest-pub-{}", spec.id);
        let ws = client::connect(&spec.node, auth, &sub, None, config, timeout).await?;
        Ok(Publisher { spec, ws })
    }

    /// Sends until `stop_at` (or until the budget is spent), then waits up to `drain` for the
    /// outstanding acks. A wait of `io_timeout` without any frame while acks are due is an error.
    pub async fn run(
        mut self,
        stop_at: Instant,
        drain: Duration,
        io_timeout: Duration,
    ) -> PublisherOutcome {
        let spec = &self.spec;
        let mut out = PublisherOutcome::default();
        // ref -> (room index, sent at)
        let mut inflight: HashMap<u64, (usize, Instant)> = HashMap::with_capacity(spec.window);
        let mut next_ref: u64 = 1;
        let mut cursor = 0usize;
        let mut next_send = Instant::now() + spec.start_offset;
        let mut budget_spent = false;
        let mut last_frame = Instant::now();
        let ack_deadline = stop_at + drain;
        loop {
            let now = Instant::now();
            let sending = now < stop_at && !budget_spent;
            if sending {
                let mut fed = false;
                while inflight.len() < spec.window && spec.interval.is_none_or(|_| next_send <= now)
                {
                    if let Some(budget) = &spec.budget {
                        let took = budget
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                                left.checked_sub(1)
                            })
                            .is_ok();
                        if !took {
                            budget_spent = true;
                            break;
                        }
                    }
                    let (index, room) = &spec.rooms[cursor];
                    cursor = (cursor + 1) % spec.rooms.len();
                    let frame =
                        client::send_frame(room, spec.id, out.sent, next_ref, &spec.pad, spec.idem);
                    if let Err(e) = self.ws.feed(Message::text(frame)).await {
                        out.error(format!("publisher {}: send failed: {e}", spec.id));
                        return out;
                    }
                    inflight.insert(next_ref, (*index, Instant::now()));
                    next_ref += 1;
                    out.sent += 1;
                    fed = true;
                    if let Some(interval) = spec.interval {
                        next_send += interval;
                    }
                }
                if fed {
                    if let Err(e) = self.ws.flush().await {
                        out.error(format!("publisher {}: send failed: {e}", spec.id));
                        return out;
                    }
                }
            } else if inflight.is_empty() {
                break;
            }
            if !sending && now >= ack_deadline {
                out.error(format!(
                    "publisher {}: {} acks missing {drain:?} after the end of sending",
                    spec.id,
                    inflight.len()
                ));
                break;
            }
            if !inflight.is_empty() && now.duration_since(last_frame) > io_timeout {
                out.error(format!(
                    "publisher {}: no frame for {io_timeout:?} with {} acks due",
                    spec.id,
                    inflight.len()
                ));
                break;
            }
            let mut wake = if sending { stop_at } else { ack_deadline };
            if sending && spec.interval.is_some() && inflight.len() < spec.window {
                wake = wake.min(next_send);
            }
            if !inflight.is_empty() {
                wake = wake.min(last_frame + io_timeout + Duration::from_millis(1));
            }
            let first = tokio::select! {
                frame = self.ws.next() => frame,
                () = tokio::time::sleep_until(wake.into()) => continue,
            };
            last_frame = Instant::now();
            // Handle this frame and every one already buffered before sending again.
            let mut next = Some(first);
            while let Some(frame) = next {
                match frame {
                    Some(Ok(Message::Text(text))) => {
                        handle(spec.id, &text, &mut inflight, &mut out)
                    }
                    Some(Ok(Message::Close(close))) => {
                        out.error(format!(
                            "publisher {}: closed by the server: {close:?}",
                            spec.id
                        ));
                        return out;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        out.error(format!("publisher {}: connection failed: {e}", spec.id));
                        return out;
                    }
                    None => {
                        out.error(format!("publisher {}: connection ended", spec.id));
                        return out;
                    }
                }
                next = self.ws.next().now_or_never();
            }
        }
        // Best effort: the run's figures are complete, a failing close changes nothing.
        if tokio::time::timeout(Duration::from_secs(1), self.ws.close(None))
            .await
            .is_err()
        {
            out.error(format!("publisher {}: close timed out", spec.id));
        }
        out
    }
}

/// One frame for a publisher: an `ack` or an `error` settles a send.
fn handle(
    id: u32,
    text: &str,
    inflight: &mut HashMap<u64, (usize, Instant)>,
    out: &mut PublisherOutcome,
) {
    let frame = match Incoming::parse(text) {
        Ok(frame) => frame,
        Err(e) => {
            out.error(format!("publisher {id}: {e}"));
            return;
        }
    };
    match frame.kind.as_ref() {
        "ack" => {
            let settled = frame.reference.and_then(|r| inflight.remove(&r));
            match (settled, frame.seq) {
                (Some((room, sent_at)), Some(seq)) => {
                    let now = Instant::now();
                    out.ack_latency.record(now - sent_at);
                    out.acked += 1;
                    out.last_ack = Some(now);
                    out.acked_seqs.entry(room).or_default().push(seq);
                }
                _ => out.error(format!("publisher {id}: unexpected ack {text}")),
            }
        }
        "error" => {
            if let Some(r) = frame.reference {
                inflight.remove(&r);
            }
            out.error(format!(
                "publisher {id}: error reply {}",
                frame.error_text()
            ));
        }
        _ => {}
    }
}
