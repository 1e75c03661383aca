//! Talking to seqcast as `shared/protocol.md` describes: node addresses, tokens, the WebSocket
//! handshake (optionally from a chosen source address), the frames the load generator sends and
//! the few fields it reads from what it receives, and the one HTTP call it needs (a room's head).
//!
//! Incoming frames are parsed into a borrowed struct with only the fields a scenario looks at:
//! at a few hundred thousand deliveries a second, the load generator shares two cores with the
//! server, and a full `serde_json::Value` per frame would cost it much of its budget.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

/// One node: where to open WebSockets and where to ask HTTP questions.
#[derive(Debug, Clone)]
pub struct Node {
    /// `http://host:port`, without a trailing slash.
    pub http: String,
    /// `ws://host:port/v1/ws`.
    pub ws: String,
    pub addr: SocketAddr,
}

impl Node {
    /// Resolves a base URL `http://host:port`.
    pub async fn resolve(base: &str) -> Result<Node> {
        let base = base.trim().trim_end_matches('/');
        let hostport = base
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("node URL {base:?} must start with http://"))?;
        if hostport.contains('/') {
            bail!("node URL {base:?} must be a base URL (http://host:port)");
        }
        let addr = tokio::net::lookup_host(hostport)
            .await
            .with_context(|| format!("cannot resolve {hostport}"))?
            .next()
            .ok_or_else(|| anyhow!("{hostport} resolves to no address"))?;
        Ok(Node {
            http: base.to_owned(),
            ws: format!("ws://{hostport}/v1/ws"),
            addr,
        })
    }
}

/// Mints the tokens of the connections, or none in development mode.
#[derive(Clone)]
pub struct Auth {
    key: Option<EncodingKey>,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    rooms: [&'a str; 1],
}

impl Auth {
    pub fn new(secret: Option<&str>) -> Auth {
        Auth {
            key: secret.map(|s| EncodingKey::from_secret(s.as_bytes())),
        }
    }

    /// A token for user `sub`, allowed in every room, valid for a day; `None` without a secret.
    pub fn token(&self, sub: &str) -> Result<Option<String>> {
        let Some(key) = &self.key else {
            return Ok(None);
        };
        let claims = Claims {
            sub,
            exp: unix_nanos() / 1_000_000_000 + 24 * 3600,
            rooms: ["*"],
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key)
            .map(Some)
            .context("cannot sign a token")
    }
}

/// WebSocket settings: buffers sized for many connections per process. The 128 KiB defaults
/// would take 12 GiB of read buffers for 100,000 connections.
pub fn ws_config(read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
}

/// Opens a WebSocket to `node` as `sub`, from `source` when given (a loopback address other
/// than 127.0.0.1 gives another 28,000 ephemeral ports), within `timeout`.
pub async fn connect(
    node: &Node,
    auth: &Auth,
    sub: &str,
    source: Option<IpAddr>,
    config: WebSocketConfig,
    timeout: Duration,
) -> Result<Ws> {
    let mut request = node.ws.as_str().into_client_request()?;
    if let Some(token) = auth.token(sub)? {
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}"))?,
        );
    }
    let attempt = async {
        let socket = match node.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("cannot bind source address {ip}"))?;
        }
        let stream = socket
            .connect(node.addr)
            .await
            .with_context(|| format!("cannot connect to {}", node.addr))?;
        stream.set_nodelay(true)?;
        let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
            .await
            .with_context(|| format!("WebSocket handshake with {} failed", node.ws))?;
        anyhow::Ok(ws)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| anyhow!("connecting to {} took over {timeout:?}", node.ws))?
}

/// The fields of a server frame that the scenarios read.
#[derive(Debug, Deserialize)]
pub struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default, borrow)]
    pub room: Option<Cow<'a, str>>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub head: Option<u64>,
    /// Our refs are numbers.
    #[serde(default, rename = "ref")]
    pub reference: Option<u64>,
    #[serde(default)]
    pub body: Option<Body>,
    #[serde(default, borrow)]
    pub code: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub message: Option<Cow<'a, str>>,
}

/// What the load generator reads of a message body `{"t":..,"p":..,"n":..}`.
#[derive(Debug, Default, Deserialize)]
pub struct Body {
    /// Send time, nanoseconds since the Unix epoch. (`p`, the publisher id, and `n`, its
    /// counter, are there for people reading the stored messages.)
    #[serde(default)]
    pub t: u64,
}

impl<'a> Incoming<'a> {
    pub fn parse(text: &'a str) -> Result<Incoming<'a>> {
        serde_json::from_str(text).with_context(|| format!("unreadable frame {text:?}"))
    }

    /// `code: message` of an `error` frame.
    pub fn error_text(&self) -> String {
        format!(
            "{}: {}",
            self.code.as_deref().unwrap_or("?"),
            self.message.as_deref().unwrap_or("")
        )
    }
}

/// The `idem` key of a publisher's send: 36 characters, the size of the UUID the client library
/// generates by default, unique per publisher and send (rooms are fresh per run, and keys are
/// scoped to the room and sender).
pub fn idem_key(publisher: u32, counter: u64) -> String {
    format!("{publisher:08x}-0000-4000-8000-{counter:012x}")
}

/// A keyless `send` frame (`--no-idem`); the body carries the send time so any receiver can
/// compute the end-to-end latency. Room names are `[A-Za-z0-9_.:-]`, so no escaping is needed.
pub fn send_frame(room: &str, publisher: u32, counter: u64, reference: u64, pad: &str) -> String {
    let t = unix_nanos();
    let body = if pad.is_empty() {
        format!(r#"{{"t":{t},"p":{publisher},"n":{counter}}}"#)
    } else {
        format!(r#"{{"t":{t},"p":{publisher},"n":{counter},"x":"{pad}"}}"#)
    };
    format!(r#"{{"type":"send","room":"{room}","body":{body},"ref":{reference}}}"#)
}

/// A `join` frame, replaying from `since` when given.
pub fn join_frame(room: &str, since: Option<u64>, reference: u64) -> String {
    match since {
        Some(since) => {
            format!(r#"{{"type":"join","room":"{room}","since":{since},"ref":{reference}}}"#)
        }
        None => format!(r#"{{"type":"join","room":"{room}","ref":{reference}}}"#),
    }
}

pub fn ping_frame(reference: u64) -> String {
    format!(r#"{{"type":"ping","ref":{reference}}}"#)
}

/// Nanoseconds since the Unix epoch (all processes of a run share this machine's clock).
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Plain HTTP client for the room endpoint.
#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
    auth: Auth,
}

#[derive(Deserialize)]
struct RoomInfo {
    head: u64,
}

impl Http {
    pub fn new(auth: Auth, timeout: Duration) -> Result<Http> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .context("cannot build an HTTP client")?;
        Ok(Http { client, auth })
    }

    /// `GET /v1/rooms/{room}`: the room's last committed seq.
    ///
    /// A real client's manners: a 429 (the server's per-user read limit, `Retry-After` seconds)
    /// is waited out and retried, up to [`HEAD_ATTEMPTS`] times, so a scenario reading many
    /// heads at once is not reported as failing against a server that is doing its job.
    pub async fn head(&self, node: &Node, room: &str) -> Result<u64> {
        let mut attempt = 1;
        loop {
            let mut request = self.client.get(format!("{}/v1/rooms/{room}", node.http));
            if let Some(token) = self.auth.token("loadtest-http")? {
                request = request.bearer_auth(token);
            }
            let response = request
                .send()
                .await
                .with_context(|| format!("GET /v1/rooms/{room} on {}", node.http))?;
            let status = response.status();
            if status == reqwest::StatusCode::TOO_MANY_REQUESTS && attempt < HEAD_ATTEMPTS {
                attempt += 1;
                tokio::time::sleep(retry_after(response.headers())).await;
                continue;
            }
            if !status.is_success() {
                let text = response.text().await.unwrap_or_default();
                bail!("GET /v1/rooms/{room} on {}: {status} {text}", node.http);
            }
            let info: RoomInfo = response.json().await.context("room info")?;
            return Ok(info.head);
        }
    }
}

/// How many times [`Http::head`] asks before a 429 counts as an error.
const HEAD_ATTEMPTS: u32 = 10;

/// The wait a 429 asks for: its `Retry-After` in seconds (capped at 5), 1 s when absent.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Duration {
    let secs = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(secs.clamp(1, 5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frame = send_frame("r-1", 7, 42, 9, "");
        let value: serde_json::Value = serde_json::from_str(&frame).expect("send frame is JSON");
        assert_eq!(value["type"], "send");
        assert_eq!(value["room"], "r-1");
        assert_eq!(value["body"]["p"], 7);
        assert_eq!(value["body"]["n"], 42);
        assert_eq!(value["ref"], 9);
        assert!(value["body"]["t"].as_u64().is_some_and(|t| t > 0));

        assert!(value.get("idem").is_none());
        let padded = send_frame("r", 1, 1, 1, "xxxx");
        let value: serde_json::Value = serde_json::from_str(&padded).expect("send frame is JSON");
        assert_eq!(value["body"]["x"], "xxxx");

        assert_eq!(idem_key(7, 42), "00000007-0000-4000-8000-00000000002a");
        assert_eq!(idem_key(7, 42).len(), 36, "the length of a UUID");
        assert_ne!(idem_key(7, 43), idem_key(7, 42), "one key per send");

        let message = r#"{"type":"message","room":"r-1","seq":5,"id":"u","from":"a","body":{"t":12,"p":3,"n":4},"ts":"x"}"#;
        let parsed = Incoming::parse(message).expect("a message frame parses");
        assert_eq!(parsed.kind, "message");
        assert_eq!(parsed.seq, Some(5));
        assert_eq!(parsed.body.as_ref().map(|b| b.t), Some(12));

        let joined = Incoming::parse(r#"{"type":"joined","room":"r","head":57,"first":1,"ref":1}"#);
        assert_eq!(joined.expect("a joined frame parses").head, Some(57));
        assert!(Incoming::parse("not json").is_err());
    }

    #[test]
    fn retry_after_is_read_and_bounded() {
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&headers), Duration::from_secs(1));
        headers.insert(reqwest::header::RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&headers), Duration::from_secs(3));
        headers.insert(
            reqwest::header::RETRY_AFTER,
            HeaderValue::from_static("3600"),
        );
        assert_eq!(retry_after(&headers), Duration::from_secs(5));
        headers.insert(
            reqwest::header::RETRY_AFTER,
            HeaderValue::from_static("soon"),
        );
        assert_eq!(retry_after(&headers), Duration::from_secs(1));
    }
}
