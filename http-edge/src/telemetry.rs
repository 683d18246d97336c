//! Metrics and request tracing for every HTTP API: the process-wide Prometheus recorder, the
//! W3C trace context each request carries, its span, and per-route request metrics.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use uuid::Uuid;

/// Counter: HTTP requests by route, method and status.
pub const HTTP_REQUESTS_TOTAL: &str = "cloudphone_http_requests_total";
/// Histogram: HTTP request latency by route and method.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "cloudphone_http_request_duration_seconds";
/// Latency buckets (seconds) for every `_seconds` histogram.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets for counts per group commit.
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0];

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_batches".into()), COUNT_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_batch_events".into()), COUNT_BUCKETS));
            let recorder = match builder {
                Ok(builder) => builder.build_recorder(),
                // Only fails on empty bucket lists, which these are not.
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness): keep serving ours.
            let _ = metrics::set_global_recorder(recorder);
            metrics::describe_counter!(HTTP_REQUESTS_TOTAL, "HTTP requests by route, method and status");
            metrics::describe_histogram!(
                HTTP_REQUEST_DURATION_SECONDS,
                metrics::Unit::Seconds,
                "HTTP request latency"
            );
            // Every crate of the workspace shares one version.
            let build = env!("CARGO_PKG_VERSION");
            metrics::gauge!("cloudphone_build_info", "version" => build).set(1.0);
            handle
        })
        .clone()
}

/// The response header that tells a client which trace id its request ran under.
pub const TRACE_ID_HEADER: &str = "x-trace-id";

/// Gives every request a valid W3C `traceparent` (a new trace when the client sent none or a
/// malformed one) before anything reads it, so the request span, the events' metadata, the
/// Kafka headers and the projectors' logs all carry one id; answers it in `x-trace-id`.
pub async fn ensure_trace_context(mut request: Request, next: Next) -> Response {
    let trace_id = match trace_parent(request.headers()) {
        Some((trace, _)) => trace.to_owned(),
        None => {
            let trace = Uuid::new_v4().simple().to_string();
            let span = &Uuid::new_v4().simple().to_string()[..16];
            // Hex digits only: always a valid header value.
            if let Ok(value) = HeaderValue::from_str(&format!("00-{trace}-{span}-01")) {
                request.headers_mut().insert("traceparent", value);
            }
            trace
        }
    };
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&trace_id) {
        response.headers_mut().insert(TRACE_ID_HEADER, value);
    }
    response
}

/// The span every HTTP request of every API runs in: method, path, request id, trace id.
/// With OpenTelemetry export on, the span continues the caller's trace (its `traceparent`).
pub fn request_span(request: &Request) -> tracing::Span {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let parent = trace_parent(request.headers());
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %request_id,
        trace_id = parent.map_or("", |(trace, _)| trace),
    );
    if let Some((trace, parent_span)) = parent
        && let (Ok(trace), Ok(parent_span)) = (TraceId::from_hex(trace), SpanId::from_hex(parent_span))
    {
        let remote = SpanContext::new(trace, parent_span, TraceFlags::SAMPLED, true, TraceState::default());
        // Fails only when no OpenTelemetry layer is installed: nothing to continue then.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    span
}

/// Records every routed request's count and latency under its route template.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(HTTP_REQUESTS_TOTAL, "route" => route.clone(), "method" => method.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(HTTP_REQUEST_DURATION_SECONDS, "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The trace id of a valid W3C `traceparent`, else a new one. Behind the
/// [`ensure_trace_context`] layer every request has a valid one, so the request span, the
/// events' metadata and the response all carry the same id.
pub fn trace_id(headers: &HeaderMap) -> String {
    trace_parent(headers).map_or_else(|| Uuid::new_v4().simple().to_string(), |(trace, _)| trace.to_owned())
}

/// The trace id and parent span id of a valid W3C `traceparent` header (version 00 layout:
/// 32 and 16 lower-case hex digits, neither all zeros).
pub fn trace_parent(headers: &HeaderMap) -> Option<(&str, &str)> {
    let value = headers.get("traceparent")?.to_str().ok()?;
    let mut parts = value.split('-');
    let (_version, trace, span) = (parts.next()?, parts.next()?, parts.next()?);
    let valid = |id: &str, len: usize| {
        id.len() == len
            && id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            && id.bytes().any(|b| b != b'0')
    };
    (valid(trace, 32) && valid(span, 16)).then_some((trace, span))
}
