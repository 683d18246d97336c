//! The OpenAPI 3.1 document of the query API's plain HTTP endpoint, the audit export
//! (`GET /v1/audit/events`), served at `/openapi.json`. The GraphQL API's contract is its
//! schema (`schema.graphql`); the command API has its own document, since a document naming
//! an endpoint its server does not serve would mislead generated clients and the fuzzer.

use event_schema::all_kinds;
use http_edge::openapi::{
    add_bearer_scheme, document_edge_headers, document_problem_examples, operations, problem_example, request_header,
    response_header, string,
};
use http_edge::problem::Problem;
use serde_json::Value;
use utoipa::openapi::path::ParameterIn;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{Modify, OpenApi};

/// The errors the export can answer before its first byte, as problem documents (an error
/// mid-stream aborts the body instead: the file then has no trailer).
#[derive(Debug, utoipa::IntoResponses)]
#[allow(dead_code)] // only describes responses
pub enum AuditErrors {
    /// A parameter or `X-Min-Position` is malformed (`invalid_parameter`).
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// No bearer token, or an invalid one.
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// Only admin and auditor tokens may export the history.
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
    /// No source can be read (`unavailable`); retry.
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}

/// The export's file formats.
// `event_log::export::ExportFormat`, kept equal by `documented_export_formats_are_the_exports`.
#[derive(Debug, utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // describes the schema only
pub enum ExportFormatName {
    Ndjson,
    Csv,
}

/// How personal fields are exported.
#[derive(Debug, utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // describes the schema only
pub enum PersonalFieldsName {
    Decrypt,
    Omit,
}

struct Edge;

impl Modify for Edge {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        add_bearer_scheme(openapi);
        for item in openapi.paths.paths.values_mut() {
            for operation in operations(item) {
                for parameter in operation.parameters.iter_mut().flatten() {
                    // The event types are the registry's, so the enum cannot drift from it.
                    if let RefOr::T(parameter) = parameter
                        && parameter.parameter_in == ParameterIn::Query
                        && parameter.name == "eventType"
                    {
                        let names = all_kinds().map(|kind| kind.event_type);
                        parameter.schema = Some(RefOr::T(Schema::Object(
                            ObjectBuilder::new()
                                .schema_type(Type::String)
                                .enum_values(Some(names))
                                .build(),
                        )));
                    }
                }
                operation.parameters.get_or_insert_with(Vec::new).push(request_header(
                    "X-Min-Position",
                    "Read-your-writes: export from a source whose log holds this position (a \
                     command's `position`). A non-negative integer, else 400.",
                    string().pattern(Some("^[0-9]+$")),
                ));
                document_edge_headers(operation);
                if let Some(RefOr::T(ok)) = operation.responses.responses.get_mut("200") {
                    ok.headers.insert(
                        "x-read-source".into(),
                        response_header(
                            string().enum_values(Some(["primary", "replica"])),
                            "Which database the export is read from.",
                            true,
                        ),
                    );
                    ok.headers.insert(
                        "Content-Disposition".into(),
                        response_header(string(), "A file name naming the format and `after`.", true),
                    );
                }
                document_problem_examples(operation, audit_problem_example);
            }
        }
    }
}

fn audit_problem_example(status: u16) -> Option<Value> {
    let (code, detail) = match status {
        400 => ("invalid_parameter", "from must be before to"),
        401 => ("unauthorized", "a bearer token is required"),
        403 => (
            "forbidden",
            "only admin and auditor tokens may export the event history",
        ),
        503 => ("unavailable", "the service is temporarily unavailable; retry later"),
        _ => return None,
    };
    problem_example(status, code, detail)
}

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Cloudphone query API (HTTP endpoints)", description = "The audit export. \
        Dashboards query the GraphQL API at POST /graphql, whose contract is its schema \
        (schema.graphql), not this document."),
    paths(crate::audit::audit_events),
    components(schemas(Problem, ExportFormatName, PersonalFieldsName)),
    modifiers(&Edge),
    tags((name = "audit")),
)]
pub struct ApiDoc;

#[cfg(test)]
mod tests {
    use event_log::export::ExportFormat;

    use super::*;

    /// The document clients generate code from is checked in (`query-api/openapi.json`), so
    /// a change to it shows in review. `CLOUDPHONE_BLESS_CONTRACTS=1` rewrites the file.
    #[test]
    fn the_document_is_the_checked_in_one() {
        let document = ApiDoc::openapi().to_pretty_json().unwrap() + "\n";
        test_support::contracts::assert_checked_in(
            &document,
            concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json"),
            "cargo test -p query-api --lib",
        );
    }

    #[test]
    fn documented_export_formats_are_the_exports() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let formats: Vec<&str> = [ExportFormat::Ndjson, ExportFormat::Csv]
            .iter()
            .map(|f| f.as_str())
            .collect();
        assert_eq!(
            doc["components"]["schemas"]["ExportFormatName"]["enum"],
            serde_json::json!(formats)
        );
        for format in &formats {
            assert!(format.parse::<ExportFormat>().is_ok(), "{format}");
        }
        let event_types = doc["paths"]["/v1/audit/events"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "eventType")
            .unwrap()["schema"]["enum"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(event_types, all_kinds().count());
    }
}
