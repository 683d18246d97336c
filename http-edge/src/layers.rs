//! The layer stack every API's router is wrapped in, outermost last: request id, trace
//! context, the request span, request id echoed, panics caught, the body read whole before
//! routing (bounded in size and time), axum's body limit. An API supplies how its refusals
//! look ([`EdgeAnswers`]): the command API answers problem documents, the query API GraphQL
//! errors.

use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::HeaderName;
use axum::middleware::{self, Next};
use axum::response::Response;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::body::{self, BodyError};
use crate::telemetry;

/// The header a request's id travels in (set when the client sent none, echoed in the answer).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// How much of a body is read, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub timeout: Duration,
}

/// How an API answers what its edge refuses before a handler runs.
pub trait EdgeAnswers: Clone + Send + Sync + 'static {
    /// The body was too large, too slow or unreadable (the connection is closed after it).
    fn body_refused(&self, error: &BodyError) -> Response;
    /// A handler panicked.
    fn panicked(&self) -> Response;
}

/// Wraps `router` in the edge's layers.
pub fn with_edge_layers<S, A>(router: Router<S>, body: BodyLimits, answers: A) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    A: EdgeAnswers,
{
    let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    let on_panic = answers.clone();
    router
        .layer(DefaultBodyLimit::max(body.max_bytes))
        .layer(middleware::from_fn_with_state((body, answers), read_whole_body::<A>))
        .layer(CatchPanicLayer::custom(move |_| on_panic.panicked()))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(telemetry::request_span))
        .layer(middleware::from_fn(telemetry::ensure_trace_context))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

/// Reads the body before routing (see [`crate::body`]).
async fn read_whole_body<A: EdgeAnswers>(
    State((limits, answers)): State<(BodyLimits, A)>,
    request: Request,
    next: Next,
) -> Response {
    match body::read_whole_body(request, limits.max_bytes, limits.timeout).await {
        Ok(request) => next.run(request).await,
        Err(error) => body::closing(answers.body_refused(&error)),
    }
}
