//! What a load run does as a portal before its load starts: register users through the
//! command API.

use anyhow::bail;
use http_edge::auth::Role;
use serde_json::json;
use uuid::Uuid;

use super::tokens::load_token;

/// Registers a new enterprise user through the command API at `base` (201, or an error with
/// the answer); returns its id and a user token for it.
pub async fn register_user(client: &reqwest::Client, base: &str) -> anyhow::Result<(Uuid, String)> {
    let id = Uuid::now_v7();
    let token = load_token(&id.to_string(), Role::User)?;
    let answer = client
        .post(format!("{base}/v1/users"))
        .bearer_auth(&token)
        .json(&json!({"tier": "enterprise", "email": "load@example.com", "phone": "+4915112345678"}))
        .send()
        .await?;
    if answer.status() != reqwest::StatusCode::CREATED {
        bail!(
            "registering a user answered {}: {}",
            answer.status(),
            answer.text().await.unwrap_or_default()
        );
    }
    Ok((id, token))
}
