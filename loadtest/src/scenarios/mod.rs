//! The four scenarios and what they share.
//!
//! - [`fanout`] and [`throughput`] are two shapes of one flow, [`publish::run`]: subscribers
//!   join fresh rooms, publishers send for a fixed time (paced, or as fast as acks allow), the
//!   final heads are read, and every subscriber is checked against them.
//! - [`connections`] holds many idle joined connections and weighs the server.
//! - [`catchup`] fills a room, then times one `since=0` replay.
//!
//! Every scenario writes to rooms named after the run (`{prefix}-{run id}-...`), so runs against
//! the same database never see each other's messages and a room's head is exactly what the run
//! committed.

pub mod catchup;
pub mod connections;
pub mod fanout;
pub mod publish;
pub mod throughput;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;

use crate::cli::Common;
use crate::client::{Auth, Http, Node};

/// What every scenario needs: the nodes, credentials and the shared options.
pub struct Ctx {
    pub nodes: Vec<Node>,
    pub auth: Auth,
    pub http: Http,
    pub duration: Duration,
    pub drain_timeout: Duration,
    pub io_timeout: Duration,
    pub server_pids: Vec<u32>,
    /// Further processes whose CPU is reported (`--watch-pid`).
    pub watched: Vec<(String, u32)>,
    pub connect_concurrency: usize,
    /// `{prefix}-{run id}`: the start of every room name of this run.
    pub run_prefix: String,
    /// Whether sends carry an `idem` key (not `--no-idem`).
    pub idem: bool,
    /// `--library-subscribers`: subscribers are the client library, not raw frames.
    pub library_subscribers: bool,
}

impl Ctx {
    pub async fn new(common: &Common) -> Result<Ctx> {
        let mut nodes = Vec::with_capacity(common.nodes.len());
        for url in &common.nodes {
            nodes.push(Node::resolve(url).await?);
        }
        anyhow::ensure!(!nodes.is_empty(), "--nodes lists no node");
        let auth = Auth::new(common.jwt_secret.as_deref());
        let http = Http::new(auth.clone(), common.io_timeout)?;
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        Ok(Ctx {
            nodes,
            auth,
            http,
            duration: common.duration,
            drain_timeout: common.drain_timeout,
            io_timeout: common.io_timeout,
            server_pids: common.server_pid.clone(),
            watched: common.watch_pid.clone(),
            connect_concurrency: common.connect_concurrency.max(1),
            run_prefix: format!("{}-{started}-{}", common.room_prefix, std::process::id()),
            idem: !common.no_idem,
            library_subscribers: common.library_subscribers,
        })
    }

    /// Node for connection number `index`: round-robin.
    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index % self.nodes.len()]
    }

    /// Names of `count` fresh rooms of this run.
    pub fn rooms(&self, kind: &str, count: usize) -> Vec<Arc<str>> {
        (0..count)
            .map(|r| Arc::from(format!("{}-{kind}-{r}", self.run_prefix)))
            .collect()
    }

    pub fn node_urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.http.clone()).collect()
    }
}
