//! The two WebSocket subprotocols GraphQL clients speak, read and written: `graphql-transport-ws`
//! (the `graphql-ws` library's; the current one) and the older `graphql-ws`
//! (`subscriptions-transport-ws`), which differ in names only for what this server uses.
//! Pure: no socket, no clock.

use serde::Deserialize;

/// A subprotocol this server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `graphql-transport-ws`.
    TransportWs,
    /// `graphql-ws`, the legacy `subscriptions-transport-ws` protocol.
    Legacy,
}

impl Protocol {
    /// The names offered in `Sec-WebSocket-Protocol`, in the server's order of preference.
    pub const NAMES: [&'static str; 2] = ["graphql-transport-ws", "graphql-ws"];

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "graphql-transport-ws" => Some(Protocol::TransportWs),
            "graphql-ws" => Some(Protocol::Legacy),
            _ => None,
        }
    }

    /// `connection_ack`.
    pub fn ack(self) -> String {
        r#"{"type":"connection_ack"}"#.to_owned()
    }

    /// An answer for subscription `id`: `next` (`data` in the legacy protocol), with the
    /// serialized response spliced in as it is (shared by every subscriber of a group).
    pub fn next(self, id: &str, payload: &[u8]) -> String {
        let kind = match self {
            Protocol::TransportWs => "next",
            Protocol::Legacy => "data",
        };
        let payload = String::from_utf8_lossy(payload);
        format!(r#"{{"id":{},"type":"{kind}","payload":{payload}}}"#, json_string(id))
    }

    /// Errors that end subscription `id` before it answered: a list of GraphQL errors (one
    /// object in the legacy protocol, its first).
    pub fn error(self, id: &str, errors: &[u8]) -> String {
        let errors = String::from_utf8_lossy(errors);
        let payload = match self {
            Protocol::TransportWs => errors.into_owned(),
            Protocol::Legacy => serde_json::from_str::<Vec<serde_json::Value>>(&errors)
                .ok()
                .and_then(|list| list.into_iter().next())
                .map_or_else(|| errors.into_owned(), |first| first.to_string()),
        };
        format!(r#"{{"id":{},"type":"error","payload":{payload}}}"#, json_string(id))
    }

    /// Subscription `id` is over.
    pub fn complete(self, id: &str) -> String {
        format!(r#"{{"id":{},"type":"complete"}}"#, json_string(id))
    }

    /// The keep-alive message (`ping`, answered by `pong`; the legacy `ka` is not answered).
    pub fn keep_alive(self) -> &'static str {
        match self {
            Protocol::TransportWs => r#"{"type":"ping"}"#,
            Protocol::Legacy => r#"{"type":"ka"}"#,
        }
    }

    /// Reads one text frame.
    pub fn read(self, text: &str) -> Result<ClientMessage, ProtocolError> {
        let raw: RawMessage =
            serde_json::from_str(text).map_err(|error| ProtocolError::NotAMessage(error.to_string()))?;
        let id = || {
            let id = raw.id.clone().ok_or(ProtocolError::MissingId)?;
            if id.is_empty() || id.len() > MAX_ID_BYTES {
                return Err(ProtocolError::BadId);
            }
            Ok(id)
        };
        Ok(match (self, raw.kind.as_str()) {
            (_, "connection_init") => ClientMessage::Init(raw.payload),
            (Protocol::TransportWs, "ping") => ClientMessage::Ping,
            (Protocol::TransportWs, "pong") => ClientMessage::Pong,
            (Protocol::TransportWs, "subscribe") | (Protocol::Legacy, "start") => ClientMessage::Subscribe {
                id: id()?,
                payload: raw.payload.ok_or(ProtocolError::MissingPayload)?,
            },
            (Protocol::TransportWs, "complete") | (Protocol::Legacy, "stop") => ClientMessage::Complete { id: id()? },
            (Protocol::Legacy, "connection_terminate") => ClientMessage::Terminate,
            (_, other) => return Err(ProtocolError::UnknownType(other.chars().take(64).collect())),
        })
    }
}

/// Longest subscription id taken.
pub const MAX_ID_BYTES: usize = 128;

/// A message from the client.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    Init(Option<serde_json::Value>),
    Ping,
    Pong,
    Subscribe { id: String, payload: serde_json::Value },
    Complete { id: String },
    Terminate,
}

#[derive(Debug, Deserialize)]
struct RawMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    payload: Option<serde_json::Value>,
}

/// A frame that is not a message of the protocol: the socket closes with 4400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("not a message of the protocol: {0}")]
    NotAMessage(String),
    #[error("unknown message type `{0}`")]
    UnknownType(String),
    #[error("the message needs an `id`")]
    MissingId,
    #[error("a subscription id is 1 to {MAX_ID_BYTES} bytes")]
    BadId,
    #[error("the message needs a `payload`")]
    MissingPayload,
}

/// Close codes, as `graphql-ws` defines them, and this server's own (44xx for the client's
/// doing, 45xx for the server's).
pub mod close {
    /// A frame that is not a message of the protocol.
    pub const BAD_MESSAGE: u16 = 4400;
    /// `subscribe` before `connection_ack`.
    pub const UNAUTHORIZED: u16 = 4401;
    /// The token was refused, or may not read dashboards.
    pub const FORBIDDEN: u16 = 4403;
    /// No `connection_init` in time.
    pub const INIT_TIMEOUT: u16 = 4408;
    /// A second subscription with an id in use.
    pub const DUPLICATE_ID: u16 = 4409;
    /// A second `connection_init`.
    pub const TOO_MANY_INITS: u16 = 4429;
    /// The client reads its answers too slowly: one waited longer than the send timeout.
    pub const TOO_SLOW: u16 = 4410;
    /// Nothing heard from the client (not even a pong) for two keep-alive intervals.
    pub const GONE_QUIET: u16 = 4411;
    /// This client has as many subscription connections open as allowed.
    pub const TOO_MANY_CONNECTIONS: u16 = 4430;
    /// The server holds as many sockets as it takes (WebSocket's own "try again later").
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The server is shutting down (WebSocket's own "going away").
    pub const GOING_AWAY: u16 = 1001;
    /// The client asked to end (legacy `connection_terminate`).
    pub const NORMAL: u16 = 1000;
}

fn json_string(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_protocols_read_the_same_intents() {
        let modern = Protocol::TransportWs;
        let legacy = Protocol::Legacy;
        let subscribe =
            r#"{"id":"1","type":"subscribe","payload":{"query":"subscription { projectionStatus { name } }"}}"#;
        let start = subscribe.replace("subscribe", "start");
        let ClientMessage::Subscribe { id, payload } = modern.read(subscribe).unwrap() else {
            panic!("not a subscribe");
        };
        assert_eq!(id, "1");
        assert_eq!(legacy.read(&start).unwrap(), ClientMessage::Subscribe { id, payload });
        assert_eq!(
            modern.read(r#"{"id":"1","type":"complete"}"#).unwrap(),
            legacy.read(r#"{"id":"1","type":"stop"}"#).unwrap()
        );
        assert_eq!(
            legacy.read(r#"{"type":"connection_terminate"}"#).unwrap(),
            ClientMessage::Terminate
        );
        assert_eq!(
            modern
                .read(r#"{"type":"connection_init","payload":{"authorization":"Bearer x"}}"#)
                .unwrap(),
            ClientMessage::Init(Some(serde_json::json!({"authorization": "Bearer x"})))
        );
    }

    #[test]
    fn what_is_not_a_message_is_refused_with_a_reason() {
        let modern = Protocol::TransportWs;
        assert!(matches!(modern.read("{"), Err(ProtocolError::NotAMessage(_))));
        assert!(matches!(
            modern.read(r#"{"type":"start","id":"1","payload":{}}"#),
            Err(ProtocolError::UnknownType(_))
        ));
        assert_eq!(
            modern.read(r#"{"type":"subscribe","payload":{}}"#),
            Err(ProtocolError::MissingId)
        );
        assert_eq!(
            modern.read(r#"{"type":"subscribe","id":"1"}"#),
            Err(ProtocolError::MissingPayload)
        );
        let long = format!(r#"{{"type":"complete","id":"{}"}}"#, "x".repeat(MAX_ID_BYTES + 1));
        assert_eq!(modern.read(&long), Err(ProtocolError::BadId));
        let message = modern
            .read(&format!(r#"{{"type":"{}"}}"#, "t".repeat(10_000)))
            .unwrap_err()
            .to_string();
        assert!(message.len() < 200, "an echoed type is cut short: {message}");
    }

    #[test]
    fn answers_splice_the_shared_payload_and_escape_ids() {
        let next = Protocol::TransportWs.next("a\"b", br#"{"data":{"x":1}}"#);
        let parsed: serde_json::Value = serde_json::from_str(&next).unwrap();
        assert_eq!(parsed["id"], "a\"b");
        assert_eq!(parsed["type"], "next");
        assert_eq!(parsed["payload"]["data"]["x"], 1);
        let data: serde_json::Value = serde_json::from_str(&Protocol::Legacy.next("1", b"{}")).unwrap();
        assert_eq!(data["type"], "data");
        let error: serde_json::Value =
            serde_json::from_str(&Protocol::Legacy.error("1", br#"[{"message":"no"},{"message":"and"}]"#)).unwrap();
        assert_eq!(error["payload"]["message"], "no");
        let error: serde_json::Value =
            serde_json::from_str(&Protocol::TransportWs.error("1", br#"[{"message":"no"}]"#)).unwrap();
        assert_eq!(error["payload"][0]["message"], "no");
    }
}
