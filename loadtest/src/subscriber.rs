//! A subscriber: one WebSocket connection joined to one room, checking every delivered seq with
//! a [`SeqTracker`] and recording the end-to-end latency carried in each body, until it holds
//! everything up to the room's final head or its deadline passes.
//!
//! The final heads are only known once the publishers have finished, so they arrive through a
//! `watch` channel together with the deadline for reaching them.
//!
//! Subscribers read raw frames by default. `--library-subscribers` makes them the client library
//! (`clients/rust`, a bounded event channel, a small read buffer) instead, to measure what it
//! costs at thousands of connections: the library checks and orders seqs itself, so what it
//! dropped or repaired (its `stats()`) is counted as duplicates and out-of-order here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use futures_util::{SinkExt, StreamExt};
use seqcast_client::{Client, Event, Options, State};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Auth, Incoming, Node, Ws};
use crate::stats::Latency;
use crate::verify::SeqTracker;

/// The rooms' final heads (by room index) and how long subscribers may take to reach them.
#[derive(Debug, Clone)]
pub struct Finals {
    pub heads: Arc<Vec<u64>>,
    pub deadline: Instant,
}

pub type FinalsRx = watch::Receiver<Option<Finals>>;

/// Events a library subscriber may hold before it stops reading its socket.
const LIBRARY_EVENTS: usize = 64;

/// Where a subscriber's messages come from. Not boxed: one per subscriber, never moved in the
/// hot loop, and the large variant is the common one.
#[allow(clippy::large_enum_variant)]
enum Source {
    Raw(Ws),
    Library {
        client: Client,
        events: mpsc::Receiver<Event>,
    },
}

/// The next thing a source produced.
enum Item {
    Text(String),
    /// A message delivered by the library: its seq and body send time.
    Message(u64, u64),
    /// Nothing of interest.
    Skip,
    /// Worth an error; the subscriber goes on (the library reconnects).
    Note(String),
    /// The connection is gone.
    End(String),
}

async fn next_item(source: &mut Source) -> Item {
    match source {
        Source::Raw(ws) => match ws.next().await {
            Some(Ok(Message::Text(text))) => Item::Text(text.to_string()),
            Some(Ok(Message::Close(close))) => {
                Item::End(format!("closed by the server: {close:?}"))
            }
            Some(Ok(_)) => Item::Skip,
            Some(Err(e)) => Item::End(format!("connection failed: {e}")),
            None => Item::End("connection ended".to_owned()),
        },
        Source::Library { events, .. } => match events.recv().await {
            Some(Event::Message(m)) => Item::Message(m.seq, m.body["t"].as_u64().unwrap_or(0)),
            Some(Event::State(State::Reconnecting { code, reason, .. })) => {
                Item::Note(format!("connection lost ({code:?} {reason}), reconnecting"))
            }
            Some(Event::Error(e)) => Item::Note(e.to_string()),
            Some(_) => Item::Skip,
            None => Item::End("the client closed".to_owned()),
        },
    }
}

pub struct Subscriber {
    source: Source,
    pub slot: usize,
    room: Arc<str>,
    tracker: SeqTracker,
}

/// What a subscriber received.
#[derive(Debug)]
pub struct SubscriberOutcome {
    pub delivered: u64,
    pub latency: Latency,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub first_delivery: Option<Instant>,
    pub last_delivery: Option<Instant>,
    /// When everything up to the final head had arrived.
    pub completed: Option<Instant>,
    pub error_count: u64,
    /// The first few errors.
    pub errors: Vec<String>,
}

impl SubscriberOutcome {
    fn error(&mut self, text: String) {
        self.error_count += 1;
        if self.errors.len() < 5 {
            self.errors.push(text);
        }
    }
}

impl Subscriber {
    /// Connects to `node` as `sub` and joins room `room` (index `slot`), replaying from `since`
    /// when given. Returns once `joined` has arrived.
    #[allow(clippy::too_many_arguments)]
    pub async fn join(
        node: &Node,
        auth: &Auth,
        sub: &str,
        slot: usize,
        room: Arc<str>,
        since: Option<u64>,
        read_buffer: usize,
        timeout: Duration,
        library: bool,
    ) -> Result<Subscriber> {
        if library {
            let token = auth.token(sub)?.unwrap_or_else(|| format!("dev:{sub}"));
            let options = Options::new(node.ws.clone())
                .token(token)
                .read_buffer_size(read_buffer)
                .connect_timeout(timeout);
            let (client, events) = Client::bounded(options, LIBRARY_EVENTS);
            let joined = tokio::time::timeout(timeout, client.join(&room, since)).await;
            let base = match joined {
                Ok(Ok(joined)) => since.unwrap_or(joined.head),
                Ok(Err(e)) => {
                    client.close().await;
                    bail!("join refused: {e}");
                }
                Err(_) => {
                    client.close().await;
                    bail!("no `joined` for room {room} within {timeout:?}");
                }
            };
            return Ok(Subscriber {
                source: Source::Library { client, events },
                slot,
                room,
                tracker: SeqTracker::new(base),
            });
        }
        let ws = client::connect(
            node,
            auth,
            sub,
            None,
            client::ws_config(read_buffer),
            timeout,
        )
        .await?;
        Subscriber::join_on(ws, slot, room, since, timeout).await
    }

    /// Joins on an open connection.
    pub async fn join_on(
        mut ws: Ws,
        slot: usize,
        room: Arc<str>,
        since: Option<u64>,
        timeout: Duration,
    ) -> Result<Subscriber> {
        ws.send(Message::text(client::join_frame(&room, since, 1)))
            .await?;
        let head = tokio::time::timeout(timeout, wait_joined(&mut ws))
            .await
            .map_err(|_| anyhow!("no `joined` for room {room} within {timeout:?}"))??;
        let base = since.unwrap_or(head);
        Ok(Subscriber {
            source: Source::Raw(ws),
            slot,
            room,
            tracker: SeqTracker::new(base),
        })
    }

    /// The connection, for a scenario that only needed the join (a raw subscriber's).
    pub fn into_ws(self) -> Option<Ws> {
        match self.source {
            Source::Raw(ws) => Some(ws),
            Source::Library { .. } => None,
        }
    }

    /// Reads until everything up to the final head of its room has arrived, or the finals'
    /// deadline passes (what is missing then is lost), or the hard `deadline` passes.
    pub async fn run(mut self, mut finals: FinalsRx, deadline: Instant) -> SubscriberOutcome {
        let mut out = SubscriberOutcome {
            delivered: 0,
            latency: Latency::new(),
            lost: 0,
            duplicates: 0,
            out_of_order: 0,
            first_delivery: None,
            last_delivery: None,
            completed: None,
            error_count: 0,
            errors: Vec::new(),
        };
        let mut target: Option<u64> = None;
        let mut until = deadline;
        let mut finals_open = true;
        loop {
            if target.is_none() {
                if let Some(f) = finals.borrow_and_update().as_ref() {
                    target = f.heads.get(self.slot).copied();
                    until = until.min(f.deadline);
                }
            }
            if let Some(head) = target {
                if self.tracker.complete(head) {
                    out.completed = Some(Instant::now());
                    break;
                }
            }
            // Checked here too: under a steady stream the biased `select!` below never gets
            // to its timer.
            if Instant::now() >= until {
                break;
            }
            tokio::select! {
                biased;
                item = next_item(&mut self.source) => match item {
                    Item::Text(text) => self.handle(&text, &mut out),
                    Item::Message(seq, sent) => self.delivered(seq, sent, &mut out),
                    Item::Skip => {}
                    Item::Note(e) => out.error(format!("subscriber of {}: {e}", self.room)),
                    Item::End(e) => {
                        out.error(format!("subscriber of {}: {e}", self.room));
                        break;
                    }
                },
                changed = finals.changed(), if finals_open && target.is_none() => {
                    if changed.is_err() {
                        finals_open = false;
                    }
                }
                () = tokio::time::sleep_until(until.into()) => break,
            }
        }
        match target {
            Some(head) => {
                out.lost = self.tracker.lost(head);
                let beyond = self.tracker.beyond(head);
                if beyond > 0 {
                    out.error(format!(
                        "subscriber of {}: {beyond} seqs above the final head {head}",
                        self.room
                    ));
                }
            }
            None => out.error(format!(
                "subscriber of {}: the final head never came",
                self.room
            )),
        }
        out.duplicates = self.tracker.duplicates;
        out.out_of_order = self.tracker.out_of_order;
        match self.source {
            Source::Raw(mut ws) => {
                // Best effort: the figures are complete.
                let _closed =
                    tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
            }
            Source::Library { client, .. } => {
                // What the library dropped or repaired never reached the tracker.
                let stats = client.stats().await;
                out.duplicates += stats.duplicates;
                out.out_of_order += stats.gaps;
                client.close().await;
            }
        }
        out
    }

    fn delivered(&mut self, seq: u64, sent: u64, out: &mut SubscriberOutcome) {
        self.delivered_at(seq, sent, client::unix_nanos(), Instant::now(), out);
    }

    /// Message `seq`, sent at `sent` (ns since the epoch; 0 = unknown), arrived now.
    fn delivered_at(
        &mut self,
        seq: u64,
        sent: u64,
        now_nanos: u64,
        now: Instant,
        out: &mut SubscriberOutcome,
    ) {
        self.tracker.record(seq);
        out.delivered += 1;
        if sent > 0 {
            out.latency
                .record_micros(now_nanos.saturating_sub(sent) / 1000);
        }
        out.first_delivery.get_or_insert(now);
        out.last_delivery = Some(now);
    }

    fn handle(&mut self, text: &str, out: &mut SubscriberOutcome) {
        let frame = match Incoming::parse(text) {
            Ok(frame) => frame,
            Err(e) => {
                out.error(format!("subscriber of {}: {e}", self.room));
                return;
            }
        };
        match frame.kind.as_ref() {
            "message" => {
                let now_nanos = client::unix_nanos();
                let now = Instant::now();
                if frame.room.as_deref() != Some(&*self.room) {
                    out.error(format!(
                        "subscriber of {}: message of another room: {text}",
                        self.room
                    ));
                    return;
                }
                let Some(seq) = frame.seq else {
                    out.error(format!(
                        "subscriber of {}: message without seq: {text}",
                        self.room
                    ));
                    return;
                };
                let sent = frame.body.as_ref().map_or(0, |b| b.t);
                self.delivered_at(seq, sent, now_nanos, now, out);
            }
            "error" => out.error(format!(
                "subscriber of {}: error {}",
                self.room,
                frame.error_text()
            )),
            _ => {}
        }
    }
}

/// Reads until the `joined` reply of ref 1; a `message` before it breaks the protocol.
async fn wait_joined(ws: &mut Ws) -> Result<u64> {
    while let Some(frame) = ws.next().await {
        let Message::Text(text) = frame? else {
            continue;
        };
        let frame = Incoming::parse(&text)?;
        match frame.kind.as_ref() {
            "joined" if frame.reference == Some(1) => {
                return frame
                    .head
                    .ok_or_else(|| anyhow!("joined without head: {text}"))
            }
            "error" => bail!("join refused: {}", frame.error_text()),
            "message" => bail!("a message came before `joined`: {text}"),
            _ => {}
        }
    }
    bail!("the connection ended before `joined`")
}
