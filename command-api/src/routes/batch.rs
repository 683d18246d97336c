//! `POST /v1/devices/batch`: bulk start/stop/delete, each operation answered on its own.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use domain::device::DeviceCommand;
use event_schema::StopReason;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::commands::{CommandAccepted, CommandContext, run_device_command};
use crate::config::MAX_BATCH_OPERATIONS;
use crate::extract::{Caller, JsonBody, RequestMeta};
use crate::openapi::CommandErrors;
use crate::problem::{ApiError, Problem};
use crate::state::AppState;

pub fn router() -> axum::Router<AppState> {
    Router::new().route("/v1/devices/batch", post(run_batch))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Start,
    Stop,
    Delete,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchOperation {
    pub op: Operation,
    pub device_id: Uuid,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Each operation runs and is answered on its own.
    #[schema(min_items = 1, max_items = 500)]
    pub operations: Vec<BatchOperation>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchItemResult {
    /// Index of the operation in the request.
    pub index: usize,
    pub device_id: Uuid,
    pub op: Operation,
    /// HTTP status this operation would have had on its own.
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<CommandAccepted>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Problem>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchResponse {
    pub succeeded: usize,
    pub failed: usize,
    /// One result per operation, in request order.
    pub results: Vec<BatchItemResult>,
}

/// Operations run at once; their appends share group commits.
const CONCURRENCY: usize = 256;

/// Run up to 500 start/stop/delete operations; one failing does not affect the others.
/// With an Idempotency-Key, each operation is idempotent under `key#index`.
#[utoipa::path(post, path = "/v1/devices/batch", tag = "devices", request_body = BatchRequest,
    responses((status = 200, description = "Each operation's result", body = BatchResponse), CommandErrors),
    security(("bearer" = [])))]
pub async fn run_batch(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: RequestMeta,
    body: JsonBody<BatchRequest>,
) -> Result<Json<BatchResponse>, ApiError> {
    let operations = body.value.operations;
    if operations.is_empty() || operations.len() > MAX_BATCH_OPERATIONS {
        return Err(ApiError::Unprocessable {
            code: "invalid_batch_size",
            detail: format!(
                "a batch holds 1 to {MAX_BATCH_OPERATIONS} operations, got {}",
                operations.len()
            ),
        });
    }
    let ctx = CommandContext::new(principal, meta, &body.raw);
    let mut results: Vec<BatchItemResult> = futures::stream::iter(operations.into_iter().enumerate())
        .map(|(index, operation)| {
            let (state, ctx) = (&state, &ctx);
            async move {
                let item_body = serde_json::to_vec(&operation).unwrap_or_default();
                let item_ctx = ctx.for_item(index, &item_body);
                let command = match operation.op {
                    Operation::Start => DeviceCommand::Start,
                    Operation::Stop => DeviceCommand::Stop {
                        reason: StopReason::Requested,
                    },
                    Operation::Delete => DeviceCommand::Delete,
                };
                let outcome = run_device_command(state, &item_ctx, operation.device_id, command).await;
                let (status, result, error) = match outcome {
                    Ok(accepted) => (200, Some(accepted), None),
                    Err(error) => {
                        let problem = error.problem();
                        (problem.status, None, Some(problem))
                    }
                };
                BatchItemResult {
                    index,
                    device_id: operation.device_id,
                    op: operation.op,
                    status,
                    result,
                    error,
                }
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    results.sort_by_key(|r| r.index);
    let succeeded = results.iter().filter(|r| r.result.is_some()).count();
    Ok(Json(BatchResponse {
        succeeded,
        failed: results.len() - succeeded,
        results,
    }))
}
