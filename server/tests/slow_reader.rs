//! The write timeout counts from the last bytes the socket accepted (`protocol.md`: "close a
//! connection (4008) that accepts no bytes for this long"; "a client that reads slowly but keeps
//! reading is not cut off"). A client reading a few KiB at a time, for many times the write
//! timeout, while the server writes it large batches, stays connected and gets every message.
//! A client that stops reading is still closed 4008 about one write timeout later (also
//! `delivery.rs`, `stalled_reader_is_closed_with_4008`). HTTP responses keep the same rule: a
//! large history page read slowly arrives whole, one nobody reads is dropped with its connection.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_tungstenite::tungstenite::Message;

use support::check::{assert_contiguous, eventually};
use support::http::{metric_value, Http};
use support::server::{ServerOptions, StoreKind, TestServer};
use support::ws::WsClient;

/// A TCP stream that hands its reader at most `chunk` bytes per `pause`.
struct Throttled {
    inner: TcpStream,
    /// Set: no more throttling.
    fast: Arc<AtomicBool>,
    /// Set: reads nothing more, ever.
    stopped: Arc<AtomicBool>,
    chunk: usize,
    pause: Duration,
    next: Pin<Box<Sleep>>,
}

impl AsyncRead for Throttled {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.stopped.load(Ordering::Relaxed) {
            // Never woken: this reader is gone for good.
            return Poll::Pending;
        }
        if this.fast.load(Ordering::Relaxed) {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if this.next.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let mut bytes = vec![0; this.chunk.min(buf.remaining())];
        let mut limited = ReadBuf::new(&mut bytes);
        match Pin::new(&mut this.inner).poll_read(cx, &mut limited) {
            Poll::Ready(Ok(())) => {
                buf.put_slice(limited.filled());
                let next = tokio::time::Instant::now() + this.pause;
                this.next.as_mut().reset(next);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for Throttled {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The write timeout of both tests. A reader's TCP takes bytes only when its window reopens,
/// i.e. after it has read about half its receive buffer: 16 KiB at 40 KiB/s, every ~0.5 s (at
/// 16 KiB/s it was every ~1.5 s, which no 1 s timeout can tell from a stall).
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How the slow reader reads: 4 KiB every 100 ms, 40 KiB/s.
const CHUNK: usize = 4 * 1024;
const PAUSE: Duration = Duration::from_millis(100);
/// Messages of 60 KB: a write batch of them takes many write timeouts to reach this reader.
const PAD_BYTES: usize = 60_000;

/// A server with `WRITE_TIMEOUT`, and a client with a small receive buffer (so the server's
/// writes wait on its pace) joined to room `slow`, reading at [`Throttled`]'s pace from now on.
async fn slow_reader(
    fast: &Arc<AtomicBool>,
    stopped: &Arc<AtomicBool>,
) -> (TestServer, tokio_tungstenite::WebSocketStream<Throttled>) {
    let server = TestServer::start(
        ServerOptions::new(StoreKind::Sqlite)
            .env("SEQCAST_SEND_RATE", "0")
            .write_timeout(format!("{}s", WRITE_TIMEOUT.as_secs())),
    )
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let throttled = Throttled {
        inner: stream,
        fast: Arc::clone(fast),
        stopped: Arc::clone(stopped),
        chunk: CHUNK,
        pause: PAUSE,
        next: Box::pin(tokio::time::sleep(Duration::ZERO)),
    };
    let (mut slow, _) = tokio_tungstenite::client_async(server.ws_url(), throttled)
        .await
        .unwrap();
    slow.send(Message::text(r#"{"type":"join","room":"slow"}"#))
        .await
        .unwrap();
    loop {
        let frame = slow.next().await.unwrap().unwrap();
        let frame: Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
        if frame["type"] == "joined" {
            break;
        }
    }
    (server, slow)
}

/// Sends `total` messages of [`PAD_BYTES`] to room `slow` in the background.
async fn send_large(server: &TestServer, total: usize) -> tokio::task::JoinHandle<()> {
    let mut sender = WsClient::connect(server).await;
    tokio::spawn(async move {
        let pad = "x".repeat(PAD_BYTES);
        sender
            .send_pipelined(
                "slow",
                total,
                16,
                Duration::from_secs(60),
                |i| json!({ "i": i, "pad": pad }),
            )
            .await;
    })
}

/// Fails on a server whose sockets buffer up to 4 MiB unsent: it took 3.6 MB at once, then
/// accepted nothing while the reader drained a third of that, and cut it off after 60 messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_reader_is_not_cut_off() {
    // 150 messages of 60 KB: 9 MB, far more than the kernel buffers between server and client.
    const TOTAL: usize = 150;
    // After SLOW_PHASE at 40 KiB/s the reader reads at full speed, to get the rest in reasonable
    // time.
    const SLOW_PHASE: Duration = Duration::from_secs(10);
    let fast = Arc::new(AtomicBool::new(false));
    let stopped = Arc::new(AtomicBool::new(false));
    let (server, mut slow) = slow_reader(&fast, &stopped).await;

    // Reading from the start: a reader that pauses while the sender sends is rightly cut off.
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        let mut seqs = Vec::with_capacity(TOTAL);
        while seqs.len() < TOTAL {
            if started.elapsed() > SLOW_PHASE {
                fast.store(true, Ordering::Relaxed);
            }
            match slow.next().await {
                Some(Ok(Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    if frame["type"] == "message" {
                        seqs.push(frame["seq"].as_u64().unwrap());
                    }
                }
                Some(Ok(Message::Close(close))) => {
                    panic!("closed after {} messages: {close:?}", seqs.len())
                }
                Some(Ok(_)) => {}
                other => panic!("connection ended after {} messages: {other:?}", seqs.len()),
            }
        }
        seqs
    });

    send_large(&server, TOTAL)
        .await
        .await
        .expect("the sender's task");
    let seqs = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .expect("the slow reader gets every message within 120 s")
        .expect("the slow reader's task");
    let took = started.elapsed();
    eprintln!("the slow reader read {TOTAL} messages in {took:?}");
    assert!(
        took > SLOW_PHASE && SLOW_PHASE > 4 * WRITE_TIMEOUT,
        "the reader was not slow enough to test anything: {took:?}"
    );
    assert_contiguous(&seqs, 1, TOTAL as u64, "the slow reader");
    let metrics = Http::new(&server).metrics().await;
    assert_eq!(
        metric_value(&metrics, "seqcast_sessions_closed_slow_total").unwrap_or(0.0),
        0.0,
        "a reader that keeps reading is not cut off"
    );
}

/// The other side of the rule: a reader that was keeping up and then reads nothing more is
/// closed as a slow consumer about one write timeout after its buffers filled, not kept open by
/// what it read before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_is_closed_with_4008() {
    const TOTAL: usize = 150;
    const READING: Duration = Duration::from_secs(3);
    let fast = Arc::new(AtomicBool::new(false));
    let stopped = Arc::new(AtomicBool::new(false));
    let (server, mut slow) = slow_reader(&fast, &stopped).await;
    let sending = send_large(&server, TOTAL).await;

    let started = Instant::now();
    let mut read = 0;
    while started.elapsed() < READING {
        match tokio::time::timeout(Duration::from_millis(200), slow.next()).await {
            Err(_) => {}
            Ok(Some(Ok(Message::Text(_)))) => read += 1,
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("the connection ended while it was read: {other:?}"),
        }
    }
    let http = Http::new(&server);
    let metrics = http.metrics().await;
    assert_eq!(
        metric_value(&metrics, "seqcast_sessions_closed_slow_total").unwrap_or(0.0),
        0.0,
        "cut off while it was reading ({read} frames read)"
    );
    stopped.store(true, Ordering::Relaxed);
    let stop = Instant::now();
    // Its receive buffer and the server's unsent bytes fill at once; the timeout runs from there.
    eventually(
        3 * WRITE_TIMEOUT,
        "seqcast_sessions_closed_slow_total >= 1",
        || async {
            let metrics = http.metrics().await;
            metric_value(&metrics, "seqcast_sessions_closed_slow_total").unwrap_or(0.0) >= 1.0
        },
    )
    .await;
    let took = stop.elapsed();
    eprintln!("the stopped reader was closed {took:?} after it stopped reading");
    // The timeout counts from the last bytes the server's socket accepted, which can precede
    // the stop by one of the reader's receive-window steps (~0.5 s at its pace): 1 s of slack.
    assert!(
        took + Duration::from_secs(1) >= WRITE_TIMEOUT,
        "closed before a whole write timeout passed without progress: {took:?}"
    );
    sending.abort();
}

/// The history page both HTTP clients ask for: 100 messages of [`PAD_BYTES`], about 6 MB.
const PAGE: &str = "/v1/rooms/slow/messages?after=0&limit=1000";

/// Sends `GET path` on `stream` and reads the response head; returns its Content-Length and how
/// many bytes of the body came with the head.
async fn get_head(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    path: &str,
) -> (usize, usize) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: seqcast\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    let end = loop {
        if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the head was cut short");
        got.extend_from_slice(&buf[..n]);
    };
    let head = std::str::from_utf8(&got[..end]).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().unwrap())
        })
        .expect("a Content-Length");
    (length, got.len() - end)
}

/// Reads `stream` until it ends (or fails: a reset is an end too), within `deadline`; returns
/// the bytes read.
async fn read_to_end(stream: &mut (impl AsyncRead + Unpin), deadline: Duration) -> usize {
    let mut buf = vec![0; 64 * 1024];
    let mut total = 0;
    let until = Instant::now() + deadline;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => panic!("still open after {deadline:?} ({total} bytes read)"),
            Ok(Ok(0) | Err(_)) => return total,
            Ok(Ok(n)) => total += n,
        }
    }
}

/// A backend paging a large room's history over a slow link gets the whole page, however long it
/// takes, while it keeps reading; a client that asks for pages and reads none of them is closed
/// about one write timeout after its socket stopped taking bytes, which frees the page the node
/// was holding for it. Fails on a server without the HTTP write deadline: the second connection
/// stays open (and holds the page) for as long as the client likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_response_read_slowly_arrives_and_one_never_read_is_dropped() {
    const TOTAL: usize = 100;
    let server = TestServer::start(
        ServerOptions::new(StoreKind::Sqlite)
            .env("SEQCAST_SEND_RATE", "0")
            .write_timeout(format!("{}s", WRITE_TIMEOUT.as_secs())),
    )
    .await;
    send_large(&server, TOTAL)
        .await
        .await
        .expect("the sender's task");
    let http = Http::new(&server);
    let timeouts = || async {
        let metrics = http.metrics().await;
        metric_value(&metrics, "seqcast_http_write_timeouts_total").unwrap_or(0.0)
    };

    // Slow but steady: 64 KiB every 100 ms, about 10 s for the page, five write timeouts.
    let mut slow = Throttled {
        inner: TcpStream::connect(server.addr).await.unwrap(),
        fast: Arc::new(AtomicBool::new(false)),
        stopped: Arc::new(AtomicBool::new(false)),
        chunk: 64 * 1024,
        pause: PAUSE,
        next: Box::pin(tokio::time::sleep(Duration::ZERO)),
    };
    let started = Instant::now();
    let (length, mut read) = get_head(&mut slow, PAGE).await;
    assert!(length > TOTAL * PAD_BYTES, "the page holds every message");
    let mut buf = vec![0; 64 * 1024];
    while read < length {
        let n = tokio::time::timeout(Duration::from_secs(60), slow.read(&mut buf))
            .await
            .expect("the page keeps coming")
            .unwrap();
        assert!(n > 0, "closed after {read} of {length} bytes");
        read += n;
    }
    let took = started.elapsed();
    eprintln!("the slow HTTP reader read {length} bytes in {took:?}");
    assert!(
        took > 3 * WRITE_TIMEOUT,
        "the reader was not slow enough to test anything: {took:?}"
    );
    assert_eq!(
        timeouts().await,
        0.0,
        "a reader that keeps reading is not cut off"
    );

    // Never read: a small receive buffer, so the page stays on the server's side.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut idle = socket.connect(server.addr).await.unwrap();
    idle.write_all(format!("GET {PAGE} HTTP/1.1\r\nHost: seqcast\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let asked = Instant::now();
    eventually(
        3 * WRITE_TIMEOUT,
        "seqcast_http_write_timeouts_total >= 1",
        || async { timeouts().await >= 1.0 },
    )
    .await;
    let took = asked.elapsed();
    eprintln!("the HTTP connection that read nothing was closed {took:?} after its request");
    assert!(
        took >= WRITE_TIMEOUT,
        "closed before a write timeout passed: {took:?}"
    );
    // What the kernel already held still arrives, then the end: never the whole page.
    let got = read_to_end(&mut idle, Duration::from_secs(30)).await;
    assert!(
        got < length,
        "{got} bytes: the whole page went out after all"
    );
}
