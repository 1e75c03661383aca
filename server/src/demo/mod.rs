//! The demo page at `/`: a small chat UI on the JavaScript client library, embedded in the binary
//! (no files to deploy, and the page always matches the node's protocol).
//!
//! - `/`: the page; `/demo/app.js`, `/demo/style.css`: its script and style (this directory);
//! - `/client/seqcast.js` and the modules it imports (`/client/emitter.js`,
//!   `/client/presence.js`): the client library itself, the very files of `clients/js/src/` (its
//!   relative imports resolve next to it). A unit test fails when the library imports a file not
//!   served here.
//!
//! Static and public: the page holds no secret, and it talks to the node only through the public
//! API with the credential its user types in. A strict Content-Security-Policy keeps it to its own
//! scripts and this origin's WebSocket.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::app::AppState;

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");
/// The client library's files, by the name they are served under (`/client/NAME`).
const CLIENT_FILES: &[(&str, &str)] = &[
    (
        "seqcast.js",
        include_str!("../../../clients/js/src/index.js"),
    ),
    (
        "emitter.js",
        include_str!("../../../clients/js/src/emitter.js"),
    ),
    (
        "presence.js",
        include_str!("../../../clients/js/src/presence.js"),
    ),
];

/// Scripts, styles and connections from this origin only (WebSocket included: `'self'` covers
/// `ws:`/`wss:` to the same host in current browsers, listed explicitly for older ones).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
                   connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; \
                   form-action 'self'; frame-ancestors 'none'";

pub fn routes() -> Router<AppState> {
    let mut router = Router::new()
        .route("/", get(|| async { page() }))
        .route("/demo/app.js", get(|| async { asset(JS, APP_JS) }))
        .route("/demo/style.css", get(|| async { asset(CSS, STYLE_CSS) }));
    for &(name, body) in CLIENT_FILES {
        router = router.route(
            &format!("/client/{name}"),
            get(move || async move { asset(JS, body) }),
        );
    }
    router
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        INDEX_HTML,
    )
        .into_response()
}

/// `no-cache`: a browser revalidates, so a node upgrade never leaves a page on an old client.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every relative module a served client file imports (`from './x.js'`) is served too: a
    /// browser would otherwise fail to load the library, and the page would never connect.
    #[test]
    fn every_import_of_the_client_is_served() {
        for (name, body) in CLIENT_FILES {
            for line in body
                .lines()
                .filter(|l| l.trim_start().starts_with("import"))
            {
                let Some((_, rest)) = line.split_once("from './") else {
                    continue;
                };
                let file = rest.split(['\'', '"']).next().unwrap_or_default();
                assert!(
                    CLIENT_FILES.iter().any(|(served, _)| *served == file),
                    "{name} imports ./{file}, which /client/ does not serve"
                );
            }
        }
    }
}
