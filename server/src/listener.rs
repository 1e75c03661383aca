//! The HTTP server: accepts TCP connections and serves HTTP/1.1 on each with hyper.
//!
//! It does what `axum::serve` does (WebSocket upgrades, the peer address as
//! [`ConnectInfo`], graceful shutdown) plus what it cannot: a deadline on the arrival of every
//! request (`SEQCAST_HANDSHAKE_TIMEOUT`). A connection that has not sent a complete request
//! head in that time is closed, whether it dribbles its headers (slowloris) or sits idle between
//! keep-alive requests: hyper's header read timer starts whenever the connection waits for a
//! request head, the first one or the next one, and only runs with a timer set. A request body
//! must then arrive within the same time from the end of its head, or reading it fails (408
//! `request_timeout`, see [`BodyTimeout`]) and the connection is closed after the response.
//!
//! Every connection's socket records when it last accepted bytes ([`WriteProgress`], handed to
//! the request as an extension): a WebSocket session's write timeout counts from there, so a
//! client that reads slowly but keeps reading is never cut off (`session::outbound`). For that
//! to measure the client and not the kernel, a socket holds at most [`UNSENT_BYTES_LIMIT`] unsent.
//!
//! An HTTP response has the same deadline (`SEQCAST_WRITE_TIMEOUT`): a connection whose socket
//! has refused the response's bytes for that long is closed. Without it, a client that asks for
//! a large history page and never reads it would hold the page in memory (and the connection,
//! and a node's drain) for as long as it liked.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::Router;
use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long accepting pauses after an error such as running out of file descriptors (as
/// `axum::serve` does), so the loop does not spin while connections close.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until `stop` is cancelled, then stops accepting, lets each
/// connection finish its request in flight (idle ones close at once) and returns when all
/// have ended. Upgraded WebSocket connections are no longer HTTP connections: they are not
/// waited for here (the caller drains sessions itself).
///
/// `request_timeout` is `SEQCAST_HANDSHAKE_TIMEOUT` and `write_timeout` `SEQCAST_WRITE_TIMEOUT`;
/// `None` turns that deadline off.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    request_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    stop: CancellationToken,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(request_timeout);
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                tracing::error!(error = %e, "accepting a connection failed; pausing");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        connections.spawn(serve_connection(
            http.clone(),
            stream,
            peer,
            router.clone(),
            request_timeout,
            write_timeout,
            stop.clone(),
        ));
    }
    // Closing the listening socket refuses new connections while the others finish.
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// The most bytes a connection's kernel send buffer holds that the client has not yet been sent
/// (`TCP_NOTSENT_LOWAT`); bytes in flight to it are not counted, so a fast client's throughput
/// is not limited.
///
/// Without it, Linux grows a socket's send buffer to up to 4 MiB (`tcp_wmem`) and takes writes
/// at memory speed until it is full; it then reports the socket writable again only once a third
/// of it has drained. A client reading 16 KiB/s thus took 3.6 MB in under a second, then had
/// its socket accept nothing for 80 s while it kept reading, and was closed as a slow consumer
/// ([`WriteProgress`] measured the kernel buffer, not the client). With the limit, the socket
/// accepts more whenever the client has taken about half of it, so the write timeout measures
/// the client's pace; and a client that reads nothing pins 16 KiB of kernel memory, not 4 MiB.
pub const UNSENT_BYTES_LIMIT: u32 = 16 * 1024;

#[cfg(any(target_os = "linux", target_os = "android"))]
fn limit_unsent(stream: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(UNSENT_BYTES_LIMIT) {
        tracing::debug!(error = %e, "TCP_NOTSENT_LOWAT not set");
    }
}

/// Elsewhere the kernel's own send buffer sizing stands (and with it, a slow reader is judged by
/// how fast the buffer drains a third of itself).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn limit_unsent(_stream: &TcpStream) {}

/// Errors of one incoming connection (it was reset before it was accepted): not the listener's.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

async fn serve_connection(
    http: http1::Builder,
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    request_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    stop: CancellationToken,
) {
    // Chat frames are small and latency matters more than packet count.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
    limit_unsent(&stream);
    let progress = WriteProgress::default();
    let stalled = Stall::default();
    let stream = ProgressIo {
        inner: stream,
        progress: progress.clone(),
        stalled: stalled.clone(),
        unread: None,
    };
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let mut request = request.map(|body| match request_timeout {
            Some(timeout) if !http_body::Body::is_end_stream(&body) => {
                Body::new(DeadlineBody::new(body, timeout))
            }
            _ => Body::new(body),
        });
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(progress.clone());
        // A router is always ready: no `poll_ready` needed before `call`.
        tower_service::Service::call(&mut router.clone(), request)
    });
    let connection = http
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut connection = std::pin::pin!(connection);
    // Once upgraded, the connection future is done and the socket the WebSocket session's: this
    // deadline covers HTTP responses only (the session has its own).
    let result = tokio::select! {
        result = connection.as_mut() => Some(result),
        () = stalled.exceeds(write_timeout) => None,
        () = stop.cancelled() => {
            // Finish the request in flight, if any, then close.
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                result = connection.as_mut() => Some(result),
                () = stalled.exceeds(write_timeout) => None,
            }
        }
    };
    match result {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            // Header timeouts, resets, malformed requests: the client's doing, not the server's.
            tracing::debug!(error = %e, "HTTP connection ended with an error");
        }
        None => {
            metrics::counter!(crate::metrics::HTTP_WRITE_TIMEOUTS).increment(1);
            tracing::debug!(%peer, "HTTP connection closed: the client read no response bytes within SEQCAST_WRITE_TIMEOUT");
        }
    }
}

/// Since when a connection's socket has refused the bytes written to it (its send buffer is
/// full: the client does not read); cleared by the next write that it accepts.
#[derive(Clone, Debug, Default)]
struct Stall(Arc<AtomicInstant>);

impl Stall {
    fn record(&self, written: &Poll<std::io::Result<usize>>) {
        match written {
            Poll::Pending if self.0.get().is_none() => self.0.set_now(),
            Poll::Ready(Ok(n)) if *n > 0 => self.0.clear(),
            _ => {}
        }
    }

    /// Completes once the socket has refused writes for `timeout` without a break; never
    /// without a timeout. Looks once a `timeout` while nothing is stalled, then at the moment
    /// the stall under way would exceed it.
    async fn exceeds(&self, timeout: Option<Duration>) {
        let Some(timeout) = timeout else {
            return std::future::pending().await;
        };
        loop {
            match self.0.get() {
                Some(since) if since.elapsed() >= timeout => return,
                Some(since) => tokio::time::sleep_until(since + timeout).await,
                None => tokio::time::sleep(timeout).await,
            }
        }
    }
}

/// A request body that must be received in full by a deadline; past it, reading it fails.
struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
}

impl DeadlineBody {
    fn new(inner: Incoming, timeout: Duration) -> DeadlineBody {
        DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|result| result.map_err(Into::into)));
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body did not arrive in full within `SEQCAST_HANDSHAKE_TIMEOUT`: the error reading it
/// fails with, so a handler can answer 408 rather than take it for an oversized body.
#[derive(Debug)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive within SEQCAST_HANDSHAKE_TIMEOUT")
    }
}

impl std::error::Error for BodyTimeout {}

impl BodyTimeout {
    /// Whether `error`, or an error it wraps, is a [`BodyTimeout`].
    pub fn caused(error: &(dyn std::error::Error + 'static)) -> bool {
        let mut next = Some(error);
        while let Some(e) = next {
            if e.is::<BodyTimeout>() {
                return true;
            }
            next = e.source();
        }
        false
    }
}

/// When a connection's socket last accepted bytes from the server. Shared by the connection's
/// I/O and whoever writes to it (the WebSocket session after an upgrade).
#[derive(Clone, Debug, Default)]
pub struct WriteProgress(Arc<AtomicInstant>);

impl WriteProgress {
    /// The instant of the last write that accepted at least one byte; `None` before any.
    pub fn last(&self) -> Option<Instant> {
        self.0.get()
    }

    fn mark(&self) {
        self.0.set_now();
    }
}

/// An instant, or none, in one atomic: nanoseconds from a fixed base, 0 meaning none.
#[derive(Debug, Default)]
struct AtomicInstant(AtomicU64);

impl AtomicInstant {
    fn get(&self) -> Option<Instant> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(instant_base() + Duration::from_nanos(nanos)),
        }
    }

    fn set_now(&self) {
        // Saturates after 584 years of uptime; never 0 (0 = none).
        let nanos = u64::try_from(instant_base().elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.store(nanos.max(1), Ordering::Relaxed);
    }

    fn clear(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// The fixed instant [`AtomicInstant`] counts from.
fn instant_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Bytes one socket read takes in when the reader's own buffer is smaller (a WebSocket session's,
/// see [`crate::ws`]). Held only from the read until the reader has taken them all.
pub const READ_CHUNK_BYTES: usize = 4 * 1024;

/// A connection's socket that records every write accepting bytes in its [`WriteProgress`].
///
/// It also lends read buffers: a reader with a small buffer (a WebSocket session's, which every
/// idle connection holds) gets its bytes from a [`READ_CHUNK_BYTES`] chunk that is allocated
/// when the socket is readable and freed once the reader has taken it all, so a connection with
/// nothing to read holds no read buffer, and a pipelining client still costs one read call per
/// chunk rather than one per small buffer.
struct ProgressIo {
    inner: TcpStream,
    progress: WriteProgress,
    stalled: Stall,
    /// Read from the socket, not yet taken by the reader; `None` (no allocation) when empty.
    unread: Option<BytesMut>,
}

impl ProgressIo {
    fn record(&self, written: &Poll<std::io::Result<usize>>) {
        if matches!(written, Poll::Ready(Ok(n)) if *n > 0) {
            self.progress.mark();
        }
        self.stalled.record(written);
    }
}

impl AsyncRead for ProgressIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.unread.is_none() {
            if buf.remaining() >= READ_CHUNK_BYTES {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            // Allocated only once the socket says it has something to read.
            std::task::ready!(this.inner.poll_read_ready(cx))?;
            let mut chunk = BytesMut::with_capacity(READ_CHUNK_BYTES);
            // Pending on a stale readiness: the waker is registered and the chunk dropped.
            let n = std::task::ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut chunk
            ))?;
            if n == 0 {
                // End of stream.
                return Poll::Ready(Ok(()));
            }
            this.unread = Some(chunk);
        }
        if let Some(unread) = &mut this.unread {
            let n = unread.len().min(buf.remaining());
            buf.put_slice(&unread[..n]);
            bytes::Buf::advance(unread, n);
            if unread.is_empty() {
                this.unread = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ProgressIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.record(&written);
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.record(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
