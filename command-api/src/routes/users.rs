//! `/v1/users`: register, quota, tier, erase.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, post, put};
use axum::{Json, Router};
use domain::user::UserCommand;
use event_schema::{Personal, Quota, Tier};
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::Location;
use crate::commands::{CommandAccepted, CommandContext, erase_user, run_user_command};
use crate::extract::{Caller, IdParam, JsonBody, RequestMeta};
use crate::openapi::CommandErrors;
use crate::problem::ApiError;
use crate::state::AppState;

pub fn router() -> axum::Router<AppState> {
    Router::new()
        .route("/v1/users", post(register))
        .route("/v1/users/{id}/quota", put(set_quota))
        .route("/v1/users/{id}/tier", put(change_tier))
        .route("/v1/users/{id}", delete(erase))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterUser {
    /// The new user's id. Defaults to the caller's own id for a `user` token; required for
    /// `admin` and `service` tokens.
    pub user_id: Option<Uuid>,
    #[schema(value_type = TierName, example = "pro")]
    pub tier: Tier,
    /// Personal data: encrypted at rest, shredded on erasure.
    #[schema(
        example = "ada@example.com",
        min_length = 3,
        max_length = 254,
        pattern = r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$"
    )]
    pub email: String,
    /// E.164, e.g. +4915112345678. Personal data.
    #[schema(example = "+4915112345678", pattern = r"^\+[1-9][0-9]{6,14}$")]
    pub phone: String,
}

/// A user's subscription tier; it selects default quotas and prices.
// Documents `tier` as the closed set it is: the words of `event_schema::Tier`, kept equal by
// `openapi::tests::documented_tiers_and_stop_reasons_are_the_domains`.
#[derive(Debug, ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // describes the schema only
pub enum TierName {
    Free,
    Basic,
    Pro,
    Enterprise,
}

/// Register a user (a user registering themselves, a `users:write` service, or an admin).
#[utoipa::path(post, path = "/v1/users", tag = "users", request_body = RegisterUser,
    responses((status = 201, description = "Registered", body = CommandAccepted), CommandErrors),
    security(("bearer" = [])))]
pub async fn register(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: RequestMeta,
    body: JsonBody<RegisterUser>,
) -> Result<(StatusCode, Location, Json<CommandAccepted>), ApiError> {
    let user_id = match (body.value.user_id, principal.user_id) {
        (Some(id), _) => id,
        (None, Some(own)) if principal.role == http_edge::auth::Role::User => own,
        _ => {
            return Err(ApiError::Unprocessable {
                code: "user_id_required",
                detail: "user_id is required when registering someone else".into(),
            });
        }
    };
    let ctx = CommandContext::new(principal, meta, &body.raw);
    let RegisterUser { tier, email, phone, .. } = body.value;
    let command = UserCommand::Register {
        user_id,
        tier,
        email: Personal::new(email),
        phone: Personal::new(phone),
    };
    let accepted = run_user_command(&state, &ctx, user_id, command).await?;
    Ok((
        StatusCode::CREATED,
        Location::of("/v1/users", accepted.id),
        Json(accepted),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetQuota {
    #[schema(value_type = i64, minimum = 0, maximum = 100000)]
    pub max_devices: u32,
    #[schema(value_type = i64, minimum = 0, maximum = 1600000)]
    pub max_cpu_cores: u32,
    #[schema(value_type = i64, minimum = 0, maximum = 4000000000_i64)]
    pub max_memory_mb: u32,
}

/// Set a user's device limits (admins only).
#[utoipa::path(put, path = "/v1/users/{id}/quota", tag = "users", request_body = SetQuota,
    params(("id" = Uuid, Path, description = "User id")),
    responses((status = 200, description = "Quota set", body = CommandAccepted), CommandErrors),
    security(("bearer" = [])))]
pub async fn set_quota(
    State(state): State<AppState>,
    Caller(principal): Caller,
    IdParam(user_id): IdParam,
    meta: RequestMeta,
    body: JsonBody<SetQuota>,
) -> Result<Json<CommandAccepted>, ApiError> {
    let ctx = CommandContext::new(principal, meta, &body.raw);
    let quota = Quota {
        max_devices: body.value.max_devices,
        max_cpu_cores: body.value.max_cpu_cores,
        max_memory_mb: body.value.max_memory_mb,
    };
    Ok(Json(
        run_user_command(&state, &ctx, user_id, UserCommand::SetQuota { quota }).await?,
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeTier {
    #[schema(value_type = TierName, example = "enterprise")]
    pub tier: Tier,
}

/// Move a user to another tier (a `users:write` service or an admin).
#[utoipa::path(put, path = "/v1/users/{id}/tier", tag = "users", request_body = ChangeTier,
    params(("id" = Uuid, Path, description = "User id")),
    responses((status = 200, description = "Tier changed", body = CommandAccepted), CommandErrors),
    security(("bearer" = [])))]
pub async fn change_tier(
    State(state): State<AppState>,
    Caller(principal): Caller,
    IdParam(user_id): IdParam,
    meta: RequestMeta,
    body: JsonBody<ChangeTier>,
) -> Result<Json<CommandAccepted>, ApiError> {
    let ctx = CommandContext::new(principal, meta, &body.raw);
    let command = UserCommand::ChangeTier { tier: body.value.tier };
    Ok(Json(run_user_command(&state, &ctx, user_id, command).await?))
}

/// Erase a user's personal data (the user themselves or an admin): their data key is
/// destroyed, so the personal fields of their events can never be decrypted again, and
/// `UserErased` is appended. Repeating it is harmless.
#[utoipa::path(delete, path = "/v1/users/{id}", tag = "users",
    params(("id" = Uuid, Path, description = "User id")),
    responses((status = 200, description = "Erased", body = CommandAccepted), CommandErrors),
    security(("bearer" = [])))]
pub async fn erase(
    State(state): State<AppState>,
    Caller(principal): Caller,
    IdParam(user_id): IdParam,
    meta: RequestMeta,
) -> Result<Json<CommandAccepted>, ApiError> {
    let ctx = CommandContext::new(principal, meta, b"");
    Ok(Json(erase_user(&state, &ctx, user_id).await?))
}
