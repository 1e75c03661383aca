//! Admission at the door (docs/security.md), against the real binary: the `Origin` allowlist,
//! connection limits per node, per user and per address (`X-Forwarded-For` believed from trusted
//! proxies only), the frame limit, request deadlines against slowloris and idle keep-alive
//! connections, and tokens kept out of the logs.
//!
//! Admission does not depend on the store: every server here runs on SQLite.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

use support::check::eventually;
use support::http::Http;
use support::server::{run_scenario, Claims, ServerOptions, StoreKind, TestServer};
use support::ws::{Auth, WsClient, WsStream, RECV_DEADLINE};

const SECRET: &str = "admission-test-secret";
const API_KEY: &str = "admission-test-api-key";
/// `SEQCAST_HANDSHAKE_TIMEOUT` in the deadline tests.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// Scheduling and close latency allowed past a deadline.
const SLACK: Duration = Duration::from_millis(1500);
/// How long a freed place may take to be given back (the session ends after the close).
const RELEASE_DEADLINE: Duration = Duration::from_secs(5);

fn sqlite() -> ServerOptions {
    ServerOptions::new(StoreKind::Sqlite)
}

/// Runs a test body (boxed: test futures are large) with the harness's scenario deadline.
async fn scenario(name: &str, body: Pin<Box<dyn Future<Output = ()> + Send + '_>>) {
    run_scenario(name, body).await;
}

// --- clients ---------------------------------------------------------------------------------

/// An upgrade through tokio-tungstenite with extra headers; `Err(status)` when refused.
async fn try_upgrade(
    server: &TestServer,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<WsStream, u16> {
    let mut request = format!("{}{query}", server.ws_url())
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        request.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    let connect = tokio_tungstenite::connect_async(request);
    match tokio::time::timeout(RECV_DEADLINE, connect).await {
        Ok(Ok((ws, _response))) => Ok(ws),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
            Err(response.status().as_u16())
        }
        Ok(Err(e)) => panic!("upgrade failed without an HTTP answer: {e}"),
        Err(_) => panic!("upgrade took over {RECV_DEADLINE:?}"),
    }
}

/// An upgrade that must succeed; the connection is shown to work with a ping.
async fn upgrade(server: &TestServer, query: &str, headers: &[(&str, &str)]) -> WsStream {
    let mut ws = try_upgrade(server, query, headers)
        .await
        .unwrap_or_else(|status| panic!("upgrade {query} {headers:?} refused with {status}"));
    assert_pong(&mut ws).await;
    ws
}

/// Sends a protocol `ping` and expects its `pong`.
async fn assert_pong(ws: &mut WsStream) {
    use futures_util::{SinkExt, StreamExt};
    let send = ws.send(Message::text(json!({"type": "ping", "ref": 7}).to_string()));
    tokio::time::timeout(RECV_DEADLINE, send)
        .await
        .expect("ping not written in time")
        .expect("ping written");
    let until = Instant::now() + RECV_DEADLINE;
    loop {
        let remaining = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                assert_eq!(frame, json!({"type": "pong", "ref": 7}));
                return;
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    }
}

/// Closes a connection and waits for the server's side of the close handshake.
async fn close(mut ws: WsStream) {
    use futures_util::StreamExt;
    tokio::time::timeout(RECV_DEADLINE, ws.close(None))
        .await
        .expect("close not written in time")
        .expect("close written");
    let until = Instant::now() + RECV_DEADLINE;
    loop {
        let remaining = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, ws.next()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => return,
            Err(_) => panic!("the server did not end the connection after a close"),
        }
    }
}

/// An answer read off a raw socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawResponse {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts the protocol's error shape with `status` and `code`.
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "expected {status} {code}: {self:?}");
        let body = self.json();
        assert_eq!(body["error"], code, "{body}");
        assert!(body["message"].is_string(), "{body}");
    }
}

/// Reads one HTTP response (head, then a `Content-Length` body) within [`RECV_DEADLINE`].
async fn read_response(stream: &mut TcpStream) -> RawResponse {
    let until = Instant::now() + RECV_DEADLINE;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_end, length) = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            break (end + 4, length);
        }
        read_more(stream, &mut buf, &mut chunk, until).await;
    };
    while buf.len() < head_end + length {
        read_more(stream, &mut buf, &mut chunk, until).await;
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    RawResponse {
        status,
        head,
        body: buf[head_end..head_end + length].to_vec(),
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>, chunk: &mut [u8], until: Instant) {
    let remaining = until.saturating_duration_since(Instant::now());
    match tokio::time::timeout(remaining, stream.read(chunk)).await {
        Ok(Ok(0)) => panic!(
            "connection closed mid-response: {:?}",
            String::from_utf8_lossy(buf)
        ),
        Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        Ok(Err(e)) => panic!("read failed: {e}"),
        Err(_) => panic!(
            "no complete response within {RECV_DEADLINE:?}: {:?}",
            String::from_utf8_lossy(buf)
        ),
    }
}

/// A WebSocket upgrade request written by hand, so a refusal's body can be read whole.
async fn raw_upgrade(server: &TestServer, query: &str, headers: &[(&str, &str)]) -> RawResponse {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let mut request = format!(
        "GET /v1/ws{query} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        server.addr
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    read_response(&mut stream).await
}

/// Waits until the server ends `stream` (EOF or reset); returns when, or panics after `deadline`.
async fn closed_by_server(stream: &mut TcpStream, deadline: Duration) -> Instant {
    let until = Instant::now() + deadline;
    let mut chunk = [0u8; 1024];
    loop {
        let remaining = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, stream.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => return Instant::now(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the server kept the connection open past {deadline:?}"),
        }
    }
}

/// Upgrades until accepted, while earlier connections' places are being given back.
async fn upgrade_once_released(
    server: &TestServer,
    query: &str,
    headers: &[(&str, &str)],
) -> WsStream {
    let until = Instant::now() + RELEASE_DEADLINE;
    loop {
        match try_upgrade(server, query, headers).await {
            Ok(mut ws) => {
                assert_pong(&mut ws).await;
                return ws;
            }
            Err(status) if Instant::now() < until => {
                assert!(status == 429 || status == 503, "refused with {status}");
                // Polling the server's own count: the condition itself, every 20 ms.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("a freed place was not given back: still {status}"),
        }
    }
}

// --- Origin -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_allowlist() {
    scenario(
        "origin_allowlist",
        Box::pin(async {
            let server = TestServer::start(sqlite().env(
                "SEQCAST_ALLOWED_ORIGINS",
                "https://app.example.com, http://localhost:3000",
            ))
            .await;
            let own = format!("http://{}", server.addr);

            // Native clients send no Origin.
            upgrade(&server, "", &[]).await;
            // The server's own origin (tungstenite sends Host = the address).
            upgrade(&server, "", &[("origin", &own)]).await;
            // Listed origins, as browsers write them.
            upgrade(&server, "", &[("origin", "https://app.example.com")]).await;
            upgrade(&server, "", &[("origin", "http://localhost:3000")]).await;

            for foreign in [
                "https://evil.example",
                "http://app.example.com",
                "https://app.example.com.evil.example",
                "http://localhost:3001",
                &format!("http://127.0.0.1:{}", server.addr.port().wrapping_add(1)),
                "null",
            ] {
                raw_upgrade(&server, "", &[("Origin", foreign)])
                    .await
                    .assert_error(403, "forbidden");
                assert_eq!(
                    try_upgrade(&server, "", &[("origin", foreign)]).await.err(),
                    Some(403),
                    "{foreign}"
                );
            }

            let open = TestServer::start(sqlite().env("SEQCAST_ALLOWED_ORIGINS", "*")).await;
            upgrade(&open, "", &[("origin", "https://evil.example")]).await;
        }),
    )
    .await;
}

// --- connection limits --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_connection_limit() {
    scenario(
        "node_connection_limit",
        Box::pin(async {
            let server = TestServer::start(sqlite().env("SEQCAST_MAX_CONNECTIONS", "3")).await;
            let mut open = Vec::new();
            for _ in 0..3 {
                open.push(upgrade(&server, "", &[]).await);
            }
            raw_upgrade(&server, "", &[])
                .await
                .assert_error(503, "limit_exceeded");
            assert_eq!(try_upgrade(&server, "", &[]).await.err(), Some(503));
            // The limit is on WebSocket connections: plain HTTP is still served.
            assert_eq!(Http::new(&server).get("/live").await.status, 200);

            close(open.pop().unwrap()).await;
            open.push(upgrade_once_released(&server, "", &[]).await);
            assert_eq!(try_upgrade(&server, "", &[]).await.err(), Some(503));
            for ws in &mut open {
                assert_pong(ws).await;
            }
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_connection_limit() {
    scenario(
        "user_connection_limit",
        Box::pin(async {
            let server = TestServer::start(
                sqlite()
                    .jwt_secret(SECRET)
                    .api_key(API_KEY)
                    .env("SEQCAST_MAX_CONNECTIONS_PER_USER", "2"),
            )
            .await;
            let alice = format!("?token={}", Claims::new("alice", &["*"]).sign(SECRET));
            let bob = format!("?token={}", Claims::new("bob", &["*"]).sign(SECRET));

            let first = upgrade(&server, &alice, &[]).await;
            let _second = upgrade(&server, &alice, &[]).await;
            raw_upgrade(&server, &alice, &[])
                .await
                .assert_error(429, "limit_exceeded");
            // The header form counts for the same user.
            let header = format!("Bearer {}", Claims::new("alice", &["*"]).sign(SECRET));
            assert_eq!(
                try_upgrade(&server, "", &[("authorization", &header)])
                    .await
                    .err(),
                Some(429)
            );
            let _bob = upgrade(&server, &bob, &[]).await;

            close(first).await;
            let _third = upgrade_once_released(&server, &alice, &[]).await;
            assert_eq!(try_upgrade(&server, &alice, &[]).await.err(), Some(429));

            // The server key is a backend, not a user: counted per node only.
            let key = format!("?token={API_KEY}");
            let mut backends = Vec::new();
            for _ in 0..3 {
                backends.push(upgrade(&server, &key, &[]).await);
            }
            // A refused token is not counted for anyone: it is told why in-band, then closed.
            let stranger = format!(
                "?token={}",
                Claims::new("alice", &["*"]).sign("wrong-secret")
            );
            let mut refused =
                WsClient::try_connect(&format!("{}{stranger}", server.ws_url()), Auth::None)
                    .await
                    .unwrap();
            let frame = refused.recv_json().await;
            assert_eq!(frame["code"], "unauthorized", "{frame}");
            refused.expect_close_code(1008, RECV_DEADLINE).await;
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_connection_limit() {
    scenario(
        "address_connection_limit",
        Box::pin(async {
            // No trusted proxy: X-Forwarded-For is the client's say and is ignored.
            let server =
                TestServer::start(sqlite().env("SEQCAST_MAX_CONNECTIONS_PER_IP", "2")).await;
            let first = upgrade(&server, "", &[]).await;
            let _second = upgrade(&server, "", &[("x-forwarded-for", "1.1.1.1")]).await;
            raw_upgrade(&server, "", &[("X-Forwarded-For", "2.2.2.2")])
                .await
                .assert_error(429, "limit_exceeded");
            assert_eq!(try_upgrade(&server, "", &[]).await.err(), Some(429));
            close(first).await;
            let _again = upgrade_once_released(&server, "", &[]).await;
            assert_eq!(try_upgrade(&server, "", &[]).await.err(), Some(429));
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_limit_behind_a_trusted_proxy() {
    scenario(
        "address_limit_behind_a_trusted_proxy",
        Box::pin(async {
            // The test client plays the load balancer at 127.0.0.1.
            let server = TestServer::start(
                sqlite()
                    .env("SEQCAST_MAX_CONNECTIONS_PER_IP", "2")
                    .env("SEQCAST_TRUSTED_PROXIES", "127.0.0.0/8, 10.0.0.0/8"),
            )
            .await;
            let xff = |v: &'static str| [("x-forwarded-for", v)];
            let a1 = upgrade(&server, "", &xff("203.0.113.1")).await;
            // The client forged the left part; the proxies appended the rest.
            let _a2 = upgrade(&server, "", &xff("6.6.6.6, 203.0.113.1, 10.0.0.9")).await;
            assert_eq!(
                try_upgrade(&server, "", &xff("203.0.113.1")).await.err(),
                Some(429)
            );
            assert_eq!(
                try_upgrade(&server, "", &xff("7.7.7.7, 203.0.113.1"))
                    .await
                    .err(),
                Some(429)
            );
            // Other clients behind the same proxy each have their own count.
            let _b1 = upgrade(&server, "", &xff("203.0.113.2")).await;
            let _b2 = upgrade(&server, "", &xff("198.51.100.7, 203.0.113.2")).await;
            // Without the header the proxy itself is the client.
            let _p1 = upgrade(&server, "", &[]).await;
            let _p2 = upgrade(&server, "", &[]).await;
            assert_eq!(try_upgrade(&server, "", &[]).await.err(), Some(429));

            close(a1).await;
            let _a3 = upgrade_once_released(&server, "", &xff("203.0.113.1")).await;
        }),
    )
    .await;
}

// --- frame limit ---------------------------------------------------------------------------------

/// A `send` frame of exactly `len` bytes (the body is padded).
fn send_frame_of(len: usize) -> String {
    let frame =
        |pad: &str| json!({"type": "send", "room": "limits", "body": pad, "ref": 1}).to_string();
    let base = frame("").len();
    let text = frame(&"x".repeat(len - base));
    assert_eq!(text.len(), len);
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_limit_at_limit_and_limit_plus_one() {
    scenario(
        "frame_limit_at_limit_and_limit_plus_one",
        Box::pin(async {
            const LIMIT: usize = 4096;
            let server =
                TestServer::start(sqlite().env("SEQCAST_MAX_FRAME_BYTES", LIMIT.to_string())).await;

            let mut client = WsClient::connect(&server).await;
            client.send_text(&send_frame_of(LIMIT)).await;
            let ack = client.recv_json().await;
            assert_eq!(
                ack["type"], "ack",
                "a frame of exactly the limit is served: {ack}"
            );
            client.send_text(&send_frame_of(LIMIT + 1)).await;
            client.expect_close_code(1009, RECV_DEADLINE).await;

            // The limit holds for a whole message too: two fragments within it, together past it.
            let mut client = WsClient::connect(&server).await;
            let text = send_frame_of(LIMIT + 1).into_bytes();
            let (head, tail) = text.split_at(LIMIT / 2);
            let first = Frame::message(head.to_vec(), OpCode::Data(Data::Text), false);
            let last = Frame::message(tail.to_vec(), OpCode::Data(Data::Continue), true);
            client.send_message(Message::Frame(first)).await;
            // The server may close as soon as it has read past the limit.
            let _ = client.try_send_message(Message::Frame(last)).await;
            client.expect_close_code(1009, RECV_DEADLINE).await;

            // The node keeps serving.
            let mut client = WsClient::connect(&server).await;
            client.ping().await;
        }),
    )
    .await;
}

// --- request deadlines ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_idle_connections_are_closed_in_time() {
    scenario(
        "slowloris_and_idle_connections_are_closed_in_time",
        Box::pin(async {
            let server = TestServer::start(sqlite().env("SEQCAST_HANDSHAKE_TIMEOUT", "1s")).await;
            // A WebSocket that outlives the deadline is not an HTTP request in waiting.
            let mut ws = WsClient::connect(&server).await;
            let ws_opened = Instant::now();

            // Slowloris: the request head one byte at a time, never finished.
            let slowloris = async {
                let mut stream = TcpStream::connect(server.addr).await.unwrap();
                let opened = Instant::now();
                let (mut read, mut write) = stream.split();
                let dribble = async {
                    let mut tick = tokio::time::interval(Duration::from_millis(100));
                    for byte in b"GET /live HTTP/1.1\r\nHost: x\r\nX-Slow: ".iter().cycle() {
                        tick.tick().await;
                        if write.write_all(&[*byte]).await.is_err() {
                            break;
                        }
                    }
                };
                let closed = async {
                    let mut chunk = [0u8; 256];
                    loop {
                        match read.read(&mut chunk).await {
                            Ok(0) | Err(_) => return Instant::now(),
                            Ok(_) => continue,
                        }
                    }
                };
                let closed = tokio::select! {
                    closed = tokio::time::timeout(HANDSHAKE_TIMEOUT + SLACK, closed) => closed,
                    () = dribble => panic!("the dribble ended on its own"),
                };
                let closed = closed.expect("a slowloris connection stayed open past the deadline");
                closed - opened
            };

            // An idle keep-alive connection after one complete request.
            let idle = async {
                let mut stream = TcpStream::connect(server.addr).await.unwrap();
                stream
                    .write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await
                    .unwrap();
                let response = read_response(&mut stream).await;
                assert_eq!(response.status, 200, "{response:?}");
                let answered = Instant::now();
                closed_by_server(&mut stream, HANDSHAKE_TIMEOUT + SLACK).await - answered
            };

            // A connection that never sends a byte.
            let silent = async {
                let mut stream = TcpStream::connect(server.addr).await.unwrap();
                let opened = Instant::now();
                closed_by_server(&mut stream, HANDSHAKE_TIMEOUT + SLACK).await - opened
            };

            let (slowloris, idle, silent) = tokio::join!(slowloris, idle, silent);
            eprintln!("closed after: slowloris {slowloris:?}, idle {idle:?}, silent {silent:?}");
            for (what, took) in [("slowloris", slowloris), ("idle", idle), ("silent", silent)] {
                assert!(
                    took >= HANDSHAKE_TIMEOUT - Duration::from_millis(100),
                    "{what} closed before the deadline: {took:?}"
                );
            }

            // Normal requests, on fresh and kept-alive connections, and the WebSocket still work.
            let http = Http::new(&server);
            for _ in 0..3 {
                assert_eq!(http.get("/live").await.status, 200);
            }
            assert!(ws_opened.elapsed() > HANDSHAKE_TIMEOUT);
            ws.ping().await;
            ws.send_msg("general", json!("still here")).await;
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_body_is_cut_off() {
    scenario(
        "slow_request_body_is_cut_off",
        Box::pin(async {
            let server = TestServer::start(sqlite().env("SEQCAST_HANDSHAKE_TIMEOUT", "1s")).await;
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            // A complete head promising 100 bytes of body, then 10 of them, then nothing.
            stream
                .write_all(
                    b"POST /v1/rooms/general/messages HTTP/1.1\r\nHost: x\r\n\
                  Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"body\":1",
                )
                .await
                .unwrap();
            let sent = Instant::now();
            let response = read_response(&mut stream).await;
            let answered = sent.elapsed();
            assert!(
                (400..500).contains(&response.status),
                "an unfinished body is a client error: {response:?}"
            );
            assert!(
                answered >= HANDSHAKE_TIMEOUT - Duration::from_millis(100)
                    && answered < HANDSHAKE_TIMEOUT + SLACK,
                "answered after {answered:?}"
            );
            closed_by_server(&mut stream, SLACK).await;
            assert!(
                !response.head.contains("201"),
                "nothing was stored: {response:?}"
            );
            let room = Http::new(&server).room("general").await;
            assert_eq!(room["head"], 0, "{room}");
        }),
    )
    .await;
}

// --- tokens in logs -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_the_logs() {
    scenario(
        "tokens_never_reach_the_logs",
        Box::pin(async {
            let server = TestServer::start(
                sqlite()
                    .jwt_secret(SECRET)
                    .env("RUST_LOG", "trace")
                    .env("SEQCAST_ALLOWED_ORIGINS", "https://app.example.com")
                    .capture_logs(),
            )
            .await;
            let valid = Claims::new("alice", &["general"]).sign(SECRET);
            let expired = Claims::new("alice", &["*"]).expires_in(-3600).sign(SECRET);
            let forged = Claims::new("mallory", &["*"]).sign("not-the-secret");
            let garbage = "not.a-jwt.at-all-4f9c2e";

            // Accepted: joins and sends, then closes.
            let mut client = WsClient::connect_with(&server, Auth::Query(&valid)).await;
            client.join("general", Some(0)).await;
            client.send_msg("general", json!("hello")).await;
            client.close().await;
            // Refused in-band: an error frame, then 1008.
            for token in [&expired, &forged, garbage] {
                let url = format!("{}?token={token}", server.ws_url());
                let mut refused = WsClient::try_connect(&url, Auth::None).await.unwrap();
                refused.expect_close_code(1008, RECV_DEADLINE).await;
            }
            // Refused at the door: foreign origin, malformed query (the token twice).
            raw_upgrade(
                &server,
                &format!("?token={valid}"),
                &[("Origin", "https://evil.example")],
            )
            .await
            .assert_error(403, "forbidden");
            raw_upgrade(&server, &format!("?token={valid}&token={forged}"), &[])
                .await
                .assert_error(400, "bad_request");
            // Tokens in query strings of other endpoints, which do not read them.
            let http = Http::new(&server);
            http.get(&format!("/v1/rooms/general?token={valid}"))
                .await
                .assert_error(401, "unauthorized");
            assert_eq!(
                http.get(&format!("/nowhere?token={valid}")).await.status,
                404
            );
            assert_eq!(
                http.get(&format!("/live?token={expired}")).await.status,
                200
            );

            // The log is complete once a marker request has been logged after everything above.
            let marker = format!("/marker-{}", uuid_like());
            assert_eq!(http.get(&marker).await.status, 404);
            eventually(RECV_DEADLINE, "the marker request is logged", || {
                let logged = server.logs().iter().any(|l| l.contains(&marker));
                async move { logged }
            })
            .await;

            let logs = server.logs();
            assert!(
                logs.iter().any(|l| l.contains("DEBUG"))
                    && logs.iter().any(|l| l.contains("/v1/ws")),
                "debug logging was on and requests were logged ({} lines)",
                logs.len()
            );
            for (name, token) in [
                ("valid", valid.as_str()),
                ("expired", expired.as_str()),
                ("forged", forged.as_str()),
                ("garbage", garbage),
            ] {
                // The signature alone is enough to find a leaked token, in any encoding.
                let signature = token.rsplit('.').next().unwrap();
                for line in &logs {
                    assert!(
                        !line.contains(signature),
                        "the {name} token leaked into a log line: {line}"
                    );
                }
            }
            eprintln!("checked {} log lines", logs.len());
        }),
    )
    .await;
}

/// A value unique to this run, for the marker path.
fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{nanos:x}-{}", std::process::id())
}
