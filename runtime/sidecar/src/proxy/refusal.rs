//! Refusals in each provider's own error format, so unchanged clients raise their usual typed
//! errors; the stable SpendGuard code is in `error.code` and in the `x-spendguard-code` header.
//!
//! OpenAI: `{"error": {"message", "type", "param", "code"}}`.
//! Anthropic: `{"type": "error", "error": {"type", "message"}}` (plus `code`).

use super::request::Api;
use crate::decider::{Decision, Verdict};
use crate::error::SidecarError;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// `x-spendguard-code`: the stable code of a refusal.
pub const CODE_HEADER: &str = "x-spendguard-code";
/// `x-spendguard-decision`.
pub const DECISION_HEADER: &str = "x-spendguard-decision";
/// `x-spendguard-call-id`.
pub const CALL_ID_HEADER: &str = "x-spendguard-call-id";
/// `x-spendguard-reservation-id`.
pub const RESERVATION_HEADER: &str = "x-spendguard-reservation-id";
/// `x-spendguard-evidence-id`: a STOP's ledger record (`decision.stopped`).
pub const EVIDENCE_HEADER: &str = "x-spendguard-evidence-id";
/// `x-spendguard-reason`: the decision's stable reason code.
pub const REASON_HEADER: &str = "x-spendguard-reason";
/// `x-spendguard-contract-version`: the contract that decided.
pub const CONTRACT_VERSION_HEADER: &str = "x-spendguard-contract-version";
/// `x-spendguard-pricing-version`: the pricing snapshot the call was priced from.
pub const PRICING_VERSION_HEADER: &str = "x-spendguard-pricing-version";

/// What every proxied answer says of its decision, CONTINUE or not: the verdict, the call id,
/// the reason code and the contract and pricing versions.
pub fn set_decision_headers(response: &mut Response, decision: &Decision) {
    set_header(response, DECISION_HEADER, decision.decision.as_str());
    set_header(response, CALL_ID_HEADER, &decision.call_id);
    set_header(response, REASON_HEADER, decision.reason);
    set_header(
        response,
        CONTRACT_VERSION_HEADER,
        &decision.contract_version,
    );
    set_header(response, PRICING_VERSION_HEADER, &decision.pricing_version);
}

/// A STOP or REQUIRE_APPROVAL decision: 402 Payment Required.
pub fn decision(api: Api, decision: &Decision) -> Response {
    let kind = match decision.decision {
        Verdict::RequireApproval => "spendguard_approval_required",
        Verdict::Stop | Verdict::Continue => "spendguard_budget_exceeded",
    };
    let message = if decision.detail.is_empty() {
        format!(
            "SpendGuard: {} ({})",
            decision.decision.as_str(),
            decision.reason
        )
    } else {
        format!(
            "SpendGuard: {} ({}): {}",
            decision.decision.as_str(),
            decision.reason,
            decision.detail
        )
    };
    let mut extra = serde_json::Map::new();
    extra.insert("decision".into(), decision.decision.as_str().into());
    extra.insert("approval_id".into(), json!(decision.approval_id));
    extra.insert("budget_id".into(), json!(decision.budget_id));
    extra.insert("evidence_id".into(), json!(decision.evidence_id));
    extra.insert(
        "contract_version".into(),
        decision.contract_version.clone().into(),
    );
    extra.insert(
        "pricing_version".into(),
        decision.pricing_version.clone().into(),
    );
    let mut response = body(
        api,
        StatusCode::PAYMENT_REQUIRED,
        kind,
        decision.reason,
        &message,
        extra,
    );
    set_decision_headers(&mut response, decision);
    if let Some(evidence_id) = &decision.evidence_id {
        set_header(&mut response, EVIDENCE_HEADER, evidence_id);
    }
    response
}

/// An error without a decision.
pub fn error(api: Api, error: &SidecarError) -> Response {
    let status = error.http_status();
    let kind = match (error, api) {
        (SidecarError::RequestTooLarge { .. }, Api::AnthropicMessages) => "request_too_large",
        (
            SidecarError::LeaseUnavailable(_)
            | SidecarError::DependencyUnavailable(_)
            | SidecarError::LedgerAnswerUnreadable(_)
            | SidecarError::EvidenceBacklog(_)
            | SidecarError::SigningUnavailable(_)
            | SidecarError::Misconfigured(_),
            _,
        ) => "spendguard_unavailable",
        _ if status.is_client_error() => "invalid_request_error",
        _ => "api_error",
    };
    let mut extra = serde_json::Map::new();
    if let Some(field) = error.field() {
        extra.insert("param".into(), field.into());
    }
    body(
        api,
        status,
        kind,
        error.code(),
        &format!("SpendGuard: {error}"),
        extra,
    )
}

fn body(
    api: Api,
    status: StatusCode,
    kind: &str,
    code: &str,
    message: &str,
    extra: serde_json::Map<String, Value>,
) -> Response {
    let mut error = serde_json::Map::new();
    error.insert("message".into(), message.into());
    error.insert("type".into(), kind.into());
    error.insert("code".into(), code.into());
    if matches!(api, Api::OpenAiChat | Api::OpenAiResponses) {
        error.insert("param".into(), Value::Null);
    }
    error.extend(extra);
    let json = match api {
        Api::OpenAiChat | Api::OpenAiResponses => json!({ "error": error }),
        Api::AnthropicMessages => json!({ "type": "error", "error": error }),
    };
    let mut response = (status, axum::Json(json)).into_response();
    set_header(&mut response, CODE_HEADER, code);
    response
}

/// Sets a header when the value is a valid header value (ids and codes always are).
pub fn set_header(response: &mut Response, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}
