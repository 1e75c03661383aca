//! A throwaway Redis server per test.
//!
//! [`TestRedis::start`] runs `redis-server` from `PATH` on a free loopback port, without
//! persistence, in a temporary directory, and returns once it answers `PING`. There is no silent
//! skip: without `redis-server` the test fails and says how to install it. A test can pause the
//! server ([`TestRedis::pause`]: SIGSTOP, so it keeps its connections and answers nothing, like a
//! hung server), resume it, kill it, restart it on the same port, and send it commands with
//! [`TestRedis::command`], a tiny RESP client that needs no Redis library.
//!
//! [`TestRedis::start_tls`] serves TLS only (`rediss://`), with a certificate of the caller's.
//!
//! The server is killed when its [`TestRedis`] is dropped. A watchdog shell process kills it too
//! (and removes its directory) if the test process dies first.
#![allow(dead_code)] // each test crate uses a different part of the support code

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::tls::ServerCert;

/// How long a server may take to answer `PING` after it was spawned.
const READY_DEADLINE: Duration = Duration::from_secs(10);

/// How long [`TestRedis::command`] waits to connect, to write and for each read.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a signalled server may take to change state (stop, continue, exit).
const SIGNAL_DEADLINE: Duration = Duration::from_secs(5);

/// Attempts at starting a server; another process can grab the free port we picked before the
/// server binds it.
const START_ATTEMPTS: usize = 5;

const INSTALL_HINT: &str = "install Redis (`apt-get install -y redis-server`) or run the tests \
                            through `scripts/test.sh`, which installs it";

/// A running throwaway Redis server.
#[derive(Debug)]
pub struct TestRedis {
    /// Holds the server's working directory and its log (`redis.log`).
    dir: tempfile::TempDir,
    port: u16,
    /// Extra `redis-server` arguments, given again on [`TestRedis::restart`].
    extra_args: Vec<String>,
    /// Serving TLS only, on `port`.
    tls: bool,
    /// `None` once killed.
    server: Option<Child>,
    /// Kills the server and removes `dir` once the test process has exited.
    watchdog: Child,
}

impl TestRedis {
    /// Starts a server with the default settings. Blocks until it answers `PING`.
    pub fn start() -> TestRedis {
        TestRedis::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments, e.g.
    /// `["--client-output-buffer-limit", "pubsub 64kb 32kb 1"]`.
    pub fn start_with(extra_args: &[&str]) -> TestRedis {
        let extra_args: Vec<String> = extra_args.iter().map(|a| (*a).to_owned()).collect();
        TestRedis::start_args(extra_args, false)
    }

    /// Starts a server that speaks TLS only (no plain port), presenting `cert` and not asking
    /// clients for one. Its readiness is checked by connecting only: `PING` would need TLS.
    pub fn start_tls(cert: &ServerCert, ca: &Path) -> TestRedis {
        let path = |p: &Path| p.display().to_string();
        let extra_args = vec![
            "--tls-cert-file".to_owned(),
            path(&cert.cert),
            "--tls-key-file".to_owned(),
            path(&cert.key),
            "--tls-ca-cert-file".to_owned(),
            path(ca),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ];
        TestRedis::start_args(extra_args, true)
    }

    fn start_args(extra_args: Vec<String>, tls: bool) -> TestRedis {
        let bin = find_redis_server();
        let dir = tempfile::Builder::new()
            .prefix("seqcast-redis-")
            .tempdir()
            .unwrap_or_else(|err| panic!("cannot create a directory for redis-server: {err}"));
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match spawn_ready(&bin, dir.path(), port, &extra_args, tls) {
                Ok((server, watchdog)) => {
                    return TestRedis {
                        dir,
                        port,
                        extra_args,
                        tls,
                        server: Some(server),
                        watchdog,
                    };
                }
                Err(failure) => {
                    let port_taken = failure.contains("Address already in use");
                    failures.push(failure);
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        panic!("the test Redis did not start:\n{}", failures.join("\n"));
    }

    /// `redis://127.0.0.1:PORT` (`rediss://` when serving TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Process id of the running server.
    pub fn pid(&self) -> u32 {
        self.server().id()
    }

    /// Stops the server (SIGSTOP): connections stay open, commands get no answer. Returns once
    /// the process is stopped.
    pub fn pause(&self) {
        let pid = self.pid();
        signal("STOP", pid);
        wait_for_state(pid, "stopped", |state| state == 'T');
    }

    /// Lets a paused server go on (SIGCONT). Returns once the process runs again.
    pub fn resume(&self) {
        let pid = self.pid();
        signal("CONT", pid);
        wait_for_state(pid, "running", |state| state != 'T');
    }

    /// Kills the server (SIGKILL), as a crash would, and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            kill_and_wait(&mut server);
            // The old watchdog would kill whatever process gets this pid next.
            stop_watchdog(&mut self.watchdog);
            self.watchdog = spawn_watchdog(None, self.dir.path());
        }
    }

    /// Starts the server again on the same port, with the same arguments, killing it first if
    /// it still runs. Blocks until it answers `PING`. Its data is gone: nothing is persisted.
    pub fn restart(&mut self) {
        self.kill();
        let bin = find_redis_server();
        // The port was ours a moment ago; a short retry covers a slow release of the socket.
        let deadline = Instant::now() + READY_DEADLINE;
        let (server, watchdog) = loop {
            match spawn_ready(&bin, self.dir.path(), self.port, &self.extra_args, self.tls) {
                Ok(started) => break started,
                Err(failure) if Instant::now() < deadline => {
                    eprintln!("restarting the test Redis: {failure}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(failure) => panic!("the test Redis did not restart: {failure}"),
            }
        };
        stop_watchdog(&mut self.watchdog);
        self.watchdog = watchdog;
        self.server = Some(server);
    }

    /// Sends one command over a fresh connection and returns the reply as text: a status or
    /// bulk string as is, an integer in decimal, nil as `(nil)`, an array as its elements, one
    /// per line. Panics on an error reply, and when the server does not answer within
    /// [`IO_TIMEOUT`] (a paused server never does).
    pub fn command(&self, args: &[&str]) -> String {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|err| panic!("redis {args:?}: cannot connect: {err}"));
        match roundtrip(stream, args) {
            Ok(Reply::Error(err)) => panic!("redis {args:?}: {err}"),
            Ok(reply) => reply.to_text(),
            Err(err) => panic!("redis {args:?}: {err}"),
        }
    }

    fn server(&self) -> &Child {
        self.server
            .as_ref()
            .unwrap_or_else(|| panic!("the test Redis was killed; restart it first"))
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        stop_watchdog(&mut self.watchdog);
        if let Some(mut server) = self.server.take() {
            kill_and_wait(&mut server);
        }
        // `dir` is removed when the field drops.
    }
}

/// `redis-server` on `PATH`.
fn find_redis_server() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("redis-server"))
                .find(|bin| bin.is_file())
        })
        .unwrap_or_else(|| {
            panic!("these tests need a Redis server: no `redis-server` on PATH; {INSTALL_HINT}")
        })
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|err| panic!("cannot find a free port: {err}"))
}

/// Spawns `redis-server` on `port` (its TLS port when `tls`, with no plain one), with its
/// watchdog, and waits until it answers `PING` (accepts connections, for TLS). On failure both
/// are ended and the error carries the server's log.
fn spawn_ready(
    bin: &Path,
    dir: &Path,
    port: u16,
    extra_args: &[String],
    tls: bool,
) -> Result<(Child, Child), String> {
    let log = dir.join("redis.log");
    let log_file =
        File::create(&log).unwrap_or_else(|err| panic!("cannot create {}: {err}", log.display()));
    let port = port.to_string();
    let ports: &[&str] = if tls {
        &["--port", "0", "--tls-port", &port]
    } else {
        &["--port", &port]
    };
    let mut server = Command::new(bin)
        .args(ports)
        .args(["--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir)
        .args(extra_args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {}: {err}", bin.display()));
    let mut watchdog = spawn_watchdog(Some(server.id()), dir);
    let port = port
        .parse()
        .unwrap_or_else(|err| panic!("port {port}: {err}"));
    match wait_ready(&mut server, port, tls) {
        Ok(()) => Ok((server, watchdog)),
        Err(reason) => {
            stop_watchdog(&mut watchdog);
            kill_and_wait(&mut server);
            let log = fs::read_to_string(&log).unwrap_or_default();
            Err(format!("{reason}; server log:\n{log}"))
        }
    }
}

/// Polls `PING` (a connection, when `tls`) until the server answers `PONG`, exits, or
/// [`READY_DEADLINE`] passes.
fn wait_ready(server: &mut Child, port: u16, tls: bool) -> Result<(), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + READY_DEADLINE;
    loop {
        match server.try_wait() {
            Ok(Some(status)) => return Err(format!("redis-server exited ({status})")),
            Ok(None) => {}
            Err(err) => return Err(format!("cannot check on redis-server: {err}")),
        }
        let answer = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .map_err(|err| err.to_string())
            .and_then(|stream| match tls {
                true => Ok(Reply::Simple("PONG".to_owned())),
                false => roundtrip(stream, &["PING"]),
            });
        match answer {
            Ok(Reply::Simple(pong)) if pong == "PONG" => return Ok(()),
            Ok(other) if Instant::now() > deadline => {
                return Err(format!(
                    "not ready after {READY_DEADLINE:?}: PING got {other:?}"
                ))
            }
            Err(err) if Instant::now() > deadline => {
                return Err(format!("not ready after {READY_DEADLINE:?}: {err}"))
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn kill_and_wait(server: &mut Child) {
    if let Err(err) = server.kill() {
        eprintln!("cannot kill the test Redis: {err}");
    }
    if let Err(err) = server.wait() {
        eprintln!("cannot wait for the test Redis: {err}");
    }
}

/// Starts a shell that waits for this test process to exit, then kills `server` (when given)
/// and removes `dir`.
fn spawn_watchdog(server: Option<u32>, dir: &Path) -> Child {
    const SCRIPT: &str = r#"
        while kill -0 "$1" 2>/dev/null; do sleep 0.2; done
        [ "$2" = - ] || kill -KILL "$2" 2>/dev/null
        rm -rf "$3"
    "#;
    Command::new("sh")
        .args(["-c", SCRIPT, "seqcast-redis-watchdog"])
        .arg(std::process::id().to_string())
        .arg(server.map_or_else(|| "-".to_owned(), |pid| pid.to_string()))
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start the test Redis watchdog: {err}"))
}

fn stop_watchdog(watchdog: &mut Child) {
    if let Err(err) = watchdog.kill() {
        eprintln!("cannot stop the test Redis watchdog: {err}");
    }
    if let Err(err) = watchdog.wait() {
        eprintln!("cannot wait for the test Redis watchdog: {err}");
    }
}

/// Sends signal `name` (as `kill` spells it) to `pid`.
fn signal(name: &str, pid: u32) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap_or_else(|err| panic!("cannot run kill: {err}"));
    assert!(status.success(), "kill -{name} {pid} failed ({status})");
}

/// Waits until the state letter in `/proc/PID/stat` satisfies `done`.
fn wait_for_state(pid: u32, what: &str, done: impl Fn(char) -> bool) {
    let path = format!("/proc/{pid}/stat");
    let deadline = Instant::now() + SIGNAL_DEADLINE;
    loop {
        let stat =
            fs::read_to_string(&path).unwrap_or_else(|err| panic!("cannot read {path}: {err}"));
        // `PID (COMM) STATE ...`; COMM may hold spaces and parentheses, so split at the last ')'.
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .unwrap_or_else(|| panic!("cannot parse {path}: {stat:?}"));
        if done(state) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the test Redis (pid {pid}) is not {what} after {SIGNAL_DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A RESP2 reply.
#[derive(Debug)]
enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<String>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    fn to_text(&self) -> String {
        match self {
            Reply::Simple(s) | Reply::Error(s) | Reply::Bulk(Some(s)) => s.clone(),
            Reply::Integer(n) => n.to_string(),
            Reply::Bulk(None) | Reply::Array(None) => "(nil)".to_owned(),
            Reply::Array(Some(items)) => items
                .iter()
                .map(Reply::to_text)
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// Writes `args` as a RESP array of bulk strings to `stream` and reads one reply.
fn roundtrip(stream: TcpStream, args: &[&str]) -> Result<Reply, String> {
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|err| err.to_string())?;
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    let mut writer = &stream;
    writer
        .write_all(&request)
        .map_err(|err| format!("cannot send: {err}"))?;
    read_reply(&mut BufReader::new(&stream))
}

fn read_reply(reader: &mut impl BufRead) -> Result<Reply, String> {
    let mut line = String::new();
    let n = reader
        .read_line(&mut line)
        .map_err(|err| format!("cannot read the reply: {err}"))?;
    if n == 0 {
        return Err("connection closed before a reply".to_owned());
    }
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(line.chars().next().map_or(0, char::len_utf8));
    let number = || {
        rest.parse::<i64>()
            .map_err(|err| format!("bad number in reply {line:?}: {err}"))
    };
    match kind {
        "+" => Ok(Reply::Simple(rest.to_owned())),
        "-" => Ok(Reply::Error(rest.to_owned())),
        ":" => Ok(Reply::Integer(number()?)),
        "$" => {
            let Ok(len) = usize::try_from(number()?) else {
                return Ok(Reply::Bulk(None));
            };
            let mut data = vec![0; len + 2];
            reader
                .read_exact(&mut data)
                .map_err(|err| format!("cannot read a bulk string: {err}"))?;
            data.truncate(len);
            String::from_utf8(data)
                .map(|s| Reply::Bulk(Some(s)))
                .map_err(|err| format!("bulk string is not UTF-8: {err}"))
        }
        "*" => {
            let Ok(len) = usize::try_from(number()?) else {
                return Ok(Reply::Array(None));
            };
            let items = (0..len)
                .map(|_| read_reply(reader))
                .collect::<Result<_, _>>()?;
            Ok(Reply::Array(Some(items)))
        }
        _ => Err(format!("unexpected reply {line:?}")),
    }
}
