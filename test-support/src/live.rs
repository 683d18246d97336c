//! A GraphQL subscription client for tests: a WebSocket to a query API speaking
//! `graphql-transport-ws` (or the legacy `graphql-ws`), with helpers that await the next
//! answer of a subscription or the close, each within a limit.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for an answer before it fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// An open subscription socket.
#[derive(Debug)]
pub struct LiveClient {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    legacy: bool,
}

/// How the socket ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
}

impl LiveClient {
    /// Opens a socket speaking `protocol` (`graphql-transport-ws` or `graphql-ws`), without
    /// `connection_init`.
    pub async fn open(addr: SocketAddr, protocol: &str, authorization: Option<&str>) -> Result<Self, Error> {
        let mut request = format!("ws://{addr}/graphql").into_client_request()?;
        let headers = request.headers_mut();
        headers.insert("sec-websocket-protocol", HeaderValue::from_str(protocol).unwrap());
        if let Some(value) = authorization {
            headers.insert("authorization", HeaderValue::from_str(value).unwrap());
        }
        let (socket, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(LiveClient {
            socket,
            legacy: protocol == "graphql-ws",
        })
    }

    /// Opens a `graphql-transport-ws` socket and signs in with `token`; panics unless acked.
    pub async fn connect(addr: SocketAddr, token: &str) -> Self {
        let mut client = Self::open(addr, "graphql-transport-ws", None).await.unwrap();
        client.init(token).await;
        client
    }

    /// Sends `connection_init` with the token; panics unless acked.
    pub async fn init(&mut self, token: &str) {
        self.send(json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}}))
            .await;
        let ack = self.message().await;
        assert_eq!(ack["type"], "connection_ack", "{ack}");
    }

    pub async fn send(&mut self, message: Value) {
        self.socket.send(Message::text(message.to_string())).await.unwrap();
    }

    pub async fn send_raw(&mut self, message: Message) -> Result<(), Error> {
        self.socket.send(message).await
    }

    /// Starts subscription `id`.
    pub async fn subscribe(&mut self, id: &str, query: &str, variables: Value) {
        let kind = if self.legacy { "start" } else { "subscribe" };
        self.send(json!({"id": id, "type": kind, "payload": {"query": query, "variables": variables}}))
            .await;
    }

    pub async fn complete(&mut self, id: &str) {
        let kind = if self.legacy { "stop" } else { "complete" };
        self.send(json!({"id": id, "type": kind})).await;
    }

    /// The next protocol message (pings answered, keep-alives skipped), within [`PATIENCE`].
    pub async fn message(&mut self) -> Value {
        match self.message_within(PATIENCE).await {
            Some(Ok(message)) => message,
            Some(Err(closed)) => panic!("the socket closed: {closed:?}"),
            None => panic!("no message within {PATIENCE:?}"),
        }
    }

    /// The next protocol message, the close, or `None` if neither came within `limit`.
    pub async fn message_within(&mut self, limit: Duration) -> Option<Result<Value, Closed>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.socket.next()).await.ok()?;
            match frame {
                Some(Ok(Message::Text(text))) => {
                    let message: Value = serde_json::from_str(text.as_str()).unwrap();
                    match message["type"].as_str() {
                        Some("ping") => self.send(json!({"type": "pong"})).await,
                        Some("ka") => {}
                        _ => return Some(Ok(message)),
                    }
                }
                Some(Ok(Message::Close(frame))) => return Some(Err(closed(frame))),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    return Some(Err(Closed {
                        code: 1006,
                        reason: "dropped".to_owned(),
                    }));
                }
            }
        }
    }

    /// The next answer's payload for subscription `id`. Answers of other subscriptions are
    /// skipped (lost to later calls): with several on one socket, read with
    /// [`LiveClient::message`] instead.
    pub async fn next_of(&mut self, id: &str) -> Value {
        loop {
            let message = self.message().await;
            if message["id"] == id {
                let kind = message["type"].as_str().unwrap_or_default();
                assert!(kind == "next" || kind == "data", "not an answer: {message}");
                return message["payload"].clone();
            }
        }
    }

    /// Waits for answers of `id` until one satisfies `wanted`; returns it.
    pub async fn next_until(&mut self, id: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        loop {
            let payload = self.next_of(id).await;
            if wanted(&payload) {
                return payload;
            }
        }
    }

    /// The close the server sends next (messages before it are skipped), within [`PATIENCE`].
    pub async fn closed(&mut self) -> Closed {
        loop {
            match self.message_within(PATIENCE).await {
                Some(Ok(_)) => {}
                Some(Err(closed)) => return closed,
                None => panic!("the socket did not close within {PATIENCE:?}"),
            }
        }
    }
}

fn closed(frame: Option<CloseFrame>) -> Closed {
    frame.map_or_else(
        || Closed {
            code: 1005,
            reason: String::new(),
        },
        |frame| Closed {
            code: frame.code.into(),
            reason: frame.reason.to_string(),
        },
    )
}
