//! A throwaway Postgres server for tests.
//!
//! [`TestPostgres::shared`] starts one server per test process, on first use, and hands out a
//! fresh empty database (ICU en-US collation, as on a real deployment) per test with
//! [`TestPostgres::fresh_database`]. [`TestPostgres::start`] starts a private one, for tests that
//! stop or kill their server; it is stopped on drop.
//! [`TestPostgres::start_with`] starts a private one on a given port and/or with TLS on.
//!
//! The server runs from the `initdb` and `postgres` binaries of an installed Postgres (found on
//! `PATH`, else in the newest `/usr/lib/postgresql/*/bin`) in a temporary directory, on a free
//! loopback port, with durability turned off for speed. There is no silent skip: without
//! Postgres the tests that need it fail and say how to install it. When the tests run as root,
//! as in CI, the server runs as the `postgres` OS user, since Postgres refuses to run as root.
//!
//! Statics are never dropped, so the shared server could outlive the test process. Every server
//! therefore comes with a watchdog shell process that waits for the test process to exit, then
//! shuts the server down and removes its directory.
#![allow(dead_code)] // each test crate uses a different part of the support code

use std::fs::{self, File};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::{Connection, Executor, PgConnection};

use super::tls::ServerCert;

/// How long a server may take to accept connections after it was spawned.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// How long a stopped server may take to exit before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// Attempts at starting a server; another process can grab the free port we picked before the
/// server binds it.
const START_ATTEMPTS: usize = 5;

const INSTALL_HINT: &str = "install Postgres (`apt-get install -y postgresql`) or run the tests \
                            through `scripts/test.sh`, which installs it";

/// Why an attempt at starting a server failed.
struct Failure {
    reason: String,
    /// Another process took the port: worth another attempt.
    port_taken: bool,
}

/// A running throwaway Postgres server. Its superuser is `postgres`, trusted without password.
#[derive(Debug)]
pub struct TestPostgres {
    /// Holds the data directory (`data/`), the Unix socket and the server log (`postgres.log`).
    dir: PathBuf,
    port: u16,
    /// The postmaster.
    server: Child,
    /// Shuts the server down and removes `dir` once the test process has exited.
    watchdog: Child,
}

impl TestPostgres {
    /// The server shared by all tests of this process, started on first use.
    pub fn shared() -> &'static TestPostgres {
        static SHARED: OnceLock<TestPostgres> = OnceLock::new();
        SHARED.get_or_init(TestPostgres::start)
    }

    /// Starts a private server, stopped (immediate shutdown) and removed when dropped. Blocks
    /// until the server accepts connections.
    pub fn start() -> TestPostgres {
        TestPostgres::start_with(None, None)
    }

    /// [`TestPostgres::start`] on `port` (one attempt only: the caller picked the port) or a
    /// free one, with TLS on (`ssl=on`, serving `tls`'s certificate; plain connections are
    /// still accepted) when given.
    pub fn start_with(port: Option<u16>, tls: Option<&ServerCert>) -> TestPostgres {
        let bin = find_bin_dir();
        let owner = server_owner();
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match TestPostgres::try_start(&bin, owner, port, tls) {
                Ok(postgres) => return postgres,
                Err(Failure { reason, port_taken }) => {
                    failures.push(reason);
                    if !port_taken || port.is_some() {
                        break;
                    }
                }
            }
        }
        panic!("the test Postgres did not start:\n{}", failures.join("\n"));
    }

    /// One attempt of [`TestPostgres::start`]: a new directory, `initdb`, then the server on
    /// `port` or on a port that was free a moment ago.
    fn try_start(
        bin: &Path,
        owner: Option<(u32, u32)>,
        port: Option<u16>,
        tls: Option<&ServerCert>,
    ) -> Result<TestPostgres, Failure> {
        let dir = make_dir(owner);
        let data = dir.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions", "-D"])
            .arg(&data)
            .current_dir(&dir);
        run_as(&mut initdb, owner);
        let output = initdb
            .output()
            .unwrap_or_else(|err| panic!("cannot run {}: {err}", bin.join("initdb").display()));
        if !output.status.success() {
            remove_dir(&dir);
            panic!(
                "initdb failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
            );
        }

        let port = port.unwrap_or_else(free_port);
        let log = dir.join("postgres.log");
        let log_file = File::create(&log)
            .unwrap_or_else(|err| panic!("cannot create {}: {err}", log.display()));
        let mut command = Command::new(bin.join("postgres"));
        command
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "max_connections=300"])
            .args(
                tls.map(|tls| tls_settings(&dir, tls, owner))
                    .unwrap_or_default(),
            )
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        run_as(&mut command, owner);
        let server = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot run {}: {err}", bin.join("postgres").display()));
        let watchdog = spawn_watchdog(server.id(), &dir);
        // From here on, dropping `postgres` (also on failure) stops the server and cleans up.
        let mut postgres = TestPostgres {
            dir,
            port,
            server,
            watchdog,
        };
        match postgres.wait_ready() {
            Ok(()) => Ok(postgres),
            Err(reason) => {
                let log = fs::read_to_string(&log).unwrap_or_default();
                Err(Failure {
                    port_taken: log.contains("could not bind")
                        || log.contains("could not create any TCP/IP sockets"),
                    reason: format!("{reason}; server log:\n{log}"),
                })
            }
        }
    }

    /// A `postgres://` URL for database `database` on this server, as superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a new empty database and returns its URL. Its collation is ICU's en-US, as on a
    /// real deployment (a managed or distribution Postgres is created with the system's locale,
    /// never "C"): text sorts as people read it (`general` before `Lobby`), which once turned a
    /// lock order taken from `ORDER BY room` into deadlocks that byte-order tests could not see.
    /// ICU ships its own locale data, so this needs no locale installed on the system.
    pub async fn fresh_database(&self) -> String {
        self.create_database("TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'")
            .await
    }

    /// The same as [`TestPostgres::fresh_database`], said explicitly where a test is about
    /// collation.
    pub async fn fresh_icu_database(&self) -> String {
        self.fresh_database().await
    }

    /// Creates a new empty database with the "C" collation (text sorts by its bytes), for the
    /// tests that show the store behaves the same under both orders.
    pub async fn fresh_c_database(&self) -> String {
        self.create_database("").await
    }

    /// Creates a new empty database with the `CREATE DATABASE` options `options`.
    async fn create_database(&self, options: &str) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let name = format!("test_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let mut conn = PgConnection::connect(&self.url("postgres"))
            .await
            .unwrap_or_else(|err| panic!("cannot connect to the test Postgres: {err}"));
        conn.execute(format!("CREATE DATABASE {name} {options}").as_str())
            .await
            .unwrap_or_else(|err| panic!("cannot create database {name}: {err}"));
        conn.close()
            .await
            .unwrap_or_else(|err| panic!("cannot close the admin connection: {err}"));
        self.url(&name)
    }

    /// Process id of the postmaster.
    pub fn pid(&self) -> u32 {
        self.server.id()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server at once, as a crash would for its clients: immediate shutdown (SIGQUIT)
    /// ends every backend and drops every connection without a checkpoint. Returns once the
    /// postmaster has exited. The data directory stays until `self` is dropped.
    pub fn kill(&mut self) {
        self.stop_server();
    }

    /// Freezes the server, as a paused VM or a black-holed network would look to its clients:
    /// SIGSTOP to the postmaster (first, so it forks no more) and to every process it started
    /// (each backend has a process group of its own, so a group signal would miss them).
    /// Connections stay open and nothing is answered until [`TestPostgres::resume`].
    pub fn pause(&self) {
        signal("STOP", self.server.id());
        signal_children("STOP", self.server.id());
    }

    /// Undoes [`TestPostgres::pause`]: SIGCONT to the backends, then the postmaster.
    pub fn resume(&self) {
        signal_children("CONT", self.server.id());
        signal("CONT", self.server.id());
    }

    /// Polls a real connection until the server answers a query, the server exits, or
    /// [`READY_DEADLINE`] passes.
    fn wait_ready(&mut self) -> Result<(), String> {
        let url = self.url("postgres");
        let server = &mut self.server;
        // The caller may be inside a tokio runtime, where blocking on another runtime panics:
        // poll from a thread of our own.
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|err| format!("cannot build a tokio runtime: {err}"))?;
                    let deadline = Instant::now() + READY_DEADLINE;
                    loop {
                        match server.try_wait() {
                            Ok(Some(status)) => return Err(format!("postgres exited ({status})")),
                            Ok(None) => {}
                            Err(err) => return Err(format!("cannot check on postgres: {err}")),
                        }
                        let answered = runtime.block_on(async {
                            let attempt = async {
                                let mut conn = PgConnection::connect(&url).await?;
                                conn.execute("SELECT 1").await?;
                                conn.close().await
                            };
                            tokio::time::timeout(Duration::from_secs(5), attempt).await
                        });
                        match answered {
                            Ok(Ok(())) => return Ok(()),
                            Ok(Err(err)) if Instant::now() > deadline => {
                                return Err(format!(
                                    "not ready after {READY_DEADLINE:?}, last error: {err}"
                                ))
                            }
                            Err(_) if Instant::now() > deadline => {
                                return Err(format!("not ready after {READY_DEADLINE:?}"))
                            }
                            _ => std::thread::sleep(Duration::from_millis(50)),
                        }
                    }
                })
                .join()
                .unwrap_or_else(|_| Err("the readiness poller panicked".to_owned()))
        })
    }

    /// Immediate shutdown of the postmaster, then waits for it, killing it past
    /// [`STOP_DEADLINE`].
    fn stop_server(&mut self) {
        if matches!(self.server.try_wait(), Ok(Some(_))) {
            return;
        }
        signal("QUIT", self.server.id());
        let deadline = Instant::now() + STOP_DEADLINE;
        while Instant::now() < deadline {
            match self.server.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!("test Postgres did not stop within {STOP_DEADLINE:?}; killing it");
        if let Err(err) = self.server.kill() {
            eprintln!("cannot kill the test Postgres: {err}");
        }
        if let Err(err) = self.server.wait() {
            eprintln!("cannot wait for the test Postgres: {err}");
        }
    }

    /// Ends the watchdog, whose work the caller takes over.
    fn watchdog_kill(&mut self) {
        if let Err(err) = self.watchdog.kill() {
            eprintln!("cannot stop the test Postgres watchdog: {err}");
        }
        if let Err(err) = self.watchdog.wait() {
            eprintln!("cannot wait for the test Postgres watchdog: {err}");
        }
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.watchdog_kill();
        // A test that failed while the server was paused: a stopped process cannot shut down.
        if matches!(self.server.try_wait(), Ok(None)) {
            self.resume();
        }
        self.stop_server();
        remove_dir(&self.dir);
    }
}

/// The directory holding `initdb` and `postgres`: the first `PATH` entry that has both, else the
/// newest `/usr/lib/postgresql/<version>/bin` (Debian keeps them off `PATH`).
fn find_bin_dir() -> PathBuf {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|dir| has_both(dir)) {
            return dir;
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_both(dir))
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, dir)) => dir,
        None => panic!(
            "these tests need a Postgres server: no `initdb` and `postgres` on PATH or in \
             /usr/lib/postgresql/*/bin; {INSTALL_HINT}"
        ),
    }
}

/// The uid and gid to run Postgres as: the `postgres` OS user when we are root (Postgres refuses
/// to run as root), else `None` (run as ourselves).
fn server_owner() -> Option<(u32, u32)> {
    if id(&["-u"]) != Some(0) {
        return None;
    }
    match (id(&["-u", "postgres"]), id(&["-g", "postgres"])) {
        (Some(uid), Some(gid)) => Some((uid, gid)),
        _ => panic!(
            "running as root, so the test Postgres must run as the `postgres` OS user, which does \
             not exist; {INSTALL_HINT}"
        ),
    }
}

/// Runs `id` with `args` and parses the number it prints.
fn id(args: &[&str]) -> Option<u32> {
    let output = Command::new("id").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

fn run_as(command: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
}

/// Creates an empty directory for one server, owned by `owner` when given.
fn make_dir(owner: Option<(u32, u32)>) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let dir = std::env::temp_dir().join(format!(
        "seqcast-pg-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    // A leftover of an earlier process that had the same pid.
    if dir.exists() {
        remove_dir(&dir);
    }
    fs::create_dir(&dir).unwrap_or_else(|err| panic!("cannot create {}: {err}", dir.display()));
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .unwrap_or_else(|err| panic!("cannot chown {}: {err}", dir.display()));
    }
    dir
}

fn remove_dir(dir: &Path) {
    if let Err(err) = fs::remove_dir_all(dir) {
        if err.kind() != std::io::ErrorKind::NotFound {
            eprintln!("cannot remove {}: {err}", dir.display());
        }
    }
}

/// Copies `tls`'s certificate and key into `dir` (owned by the server's user, the key readable
/// by it alone, as Postgres demands) and returns the `-c` arguments that serve them.
fn tls_settings(dir: &Path, tls: &ServerCert, owner: Option<(u32, u32)>) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let cert = dir.join("server.crt");
    let key = dir.join("server.key");
    for (from, to) in [(&tls.cert, &cert), (&tls.key, &key)] {
        fs::copy(from, to).unwrap_or_else(|err| panic!("cannot copy {}: {err}", from.display()));
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(to, Some(uid), Some(gid))
                .unwrap_or_else(|err| panic!("cannot chown {}: {err}", to.display()));
        }
    }
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|err| panic!("cannot chmod {}: {err}", key.display()));
    vec![
        "-c".into(),
        "ssl=on".into(),
        "-c".into(),
        format!("ssl_cert_file={}", cert.display()),
        "-c".into(),
        format!("ssl_key_file={}", key.display()),
    ]
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|err| panic!("cannot find a free port: {err}"))
}

/// Starts a shell that waits for this test process to exit, then shuts the server down
/// (immediate) and removes `dir`. It waits a bounded time for the server: once the test process
/// is gone, nobody may reap the postmaster, and a zombie would look alive forever.
fn spawn_watchdog(server_pid: u32, dir: &Path) -> Child {
    const SCRIPT: &str = r#"
        while kill -0 "$1" 2>/dev/null; do sleep 0.2; done
        kill -QUIT "$2" 2>/dev/null
        i=0
        while [ "$i" -lt 100 ] && kill -0 "$2" 2>/dev/null; do sleep 0.1; i=$((i + 1)); done
        rm -rf "$3"
    "#;
    Command::new("sh")
        .args(["-c", SCRIPT, "seqcast-pg-watchdog"])
        .arg(std::process::id().to_string())
        .arg(server_pid.to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start the test Postgres watchdog: {err}"))
}

/// Sends signal `name` (as `kill` spells it) to `pid`.
pub fn signal(name: &str, pid: u32) {
    let sent = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
    match sent {
        Ok(status) if status.success() => {}
        Ok(status) => eprintln!("kill -{name} {pid} failed ({status})"),
        Err(err) => eprintln!("cannot run kill: {err}"),
    }
}

/// Sends signal `name` to every child process of `pid` (`pkill -P`, by parent id).
fn signal_children(name: &str, pid: u32) {
    let sent = Command::new("pkill")
        .arg(format!("-{name}"))
        .arg("-P")
        .arg(pid.to_string())
        .status();
    match sent {
        // 1: no such process, e.g. a server without backends.
        Ok(status) if status.success() || status.code() == Some(1) => {}
        Ok(status) => eprintln!("pkill -{name} -P {pid} failed ({status})"),
        Err(err) => eprintln!("cannot run pkill: {err}"),
    }
}
