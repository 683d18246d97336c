//! The query API service: `POST /graphql` (and GraphiQL at `GET /graphql`), `/healthz`,
//! `/readyz`, `/metrics`.
//!
//! A request is authenticated, its query resolved (persisted queries), routed to a source
//! (a replica in rotation, or one that reached the caller's `minPosition`, or the primary),
//! answered from the cache when the same question was answered at the same checkpoints, and
//! otherwise executed with a time limit. A replica that fails under a query is taken out of
//! rotation and the query runs again elsewhere, so one replica dying fails no query.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_graphql::{ErrorExtensions, ServerError, Variables};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use command_api::auth::{KeyError, Principal, Role, TokenVerifier, scope};
use command_api::body::{self, BodyError};
use command_api::state::ClientLimiter;
use governor::{Quota, RateLimiter};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::cache::{CacheEpoch, CacheKeyParts, CachedAnswer, ResponseCache, cache_key, normalize_query};
use crate::config::QueryApiConfig;
use crate::executor::Executor;
use crate::graphql::document::check_document;
use crate::graphql::{DashboardSchema, ReadContext, Viewer, build_schema, request_data};
use crate::persisted::{PersistedQueries, PersistedQuery};
use crate::safelist::Safelist;
use crate::sources::{ReadError, ReadSources, Route, Source};
use async_graphql::parser::types::ExecutableDocument;
use event_log::personal::MasterKeyring;

/// Names of the query API's metrics (HTTP metrics are the command API's, by route).
pub mod metrics_names {
    /// Counter: GraphQL requests by outcome (`ok`, `error`, `rejected`) and cache result.
    pub const GRAPHQL_REQUESTS_TOTAL: &str = "cloudphone_graphql_requests_total";
    /// Histogram: GraphQL request latency by cache result.
    pub const GRAPHQL_REQUEST_DURATION_SECONDS: &str = "cloudphone_graphql_request_duration_seconds";
}
use metrics_names as m;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("token keys: {0}")]
    Keys(#[from] KeyError),
    #[error("invalid replica URL: {0}")]
    Replica(#[from] sqlx::Error),
    #[error("cannot start the GraphQL executor's threads: {0}")]
    Executor(#[source] std::io::Error),
}

pub(crate) struct Inner {
    config: QueryApiConfig,
    schema: DashboardSchema,
    pub(crate) sources: ReadSources,
    pub(crate) master_keys: Arc<MasterKeyring>,
    cache: Option<ResponseCache>,
    epoch: CacheEpoch,
    persisted: PersistedQueries,
    /// With a safelist only its documents run (and persisted queries are not registered).
    safelist: Option<Arc<Safelist>>,
    executor: Executor,
    pub(crate) verifier: TokenVerifier,
    pub(crate) limiter: ClientLimiter,
    metrics: PrometheusHandle,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryApi")
            .field("config", &self.config)
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

pub(crate) type AppState = Arc<Inner>;

/// The query API, bound and ready to serve.
#[derive(Debug)]
pub struct QueryApi {
    listener: TcpListener,
    state: AppState,
}

impl QueryApi {
    /// Binds `config.listen` (port 0 picks a free port; see [`QueryApi::local_addr`]).
    /// `primary` should be a pool of its own: reads must not queue behind appends.
    pub async fn build(
        config: QueryApiConfig,
        primary: PgPool,
        metrics: PrometheusHandle,
    ) -> Result<Self, StartupError> {
        let verifier = TokenVerifier::new(&config.keys)?.with_max_lifetime(config.max_token_lifetime);
        let sources = ReadSources::new(primary, &config.replica_urls, config.sources.clone())?;
        let listener = command_api::connections::bind(config.listen).map_err(|source| StartupError::Bind {
            addr: config.listen,
            source,
        })?;
        let per_second = NonZeroU32::new(config.rate_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.rate_burst).unwrap_or(per_second);
        let state = Arc::new(Inner {
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            schema: build_schema(&config.limits, config.introspection),
            cache: (config.cache_max_bytes > 0).then(|| ResponseCache::new(config.cache_max_bytes)),
            epoch: CacheEpoch::new(config.cache_staleness),
            persisted: PersistedQueries::new(config.persisted_queries),
            safelist: config.safelist.clone(),
            executor: Executor::for_this_machine(config.executor_nice).map_err(StartupError::Executor)?,
            master_keys: Arc::clone(&config.master_keys),
            sources,
            verifier,
            metrics,
            config,
        });
        Ok(QueryApi { listener, state })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| self.state.config.listen)
    }

    pub fn sources(&self) -> &ReadSources {
        &self.state.sources
    }

    /// Serves until `shutdown` resolves, then finishes in-flight queries.
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let QueryApi { listener, state } = self;
        let stop = CancellationToken::new();
        // Probe before the first request, so replicas that are up serve from the start.
        state.sources.check_health().await;
        state.sources.refresh_watermarks().await;
        let health = state
            .sources
            .spawn_health_checks(state.config.health_interval, stop.clone());
        let watermarks = state
            .sources
            .spawn_watermarks(state.config.watermark_interval, stop.clone());
        let forget_old_clients = {
            let state = Arc::clone(&state);
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(60)) => state.limiter.retain_recent(),
                    }
                }
            })
        };
        let limits = state.config.connections;
        // The connections are served on the executor's threads (registered with its reactor,
        // so the listener moves there too): a flood of requests occupies those, never the
        // threads the command API and the projectors run on in `cloudphone serve`.
        let listener = listener.into_std()?;
        let serving = state.executor.spawn({
            let router = router(Arc::clone(&state));
            async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                command_api::connections::serve(listener, router, limits, "query", shutdown).await
            }
        });
        let served = serving.await.unwrap_or_else(|error| Err(std::io::Error::other(error)));
        stop.cancel();
        let _ = tokio::join!(health, watermarks, forget_old_clients);
        tracing::info!("query API stopped");
        served
    }
}

fn router(state: AppState) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    let body_limit = state.config.max_body_bytes;
    let body = command_api::startup::BodyLimits {
        max_bytes: body_limit,
        timeout: state.config.connections.body_read_timeout,
    };
    Router::new()
        .route("/graphql", get(graphiql).post(graphql))
        .route("/v1/audit/events", get(crate::audit::audit_events))
        .route_layer(axum::middleware::from_fn(command_api::telemetry::track_requests))
        .route("/healthz", get(|| async { Json::ok("{\"status\":\"ok\"}") }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        // A method a route does not take gets a coded error too (axum's own 405 has no body).
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json::errors(&[graphql_error(
                    "this route does not take that method; queries go to POST /graphql",
                    "METHOD_NOT_ALLOWED",
                )]),
            )
        })
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json::errors(&[graphql_error("no such route; queries go to POST /graphql", "NOT_FOUND")]),
            )
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(body, read_whole_body))
        .layer(CatchPanicLayer::custom(|_| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json::errors(&[graphql_error("internal error", "INTERNAL_SERVER_ERROR")]),
            )
                .into_response()
        }))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(command_api::telemetry::request_span))
        .layer(axum::middleware::from_fn(command_api::telemetry::ensure_trace_context))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state)
}

/// Reads the body before routing, as the command API does (see [`command_api::body`]).
async fn read_whole_body(
    State(limits): State<command_api::startup::BodyLimits>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match command_api::body::read_whole_body(request, limits.max_bytes, limits.timeout).await {
        Ok(request) => next.run(request).await,
        Err(error @ BodyError::TimedOut(_)) => body::closing(rejected(
            StatusCode::REQUEST_TIMEOUT,
            error.to_string(),
            "REQUEST_TIMEOUT",
        )),
        Err(error @ BodyError::TooLarge { .. }) => body::closing(rejected(
            StatusCode::PAYLOAD_TOO_LARGE,
            error.to_string(),
            "PAYLOAD_TOO_LARGE",
        )),
        Err(error @ BodyError::Unreadable(_)) => {
            body::closing(rejected(StatusCode::BAD_REQUEST, error.to_string(), "BAD_REQUEST"))
        }
    }
}

/// A JSON body with its content type.
struct Json;

impl Json {
    fn ok(body: impl Into<axum::body::Body>) -> Response {
        ([(header::CONTENT_TYPE, "application/json")], body.into()).into_response()
    }

    fn errors(errors: &[ServerError]) -> Response {
        let body = serde_json::json!({ "errors": errors }).to_string();
        Self::ok(body)
    }
}

fn graphql_error(message: impl Into<String>, code: &'static str) -> ServerError {
    let mut error = ServerError::new(message, None);
    error.extensions = async_graphql::Error::new("")
        .extend_with(|_, e| e.set("code", code))
        .extensions;
    error
}

fn rejected(status: StatusCode, message: impl Into<String>, code: &'static str) -> Response {
    metrics::counter!(m::GRAPHQL_REQUESTS_TOTAL, "outcome" => "rejected", "cache" => "none").increment(1);
    (status, Json::errors(&[graphql_error(message, code)])).into_response()
}

async fn graphiql(State(state): State<AppState>) -> Response {
    if state.config.graphiql {
        Html(
            async_graphql::http::GraphiQLSource::build()
                .endpoint("/graphql")
                .title("Cloudphone dashboards")
                .finish(),
        )
        .into_response()
    } else {
        rejected(
            StatusCode::METHOD_NOT_ALLOWED,
            "GraphiQL is turned off here; send queries with POST /graphql",
            "METHOD_NOT_ALLOWED",
        )
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

fn viewer_of(principal: &Principal) -> Option<Viewer> {
    match (principal.role, principal.user_id) {
        (Role::Admin, _) => Some(Viewer::Everyone),
        (Role::User, Some(user)) => Some(Viewer::User(user)),
        (Role::Service, _) if principal.has_scope(scope::DASHBOARDS_READ) => Some(Viewer::Everyone),
        _ => None,
    }
}

async fn graphql(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    // Everything from here on, parsing and validation included, counts against the limit.
    let deadline = tokio::time::Instant::now() + state.config.query_timeout;
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let principal = match state.verifier.verify_header(authorization) {
        Ok(principal) => principal,
        Err(error) => {
            tracing::info!(%error, "query refused: not authenticated");
            return rejected(
                StatusCode::UNAUTHORIZED,
                "a valid bearer token is required",
                "UNAUTHENTICATED",
            );
        }
    };
    if let Err(not_until) = state.limiter.check_key(&principal.rate_key()) {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
        let mut response = rejected(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many queries from this client; retry in {} ms",
                wait.as_millis().max(1)
            ),
            "RATE_LIMITED",
        );
        if let Ok(value) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return response;
    }
    let Some(viewer) = viewer_of(&principal) else {
        return rejected(
            StatusCode::FORBIDDEN,
            format!(
                "a {} token without the `{}` scope cannot read dashboards",
                principal.role,
                scope::DASHBOARDS_READ
            ),
            "FORBIDDEN",
        );
    };
    // Reading the body's JSON and measuring the document are CPU work: on the executor's
    // threads, like validation and execution, never on the threads other roles share.
    let preparing = Arc::clone(&state);
    let prepared = state
        .executor
        .run(async move { prepare(&preparing, &headers, &body, viewer, deadline) });
    let asked = match tokio::time::timeout_at(deadline, prepared).await {
        Ok(Ok(Ok(asked))) => asked,
        Ok(Ok(Err(Rejection(status, message, code)))) => return rejected(status, message, code),
        Ok(Err(error)) => {
            tracing::error!(%error, "query preparation failed");
            return rejected(
                StatusCode::SERVICE_UNAVAILABLE,
                "internal error",
                "INTERNAL_SERVER_ERROR",
            );
        }
        Err(_) => {
            return rejected(
                StatusCode::OK,
                format!(
                    "the query took longer than {:?} and was stopped; ask for less",
                    state.config.query_timeout
                ),
                "TIMEOUT",
            );
        }
    };
    let answer = answer(&state, &asked).await;
    let cache = answer.cache;
    metrics::counter!(m::GRAPHQL_REQUESTS_TOTAL, "outcome" => answer.outcome, "cache" => cache).increment(1);
    metrics::histogram!(m::GRAPHQL_REQUEST_DURATION_SECONDS, "cache" => cache).record(started.elapsed().as_secs_f64());
    answer.into_response()
}

/// A request refused before it was asked: status, message and code of the answer.
struct Rejection(StatusCode, String, &'static str);

/// The request's body read into a question: its document resolved (safelist, persisted
/// queries), measured and parsed, its variables and position; or the answer refusing it.
fn prepare(
    state: &Inner,
    headers: &HeaderMap,
    body: &[u8],
    viewer: Viewer,
    deadline: tokio::time::Instant,
) -> Result<Asked, Rejection> {
    let body: GraphqlBody = match serde_json::from_slice(body) {
        Ok(body) => body,
        Err(error) => {
            let message = if body.first() == Some(&b'[') {
                "batched requests are not supported; send one query per request".to_owned()
            } else {
                format!("the body is not a GraphQL request (JSON with `query`): {error}")
            };
            return Err(Rejection(StatusCode::BAD_REQUEST, message, "BAD_REQUEST"));
        }
    };
    let persisted = body.extensions.as_ref().and_then(|e| e.persisted_query.as_ref());
    let query = match &state.safelist {
        Some(safelist) => {
            let registered = match (&body.query, persisted, &body.document_id) {
                (_, _, Some(id)) => safelist.by_id(id),
                (_, Some(persisted), None) => safelist.by_id(&persisted.sha256_hash),
                (Some(text), None, None) => safelist.by_text(text),
                (None, None, None) => None,
            };
            match registered {
                Some(query) => query,
                None => {
                    return Err(Rejection(
                        StatusCode::FORBIDDEN,
                        "only registered documents run here (the server has a safelist); send a registered document or its id"
                            .to_owned(),
                        "DOCUMENT_NOT_ALLOWED",
                    ));
                }
            }
        }
        None => match state.persisted.resolve(body.query, persisted) {
            Ok(query) => query,
            // Apollo clients expect a 200 with the code, then retry with the full query.
            Err(error) => {
                let status = if error.code() == "PERSISTED_QUERY_NOT_FOUND" {
                    StatusCode::OK
                } else {
                    StatusCode::BAD_REQUEST
                };
                return Err(Rejection(status, error.to_string(), error.code()));
            }
        },
    };
    let variables = match body.variables {
        None | Some(serde_json::Value::Null) => serde_json::Value::Object(Default::default()),
        Some(value @ serde_json::Value::Object(_)) => value,
        Some(_) => {
            return Err(Rejection(
                StatusCode::BAD_REQUEST,
                "`variables` must be an object".to_owned(),
                "BAD_REQUEST",
            ));
        }
    };
    // Measured before anything expands it: a document over a limit costs microseconds.
    let checked = match check_document(&query, &state.config.limits.document) {
        Ok(checked) => checked,
        Err(error) => {
            tracing::info!(%error, "query refused before validation");
            return Err(Rejection(StatusCode::OK, error.to_string(), error.code()));
        }
    };
    let min_position = match min_position(headers, &checked.document, body.operation_name.as_deref(), &variables) {
        Ok(position) => position,
        Err(message) => return Err(Rejection(StatusCode::BAD_REQUEST, message, "BAD_USER_INPUT")),
    };
    Ok(Asked {
        normalized: normalize_query(&query),
        query,
        document: checked.document,
        operation_name: body.operation_name,
        variables_key: event_schema::canonical::canonical_json(&variables),
        variables,
        viewer,
        min_position,
        deadline,
    })
}

/// A question, resolved, parsed and normalized.
#[derive(Debug)]
struct Asked {
    query: Arc<str>,
    document: ExecutableDocument,
    normalized: String,
    operation_name: Option<String>,
    variables: serde_json::Value,
    variables_key: String,
    viewer: Viewer,
    min_position: Option<i64>,
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
        if let Some(position) = self.position
            && let Ok(value) = HeaderValue::from_str(&position.to_string())
        {
            headers.insert("x-read-position", value);
        }
        response
    }
}

async fn answer(state: &Inner, asked: &Asked) -> Answer {
    // One attempt per replica and one for the primary: a failing source leaves rotation.
    let attempts = state.sources.replica_states().len() + 1;
    let mut last_failure = None;
    for _ in 0..attempts {
        let route = match state.sources.route(asked.min_position).await {
            Ok(route) => route,
            Err(error) => return unroutable(&error),
        };
        // The source had applied at least this much before the query read it.
        let read_at = route.checkpoints.as_ref().and_then(|c| c.iter().min().copied());
        let key = route.checkpoints.as_ref().map(|seen| {
            cache_key(&CacheKeyParts {
                normalized_query: &asked.normalized,
                operation_name: asked.operation_name.as_deref(),
                variables: &asked.variables_key,
                scope: &asked.viewer.cache_scope(),
                checkpoints: &state.epoch.key_for(seen, asked.min_position),
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
        match execute(state, asked, &route).await {
            Executed::Answered { body, cacheable, ok } => {
                let stored = match (&state.cache, key) {
                    (Some(cache), Some(key)) if cacheable => cache.insert(
                        key,
                        CachedAnswer {
                            body: body.clone(),
                            position: read_at,
                        },
                    ),
                    _ => false,
                };
                return Answer {
                    status: StatusCode::OK,
                    body,
                    cache: if stored { "miss" } else { "bypass" },
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

fn unroutable(error: &ReadError) -> Answer {
    let (status, code) = match error {
        // Not a failure of the service: the caller may retry or drop the position.
        ReadError::NotYetVisible { .. } => (StatusCode::OK, "NOT_YET_VISIBLE"),
        ReadError::Database(_) => (StatusCode::SERVICE_UNAVAILABLE, "SOURCE_UNAVAILABLE"),
    };
    if let ReadError::Database(error) = error {
        tracing::warn!(%error, "no source to route a query to");
    }
    let message = match error {
        ReadError::NotYetVisible { .. } => error.to_string(),
        ReadError::Database(_) => "the read models are unavailable right now; retry shortly".to_owned(),
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
    let read = Arc::new(ReadContext::new(asked.viewer, route.pool.clone(), state.config.limits));
    let mut request =
        async_graphql::Request::new(asked.query.to_string()).variables(Variables::from_json(asked.variables.clone()));
    request.set_parsed_query(asked.document.clone());
    if let Some(name) = &asked.operation_name {
        request = request.operation_name(name.clone());
    }
    let request = request_data(request, Arc::clone(&read));
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
    let timeout = state.config.query_timeout;
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
            let body = serde_json::json!({ "errors": [graphql_error(
                format!("the query took longer than {timeout:?} and was stopped; ask for less"),
                "TIMEOUT",
            )] });
            return Executed::Answered {
                body: Bytes::from(body.to_string()),
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
fn with_error_codes(errors: &mut [ServerError]) {
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

/// The `X-Min-Position` header: a position the answer must include (a command's `position`).
pub(crate) fn min_position_header(headers: &HeaderMap) -> Result<Option<i64>, &'static str> {
    match headers.get("x-min-position") {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|p| *p >= 0)
            .map(Some)
            .ok_or("X-Min-Position must be a non-negative integer (a command's `position`)"),
    }
}

/// The position the caller wants to read at: the `X-Min-Position` header or the largest
/// `minPosition` argument of the operation's root fields.
fn min_position(
    headers: &HeaderMap,
    document: &ExecutableDocument,
    operation_name: Option<&str>,
    variables: &serde_json::Value,
) -> Result<Option<i64>, String> {
    let header = min_position_header(headers)?;
    let argument = crate::graphql::min_position_argument(document, operation_name, variables)?;
    Ok(header.max(argument))
}

/// Ready when the primary answers; replicas are reported but do not decide readiness (reads
/// fall back to the primary without them).
async fn readyz(State(state): State<AppState>) -> Response {
    let check = sqlx::query("SELECT 1").execute(state.sources.primary());
    let database = match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("no answer within 2 s".to_owned()),
    };
    let replicas: Vec<serde_json::Value> = state
        .sources
        .replica_states()
        .into_iter()
        .map(|(name, healthy, lag_bytes)| serde_json::json!({"replica": name, "in_rotation": healthy, "lag_bytes": lag_bytes}))
        .collect();
    let (status, body) = match database {
        Ok(()) => (
            StatusCode::OK,
            serde_json::json!({"status": "ready", "database": "ok", "replicas": replicas}),
        ),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "unavailable", "database": error, "replicas": replicas}),
        ),
    };
    (status, Json::ok(body.to_string())).into_response()
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
