//! Cloudphone's HTTP edge: what the command API and the query API share in front of their
//! own logic.
//!
//! - [`auth`]: bearer tokens (HS256 for development, RS256/ES256 from a PEM or JWKS file),
//!   roles and scopes, token lifetime rules.
//! - [`body`]: request bodies read whole before routing, bounded in size and time.
//! - [`connections`]: serving HTTP/1.1 so no client holds a listener hostage (timeouts,
//!   connection limits, metrics, graceful shutdown).
//! - [`cors`]: cross-origin calls from the origins an operator lists, none by default.
//! - [`layers`]: the layer stack both routers are wrapped in; [`rate_limit`]: per-client
//!   token buckets.
//! - [`problem`]: RFC 9457 problem documents and the edge's own refusals.
//! - [`telemetry`]: the process-wide Prometheus recorder, request spans, W3C trace context,
//!   per-route request metrics.
//!
//! This crate must never know a command, a query, the event log or the read models: it
//! handles requests as requests, and each API maps its own failures.

pub mod auth;
pub mod body;
pub mod connections;
pub mod cors;
pub mod layers;
pub mod openapi;
pub mod problem;
pub mod rate_limit;
pub mod telemetry;
