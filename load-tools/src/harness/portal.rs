//! What a load run does as a portal before its load starts: register users through the
//! command API, and give them room for large fleets.

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

/// Registers `count` enterprise users, and an admin raises each one's quota for a large
/// fleet; returns their ids and user tokens.
pub async fn provision_users(
    client: &reqwest::Client,
    base: &str,
    count: usize,
) -> anyhow::Result<Vec<(Uuid, String)>> {
    let admin = load_token(&Uuid::now_v7().to_string(), Role::Admin)?;
    let mut users = Vec::with_capacity(count);
    for _ in 0..count {
        let (id, token) = register_user(client, base).await?;
        let quota = client
            .put(format!("{base}/v1/users/{id}/quota"))
            .bearer_auth(&admin)
            .json(&json!({"max_devices": 100000, "max_cpu_cores": 1600000, "max_memory_mb": 4000000000u64}))
            .send()
            .await?;
        if !quota.status().is_success() {
            bail!("provisioning a quota failed: {}", quota.status());
        }
        users.push((id, token));
    }
    Ok(users)
}
