//! `/v1/devices`: create, start, stop, resize, delete, report a failure.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, post};
use axum::{Json, Router};
use domain::device::DeviceCommand;
use event_schema::StopReason;
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::Location;
use crate::commands::{CommandAccepted, CommandContext, run_device_command, run_device_command_on_generated_id};
use crate::extract::{Caller, IdParam, JsonBody, OptionalJsonBody, RequestMeta};
use crate::openapi::CommandErrors;
use crate::problem::ApiError;
use crate::state::AppState;

pub fn router() -> axum::Router<AppState> {
    Router::new()
        .route("/v1/devices", post(create))
        .route("/v1/devices/{id}/start", post(start))
        .route("/v1/devices/{id}/stop", post(stop))
        .route("/v1/devices/{id}/resize", post(resize))
        .route("/v1/devices/{id}/failure", post(report_failure))
        .route("/v1/devices/{id}", delete(remove))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDevice {
    /// Your own name for the device, 1 to 128 visible ASCII characters, unique per owner.
    /// Device ids are chosen by the server: with a reference, the id is derived from the
    /// owner and the reference, so a create retried with it (even without an
    /// Idempotency-Key) answers 409 `device_already_exists` instead of making a second
    /// device; without one, every create makes a new device.
    #[schema(
        example = "order-4711/phone-1",
        min_length = 1,
        max_length = 128,
        pattern = "^[!-~]+$"
    )]
    pub reference: Option<String>,
    /// The owner; defaults to the caller for a `user` token.
    pub owner_id: Option<Uuid>,
    /// The cloud that hosts the device.
    #[schema(value_type = ProviderName, example = "aws")]
    pub provider: String,
    #[schema(example = 4, minimum = 1, maximum = 16)]
    pub cpu_cores: u32,
    #[schema(example = 8192, minimum = 1024, maximum = 65536, multiple_of = 512)]
    pub memory_mb: u32,
    /// Android major version.
    #[schema(example = 14, minimum = 9, maximum = 15)]
    pub android_version: u32,
}

/// The providers devices can run on (documentation of `CreateDevice.provider`; the domain
/// answers any other name with 422 `unknown_provider`).
#[derive(Debug, ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // describes the schema only
pub enum ProviderName {
    Aws,
    Gcp,
    Azure,
    Alibaba,
    Huawei,
}

/// Create a device and reserve its share of the owner's quota, atomically.
#[utoipa::path(post, path = "/v1/devices", tag = "devices", request_body = CreateDevice,
    responses((status = 201, description = "Created", body = CommandAccepted), CommandErrors),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: RequestMeta,
    body: JsonBody<CreateDevice>,
) -> Result<(StatusCode, Location, Json<CommandAccepted>), ApiError> {
    let Some(owner_id) = body.value.owner_id.or(principal
        .user_id
        .filter(|_| principal.role == http_edge::auth::Role::User))
    else {
        return Err(ApiError::Unprocessable {
            code: "owner_id_required",
            detail: "owner_id is required when creating a device for someone else".into(),
        });
    };
    // A reference names the same device on every request, so it may be in the log already;
    // an id generated here cannot be.
    let (device_id, generated) = match &body.value.reference {
        Some(reference) => (
            domain::ids::device_id_for_reference(
                owner_id,
                domain::ids::check_device_reference(reference).map_err(ApiError::Domain)?,
            ),
            false,
        ),
        None => (Uuid::now_v7(), true),
    };
    // The domain checks the range; a value past a byte is out of it just the same.
    let android_version = u8::try_from(body.value.android_version).unwrap_or(u8::MAX);
    let ctx = CommandContext::new(principal, meta, &body.raw);
    let command = DeviceCommand::Create {
        device_id,
        owner_id,
        provider: body.value.provider,
        cpu_cores: body.value.cpu_cores,
        memory_mb: body.value.memory_mb,
        android_version,
    };
    let accepted = if generated {
        run_device_command_on_generated_id(&state, &ctx, device_id, command).await?
    } else {
        run_device_command(&state, &ctx, device_id, command).await?
    };
    Ok((
        StatusCode::CREATED,
        Location::of("/v1/devices", accepted.id),
        Json(accepted),
    ))
}

/// Start a device; a usage session begins.
#[utoipa::path(post, path = "/v1/devices/{id}/start", tag = "devices",
    params(("id" = Uuid, Path, description = "Device id")),
    responses((status = 200, description = "Started", body = CommandAccepted), CommandErrors),
    security(("bearer" = [])))]
pub async fn start(
    State(state): State<AppState>,
    Caller(principal): Caller,
    IdParam(device_id): IdParam,
    meta: RequestMeta,
) -> Result<Json<CommandAccepted>, ApiError> {
    let ctx = CommandContext::new(principal, meta, b"");
    Ok(Json(
        run_device_command(&state, &ctx, device_id, DeviceCommand::Start).await?,
    ))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopDevice {
    /// `requested` when absent.
    #[schema(value_type = Option<StopReasonName>, example = "requested")]
    pub reason: Option<StopReason>,
}

/// Why a device is stopped (`deleted` is the platform's own reason, for a stop caused by a
/// delete; sent by a client it is 422 `invalid_stop_reason`).
// `event_schema::StopReason` without `deleted`, kept equal by
// `openapi::tests::documented_tiers_and_stop_reasons_are_the_domains`.
#[derive(Debug, ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // describes the schema only
pub enum StopReasonName {
    Requested,
    Idle,
    Maintenance,
}

/// Stop a device; its usage session is billed. The body is optional.
#[utoipa::path(post, path = "/v1/devices/{id}/stop", tag = "devices", request_body(content = Option<StopDevice>),
    params(("id" = Uuid, Path, description = "Device id")),
    responses((status = 200, description = "Stopped", body = CommandAccepted), CommandErrors),
    security(("bearer" = [])))]
pub async fn stop(
    State(state): State<AppState>,
    Caller(principal): Caller,
    IdParam(device_id): IdParam,
    meta: RequestMeta,
    body: OptionalJsonBody<StopDevice>,
) -> Result<Json<CommandAccepted>, ApiError> {
    let reason = match body.value.reason {
        None => StopReason::Requested,
        // `deleted` is the platform's own reason for a stop caused by a delete.
        Some(StopReason::Deleted) => {
            return Err(ApiError::Unprocessable {
                code: "invalid_stop_reason",
                detail: "reason must be requested, idle or maintenance".into(),
            });
        }
        Some(reason) => reason,
    };
    let ctx = CommandContext::new(principal, meta, &body.raw);
    Ok(Json(
        run_device_command(&state, &ctx, device_id, DeviceCommand::Stop { reason }).await?,
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeDevice {
    #[schema(example = 8, minimum = 1, maximum = 16)]
    pub cpu_cores: u32,
    #[schema(example = 16384, minimum = 1024, maximum = 65536, multiple_of = 512)]
    pub memory_mb: u32,
}

/// Resize a stopped device; its quota reservation moves with it.
#[utoipa::path(post, path = "/v1/devices/{id}/resize", tag = "devices", request_body = ResizeDevice,
    params(("id" = Uuid, Path, description = "Device id")),
    responses((status = 200, description = "Resized", body = CommandAccepted), CommandErrors),
    security(("bearer" = [])))]
pub async fn resize(
    State(state): State<AppState>,
    Caller(principal): Caller,
    IdParam(device_id): IdParam,
    meta: RequestMeta,
    body: JsonBody<ResizeDevice>,
) -> Result<Json<CommandAccepted>, ApiError> {
    let ctx = CommandContext::new(principal, meta, &body.raw);
    let command = DeviceCommand::Resize {
        cpu_cores: body.value.cpu_cores,
        memory_mb: body.value.memory_mb,
    };
    Ok(Json(run_device_command(&state, &ctx, device_id, command).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportFailure {
    /// What the provider reported.
    #[schema(example = "host lost", min_length = 1, max_length = 500)]
    pub reason: String,
}

/// Report that a device failed (a `devices:report` service, the owner, or an admin).
#[utoipa::path(post, path = "/v1/devices/{id}/failure", tag = "devices", request_body = ReportFailure,
    params(("id" = Uuid, Path, description = "Device id")),
    responses((status = 200, description = "Recorded", body = CommandAccepted), CommandErrors),
    security(("bearer" = [])))]
pub async fn report_failure(
    State(state): State<AppState>,
    Caller(principal): Caller,
    IdParam(device_id): IdParam,
    meta: RequestMeta,
    body: JsonBody<ReportFailure>,
) -> Result<Json<CommandAccepted>, ApiError> {
    let ctx = CommandContext::new(principal, meta, &body.raw);
    let command = DeviceCommand::ReportFailure {
        reason: body.value.reason,
    };
    Ok(Json(run_device_command(&state, &ctx, device_id, command).await?))
}

/// Delete a device (stopping and billing it first if it runs) and release its quota.
#[utoipa::path(delete, path = "/v1/devices/{id}", tag = "devices",
    params(("id" = Uuid, Path, description = "Device id")),
    responses((status = 200, description = "Deleted", body = CommandAccepted), CommandErrors),
    security(("bearer" = [])))]
pub async fn remove(
    State(state): State<AppState>,
    Caller(principal): Caller,
    IdParam(device_id): IdParam,
    meta: RequestMeta,
) -> Result<Json<CommandAccepted>, ApiError> {
    let ctx = CommandContext::new(principal, meta, b"");
    Ok(Json(
        run_device_command(&state, &ctx, device_id, DeviceCommand::Delete).await?,
    ))
}
