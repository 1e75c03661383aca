//! Command line: one subcommand per scenario, plus the options every scenario shares.
//!
//! Defaults are small enough for a quick look at a local cluster; `scripts/bench.sh` passes the
//! sizes of the standard suite explicitly, so the figures in `docs/benchmarks.md` do not depend
//! on these defaults.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "loadtest",
    about = "Load generator for seqcast: drives a list of nodes, checks every delivered seq, \
             prints a table and one JSON line; exits non-zero on any loss, duplicate, \
             reordering or error"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Options shared by every scenario.
#[derive(Debug, Args)]
pub struct Common {
    /// Base URLs of the nodes, comma-separated (`http://127.0.0.1:8080,http://127.0.0.1:8081`).
    /// Connections are spread over them round-robin.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8080"
    )]
    pub nodes: Vec<String>,
    /// HS256 secret of the nodes: every connection gets its own token (distinct `sub`). Without
    /// it, connections are anonymous (the nodes must be in development mode).
    #[arg(
        long,
        global = true,
        env = "LOADTEST_JWT_SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,
    /// How long publishers send (fanout, throughput) or connections stay idle (connections).
    #[arg(long, global = true, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// After the senders stop, how long subscribers may take to reach the final head before
    /// what they miss counts as lost.
    #[arg(long, global = true, value_parser = parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,
    /// Timeout of every single network wait (connect, join, ack, pong).
    #[arg(long, global = true, value_parser = parse_duration, default_value = "30s")]
    pub io_timeout: Duration,
    /// Process ids of the seqcast nodes: their CPU time over the run, and their RSS
    /// (`connections` reports the RSS per connection from it).
    #[arg(long, global = true, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Other processes whose CPU time over the run is reported, with their children's
    /// (e.g. `postgres=PID` of the postmaster, whose backends are its children), repeatable.
    #[arg(long, global = true, value_parser = parse_watch)]
    pub watch_pid: Vec<(String, u32)>,
    /// A name for this run, copied into the report (e.g. `throughput-100-rooms`).
    #[arg(long, global = true)]
    pub label: Option<String>,
    /// Prefix of the room names; a per-run suffix keeps runs on one database apart.
    #[arg(long, global = true, default_value = "lt")]
    pub room_prefix: String,
    /// Connections opened at once while setting up.
    #[arg(long, global = true, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Send without an `idem` key. By default every send carries one, as real clients' sends
    /// do (the protocol asks for it, so that a resend after a reconnect is never stored
    /// twice); this flag measures the keyless path for comparison.
    #[arg(long, global = true)]
    pub no_idem: bool,
    /// Subscribers (fanout, throughput) are the client library (`clients/rust`: bounded events,
    /// small read buffers) instead of raw frames, to measure what the library costs.
    #[arg(long, global = true)]
    pub library_subscribers: bool,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// R rooms x S subscribers (spread over the nodes), P publishers at a total rate M/s.
    Fanout(Fanout),
    /// P publishers spread over R rooms, each with W sends in flight, as fast as acks allow.
    Throughput(Throughput),
    /// C idle joined connections from several 127.0.0.x source addresses; server RSS per
    /// connection.
    Connections(Connections),
    /// Fill a room with N messages, then time one client's `since=0` replay.
    Catchup(Catchup),
}

#[derive(Debug, Args)]
pub struct Fanout {
    /// Rooms (R).
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Subscribers per room (S), spread over the nodes.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Publishers (P), spread over the nodes; each sends round-robin to its share of the rooms.
    #[arg(long, default_value_t = 2)]
    pub publishers: usize,
    /// Total send rate of all publishers, messages per second (M).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Unacknowledged sends allowed per publisher before it stops to wait.
    #[arg(long, default_value_t = 1000)]
    pub window: usize,
    /// Extra bytes of padding in every body.
    #[arg(long, default_value_t = 0)]
    pub pad: usize,
}

#[derive(Debug, Args)]
pub struct Throughput {
    /// Rooms (1 for the single-room variant).
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Publishers (P), spread over the nodes and the rooms.
    #[arg(long, default_value_t = 100)]
    pub publishers: usize,
    /// Sends in flight per publisher (W).
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Subscribers per room that check delivery (0 = check the acks only).
    #[arg(long, default_value_t = 1)]
    pub subscribers: usize,
    /// Extra bytes of padding in every body.
    #[arg(long, default_value_t = 0)]
    pub pad: usize,
}

#[derive(Debug, Args)]
pub struct Connections {
    /// Connections to open (C), spread over the nodes.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Rooms the connections join (connection i joins room i mod rooms).
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Source addresses 127.0.0.1 .. 127.0.0.N; 0 = enough for about 20,000 connections each
    /// (the ephemeral port range holds about 28,000 ports per source address).
    #[arg(long, default_value_t = 0)]
    pub source_ips: u8,
}

#[derive(Debug, Args)]
pub struct Catchup {
    /// Messages in the room before the replay (N).
    #[arg(long, default_value_t = 10_000)]
    pub messages: u64,
    /// Publishers filling the room.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Sends in flight per filling publisher.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Longest time the filling may take.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub fill_timeout: Duration,
}

/// Parses `NAME=PID`.
fn parse_watch(text: &str) -> Result<(String, u32), String> {
    let (name, pid) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PID, got {text:?}"))?;
    let pid = pid
        .parse()
        .map_err(|_| format!("not a process id in {text:?}"))?;
    Ok((name.to_owned(), pid))
}

/// Parses `500ms`, `10s`, `5m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("not a duration: {text:?} (write e.g. 500ms, 10s, 5m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?} (ms, s or m)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("bad duration {text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("3h").is_err());
    }

    #[test]
    fn watched_processes() {
        assert_eq!(parse_watch("postgres=42"), Ok(("postgres".to_owned(), 42)));
        assert!(parse_watch("postgres").is_err());
        assert!(parse_watch("postgres=x").is_err());
    }
}
