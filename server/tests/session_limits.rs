//! Per-connection controls of a session, against the real binary: the rooms-per-connection
//! limit (`SEQCAST_MAX_ROOMS_PER_CONNECTION`) and keep-alive (`SEQCAST_PING_INTERVAL`,
//! `SEQCAST_IDLE_TIMEOUT`).
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::http::{metric_value, Http};
use support::server::{run_scenario, ServerOptions, StoreKind, TestServer};
use support::ws::{Event, WsClient, RECV_DEADLINE};

async fn dev_server(env: &[(&str, &str)]) -> TestServer {
    let mut options = ServerOptions::new(StoreKind::Sqlite);
    for (key, value) in env {
        options = options.env(*key, *value);
    }
    TestServer::start(options).await
}

async fn join_rooms(client: &mut WsClient, rooms: impl Iterator<Item = String>) {
    for room in rooms {
        client.join(&room, None).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_per_connection_at_the_limit_and_past_it() {
    run_scenario("rooms_per_connection_at_the_limit_and_past_it", async {
        let server = dev_server(&[("SEQCAST_MAX_ROOMS_PER_CONNECTION", "3")]).await;
        let mut client = WsClient::connect(&server).await;
        join_rooms(&mut client, (1..=3).map(|i| format!("r{i}"))).await;
        // At the limit, a rejoin is not a new room.
        client.join("r3", Some(0)).await;
        // Limit + 1: refused with the request's ref; the connection stays.
        let error = client
            .expect_error(
                json!({"type": "join", "room": "r4", "ref": "4"}),
                "limit_exceeded",
            )
            .await;
        assert_eq!(error["ref"], "4");
        client.ping().await;
        // The refused room was not joined: a message there does not arrive.
        client.send_msg("r4", json!("not for you")).await;
        let frames = client.frames_until_pong().await;
        assert!(
            frames.iter().all(|f| f["type"] != "message"),
            "no message of a room not joined: {frames:?}"
        );
        // Leaving frees a place.
        client.leave("r1").await;
        client.join("r4", None).await;
        client
            .expect_error(json!({"type": "join", "room": "r5"}), "limit_exceeded")
            .await;
        // Another connection has its own count.
        let mut other = WsClient::connect(&server).await;
        join_rooms(&mut other, (1..=3).map(|i| format!("r{i}"))).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_per_connection_default_200_and_0_turns_it_off() {
    run_scenario(
        "rooms_per_connection_default_200_and_0_turns_it_off",
        async {
            // Hundreds of joins in a row would exceed the send rate (it counts joins): off here.
            let server = dev_server(&[("SEQCAST_SEND_RATE", "0")]).await;
            let mut client = WsClient::connect(&server).await;
            join_rooms(&mut client, (1..=200).map(|i| format!("room-{i}"))).await;
            client
                .expect_error(
                    json!({"type": "join", "room": "room-201"}),
                    "limit_exceeded",
                )
                .await;

            let unlimited = dev_server(&[
                ("SEQCAST_MAX_ROOMS_PER_CONNECTION", "0"),
                ("SEQCAST_SEND_RATE", "0"),
            ])
            .await;
            let mut client = WsClient::connect(&unlimited).await;
            join_rooms(&mut client, (1..=250).map(|i| format!("room-{i}"))).await;
            client.ping().await;
        },
    )
    .await;
}

/// A WebSocket client on a bare TCP socket that never writes after the handshake: unlike
/// tungstenite it does not answer pings, so the server hears nothing from it.
struct SilentClient {
    stream: TcpStream,
    buffer: Vec<u8>,
}

/// A server frame as the silent client sees it.
#[derive(Debug, PartialEq)]
enum RawFrame {
    Ping,
    Close {
        code: u16,
        reason: String,
    },
    Other(u8),
    /// The server closed the TCP connection.
    Eof,
}

impl SilentClient {
    async fn connect(server: &TestServer) -> SilentClient {
        let mut stream = tokio::time::timeout(RECV_DEADLINE, TcpStream::connect(server.addr))
            .await
            .expect("connect within the deadline")
            .expect("connect");
        let request = format!(
            "GET /v1/ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            server.addr
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut client = SilentClient {
            stream,
            buffer: Vec::new(),
        };
        let head = client.read_until_head().await;
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "expected 101 Switching Protocols, got {head:?}"
        );
        client
    }

    async fn fill(&mut self, until: Instant) -> bool {
        let mut chunk = [0_u8; 4096];
        let remaining = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buffer.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => panic!("nothing from the server before the deadline"),
        }
    }

    async fn read_until_head(&mut self) -> String {
        let until = Instant::now() + RECV_DEADLINE;
        loop {
            if let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buffer[..end]).into_owned();
                self.buffer.drain(..end + 4);
                return head;
            }
            assert!(
                self.fill(until).await,
                "connection closed during the handshake"
            );
        }
    }

    /// The next server frame (servers do not mask), or `Eof`; panics past `until`.
    async fn next_frame(&mut self, until: Instant) -> RawFrame {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buffer) {
                self.buffer.drain(..used);
                return frame;
            }
            if !self.fill(until).await {
                return RawFrame::Eof;
            }
        }
    }
}

/// Parses one unmasked frame from the front of `buf`: the frame and the bytes it used.
fn parse_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let (len, header) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().unwrap()) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(header..header + len)?;
    let frame = match opcode {
        0x9 => RawFrame::Ping,
        0x8 => RawFrame::Close {
            code: u16::from_be_bytes([payload[0], payload[1]]),
            reason: String::from_utf8_lossy(&payload[2..]).into_owned(),
        },
        other => RawFrame::Other(other),
    };
    Some((frame, header + len))
}

/// A client that sends nothing, pongs included, is closed with 1001 once the idle timeout has
/// passed (and not before), after having been pinged; then the server drops the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_after_the_idle_timeout() {
    run_scenario("a_silent_client_is_closed_after_the_idle_timeout", async {
        let server = dev_server(&[
            ("SEQCAST_PING_INTERVAL", "1s"),
            ("SEQCAST_IDLE_TIMEOUT", "2s"),
        ])
        .await;
        let mut client = SilentClient::connect(&server).await;
        let start = Instant::now();
        let until = start + Duration::from_secs(10);
        let mut pings = 0;
        let (code, reason) = loop {
            match client.next_frame(until).await {
                RawFrame::Ping => pings += 1,
                RawFrame::Close { code, reason } => break (code, reason),
                other => panic!("expected pings then a close, got {other:?}"),
            }
        };
        let elapsed = start.elapsed();
        eprintln!("idle close after {elapsed:?}, {pings} pings");
        assert_eq!((code, reason.as_str()), (1001, "idle timeout"));
        assert!(pings >= 1, "the server pinged before giving up");
        assert!(
            elapsed >= Duration::from_millis(1900),
            "closed after {elapsed:?}, before the 2 s idle timeout"
        );
        assert!(
            elapsed <= Duration::from_millis(3500),
            "closed after {elapsed:?}, more than 1.5 s past the 2 s idle timeout"
        );
        // Then the connection is dropped (the client never answers the close).
        let end = client
            .next_frame(Instant::now() + Duration::from_secs(5))
            .await;
        assert_eq!(end, RawFrame::Eof);
    })
    .await;
}

/// A client that keeps reading answers the pings (tungstenite does so while reading), which
/// keeps its connection open through several idle timeouts without sending anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_client_stays_open_past_several_idle_timeouts() {
    run_scenario(
        "a_reading_client_stays_open_past_several_idle_timeouts",
        async {
            let server = dev_server(&[
                ("SEQCAST_PING_INTERVAL", "500ms"),
                ("SEQCAST_IDLE_TIMEOUT", "1s"),
            ])
            .await;
            let mut client = WsClient::connect(&server).await;
            client.join("general", None).await;
            // 4.5 idle timeouts; `next_event` skips (and thereby answers) pings.
            let event = client.next_event(Duration::from_millis(4500)).await;
            assert!(
                event.is_none(),
                "expected an open, quiet connection: {event:?}"
            );
            client.ping().await;
            let ack = client.send_msg("general", json!("alive")).await;
            let message = client.collect_messages("general", 1, RECV_DEADLINE).await;
            assert_eq!(message[0]["seq"], ack["seq"]);
        },
    )
    .await;
}

/// `SEQCAST_IDLE_TIMEOUT=0` turns idle closing off: a silent client stays, and is still pinged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_0_keeps_silent_clients() {
    run_scenario("idle_timeout_0_keeps_silent_clients", async {
        let server = dev_server(&[
            ("SEQCAST_PING_INTERVAL", "300ms"),
            ("SEQCAST_IDLE_TIMEOUT", "0"),
        ])
        .await;
        let mut client = SilentClient::connect(&server).await;
        let until = Instant::now() + Duration::from_secs(2);
        let mut pings = 0;
        while Instant::now() + Duration::from_millis(400) < until {
            match client.next_frame(until).await {
                RawFrame::Ping => pings += 1,
                other => panic!("expected only pings, got {other:?}"),
            }
        }
        assert!(pings >= 3, "pinged every 300 ms: {pings} pings");
        // Still served.
        let mut other = WsClient::connect(&server).await;
        other.ping().await;
        drop(client);
    })
    .await;
}

/// `SEQCAST_PING_INTERVAL=0` turns pings off; then only the client's own frames keep it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_interval_0_sends_no_pings() {
    run_scenario("ping_interval_0_sends_no_pings", async {
        let server = dev_server(&[
            ("SEQCAST_PING_INTERVAL", "0"),
            ("SEQCAST_IDLE_TIMEOUT", "1s"),
        ])
        .await;
        let mut client = SilentClient::connect(&server).await;
        let start = Instant::now();
        match client.next_frame(start + Duration::from_secs(5)).await {
            RawFrame::Close { code, .. } => assert_eq!(code, 1001),
            other => panic!("expected no ping, then close 1001; got {other:?}"),
        }
        assert!(start.elapsed() >= Duration::from_millis(900));

        // A client that sends application pings more often than the timeout stays.
        let mut chatty = WsClient::connect(&server).await;
        for _ in 0..6 {
            chatty.ping().await;
            let quiet = chatty.next_event(Duration::from_millis(400)).await;
            assert!(quiet.is_none(), "{quiet:?}");
        }
        match chatty.next_event(Duration::from_millis(10)).await {
            None => {}
            Some(Event::Frame(frame)) => panic!("unexpected frame {frame}"),
            Some(end) => panic!("closed although active: {end:?}"),
        }
    })
    .await;
}

/// Every open connection holds its session's future for its whole life: the largest part of an
/// idle connection's memory (issue 11). The server reports its size at the first upgrade; it must
/// stay within the budget named in the code, so a change that grows it (a timer or a buffer held
/// inline, an async block capturing a future by value) fails here rather than in a benchmark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_future_stays_within_its_budget() {
    run_scenario("an_idle_session_future_stays_within_its_budget", async {
        let server = dev_server(&[]).await;
        let mut client = WsClient::connect(&server).await;
        client.join("budget", None).await;
        client.ping().await;
        let text = Http::new(&server).metrics().await;
        let bytes = metric_value(&text, "seqcast_session_future_bytes")
            .expect("seqcast_session_future_bytes is reported once a session started");
        let budget = seqcast::session::FUTURE_BUDGET_BYTES;
        eprintln!("session future: {bytes} bytes (budget {budget})");
        assert!(bytes > 0.0, "a session future has a size: {bytes}");
        assert!(
            bytes <= budget as f64,
            "a session's future is {bytes} bytes, over its budget of {budget} \
             (seqcast::session::FUTURE_BUDGET_BYTES): keep what an idle connection does not need \
             out of the future (box rare states, no captured futures by value)"
        );
    })
    .await;
}
