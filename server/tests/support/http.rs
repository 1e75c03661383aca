//! An HTTP client for the REST endpoints, a raw HTTP/1.1 POST that sees early answers, and
//! Prometheus text parsing.
#![allow(dead_code)]

use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpStream;

use super::check::{assert_rfc3339, assert_uuid};
use super::server::TestServer;
use super::ws::RECV_DEADLINE;

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub content_type: String,
    pub text: String,
}

impl HttpReply {
    /// The body as JSON; panics (showing the body) if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {:?}",
                self.status, self.text
            )
        })
    }

    /// Asserts the protocol's error shape `{"error": code, "message": ...}` and `status`.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status, status,
            "expected HTTP {status} {code}, got {self:?}"
        );
        let body = self.json();
        assert_eq!(body["error"], code, "error code in {body}");
        assert!(body["message"].is_string(), "error message in {body}");
    }
}

/// An HTTP client for the REST endpoints, with an optional bearer token.
#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
    base: String,
    bearer: Option<String>,
}

impl Http {
    pub fn new(server: &TestServer) -> Http {
        Http::for_base(server.http_url())
    }

    pub fn for_base(base: String) -> Http {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("build reqwest client");
        Http {
            client,
            base,
            bearer: None,
        }
    }

    /// The same client authenticating with `Authorization: Bearer token`.
    pub fn bearer(&self, token: &str) -> Http {
        Http {
            bearer: Some(token.to_owned()),
            ..self.clone()
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> reqwest::Result<HttpReply> {
        let request = match &self.bearer {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response.text().await?;
        Ok(HttpReply {
            status,
            content_type,
            text,
        })
    }

    /// GET `path` (starting with `/`), returning an error only if no answer came.
    pub async fn try_get(&self, path: &str) -> reqwest::Result<HttpReply> {
        self.send(self.client.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn get(&self, path: &str) -> HttpReply {
        self.try_get(path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> HttpReply {
        self.send(self.client.post(format!("{}{path}", self.base)).json(body))
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// POST raw bytes as `application/json`, returning an error only if no answer came (the
    /// server may close early on a large body).
    pub async fn try_post_raw(&self, path: &str, body: Vec<u8>) -> reqwest::Result<HttpReply> {
        self.send(
            self.client
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    /// `GET /v1/rooms/{room}`, asserting 200.
    pub async fn room(&self, room: &str) -> Value {
        let reply = self.get(&format!("/v1/rooms/{room}")).await;
        assert_eq!(reply.status, 200, "GET room {room}: {reply:?}");
        reply.json()
    }

    /// `GET /v1/rooms/{room}/messages?{query}`, asserting 200.
    pub async fn messages(&self, room: &str, query: &str) -> Value {
        let reply = self
            .get(&format!("/v1/rooms/{room}/messages?{query}"))
            .await;
        assert_eq!(reply.status, 200, "GET messages {room}?{query}: {reply:?}");
        reply.json()
    }

    /// `POST /v1/rooms/{room}/messages` with `payload`, asserting 201.
    pub async fn post_message(&self, room: &str, payload: &Value) -> Value {
        let reply = self
            .post_json(&format!("/v1/rooms/{room}/messages"), payload)
            .await;
        assert_eq!(reply.status, 201, "POST to {room} {payload}: {reply:?}");
        let body = reply.json();
        assert_eq!(body["room"], room, "POST answer names the room: {body}");
        assert!(body["seq"].is_u64(), "POST answer seq: {body}");
        assert_uuid(&body["id"], &body);
        assert_rfc3339(&body["ts"], &body);
        body
    }

    /// `GET /metrics` text.
    pub async fn metrics(&self) -> String {
        let reply = self.get("/metrics").await;
        assert_eq!(reply.status, 200, "GET /metrics: {reply:?}");
        reply.text
    }
}

/// POSTs `body_len` bytes of JSON to `path` over a raw HTTP/1.1 connection, writing the body
/// while reading the answer, and returns the answer's status code. Unlike an HTTP client, this
/// sees an early answer (e.g. 413 from a server that stops reading a too large body) even when
/// the server closes the connection before the whole body was sent.
pub async fn raw_post_status(
    server: &TestServer,
    path: &str,
    bearer: Option<&str>,
    body_len: usize,
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let stream = tokio::time::timeout(RECV_DEADLINE, TcpStream::connect(server.addr))
        .await
        .expect("connect within the deadline")
        .expect("connect to the server");
    let (mut read, mut write) = stream.into_split();
    let auth = bearer.map_or(String::new(), |token| {
        format!("authorization: Bearer {token}\r\n")
    });
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n{auth}\
         content-length: {body_len}\r\nconnection: close\r\n\r\n",
        server.addr
    );
    let writer = tokio::spawn(async move {
        write.write_all(head.as_bytes()).await?;
        // {"body":"aaaa...a"} of body_len bytes in total.
        let prefix = b"{\"body\":\"";
        let filler = body_len.saturating_sub(prefix.len() + 2);
        write.write_all(prefix).await?;
        let chunk = vec![b'a'; 64 * 1024];
        let mut left = filler;
        while left > 0 {
            let n = left.min(chunk.len());
            write.write_all(&chunk[..n]).await?;
            left -= n;
        }
        write.write_all(b"\"}").await?;
        write.flush().await
    });
    let mut answer = Vec::new();
    let status_line = tokio::time::timeout(RECV_DEADLINE, async {
        let mut buf = [0_u8; 4096];
        loop {
            if let Some(end) = answer.windows(2).position(|w| w == b"\r\n") {
                return Some(String::from_utf8_lossy(&answer[..end]).into_owned());
            }
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!("no HTTP answer to a {body_len}-byte POST within {RECV_DEADLINE:?}")
    });
    writer.abort();
    let status_line = status_line.unwrap_or_else(|| {
        panic!("the connection closed without an answer to a {body_len}-byte POST")
    });
    status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP status line: {status_line:?}"))
}

/// Sum of the samples of metric `name` (all label sets) in Prometheus text, if it appears.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest
            .rsplit_once('}')
            .map_or(rest, |(_, v)| v)
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(value) = value {
            found = Some(found.unwrap_or(0.0) + value);
        }
    }
    found
}
