//! The client's settings, each with the default of the JavaScript client (clients/js).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// The future a token callback returns: the token, or why there is none.
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// Where tokens come from.
#[derive(Clone)]
pub enum TokenSource {
    /// Development mode without a name: no `auth` frame is sent.
    None,
    /// One token for the client's life (a JWT, the server key, `dev:NAME`). A close 1008 ends the
    /// client: a fixed token cannot get better.
    Fixed(String),
    /// Called on every (re)connect and again before the token expires.
    Callback(Arc<dyn Fn() -> TokenFuture + Send + Sync>),
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token itself: it would end up in logs.
        match self {
            TokenSource::None => f.write_str("None"),
            TokenSource::Fixed(_) => f.write_str("Fixed(..)"),
            TokenSource::Callback(_) => f.write_str("Callback(..)"),
        }
    }
}

/// Exponential backoff with full jitter: `random(0, min(cap, base * 2^attempt))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// A random delay for `attempt` (0 for the first).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(2u32.saturating_pow(attempt.min(31)))
            .min(self.cap);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// Settings of a [`crate::Client`]. `Options::new(url)` has the defaults below; the builder
/// methods change one each.
#[derive(Debug, Clone)]
pub struct Options {
    /// `ws://host/v1/ws` (or `wss://`). Never put a token in it.
    pub url: String,
    /// Other addresses of the same service (other nodes), tried in turn after `url`: every
    /// connection attempt after a lost or failed one, and after `reconnect()`, goes to the next
    /// address of `[url, fallback_urls..]`, round robin. Empty by default (always `url`).
    pub fallback_urls: Vec<String>,
    /// Base of the HTTP API for `history`; default: derived from `url` (`ws://h/v1/ws` ->
    /// `http://h`).
    pub http_url: Option<String>,
    pub token: TokenSource,
    /// Reconnect delay; default base 500 ms, cap 30 s.
    pub backoff: Backoff,
    /// After a close 1012 (a node draining) reconnect after `random(0, drain_jitter)`; 1 s.
    pub drain_jitter: Duration,
    /// Send a fresh token this long before `exp` (half-way through the token's life when it is
    /// shorter than twice the margin); 60 s.
    pub refresh_margin: Duration,
    /// Application `ping` this often; `None` = never. 20 s.
    pub ping_interval: Option<Duration>,
    /// No `pong` within this: the connection is dead, reconnect. 10 s.
    pub pong_timeout: Duration,
    /// Open and authenticated within this, or retry. 10 s.
    pub connect_timeout: Duration,
    /// Consecutive 1008 closes tolerated (each with a fresh token from the callback) before
    /// giving up; 3.
    pub max_auth_failures: u32,
    /// Delay before resending a send answered `unavailable`, `rate_limited` or `internal`:
    /// `base + random(0, min(cap, base * 2^retries))`; base 500 ms, cap 10 s.
    pub retry_delay: Backoff,
    /// The WebSocket's read buffer, allocated per connection; 128 KiB (tungstenite's default).
    /// A client holding thousands of connections that each receive little can use a few KiB.
    pub read_buffer_size: usize,
}

impl Options {
    pub fn new(url: impl Into<String>) -> Options {
        Options {
            url: url.into(),
            fallback_urls: Vec::new(),
            http_url: None,
            token: TokenSource::None,
            backoff: Backoff {
                base: Duration::from_millis(500),
                cap: Duration::from_secs(30),
            },
            drain_jitter: Duration::from_secs(1),
            refresh_margin: Duration::from_secs(60),
            ping_interval: Some(Duration::from_secs(20)),
            pong_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            max_auth_failures: 3,
            retry_delay: Backoff {
                base: Duration::from_millis(500),
                cap: Duration::from_secs(10),
            },
            read_buffer_size: 128 * 1024,
        }
    }

    /// Adds an address tried after `url` (and the ones added before) when a connection is lost.
    pub fn fallback_url(mut self, url: impl Into<String>) -> Options {
        self.fallback_urls.push(url.into());
        self
    }

    /// A fixed token (JWT, server key, or `dev:NAME` in development mode).
    pub fn token(mut self, token: impl Into<String>) -> Options {
        self.token = TokenSource::Fixed(token.into());
        self
    }

    /// A token callback, called on every connect and before the token expires.
    pub fn token_fn<F, Fut>(mut self, f: F) -> Options
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        self.token = TokenSource::Callback(Arc::new(move || Box::pin(f())));
        self
    }

    pub fn http_url(mut self, url: impl Into<String>) -> Options {
        self.http_url = Some(url.into());
        self
    }

    pub fn backoff(mut self, base: Duration, cap: Duration) -> Options {
        self.backoff = Backoff { base, cap };
        self
    }

    pub fn drain_jitter(mut self, d: Duration) -> Options {
        self.drain_jitter = d;
        self
    }

    pub fn refresh_margin(mut self, d: Duration) -> Options {
        self.refresh_margin = d;
        self
    }

    pub fn ping_interval(mut self, d: Option<Duration>) -> Options {
        self.ping_interval = d;
        self
    }

    pub fn pong_timeout(mut self, d: Duration) -> Options {
        self.pong_timeout = d;
        self
    }

    pub fn connect_timeout(mut self, d: Duration) -> Options {
        self.connect_timeout = d;
        self
    }

    pub fn max_auth_failures(mut self, n: u32) -> Options {
        self.max_auth_failures = n;
        self
    }

    pub fn retry_delay(mut self, base: Duration, cap: Duration) -> Options {
        self.retry_delay = Backoff { base, cap };
        self
    }

    pub fn read_buffer_size(mut self, bytes: usize) -> Options {
        self.read_buffer_size = bytes;
        self
    }

    /// The address of connection attempt `n` (0 for the first): `[url, fallback_urls..]` in turn.
    pub(crate) fn endpoint(&self, n: usize) -> &str {
        match n % (1 + self.fallback_urls.len()) {
            0 => &self.url,
            i => &self.fallback_urls[i - 1],
        }
    }

    /// The HTTP base URL: `http_url`, or `url` with `ws` -> `http` and the path dropped.
    pub(crate) fn http_base(&self) -> String {
        if let Some(url) = &self.http_url {
            return url.trim_end_matches('/').to_owned();
        }
        let (scheme, rest) = match self.url.split_once("://") {
            Some(("wss", rest)) => ("https", rest),
            Some((_, rest)) => ("http", rest),
            None => ("http", self.url.as_str()),
        };
        let host = rest.split('/').next().unwrap_or(rest);
        format!("{scheme}://{host}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_its_ceiling() {
        let b = Backoff {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
        };
        for _ in 0..100 {
            assert!(b.delay(0) <= Duration::from_millis(500));
            assert!(b.delay(3) <= Duration::from_secs(4));
            assert!(b.delay(40) <= Duration::from_secs(30));
        }
    }

    #[test]
    fn endpoints_in_turn() {
        let single = Options::new("ws://a/v1/ws");
        assert_eq!(
            (single.endpoint(0), single.endpoint(3)),
            ("ws://a/v1/ws", "ws://a/v1/ws")
        );
        let opts = Options::new("ws://a/v1/ws")
            .fallback_url("ws://b/v1/ws")
            .fallback_url("ws://c/v1/ws");
        let seen: Vec<&str> = (0..4).map(|n| opts.endpoint(n)).collect();
        assert_eq!(
            seen,
            [
                "ws://a/v1/ws",
                "ws://b/v1/ws",
                "ws://c/v1/ws",
                "ws://a/v1/ws"
            ]
        );
    }

    #[test]
    fn http_base_from_the_websocket_url() {
        assert_eq!(
            Options::new("ws://127.0.0.1:8080/v1/ws").http_base(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            Options::new("wss://chat.example/v1/ws").http_base(),
            "https://chat.example"
        );
        assert_eq!(
            Options::new("ws://x/v1/ws")
                .http_url("http://y/")
                .http_base(),
            "http://y"
        );
    }
}
