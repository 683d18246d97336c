//! Metrics and request tracing for the command API.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use uuid::Uuid;

use crate::extract::trace_parent;

/// Counter: HTTP requests by route, method and status.
pub const HTTP_REQUESTS_TOTAL: &str = "cloudphone_http_requests_total";
/// Histogram: HTTP request latency by route and method.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "cloudphone_http_request_duration_seconds";
/// Counter: commands decided again after a concurrent change to their streams.
pub const COMMAND_RETRIES_TOTAL: &str = "cloudphone_command_retries_total";
/// Counter: decisions that would have written nothing (a refusal or a no-op) made on a cached
/// aggregate found behind the log, and so decided again on the log's state.
pub const COMMAND_STALE_DECISIONS_TOTAL: &str = "cloudphone_command_stale_decisions_total";
/// Counter: requests answered from a stored outcome of the same Idempotency-Key.
pub const IDEMPOTENT_REPLAYS_TOTAL: &str = "cloudphone_http_idempotent_replays_total";
/// Counter: users whose personal data key was destroyed (erasures).
pub const PERSONAL_DATA_KEYS_DESTROYED_TOTAL: &str = "cloudphone_personal_data_keys_destroyed_total";

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
            metrics::describe_counter!(
                COMMAND_RETRIES_TOTAL,
                "Commands decided again after a concurrent change"
            );
            metrics::describe_counter!(
                COMMAND_STALE_DECISIONS_TOTAL,
                "Refusals or no-ops decided on a cached aggregate behind the log, decided again"
            );
            // Exported from the start (at 0) so dashboards and alerts see the series before the
            // first stale decision.
            metrics::counter!(COMMAND_STALE_DECISIONS_TOTAL).increment(0);
            metrics::describe_counter!(IDEMPOTENT_REPLAYS_TOTAL, "Requests answered from an earlier outcome");
            metrics::describe_counter!(
                PERSONAL_DATA_KEYS_DESTROYED_TOTAL,
                "Users whose personal data key was destroyed (erasures)"
            );
            metrics::describe_counter!(
                event_log::metrics_names::EXPORT_EVENTS_TOTAL,
                "Events written into audit exports"
            );
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
