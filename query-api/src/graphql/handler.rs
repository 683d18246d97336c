//! `POST /graphql`, step by step: the extractors take when the query's time started, who
//! asks and what (see [`crate::extract`]); the question is routed to a source (a replica in
//! rotation, one that reached the caller's position, or the primary), answered from the
//! cache when the same question was answered at the same checkpoints, handed the answer of a
//! request computing the same question right now, and otherwise executed on the executor's
//! threads by the deadline. A replica that fails under a query is taken out
//! of rotation and the query runs again elsewhere, so one replica dying fails no query.

use std::sync::Arc;

use async_graphql::ServerError;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::cache::{CacheKey, CacheKeyParts, CachedAnswer, cache_key};
use crate::consistency::{read_position, tell_read_position};
use crate::extract::{Deadline, Question, Reader};
use crate::graphql::{ReadContext, Viewer};
use crate::reply::{Json, graphql_error, metrics_names as m};
use crate::single_flight::Flight;
use crate::sources::{ReadError, Route, Source};
use crate::state::{AppState, Inner};

/// `POST /graphql`. A request the extractors refuse is answered by their [`Rejection`]
/// (and counted as `rejected`).
///
/// [`Rejection`]: crate::reply::Rejection
pub(crate) async fn graphql(
    State(state): State<AppState>,
    deadline: Deadline,
    Reader(viewer): Reader,
    question: Question,
) -> Response {
    let asked = Asked {
        question,
        viewer,
        deadline: deadline.at,
    };
    let answer = answer(&state, &asked).await;
    let cache = answer.cache;
    metrics::counter!(m::GRAPHQL_REQUESTS_TOTAL, "outcome" => answer.outcome, "cache" => cache).increment(1);
    metrics::histogram!(m::GRAPHQL_REQUEST_DURATION_SECONDS, "cache" => cache)
        .record(deadline.started.elapsed().as_secs_f64());
    answer.into_response()
}

/// A question, who asks it, and by when it must be answered.
#[derive(Debug)]
struct Asked {
    question: Question,
    viewer: Viewer,
    deadline: tokio::time::Instant,
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    body: Bytes,
    cache: &'static str,
    outcome: &'static str,
    source: Option<Source>,
    /// The log position the answer reflects at least.
    position: Option<i64>,
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json::ok(self.body)).into_response();
        let headers = response.headers_mut();
        headers.insert("x-cache", HeaderValue::from_static(self.cache));
        if let Some(source) = &self.source {
            headers.insert("x-read-source", HeaderValue::from_static(source.kind()));
        }
        tell_read_position(headers, self.position);
        response
    }
}

async fn answer(state: &Inner, asked: &Asked) -> Answer {
    // One attempt per replica and one for the primary: a failing source leaves rotation.
    let attempts = state.sources.replica_states().len() + 1;
    let mut last_failure = None;
    for _ in 0..attempts {
        let route = match state.sources.route(asked.question.min_position).await {
            Ok(route) => route,
            Err(error) => return unroutable(&error),
        };
        let read_at = read_position(&route);
        let question = &asked.question;
        let key = route.checkpoints.as_ref().map(|seen| {
            cache_key(&CacheKeyParts {
                normalized_query: &question.normalized,
                operation_name: question.operation_name.as_deref(),
                variables: &question.variables_key,
                scope: &asked.viewer.cache_scope(),
                checkpoints: &state.epoch.key_for(&seen.positions, question.min_position),
                versions: &seen.versions,
            })
        });
        if let (Some(cache), Some(key)) = (&state.cache, &key)
            && let Some(cached) = cache.get(key)
        {
            // What the answer reflects is where it was read, not where the source is now.
            return Answer {
                status: StatusCode::OK,
                body: cached.body,
                cache: "hit",
                outcome: "ok",
                source: Some(route.source),
                position: cached.position,
            };
        }
        let computed = match compute_once(state, asked, &route, key).await {
            Obtained::Led(computed) => computed,
            Obtained::Shared {
                body,
                ok,
                source,
                position,
            } => {
                return Answer {
                    status: StatusCode::OK,
                    body,
                    cache: "shared",
                    outcome: if ok { "ok" } else { "error" },
                    source: Some(source),
                    position,
                };
            }
            Obtained::TimedOut => return timed_out(state),
        };
        match computed.executed {
            Executed::Answered { body, ok, .. } => {
                return Answer {
                    status: StatusCode::OK,
                    body,
                    cache: if computed.cached { "miss" } else { "bypass" },
                    outcome: if ok { "ok" } else { "error" },
                    source: Some(route.source),
                    position: read_at,
                };
            }
            Executed::SourceFailed(body) => {
                if route.source == Source::Primary {
                    last_failure = Some(body);
                    break;
                }
                state.sources.report_failure(&route.source);
            }
        }
    }
    Answer {
        status: StatusCode::SERVICE_UNAVAILABLE,
        body: last_failure.unwrap_or_else(|| {
            Bytes::from(
                serde_json::json!({ "errors": [graphql_error("no source could answer; retry shortly", "SOURCE_UNAVAILABLE")] })
                    .to_string(),
            )
        }),
        cache: "bypass",
        outcome: "error",
        source: None,
        position: None,
    }
}

/// The answer to a query whose time ran out (waiting for another's answer counts).
fn timed_out(state: &Inner) -> Answer {
    Answer {
        status: StatusCode::OK,
        body: timeout_body(state),
        cache: "bypass",
        outcome: "error",
        source: None,
        position: None,
    }
}

fn timeout_body(state: &Inner) -> Bytes {
    let timeout = state.config.query_timeout;
    let body = serde_json::json!({ "errors": [graphql_error(
        format!("the query took longer than {timeout:?} and was stopped; ask for less"),
        "TIMEOUT",
    )] });
    Bytes::from(body.to_string())
}

fn unroutable(error: &ReadError) -> Answer {
    let (status, code) = match error {
        // Not a failure of the service: the caller may retry or drop the position.
        ReadError::NotYetVisible { .. } => (StatusCode::OK, "NOT_YET_VISIBLE"),
        ReadError::Database(_) | ReadError::Checkpoints(_) => (StatusCode::SERVICE_UNAVAILABLE, "SOURCE_UNAVAILABLE"),
    };
    let message = match error {
        ReadError::NotYetVisible { .. } => error.to_string(),
        ReadError::Database(_) | ReadError::Checkpoints(_) => {
            tracing::warn!(%error, "no source to route a query to");
            "the read models are unavailable right now; retry shortly".to_owned()
        }
    };
    Answer {
        status,
        body: Bytes::from(serde_json::json!({ "errors": [graphql_error(message, code)] }).to_string()),
        cache: "bypass",
        outcome: "error",
        source: None,
        position: None,
    }
}

/// How a request came by its answer.
enum Obtained {
    /// Executed for this request (and cached, if it could be).
    Led(Computed),
    /// Another request's answer to the same question at the same checkpoints.
    Shared {
        body: Bytes,
        ok: bool,
        source: Source,
        position: Option<i64>,
    },
    /// The deadline passed while waiting for another request's answer.
    TimedOut,
}

/// Executes the question on `route` and caches the answer under `key`; or, when another
/// request is computing the same key, waits for its answer instead (concurrent misses
/// computed once, see [`crate::single_flight`]).
async fn compute_once(state: &Inner, asked: &Asked, route: &Route, key: Option<CacheKey>) -> Obtained {
    let here = |store_under: Option<CacheKey>| async move {
        let executed = execute(state, asked, route).await;
        let position = read_position(route);
        // Cached before the computation ends and frees its key: a request arriving in
        // between would otherwise find neither and compute the same answer again.
        let cacheable = match &executed {
            Executed::Answered {
                body, cacheable: true, ..
            } => Some(body),
            _ => None,
        };
        let cached = match (cacheable, &state.cache, store_under) {
            (Some(body), Some(cache), Some(key)) => cache.insert(
                key,
                CachedAnswer {
                    body: body.clone(),
                    position,
                },
            ),
            _ => false,
        };
        Computed {
            executed,
            source: route.source.clone(),
            position,
            cached,
        }
    };
    let Some(key) = key.filter(|_| state.cache.is_some()) else {
        return Obtained::Led(here(None).await);
    };
    match tokio::time::timeout_at(asked.deadline, state.computing.run(key, || here(Some(key)))).await {
        Ok(Flight::Led(computed)) => Obtained::Led(computed),
        Ok(Flight::Shared(Computed {
            executed: Executed::Answered { body, ok, .. },
            source,
            position,
            ..
        })) => Obtained::Shared {
            body,
            ok,
            source,
            position,
        },
        // Its source failed, perhaps not this request's: this one asks for itself.
        Ok(Flight::Shared(Computed {
            executed: Executed::SourceFailed(_),
            ..
        })) => Obtained::Led(here(None).await),
        Err(_) => Obtained::TimedOut,
    }
}

/// An execution's outcome, where it ran and the position it reflects: what requests waiting
/// for the same key are handed.
#[derive(Debug, Clone)]
pub(crate) struct Computed {
    executed: Executed,
    source: Source,
    position: Option<i64>,
    /// Whether the leader cached the answer.
    cached: bool,
}

#[derive(Debug, Clone)]
enum Executed {
    Answered {
        body: Bytes,
        cacheable: bool,
        ok: bool,
    },
    /// The source failed under the query; the body is the error answer if no other is left.
    SourceFailed(Bytes),
}

/// Validates and executes on the executor's threads (see [`crate::executor`]), by the
/// request's deadline.
async fn execute(state: &Inner, asked: &Asked, route: &Route) -> Executed {
    let read = Arc::new(ReadContext::new(asked.viewer, route, state.config.limits));
    let request = asked.question.request(Arc::clone(&read));
    let schema = state.schema.clone();
    let work = async move {
        let mut response = schema.execute(request).await;
        let ok = response.is_ok();
        let cacheable = ok && response.cache_control.max_age != -1;
        with_error_codes(&mut response.errors);
        let body = match serde_json::to_vec(&response) {
            Ok(body) => Bytes::from(body),
            Err(error) => {
                tracing::error!(%error, "cannot serialize a GraphQL response");
                Bytes::from_static(
                    br#"{"errors":[{"message":"internal error","extensions":{"code":"INTERNAL_SERVER_ERROR"}}]}"#,
                )
            }
        };
        (body, ok, cacheable)
    };
    let (body, ok, cacheable) = match tokio::time::timeout_at(asked.deadline, state.executor.run(work)).await {
        Ok(Ok(executed)) => executed,
        Ok(Err(error)) => {
            tracing::error!(%error, "query execution failed");
            let body = serde_json::json!({ "errors": [graphql_error("internal error", "INTERNAL_SERVER_ERROR")] });
            return Executed::Answered {
                body: Bytes::from(body.to_string()),
                cacheable: false,
                ok: false,
            };
        }
        Err(_) => {
            return Executed::Answered {
                body: timeout_body(state),
                cacheable: false,
                ok: false,
            };
        }
    };
    if read.source_failed() {
        return Executed::SourceFailed(body);
    }
    Executed::Answered { body, cacheable, ok }
}

/// Gives every error a code. Ours carry one; async-graphql's own do not: those without a
/// path are the request's (validation, or one of async-graphql's limits: complexity, depth,
/// the nesting of selection sets through fragments, directives per field), those with one a
/// value the client sent (a variable or literal that does not parse as its scalar). All are
/// the client's doing.
pub(crate) fn with_error_codes(errors: &mut [ServerError]) {
    /// How async-graphql's limits word their errors.
    const OVER_A_LIMIT: [&str; 4] = [
        "Query is too complex",
        "Query is nested too deep",
        "The recursion depth of the query cannot be greater than",
        "The number of directives on the field",
    ];
    for error in errors {
        let has_code = error.extensions.as_ref().is_some_and(|e| e.get("code").is_some());
        if has_code {
            continue;
        }
        let code = if !error.path.is_empty() {
            "BAD_USER_INPUT"
        } else if OVER_A_LIMIT.iter().any(|start| error.message.starts_with(start)) {
            "QUERY_TOO_COMPLEX"
        } else {
            "GRAPHQL_VALIDATION_FAILED"
        };
        error.extensions.get_or_insert_with(Default::default).set("code", code);
    }
}
