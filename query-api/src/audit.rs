//! `GET /v1/audit/events`: the event history as an NDJSON or CSV file, streamed from a replica
//! (the primary when none is in rotation), for admins and auditors. With `X-Min-Position` it
//! reads from a source whose log holds that position, so a just-acknowledged command is in it.
//!
//! The body is chunked and ends with a trailer record (see `event_log::export`); a download
//! that stops early lacks it, and `after=<last position received>` resumes. Errors before
//! the first byte are problem+json; an error mid-stream aborts the body (no trailer).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use event_log::export::ExportFormat;
use event_log::history::{ExportOptions, HistoryExport, HistoryFilter};
use event_log::personal::PersonalDataKeys;
use futures::StreamExt as _;
use http_edge::auth::Principal;
use http_edge::problem::EdgeError;
use serde::Deserialize;
use uuid::Uuid;

use crate::consistency::min_position_header;
use crate::extract::Auditor;
use crate::state::AppState;

pub mod metrics_names {
    /// Counter: exports started, by format.
    pub const AUDIT_EXPORTS_TOTAL: &str = "cloudphone_audit_exports_total";
    /// Counter: exports that stopped with an error after the response began.
    pub const AUDIT_EXPORT_FAILURES_TOTAL: &str = "cloudphone_audit_export_failures_total";
}
use metrics_names as m;

/// The query string. Every filter is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditParams {
    user_id: Option<String>,
    stream_id: Option<String>,
    event_type: Option<String>,
    /// RFC 3339; events recorded at or after it.
    from: Option<String>,
    /// RFC 3339; events recorded before it.
    to: Option<String>,
    /// Resume after this position.
    after: Option<i64>,
    /// Stop at this position [default: the head when the export starts].
    until: Option<i64>,
    /// `ndjson` (default) or `csv`.
    format: Option<String>,
    /// `decrypt` (default): personal fields shown decrypted (or as erased) beside the stored
    /// ciphertext; `omit`: ciphertext only.
    personal: Option<String>,
}

fn bad(code: &'static str, detail: impl Into<String>) -> EdgeError {
    EdgeError::bad_request(code, detail)
}

fn uuid_param(name: &str, value: Option<&str>) -> Result<Option<Uuid>, EdgeError> {
    value
        .map(|text| {
            Uuid::parse_str(text).map_err(|_| bad("invalid_parameter", format!("{name} is not a UUID: {text:?}")))
        })
        .transpose()
}

fn time_param(name: &str, value: Option<&str>) -> Result<Option<DateTime<Utc>>, EdgeError> {
    value
        .map(|text| {
            DateTime::parse_from_rfc3339(text)
                .map(|at| at.with_timezone(&Utc))
                .map_err(|_| bad("invalid_parameter", format!("{name} is not an RFC 3339 time: {text:?}")))
        })
        .transpose()
}

impl AuditParams {
    fn filter(&self) -> Result<HistoryFilter, EdgeError> {
        let filter = HistoryFilter {
            owner_id: uuid_param("userId", self.user_id.as_deref())?,
            stream_id: uuid_param("streamId", self.stream_id.as_deref())?,
            event_type: match &self.event_type {
                Some(name) => Some(
                    event_schema::kind_of(name)
                        .map_err(|e| bad("invalid_parameter", format!("eventType: {e}")))?
                        .event_type
                        .to_owned(),
                ),
                None => None,
            },
            from: time_param("from", self.from.as_deref())?,
            to: time_param("to", self.to.as_deref())?,
            after: self.after.unwrap_or(0),
            until: self.until,
        };
        if filter.after < 0 || filter.until.is_some_and(|until| until < 0) {
            return Err(bad("invalid_parameter", "after and until are positions (0 or more)"));
        }
        if let (Some(from), Some(to)) = (filter.from, filter.to)
            && from >= to
        {
            return Err(bad("invalid_parameter", "from must be before to"));
        }
        Ok(filter)
    }

    fn format(&self, headers: &HeaderMap) -> Result<ExportFormat, EdgeError> {
        if let Some(format) = &self.format {
            return format.parse().map_err(|_| {
                bad(
                    "invalid_parameter",
                    format!("format must be ndjson or csv, not {format:?}"),
                )
            });
        }
        let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
        Ok(if accept.contains("text/csv") {
            ExportFormat::Csv
        } else {
            ExportFormat::Ndjson
        })
    }

    fn decrypt(&self) -> Result<bool, EdgeError> {
        match self.personal.as_deref() {
            None | Some("decrypt") => Ok(true),
            Some("omit") => Ok(false),
            Some(other) => Err(bad(
                "invalid_parameter",
                format!("personal must be decrypt or omit, not {other:?}"),
            )),
        }
    }
}

/// Export the event history (admins and auditors) as NDJSON (default) or CSV, streamed, with
/// a trailer record; a download that stops early lacks it, and `after` resumes.
#[utoipa::path(get, path = "/v1/audit/events", tag = "audit",
    params(
        ("userId" = Option<Uuid>, Query, description = "Only this user's events and their devices'."),
        ("streamId" = Option<Uuid>, Query, description = "Only this stream's events."),
        ("eventType" = Option<String>, Query, description = "Only events of this type."),
        ("from" = Option<DateTime<Utc>>, Query, description = "RFC 3339; events recorded at or after it."),
        ("to" = Option<DateTime<Utc>>, Query, description = "RFC 3339; events recorded before it (after `from`)."),
        ("after" = Option<i64>, Query, minimum = 0, description = "Resume after this position."),
        ("until" = Option<i64>, Query, minimum = 0,
            description = "Stop at this position [default: the head when the export starts]."),
        ("format" = Option<crate::openapi::ExportFormatName>, Query,
            description = "[default: `csv` when Accept names text/csv, else `ndjson`]"),
        ("personal" = Option<crate::openapi::PersonalFieldsName>, Query,
            description = "`decrypt` (default): personal fields shown decrypted (or as erased) \
                beside the stored ciphertext; `omit`: ciphertext only."),
    ),
    responses(
        (status = 200, description = "The export file, streamed; it ends with a trailer record",
            content((String = "application/x-ndjson"), (String = "text/csv"))),
        crate::openapi::AuditErrors,
    ),
    security(("bearer" = [])))]
pub(crate) async fn audit_events(
    State(state): State<AppState>,
    Auditor(principal): Auditor,
    headers: HeaderMap,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    match start_export(&state, &principal, &headers, params).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn start_export(
    state: &AppState,
    principal: &Principal,
    headers: &HeaderMap,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, EdgeError> {
    let Query(params) = params.map_err(|rejection| bad("invalid_parameter", rejection.body_text()))?;
    let filter = params.filter()?;
    let format = params.format(headers)?;
    let min_position = min_position_header(headers).map_err(|detail| bad("invalid_parameter", detail))?;
    let route = match min_position {
        // Read-your-writes: a source whose log holds the caller's position.
        Some(position) => state.sources.route_holding(position),
        None => state
            .sources
            .route(None)
            .await
            .map_err(|e| EdgeError::Unavailable(e.to_string()))?,
    };
    let mut options = ExportOptions::new(format);
    if params.decrypt()? {
        options.personal = Some(PersonalDataKeys::new(
            route.pool.clone(),
            Arc::clone(&state.master_keys),
        ));
    }
    let after = filter.after;
    let export = HistoryExport::start(route.pool.clone(), filter, options)
        .await
        .map_err(|e| {
            if e.is_unavailable() {
                state.sources.report_failure(&route.source);
                EdgeError::Unavailable(e.to_string())
            } else {
                EdgeError::Internal(e.to_string())
            }
        })?;
    tracing::info!(
        subject = %principal.subject, role = %principal.role, %format, after, min_position,
        source = ?route.source, "audit export started"
    );
    let source = route.source.kind();
    metrics::counter!(m::AUDIT_EXPORTS_TOTAL, "format" => format.as_str()).increment(1);
    let body = export.into_stream().map(move |chunk| match chunk {
        Ok(bytes) => Ok(Bytes::from(bytes)),
        Err(error) => {
            tracing::error!(%error, "audit export stopped; the client's file has no trailer");
            metrics::counter!(m::AUDIT_EXPORT_FAILURES_TOTAL).increment(1);
            Err(std::io::Error::other(error.to_string()))
        }
    });
    let filename = format!(
        "attachment; filename=\"cloudphone-events-after-{after}.{}\"",
        format.file_extension()
    );
    let mut response = (StatusCode::OK, Body::from_stream(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-read-source", HeaderValue::from_static(source));
    if let Ok(value) = HeaderValue::from_str(&filename) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}
