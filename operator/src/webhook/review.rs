//! HTTP handlers: AdmissionReview in, AdmissionReview out. The decisions live in `inject`,
//! `validate` and `approve`; this file only translates.

use super::approve::{self, ApprovalConfig};
use super::inject::{self, InjectConfig};
use super::validate::{self, Code, Finding, Verdict};
use axum::Json;
use axum::extract::State;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde::de::DeserializeOwned;
use std::sync::Arc;
use tracing::{info, warn};

/// What the handlers share.
#[derive(Clone)]
pub struct WebhookState {
    /// Injection settings.
    pub inject: Arc<InjectConfig>,
    /// Approvals settings.
    pub approvals: Arc<ApprovalConfig>,
    /// For reference lookups during validation and SubjectAccessReviews.
    pub kube: kube::Client,
}

type Review<T> = Json<AdmissionReview<T>>;
type Reply = Json<AdmissionReview<DynamicObject>>;

/// `POST /inject`: the mutating webhook for pods.
pub async fn inject(State(state): State<WebhookState>, Json(review): Review<Pod>) -> Reply {
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(request) => request,
        Err(e) => return Json(AdmissionResponse::invalid(e).into_review()),
    };
    Json(mutate(&request, &state.inject).into_review())
}

/// The response to one pod admission request.
pub fn mutate(request: &AdmissionRequest<Pod>, config: &InjectConfig) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    // Only CREATE: containers of an existing pod cannot change, and mutating UPDATEs can block
    // pod deletion when the webhook is down.
    let (Operation::Create, Some(pod)) = (&request.operation, &request.object) else {
        return response;
    };
    let namespace = request.namespace.as_deref().unwrap_or_default();
    match inject::patch(pod, namespace, config) {
        Ok(ops) if ops.is_empty() => response,
        Ok(ops) => {
            info!(namespace, pod = %pod_name(request, pod), "injecting the SpendGuard sidecar");
            match response.with_patch(json_patch::Patch(ops)) {
                Ok(patched) => patched,
                // Fail closed: an opted-in pod is not admitted without its guard.
                Err(e) => AdmissionResponse::from(request).deny(format!(
                    "SPENDGUARD_INJECTION_FAILED: could not encode the injection patch: {e}"
                )),
            }
        }
        Err(e) => {
            info!(namespace, pod = %pod_name(request, pod), code = e.code(), "refusing pod");
            response.deny(format!("{}: {e}", e.code()))
        }
    }
}

fn pod_name<'a>(request: &'a AdmissionRequest<Pod>, pod: &'a Pod) -> &'a str {
    // On CREATE the name may still be empty (generateName).
    if request.name.is_empty() {
        pod.metadata.generate_name.as_deref().unwrap_or_default()
    } else {
        &request.name
    }
}

/// `POST /validate`: the validating webhook for SpendGuard objects.
pub async fn validate(
    State(state): State<WebhookState>,
    Json(review): Review<DynamicObject>,
) -> Reply {
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(request) => request,
        Err(e) => return Json(AdmissionResponse::invalid(e).into_review()),
    };
    let verdict = match (&request.operation, &request.object) {
        (Operation::Update, Some(object)) if !judged_again(&request, object) => Verdict::default(),
        (Operation::Create | Operation::Update, Some(object)) => {
            verdict(&state.kube, &request, object).await
        }
        _ => Verdict::default(),
    };
    let mut response = AdmissionResponse::from(&request);
    if !verdict.warnings.is_empty() {
        response.warnings = Some(verdict.warnings.iter().map(ToString::to_string).collect());
    }
    if let Some(message) = verdict.refusal() {
        info!(kind = %request.kind.kind, name = %request.name, %message, "refusing object");
        response = response.deny(message);
    }
    Json(response.into_review())
}

/// Whether an UPDATE is judged again: only when it changes the spec. Labels, annotations,
/// finalizers (the garbage collector's `foregroundDeletion` among them) and status pass as they
/// are: a reference that changed since (another tenant's Budget of the same name) or a stricter
/// rule must not make an object impossible to label or to delete.
fn judged_again(request: &AdmissionRequest<DynamicObject>, object: &DynamicObject) -> bool {
    request
        .old_object
        .as_ref()
        .is_none_or(|old| old.data.get("spec") != object.data.get("spec"))
}

fn parse<K: DeserializeOwned>(object: &DynamicObject) -> Result<K, Verdict> {
    serde_json::to_value(object)
        .and_then(serde_json::from_value)
        .map_err(|e| Verdict {
            refusals: vec![Finding {
                code: Code::Malformed,
                message: e.to_string(),
            }],
            warnings: Vec::new(),
        })
}

async fn verdict(
    client: &kube::Client,
    request: &AdmissionRequest<DynamicObject>,
    object: &DynamicObject,
) -> Verdict {
    let namespace = request.namespace.as_deref().unwrap_or_default();
    match request.kind.kind.as_str() {
        "Budget" => parse(object).map_or_else(|v| v, |b| validate::budget(&b)),
        "PricingVersion" => parse(object).map_or_else(|v| v, |p| validate::pricing_version(&p)),
        "ContractBundle" => match parse(object) {
            Ok(bundle) => {
                let mut verdict = validate::contract_bundle(&bundle);
                let references =
                    validate::contract_bundle_references(client, namespace, &bundle).await;
                verdict.refusals.extend(references.refusals);
                verdict.warnings.extend(references.warnings);
                verdict
            }
            Err(verdict) => verdict,
        },
        other => {
            // The configuration routes only our kinds here; anything else is let through.
            warn!(
                kind = other,
                "validating webhook called for an unexpected kind"
            );
            Verdict::default()
        }
    }
}

/// `POST /approve`: the mutating webhook for `approvalrequests/status`.
pub async fn approve(
    State(state): State<WebhookState>,
    Json(review): Review<DynamicObject>,
) -> Reply {
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(request) => request,
        Err(e) => return Json(AdmissionResponse::invalid(e).into_review()),
    };
    let response =
        approve::admit(&state.kube, &state.approvals, &request, chrono::Utc::now()).await;
    Json(response.into_review())
}
