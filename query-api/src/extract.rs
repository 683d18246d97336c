//! Request extractors, as the command API's: when a query's time started ([`Deadline`]), who
//! asks ([`Caller`], authenticated and rate limited; [`Reader`], allowed to read dashboards),
//! and what ([`Question`]: the body's document resolved, measured and parsed, its variables
//! and the position it must read at). The GraphQL ones refuse with the GraphQL error the query
//! API answers ([`Rejection`]); [`Auditor`], for the event history export, with a problem
//! document.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use async_graphql::parser::types::ExecutableDocument;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_edge::auth::{Principal, Role, scope};
use http_edge::problem::EdgeError;
use serde::Deserialize;

use crate::consistency::min_position;
use crate::graphql::{ReadContext, Viewer, request_data};
use crate::persisted::PersistedQuery;
use crate::reply::Rejection;
use crate::state::{AppState, Inner};

/// When the query's time started: from here on everything, authentication, parsing and
/// validation included, counts against `query_timeout`. Taken once per request (kept in its
/// extensions), so the handler and every extractor after it share one deadline.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    /// For the request's latency.
    pub(crate) started: Instant,
    /// When the query is stopped.
    pub(crate) at: tokio::time::Instant,
}

impl FromRequestParts<AppState> for Deadline {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if let Some(deadline) = parts.extensions.get::<Deadline>() {
            return Ok(*deadline);
        }
        let deadline = Deadline {
            started: Instant::now(),
            at: tokio::time::Instant::now() + state.config.query_timeout,
        };
        parts.extensions.insert(deadline);
        Ok(deadline)
    }
}

/// The authenticated, rate-limited caller.
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub(crate) Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let authorization = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let principal = state.verifier.verify_header(authorization).map_err(|error| {
            tracing::info!(%error, "query refused: not authenticated");
            Rejection::new(
                StatusCode::UNAUTHORIZED,
                "a valid bearer token is required",
                "UNAUTHENTICATED",
            )
        })?;
        state
            .limiter
            .check(principal.rate_key())
            .map_err(Rejection::rate_limited)?;
        Ok(Caller(principal))
    }
}

/// A caller allowed to read dashboards, as the viewer every read is scoped to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader(pub(crate) Viewer);

impl FromRequestParts<AppState> for Reader {
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let Caller(principal) = Caller::from_request_parts(parts, state).await?;
        match viewer_of(&principal) {
            Some(viewer) => Ok(Reader(viewer)),
            None => Err(Rejection::new(
                StatusCode::FORBIDDEN,
                format!(
                    "a {} token without the `{}` scope cannot read dashboards",
                    principal.role,
                    scope::DASHBOARDS_READ
                ),
                "FORBIDDEN",
            )),
        }
    }
}

pub(crate) fn viewer_of(principal: &Principal) -> Option<Viewer> {
    match (principal.role, principal.user_id) {
        (Role::Admin, _) => Some(Viewer::Admin),
        (Role::User, Some(user)) => Some(Viewer::User(user)),
        (Role::Service, _) if principal.has_scope(scope::DASHBOARDS_READ) => Some(Viewer::Everyone),
        _ => None,
    }
}

/// A caller that may export the event history (an admin or auditor token). Not rate limited;
/// refused with a problem document, like the export's other errors.
#[derive(Debug, Clone)]
pub(crate) struct Auditor(pub(crate) Principal);

impl FromRequestParts<AppState> for Auditor {
    type Rejection = EdgeError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let authorization = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let principal = state.verifier.verify_header(authorization)?;
        if !principal.may_audit() {
            return Err(EdgeError::Forbidden(
                "only admin and auditor tokens may export the event history".into(),
            ));
        }
        Ok(Auditor(principal))
    }
}

/// What a request asks: its document resolved (safelist, persisted queries), measured,
/// parsed and normalized (once per text, see [`crate::documents`]), its variables, and the position it must read at.
#[derive(Debug)]
pub(crate) struct Question {
    pub(crate) query: Arc<str>,
    pub(crate) document: Arc<ExecutableDocument>,
    /// The query as the cache keys it.
    pub(crate) normalized: Arc<str>,
    pub(crate) operation_name: Option<String>,
    pub(crate) variables: serde_json::Value,
    /// The variables as the cache keys them.
    pub(crate) variables_key: String,
    pub(crate) min_position: Option<i64>,
}

impl Question {
    /// The request to execute: the document already parsed, its variables and operation, and
    /// the per-request read context (`read`) its resolvers share.
    pub(crate) fn request(&self, read: Arc<ReadContext>) -> async_graphql::Request {
        let mut request = async_graphql::Request::new(self.query.to_string())
            .variables(async_graphql::Variables::from_json(self.variables.clone()));
        request.set_parsed_query(ExecutableDocument::clone(&self.document));
        if let Some(name) = &self.operation_name {
            request = request.operation_name(name.clone());
        }
        request_data(request, read)
    }
}

impl FromRequest<AppState> for Question {
    /// A [`Rejection`]; or axum's own answer when the body cannot be taken, which the edge,
    /// having read it whole before routing, leaves no way to happen.
    type Rejection = Response;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = request.into_parts();
        let Ok(deadline) = Deadline::from_request_parts(&mut parts, state).await;
        let headers = parts.headers.clone();
        let body = Bytes::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(IntoResponse::into_response)?;
        // Reading the body's JSON and measuring the document are CPU work: on the executor's
        // threads, like validation and execution, never on the threads other roles share.
        let preparing = Arc::clone(state);
        let prepared = state.executor.run(async move { prepare(&preparing, &headers, &body) });
        let refused = match tokio::time::timeout_at(deadline.at, prepared).await {
            Ok(Ok(Ok(question))) => return Ok(question),
            Ok(Ok(Err(rejection))) => rejection,
            Ok(Err(error)) => {
                tracing::error!(%error, "query preparation failed");
                Rejection::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "internal error",
                    "INTERNAL_SERVER_ERROR",
                )
            }
            Err(_) => Rejection::new(
                StatusCode::OK,
                format!(
                    "the query took longer than {:?} and was stopped; ask for less",
                    state.config.query_timeout
                ),
                "TIMEOUT",
            ),
        };
        Err(refused.into_response())
    }
}

/// A GraphQL-over-HTTP request body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GraphqlBody {
    query: Option<String>,
    operation_name: Option<String>,
    #[serde(default)]
    variables: Option<serde_json::Value>,
    #[serde(default)]
    extensions: Option<BodyExtensions>,
    /// A registered document's id (Relay, the GraphQL-over-HTTP draft): with a safelist.
    #[serde(default, alias = "id")]
    document_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BodyExtensions {
    persisted_query: Option<PersistedQuery>,
}

/// The request's body read into a question: its document resolved, measured and parsed, its
/// variables and position; or the answer refusing it.
pub(crate) fn prepare(state: &Inner, headers: &HeaderMap, body: &[u8]) -> Result<Question, Rejection> {
    let body: GraphqlBody = serde_json::from_slice(body).map_err(|error| {
        let message = if body.first() == Some(&b'[') {
            "batched requests are not supported; send one query per request".to_owned()
        } else {
            format!("the body is not a GraphQL request (JSON with `query`): {error}")
        };
        Rejection::new(StatusCode::BAD_REQUEST, message, "BAD_REQUEST")
    })?;
    let persisted = body.extensions.as_ref().and_then(|e| e.persisted_query.as_ref());
    let query = resolve_document(state, body.query, persisted, body.document_id.as_deref())?;
    let variables = match body.variables {
        None | Some(serde_json::Value::Null) => serde_json::Value::Object(Default::default()),
        Some(value @ serde_json::Value::Object(_)) => value,
        Some(_) => {
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "`variables` must be an object",
                "BAD_REQUEST",
            ));
        }
    };
    // Measured before anything expands it: a document over a limit costs microseconds.
    let read = state
        .documents
        .read(&query, &state.config.limits.document)
        .map_err(|error| {
            tracing::info!(%error, "query refused before validation");
            Rejection::new(StatusCode::OK, error.to_string(), error.code())
        })?;
    let min_position = min_position(headers, &read.document, body.operation_name.as_deref(), &variables)
        .map_err(|message| Rejection::new(StatusCode::BAD_REQUEST, message, "BAD_USER_INPUT"))?;
    Ok(Question {
        normalized: read.normalized,
        query,
        document: read.document,
        operation_name: body.operation_name,
        variables_key: event_schema::canonical::canonical_json(&variables),
        variables,
        min_position,
    })
}

/// The document to run: with a safelist, the registered one the request names or sends;
/// otherwise the query sent, or the persisted query its hash names.
fn resolve_document(
    state: &Inner,
    query: Option<String>,
    persisted: Option<&PersistedQuery>,
    document_id: Option<&str>,
) -> Result<Arc<str>, Rejection> {
    let Some(safelist) = &state.safelist else {
        return state.persisted.resolve(query, persisted).map_err(|error| {
            // Apollo clients expect a 200 with the code, then retry with the full query.
            let status = if error.code() == "PERSISTED_QUERY_NOT_FOUND" {
                StatusCode::OK
            } else {
                StatusCode::BAD_REQUEST
            };
            Rejection::new(status, error.to_string(), error.code())
        });
    };
    let registered = match (query.as_deref(), persisted, document_id) {
        (_, _, Some(id)) => safelist.by_id(id),
        (_, Some(persisted), None) => safelist.by_id(&persisted.sha256_hash),
        (Some(text), None, None) => safelist.by_text(text),
        (None, None, None) => None,
    };
    registered.ok_or_else(|| {
        Rejection::new(
            StatusCode::FORBIDDEN,
            "only registered documents run here (the server has a safelist); send a registered document or its id",
            "DOCUMENT_NOT_ALLOWED",
        )
    })
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    fn principal(role: Role, user_id: Option<Uuid>, scopes: &[&str]) -> Principal {
        Principal {
            role,
            subject: "someone".to_owned(),
            user_id,
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            expires_at: i64::MAX,
        }
    }

    #[test]
    fn only_admins_users_and_services_with_the_scope_read_dashboards() {
        let me = Uuid::from_u128(7);
        assert_eq!(viewer_of(&principal(Role::Admin, Some(me), &[])), Some(Viewer::Admin));
        assert_eq!(viewer_of(&principal(Role::User, Some(me), &[])), Some(Viewer::User(me)));
        assert_eq!(viewer_of(&principal(Role::User, None, &[])), None);
        assert_eq!(
            viewer_of(&principal(Role::Service, None, &[scope::DASHBOARDS_READ])),
            Some(Viewer::Everyone)
        );
        assert_eq!(viewer_of(&principal(Role::Service, None, &["devices:report"])), None);
        assert_eq!(viewer_of(&principal(Role::Auditor, None, &[])), None);
    }
}
