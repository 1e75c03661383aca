//! Admission at the door: which WebSocket upgrades a node accepts (docs/security.md).
//!
//! Three checks run at `GET /v1/ws`, before a connection is upgraded:
//! - [`Admission::check_origin`]: a browser page may only open a WebSocket to seqcast from the
//!   server's own origin or an origin listed in `SEQCAST_ALLOWED_ORIGINS` (cross-site WebSocket
//!   hijacking); clients that send no `Origin` (native apps, backends) are not browsers and pass.
//! - [`Admission::client_ip`]: the address a client is counted under; `X-Forwarded-For` is only
//!   believed from the peers listed in `SEQCAST_TRUSTED_PROXIES`.
//! - [`Admission::admit`] and [`Permit::admit_user`]: connection counts per node, per address and
//!   per user. The [`Permit`] moves into the session's future, so a place is given back however
//!   the session ends (or when the upgrade never completes) and cannot leak.

use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use axum::http::header::{HOST, ORIGIN};
use axum::http::uri::{Authority, Uri};
use axum::http::{HeaderMap, StatusCode};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use ipnet::IpNet;

use crate::config::Config;
use crate::error::ApiError;

/// The header a load balancer appends the address of its own peer to.
const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The node's admission policy and its connection counts. Cheap to clone.
#[derive(Clone)]
pub struct Admission(Arc<Inner>);

struct Inner {
    origins: Origins,
    trusted_proxies: Vec<IpNet>,
    /// `SEQCAST_MAX_CONNECTIONS`, `_PER_USER`, `_PER_IP`; 0 = off.
    max_total: usize,
    max_per_user: usize,
    max_per_ip: usize,
    /// Open WebSocket connections on this node (always counted: one atomic).
    total: AtomicUsize,
    /// Open connections per user and per address, only while the limit is on. An entry is
    /// removed when its count returns to zero, so the maps hold the connected clients only.
    per_user: DashMap<Box<str>, usize>,
    per_ip: DashMap<IpAddr, usize>,
}

/// Browser origins allowed besides the server's own.
enum Origins {
    Any,
    /// Serialized origins (`scheme://host[:port]`, lowercase, default port omitted).
    List(Vec<String>),
}

/// Why a connection was refused at the door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `SEQCAST_MAX_CONNECTIONS` reached: 503, try another node.
    NodeFull,
    /// `SEQCAST_MAX_CONNECTIONS_PER_IP` reached: 429.
    AddressLimit,
    /// `SEQCAST_MAX_CONNECTIONS_PER_USER` reached: 429.
    UserLimit,
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> ApiError {
        let (status, message) = match refusal {
            Refusal::NodeFull => (
                StatusCode::SERVICE_UNAVAILABLE,
                "this node has reached its connection limit; retry later or elsewhere",
            ),
            Refusal::AddressLimit => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from this address",
            ),
            Refusal::UserLimit => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections for this user",
            ),
        };
        ApiError::limit_exceeded(status, message)
    }
}

impl Admission {
    /// Reads the policy from `config`; a malformed origin or proxy range is a startup error.
    pub fn new(config: &Config) -> anyhow::Result<Admission> {
        let origins = if config.allowed_origins.iter().any(|o| o == "*") {
            Origins::Any
        } else {
            let list = config
                .allowed_origins
                .iter()
                .map(|o| {
                    normalize_origin(o).with_context(|| {
                        format!(
                            "SEQCAST_ALLOWED_ORIGINS: {o:?} is not an origin \
                             (scheme://host[:port], or `*`)"
                        )
                    })
                })
                .collect::<anyhow::Result<_>>()?;
            Origins::List(list)
        };
        let trusted_proxies = config
            .trusted_proxies
            .iter()
            .map(|p| parse_range(p).with_context(|| format!("SEQCAST_TRUSTED_PROXIES: {p:?}")))
            .collect::<anyhow::Result<_>>()?;
        Ok(Admission(Arc::new(Inner {
            origins,
            trusted_proxies,
            max_total: config.max_connections,
            max_per_user: config.max_connections_per_user,
            max_per_ip: config.max_connections_per_ip,
            total: AtomicUsize::new(0),
            per_user: DashMap::new(),
            per_ip: DashMap::new(),
        })))
    }

    /// Refuses (403 `forbidden`) a browser's upgrade from a foreign origin. Allowed: no `Origin`
    /// header, the request's own origin (the `Origin` host and port equal the `Host` header's;
    /// a `Host` without a port stands for the origin scheme's default port, since TLS may end at
    /// a load balancer), and the configured origins.
    pub fn check_origin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(origin) = headers.get(ORIGIN) else {
            return Ok(());
        };
        if matches!(self.0.origins, Origins::Any) {
            return Ok(());
        }
        let origin = origin.to_str().ok().and_then(Origin::parse);
        let allowed = origin.is_some_and(|origin| {
            let host = headers.get(HOST).and_then(|h| h.to_str().ok());
            host.is_some_and(|host| origin.same_as_host(host))
                || matches!(&self.0.origins, Origins::List(list)
                    if list.contains(&origin.serialized))
        });
        if allowed {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "this origin may not open a WebSocket here (SEQCAST_ALLOWED_ORIGINS)",
            ))
        }
    }

    /// Whether a page of `origin`, another origin than the server's, may read HTTP API answers
    /// (CORS, [`crate::router`]): the same list as for WebSockets. The server's own origin needs
    /// no CORS, so unlike [`Admission::check_origin`] this does not look at `Host`.
    pub fn allows_cross_origin(&self, origin: &str) -> bool {
        match &self.0.origins {
            Origins::Any => true,
            Origins::List(list) => {
                Origin::parse(origin).is_some_and(|origin| list.contains(&origin.serialized))
            }
        }
    }

    /// The address a client is counted under: the peer's, unless the peer is a trusted proxy;
    /// then `X-Forwarded-For` is read from the right (each proxy appends the address it was
    /// connected from) and the first hop that is not a trusted proxy is the client. A hop that
    /// is not an address ends the walk at the last trusted one.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let mut nearest = peer.ip().to_canonical();
        if !self.is_trusted(nearest) {
            return nearest;
        }
        let hops = headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .rev()
            .flat_map(|value| value.to_str().unwrap_or("?").rsplit(','))
            .map(str::trim)
            .filter(|hop| !hop.is_empty());
        for hop in hops {
            match parse_hop(hop) {
                Some(ip) if self.is_trusted(ip) => nearest = ip,
                Some(ip) => return ip,
                None => break,
            }
        }
        nearest
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.0.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// Takes a place on this node for a connection from `ip`: refused when the node or the
    /// address is at its limit.
    pub fn admit(&self, ip: IpAddr) -> Result<Permit, Refusal> {
        let inner = &self.0;
        let max = inner.max_total;
        inner
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .map_err(|_| Refusal::NodeFull)?;
        let mut permit = Permit {
            admission: Arc::clone(inner),
            ip: None,
            user: None,
        };
        if inner.max_per_ip > 0 {
            if !acquire(&inner.per_ip, ip, inner.max_per_ip) {
                return Err(Refusal::AddressLimit);
            }
            permit.ip = Some(ip);
        }
        Ok(permit)
    }

    /// Open WebSocket connections on this node.
    pub fn open_connections(&self) -> usize {
        self.0.total.load(Ordering::Acquire)
    }
}

/// A connection's places in the counts, given back when it is dropped.
pub struct Permit {
    admission: Arc<Inner>,
    ip: Option<IpAddr>,
    user: Option<Box<str>>,
}

impl Permit {
    /// Counts the connection for `user` too (once authenticated): refused when the user is at
    /// its limit. The permit then gives back everything it holds when dropped.
    pub fn admit_user(&mut self, user: &str) -> Result<(), Refusal> {
        let inner = &self.admission;
        if inner.max_per_user == 0 || self.user.is_some() {
            return Ok(());
        }
        let user: Box<str> = user.into();
        if !acquire(&inner.per_user, user.clone(), inner.max_per_user) {
            return Err(Refusal::UserLimit);
        }
        self.user = Some(user);
        Ok(())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let inner = &self.admission;
        inner.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip.take() {
            release(&inner.per_ip, ip);
        }
        if let Some(user) = self.user.take() {
            release(&inner.per_user, user);
        }
    }
}

/// Adds one to `key`'s count unless it is already `max` (> 0). The entry's shard stays locked
/// from the read to the write, so concurrent upgrades cannot both take the last place.
fn acquire<K: Eq + Hash>(map: &DashMap<K, usize>, key: K, max: usize) -> bool {
    let mut count = map.entry(key).or_insert(0);
    // A fresh entry starts at 0 < max, so no zero entry is ever left behind by a refusal.
    if *count >= max {
        return false;
    }
    *count += 1;
    true
}

/// Takes one from `key`'s count, removing the entry at zero so the map does not only grow.
fn release<K: Eq + Hash>(map: &DashMap<K, usize>, key: K) {
    if let Entry::Occupied(mut entry) = map.entry(key) {
        let count = entry.get_mut();
        *count = count.saturating_sub(1);
        if *count == 0 {
            entry.remove();
        }
    }
}

/// A parsed `Origin` header (or configured origin).
struct Origin {
    /// `scheme://host[:port]`, lowercase, the scheme's default port omitted.
    serialized: String,
    host: String,
    port: u16,
    default_port: u16,
}

impl Origin {
    fn parse(text: &str) -> Option<Origin> {
        let uri: Uri = text.trim().parse().ok()?;
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" | "ws" => 80,
            "https" | "wss" => 443,
            _ => return None,
        };
        // An origin is scheme, host and port: no user info, path, query or fragment.
        let authority = uri.authority()?;
        if authority.as_str().contains('@') || !matches!(uri.path(), "" | "/") {
            return None;
        }
        if uri.query().is_some() {
            return None;
        }
        let host = authority.host().to_ascii_lowercase();
        let port = authority.port_u16().unwrap_or(default_port);
        let serialized = if port == default_port {
            format!("{scheme}://{host}")
        } else {
            format!("{scheme}://{host}:{port}")
        };
        Some(Origin {
            serialized,
            host,
            port,
            default_port,
        })
    }

    /// True when this origin names the host a request was sent to (its `Host` header).
    fn same_as_host(&self, host: &str) -> bool {
        let Ok(host) = host.trim().parse::<Authority>() else {
            return false;
        };
        host.host().eq_ignore_ascii_case(&self.host)
            && host.port_u16().unwrap_or(self.default_port) == self.port
    }
}

fn normalize_origin(text: &str) -> anyhow::Result<String> {
    match Origin::parse(text) {
        Some(origin) => Ok(origin.serialized),
        None => bail!("not an http(s) origin"),
    }
}

/// Parses a CIDR range, or a single address (a range of one).
fn parse_range(text: &str) -> anyhow::Result<IpNet> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    let ip: IpAddr = text
        .parse()
        .context("expected a CIDR range (10.0.0.0/8) or an address")?;
    Ok(IpNet::from(ip.to_canonical()))
}

/// One `X-Forwarded-For` hop: an address, possibly with a port (`1.2.3.4:80`, `[::1]:80`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let ip = hop
        .parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse().ok())
        })?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn admission(edit: impl FnOnce(&mut Config)) -> Admission {
        let mut config = Config::default();
        edit(&mut config);
        Admission::new(&config).unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn origins() {
        let a = admission(|c| c.allowed_origins = vec!["https://App.example.com:443/".into()]);
        let ok = |pairs: &[(&'static str, &str)]| a.check_origin(&headers(pairs)).is_ok();
        assert!(
            ok(&[("host", "chat.example.com")]),
            "no Origin: native client"
        );
        assert!(ok(&[
            ("host", "chat.example.com"),
            ("origin", "https://chat.example.com")
        ]));
        assert!(ok(&[
            ("host", "chat.example.com:443"),
            ("origin", "https://CHAT.example.com")
        ]));
        assert!(ok(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080")
        ]));
        assert!(ok(&[
            ("host", "chat.example.com"),
            ("origin", "https://app.example.com")
        ]));
        assert!(!ok(&[
            ("host", "chat.example.com"),
            ("origin", "https://evil.example")
        ]));
        assert!(!ok(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8081")
        ]));
        assert!(!ok(&[
            ("host", "chat.example.com"),
            ("origin", "http://app.example.com")
        ]));
        assert!(!ok(&[("host", "chat.example.com"), ("origin", "null")]));
        assert!(!ok(&[("origin", "https://chat.example.com")]), "no Host");

        let any = admission(|c| c.allowed_origins = vec!["*".into()]);
        assert!(any
            .check_origin(&headers(&[("origin", "https://evil.example")]))
            .is_ok());

        let config = Config {
            allowed_origins: vec!["example.com".into()],
            ..Config::default()
        };
        assert!(Admission::new(&config).is_err(), "an origin needs a scheme");
    }

    #[test]
    fn client_address() {
        let peer: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let xff = |v: &str| headers(&[("x-forwarded-for", v)]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();

        let untrusting = admission(|_| {});
        assert_eq!(untrusting.client_ip(peer, &xff("1.2.3.4")), ip("10.0.0.5"));

        let a = admission(|c| c.trusted_proxies = vec!["10.0.0.0/8".into(), "192.0.2.7".into()]);
        assert_eq!(a.client_ip(peer, &HeaderMap::new()), ip("10.0.0.5"));
        assert_eq!(a.client_ip(peer, &xff("1.2.3.4")), ip("1.2.3.4"));
        // A client may forge the left of the list; the right is what trusted proxies wrote.
        assert_eq!(
            a.client_ip(peer, &xff("6.6.6.6, 1.2.3.4, 192.0.2.7, 10.1.1.1")),
            ip("1.2.3.4")
        );
        assert_eq!(a.client_ip(peer, &xff("10.9.9.9")), ip("10.9.9.9"));
        assert_eq!(a.client_ip(peer, &xff("junk, 10.9.9.9")), ip("10.9.9.9"));
        assert_eq!(
            a.client_ip(peer, &xff("[2001:db8::1]:443")),
            ip("2001:db8::1")
        );
        // Several headers read as one list, in order.
        let two = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        assert_eq!(a.client_ip(peer, &two), ip("2.2.2.2"));
        // An IPv4 peer seen through a dual-stack socket.
        let mapped: SocketAddr = "[::ffff:10.0.0.5]:4000".parse().unwrap();
        assert_eq!(a.client_ip(mapped, &xff("1.2.3.4")), ip("1.2.3.4"));

        let config = Config {
            trusted_proxies: vec!["10.0.0.0/33".into()],
            ..Config::default()
        };
        assert!(Admission::new(&config).is_err());
    }

    #[test]
    fn counts_are_given_back() {
        let a = admission(|c| {
            c.max_connections = 3;
            c.max_connections_per_ip = 2;
            c.max_connections_per_user = 1;
        });
        let ip1: IpAddr = "1.1.1.1".parse().unwrap();
        let ip2: IpAddr = "2.2.2.2".parse().unwrap();
        let mut p1 = a.admit(ip1).unwrap();
        p1.admit_user("alice").unwrap();
        let mut p2 = a.admit(ip1).unwrap();
        assert_eq!(p2.admit_user("alice"), Err(Refusal::UserLimit));
        p2.admit_user("bob").unwrap();
        assert_eq!(a.admit(ip1).err(), Some(Refusal::AddressLimit));
        let p3 = a.admit(ip2).unwrap();
        assert_eq!(a.admit(ip2).err(), Some(Refusal::NodeFull));
        assert_eq!(a.open_connections(), 3);

        drop(p1);
        let mut again = a.admit(ip1).unwrap();
        again.admit_user("alice").unwrap();
        drop((again, p2, p3));
        assert_eq!(a.open_connections(), 0);
        assert!(
            a.0.per_ip.is_empty() && a.0.per_user.is_empty(),
            "no zero entries kept"
        );
    }

    #[test]
    fn zero_turns_limits_off() {
        let a = admission(|c| {
            c.max_connections = 0;
            c.max_connections_per_ip = 0;
            c.max_connections_per_user = 0;
        });
        let ip: IpAddr = "1.1.1.1".parse().unwrap();
        let permits: Vec<Permit> = (0..100)
            .map(|_| {
                let mut p = a.admit(ip).unwrap();
                p.admit_user("alice").unwrap();
                p
            })
            .collect();
        assert_eq!(a.open_connections(), 100);
        assert!(a.0.per_ip.is_empty() && a.0.per_user.is_empty());
        drop(permits);
        assert_eq!(a.open_connections(), 0);
    }
}
