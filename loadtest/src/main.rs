//! `loadtest`: a load generator for seqcast, speaking `shared/protocol.md` to any list of nodes.
//!
//! Layout:
//! - [`cli`]: the subcommands (one per scenario) and shared options;
//! - [`client`]: tokens, WebSocket connections, the frames sent and read, the HTTP head query;
//! - [`publisher`] and [`subscriber`]: the two kinds of connection the message scenarios run
//!   (publishers are the client library, `clients/rust`; [`raw_publisher`] sends keyless frames
//!   for `--no-idem`);
//! - [`verify`]: the per-subscriber seq check (lost, duplicate, out of order);
//! - [`stats`]: latency histograms, CPU and memory readings from `/proc`;
//! - [`scenarios`]: `fanout`, `throughput`, `connections`, `catchup`;
//! - [`report`]: the table and the JSON line.
//!
//! Every run is bounded: it has a hard deadline derived from its options, and every network wait
//! has a timeout. The exit status is 0 for a clean run, 1 when anything was lost, duplicated,
//! reordered or failed, 2 when the scenario could not run at all (or passed its deadline).

mod cli;
mod client;
mod pacing;
mod publisher;
mod raw_publisher;
mod report;
mod scenarios;
mod stats;
mod subscriber;
mod verify;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use cli::{Cli, Scenario};
use report::Report;
use scenarios::Ctx;

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("loadtest: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let deadline = hard_deadline(&cli);
    let name = scenario_name(&cli.scenario);
    let outcome = runtime.block_on(async {
        tokio::time::timeout(deadline, run(&cli))
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "the run passed its hard deadline of {deadline:?}"
                ))
            })
    });
    // Holders and subscribers still blocked on a dead server must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    let (mut report, status) = match outcome {
        Ok(report) => {
            let status = if report.clean() { 0 } else { 1 };
            (report, status)
        }
        Err(e) => {
            let mut report = Report::new(name, serde_json::Value::Null);
            report.error(format!("{e:#}"));
            (report, 2)
        }
    };
    report.label = cli.common.label.clone();
    print!("{}", report.table());
    println!("{}", report.json_line());
    ExitCode::from(status)
}

async fn run(cli: &Cli) -> anyhow::Result<Report> {
    let ctx = Ctx::new(&cli.common).await?;
    match &cli.scenario {
        Scenario::Fanout(args) => scenarios::fanout::run(&ctx, args).await,
        Scenario::Throughput(args) => scenarios::throughput::run(&ctx, args).await,
        Scenario::Connections(args) => scenarios::connections::run(&ctx, args).await,
        Scenario::Catchup(args) => scenarios::catchup::run(&ctx, args).await,
    }
}

fn scenario_name(scenario: &Scenario) -> &'static str {
    match scenario {
        Scenario::Fanout(_) => "fanout",
        Scenario::Throughput(_) => "throughput",
        Scenario::Connections(_) => "connections",
        Scenario::Catchup(_) => "catchup",
    }
}

/// The longest a run may take: its measured phase, the drain, a few I/O timeouts, and the setup
/// of its connections at no less than 500 per second.
fn hard_deadline(cli: &Cli) -> Duration {
    let common = &cli.common;
    let connections = match &cli.scenario {
        Scenario::Fanout(a) => a.rooms * a.subscribers + a.publishers,
        Scenario::Throughput(a) => a.rooms * a.subscribers + a.publishers,
        Scenario::Connections(a) => a.connections,
        Scenario::Catchup(a) => a.publishers + 1,
    };
    let setup = Duration::from_secs_f64(connections as f64 / 500.0);
    let measured = match &cli.scenario {
        Scenario::Catchup(a) => a.fill_timeout,
        _ => common.duration,
    };
    measured + setup + 2 * common.drain_timeout + 4 * common.io_timeout + Duration::from_secs(30)
}

/// Raises this process's open-file limit to its hard limit: one descriptor per connection. The
/// workspace forbids `unsafe`, so `prlimit(1)` does it (as the server's flood test does).
fn raise_open_file_limit() {
    let status = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg("--nofile=unlimited:unlimited")
        .stderr(std::process::Stdio::null())
        .status();
    // `unlimited` is refused above the hard limit for non-root: fall back to the hard limit.
    if !status.is_ok_and(|s| s.success()) {
        let hard = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| {
                let line = limits
                    .lines()
                    .find(|l| l.starts_with("Max open files"))?
                    .to_owned();
                line.split_whitespace().nth(4).map(str::to_owned)
            });
        if let Some(hard) = hard {
            let raised = std::process::Command::new("prlimit")
                .arg("--pid")
                .arg(std::process::id().to_string())
                .arg(format!("--nofile={hard}:{hard}"))
                .status();
            if !raised.is_ok_and(|s| s.success()) {
                eprintln!("loadtest: cannot raise the open-file limit; many connections may fail");
            }
        }
    }
}
