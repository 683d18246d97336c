//! The HTTP stack alone: a server with the command API's edge (the same listener, connection
//! limits and layers: request ids, trace context, body reading, panic catching) whose every
//! handler returns a fixed answer, with no token check, no JSON and no database. Driven by the
//! same clients as the command API, it is the ceiling HTTP on this machine puts on any
//! command rate, so a command figure can be read as a fraction of it.
//!
//! It runs as a child process (`cloudphone load fixed-answer-server`, hidden from `--help`),
//! so its CPU is its own and not the load generator's.

use std::net::SocketAddr;
use std::path::Path;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use http_edge::body::BodyError;
use http_edge::connections::{self, ConnectionLimits};
use http_edge::layers::{BodyLimits, EdgeAnswers, with_edge_layers};

use crate::harness::roles::RoleProcess;

/// What every command answers: the command API's `CommandAccepted` for a device that stays
/// the same, so a client's fleet keeps one device it then starts, stops and resizes.
const ACCEPTED: &str = r#"{"id":"0192f0c4-7a4e-7cc1-9a5e-2f4a1e3b5c6d","stream_version":2,"position":123456}"#;

/// Serves fixed answers on `listen` until the process is killed.
pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = connections::bind(listen)?;
    let routes = Router::new()
        .route("/v1/devices", post(created))
        .route("/v1/devices/{id}", delete(accepted))
        .route("/v1/devices/{id}/{action}", post(accepted))
        .route("/readyz", axum::routing::get(|| async { "ready" }));
    let body = BodyLimits {
        max_bytes: 64 * 1024,
        timeout: ConnectionLimits::default().body_read_timeout,
    };
    let router = with_edge_layers(routes, body, FixedAnswers);
    connections::serve(
        listener,
        router,
        ConnectionLimits::default(),
        "fixed",
        std::future::pending(),
    )
    .await?;
    Ok(())
}

/// `cloudphone load fixed-answer-server` as a child process, killed when dropped.
pub fn start(logs: &Path) -> anyhow::Result<RoleProcess> {
    RoleProcess::start_verb("fixed-answer-server", &["load", "fixed-answer-server"], logs)
}

async fn created() -> Response {
    (StatusCode::CREATED, json(ACCEPTED)).into_response()
}

async fn accepted() -> Response {
    (StatusCode::OK, json(ACCEPTED)).into_response()
}

fn json(body: &'static str) -> ([(axum::http::HeaderName, &'static str); 1], &'static str) {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], body)
}

#[derive(Debug, Clone, Copy)]
struct FixedAnswers;

impl EdgeAnswers for FixedAnswers {
    fn body_refused(&self, _error: &BodyError) -> Response {
        StatusCode::BAD_REQUEST.into_response()
    }

    fn panicked(&self) -> Response {
        StatusCode::INTERNAL_SERVER_ERROR.into_response()
    }
}
