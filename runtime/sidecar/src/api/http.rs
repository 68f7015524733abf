//! HTTP/JSON decision API: `POST /v1/spendguard/decide | commit | release`.
//! Errors: `{"error": {"code", "message", "field"}}` with the code's HTTP status.

use super::{parse_provider, parse_usage};
use crate::decider::{Committed, DecideInput, Decider, Released, Waiter};
use crate::error::SidecarError;
use crate::metrics::Metrics;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;

#[derive(Clone)]
struct ApiState {
    decider: Arc<Decider>,
    metrics: Metrics,
}

/// The decision routes.
pub fn routes(decider: Arc<Decider>, metrics: Metrics) -> Router {
    Router::new()
        .route("/v1/spendguard/decide", post(decide))
        .route("/v1/spendguard/commit", post(commit))
        .route("/v1/spendguard/release", post(release))
        .with_state(ApiState { decider, metrics })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    call_id: String,
    provider: String,
    model: String,
    input_tokens_upper_bound: u64,
    #[serde(default)]
    max_output_tokens: Option<i64>,
    /// Completions asked for (OpenAI chat `n`); absent: 1.
    #[serde(default)]
    choices: Option<i64>,
    #[serde(default)]
    run_id: Option<String>,
    #[serde(default)]
    workflow_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitBody {
    call_id: String,
    usage_format: String,
    usage: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    call_id: String,
    #[serde(default = "default_reason")]
    reason: String,
}

fn default_reason() -> String {
    "released_by_caller".to_owned()
}

#[derive(Serialize)]
struct Settled<T: Serialize> {
    call_id: String,
    #[serde(flatten)]
    result: T,
}

struct ApiError(SidecarError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "code": self.0.code(),
            "message": self.0.to_string(),
            "field": self.0.field(),
        }});
        let mut response = (self.0.http_status(), Json(body)).into_response();
        crate::proxy::refusal::set_header(
            &mut response,
            crate::proxy::refusal::CODE_HEADER,
            self.0.code(),
        );
        response
    }
}

fn body<T>(parsed: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    parsed
        .map(|Json(body)| body)
        .map_err(|e| ApiError(SidecarError::InvalidJson(e.body_text())))
}

fn optional_text(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

async fn decide(
    State(state): State<ApiState>,
    parsed: Result<Json<DecideBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let b = body(parsed)?;
    let max_output_tokens = match b.max_output_tokens {
        None => None,
        Some(n) => Some(u32::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
            ApiError(SidecarError::invalid(
                "max_output_tokens",
                "must be a positive integer no larger than 4294967295",
            ))
        })?),
    };
    // Out of range values (negative, too large) are refused by the decider, with the range.
    let choices = b
        .choices
        .map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX));
    let input = DecideInput {
        call_id: b.call_id,
        provider: parse_provider(&b.provider).map_err(ApiError)?,
        model: b.model,
        input_tokens_upper_bound: b.input_tokens_upper_bound,
        max_output_tokens,
        choices,
        run_id: optional_text(b.run_id),
        workflow_id: optional_text(b.workflow_id),
        // The caller settles through this API and waits for the answer.
        settles: Waiter::Caller,
    };
    let decision = state.decider.decide(input).await.map_err(ApiError)?;
    if !decision.replayed {
        state.metrics.decision(decision.decision, decision.reason);
    }
    Ok(Json(decision).into_response())
}

async fn commit(
    State(state): State<ApiState>,
    parsed: Result<Json<CommitBody>, JsonRejection>,
) -> Result<Json<Settled<Committed>>, ApiError> {
    let b = body(parsed)?;
    let spend = parse_usage(&b.usage_format, &b.usage).map_err(ApiError)?;
    let result = state
        .decider
        .commit(&b.call_id, spend, Waiter::Caller)
        .await
        .map_err(ApiError)?;
    Ok(Json(Settled {
        call_id: b.call_id,
        result,
    }))
}

async fn release(
    State(state): State<ApiState>,
    parsed: Result<Json<ReleaseBody>, JsonRejection>,
) -> Result<Json<Settled<Released>>, ApiError> {
    let b = body(parsed)?;
    let result = state
        .decider
        .release(&b.call_id, &b.reason, Waiter::Caller)
        .await
        .map_err(ApiError)?;
    Ok(Json(Settled {
        call_id: b.call_id,
        result,
    }))
}
