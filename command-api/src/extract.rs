//! Request extractors that turn every malformed input into a precise [`ApiError`].

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use http_edge::auth::Principal;
use http_edge::problem::EdgeError;
use http_edge::telemetry::trace_id;

use crate::problem::ApiError;
use crate::state::AppState;

/// The authenticated, rate-limited caller.
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let principal = state.verifier.verify_header(header)?;
        if let Err(wait) = state.limiter.check(principal.rate_key()) {
            return Err(EdgeError::RateLimited { retry_after: wait }.into());
        }
        Ok(Caller(principal))
    }
}

/// A UUID path parameter (`{id}`), refused with 400 when it is not one.
#[derive(Debug, Clone, Copy)]
pub struct IdParam(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for IdParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(id) = Path::<Uuid>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::bad_request("invalid_id", "the id in the path must be a UUID"))?;
        Ok(IdParam(id))
    }
}

/// Where a request comes from and how to trace it: request id (also the events'
/// correlation id), W3C trace id, and the idempotency key if the client sent one.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    pub request_id: Uuid,
    pub trace_id: String,
    pub idempotency_key: Option<String>,
    method: Method,
    path: String,
}

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const REQUEST_ID: &str = "x-request-id";
const MAX_IDEMPOTENCY_KEY: usize = 200;

impl<S: Send + Sync> FromRequestParts<S> for RequestMeta {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(RequestMeta {
            request_id: request_id(&parts.headers),
            trace_id: trace_id(&parts.headers),
            idempotency_key: idempotency_key(&parts.headers)?,
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
        })
    }
}

impl RequestMeta {
    /// Hash of what the request asks for (method, path, body): the same Idempotency-Key with
    /// another request is refused.
    pub fn request_hash(&self, body: &[u8]) -> Vec<u8> {
        let mut hasher = Sha256::new();
        hasher.update(self.method.as_str().as_bytes());
        hasher.update([0]);
        hasher.update(self.path.as_bytes());
        hasher.update([0]);
        hasher.update(body);
        hasher.finalize().to_vec()
    }
}

/// The request id the request-id layer set (a client may send its own; a non-UUID one is
/// kept in logs but replaced here, because event metadata stores UUIDs).
fn request_id(headers: &HeaderMap) -> Uuid {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Uuid::parse_str(v).ok())
        .unwrap_or_else(Uuid::now_v7)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| (1..=MAX_IDEMPOTENCY_KEY).contains(&k.len()));
    match key {
        Some(key) if key.bytes().all(|b| b.is_ascii_graphic()) => Ok(Some(key.to_owned())),
        _ => Err(ApiError::bad_request(
            "invalid_idempotency_key",
            format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
        )),
    }
}

/// A JSON body, with the raw bytes kept for the idempotency hash.
#[derive(Debug)]
pub struct JsonBody<T> {
    pub value: T,
    pub raw: Bytes,
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(request.headers()) {
            return Err(EdgeError::UnsupportedMediaType.into());
        }
        let raw = read_body(request, state).await?;
        let value = parse_json(&raw)?;
        Ok(JsonBody { value, raw })
    }
}

/// A JSON body that may be absent (no body at all means `T::default()`).
#[derive(Debug)]
pub struct OptionalJsonBody<T> {
    pub value: T,
    pub raw: Bytes,
}

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = is_json(request.headers());
        let raw = read_body(request, state).await?;
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody {
                value: T::default(),
                raw,
            });
        }
        if !json {
            return Err(EdgeError::UnsupportedMediaType.into());
        }
        // `null` is "no body" too (the document allows it).
        let value = parse_json::<Option<T>>(&raw)?.unwrap_or_default();
        Ok(OptionalJsonBody { value, raw })
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
        .unwrap_or(false)
}

async fn read_body<S: Send + Sync>(request: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(request, state).await.map_err(|rejection| {
        if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            EdgeError::PayloadTooLarge.into()
        } else {
            ApiError::bad_request("invalid_body", rejection.body_text())
        }
    })
}

/// Parses a body. JSON Schema (and so the OpenAPI document) counts `4.0` as the integer 4;
/// so do we: whole-number floats are turned into integers before the typed parse.
fn parse_json<T: DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
    let mut value: serde_json::Value = serde_json::from_slice(raw).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::bad_request("invalid_body", e.to_string()),
        _ => ApiError::bad_request("malformed_json", e.to_string()),
    })?;
    integers_as_integers(&mut value);
    serde_json::from_value(value).map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))
}

fn integers_as_integers(value: &mut serde_json::Value) {
    use serde_json::Value;
    // Beyond 2^53 a float no longer holds every integer exactly; leave those alone.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match value {
        Value::Number(number) => {
            if let Some(float) = number.as_f64().filter(|_| number.is_f64())
                && float.fract() == 0.0
                && float.abs() <= EXACT
            {
                *value = Value::from(float as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integers_as_integers),
        Value::Object(map) => map.values_mut().for_each(integers_as_integers),
        Value::Null | Value::Bool(_) | Value::String(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn a_valid_traceparent_is_followed_and_a_bad_one_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert_eq!(trace_id(&headers), "4bf92f3577b34da6a3ce929d0e0e4736");
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        );
        let fresh = trace_id(&headers);
        assert_eq!(fresh.len(), 32);
        assert_ne!(fresh, "00000000000000000000000000000000");
    }

    #[test]
    fn idempotency_keys_must_be_short_visible_ascii() {
        let mut headers = HeaderMap::new();
        assert_eq!(idempotency_key(&headers).ok(), Some(None));
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("order-42"));
        assert_eq!(idempotency_key(&headers).ok(), Some(Some("order-42".to_owned())));
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("has space"));
        assert!(idempotency_key(&headers).is_err());
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_str(&"k".repeat(201)).unwrap());
        assert!(idempotency_key(&headers).is_err());
    }

    #[test]
    fn wrong_json_is_told_apart_from_wrong_values() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Body {
            n: u32,
        }
        assert_eq!(
            parse_json::<Body>(b"{").map_err(|e| e.code()).unwrap_err(),
            "malformed_json"
        );
        assert_eq!(
            parse_json::<Body>(br#"{"n": -1}"#).map_err(|e| e.code()).unwrap_err(),
            "invalid_body"
        );
        assert_eq!(
            parse_json::<Body>(br#"{"n": 1} x"#).map_err(|e| e.code()).unwrap_err(),
            "malformed_json"
        );
        assert!(parse_json::<Body>(br#"{"n": 1}"#).is_ok());
    }
}
