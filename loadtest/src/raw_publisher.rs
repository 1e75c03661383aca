//! The keyless publisher (`--no-idem`): raw `send` frames without an `idem` key, over one
//! WebSocket, for measuring the server's keyless path. The client library always sends a key
//! (a resend without one could be stored twice), so this one speaks the frames itself; it does
//! not reconnect: a lost connection ends it with an error. Round-robin rooms, `window`, pacing
//! ([`crate::pacing`]) and the records are those of [`crate::publisher`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Auth, Incoming, Ws};
use crate::pacing::Pacing;
use crate::publisher::{PublisherOutcome, PublisherSpec};

pub struct RawPublisher {
    spec: PublisherSpec,
    ws: Ws,
}

impl RawPublisher {
    pub async fn connect(
        spec: PublisherSpec,
        auth: &Auth,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        // A write buffer, so a burst of sends becomes one write; `run` flushes after each burst.
        let config = client::ws_config(64 * 1024).write_buffer_size(64 * 1024);
        let sub = format!("loadtest-pub-{}", spec.id);
        let ws = client::connect(&spec.node, auth, &sub, None, config, timeout).await?;
        Ok(RawPublisher { spec, ws })
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
        let mut pacing = Pacing::new(spec, stop_at, drain, io_timeout);
        let mut last_frame = Instant::now();
        loop {
            let now = Instant::now();
            let mut fed = false;
            while let Some((index, room)) = pacing.next_send(inflight.len(), now) {
                let frame = client::send_frame(room, spec.id, out.sent, next_ref, &spec.pad);
                if let Err(e) = self.ws.feed(Message::text(frame)).await {
                    out.error(format!("publisher {}: send failed: {e}", spec.id));
                    return out;
                }
                inflight.insert(next_ref, (*index, Instant::now()));
                next_ref += 1;
                out.sent += 1;
                fed = true;
            }
            if fed {
                if let Err(e) = self.ws.flush().await {
                    out.error(format!("publisher {}: send failed: {e}", spec.id));
                    return out;
                }
            }
            let Some(wake) = pacing.wake(inflight.len(), last_frame, now, &mut out) else {
                break;
            };
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
