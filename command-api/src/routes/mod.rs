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
