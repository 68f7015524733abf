//! The tonic adapter: the only module that sees gRPC types. It validates (via [`crate::convert`]),
//! submits to the writer or reads from the store, and maps errors to statuses carrying the stable
//! code in `details` (an encoded `ErrorDetail`) and in the `spendguard-error-code` header.

use crate::convert;
use crate::error::Error;
use crate::evidence_gate::EvidenceGate;
use crate::metrics::Metrics;
use crate::oversized::SizeLimited;
use crate::store::Store;
use crate::writer::{Urgency, Writer};
use prost::Message;
use spendguard_core::lease::check_fencing;
use spendguard_core::plan::{Command, Credit, Outcome, RUN_BUDGET_PREFIX, ReservationState};
use spendguard_core::{ErrorClass, LedgerError};
use spendguard_proto::ledger::v1 as pb;
use std::sync::Arc;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::{instrument, warn};

/// Header carrying the stable error code of a failed RPC.
pub const ERROR_CODE_HEADER: &str = spendguard_proto::ledger::ERROR_CODE_HEADER;

/// Which listener a request came in on: what it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The data path (sidecars): decisions, settlements, their evidence, the caller's own lease,
    /// and creating a run budget.
    DataPath,
    /// Everything: the control plane (the operator, the workers) and administrators.
    Control,
}

/// The Ledger gRPC service.
#[derive(Clone)]
pub struct LedgerGrpc {
    writer: Writer,
    store: Store,
    metrics: Metrics,
    evidence_gate: Arc<EvidenceGate>,
    access: Access,
}

impl LedgerGrpc {
    /// Wires the service for one listener.
    pub fn new(
        writer: Writer,
        store: Store,
        metrics: Metrics,
        evidence_gate: Arc<EvidenceGate>,
        access: Access,
    ) -> Self {
        Self {
            writer,
            store,
            metrics,
            evidence_gate,
            access,
        }
    }

    /// Refuses `what` on the data-path listener.
    fn control_only(&self, what: &str) -> Result<(), Error> {
        match self.access {
            Access::Control => Ok(()),
            Access::DataPath => Err(Error::Refused(LedgerError::PermissionDenied(format!(
                "{what} is served on the control listener only"
            )))),
        }
    }

    /// The tonic server wrapper with the message size limit applied: a larger message is
    /// refused with `REQUEST_TOO_LARGE` (`oversized.rs`).
    pub fn into_server(
        self,
        max_message_bytes: usize,
    ) -> SizeLimited<pb::ledger_server::LedgerServer<Self>> {
        let metrics = self.metrics.clone();
        SizeLimited::new(
            pb::ledger_server::LedgerServer::new(self).max_decoding_message_size(max_message_bytes),
            max_message_bytes,
            metrics,
        )
    }

    async fn run<T>(
        &self,
        rpc: &'static str,
        call: impl Future<Output = Result<T, Error>>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let result = call.await;
        let code = result.as_ref().err().map(|e| e.code().as_str());
        self.metrics.observe_rpc(rpc, started.elapsed(), code);
        result.map(Response::new).map_err(|e| {
            if matches!(
                e.code().class(),
                ErrorClass::Internal | ErrorClass::Unavailable
            ) {
                warn!(rpc, error = %e, "ledger rpc failed");
            }
            status(&e)
        })
    }

    /// The evidence gate for a request that may create new exposure: while it refuses, a request
    /// whose row `exists` already is still let through, so a retry is answered as the replay it
    /// is (writing nothing) instead of failing like new spend.
    async fn admit_new_spend(
        &self,
        exists: impl Future<Output = Result<bool, Error>>,
    ) -> Result<(), Error> {
        let Err(refused) = self.evidence_gate.admit() else {
            return Ok(());
        };
        match exists.await {
            Ok(true) => Ok(()),
            Ok(false) => Err(refused),
            // Still a refusal: a lookup error must not turn into an unavailable ledger, which
            // a fail-open contract would let through.
            Err(e) => {
                warn!(error = %e, "could not tell a retry from new spend; refused as new spend");
                Err(refused)
            }
        }
    }

    async fn submit(&self, command: Command) -> Result<Outcome, Error> {
        self.writer.submit(command, Urgency::Now).await
    }

    /// [`Self::submit`] for a request that may say nobody waits on its answer.
    async fn submit_as(&self, command: Command, deferrable: bool) -> Result<Outcome, Error> {
        let urgency = if deferrable {
            Urgency::Deferrable
        } else {
            Urgency::Now
        };
        self.writer.submit(command, urgency).await
    }
}

/// The gRPC status of a class of errors.
fn grpc_code(class: ErrorClass) -> tonic::Code {
    match class {
        ErrorClass::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorClass::NotFound => tonic::Code::NotFound,
        ErrorClass::PermissionDenied => tonic::Code::PermissionDenied,
        ErrorClass::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorClass::Unavailable => tonic::Code::Unavailable,
        ErrorClass::Internal => tonic::Code::Internal,
    }
}

/// Converts an error into a status with the stable code attached.
pub fn status(error: &Error) -> Status {
    let code = error.code();
    let grpc = grpc_code(code.class());
    let field = match error {
        Error::Refused(e) => e.field(),
        _ => "",
    };
    let message = format!("{}: {error}", code.as_str());
    let detail = pb::ErrorDetail {
        code: convert::error_code_to_proto(code).into(),
        message: message.clone(),
        field: field.to_owned(),
    };
    let mut status = Status::with_details(grpc, message, detail.encode_to_vec().into());
    if let Ok(value) = code.as_str().parse() {
        status.metadata_mut().insert(ERROR_CODE_HEADER, value);
    }
    status
}

fn unexpected(outcome: Outcome) -> Error {
    Error::Invariant(format!("unexpected outcome {outcome:?}"))
}

#[tonic::async_trait]
impl pb::ledger_server::Ledger for LedgerGrpc {
    #[instrument(skip_all, fields(tenant_id = %request.get_ref().tenant_id, idempotency_key = %request.get_ref().idempotency_key))]
    async fn reserve_set(
        &self,
        request: Request<pb::ReserveSetRequest>,
    ) -> Result<Response<pb::ReserveSetResponse>, Status> {
        self.run("ReserveSet", async {
            let command = convert::reserve_set(request.get_ref())?;
            // A draw records a call its sidecar already admitted inside money the ledger holds:
            // refusing it would lose that call's evidence, not stop the call. Opening a credit
            // is a new decision and waits for the evidence like any reservation.
            if !matches!(command.credit, Credit::DrawFrom(_)) {
                self.admit_new_spend(self.store.holds_reservation(command.reservation_id()))
                    .await?;
            }
            let deferrable = request.get_ref().deferrable;
            match self
                .submit_as(Command::ReserveSet(command), deferrable)
                .await?
            {
                Outcome::Reserved {
                    reservation_id,
                    amount,
                    expires_at,
                    balances,
                    state,
                    credit_remaining,
                    replayed,
                } => Ok(pb::ReserveSetResponse {
                    outcome: Some(pb::reserve_set_response::Outcome::Reserved(
                        pb::Reservation {
                            reservation_id: reservation_id.to_string(),
                            amount_nano_usd: amount.get(),
                            expires_at_unix_ms: expires_at.timestamp_millis(),
                            balances: balances.iter().map(convert::balance_to_proto).collect(),
                            state: convert::reservation_state(state).into(),
                            credit_remaining_nano_usd: credit_remaining.map_or(0, |c| c.get()),
                        },
                    )),
                    replayed,
                }),
                Outcome::Denied {
                    budget_id,
                    remaining,
                } => Ok(pb::ReserveSetResponse {
                    outcome: Some(pb::reserve_set_response::Outcome::Denied(pb::Denial {
                        code: pb::ErrorCode::BudgetExhausted.into(),
                        budget_id,
                        remaining_nano_usd: remaining.get(),
                    })),
                    replayed: false,
                }),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    #[instrument(skip_all, fields(tenant_id = %request.get_ref().tenant_id, reservation_id = %request.get_ref().reservation_id))]
    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        self.run("Commit", async {
            let command = convert::commit(request.get_ref())?;
            let deferrable = request.get_ref().deferrable;
            match self.submit_as(Command::Commit(command), deferrable).await? {
                Outcome::Committed {
                    reservation_id,
                    resolution,
                    replayed,
                } => Ok(pb::CommitResponse {
                    reservation_id: reservation_id.to_string(),
                    committed_nano_usd: resolution.committed.get(),
                    released_nano_usd: resolution.released.get(),
                    overrun_nano_usd: resolution.overrun.get(),
                    replayed,
                    late: resolution.state == ReservationState::Expired,
                }),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    #[instrument(skip_all, fields(tenant_id = %request.get_ref().tenant_id, reservation_id = %request.get_ref().reservation_id))]
    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        self.run("Release", async {
            let command = convert::release(request.get_ref())?;
            let deferrable = request.get_ref().deferrable;
            match self
                .submit_as(Command::Release(command), deferrable)
                .await?
            {
                Outcome::Released {
                    reservation_id,
                    released,
                    replayed,
                } => Ok(pb::ReleaseResponse {
                    reservation_id: reservation_id.to_string(),
                    released_nano_usd: released.get(),
                    replayed,
                }),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    #[instrument(skip_all)]
    async fn sweep_expired(
        &self,
        request: Request<pb::SweepExpiredRequest>,
    ) -> Result<Response<pb::SweepExpiredResponse>, Status> {
        self.run("SweepExpired", async {
            self.control_only("SweepExpired")?;
            let max = convert::sweep(request.get_ref())?;
            if !self.store.anything_expired().await? {
                // What the writer would answer, as of this read; the sweeper asks again soon.
                return Ok(pb::SweepExpiredResponse {
                    expired: 0,
                    approvals_expired: 0,
                });
            }
            match self.submit(Command::SweepExpired(max)).await? {
                Outcome::Swept {
                    reservations,
                    approvals,
                } => Ok(pb::SweepExpiredResponse {
                    expired: reservations,
                    approvals_expired: approvals,
                }),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    #[instrument(skip_all, fields(tenant_id = %request.get_ref().tenant_id, scope_id = %request.get_ref().scope_id))]
    async fn acquire_fencing_lease(
        &self,
        request: Request<pb::AcquireFencingLeaseRequest>,
    ) -> Result<Response<pb::AcquireFencingLeaseResponse>, Status> {
        self.run("AcquireFencingLease", async {
            if request.get_ref().force {
                self.control_only("a forced takeover")?;
            }
            let command = convert::acquire_lease(request.get_ref())?;
            match self.submit(Command::AcquireLease(command)).await? {
                Outcome::Lease { grant, replayed } => Ok(pb::AcquireFencingLeaseResponse {
                    epoch: grant.state.epoch,
                    expires_at_unix_ms: grant.state.expires_at.timestamp_millis(),
                    outcome: convert::lease_outcome_to_proto(grant.outcome).into(),
                    replayed,
                }),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    #[instrument(skip_all, fields(tenant_id = %request.get_ref().tenant_id))]
    async fn upsert_tenant(
        &self,
        request: Request<pb::UpsertTenantRequest>,
    ) -> Result<Response<pb::UpsertTenantResponse>, Status> {
        self.run("UpsertTenant", async {
            self.control_only("UpsertTenant")?;
            let command = convert::upsert_tenant(request.get_ref())?;
            match self.submit(Command::UpsertTenant(command)).await? {
                Outcome::TenantUpserted { created } => Ok(pb::UpsertTenantResponse { created }),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    #[instrument(skip_all, fields(tenant_id = %request.get_ref().tenant_id, budget_id = %request.get_ref().budget_id))]
    async fn upsert_budget(
        &self,
        request: Request<pb::UpsertBudgetRequest>,
    ) -> Result<Response<pb::UpsertBudgetResponse>, Status> {
        self.run("UpsertBudget", async {
            let mut command = convert::upsert_budget(request.get_ref())?;
            if self.access == Access::DataPath {
                // A sidecar creates the budget of a run it guards (the contract's per-run limit);
                // it may not change any budget, nor create one a tenant's spend depends on.
                let run_budget = command.budget_id.starts_with(RUN_BUDGET_PREFIX)
                    && command.definition.window == spendguard_core::window::BudgetWindow::Lifetime
                    && command.definition.soft_cap.is_none();
                if !run_budget {
                    self.control_only("UpsertBudget of a budget other than a run's (runs/…, lifetime, no soft cap)")?;
                }
                command.create_only = true;
            }
            match self.submit(Command::UpsertBudget(command)).await? {
                Outcome::BudgetUpserted { created, balance } => Ok(pb::UpsertBudgetResponse {
                    created,
                    balance: Some(convert::balance_to_proto(&balance)),
                }),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    #[instrument(skip_all, fields(tenant_id = %request.get_ref().tenant_id))]
    async fn register_pricing(
        &self,
        request: Request<pb::RegisterPricingRequest>,
    ) -> Result<Response<pb::RegisterPricingResponse>, Status> {
        self.run("RegisterPricing", async {
            self.control_only("RegisterPricing")?;
            let command = convert::register_pricing(request.get_ref())?;
            match self.submit(Command::RegisterPricing(command)).await? {
                Outcome::PricingRegistered { created } => {
                    Ok(pb::RegisterPricingResponse { created })
                }
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    #[instrument(skip_all, fields(key_id = %request.get_ref().key_id))]
    async fn register_signing_key(
        &self,
        request: Request<pb::RegisterSigningKeyRequest>,
    ) -> Result<Response<pb::RegisterSigningKeyResponse>, Status> {
        self.run("RegisterSigningKey", async {
            self.control_only("RegisterSigningKey")?;
            let command = convert::register_signing_key(request.get_ref())?;
            match self.submit(Command::RegisterSigningKey(command)).await? {
                Outcome::SigningKeyRegistered { created, changed } => {
                    Ok(pb::RegisterSigningKeyResponse { created, changed })
                }
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    #[instrument(skip_all, fields(tenant_id = %request.get_ref().tenant_id, idempotency_key = %request.get_ref().idempotency_key))]
    async fn create_approval(
        &self,
        request: Request<pb::CreateApprovalRequest>,
    ) -> Result<Response<pb::CreateApprovalResponse>, Status> {
        self.run("CreateApproval", async {
            let command = convert::create_approval(request.get_ref())?;
            self.admit_new_spend(self.store.holds_approval(command.approval_id()))
                .await?;
            match self.submit(Command::CreateApproval(command)).await? {
                Outcome::Approval { approval, replayed } => Ok(pb::CreateApprovalResponse {
                    approval: Some(convert::approval_to_proto(&approval)),
                    replayed,
                }),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    #[instrument(skip_all, fields(tenant_id = %request.get_ref().tenant_id, call_id = %request.get_ref().call_id))]
    async fn record_fail_open(
        &self,
        request: Request<pb::RecordFailOpenRequest>,
    ) -> Result<Response<pb::RecordFailOpenResponse>, Status> {
        self.run("RecordFailOpen", async {
            let command = convert::record_fail_open(request.get_ref())?;
            match self.submit(Command::RecordFailOpen(command)).await? {
                Outcome::FailOpenRecorded {
                    record,
                    balances,
                    replayed,
                } => Ok(pb::RecordFailOpenResponse {
                    record_id: record.id.to_string(),
                    replayed,
                    epoch_stale: record.epoch_stale(),
                    epoch_current: record.epoch_current,
                    balances: balances.iter().map(convert::balance_to_proto).collect(),
                }),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    #[instrument(skip_all, fields(tenant_id = %request.get_ref().tenant_id, stops = request.get_ref().stops.len()))]
    async fn record_stops(
        &self,
        request: Request<pb::RecordStopsRequest>,
    ) -> Result<Response<pb::RecordStopsResponse>, Status> {
        self.run("RecordStops", async {
            let command = convert::record_stops(request.get_ref())?;
            match self.submit(Command::RecordStops(command)).await? {
                Outcome::StopsRecorded { recorded, replayed } => {
                    Ok(pb::RecordStopsResponse { recorded, replayed })
                }
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    #[instrument(skip_all, fields(tenant_id = %request.get_ref().tenant_id, approval_id = %request.get_ref().approval_id))]
    async fn resolve_approval(
        &self,
        request: Request<pb::ResolveApprovalRequest>,
    ) -> Result<Response<pb::ResolveApprovalResponse>, Status> {
        self.run("ResolveApproval", async {
            self.control_only("ResolveApproval")?;
            let command = convert::resolve_approval(request.get_ref())?;
            match self.submit(Command::ResolveApproval(command)).await? {
                Outcome::Approval { approval, replayed } => Ok(pb::ResolveApprovalResponse {
                    approval: Some(convert::approval_to_proto(&approval)),
                    replayed,
                }),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    #[instrument(skip_all, fields(tenant_id = %request.get_ref().tenant_id))]
    async fn list_approvals(
        &self,
        request: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        self.run("ListApprovals", async {
            self.control_only("ListApprovals")?;
            let query = convert::list_approvals(request.get_ref())?;
            let (approvals, more) = self
                .store
                .list_approvals(
                    query.tenant_id.as_deref(),
                    query.state,
                    query.after,
                    query.page_size,
                )
                .await?;
            let next_page_token = match approvals.last() {
                Some(last) if more => last.id.to_string(),
                _ => String::new(),
            };
            Ok(pb::ListApprovalsResponse {
                approvals: approvals.iter().map(convert::approval_to_proto).collect(),
                next_page_token,
            })
        })
        .await
    }

    #[instrument(skip_all, fields(tenant_id = %request.get_ref().tenant_id, approval_id = %request.get_ref().approval_id))]
    async fn get_approval(
        &self,
        request: Request<pb::GetApprovalRequest>,
    ) -> Result<Response<pb::GetApprovalResponse>, Status> {
        self.run("GetApproval", async {
            let (tenant_id, approval_id) = convert::get_approval(request.get_ref())?;
            // Another tenant's approval reads as unknown: no cross-tenant existence leak.
            let approval = self
                .store
                .approval(&tenant_id, approval_id)
                .await?
                .ok_or(LedgerError::ApprovalNotFound(approval_id))?;
            Ok(pb::GetApprovalResponse {
                approval: Some(convert::approval_to_proto(&approval)),
            })
        })
        .await
    }

    #[instrument(skip_all, fields(tenant_id = %request.get_ref().tenant_id))]
    async fn upsert_retention_policy(
        &self,
        request: Request<pb::UpsertRetentionPolicyRequest>,
    ) -> Result<Response<pb::UpsertRetentionPolicyResponse>, Status> {
        self.run("UpsertRetentionPolicy", async {
            self.control_only("UpsertRetentionPolicy")?;
            let command = convert::upsert_retention_policy(request.get_ref())?;
            let tenant_id = command.tenant_id.clone();
            match self.submit(Command::UpsertRetentionPolicy(command)).await? {
                Outcome::RetentionPolicyUpserted {
                    created,
                    changed,
                    policy,
                    updated_at,
                } => Ok(pb::UpsertRetentionPolicyResponse {
                    created,
                    changed,
                    policy: Some(convert::retention_policy_to_proto(
                        &tenant_id, policy, updated_at,
                    )),
                }),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    #[instrument(skip_all, fields(tenant_id = %request.get_ref().tenant_id))]
    async fn get_retention_policy(
        &self,
        request: Request<pb::GetRetentionPolicyRequest>,
    ) -> Result<Response<pb::GetRetentionPolicyResponse>, Status> {
        self.run("GetRetentionPolicy", async {
            self.control_only("GetRetentionPolicy")?;
            let tenant_id = &request.get_ref().tenant_id;
            spendguard_core::ids::check_name("tenant_id", tenant_id)?;
            let policy = self.store.retention_policy(tenant_id).await?;
            Ok(pb::GetRetentionPolicyResponse {
                found: policy.is_some(),
                policy: policy.map(|(policy, updated_at)| {
                    convert::retention_policy_to_proto(tenant_id, policy, updated_at)
                }),
            })
        })
        .await
    }

    #[instrument(skip_all, fields(tenant_id = %request.get_ref().tenant_id))]
    async fn get_balances(
        &self,
        request: Request<pb::GetBalancesRequest>,
    ) -> Result<Response<pb::GetBalancesResponse>, Status> {
        self.run("GetBalances", async {
            let budget_ids = convert::balances_request(request.get_ref())?;
            let balances = self
                .store
                .balances(&request.get_ref().tenant_id, &budget_ids)
                .await?;
            Ok(pb::GetBalancesResponse {
                balances: balances.iter().map(convert::balance_to_proto).collect(),
            })
        })
        .await
    }

    #[instrument(skip_all, fields(tenant_id = %request.get_ref().tenant_id))]
    async fn check_fencing(
        &self,
        request: Request<pb::CheckFencingRequest>,
    ) -> Result<Response<pb::CheckFencingResponse>, Status> {
        self.run("CheckFencing", async {
            let fencing = convert::check_fencing_request(request.get_ref())?;
            let (lease, now) = self.store.fencing_lease(&fencing.scope_id).await?;
            // The check a ReserveSet makes: new exposure needs the current epoch and an
            // unexpired lease.
            let lease = check_fencing(
                &fencing.scope_id,
                &request.get_ref().tenant_id,
                fencing.epoch,
                lease.as_ref(),
                Some(now),
            )
            .map_err(Error::Refused)?;
            Ok(pb::CheckFencingResponse {
                expires_at_unix_ms: lease.expires_at.timestamp_millis(),
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spendguard_core::ErrorCode;
    use std::collections::BTreeMap;

    /// The status family the proto documents for each code: `// [FAMILY] ...` opening the
    /// comment above it; None for a code documented without one.
    fn documented_families() -> BTreeMap<&'static str, Option<&'static str>> {
        let proto = include_str!("../../../proto/spendguard/ledger/v1/ledger.proto");
        let mut families = BTreeMap::new();
        let mut comment_opened = false;
        let mut family = None;
        for line in proto.lines().map(str::trim) {
            if let Some(comment) = line.strip_prefix("//") {
                if !comment_opened {
                    family = comment
                        .trim()
                        .strip_prefix('[')
                        .and_then(|c| c.split(']').next());
                }
                comment_opened = true;
                continue;
            }
            if let Some(name) = line.strip_prefix("ERROR_CODE_") {
                let name = name.split([' ', '=']).next().unwrap_or_default();
                families.insert(name, family);
            }
            comment_opened = false;
            family = None;
        }
        families
    }

    #[test]
    fn every_code_has_the_status_the_proto_documents() {
        let families = documented_families();
        for code in ErrorCode::ALL {
            let documented = families.get(code.as_str()).copied().flatten();
            let expected = match documented {
                Some("INVALID_ARGUMENT") => tonic::Code::InvalidArgument,
                Some("NOT_FOUND") => tonic::Code::NotFound,
                Some("PERMISSION_DENIED") => tonic::Code::PermissionDenied,
                Some("FAILED_PRECONDITION") => tonic::Code::FailedPrecondition,
                Some("UNAVAILABLE") => tonic::Code::Unavailable,
                Some("INTERNAL") => tonic::Code::Internal,
                // Only the denial reason is never an error status.
                None if *code == ErrorCode::BudgetExhausted => continue,
                other => panic!("{}: documented as {other:?}", code.as_str()),
            };
            assert_eq!(grpc_code(code.class()), expected, "{}", code.as_str());
        }
        // The parse found the proto's codes, not a handful.
        assert!(families.len() > 30, "{families:?}");
    }
}
