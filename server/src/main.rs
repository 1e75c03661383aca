//! The `seqcast` binary: `seqcast` serves; `seqcast token` mints a token for trying it out;
//! `seqcast migrate` applies the database migrations and exits; `seqcast health` asks a node's
//! `/ready` (a container health check without curl); `seqcast config` prints the effective
//! configuration.
//!
//! Every setting is an environment variable and a flag that overrides it (`--drain-delay 2s`),
//! accepted before or after the subcommand ([`config::cli`]).

use std::net::SocketAddr;
use std::time::Duration;

use std::collections::HashMap;

use anyhow::{bail, Context};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use seqcast::auth::{self, Claims};
use seqcast::config::{self, Config, LogFormat};
use seqcast::store::{self, StoreOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    /// Serve (the default). Configuration comes from the environment and the flags below (a
    /// flag wins over its variable): see docs/configuration.md.
    Serve,
    /// Print the effective configuration (flags, environment, defaults) as NAME=value lines,
    /// secrets redacted, and exit 0; exit 1 with the error when it is not valid.
    Config,
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
    /// Apply the database migrations to DATABASE_URL, then exit (0 once the schema is current):
    /// for a Kubernetes Job or a compose one-shot ahead of nodes run with SEQCAST_MIGRATE=false.
    Migrate,
    /// Exit 0 when a node's readiness endpoint answers 200 within 3 s, else 1: the container
    /// health check (the image has no curl).
    Health {
        /// The URL to ask (`http://` only). Default: `/ready` on SEQCAST_LISTEN's port, through
        /// loopback when it listens on every address.
        #[arg(long)]
        url: Option<String>,
    },
}

/// How long `seqcast health` waits for the whole answer (connecting included).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// `SEQCAST_*` variables of the scripts and tests around seqcast, not settings: no warning.
const TOOL_VARIABLES: &[&str] = &["SEQCAST_BIN", "SEQCAST_TEST_BIN", "SEQCAST_TEST_LOG"];

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().args(config::cli::args()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let given = config::cli::given(&matches);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&given),
        Command::Config => show_config(&given),
        Command::Token {
            sub,
            rooms,
            read,
            ttl,
        } => token(&given, sub, &rooms, &read, &ttl),
        Command::Migrate => migrate(&given),
        Command::Health { url } => health(&given, url),
    }
}

/// The configuration given, logging set up by it, and a warning for each unknown variable.
fn configure(given: &HashMap<&'static str, String>) -> anyhow::Result<Config> {
    let config = config::cli::config(given)?;
    init_tracing(config.log_format);
    let names = std::env::vars_os().filter_map(|(name, _)| name.into_string().ok());
    let names = names.filter(|name| !TOOL_VARIABLES.contains(&name.as_str()));
    for (name, nearest) in config::settings::unknown_variables(names) {
        match nearest {
            Some(nearest) => tracing::warn!(
                "unknown environment variable {name} ignored: did you mean {nearest}?"
            ),
            None => tracing::warn!("unknown environment variable {name} ignored"),
        }
    }
    Ok(config)
}

/// The checks a node makes when it builds its state, short of opening files and databases.
fn check_settings(config: &Config) -> anyhow::Result<()> {
    config.validate()?;
    seqcast::admission::Admission::new(config)?;
    Ok(())
}

fn show_config(given: &HashMap<&'static str, String>) -> anyhow::Result<()> {
    let config = configure(given)?;
    check_settings(&config)?;
    print!("{}", config.to_env_lines());
    Ok(())
}

fn migrate(given: &HashMap<&'static str, String>) -> anyhow::Result<()> {
    let config = configure(given)?;
    let database = config.database_url.to_string();
    let options = StoreOptions {
        timeout: config.db_timeout,
        pool_size: 1,
        migrate: true,
        // Not a node: the nodes' own setting stays.
        max_message_bytes: None,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(store::connect(config.database_url.expose(), &options))
        .with_context(|| format!("migrating {database}"))?;
    println!("the schema of {database} is current");
    Ok(())
}

fn health(given: &HashMap<&'static str, String>, url: Option<String>) -> anyhow::Result<()> {
    let url = match url {
        Some(url) => url,
        None => default_health_url(given.get("SEQCAST_LISTEN"))?,
    };
    let status = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(async { tokio::time::timeout(HEALTH_TIMEOUT, http_status(&url)).await });
    match status {
        Ok(Ok(200)) => {
            println!("ready: {url}");
            Ok(())
        }
        Ok(Ok(status)) => bail!("not ready: {url} answered {status}"),
        Ok(Err(e)) => Err(e.context(format!("not ready: {url}"))),
        Err(_) => bail!("not ready: {url} did not answer within {HEALTH_TIMEOUT:?}"),
    }
}

/// `http://ADDR/ready` for SEQCAST_LISTEN, through loopback when it is an any-address.
fn default_health_url(listen: Option<&String>) -> anyhow::Result<String> {
    let mut addr = match listen {
        Some(v) if !v.trim().is_empty() => v
            .trim()
            .parse::<SocketAddr>()
            .with_context(|| format!("SEQCAST_LISTEN: bad address {v:?}"))?,
        _ => Config::default().listen,
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(format!("http://{addr}/ready"))
}

/// The status code of a `GET` of `url`, over a plain TCP connection: the image this runs in has
/// no HTTP client, and one request needs none.
async fn http_status(url: &str) -> anyhow::Result<u16> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url:?}: only http:// URLs"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    // A port is what follows the last `:`, unless that colon is inside an IPv6 address.
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && !port.contains(']'));
    let target = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let mut stream = tokio::net::TcpStream::connect(&target)
        .await
        .with_context(|| format!("connecting to {target}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: seqcast-health\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // Only the status line matters: read until its end.
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or_default();
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP answer: {line:?}"))?;
    Ok(status)
}

fn serve(given: &HashMap<&'static str, String>) -> anyhow::Result<()> {
    let config = configure(given)?;
    // The configuration the node's state is built from (origins, proxy ranges, token keys) is
    // checked now, not once the database has opened: a node whose database is down would
    // otherwise sit "starting" with a configuration that can never work, and fail only later.
    check_settings(&config)?;
    seqcast::auth::Authenticator::from_config(&config)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("binding {}", config.listen))?;
            let addr = listener.local_addr()?;
            let admin = match config.admin_listen {
                Some(admin) => Some(
                    tokio::net::TcpListener::bind(admin)
                        .await
                        .with_context(|| format!("binding {admin} (SEQCAST_ADMIN_LISTEN)"))?,
                ),
                None => None,
            };
            tracing::info!(config = ?config, "starting");
            let shutdown = shutdown_signal()?;
            // Before the listening line, which tells a supervisor (and the tests) the node is up.
            if let Some(admin) = &admin {
                println!("seqcast admin listening on http://{}", admin.local_addr()?);
            }
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
            seqcast::serve(config, listener, admin, shutdown).await
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

fn token(
    given: &HashMap<&'static str, String>,
    sub: String,
    rooms: &str,
    read: &str,
    ttl: &str,
) -> anyhow::Result<()> {
    let setting = |name: &str| given.get(name).filter(|v| !v.trim().is_empty()).cloned();
    let secret = setting("SEQCAST_JWT_SECRET")
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
    let (audience, issuer) = (
        setting("SEQCAST_JWT_AUDIENCE"),
        setting("SEQCAST_JWT_ISSUER"),
    );
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
