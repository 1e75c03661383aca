//! The garbage flood: 2,000 connections of four kinds (silent TCP, junk bytes, idle and
//! flooding WebSockets), on a thread and runtime of its own, each reopened a bounded number of
//! times.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

/// Connection attempts in flight at once (the listen backlog is finite).
const CONNECT_CONCURRENCY: usize = 200;
/// Times a garbage connection is reopened after it ends.
const MAX_RECONNECTS: usize = 5;
/// Bytes a junk connection writes before it waits for the server to hang up.
const JUNK_BYTES_PER_CONNECTION: usize = 64 * 1024;
/// Frames a garbage WebSocket connection sends at most.
const FRAMES_PER_CONNECTION: u64 = 100_000;
/// Larger than the default frame limit (2 x 64 KiB).
const OVERSIZE_FRAME_BYTES: usize = 200 * 1024;
/// The flood ends by itself this long after it started, whatever happens to the test.
const FLOOD_HARD_DEADLINE: Duration = Duration::from_secs(120);
/// How long the connection wave may take.
const CONNECT_WAVE_DEADLINE: Duration = Duration::from_secs(60);
/// Garbage frames sent before the loaded measurement starts: the flood is in full swing.
const FRAMES_BEFORE_MEASURING: u64 = 20_000;

/// A garbage flood against one address, on a thread and runtime of its own (one worker, so the
/// attacker has one of the machine's two cores). Stopped when dropped, whatever happens.
pub struct Flood {
    stop: CancellationToken,
    pub stats: Arc<Stats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flood {
    pub fn start(addr: SocketAddr, garbage: usize) -> Flood {
        let stop = CancellationToken::new();
        let stats = Arc::new(Stats::default());
        let thread = {
            let (stop, stats) = (stop.clone(), stats.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(flood(addr, garbage, stop, stats));
            })
        };
        Flood {
            stop,
            stats,
            thread: Some(thread),
        }
    }

    fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    pub fn alive(&self, what: &str) {
        assert!(!self.finished(), "the flood ended early, during {what}");
    }

    /// Waits until every garbage connection was tried once and the frames flow.
    pub async fn in_full_swing(&self, garbage: usize) {
        let stats = &self.stats;
        let progress = || stats.summary();
        wait_for(
            CONNECT_WAVE_DEADLINE,
            "the garbage connection wave",
            progress,
            || self.finished() || stats.first_attempts.load(Ordering::Relaxed) >= garbage,
        )
        .await;
        self.alive("the connection wave");
        wait_for(
            Duration::from_secs(60),
            "the garbage frames to flow",
            progress,
            || {
                self.finished()
                    || stats.ws_frames.load(Ordering::Relaxed) >= FRAMES_BEFORE_MEASURING
            },
        )
        .await;
        self.alive("the garbage frames");
    }

    /// Stops the flood and waits (with a deadline) for its thread.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let thread = self.thread.take().unwrap();
        let joined = tokio::task::spawn_blocking(move || thread.join());
        tokio::time::timeout(Duration::from_secs(30), joined)
            .await
            .expect("the flood thread stops within 30 s of the stop signal")
            .unwrap()
            .expect("the flood thread panicked");
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Polls `condition` every 20 ms until it holds; panics after `deadline`, showing `progress`.
async fn wait_for(
    deadline: Duration,
    what: &str,
    progress: impl Fn() -> String,
    condition: impl Fn() -> bool,
) {
    let until = Instant::now() + deadline;
    while !condition() {
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}: {}",
            progress()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the flood did, shared with the test thread.
#[derive(Default)]
pub struct Stats {
    /// Slots whose first connection attempt has finished (either way).
    pub first_attempts: AtomicUsize,
    /// Connections (TCP or WebSocket) established, reconnections included.
    pub connected: AtomicUsize,
    /// Connections open right now.
    pub open: AtomicUsize,
    pub ws_frames: AtomicU64,
    pub junk_bytes: AtomicU64,
    /// Frames read from the server on garbage WebSocket connections.
    pub replies: AtomicU64,
    /// Refused upgrades and failed connects, by HTTP status or error kind.
    pub refused: Mutex<BTreeMap<String, usize>>,
    /// How connections ended, by close code or kind.
    pub closes: Mutex<BTreeMap<String, usize>>,
    /// Slots whose first attempt connected, by kind.
    pub first_connected: Mutex<BTreeMap<String, usize>>,
}

impl Stats {
    fn count(map: &Mutex<BTreeMap<String, usize>>, key: String) {
        *map.lock().unwrap().entry(key).or_default() += 1;
    }
    /// Progress so far, for a timeout's message.
    fn summary(&self) -> String {
        format!(
            "{} first attempts done, {} open, {} connected in all, {} frames sent, refused {:?}, \
             closes {:?}",
            self.first_attempts.load(Ordering::Relaxed),
            self.open.load(Ordering::Relaxed),
            self.connected.load(Ordering::Relaxed),
            self.ws_frames.load(Ordering::Relaxed),
            self.refused.lock().unwrap(),
            self.closes.lock().unwrap(),
        )
    }
    /// Slots whose first attempt connected.
    pub fn first_connected(&self) -> usize {
        self.first_connected.lock().unwrap().values().sum()
    }
}

/// Counts a connection as open for as long as it lives.
struct OpenGuard<'a>(&'a Stats);

impl<'a> OpenGuard<'a> {
    fn new(stats: &'a Stats) -> Self {
        stats.connected.fetch_add(1, Ordering::Relaxed);
        stats.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(stats)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// TCP, never a byte.
    Silent,
    /// TCP, junk bytes.
    Junk,
    /// A WebSocket that is upgraded, then says nothing (it answers pings, as clients do).
    IdleWebSocket,
    /// A WebSocket that floods garbage frames. `oversize`: frames over the limit among them;
    /// `reads`: drains the server's replies.
    Flooder { oversize: bool, reads: bool },
}

/// 40% silent, 30% junk, 20% idle WebSockets, 10% flooders (the attacker's one core is spread
/// over them: the fewer they are, the faster each sends).
fn kind_of(slot: usize) -> Kind {
    match slot % 20 {
        0..=7 => Kind::Silent,
        8..=13 => Kind::Junk,
        14..=17 => Kind::IdleWebSocket,
        _ => Kind::Flooder {
            oversize: slot % 80 == 18,
            reads: slot % 40 != 19,
        },
    }
}

impl Kind {
    /// Times a connection of this kind is reopened after it ends: junk is answered and closed
    /// at once, so it comes back more often to keep up the pressure.
    fn reconnects(self) -> usize {
        match self {
            Kind::Junk => 4 * MAX_RECONNECTS,
            _ => MAX_RECONNECTS,
        }
    }
}

async fn flood(addr: SocketAddr, slots: usize, stop: CancellationToken, stats: Arc<Stats>) {
    let hard_stop = stop.clone();
    let deadline = tokio::spawn(async move {
        tokio::time::sleep(FLOOD_HARD_DEADLINE).await;
        hard_stop.cancel();
    });
    let connecting = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    // The garbage starts once every slot has made its first attempt: senders on this runtime
    // would otherwise starve its own handshakes.
    let go = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for slot in 0..slots {
        let (stop, stats, connecting, go) =
            (stop.clone(), stats.clone(), connecting.clone(), go.clone());
        tasks.spawn(async move {
            let kind = kind_of(slot);
            let mut rng = Rng((slot as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            for attempt in 0..=kind.reconnects() {
                if stop.is_cancelled() {
                    break;
                }
                let connected = tokio::select! {
                    _ = stop.cancelled() => break,
                    connected = async {
                        let _permit = connecting.acquire().await.unwrap();
                        connect(addr, kind, &stats).await
                    } => connected,
                };
                if attempt == 0 && stats.first_attempts.fetch_add(1, Ordering::Relaxed) + 1 == slots
                {
                    go.cancel();
                }
                let Some(conn) = connected else { continue };
                if attempt == 0 {
                    Stats::count(&stats.first_connected, format!("{kind:?}"));
                }
                let _open = OpenGuard::new(&stats);
                let ended = tokio::select! {
                    _ = stop.cancelled() => break,
                    ended = async {
                        go.cancelled().await;
                        conn.run(kind, &stats, &mut rng).await
                    } => ended,
                };
                Stats::count(&stats.closes, ended);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            if e.is_panic() {
                stop.cancel();
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
    deadline.abort();
}

/// An established garbage connection.
enum Conn {
    Tcp(TcpStream),
    Ws(Box<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>>),
}

async fn connect(addr: SocketAddr, kind: Kind, stats: &Stats) -> Option<Conn> {
    let attempt = async {
        match kind {
            Kind::Silent | Kind::Junk => TcpStream::connect(addr)
                .await
                .map(Conn::Tcp)
                .map_err(|e| format!("connect: {:?}", e.kind())),
            Kind::IdleWebSocket | Kind::Flooder { .. } => {
                let mut config = WebSocketConfig::default();
                config.max_message_size = Some(64 << 20);
                config.max_frame_size = Some(64 << 20);
                let url = format!("ws://{addr}/v1/ws");
                match tokio_tungstenite::connect_async_with_config(url, Some(config), true).await {
                    Ok((ws, _)) => Ok(Conn::Ws(Box::new(ws))),
                    Err(tungstenite::Error::Http(response)) => {
                        Err(format!("HTTP {}", response.status().as_u16()))
                    }
                    Err(e) => Err(format!("upgrade: {e}")),
                }
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(conn)) => Some(conn),
        Ok(Err(why)) => {
            Stats::count(&stats.refused, why);
            None
        }
        Err(_) => {
            Stats::count(&stats.refused, "connect timed out".into());
            None
        }
    }
}

impl Conn {
    /// Does the garbage until the server ends the connection; says how it ended.
    async fn run(self, kind: Kind, stats: &Stats, rng: &mut Rng) -> String {
        match (self, kind) {
            (Conn::Tcp(stream), Kind::Silent) => silent(stream).await,
            (Conn::Tcp(stream), _) => junk(stream, stats, rng).await,
            (Conn::Ws(ws), Kind::Flooder { oversize, reads }) => {
                garbage_frames(*ws, oversize, reads, stats, rng).await
            }
            (Conn::Ws(ws), _) => idle_websocket(*ws, stats).await,
        }
    }
}

/// Connects and says nothing; returns when the server hangs up.
async fn silent(mut stream: TcpStream) -> String {
    let mut buf = [0_u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return "silent: closed by server".into(),
            Ok(_) => continue, // e.g. a 408
            Err(e) => return format!("silent: {:?}", e.kind()),
        }
    }
}

/// Writes junk (of one of three shapes) until the server hangs up or the byte budget is spent,
/// then waits for the server to hang up.
async fn junk(stream: TcpStream, stats: &Stats, rng: &mut Rng) -> String {
    let (mut read, mut write) = stream.into_split();
    let shape = rng.below(3);
    let prefix: &[u8] = match shape {
        0 => b"",
        1 => b"GET /v1/ws HTTP/1.1\r\nhost: x\r\n",
        _ => b"GET /v1/ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
    };
    let writer = async {
        write.write_all(prefix).await?;
        let mut written = prefix.len();
        let mut chunk = vec![0_u8; 4096];
        while written < JUNK_BYTES_PER_CONNECTION {
            match shape {
                0 => rng.fill(&mut chunk),
                // An endless header section.
                _ => {
                    for (i, b) in chunk.iter_mut().enumerate() {
                        *b = if i % 64 == 63 {
                            b'\n'
                        } else {
                            b"x-junk: abcdef"[i % 14]
                        };
                    }
                }
            }
            write.write_all(&chunk).await?;
            stats
                .junk_bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            written += chunk.len();
        }
        std::io::Result::Ok(())
    };
    let reader = async {
        let mut buf = [0_u8; 4096];
        let mut status = None;
        loop {
            match read.read(&mut buf).await {
                Ok(0) => return status.unwrap_or_else(|| "junk: closed by server".into()),
                Ok(n) => {
                    if status.is_none() {
                        let head = String::from_utf8_lossy(&buf[..n.min(12)]).into_owned();
                        status = Some(format!("junk: answered {head:?}"));
                    }
                }
                Err(e) => return format!("junk: {:?}", e.kind()),
            }
        }
    };
    tokio::pin!(reader);
    tokio::select! {
        ended = &mut reader => ended,
        written = writer => match written {
            // Budget spent: the server has to hang up (or the stop signal ends this).
            Ok(()) => reader.await,
            Err(e) => format!("junk: write {:?}", e.kind()),
        },
    }
}

/// Says nothing; reads (so pings are answered) until the server ends the connection.
async fn idle_websocket(
    mut ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    stats: &Stats,
) -> String {
    while let Some(next) = ws.next().await {
        match next {
            Ok(Message::Close(frame)) => {
                return match frame {
                    Some(f) => format!("idle ws: close {}", u16::from(f.code)),
                    None => "idle ws: close without code".into(),
                }
            }
            Ok(_) => {
                stats.replies.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => return format!("idle ws: read error {}", error_kind(&e)),
        }
    }
    "idle ws: ended".into()
}

/// Sends garbage frames as fast as the connection takes them; drains the server's frames when
/// `reads`. Returns how the connection ended.
async fn garbage_frames(
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    oversize: bool,
    reads: bool,
    stats: &Stats,
    rng: &mut Rng,
) -> String {
    let (mut sink, mut stream) = ws.split();
    let reader = async {
        while let Some(next) = stream.next().await {
            match next {
                Ok(Message::Close(frame)) => {
                    return match frame {
                        Some(f) => format!("ws: close {}", u16::from(f.code)),
                        None => "ws: close without code".into(),
                    }
                }
                Ok(_) => {
                    stats.replies.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return format!("ws: read error {}", error_kind(&e)),
            }
        }
        "ws: ended".into()
    };
    let writer = async {
        for n in 0..FRAMES_PER_CONNECTION {
            let frame = garbage_frame(n, oversize, rng);
            if let Err(e) = sink.feed(frame).await {
                return format!("ws: write error {}", error_kind(&e));
            }
            stats.ws_frames.fetch_add(1, Ordering::Relaxed);
            if n % 16 == 15 {
                if let Err(e) = sink.flush().await {
                    return format!("ws: write error {}", error_kind(&e));
                }
                // Let the other garbage connections (and reconnects) of this runtime have a go.
                tokio::task::yield_now().await;
            }
        }
        "ws: frame budget spent".into()
    };
    if reads {
        tokio::select! {
            ended = reader => ended,
            ended = writer => ended,
        }
    } else {
        writer.await
    }
}

fn error_kind(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Io(io) => format!("{:?}", io.kind()),
        tungstenite::Error::Protocol(p) => format!("protocol ({p})"),
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => "closed".into(),
        other => other.to_string(),
    }
}

/// The `n`-th garbage frame of a connection.
fn garbage_frame(n: u64, oversize: bool, rng: &mut Rng) -> Message {
    if oversize && n % 64 == 63 {
        return Message::text("x".repeat(OVERSIZE_FRAME_BYTES));
    }
    match n % 16 {
        0 => Message::text("not json at all"),
        1 => Message::text("{"),
        2 => Message::text(r#"{"type":"dance","ref":1}"#),
        3 => Message::text(r#"{"type":"send","room":"bad room!","body":1,"ref":"x"}"#),
        4 => Message::text(r#"{"type":"join","room":""}"#),
        5 => Message::text("[1,2,3]"),
        6 => Message::text(r#"{"type":"leave","room":"never-joined","ref":6}"#),
        7 => Message::text(format!("{}{}", "[".repeat(200), "]".repeat(200))),
        8 => {
            let mut bytes = vec![0_u8; 64];
            rng.fill(&mut bytes);
            Message::binary(bytes)
        }
        9 => Message::Ping(b"garbage".to_vec().into()),
        10 => {
            let mut bytes = vec![0_u8; 64];
            rng.fill(&mut bytes);
            Message::text(String::from_utf8_lossy(&bytes).into_owned())
        }
        11 if n % 256 == 11 => {
            // A body over the 64 KiB limit in a frame under the frame limit: `too_large`.
            Message::text(
                json!({"type": "send", "room": "flood-junk", "body": "b".repeat(70_000)})
                    .to_string(),
            )
        }
        12 => Message::text(r#"{"type":"send","room":"flood-junk","ref":{"a":1}}"#),
        13 => Message::text(r#"{"type":"join","room":"flood-junk","since":-5}"#),
        _ => Message::text(r#"{"type":null}"#),
    }
}

/// xorshift64*: cheap, deterministic per slot.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, bytes: &mut [u8]) {
        for chunk in bytes.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}
