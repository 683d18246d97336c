//! The web console (`GET /`) and GraphiQL (`GET /graphql`), served from files embedded in the
//! binary (`query-api/web/`), and, in development only, `POST /console/dev-token` (and a
//! `GET` of it, which tells the sign-in page to offer the mint buttons).
//!
//! Nothing is fetched from another host: the vendored browser code (uPlot, GraphiQL, React;
//! see `web/vendor/README.md`) is served under `/console/vendor/`, and the pages'
//! Content-Security-Policy allows scripts from this origin only. Assets carry a strong ETag and
//! `Cache-Control: no-cache` (their URLs hold no version, so a browser revalidates and gets a
//! 304); large text files are gzip-compressed once, on first request, for clients that accept
//! it (GraphiQL's bundle is 3.5 MB, 730 KB compressed).

use std::io::Write;
use std::sync::OnceLock;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use chrono::Utc;
use http_edge::auth::{DEVELOPMENT_SECRET, KeySource, Role, mint_token};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::reply::{Json, Rejection};
use crate::state::AppState;

/// One embedded file.
struct Asset {
    /// Where it is served.
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
    /// Its ETag and gzip-compressed bytes, computed on first request (not at start-up: tests
    /// build many query APIs that never serve a file).
    prepared: OnceLock<Prepared>,
}

struct Prepared {
    etag: String,
    gzip: Option<Bytes>,
}

macro_rules! asset {
    ($path:literal, $file:literal, $content_type:expr) => {
        Asset {
            path: $path,
            content_type: $content_type,
            bytes: include_bytes!(concat!("../web/", $file)),
            prepared: OnceLock::new(),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";

/// The console's page; served at `/` (not in [`ASSETS`]: it gets a policy).
static INDEX: Asset = asset!("/", "index.html", HTML);
/// GraphiQL's page; served at `GET /graphql` when GraphiQL is on.
static GRAPHIQL: Asset = asset!("/graphql", "graphiql.html", HTML);

/// Every file the pages load.
static ASSETS: [Asset; 11] = [
    asset!("/console/console.js", "console.js", JS),
    asset!("/console/live.js", "live.js", JS),
    asset!("/console/graphql.js", "graphql.js", JS),
    asset!("/console/graphiql.js", "graphiql.js", JS),
    asset!("/console/console.css", "console.css", CSS),
    asset!("/console/vendor/uPlot.iife.min.js", "vendor/uPlot.iife.min.js", JS),
    asset!("/console/vendor/uPlot.min.css", "vendor/uPlot.min.css", CSS),
    asset!("/console/vendor/graphiql.min.js", "vendor/graphiql.min.js", JS),
    asset!("/console/vendor/graphiql.min.css", "vendor/graphiql.min.css", CSS),
    asset!(
        "/console/vendor/react.production.min.js",
        "vendor/react.production.min.js",
        JS
    ),
    asset!(
        "/console/vendor/react-dom.production.min.js",
        "vendor/react-dom.production.min.js",
        JS
    ),
];

/// Smaller files are sent as they are: compressing them saves less than a round of headers.
const GZIP_FROM_BYTES: usize = 1024;

/// The console's routes: `/`, its assets, and `POST /console/dev-token` when the query API
/// verifies tokens with the development secret (the route does not exist otherwise: 404).
pub(crate) fn router(state: &AppState) -> Router<AppState> {
    let mut router = Router::new().route(
        "/",
        get(|headers: HeaderMap| async move { page(&INDEX, &headers, Page::Console).await }),
    );
    for asset in &ASSETS {
        router = router.route(
            asset.path,
            get(move |headers: HeaderMap| async move { serve(asset, &headers).await }),
        );
    }
    if development_keys(&state.config.keys) {
        router = router.route("/console/dev-token", get(dev_token_offer).post(dev_token));
    }
    router
}

/// GraphiQL's page (the caller checked that GraphiQL is on).
pub(crate) async fn graphiql_page(headers: &HeaderMap) -> Response {
    page(&GRAPHIQL, headers, Page::Graphiql).await
}

/// True when tokens are verified with the public development secret: anyone can mint tokens
/// for such an instance already, so minting them here gives nothing away.
fn development_keys(keys: &KeySource) -> bool {
    matches!(keys, KeySource::Secret(secret) if secret == DEVELOPMENT_SECRET)
}

#[derive(Debug, Clone, Copy)]
enum Page {
    Console,
    Graphiql,
}

/// An HTML page with its Content-Security-Policy: scripts, styles and connections to this
/// origin only (WebSockets named explicitly: browsers before CSP 3 do not count `ws:` as
/// `'self'`).
async fn page(asset: &'static Asset, headers: &HeaderMap, kind: Page) -> Response {
    let sockets = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .filter(|host| plain_host(host))
        .map(|host| format!(" ws://{host} wss://{host}"))
        .unwrap_or_default();
    // GraphiQL's editors (CodeMirror, emotion) write <style> elements: only its page allows
    // inline styles. Neither page allows inline scripts or eval.
    let styles = match kind {
        Page::Console => "'self'",
        Page::Graphiql => "'self' 'unsafe-inline'",
    };
    let policy = format!(
        "default-src 'none'; script-src 'self'; style-src {styles}; img-src 'self' data:; \
         font-src 'self' data:; connect-src 'self'{sockets}; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    );
    let mut response = serve(asset, headers).await;
    if let Ok(value) = HeaderValue::from_str(&policy) {
        response.headers_mut().insert(header::CONTENT_SECURITY_POLICY, value);
    }
    let extra = response.headers_mut();
    extra.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    extra.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// A Host header that can go into a policy as it is (a name or address and a port); anything
/// else (a `;`, a space) could add directives, and is left out.
fn plain_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// One asset, gzip-compressed when the client accepts it, or 304 when the client has it.
async fn serve(asset: &'static Asset, headers: &HeaderMap) -> Response {
    let prepared = prepared(asset).await;
    let gzip = prepared.gzip.as_ref().filter(|_| accepts_gzip(headers));
    // Each encoding is its own representation with its own strong ETag.
    let etag = match gzip {
        Some(_) => format!("\"{}-gz\"", prepared.etag),
        None => format!("\"{}\"", prepared.etag),
    };
    let mut response = if if_none_match(headers, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        match gzip {
            Some(bytes) => (
                [(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"))],
                bytes.clone(),
            )
                .into_response(),
            None => Bytes::from_static(asset.bytes).into_response(),
        }
    };
    let out = response.headers_mut();
    out.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    out.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if prepared.gzip.is_some() {
        out.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    if let Ok(value) = HeaderValue::from_str(&etag) {
        out.insert(header::ETAG, value);
    }
    response
}

/// The asset's ETag and compressed bytes; computed once, off the async workers (compressing
/// GraphiQL's bundle takes a few hundred milliseconds).
async fn prepared(asset: &'static Asset) -> &'static Prepared {
    if let Some(prepared) = asset.prepared.get() {
        return prepared;
    }
    match tokio::task::spawn_blocking(move || asset.prepared.get_or_init(|| prepare(asset))).await {
        Ok(prepared) => prepared,
        Err(_) => asset.prepared.get_or_init(|| prepare(asset)),
    }
}

fn prepare(asset: &Asset) -> Prepared {
    let digest = Sha256::digest(asset.bytes);
    let etag = hex::encode(&digest[..16]);
    let gzip = (asset.bytes.len() >= GZIP_FROM_BYTES)
        .then(|| {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            encoder.write_all(asset.bytes).and_then(|()| encoder.finish())
        })
        // Writing into memory does not fail; if it did, the file goes out uncompressed.
        .and_then(Result::ok)
        .map(Bytes::from);
    Prepared { etag, gzip }
}

/// `Accept-Encoding` names gzip (or `*`) with a q-value above zero.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == etag || tag == "*")
}

/// How long a development token lives, at most (the verifier's limit may be shorter).
const DEV_TOKEN_LIFETIME: chrono::Duration = chrono::Duration::hours(12);

/// `GET /console/dev-token`: tells the console that it may offer to mint tokens.
async fn dev_token_offer() -> Response {
    Json::ok(r#"{"roles":["user","admin"]}"#)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenRequest {
    role: DevRole,
    /// The user id the token speaks for; a new one when absent.
    subject: Option<Uuid>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum DevRole {
    User,
    Admin,
}

/// `POST /console/dev-token` `{"role": "user"|"admin", "subject": "<uuid>"}`: a token signed
/// with the development secret.
async fn dev_token(State(state): State<AppState>, body: Bytes) -> Response {
    let request: DevTokenRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            return Rejection::new(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"role\": \"user\"|\"admin\", \"subject\": \"<uuid>\"}}: {error}"),
                "BAD_REQUEST",
            )
            .into_response();
        }
    };
    let role = match request.role {
        DevRole::User => Role::User,
        DevRole::Admin => Role::Admin,
    };
    let subject = request.subject.unwrap_or_else(Uuid::now_v7);
    let lifetime = state
        .config
        .max_token_lifetime
        .and_then(|limit| chrono::Duration::from_std(limit).ok())
        .map_or(DEV_TOKEN_LIFETIME, |limit| limit.min(DEV_TOKEN_LIFETIME));
    let now = Utc::now();
    match mint_token(DEVELOPMENT_SECRET, &subject.to_string(), role, &[], now, lifetime) {
        Ok(token) => {
            tracing::warn!(%role, %subject, "minted a development token for the web console");
            let body = serde_json::json!({
                "token": token,
                "role": role,
                "subject": subject,
                "expiresAt": (now + lifetime).to_rfc3339(),
            });
            Json::ok(body.to_string())
        }
        Err(error) => {
            tracing::error!(%error, "cannot sign a development token");
            Rejection::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot sign a token",
                "INTERNAL_SERVER_ERROR",
            )
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn gzip_is_sent_only_to_clients_that_accept_it() {
        assert!(accepts_gzip(&headers(&[("accept-encoding", "gzip, deflate, br")])));
        assert!(accepts_gzip(&headers(&[("accept-encoding", "br;q=1.0, GZIP;q=0.5")])));
        assert!(accepts_gzip(&headers(&[("accept-encoding", "*")])));
        assert!(!accepts_gzip(&headers(&[("accept-encoding", "gzip;q=0")])));
        assert!(!accepts_gzip(&headers(&[("accept-encoding", "identity")])));
        assert!(!accepts_gzip(&headers(&[])));
    }

    #[test]
    fn a_host_header_that_could_add_policy_directives_is_left_out() {
        assert!(plain_host("127.0.0.1:8081"));
        assert!(plain_host("[::1]:8081"));
        assert!(plain_host("console.example.com"));
        assert!(!plain_host("evil; script-src *"));
        assert!(!plain_host(""));
    }

    #[test]
    fn every_embedded_file_is_served_at_a_console_path() {
        for asset in &ASSETS {
            assert!(asset.path.starts_with("/console/"), "{}", asset.path);
            assert!(!asset.bytes.is_empty(), "{}", asset.path);
        }
    }

    #[test]
    fn only_the_development_secret_enables_dev_tokens() {
        assert!(development_keys(&KeySource::Secret(DEVELOPMENT_SECRET.to_owned())));
        assert!(!development_keys(&KeySource::Secret("a-real-secret".to_owned())));
    }
}
