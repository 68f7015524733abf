//! gRPC decision API (`spendguard.sidecar.v1.Sidecar`). Errors carry the stable code in the
//! `spendguard-error-code` metadata.

use super::{parse_provider, parse_usage};
use crate::decider::{DecideInput, Decider, Verdict, Waiter};
use crate::error::SidecarError;
use spendguard_proto::sidecar::v1 as pb;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The gRPC service.
pub struct SidecarService {
    decider: Arc<Decider>,
}

impl SidecarService {
    /// Wraps a decider.
    pub fn new(decider: Arc<Decider>) -> pb::sidecar_server::SidecarServer<Self> {
        pb::sidecar_server::SidecarServer::new(Self { decider })
    }
}

fn status(error: &SidecarError) -> Status {
    let mut status = Status::new(error.grpc_code(), error.to_string());
    if let Ok(code) = error.code().parse() {
        status.metadata_mut().insert("spendguard-error-code", code);
    }
    status
}

fn optional(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

#[tonic::async_trait]
impl pb::sidecar_server::Sidecar for SidecarService {
    async fn decide(
        &self,
        request: Request<pb::DecideRequest>,
    ) -> Result<Response<pb::DecideResponse>, Status> {
        let r = request.into_inner();
        let input = DecideInput {
            call_id: r.call_id,
            provider: parse_provider(&r.provider).map_err(|e| status(&e))?,
            model: r.model,
            input_tokens_upper_bound: r.input_tokens_upper_bound,
            max_output_tokens: r.max_output_tokens,
            choices: r.choices.unwrap_or(1),
            run_id: optional(r.run_id),
            workflow_id: optional(r.workflow_id),
            // The caller settles through this API and waits for the answer.
            settles: Waiter::Caller,
        };
        let d = self.decider.decide(input).await.map_err(|e| status(&e))?;
        Ok(Response::new(pb::DecideResponse {
            decision: match d.decision {
                Verdict::Continue => pb::Decision::Continue,
                Verdict::Stop => pb::Decision::Stop,
                Verdict::RequireApproval => pb::Decision::RequireApproval,
            }
            .into(),
            reason: d.reason.to_owned(),
            detail: d.detail,
            call_id: d.call_id,
            reservation_id: d.reservation_id.unwrap_or_default(),
            reserved_nano_usd: d.reserved_nano_usd,
            max_output_tokens: d.max_output_tokens.unwrap_or(0),
            budget_id: d.budget_id.unwrap_or_default(),
            approval_id: d.approval_id.unwrap_or_default(),
            contract_version: d.contract_version,
            pricing_version: d.pricing_version,
            pricing_sha256: d.pricing_sha256,
            bundle_sha256: d.bundle_sha256,
            fail_open: d.fail_open,
            pricing_stale: d.pricing_stale,
            replayed: d.replayed,
            evidence_id: d.evidence_id.unwrap_or_default(),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let r = request.into_inner();
        let usage: serde_json::Value = serde_json::from_str(&r.usage_json)
            .map_err(|e| status(&SidecarError::UsageInvalid(format!("usage_json: {e}"))))?;
        let spend = parse_usage(&r.usage_format, &usage).map_err(|e| status(&e))?;
        let c = self
            .decider
            .commit(&r.call_id, spend, Waiter::Caller)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::CommitResponse {
            call_id: r.call_id,
            actual_nano_usd: c.actual_nano_usd,
            committed_nano_usd: c.committed_nano_usd,
            released_nano_usd: c.released_nano_usd,
            overrun_nano_usd: c.overrun_nano_usd,
            replayed: c.replayed,
            late: c.late,
        }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let r = request.into_inner();
        let reason = if r.reason.is_empty() {
            "released_by_caller".to_owned()
        } else {
            r.reason
        };
        let released = self
            .decider
            .release(&r.call_id, &reason, Waiter::Caller)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::ReleaseResponse {
            call_id: r.call_id,
            released_nano_usd: released.released_nano_usd,
            replayed: released.replayed,
        }))
    }
}
