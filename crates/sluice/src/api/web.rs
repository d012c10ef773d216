//! The web page at `/`: a chat and a live view of the caller's streams, served from assets
//! compiled into the binary (`crates/sluice/web/`: plain HTML, CSS and JavaScript, no build step,
//! nothing fetched from elsewhere, so it works offline).
//!
//! The page talks to the same API as any client, with the key the user gives it. Every asset is
//! sent with a Content-Security-Policy that allows scripts, styles and connections from this
//! origin only: even if a model's text were ever taken for HTML, no script in it could run and
//! nothing could be sent elsewhere.

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::AppState;

const INDEX: &str = include_str!("../../web/index.html");
const SCRIPT: &str = include_str!("../../web/app.js");
const STYLE: &str = include_str!("../../web/app.css");

/// What the page may load and run: its own origin's scripts, styles and API, nothing inline.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page's routes (no key needed: the assets hold no data).
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/app.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
    ];
    (headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets() {
        // Nothing from a CDN or another origin: the page works offline and leaks nothing.
        for (name, text) in [
            ("index.html", INDEX),
            ("app.js", SCRIPT),
            ("app.css", STYLE),
        ] {
            for foreign in ["http://", "https://", "//cdn", "@import"] {
                let allowed = |line: &str| {
                    line.contains("http://www.w3.org/2000/svg") || line.contains("/^https?:")
                };
                assert!(
                    !text.lines().any(|l| l.contains(foreign) && !allowed(l)),
                    "{name} refers to {foreign}"
                );
            }
        }
        // Model text never goes in as HTML.
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!SCRIPT.contains(sink), "app.js uses {sink}");
        }
        assert!(INDEX.contains(r#"<script type="module" src="/app.js">"#));
    }
}
