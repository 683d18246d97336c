//! The OpenAPI 3.1 document, generated from the handlers and types.

use http_edge::openapi::{
    add_bearer_scheme, document_edge_headers, document_problem_examples, operations, problem_example, request_header,
    response_header, string,
};
use serde_json::Value;
use utoipa::openapi::schema::SchemaFormat;
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
        add_bearer_scheme(openapi);
    }
}

/// The headers every operation takes or answers, added to each operation here rather than
/// in each `#[utoipa::path]`, so no route can forget one; and an example problem document
/// for each error status.
struct Headers;

impl Modify for Headers {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for operation in operations(item) {
                // Every operation of this API is a command, and every command honours it.
                operation.parameters.get_or_insert_with(Vec::new).push(request_header(
                    "Idempotency-Key",
                    "Makes a retry safe: the same key with the same request answers the \
                     original outcome without writing again (keys are kept 24 hours); with \
                     another request it is 422 `idempotency_key_reused`. 1 to 200 visible \
                     ASCII characters, else 400 `invalid_idempotency_key`.",
                    string()
                        .min_length(Some(1))
                        .max_length(Some(200))
                        .pattern(Some("^[!-~]+$")),
                ));
                document_edge_headers(operation);
                if let Some(utoipa::openapi::RefOr::T(created)) = operation.responses.responses.get_mut("201") {
                    created.headers.insert(
                        "Location".into(),
                        response_header(
                            string().format(Some(SchemaFormat::Custom("uri-reference".into()))),
                            "The path of the created user or device.",
                            true,
                        ),
                    );
                }
                document_problem_examples(operation, command_problem_example);
            }
        }
    }
}

/// One typical problem document per error status, built as the API builds them.
fn command_problem_example(status: u16) -> Option<Value> {
    let (code, detail) = match status {
        400 => ("invalid_body", "unknown field `device_id`"),
        401 => ("unauthorized", "a bearer token is required"),
        403 => ("forbidden", "this token may not act on this user"),
        404 => ("device_not_found", "device not found"),
        408 => ("body_timeout", "the request body did not arrive within 10s"),
        409 => ("device_already_running", "device is already running"),
        413 => ("payload_too_large", "the request body is larger than the limit"),
        415 => ("unsupported_media_type", "expected Content-Type: application/json"),
        422 => ("quota_exceeded", "quota exceeded for devices: limit 10, would use 11"),
        429 => ("rate_limited", "rate limit exceeded"),
        503 => ("unavailable", "the service is temporarily unavailable; retry later"),
        _ => return None,
    };
    problem_example(status, code, detail)
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
    components(schemas(
        CommandAccepted, Problem, devices::ProviderName, devices::StopReasonName, users::TierName,
    )),
    modifiers(&BearerAuth, &Headers),
    tags((name = "users"), (name = "devices")),
)]
pub struct ApiDoc;

#[cfg(test)]
mod tests {
    use domain::limits;
    use event_schema::{Provider, StopReason, Tier};
    use serde_json::Value;

    use super::*;

    /// The document clients generate code from is checked in (`command-api/openapi.json`),
    /// so a change to it shows in review. `CLOUDPHONE_BLESS_CONTRACTS=1` rewrites the file.
    #[test]
    fn the_document_is_the_checked_in_one() {
        let document = ApiDoc::openapi().to_pretty_json().unwrap() + "\n";
        test_support::contracts::assert_checked_in(
            &document,
            concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json"),
            "cargo test -p command-api --lib",
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

    /// Closed sets are enums in the document, with the domain's words: a word added to the
    /// domain but not here would be refused by generated clients.
    #[test]
    fn documented_tiers_and_stop_reasons_are_the_domains() {
        let tiers: Vec<&str> = Tier::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(schema("TierName")["enum"], serde_json::json!(tiers));
        let reasons: Vec<&str> = StopReason::ALL
            .iter()
            .filter(|r| **r != StopReason::Deleted)
            .map(|r| r.as_str())
            .collect();
        assert_eq!(schema("StopReasonName")["enum"], serde_json::json!(reasons));
    }

    /// Every operation states the headers clients may send and the ones they get back, so
    /// generated clients can set and read them.
    #[test]
    fn every_operation_documents_its_headers() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let mut operations = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                operations += 1;
                let names: Vec<&str> = operation["parameters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|p| p["in"] == "header")
                    .map(|p| p["name"].as_str().unwrap())
                    .collect();
                assert_eq!(
                    names,
                    ["Idempotency-Key", "traceparent", "x-request-id"],
                    "{method} {path}"
                );
                for (status, response) in operation["responses"].as_object().unwrap() {
                    let headers = &response["headers"];
                    assert!(headers["x-trace-id"].is_object(), "{method} {path} {status}");
                    let retry = matches!(status.as_str(), "429" | "503");
                    assert_eq!(
                        headers["Retry-After"]["required"] == true,
                        retry,
                        "{method} {path} {status}"
                    );
                    assert_eq!(
                        headers["Location"]["required"] == true,
                        status == "201",
                        "{method} {path} {status}"
                    );
                    if status.starts_with(['4', '5']) {
                        let example = &response["content"]["application/problem+json"]["example"];
                        assert_eq!(example["status"].to_string(), *status, "{method} {path}");
                    }
                }
            }
        }
        assert_eq!(operations, 11);
    }
}
