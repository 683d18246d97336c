//! What both APIs' OpenAPI documents say about the HTTP edge: the headers every request may
//! send and every answer carries (trace context, request id, `Retry-After`), and example
//! problem documents, so the two documents describe the shared layers the same way.

use axum::http::StatusCode;
use serde_json::Value;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::header::{Header, HeaderBuilder};
use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi, RefOr, Required};

use crate::problem::Problem;

/// Every operation of a path.
pub fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.patch,
    ]
    .into_iter()
    .flatten()
}

/// A string schema to refine.
pub fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

/// An optional request header.
pub fn request_header(name: &str, description: &str, schema: ObjectBuilder) -> RefOr<Parameter> {
    RefOr::T(
        ParameterBuilder::new()
            .name(name)
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some(description))
            .schema(Some(schema))
            .build(),
    )
}

/// A response header. utoipa's `Header` has no `required` field (OpenAPI's Header Object
/// does), so it goes in through the flattened extensions map, which serialises keys as given.
pub fn response_header(schema: ObjectBuilder, description: &str, required: bool) -> RefOr<Header> {
    let mut header = HeaderBuilder::new()
        .schema(Some(schema))
        .description(Some(description))
        .build();
    if required {
        header.extensions = Some(Extensions::from_iter([("required", true)]));
    }
    RefOr::T(header)
}

/// The edge's headers on `operation`: `traceparent` and `x-request-id` in, `x-trace-id` and
/// `x-request-id` on every answer, `Retry-After` on 429 and 503 (see `layers.rs`,
/// `telemetry.rs` and `problem.rs`).
pub fn document_edge_headers(operation: &mut Operation) {
    let parameters = operation.parameters.get_or_insert_with(Vec::new);
    parameters.push(request_header(
        "traceparent",
        "W3C trace context; the request (and what it writes) joins this trace. A malformed one \
         is replaced by a new trace, not refused.",
        string(),
    ));
    parameters.push(request_header(
        "x-request-id",
        "The client's request id, answered back; one is made up when absent.",
        string(),
    ));
    for (status, response) in operation.responses.responses.iter_mut() {
        let RefOr::T(response) = response else { continue };
        let status: u16 = status.parse().unwrap_or_default();
        // Every answer that passes the router carries both; a 503 `too_many_connections` is
        // written by the listener before any layer runs (`connections.rs`).
        let routed = status != 503;
        response.headers.insert(
            "x-trace-id".into(),
            response_header(
                string().pattern(Some("^[0-9a-f]{32}$")),
                "The W3C trace id the request ran under (the caller's, or a new one).",
                routed,
            ),
        );
        response.headers.insert(
            "x-request-id".into(),
            response_header(string(), "The request id (the client's, or a new UUID).", routed),
        );
        if matches!(status, 429 | 503) {
            response.headers.insert(
                "Retry-After".into(),
                response_header(
                    string().pattern(Some("^[0-9]+$")),
                    "Seconds to wait before retrying.",
                    true,
                ),
            );
        }
    }
}

/// Sets `example` on the problem document of each response of `operation` whose status
/// `example_for` knows.
pub fn document_problem_examples(operation: &mut Operation, example_for: impl Fn(u16) -> Option<Value>) {
    for (status, response) in operation.responses.responses.iter_mut() {
        let RefOr::T(response) = response else { continue };
        let Some(example) = status.parse().ok().and_then(&example_for) else {
            continue;
        };
        if let Some(RefOr::T(content)) = response.content.get_mut("application/problem+json") {
            content.example = Some(example);
        }
    }
}

/// A problem document as the edge builds it, as JSON.
pub fn problem_example(status: u16, code: &str, detail: &str) -> Option<Value> {
    let status = StatusCode::from_u16(status).ok()?;
    serde_json::to_value(Problem::new(status, code, detail.to_owned())).ok()
}

/// Adds the `bearer` security scheme (a JWT) that operations name.
pub fn add_bearer_scheme(openapi: &mut OpenApi) {
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
