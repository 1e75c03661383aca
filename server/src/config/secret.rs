//! Values that must not reach a log by accident: [`Secret`] (the JWT secret, the API key) and
//! [`SecretUrl`] (`DATABASE_URL`, `REDIS_URL`, whose user info may carry a password).
//!
//! Their `Debug` and `Display` print `[redacted]` (a URL keeps everything but its password), so
//! a `{:?}` of the whole [`Config`](super::Config) is safe; the value itself takes an explicit
//! `.expose()`, easy to find in a review.

use std::fmt;

/// What a redacted value prints as.
pub const REDACTED: &str = "[redacted]";

/// A secret string: printed as `[redacted]`, read with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself: only for the code that verifies or signs with it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// A connection URL whose password is redacted when printed (`postgres://app:[redacted]@db/x`);
/// [`SecretUrl::expose`] is the URL to connect with.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> SecretUrl {
        SecretUrl(url.into())
    }

    /// The full URL, password included: only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// Drops the password from a connection URL: the user info's (`user:[redacted]@`) and a
/// `password=` query parameter's (Postgres accepts both).
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let creds = &base[scheme_end + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!(
                "{}://{user}:{REDACTED}@{}",
                &base[..scheme_end],
                &base[at + 1..]
            )
        }
        _ => base.to_owned(),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                    format!("{key}={REDACTED}")
                }
                _ => param.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_print_redacted() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn urls_lose_their_passwords() {
        let cases = [
            (
                "postgres://app:pw@db:5432/x",
                "postgres://app:[redacted]@db:5432/x",
            ),
            ("redis://:pw@cache:6379", "redis://:[redacted]@cache:6379"),
            (
                "postgres://db/x?user=a&password=pw",
                "postgres://db/x?user=a&password=[redacted]",
            ),
            ("sqlite://seqcast.db", "sqlite://seqcast.db"),
        ];
        for (url, shown) in cases {
            assert_eq!(SecretUrl::new(url).to_string(), shown);
            assert!(
                !format!("{:?}", SecretUrl::new(url)).contains("pw"),
                "{url}"
            );
            assert_eq!(SecretUrl::new(url).expose(), url);
        }
    }
}
