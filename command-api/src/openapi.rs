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
    /// The token may not act on this resource.
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
    /// No such user or device.
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
    /// The command does not fit the current state (e.g. starting a running device), or the
    /// resource kept changing concurrently.
    #[response(status = 409, content_type = "application/problem+json")]
    Conflict(Problem),
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
    /// The event log is unavailable; retry (with the same Idempotency-Key).
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
    components(schemas(CommandAccepted, Problem)),
    modifiers(&BearerAuth),
    tags((name = "users"), (name = "devices")),
)]
pub struct ApiDoc;
