//! Who a client is and which rooms it may touch.
//!
//! A client presents a JWT (HS256, `SEQCAST_JWT_SECRET`) or, over HTTP, the server API key.
//! Without a secret the node is in development mode and everyone is an anonymous user with access
//! to every room. Room permissions are glob patterns in which `*` matches any run of characters.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Clock skew tolerated on `exp`, in seconds.
const LEEWAY_SECS: u64 = 30;

/// The claims seqcast reads from a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id, shown as `from` on the user's messages.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Patterns of rooms the user may join, read and send to.
    #[serde(default)]
    pub rooms: Vec<String>,
    /// Patterns of rooms the user may join and read but not send to.
    #[serde(default)]
    pub read: Vec<String>,
}

/// An authenticated principal.
#[derive(Debug, Clone)]
pub struct Identity {
    /// User id (`from` of its messages).
    pub user: String,
    /// Token expiry (Unix seconds); `None` for principals that do not expire.
    pub exp: Option<u64>,
    access: Access,
}

#[derive(Debug, Clone)]
enum Access {
    /// The server API key or development mode: every room.
    All,
    Patterns {
        rooms: Vec<String>,
        read: Vec<String>,
    },
}

impl Identity {
    /// The holder of the server API key.
    pub fn server() -> Identity {
        Identity {
            user: "system".into(),
            exp: None,
            access: Access::All,
        }
    }

    /// A development-mode client with a generated name.
    pub fn anonymous() -> Identity {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Identity {
            user: format!("anon-{}", &id[..8]),
            exp: None,
            access: Access::All,
        }
    }

    /// True for the server key (and development-mode HTTP), which may name any sender.
    pub fn is_server(&self) -> bool {
        matches!(self.access, Access::All) && self.exp.is_none() && self.user == "system"
    }

    pub fn can_read(&self, room: &str) -> bool {
        match &self.access {
            Access::All => true,
            Access::Patterns { rooms, read } => {
                rooms.iter().chain(read).any(|p| pattern_matches(p, room))
            }
        }
    }

    pub fn can_send(&self, room: &str) -> bool {
        match &self.access {
            Access::All => true,
            Access::Patterns { rooms, .. } => rooms.iter().any(|p| pattern_matches(p, room)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token")]
    Invalid,
}

/// Verifies credentials. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    jwt: Option<(DecodingKey, Validation)>,
    api_key: Option<String>,
}

impl Authenticator {
    pub fn new(jwt_secret: Option<&str>, api_key: Option<&str>) -> Authenticator {
        let jwt = jwt_secret.map(|secret| {
            // Pinned to HS256: a token's own `alg` header never chooses the algorithm, so
            // `alg: none` and algorithm-confusion tokens fail verification.
            let mut v = Validation::new(Algorithm::HS256);
            v.set_required_spec_claims(&["exp", "sub"]);
            v.leeway = LEEWAY_SECS;
            (DecodingKey::from_secret(secret.as_bytes()), v)
        });
        Authenticator {
            jwt,
            api_key: api_key.map(str::to_string),
        }
    }

    pub fn dev_mode(&self) -> bool {
        self.jwt.is_none()
    }

    /// Authenticates a WebSocket client. In development mode the client is anonymous whatever it
    /// presents; the server API key is accepted too (as `system`, every room).
    pub fn websocket(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        if self.dev_mode() {
            return match token {
                Some(t) if self.is_api_key(t) => Ok(Identity::server()),
                _ => Ok(Identity::anonymous()),
            };
        }
        self.bearer(token)
    }

    /// Authenticates an HTTP request. In development mode an unauthenticated request acts with
    /// the server key, so `curl` works out of the box on a loopback-only node.
    pub fn http(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        if self.dev_mode() {
            return Ok(Identity::server());
        }
        self.bearer(token)
    }

    fn bearer(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        if self.is_api_key(token) {
            return Ok(Identity::server());
        }
        let Some((key, validation)) = &self.jwt else {
            return Err(AuthError::Invalid);
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid,
            })?;
        let c = data.claims;
        if c.sub.is_empty() {
            return Err(AuthError::Invalid);
        }
        Ok(Identity {
            user: c.sub,
            exp: Some(c.exp),
            access: Access::Patterns {
                rooms: c.rooms,
                read: c.read,
            },
        })
    }

    fn is_api_key(&self, token: &str) -> bool {
        self.api_key
            .as_deref()
            .is_some_and(|k| constant_time_eq(k.as_bytes(), token.as_bytes()))
    }
}

/// Seconds until `exp` (plus the leeway) passes; zero if it already has.
pub fn until_expiry(exp: u64) -> std::time::Duration {
    let deadline = exp.saturating_add(LEEWAY_SECS);
    std::time::Duration::from_secs(deadline.saturating_sub(unix_now()))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs a token (the `seqcast token` command and tests).
pub fn mint(secret: &str, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// Whole-name glob match where `*` matches any run of characters (including none).
///
/// Greedy two-pointer matching with backtracking to the last `*`: linear in practice and
/// O(len(pattern) * len(name)) in the worst case, with names capped at 128 characters.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "general"));
        assert!(pattern_matches("*", ""));
        assert!(pattern_matches("team-*", "team-"));
        assert!(pattern_matches("team-*", "team-blue"));
        assert!(!pattern_matches("team-*", "team"));
        assert!(!pattern_matches("team-*", "Team-blue"), "case-sensitive");
        assert!(!pattern_matches("general", "general2"), "whole name");
        assert!(!pattern_matches("general", "xgeneral"));
        assert!(pattern_matches("a*b*c", "a-x-b-y-c"));
        assert!(!pattern_matches("a*b*c", "a-x-c-y-b"));
        assert!(pattern_matches("*-log", "x-log-log"));
        assert!(pattern_matches("**", "abc"));
    }

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "alice".into(),
            exp,
            rooms: vec!["team-*".into()],
            read: vec!["news".into()],
        }
    }

    #[test]
    fn tokens() {
        let auth = Authenticator::new(Some("s3cret"), Some("key"));
        let ok = mint("s3cret", &claims(unix_now() + 60)).unwrap();
        let id = auth.websocket(Some(&ok)).unwrap();
        assert_eq!(id.user, "alice");
        assert!(id.can_send("team-a") && !id.can_send("news") && id.can_read("news"));
        assert!(!id.can_read("general"));

        let expired = mint("s3cret", &claims(unix_now() - 3600)).unwrap();
        assert_eq!(
            auth.websocket(Some(&expired)).unwrap_err(),
            AuthError::Expired
        );
        let forged = mint("other", &claims(unix_now() + 60)).unwrap();
        assert_eq!(
            auth.websocket(Some(&forged)).unwrap_err(),
            AuthError::Invalid
        );
        assert_eq!(auth.websocket(None).unwrap_err(), AuthError::Missing);
        assert!(auth.http(Some("key")).unwrap().is_server());
        assert!(auth.http(Some("kex")).is_err());
    }

    #[test]
    fn unsigned_tokens_are_refused() {
        // {"alg":"none"} . {"sub":"mallory","exp":<far future>,"rooms":["*"]} . (no signature)
        let header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
        let payload = "eyJzdWIiOiJtYWxsb3J5IiwiZXhwIjo0MTAyNDQ0ODAwLCJyb29tcyI6WyIqIl19";
        let auth = Authenticator::new(Some("s3cret"), None);
        assert!(auth
            .websocket(Some(&format!("{header}.{payload}.")))
            .is_err());
    }
}
