//! Who a client is and which rooms it may touch.
//!
//! A client presents a JWT or, over HTTP (and the WebSocket), the server API key. Tokens are
//! verified with the HS256 secret (`SEQCAST_JWT_SECRET`), a PEM public key
//! (`SEQCAST_JWT_PUBLIC_KEY`: RSA for RS256, EC P-256 for ES256), or either of the two when both
//! are set. Each key accepts only its own algorithm: a token's `alg` header picks among the
//! configured keys and never changes how a key is used, so `alg: none` and algorithm confusion
//! (an HS256 token "signed" with the public key's bytes) fail.
//!
//! Without any key the node is in development mode and everyone is an anonymous user with
//! access to every room. Room permissions are glob patterns in which `*` matches any run of
//! characters.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Deserializer, Serialize};

use crate::config::{Config, Secret};
pub use seqcast_protocol::pattern_matches;

/// The claims seqcast reads from a token. `nbf`, `aud` and `iss` are checked by the verifier
/// (see [`Authenticator`]) and not kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id, shown as `from` on the user's messages.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch. Required, and a JSON number: `"exp":"1700000000"`
    /// is refused.
    #[serde(deserialize_with = "numeric_date")]
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

    /// A development-mode client that named itself with a `dev:NAME` token (see
    /// [`dev_name`]): that name, every room.
    fn dev_named(name: &str) -> Identity {
        Identity {
            user: name.to_owned(),
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
    #[error("token not yet valid")]
    NotYetValid,
    #[error("invalid token")]
    Invalid,
}

/// Why a connection's `auth` frame (a token refresh) was refused; the old token stays in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    /// The new token does not verify (`unauthorized`).
    #[error(transparent)]
    Unauthorized(#[from] AuthError),
    /// The new token is valid but names another user (`forbidden`): a connection keeps its user.
    #[error("the token is for another user; a connection cannot change its user")]
    OtherUser,
}

/// What tokens must satisfy besides their signature.
#[derive(Debug, Clone, Default)]
pub struct TokenRules {
    /// Required `aud` (`SEQCAST_JWT_AUDIENCE`).
    pub audience: Option<String>,
    /// Required `iss` (`SEQCAST_JWT_ISSUER`).
    pub issuer: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf` (`SEQCAST_JWT_LEEWAY`), in whole seconds.
    pub leeway: Duration,
}

/// A public key read from a PEM file, pinned to the one algorithm its type allows.
#[derive(Clone)]
pub struct PublicKey {
    alg: Algorithm,
    key: DecodingKey,
}

impl PublicKey {
    /// Reads a PEM public key (`-----BEGIN PUBLIC KEY-----`, or PKCS#1
    /// `-----BEGIN RSA PUBLIC KEY-----`): RSA keys verify RS256, EC P-256 keys ES256. Anything
    /// else (a private key, a certificate, another curve, Ed25519) is refused with a reason.
    pub fn from_pem(pem: &[u8]) -> anyhow::Result<PublicKey> {
        let text = std::str::from_utf8(pem).context("not a PEM file (not text)")?;
        let label = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
            .context("not a PEM file (no -----BEGIN ...----- line)")?;
        match label {
            "PUBLIC KEY" | "RSA PUBLIC KEY" => {}
            l if l.contains("PRIVATE KEY") => bail!(
                "this is a private key ({l}); give the public key instead \
                 (openssl pkey -in private.pem -pubout)"
            ),
            l => bail!("expected -----BEGIN PUBLIC KEY-----, found {l}"),
        }
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(PublicKey {
                alg: Algorithm::RS256,
                key,
            });
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            // jsonwebtoken reads the curve point only when it verifies a token. Verify a dummy
            // token now, so a key that is not a P-256 point fails at start-up and not on every
            // token: a usable key gets as far as the (bad) signature.
            let probe = "eyJhbGciOiJFUzI1NiJ9.e30.AA"; // {"alg":"ES256"} . {} . 0x00
            let outcome = jsonwebtoken::decode::<serde_json::Value>(
                probe,
                &key,
                &Validation::new(Algorithm::ES256),
            );
            return match outcome.map_err(|e| e.into_kind()) {
                Err(ErrorKind::InvalidSignature) => Ok(PublicKey {
                    alg: Algorithm::ES256,
                    key,
                }),
                _ => bail!("an EC key that is not on curve P-256 (ES256 is the only EC algorithm)"),
            };
        }
        bail!("not an RSA or EC P-256 public key (only RS256 and ES256 are supported)")
    }

    /// The algorithm tokens signed with this key's private half must use.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

/// One key tokens may be signed with, and the validation (algorithm pinned) that goes with it.
#[derive(Clone)]
struct TokenKey {
    key: DecodingKey,
    validation: Validation,
}

/// Verifies credentials. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    /// At most one key per algorithm; empty in development mode.
    keys: Vec<TokenKey>,
    leeway: Duration,
    api_key: Option<String>,
}

impl Authenticator {
    /// The node's authenticator: the secret, the public key file (read now: a missing or bad
    /// file fails start-up), the token rules and the server key from `config`.
    pub fn from_config(config: &Config) -> anyhow::Result<Authenticator> {
        let public_key = match &config.jwt_public_key {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("SEQCAST_JWT_PUBLIC_KEY: cannot read {path}"))?;
                let key = PublicKey::from_pem(&pem)
                    .with_context(|| format!("SEQCAST_JWT_PUBLIC_KEY: {path}"))?;
                Some(key)
            }
        };
        let rules = TokenRules {
            audience: config.jwt_audience.clone(),
            issuer: config.jwt_issuer.clone(),
            leeway: config.jwt_leeway,
        };
        Ok(Authenticator::new(
            config.jwt_secret.as_ref().map(Secret::expose),
            public_key,
            &rules,
            config.api_key.as_ref().map(Secret::expose),
        ))
    }

    /// An authenticator with an HS256 `secret`, a `public_key`, both, or neither (development
    /// mode).
    pub fn new(
        secret: Option<&str>,
        public_key: Option<PublicKey>,
        rules: &TokenRules,
        api_key: Option<&str>,
    ) -> Authenticator {
        let hmac = secret.map(|s| (Algorithm::HS256, DecodingKey::from_secret(s.as_bytes())));
        let public = public_key.map(|p| (p.alg, p.key));
        let keys = hmac
            .into_iter()
            .chain(public)
            .map(|(alg, key)| TokenKey {
                key,
                validation: validation(alg, rules),
            })
            .collect();
        Authenticator {
            keys,
            leeway: Duration::from_secs(rules.leeway.as_secs()),
            api_key: api_key.map(str::to_string),
        }
    }

    pub fn dev_mode(&self) -> bool {
        self.keys.is_empty()
    }

    /// Authenticates a WebSocket client. In development mode the client is anonymous whatever it
    /// presents; the server API key is accepted too (as `system`, every room).
    pub fn websocket(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        if self.dev_mode() {
            return match token {
                Some(t) if self.is_api_key(t) => Ok(Identity::server()),
                Some(t) => Ok(dev_name(t).map_or_else(Identity::anonymous, Identity::dev_named)),
                None => Ok(Identity::anonymous()),
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

    /// Checks a fresh credential for a connection authenticated as `current` (the `auth`
    /// frame). It must name the same principal: the same `sub`, and a token stays a token (the
    /// server key stays the server key). In development mode nothing is checked: a `dev:NAME`
    /// token renames the connection's user (how the demo page picks a name, since its client
    /// sends `auth` first), anything else keeps the identity.
    pub fn refresh(&self, current: &Identity, token: &str) -> Result<Identity, RefreshError> {
        if self.dev_mode() {
            return Ok(dev_name(token).map_or_else(|| current.clone(), Identity::dev_named));
        }
        let fresh = self.bearer(Some(token))?;
        if fresh.user != current.user || fresh.is_server() != current.is_server() {
            return Err(RefreshError::OtherUser);
        }
        Ok(fresh)
    }

    /// How long from now until a token with this `exp` is no longer accepted (`exp` plus the
    /// leeway); zero if that has passed.
    ///
    /// Saturating, never `SystemTime + Duration`: `exp` is whatever the token's issuer wrote, and
    /// a `SystemTime` cannot hold 2^63 seconds (that addition panicked the session).
    pub fn time_left(&self, exp: u64) -> Duration {
        let deadline = Duration::from_secs(exp).saturating_add(self.leeway);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        deadline.saturating_sub(now)
    }

    fn bearer(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        if self.is_api_key(token) {
            return Ok(Identity::server());
        }
        let c = self.verify(token).map_err(|e| {
            tracing::debug!(reason = ?e, "token refused");
            match e {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                _ => AuthError::Invalid,
            }
        })?;
        // The sub is stored as the sender of the user's messages: a U+0000, which a Postgres
        // `TEXT` cannot hold, would fail every commit it is part of.
        if c.sub.is_empty() || c.sub.contains('\0') {
            return Err(AuthError::Invalid);
        }
        // Held for the connection's life: without the spare room a JSON array is decoded into
        // (4 entries for `["*"]`, 72 bytes unused per connection).
        let (mut rooms, mut read) = (c.rooms, c.read);
        rooms.shrink_to_fit();
        read.shrink_to_fit();
        Ok(Identity {
            user: c.sub,
            exp: Some(c.exp),
            access: Access::Patterns { rooms, read },
        })
    }

    /// The header's `alg` only selects among the configured keys, each of which verifies with
    /// its own algorithm alone.
    fn verify(&self, token: &str) -> Result<Claims, ErrorKind> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.into_kind())?;
        let key = self
            .keys
            .iter()
            .find(|k| k.validation.algorithms == [header.alg])
            .ok_or(ErrorKind::InvalidAlgorithm)?;
        jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map(|data| data.claims)
            .map_err(|e| e.into_kind())
    }

    fn is_api_key(&self, token: &str) -> bool {
        self.api_key
            .as_deref()
            .is_some_and(|k| constant_time_eq(k.as_bytes(), token.as_bytes()))
    }
}

/// The checks a token verified with `alg` must pass: `exp` and `sub` present, `exp`/`nbf`
/// numeric and in force (with the leeway), `aud`/`iss` when configured. A token that carries an
/// `aud` is refused when no audience is configured (RFC 7519: a recipient not named in `aud`
/// must reject it), so tokens minted for another service do not work here.
fn validation(alg: Algorithm, rules: &TokenRules) -> Validation {
    let mut v = Validation::new(alg);
    let mut required = vec!["exp", "sub"];
    v.leeway = rules.leeway.as_secs();
    v.validate_exp = true;
    v.validate_nbf = true;
    if let Some(aud) = &rules.audience {
        v.set_audience(&[aud]);
        required.push("aud");
    }
    if let Some(iss) = &rules.issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    v.set_required_spec_claims(&required);
    v
}

/// A NumericDate: a JSON number of seconds (a fraction is dropped); a string is refused.
fn numeric_date<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Number {
        Int(u64),
        Float(f64),
    }
    match Number::deserialize(d)? {
        Number::Int(n) => Ok(n),
        Number::Float(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => Ok(f as u64),
        Number::Float(_) => Err(serde::de::Error::custom("exp out of range")),
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs an HS256 token (the `seqcast token` command and tests), with `aud` and `iss` when
/// given.
pub fn mint(
    secret: &str,
    claims: &Claims,
    audience: Option<&str>,
    issuer: Option<&str>,
) -> Result<String, jsonwebtoken::errors::Error> {
    #[derive(Serialize)]
    struct Signed<'a> {
        #[serde(flatten)]
        claims: &'a Claims,
        #[serde(skip_serializing_if = "Option::is_none")]
        aud: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        iss: Option<&'a str>,
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &Signed {
            claims,
            aud: audience,
            iss: issuer,
        },
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Development mode only: the name in a `dev:NAME` token, when NAME is 1 to 64 characters of
/// `A-Z a-z 0-9 _ . -` and not `system` (the server key's name). Development mode is loopback
/// only and lets anyone into every room, so a chosen name grants nothing an anonymous client
/// lacks; it only makes a demo readable.
fn dev_name(token: &str) -> Option<&str> {
    let name = token.strip_prefix("dev:")?;
    let valid = (1..=64).contains(&name.len())
        && name != "system"
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    valid.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // Public keys only (generated with openssl for these tests; the private halves were
    // discarded).
    const RSA_SPKI: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAy8PH0ZQieEOPcBLUKLk3
ihhCokr4l2uGEsZxIkrLZrP442a2hV9Bh5n/VEBhyzwDbP/XSymIncB2WIW/GEpZ
BA2sC1RHmlnoUwxfLqFNweR5wGn+TBeE3fCJr8dpX+RZ9Mw6eA67aw8dvsElHd6c
EmmirrCRUaSIcTvrPCDTbSvozxAF+CPOmqf4YOgTDEURgHVi5waWp12bZddz5K48
iwNXSqvN6dMq/P3GXbBqBZa8KjNm6FZgH+Kj1ff0d9PQ/IwP3YsyCZgr4FZrQLWD
Lg6851WR7KiBquoVFilckjA5N0F9ZKvw8Y8Dh3lVQWFrrY4YkULhWrscKqFfP9Cf
8wIDAQAB
-----END PUBLIC KEY-----
";
    const RSA_PKCS1: &str = "-----BEGIN RSA PUBLIC KEY-----
MIIBCgKCAQEAy8PH0ZQieEOPcBLUKLk3ihhCokr4l2uGEsZxIkrLZrP442a2hV9B
h5n/VEBhyzwDbP/XSymIncB2WIW/GEpZBA2sC1RHmlnoUwxfLqFNweR5wGn+TBeE
3fCJr8dpX+RZ9Mw6eA67aw8dvsElHd6cEmmirrCRUaSIcTvrPCDTbSvozxAF+CPO
mqf4YOgTDEURgHVi5waWp12bZddz5K48iwNXSqvN6dMq/P3GXbBqBZa8KjNm6FZg
H+Kj1ff0d9PQ/IwP3YsyCZgr4FZrQLWDLg6851WR7KiBquoVFilckjA5N0F9ZKvw
8Y8Dh3lVQWFrrY4YkULhWrscKqFfP9Cf8wIDAQAB
-----END RSA PUBLIC KEY-----
";
    const P256: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAENV6KQGBkml1hq8m67svlpAJYmFNM
0NxQQTGOmaCjoaoY28g7SuUOATRRM2cdyAt5mf3eyfjughmI1O2+fMK4wA==
-----END PUBLIC KEY-----
";
    const P384: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEScEFIx0TZF4pi9r5+/lkjCUfJwBa+FFd
rvjfQnzGmSkpsMNaVQcavGK4rBt5K83DytxqKbew+xKmvlHr/FmJpbbWRFa+S2z0
TmYdCvqvjSj/B1pOHbsdpZ8XtglisVeb
-----END PUBLIC KEY-----
";
    const ED25519: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEA/3L8YmRgG01iGBiUQYz/gAscd7OzkHNjQxEAupYNM0k=
-----END PUBLIC KEY-----
";

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "alice".into(),
            exp,
            rooms: vec!["team-*".into()],
            read: vec!["news".into()],
        }
    }

    fn hs256(secret: &str) -> Authenticator {
        Authenticator::new(
            Some(secret),
            None,
            &TokenRules {
                leeway: Duration::from_secs(30),
                ..TokenRules::default()
            },
            Some("key"),
        )
    }

    fn sign(claims: &serde_json::Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn tokens() {
        let auth = hs256("s3cret");
        let ok = mint("s3cret", &claims(unix_now() + 60), None, None).unwrap();
        let id = auth.websocket(Some(&ok)).unwrap();
        assert_eq!(id.user, "alice");
        assert!(id.can_send("team-a") && !id.can_send("news") && id.can_read("news"));
        assert!(!id.can_read("general"));

        let expired = mint("s3cret", &claims(unix_now() - 3600), None, None).unwrap();
        assert_eq!(
            auth.websocket(Some(&expired)).unwrap_err(),
            AuthError::Expired
        );
        let forged = mint("other", &claims(unix_now() + 60), None, None).unwrap();
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
        let auth = hs256("s3cret");
        assert!(auth
            .websocket(Some(&format!("{header}.{payload}.")))
            .is_err());
    }

    #[test]
    fn claim_formats_and_times() {
        let auth = hs256("s3cret");
        let now = unix_now();
        let check = |claims: serde_json::Value| auth.websocket(Some(&sign(&claims, b"s3cret")));
        assert!(check(json!({"sub": "a", "exp": now + 60})).is_ok());
        assert!(
            check(json!({"sub": "a", "exp": (now + 60) as f64 + 0.5})).is_ok(),
            "a fractional NumericDate is a number"
        );
        for (what, claims) in [
            ("missing exp", json!({"sub": "a"})),
            (
                "string exp",
                json!({"sub": "a", "exp": (now + 60).to_string()}),
            ),
            (
                "string nbf",
                json!({"sub": "a", "exp": now + 60, "nbf": now.to_string()}),
            ),
            ("missing sub", json!({"exp": now + 60})),
            ("empty sub", json!({"sub": "", "exp": now + 60})),
            ("NUL in sub", json!({"sub": "a\u{0}b", "exp": now + 60})),
            (
                "aud without a configured audience",
                json!({"sub": "a", "exp": now + 60, "aud": "other-service"}),
            ),
        ] {
            assert_eq!(check(claims).unwrap_err(), AuthError::Invalid, "{what}");
        }
        // The 30 s leeway on both ends.
        assert!(check(json!({"sub": "a", "exp": now - 10})).is_ok());
        assert!(check(json!({"sub": "a", "exp": now + 60, "nbf": now + 10})).is_ok());
        assert_eq!(
            check(json!({"sub": "a", "exp": now - 40})).unwrap_err(),
            AuthError::Expired
        );
        assert_eq!(
            check(json!({"sub": "a", "exp": now + 600, "nbf": now + 300})).unwrap_err(),
            AuthError::NotYetValid
        );
    }

    #[test]
    fn audience_and_issuer_when_configured() {
        let rules = TokenRules {
            audience: Some("chat".into()),
            issuer: Some("https://id.example".into()),
            leeway: Duration::from_secs(1),
        };
        let auth = Authenticator::new(Some("s3cret"), None, &rules, None);
        let exp = unix_now() + 60;
        let check = |claims: serde_json::Value| auth.websocket(Some(&sign(&claims, b"s3cret")));
        let iss = "https://id.example";
        assert!(check(json!({"sub": "a", "exp": exp, "aud": "chat", "iss": iss})).is_ok());
        assert!(check(json!({"sub": "a", "exp": exp, "aud": ["x", "chat"], "iss": iss})).is_ok());
        for claims in [
            json!({"sub": "a", "exp": exp, "aud": "other", "iss": iss}),
            json!({"sub": "a", "exp": exp, "iss": iss}),
            json!({"sub": "a", "exp": exp, "aud": "chat", "iss": "https://evil.example"}),
            json!({"sub": "a", "exp": exp, "aud": "chat"}),
        ] {
            assert_eq!(
                check(claims.clone()).unwrap_err(),
                AuthError::Invalid,
                "{claims}"
            );
        }
        let minted = mint("s3cret", &claims(exp), Some("chat"), Some(iss)).unwrap();
        assert!(
            auth.websocket(Some(&minted)).is_ok(),
            "mint adds aud and iss"
        );
    }

    #[test]
    fn public_keys_are_detected_and_pinned() {
        assert_eq!(
            PublicKey::from_pem(RSA_SPKI.as_bytes())
                .unwrap()
                .algorithm(),
            Algorithm::RS256
        );
        assert_eq!(
            PublicKey::from_pem(RSA_PKCS1.as_bytes())
                .unwrap()
                .algorithm(),
            Algorithm::RS256
        );
        assert_eq!(
            PublicKey::from_pem(P256.as_bytes()).unwrap().algorithm(),
            Algorithm::ES256
        );
        let private =
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
        for (what, pem) in [
            ("P-384", P384),
            ("Ed25519", ED25519),
            ("private key", private),
            ("garbage", "hello"),
            (
                "broken base64",
                "-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n",
            ),
        ] {
            let e = PublicKey::from_pem(pem.as_bytes()).err();
            assert!(e.is_some(), "{what} must be refused");
        }

        // Algorithm confusion: an HS256 token whose "secret" is the public key file.
        let exp = unix_now() + 60;
        let confused = sign(&json!({"sub": "a", "exp": exp}), RSA_SPKI.as_bytes());
        let rules = TokenRules::default();
        let key = || PublicKey::from_pem(RSA_SPKI.as_bytes()).unwrap();
        let public_only = Authenticator::new(None, Some(key()), &rules, None);
        assert!(!public_only.dev_mode(), "a public key alone ends dev mode");
        assert_eq!(
            public_only.websocket(Some(&confused)).unwrap_err(),
            AuthError::Invalid
        );
        let both = Authenticator::new(Some("s3cret"), Some(key()), &rules, None);
        assert_eq!(
            both.websocket(Some(&confused)).unwrap_err(),
            AuthError::Invalid
        );
        let hs = sign(&json!({"sub": "a", "exp": exp}), b"s3cret");
        assert!(both.websocket(Some(&hs)).is_ok(), "the secret still works");
    }

    #[test]
    fn refresh_keeps_the_principal() {
        let auth = hs256("s3cret");
        let now = unix_now();
        let alice = auth
            .websocket(Some(
                &mint("s3cret", &claims(now + 60), None, None).unwrap(),
            ))
            .unwrap();
        let later = mint("s3cret", &claims(now + 600), None, None).unwrap();
        assert_eq!(auth.refresh(&alice, &later).unwrap().exp, Some(now + 600));
        let mut bob = claims(now + 600);
        bob.sub = "bob".into();
        let bob = mint("s3cret", &bob, None, None).unwrap();
        assert_eq!(
            auth.refresh(&alice, &bob).unwrap_err(),
            RefreshError::OtherUser
        );
        assert_eq!(
            auth.refresh(&alice, "key").unwrap_err(),
            RefreshError::OtherUser,
            "a user cannot become the server"
        );
        assert_eq!(
            auth.refresh(&alice, "garbage").unwrap_err(),
            RefreshError::Unauthorized(AuthError::Invalid)
        );
        let dev = Authenticator::new(None, None, &TokenRules::default(), None);
        let anon = Identity::anonymous();
        assert_eq!(dev.refresh(&anon, "anything").unwrap().user, anon.user);
    }

    #[test]
    fn time_left_counts_the_leeway() {
        let auth = hs256("s3cret");
        let now = unix_now();
        let left = auth.time_left(now + 10);
        assert!(
            left > Duration::from_secs(38) && left <= Duration::from_secs(40),
            "{left:?}"
        );
        assert_eq!(auth.time_left(now - 100), Duration::ZERO);
        for exp in [1 << 63, (1 << 63) + 5, u64::MAX] {
            assert!(auth.time_left(exp) > Duration::from_secs(1 << 62), "{exp}");
        }
    }
}
