//! Timed load for fault tests: WebSocket senders and HTTP clients that keep working through a
//! fault and record how long each request took to be answered, and with what.
//!
//! Every request is timed from just before it is written to its answer. A request that gets no
//! answer within [`GIVE_UP`] is recorded as `no answer` with that wait, so a hang shows up as a
//! sample over any target instead of stopping the test.
#![allow(dead_code)] // each test crate uses a different part of the support code

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::http::Http;
use super::ws::{Auth, Event, WsClient};

/// How long a request is waited for before it counts as unanswered.
pub const GIVE_UP: Duration = Duration::from_secs(30);

/// One answered (or unanswered) request.
#[derive(Debug, Clone)]
pub struct Sample {
    /// What was asked: `ws send`, `http post`, `ws join since`, ...
    pub kind: &'static str,
    pub started: Instant,
    pub waited: Duration,
    /// `ack`, an error code, an HTTP status, `no answer`, ...
    pub outcome: String,
}

/// Samples of every load task of a test, and the flag that stops them.
#[derive(Clone, Default)]
pub struct Recorder {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
}

impl Recorder {
    pub fn record(&self, kind: &'static str, started: Instant, outcome: impl Into<String>) {
        self.samples.lock().expect("samples lock").push(Sample {
            kind,
            started,
            waited: started.elapsed(),
            outcome: outcome.into(),
        });
    }

    /// Tells every load task to finish its request in flight and stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().expect("samples lock").clone()
    }

    /// Samples of `kind` whose wait overlapped `[from, to)`.
    pub fn overlapping(&self, kind: &str, from: Instant, to: Instant) -> Vec<Sample> {
        self.samples()
            .into_iter()
            .filter(|s| s.kind == kind && s.started < to && s.started + s.waited >= from)
            .collect()
    }

    /// Samples of `kind` answered `outcome`.
    pub fn count(&self, kind: &str, outcome: &str) -> usize {
        self.samples()
            .iter()
            .filter(|s| s.kind == kind && s.outcome == outcome)
            .count()
    }
}

/// Per kind: (number of samples, worst wait, outcomes with their counts), for reports.
pub fn summary(
    samples: &[Sample],
) -> BTreeMap<&'static str, (usize, Duration, BTreeMap<String, usize>)> {
    let mut out: BTreeMap<&'static str, (usize, Duration, BTreeMap<String, usize>)> =
        BTreeMap::new();
    for s in samples {
        let entry = out.entry(s.kind).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(s.waited);
        *entry.2.entry(s.outcome.clone()).or_default() += 1;
    }
    out
}

/// The `p`-quantile (0..=1) of the waits of `samples`.
pub fn quantile(samples: &[Sample], p: f64) -> Duration {
    let mut waits: Vec<Duration> = samples.iter().map(|s| s.waited).collect();
    if waits.is_empty() {
        return Duration::ZERO;
    }
    waits.sort();
    let index = ((waits.len() - 1) as f64 * p).round() as usize;
    waits[index.min(waits.len() - 1)]
}

/// A WebSocket client sending to `rooms` in turn with up to `window` sends unanswered, each
/// with an `idem`, until the recorder stops. A send answered with an error is sent again with
/// the same `idem` (as a client retries) once `retry_pause` has passed; no new message goes out
/// while retries wait. Every answer is timed when it arrives. Records `ws send` samples.
pub async fn ws_sender(
    url: String,
    auth_token: Option<String>,
    rooms: Vec<String>,
    window: usize,
    retry_pause: Duration,
    recorder: Recorder,
) {
    let auth = match &auth_token {
        Some(token) => Auth::Query(token),
        None => Auth::None,
    };
    let mut client = WsClient::try_connect(&url, auth)
        .await
        .unwrap_or_else(|e| panic!("sender connect: {e}"));
    // Unanswered sends by ref: (idem, room, sent at).
    let mut unanswered: BTreeMap<u64, (String, String, Instant)> = BTreeMap::new();
    // Refused sends to send again: (idem, room, not before).
    let mut retries: Vec<(String, String, Instant)> = Vec::new();
    let mut next = 0_u64;
    loop {
        while unanswered.len() < window && !recorder.stopped() {
            let now = Instant::now();
            let (idem, room) = if let Some(i) = retries.iter().position(|r| r.2 <= now) {
                let (idem, room, _) = retries.swap_remove(i);
                (idem, room)
            } else if retries.is_empty() {
                next += 1;
                let room = rooms[next as usize % rooms.len()].clone();
                (format!("k{next}"), room)
            } else {
                break;
            };
            let reference = client.new_ref().as_u64().expect("numeric ref");
            let frame =
                json!({"type":"send","room":room,"body":{"n":next},"idem":idem,"ref":reference});
            let started = Instant::now();
            client.send_json(frame).await;
            unanswered.insert(reference, (idem, room, started));
        }
        if recorder.stopped() {
            retries.clear();
        }
        if unanswered.is_empty() && retries.is_empty() {
            return;
        }
        let give_up = unanswered.values().map(|(_, _, at)| *at + GIVE_UP).min();
        let retry_at = retries.iter().map(|r| r.2).min();
        let until = match (give_up, retry_at) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => unreachable!("checked above"),
        };
        let left = until.saturating_duration_since(Instant::now());
        match client.next_event(left).await {
            Some(Event::Frame(frame)) => {
                let Some(reference) = frame["ref"].as_u64() else {
                    continue;
                };
                let Some((idem, room, started)) = unanswered.remove(&reference) else {
                    continue;
                };
                let outcome = match frame["type"].as_str() {
                    Some("ack") => "ack".to_owned(),
                    Some("error") => {
                        retries.push((idem, room, Instant::now() + retry_pause));
                        frame["code"].as_str().unwrap_or("error").to_owned()
                    }
                    _ => format!("unexpected {frame}"),
                };
                recorder.record("ws send", started, outcome);
            }
            Some(other) => panic!("a sender's connection ended: {other:?}"),
            // A retry is due, or the oldest send is given up on.
            None => {
                let now = Instant::now();
                let overdue: Vec<u64> = unanswered
                    .iter()
                    .filter(|(_, (_, _, at))| *at + GIVE_UP <= now)
                    .map(|(r, _)| *r)
                    .collect();
                for reference in overdue {
                    let (_, _, started) = unanswered.remove(&reference).expect("listed");
                    recorder.record("ws send", started, "no answer");
                }
            }
        }
    }
}

/// POSTs to `room` one after another until the recorder stops, each with an `idem`; a refused
/// one is posted again with the same `idem` after `retry_pause`. Records `http post` samples.
pub async fn http_poster(http: Http, room: String, retry_pause: Duration, recorder: Recorder) {
    let mut n = 0_u64;
    let mut idem = None;
    while !recorder.stopped() {
        let key = idem.take().unwrap_or_else(|| {
            n += 1;
            format!("p{n}")
        });
        let path = format!("/v1/rooms/{room}/messages");
        let started = Instant::now();
        let reply = tokio::time::timeout(
            GIVE_UP,
            http.try_post_raw(
                &path,
                json!({"body": {"n": n}, "idem": key}).to_string().into(),
            ),
        )
        .await;
        let outcome = match reply {
            Ok(Ok(reply)) => reply.status.to_string(),
            Ok(Err(e)) => format!("transport error {e}"),
            Err(_) => "no answer".to_owned(),
        };
        let refused = outcome != "201";
        recorder.record("http post", started, outcome);
        if refused {
            idem = Some(key);
            tokio::time::sleep(retry_pause).await;
        }
    }
}

/// GETs `path` one after another until the recorder stops, `pause` apart; records `kind`
/// samples with the HTTP status.
pub async fn http_getter(
    http: Http,
    path: String,
    kind: &'static str,
    pause: Duration,
    recorder: Recorder,
) {
    while !recorder.stopped() {
        let started = Instant::now();
        let reply = tokio::time::timeout(GIVE_UP, http.try_get(&path)).await;
        let outcome = match reply {
            Ok(Ok(reply)) => reply.status.to_string(),
            Ok(Err(e)) => format!("transport error {e}"),
            Err(_) => "no answer".to_owned(),
        };
        recorder.record(kind, started, outcome);
        tokio::time::sleep(pause).await;
    }
}

/// Opens a connection, joins `room` with `since`, records the answer (`joined` or the error
/// code) as a `ws join since` sample, closes; again until the recorder stops.
pub async fn ws_joiner(url: String, room: String, since: u64, pause: Duration, recorder: Recorder) {
    while !recorder.stopped() {
        let mut client = WsClient::try_connect(&url, Auth::None)
            .await
            .unwrap_or_else(|e| panic!("joiner connect: {e}"));
        let reference = client.new_ref();
        let started = Instant::now();
        client
            .send_json(json!({"type":"join","room":room,"since":since,"ref":reference}))
            .await;
        let outcome = loop {
            let left = (started + GIVE_UP).saturating_duration_since(Instant::now());
            match client.next_event(left).await {
                Some(Event::Frame(frame)) if frame["ref"] == reference => {
                    break match frame["type"].as_str() {
                        Some("joined") => "joined".to_owned(),
                        Some("error") => frame["code"].as_str().unwrap_or("error").to_owned(),
                        _ => format!("unexpected {frame}"),
                    };
                }
                Some(Event::Frame(_)) => continue,
                Some(other) => break format!("connection ended: {other:?}"),
                None => break "no answer".to_owned(),
            }
        };
        recorder.record("ws join since", started, outcome);
        client.close().await;
        tokio::time::sleep(pause).await;
    }
}

/// A frame's `type` and `code`, for messages.
pub fn describe(frame: &Value) -> String {
    format!("{} {}", frame["type"], frame["code"])
}
