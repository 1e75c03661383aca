//! The `seqcast` binary: `seqcast` serves; `seqcast token` mints a token for trying it out.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use seqcast::auth::{self, Claims};
use seqcast::config::{self, Config, LogFormat};
use tracing_subscriber::EnvFilter;

// glibc malloc was about a quarter of a node's CPU under load (perf: _int_malloc,
// malloc_consolidate, unlink_chunk); mimalloc's per-thread free lists are much cheaper for the
// many small, short-lived allocations of frames and futures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "seqcast",
    version,
    about = "WebSocket chat and broadcast server with durable, gap-free per-room sequences"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default). Configuration comes from the environment: see docs/configuration.md.
    Serve,
    /// Print a token signed with SEQCAST_JWT_SECRET.
    Token {
        /// The user id (`sub`), shown as `from` on the user's messages.
        #[arg(long)]
        sub: String,
        /// Comma-separated room patterns the user may join, read and send to (`*` = any run of
        /// characters).
        #[arg(long, default_value = "*")]
        rooms: String,
        /// Comma-separated room patterns the user may join and read but not send to.
        #[arg(long, default_value = "")]
        read: String,
        /// Lifetime of the token, e.g. `30m`, `24h`, `7d`.
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(),
        Command::Token {
            sub,
            rooms,
            read,
            ttl,
        } => token(sub, &rooms, &read, &ttl),
    }
}

fn serve() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    init_tracing(config.log_format);
    config.validate()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("binding {}", config.listen))?;
            let addr = listener.local_addr()?;
            tracing::info!(config = ?config, "starting");
            let shutdown = shutdown_signal()?;
            println!("seqcast listening on http://{addr}");
            if config.dev_mode() {
                println!("development mode (no SEQCAST_JWT_SECRET): anonymous clients, loopback only");
                println!("  WebSocket: ws://{addr}/v1/ws   then send {{\"type\":\"join\",\"room\":\"general\"}}");
                println!("  HTTP:      curl -d '{{\"body\":\"hi\"}}' http://{addr}/v1/rooms/general/messages");
            } else {
                let hint = if config.jwt_secret.is_some() {
                    "   (mint one: seqcast token --sub alice)"
                } else {
                    "   (signed with the key of SEQCAST_JWT_PUBLIC_KEY)"
                };
                println!("  WebSocket: ws://{addr}/v1/ws?token=<JWT>{hint}");
            }
            seqcast::serve(config, listener, shutdown).await
        })
}

/// Resolves on SIGTERM or SIGINT.
/// Installs the SIGTERM and SIGINT handlers now, and returns a future that resolves on either.
/// Installed before the listening line is printed: a supervisor that signals as soon as it sees
/// that line must get a drain, not the default disposition (immediate death).
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

fn token(sub: String, rooms: &str, read: &str, ttl: &str) -> anyhow::Result<()> {
    let secret = std::env::var("SEQCAST_JWT_SECRET")
        .ok()
        .filter(|s| !s.is_empty())
        .context("SEQCAST_JWT_SECRET is not set: tokens are signed with it (and the server checks them with it)")?;
    let ttl: Duration = config::parse_duration(ttl).context("--ttl")?;
    let list = |s: &str| {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect()
    };
    let claims = Claims {
        sub,
        exp: auth::unix_now() + ttl.as_secs(),
        rooms: list(rooms),
        read: list(read),
    };
    // The server refuses tokens without the `aud`/`iss` it is configured to require.
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let (audience, issuer) = (env("SEQCAST_JWT_AUDIENCE"), env("SEQCAST_JWT_ISSUER"));
    let token = auth::mint(&secret, &claims, audience.as_deref(), issuer.as_deref())?;
    println!("{token}");
    Ok(())
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only on a terminal: in a log file or a collector they are noise to grep.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
