//! One module per resource; each exposes `router()`.

pub mod batch;
pub mod devices;
pub mod system;
pub mod users;

use axum::Router;

use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .merge(users::router())
        .merge(devices::router())
        .merge(batch::router())
}

/// The `Location` header of a 201: the created user's or device's path (relative, so it is
/// right behind any proxy), which the OpenAPI document promises on every 201.
#[derive(Debug)]
pub struct Location(String);

impl Location {
    pub fn of(collection: &str, id: uuid::Uuid) -> Self {
        Location(format!("{collection}/{id}"))
    }
}

impl axum::response::IntoResponseParts for Location {
    type Error = std::convert::Infallible;

    fn into_response_parts(
        self,
        mut parts: axum::response::ResponseParts,
    ) -> Result<axum::response::ResponseParts, Self::Error> {
        // A path and a UUID are always a valid header value; were one not, the answer goes
        // without the header rather than failing a command that has committed.
        if let Ok(value) = axum::http::HeaderValue::from_str(&self.0) {
            parts.headers_mut().insert(axum::http::header::LOCATION, value);
        }
        Ok(parts)
    }
}
