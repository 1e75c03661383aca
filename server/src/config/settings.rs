//! Every setting by name: the list `--help` is made from ([`SETTINGS`]), each setting's value
//! written back as text ([`Config::shown`], what `seqcast config` prints), and the unknown
//! `SEQCAST_*` names a node warns about ([`unknown_variables`]).
//!
//! The defaults are not repeated here: they are [`Config::default`]'s values, shown.

use std::time::Duration;

use super::Config;

/// One setting: its environment variable (the flag is derived from it, see
/// [`super::cli::flag_name`]), a line of help, and its default when it is not a fixed value.
pub struct Setting {
    pub name: &'static str,
    pub help: &'static str,
    /// How `--help` states a default computed at start (else `Config::default()`'s value).
    pub default: Option<&'static str>,
}

const fn setting(name: &'static str, help: &'static str) -> Setting {
    Setting {
        name,
        help,
        default: None,
    }
}

/// Every setting [`Config::from_lookup`] reads (a unit test holds the two together), in the
/// order of `docs/configuration.md`.
pub const SETTINGS: &[Setting] = &[
    setting("SEQCAST_LISTEN", "Address to listen on"),
    setting(
        "SEQCAST_ADMIN_LISTEN",
        "Separate address for /metrics, /live and /ready (then /metrics leaves the public port)",
    ),
    setting(
        "DATABASE_URL",
        "postgres://... for a cluster node, sqlite://path for a single node",
    ),
    setting(
        "REDIS_URL",
        "Redis for cross-node fan-out; unset = nodes poll the shared Postgres",
    ),
    setting(
        "SEQCAST_JWT_SECRET",
        "HS256 token secret; unset (and no public key) = development mode, loopback only",
    ),
    setting(
        "SEQCAST_API_KEY",
        "Server key for HTTP publishing and reading in any room",
    ),
    Setting {
        default: Some("the host name"),
        ..setting("SEQCAST_NODE_ID", "This node's name in logs and metrics")
    },
    setting("SEQCAST_MAX_MESSAGE_BYTES", "Largest serialized message body"),
    setting(
        "SEQCAST_MAX_SIGNAL_BYTES",
        "Largest serialized signal body (ephemeral, never stored)",
    ),
    setting(
        "SEQCAST_WRITE_TIMEOUT",
        "Close a connection (4008) that accepts no bytes for this long",
    ),
    setting(
        "SEQCAST_SHUTDOWN_TIMEOUT",
        "How long a SIGTERM drain may take",
    ),
    setting(
        "SEQCAST_DRAIN_DELAY",
        "On SIGTERM, how long sessions are still served after /ready turns 503",
    ),
    setting(
        "SEQCAST_DRAIN_SPREAD",
        "Window over which draining sessions are closed (1012)",
    ),
    setting(
        "SEQCAST_OUTBOUND_QUEUE",
        "Live frames buffered per session before it reads from the database",
    ),
    setting(
        "SEQCAST_COMMIT_CONCURRENCY",
        "Commits in flight on this node at most",
    ),
    setting("SEQCAST_LOG_FORMAT", "Log lines as `text` or `json`"),
    setting(
        "SEQCAST_REDIS_PREFIX",
        "Prefix of every Redis key and channel",
    ),
    setting(
        "SEQCAST_DB_TIMEOUT",
        "A database operation not done within this fails as unavailable",
    ),
    setting(
        "SEQCAST_REDIS_TIMEOUT",
        "A Redis command unanswered this long marks Redis down",
    ),
    setting(
        "SEQCAST_POLL_INTERVAL",
        "How often room heads are read from the database without Redis",
    ),
    setting(
        "SEQCAST_PRESENCE_INTERVAL",
        "How often presence changes are written, reported and told (one frame per room)",
    ),
    setting(
        "SEQCAST_PRESENCE_TTL",
        "A node's presence counts this long after its last heartbeat",
    ),
    setting(
        "SEQCAST_PRESENCE_MAX_USERS",
        "Rooms with more present users are counted, not listed",
    ),
    setting(
        "SEQCAST_HEAD_CHECK_INTERVAL",
        "The same check while Redis is up (finds a lost last message)",
    ),
    setting("SEQCAST_DB_POOL_SIZE", "Postgres connections per node at most"),
    setting(
        "SEQCAST_MIGRATE",
        "Apply pending migrations at start (false = wait for `seqcast migrate`)",
    ),
    setting(
        "SEQCAST_REDIS_CA_FILE",
        "PEM bundle of the CAs a rediss:// Redis is verified against",
    ),
    setting("SEQCAST_LEADER_TTL", "Lifetime of the leader lock in Redis"),
    setting(
        "SEQCAST_RETENTION",
        "Delete messages older than this; unset keeps them forever",
    ),
    setting(
        "SEQCAST_JOB_INTERVAL",
        "How often the leader runs the background jobs",
    ),
    setting(
        "SEQCAST_JWT_PUBLIC_KEY",
        "Path of a PEM public key (RS256 or ES256) tokens may be signed with",
    ),
    setting("SEQCAST_JWT_AUDIENCE", "When set, tokens must carry this `aud`"),
    setting("SEQCAST_JWT_ISSUER", "When set, tokens must carry this `iss`"),
    setting(
        "SEQCAST_JWT_LEEWAY",
        "Clock skew tolerated on `exp` and `nbf`",
    ),
    setting(
        "SEQCAST_ALLOWED_ORIGINS",
        "Browser origins allowed besides the server's own (WebSocket and CORS), comma-separated; `*` = any",
    ),
    Setting {
        default: Some("2 x SEQCAST_MAX_MESSAGE_BYTES"),
        ..setting(
            "SEQCAST_MAX_FRAME_BYTES",
            "Largest WebSocket frame; 0 = no limit of seqcast's own",
        )
    },
    setting(
        "SEQCAST_MAX_ROOMS_PER_CONNECTION",
        "Rooms one connection may join; 0 = off",
    ),
    setting(
        "SEQCAST_MAX_CONNECTIONS",
        "WebSocket connections per node; 0 = off",
    ),
    setting(
        "SEQCAST_MAX_CONNECTIONS_PER_USER",
        "Connections per user per node; 0 = off",
    ),
    setting(
        "SEQCAST_MAX_CONNECTIONS_PER_IP",
        "Connections per client address per node; 0 = off",
    ),
    setting(
        "SEQCAST_TRUSTED_PROXIES",
        "Comma-separated CIDRs whose X-Forwarded-For is believed",
    ),
    setting(
        "SEQCAST_HANDSHAKE_TIMEOUT",
        "An HTTP connection must complete a request within this; 0 = off",
    ),
    setting(
        "SEQCAST_PING_INTERVAL",
        "How often the server pings a WebSocket client",
    ),
    setting(
        "SEQCAST_IDLE_TIMEOUT",
        "Close a connection from which nothing arrives this long",
    ),
    setting(
        "SEQCAST_SEND_RATE",
        "Sends, joins and malformed frames per second per connection; 0 = off",
    ),
    setting(
        "SEQCAST_USER_SEND_RATE",
        "Sends per second per user across the cluster; 0 = off",
    ),
    setting(
        "SEQCAST_EXCESS_FRAME_RATE",
        "Frames per second the node reads from over-rate connections; 0 = off",
    ),
    setting(
        "SEQCAST_USER_READ_CONCURRENCY",
        "Database reads one user may have in flight on a node; 0 = no limit",
    ),
];

impl Config {
    /// The value of setting `name` written as its variable would be (`""` = unset), the secrets
    /// as `[redacted]`: what `seqcast config` prints and `--help` shows as a default. `None` for
    /// a name that is not a setting.
    pub fn shown(&self, name: &str) -> Option<String> {
        fn text<T: ToString>(value: &Option<T>) -> String {
            value.as_ref().map(ToString::to_string).unwrap_or_default()
        }
        let d = format_duration;
        Some(match name {
            "SEQCAST_LISTEN" => self.listen.to_string(),
            "SEQCAST_ADMIN_LISTEN" => text(&self.admin_listen),
            "DATABASE_URL" => self.database_url.to_string(),
            "REDIS_URL" => text(&self.redis_url),
            "SEQCAST_JWT_SECRET" => text(&self.jwt_secret),
            "SEQCAST_API_KEY" => text(&self.api_key),
            "SEQCAST_NODE_ID" => self.node_id.clone(),
            "SEQCAST_MAX_MESSAGE_BYTES" => self.max_message_bytes.to_string(),
            "SEQCAST_MAX_SIGNAL_BYTES" => self.max_signal_bytes.to_string(),
            "SEQCAST_WRITE_TIMEOUT" => d(self.write_timeout),
            "SEQCAST_SHUTDOWN_TIMEOUT" => d(self.shutdown_timeout),
            "SEQCAST_DRAIN_DELAY" => d(self.drain_delay),
            "SEQCAST_DRAIN_SPREAD" => d(self.drain_spread),
            "SEQCAST_OUTBOUND_QUEUE" => self.outbound_queue.to_string(),
            "SEQCAST_COMMIT_CONCURRENCY" => self.commit_concurrency.to_string(),
            "SEQCAST_LOG_FORMAT" => match self.log_format {
                super::LogFormat::Text => "text".to_owned(),
                super::LogFormat::Json => "json".to_owned(),
            },
            "SEQCAST_REDIS_PREFIX" => self.redis_prefix.clone(),
            "SEQCAST_DB_TIMEOUT" => d(self.db_timeout),
            "SEQCAST_REDIS_TIMEOUT" => d(self.redis_timeout),
            "SEQCAST_POLL_INTERVAL" => d(self.poll_interval),
            "SEQCAST_PRESENCE_INTERVAL" => d(self.presence_interval),
            "SEQCAST_PRESENCE_TTL" => d(self.presence_ttl),
            "SEQCAST_PRESENCE_MAX_USERS" => self.presence_max_users.to_string(),
            "SEQCAST_HEAD_CHECK_INTERVAL" => d(self.head_check_interval),
            "SEQCAST_DB_POOL_SIZE" => self.db_pool_size.to_string(),
            "SEQCAST_MIGRATE" => self.migrate.to_string(),
            "SEQCAST_REDIS_CA_FILE" => text(&self.redis_ca_file),
            "SEQCAST_LEADER_TTL" => d(self.leader_ttl),
            "SEQCAST_RETENTION" => self.retention.map(d).unwrap_or_default(),
            "SEQCAST_JOB_INTERVAL" => d(self.job_interval),
            "SEQCAST_JWT_PUBLIC_KEY" => text(&self.jwt_public_key),
            "SEQCAST_JWT_AUDIENCE" => text(&self.jwt_audience),
            "SEQCAST_JWT_ISSUER" => text(&self.jwt_issuer),
            "SEQCAST_JWT_LEEWAY" => d(self.jwt_leeway),
            "SEQCAST_ALLOWED_ORIGINS" => self.allowed_origins.join(","),
            "SEQCAST_MAX_FRAME_BYTES" => self.max_frame_bytes.to_string(),
            "SEQCAST_MAX_ROOMS_PER_CONNECTION" => self.max_rooms_per_connection.to_string(),
            "SEQCAST_MAX_CONNECTIONS" => self.max_connections.to_string(),
            "SEQCAST_MAX_CONNECTIONS_PER_USER" => self.max_connections_per_user.to_string(),
            "SEQCAST_MAX_CONNECTIONS_PER_IP" => self.max_connections_per_ip.to_string(),
            "SEQCAST_TRUSTED_PROXIES" => self.trusted_proxies.join(","),
            "SEQCAST_HANDSHAKE_TIMEOUT" => d(self.handshake_timeout),
            "SEQCAST_PING_INTERVAL" => d(self.ping_interval),
            "SEQCAST_IDLE_TIMEOUT" => d(self.idle_timeout),
            "SEQCAST_SEND_RATE" => self.send_rate.to_string(),
            "SEQCAST_USER_SEND_RATE" => self.user_send_rate.to_string(),
            "SEQCAST_EXCESS_FRAME_RATE" => self.excess_frame_rate.to_string(),
            "SEQCAST_USER_READ_CONCURRENCY" => self.user_read_concurrency.to_string(),
            _ => return None,
        })
    }

    /// Every setting as `NAME=value` lines, secrets redacted, unset ones as `NAME=`: the output
    /// of `seqcast config`, readable back as an environment file (but for the secrets).
    pub fn to_env_lines(&self) -> String {
        SETTINGS
            .iter()
            .map(|s| {
                let value = self.shown(s.name).unwrap_or_default();
                format!("{}={value}\n", s.name)
            })
            .collect()
    }
}

/// Writes a duration the way the settings are written: the largest unit that is exact
/// (`500ms`, `10s`, `5m`, `2h`, `30d`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 != 0 {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    match s {
        0 => "0s".to_owned(),
        _ if s % 86_400 == 0 => format!("{}d", s / 86_400),
        _ if s % 3_600 == 0 => format!("{}h", s / 3_600),
        _ if s % 60 == 0 => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

/// The `SEQCAST_*` names among `names` that are no setting, each with the nearest setting's name
/// when one is close (a typo such as `SEQCAST_LISTN`, or `SEQCAST_DATABASE_URL`). A node warns
/// about them and starts anyway.
pub fn unknown_variables(
    names: impl IntoIterator<Item = String>,
) -> Vec<(String, Option<&'static str>)> {
    let mut unknown: Vec<_> = names
        .into_iter()
        .filter(|n| n.starts_with("SEQCAST_") && !SETTINGS.iter().any(|s| s.name == n))
        .map(|n| {
            let nearest = nearest_setting(&n);
            (n, nearest)
        })
        .collect();
    unknown.sort();
    unknown
}

/// The setting whose name is within a few edits of `name` (the `SEQCAST_` prefix set aside, so
/// `SEQCAST_REDIS_URL` finds `REDIS_URL`), if any.
fn nearest_setting(name: &str) -> Option<&'static str> {
    let bare = |n: &str| n.strip_prefix("SEQCAST_").unwrap_or(n).to_ascii_uppercase();
    let wanted = bare(name);
    SETTINGS
        .iter()
        .map(|s| (strsim::levenshtein(&wanted, &bare(s.name)), s.name))
        .filter(|&(distance, _)| distance <= 3 && distance < wanted.len())
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, name)| name)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    #[test]
    fn from_lookup_reads_exactly_the_listed_settings() {
        let asked = RefCell::new(Vec::new());
        Config::from_lookup(|name| {
            asked.borrow_mut().push(name.to_owned());
            None
        })
        .unwrap();
        let mut asked = asked.into_inner();
        asked.sort();
        asked.dedup();
        let mut listed: Vec<_> = SETTINGS.iter().map(|s| s.name.to_owned()).collect();
        listed.sort();
        assert_eq!(asked, listed);
        for s in SETTINGS {
            assert!(
                Config::default().shown(s.name).is_some(),
                "{} shown",
                s.name
            );
        }
    }

    #[test]
    fn shown_values_read_back_as_the_same_configuration() {
        let env = |k: &str| match k {
            "SEQCAST_LISTEN" => Some("127.0.0.1:9000".to_owned()),
            "SEQCAST_ADMIN_LISTEN" => Some("127.0.0.1:9001".to_owned()),
            "SEQCAST_DRAIN_DELAY" => Some("1500ms".to_owned()),
            "SEQCAST_RETENTION" => Some("30d".to_owned()),
            "SEQCAST_ALLOWED_ORIGINS" => Some("https://a.example, https://b.example".to_owned()),
            "SEQCAST_LOG_FORMAT" => Some("json".to_owned()),
            "SEQCAST_MIGRATE" => Some("false".to_owned()),
            _ => None,
        };
        for original in [Config::default(), Config::from_lookup(env).unwrap()] {
            let again = Config::from_lookup(|k| original.shown(k)).unwrap();
            assert_eq!(format!("{again:?}"), format!("{original:?}"));
        }
    }

    #[test]
    fn durations_are_written_in_their_largest_exact_unit() {
        for (ms, text) in [
            (0, "0s"),
            (1500, "1500ms"),
            (10_000, "10s"),
            (300_000, "5m"),
            (7_200_000, "2h"),
            (2_592_000_000, "30d"),
        ] {
            assert_eq!(format_duration(Duration::from_millis(ms)), text);
        }
    }

    #[test]
    fn unknown_names_get_the_nearest_setting() {
        let names = [
            "SEQCAST_LISTN",
            "SEQCAST_DATABASE_URL",
            "SEQCAST_LISTEN",
            "SEQCAST_SOMETHING_ELSE",
            "PATH",
        ]
        .map(String::from);
        assert_eq!(
            unknown_variables(names),
            vec![
                ("SEQCAST_DATABASE_URL".to_owned(), Some("DATABASE_URL")),
                ("SEQCAST_LISTN".to_owned(), Some("SEQCAST_LISTEN")),
                ("SEQCAST_SOMETHING_ELSE".to_owned(), None),
            ]
        );
    }
}
