//! One subscription socket, from the upgrade to the close: the caller authenticated once
//! (`connection_init`, or the upgrade request's `Authorization`), then scoped, limited and
//! refused exactly as `POST /graphql` is (same extractor steps, same error codes); each
//! subscription's answers written as they change; pings; slow, quiet or misbehaving clients
//! closed with a code that says why.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_graphql::parser::types::{DocumentOperations, ExecutableDocument, OperationType, Selection};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use http_edge::auth::Principal;
use tokio_stream::StreamMap;
use tokio_stream::wrappers::WatchStream;

use super::hub::{Answer, ConnectionSlot, Full, Group};
use super::metrics_names as m;
use super::protocol::{ClientMessage, Protocol, close};
use crate::extract::{Question, prepare, viewer_of};
use crate::graphql::Viewer;
use crate::reply::{Rejection, graphql_error};
use crate::state::AppState;

/// `GET /graphql`: a WebSocket upgrade becomes a subscription socket; anything else is
/// GraphiQL's page.
pub(crate) async fn graphql_get(State(state): State<AppState>, request: Request) -> Response {
    let wants_socket = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !wants_socket {
        let headers = request.headers().clone();
        return crate::routes::graphiql(State(state), headers).await;
    }
    let (mut parts, _) = request.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &state).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    upgrade_socket(state, upgrade, &parts.headers)
}

fn upgrade_socket(state: AppState, upgrade: WebSocketUpgrade, headers: &HeaderMap) -> Response {
    let upgrade = upgrade.protocols(Protocol::NAMES);
    let Some(protocol) = upgrade
        .selected_protocol()
        .and_then(|p| p.to_str().ok())
        .and_then(Protocol::from_name)
    else {
        return Rejection::new(
            StatusCode::BAD_REQUEST,
            "subscriptions need the WebSocket subprotocol `graphql-transport-ws` (or the legacy `graphql-ws`)",
            "BAD_REQUEST",
        )
        .into_response();
    };
    // A token on the upgrade request is checked before switching, so a browser sees a 401
    // rather than a socket that closes at once.
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let principal = match authorization {
        None => None,
        Some(value) => match authenticate(&state, value) {
            Ok(principal) => Some(principal),
            Err((_, reason)) => {
                return Rejection::new(StatusCode::UNAUTHORIZED, reason, "UNAUTHENTICATED").into_response();
            }
        },
    };
    let hub = &state.live;
    if !hub.has_room() {
        return Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server holds as many subscription connections as it takes; retry later",
            "TOO_MANY_CONNECTIONS",
        )
        .into_response();
    }
    let config = *hub.config();
    let tracker = hub.sockets.clone();
    upgrade
        // Small buffers: thousands of sockets mostly idle between answers.
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(config.max_message_bytes.max(1024 * 1024))
        .max_message_size(config.max_message_bytes)
        .max_frame_size(config.max_message_bytes)
        .on_upgrade(move |socket| tracker.track_future(serve(state, socket, protocol, principal)))
}

/// What a refused authentication closes the socket with.
fn authenticate(state: &AppState, authorization: &str) -> Result<Principal, (u16, String)> {
    let principal = state
        .verifier
        .verify_header(Some(authorization))
        .map_err(|error| (close::FORBIDDEN, format!("Forbidden: {error}")))?;
    Ok(principal)
}

type Answers = Pin<Box<dyn Stream<Item = Answer> + Send>>;

/// One socket's state.
struct Session {
    state: AppState,
    protocol: Protocol,
    principal: Option<Principal>,
    viewer: Option<Viewer>,
    slot: Option<ConnectionSlot>,
    answers: StreamMap<String, Answers>,
    groups: HashMap<String, Arc<Group>>,
}

/// What the loop does after a message.
enum Next {
    Continue,
    Close(u16, String),
}

async fn serve(state: AppState, mut socket: WebSocket, protocol: Protocol, principal: Option<Principal>) {
    let config = *state.live.config();
    let closing = state.live.closing.clone();
    let mut session = Session {
        state,
        protocol,
        principal,
        viewer: None,
        slot: None,
        answers: StreamMap::new(),
        groups: HashMap::new(),
    };
    let init_deadline = tokio::time::sleep(config.init_timeout);
    tokio::pin!(init_deadline);
    let mut keep_alive = tokio::time::interval_at(tokio::time::Instant::now() + config.keep_alive, config.keep_alive);
    let mut heard = Instant::now();
    // Armed once the caller is known: a socket may not outlive its token.
    let expiry = tokio::time::sleep(config.init_timeout);
    tokio::pin!(expiry);
    let mut expiry_armed = false;
    let ending = loop {
        if !expiry_armed && let Some(principal) = session.principal.as_ref().filter(|_| session.viewer.is_some()) {
            expiry.as_mut().reset(token_deadline(principal));
            expiry_armed = true;
        }
        let next = tokio::select! {
            () = closing.cancelled() => Next::Close(close::GOING_AWAY, "the server is shutting down".to_owned()),
            () = &mut init_deadline, if session.viewer.is_none() => {
                Next::Close(close::INIT_TIMEOUT, "Connection initialisation timeout".to_owned())
            }
            () = &mut expiry, if expiry_armed => {
                Next::Close(close::FORBIDDEN, "Forbidden: the token expired; reconnect with a fresh one".to_owned())
            }
            frame = socket.recv() => {
                heard = Instant::now();
                match frame {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break None,
                    Some(Ok(Message::Text(text))) => match protocol.read(text.as_str()) {
                        Ok(message) => session.handle(&mut socket, message, config.send_timeout).await,
                        Err(error) => Next::Close(close::BAD_MESSAGE, error.to_string()),
                    },
                    Some(Ok(Message::Binary(_))) => {
                        Next::Close(close::BAD_MESSAGE, "binary frames are not part of the protocol".to_owned())
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => Next::Continue,
                }
            }
            Some((id, answer)) = session.answers.next() => session.push(&mut socket, id, answer, config.send_timeout).await,
            _ = keep_alive.tick() => {
                if heard.elapsed() > config.keep_alive * 2 {
                    Next::Close(close::GONE_QUIET, "nothing heard from the client; closing".to_owned())
                } else {
                    // A WebSocket ping every client's stack answers (browsers too), and the
                    // protocol's own for clients that watch for it.
                    let sent = send(&mut socket, Message::Ping(Default::default()), config.send_timeout).await
                        && send(&mut socket, Message::text(protocol.keep_alive()), config.send_timeout).await;
                    if sent { Next::Continue } else { too_slow() }
                }
            }
        };
        if let Next::Close(code, reason) = next {
            break Some((code, reason));
        }
    };
    if let Some((code, reason)) = ending {
        let label = close_label(code);
        metrics::counter!(m::CLOSED_TOTAL, "reason" => label).increment(1);
        tracing::debug!(code, %reason, "closing a subscription socket");
        let frame = CloseFrame {
            code,
            reason: truncate(&reason, 120).into(),
        };
        // A client that stopped reading gets no close frame; its socket is dropped anyway.
        let _ = tokio::time::timeout(Duration::from_millis(500), socket.send(Message::Close(Some(frame)))).await;
    }
    session.leave_all();
}

impl Session {
    async fn handle(&mut self, socket: &mut WebSocket, message: ClientMessage, send_timeout: Duration) -> Next {
        let protocol = self.protocol;
        match message {
            ClientMessage::Init(payload) => self.init(socket, payload.as_ref(), send_timeout).await,
            ClientMessage::Ping => {
                if send(socket, Message::text(r#"{"type":"pong"}"#), send_timeout).await {
                    Next::Continue
                } else {
                    too_slow()
                }
            }
            ClientMessage::Pong => Next::Continue,
            ClientMessage::Terminate => Next::Close(close::NORMAL, "terminated by the client".to_owned()),
            ClientMessage::Complete { id } => {
                self.stop(&id);
                Next::Continue
            }
            ClientMessage::Subscribe { id, payload } => {
                let Some(viewer) = self.viewer else {
                    return Next::Close(close::UNAUTHORIZED, "Unauthorized".to_owned());
                };
                if self.groups.contains_key(&id) {
                    return Next::Close(close::DUPLICATE_ID, format!("Subscriber for {id} already exists"));
                }
                match self.subscribe(&id, &payload, viewer).await {
                    Ok(()) => Next::Continue,
                    Err(errors) => {
                        if send(socket, Message::text(protocol.error(&id, &errors)), send_timeout).await {
                            Next::Continue
                        } else {
                            too_slow()
                        }
                    }
                }
            }
        }
    }

    async fn init(
        &mut self,
        socket: &mut WebSocket,
        payload: Option<&serde_json::Value>,
        send_timeout: Duration,
    ) -> Next {
        if self.viewer.is_some() {
            return Next::Close(close::TOO_MANY_INITS, "Too many initialisation requests".to_owned());
        }
        let authorization = payload.and_then(|p| p.as_object()).and_then(|p| {
            p.iter()
                .find(|(name, _)| name.eq_ignore_ascii_case("authorization"))
                .and_then(|(_, value)| value.as_str())
        });
        let principal = match (authorization, self.principal.take()) {
            (Some(value), _) => match authenticate(&self.state, value) {
                Ok(principal) => principal,
                Err((code, reason)) => return Next::Close(code, reason),
            },
            (None, Some(principal)) => principal,
            (None, None) => {
                return Next::Close(
                    close::FORBIDDEN,
                    "Forbidden: a bearer token is required (connection_init payload `authorization`)".to_owned(),
                );
            }
        };
        let Some(viewer) = viewer_of(&principal) else {
            return Next::Close(
                close::FORBIDDEN,
                format!("Forbidden: a {} token cannot read dashboards", principal.role),
            );
        };
        match self.state.live.open_connection(&principal.rate_key()) {
            Ok(slot) => self.slot = Some(slot),
            Err(full @ Full::Client(_)) => return Next::Close(close::TOO_MANY_CONNECTIONS, full.to_string()),
            Err(full @ Full::Server(_)) => return Next::Close(close::TRY_AGAIN_LATER, full.to_string()),
        }
        self.viewer = Some(viewer);
        self.principal = Some(principal);
        if send(socket, Message::text(self.protocol.ack()), send_timeout).await {
            Next::Continue
        } else {
            too_slow()
        }
    }

    /// Starts subscription `id`, or answers with the errors that refuse it (as a JSON list).
    async fn subscribe(&mut self, id: &str, payload: &serde_json::Value, viewer: Viewer) -> Result<(), Vec<u8>> {
        let state = Arc::clone(&self.state);
        let refuse = |message: String, code: &'static str| {
            serde_json::to_vec(&[graphql_error(message, code)]).unwrap_or_default()
        };
        let limit = state.live.config().max_subscriptions_per_connection;
        if self.groups.len() >= limit {
            return Err(refuse(
                format!("a connection holds at most {limit} subscriptions; complete one first"),
                "TOO_MANY_SUBSCRIPTIONS",
            ));
        }
        if let Some(principal) = &self.principal
            && let Err(wait) = state.limiter.check(principal.rate_key())
        {
            let rejection = Rejection::rate_limited(wait);
            return Err(refuse(rejection.message().to_owned(), rejection.code()));
        }
        let question = question(&state, payload)
            .await
            .map_err(|(message, code)| refuse(message, code))?;
        match root_fields(&question.document, question.operation_name.as_deref()) {
            Some(1) => {}
            Some(_) => {
                return Err(refuse(
                    "a subscription selects exactly one root field (no fragments at the root); open one subscription per field"
                        .to_owned(),
                    "GRAPHQL_VALIDATION_FAILED",
                ));
            }
            None => {
                return Err(refuse(
                    "only subscriptions are served on this socket; send queries with POST /graphql".to_owned(),
                    "BAD_REQUEST",
                ));
            }
        }
        let (group, receiver) = state.live.join(&state, question, viewer).await;
        let answers: Answers = Box::pin(WatchStream::new(receiver).filter_map(|answer| async move { answer }));
        self.answers.insert(id.to_owned(), answers);
        self.groups.insert(id.to_owned(), group);
        Ok(())
    }

    /// Writes one answer of subscription `id`; a refused one ends it.
    async fn push(&mut self, socket: &mut WebSocket, id: String, answer: Answer, send_timeout: Duration) -> Next {
        let (text, caused_at, ends) = match &answer {
            Answer::Next { payload, caused_at } => (self.protocol.next(&id, payload), *caused_at, false),
            Answer::Refused(errors) => (self.protocol.error(&id, errors), None, true),
        };
        if ends {
            self.stop(&id);
        }
        if !send(socket, Message::text(text), send_timeout).await {
            return too_slow();
        }
        metrics::counter!(m::PUSHES_TOTAL).increment(1);
        if let Some(at) = caused_at {
            metrics::histogram!(m::PUSH_LATENCY_SECONDS).record(at.elapsed().as_secs_f64());
        }
        Next::Continue
    }

    fn stop(&mut self, id: &str) {
        self.answers.remove(id);
        if let Some(group) = self.groups.remove(id) {
            self.state.live.leave(&group);
        }
    }

    fn leave_all(&mut self) {
        let ids: Vec<String> = self.groups.keys().cloned().collect();
        for id in ids {
            self.stop(&id);
        }
        self.slot = None;
    }
}

/// The subscribe payload prepared as `POST /graphql` prepares a body (document limits,
/// safelist, persisted queries), on the executor's threads, by the query timeout.
async fn question(state: &AppState, payload: &serde_json::Value) -> Result<Question, (String, &'static str)> {
    let body = serde_json::to_vec(payload).map_err(|e| (e.to_string(), "BAD_REQUEST"))?;
    let preparing = Arc::clone(state);
    let timeout = state.config.query_timeout;
    let prepared = state
        .executor
        .run(async move { prepare(&preparing, &HeaderMap::new(), &body) });
    match tokio::time::timeout(timeout, prepared).await {
        Ok(Ok(Ok(question))) => Ok(question),
        Ok(Ok(Err(rejection))) => Err((rejection.message().to_owned(), rejection.code())),
        Ok(Err(_)) => Err(("internal error".to_owned(), "INTERNAL_SERVER_ERROR")),
        Err(_) => Err((
            format!("the subscription took longer than {timeout:?} to prepare; ask for less"),
            "TIMEOUT",
        )),
    }
}

/// When a socket authenticated by `principal` must close: its token's `exp`, with the clock
/// skew every token check tolerates.
fn token_deadline(principal: &Principal) -> tokio::time::Instant {
    let now = chrono::Utc::now().timestamp();
    let left = principal
        .expires_at
        .saturating_add(http_edge::auth::LEEWAY_SECONDS as i64)
        .saturating_sub(now);
    // At most a year ahead: `Instant` arithmetic must not overflow on a far-off `exp`.
    let left = Duration::from_secs(u64::try_from(left).unwrap_or(0).min(365 * 24 * 3600));
    tokio::time::Instant::now() + left
}

/// Sends one message within `timeout`; false when the client did not take it in time.
async fn send(socket: &mut WebSocket, message: Message, timeout: Duration) -> bool {
    matches!(tokio::time::timeout(timeout, socket.send(message)).await, Ok(Ok(())))
}

fn too_slow() -> Next {
    Next::Close(
        close::TOO_SLOW,
        "the client reads its answers too slowly; reconnect and resubscribe".to_owned(),
    )
}

/// The number of root fields of the subscription the document runs (fragments at the root
/// count as many, so they are refused); `None` when it runs no subscription.
fn root_fields(document: &ExecutableDocument, operation: Option<&str>) -> Option<usize> {
    let selected = match (&document.operations, operation) {
        (DocumentOperations::Single(op), _) => Some(op),
        (DocumentOperations::Multiple(ops), Some(name)) => {
            ops.iter().find(|(n, _)| n.as_str() == name).map(|(_, op)| op)
        }
        (DocumentOperations::Multiple(ops), None) if ops.len() == 1 => ops.values().next(),
        (DocumentOperations::Multiple(_), None) => None,
    }?;
    if selected.node.ty != OperationType::Subscription {
        return None;
    }
    let items = &selected.node.selection_set.node.items;
    let fields = items
        .iter()
        .filter(|item| matches!(item.node, Selection::Field(_)))
        .count();
    Some(if fields == items.len() { fields } else { usize::MAX })
}

fn close_label(code: u16) -> &'static str {
    match code {
        close::BAD_MESSAGE => "bad_message",
        close::UNAUTHORIZED => "unauthorized",
        close::FORBIDDEN => "forbidden",
        close::INIT_TIMEOUT => "init_timeout",
        close::DUPLICATE_ID => "duplicate_id",
        close::TOO_MANY_INITS => "too_many_inits",
        close::TOO_SLOW => "too_slow",
        close::GONE_QUIET => "gone_quiet",
        close::TOO_MANY_CONNECTIONS => "too_many_connections",
        close::GOING_AWAY => "going_away",
        close::TRY_AGAIN_LATER => "server_full",
        close::NORMAL => "terminated",
        _ => "other",
    }
}

fn truncate(text: &str, bytes: usize) -> String {
    let mut end = text.len().min(bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
