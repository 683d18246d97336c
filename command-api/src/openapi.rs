//! The OpenAPI 3.1 document, generated from the handlers and types.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::commands::CommandAccepted;
use crate::problem::Problem;
use crate::routes::{batch, devices, users};

/// The errors every command can answer, as problem documents.
#[derive(Debug, utoipa::IntoResponses)]
#[allow(dead_code)] // only describes responses
pub enum CommandErrors {
    /// Malformed JSON, wrong types, unknown fields, or a path id that is not a UUID.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// No bearer token, or an invalid one.
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// The token may not do this at all (decided from the token and request alone).
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
    /// No such user or device, or another tenant's device (answered as a missing one).
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
    /// The command does not fit the current state (e.g. starting a running device), or the
    /// resource kept changing concurrently.
    #[response(status = 409, content_type = "application/problem+json")]
    Conflict(Problem),
    /// The body stopped arriving before it was complete (`body_timeout`).
    #[response(status = 408, content_type = "application/problem+json")]
    RequestTimeout(Problem),
    /// The body is over the size limit.
    #[response(status = 413, content_type = "application/problem+json")]
    PayloadTooLarge(Problem),
    /// The body is not JSON.
    #[response(status = 415, content_type = "application/problem+json")]
    UnsupportedMediaType(Problem),
    /// Values out of range, a quota exceeded, or an Idempotency-Key reused for another request.
    #[response(status = 422, content_type = "application/problem+json")]
    Unprocessable(Problem),
    /// Too many requests from this client; see Retry-After.
    #[response(status = 429, content_type = "application/problem+json")]
    RateLimited(Problem),
    /// The event log is unavailable or the request ran out of time (`unavailable`), or the
    /// listener is at its connection limit (`too_many_connections`); retry (with the same
    /// Idempotency-Key).
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Cloudphone command API", description = "Commands for the Cloudphone platform. \
        Every success answers the stream version and the global position of the last event \
        written; errors are RFC 9457 problem documents with a stable `code`. Send an \
        Idempotency-Key header to make retries safe."),
    paths(
        users::register, users::set_quota, users::change_tier, users::erase,
        devices::create, devices::start, devices::stop, devices::resize, devices::report_failure,
        devices::remove, batch::run_batch,
    ),
    components(schemas(CommandAccepted, Problem, devices::ProviderName)),
    modifiers(&BearerAuth),
    tags((name = "users"), (name = "devices")),
)]
pub struct ApiDoc;

#[cfg(test)]
mod tests {
    use domain::limits;
    use event_schema::Provider;
    use serde_json::Value;

    use super::*;

    /// The document clients generate code from is checked in (`command-api/openapi.json`),
    /// so a change to it shows in review. `CLOUDPHONE_BLESS_CONTRACTS=1` rewrites the file.
    #[test]
    fn the_document_is_the_checked_in_one() {
        let document = ApiDoc::openapi().to_pretty_json().unwrap() + "\n";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
        if std::env::var_os("CLOUDPHONE_BLESS_CONTRACTS").is_some() {
            std::fs::write(path, &document).unwrap();
        }
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            document == checked_in,
            "the OpenAPI document differs from {path}; if the change is meant, rerun with \
             CLOUDPHONE_BLESS_CONTRACTS=1 and review the diff"
        );
    }

    fn schema(name: &str) -> Value {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        doc["components"]["schemas"][name].clone()
    }

    /// The document states the domain's ranges; this keeps the two from drifting apart.
    #[test]
    fn documented_ranges_are_the_domains() {
        for name in ["CreateDevice", "ResizeDevice"] {
            let properties = &schema(name)["properties"];
            assert_eq!(properties["cpu_cores"]["minimum"], *limits::CPU_CORES.start(), "{name}");
            assert_eq!(properties["cpu_cores"]["maximum"], *limits::CPU_CORES.end(), "{name}");
            assert_eq!(properties["memory_mb"]["minimum"], *limits::MEMORY_MB.start(), "{name}");
            assert_eq!(properties["memory_mb"]["maximum"], *limits::MEMORY_MB.end(), "{name}");
            assert_eq!(properties["memory_mb"]["multipleOf"], limits::MEMORY_STEP_MB, "{name}");
        }
        let device = &schema("CreateDevice")["properties"];
        assert_eq!(device["android_version"]["minimum"], *limits::ANDROID_VERSIONS.start());
        assert_eq!(device["android_version"]["maximum"], *limits::ANDROID_VERSIONS.end());
        let quota = &schema("SetQuota")["properties"];
        assert_eq!(quota["max_devices"]["maximum"], limits::MAX_QUOTA_DEVICES);
        assert_eq!(quota["max_cpu_cores"]["maximum"], limits::MAX_QUOTA_CPU_CORES);
        assert_eq!(quota["max_memory_mb"]["maximum"], limits::MAX_QUOTA_MEMORY_MB);
        let failure = &schema("ReportFailure")["properties"]["reason"];
        assert_eq!(failure["maxLength"], limits::MAX_FAILURE_REASON_CHARS);
        let providers: Vec<String> = Provider::ALL.iter().map(|p| p.as_str().to_owned()).collect();
        assert_eq!(schema("ProviderName")["enum"], serde_json::json!(providers));
    }
}
