//! ApprovalRequest controller: the human interface to the ledger's approvals (S14/S15).
//!
//! ```text
//! ledger ListApprovals(PENDING) ──mirror, every poll──► create ApprovalRequest apr-<id>
//!                                                        (approvals namespace, spec from the record)
//! approver: status.phase Approved|Denied ─► webhook stamps status.decidedBy from userInfo
//!   ─► reconcile: ResolveApproval(approver = decidedBy) ─► condition Resolved=True LedgerResolved
//! pending CR ─► reconcile: the ledger's record ─► expired? phase Expired (the operator may set
//!                                                 only that phase; the webhook enforces it)
//! ```
//!
//! The ledger is the authority. The operator never approves or denies; it forwards a decision
//! whose identity the admission webhook stamped (`status.decidedBy`) and reflects what the
//! ledger answered. A decision without a stamped identity is never forwarded.
//!
//! Status is written by two field managers: [`PHASE_FIELD_MANAGER`] owns `phase` while the
//! operator sets it (Pending at first, Expired at expiry), and the operator's usual
//! [`super::FIELD_MANAGER`] owns only the conditions `Ready` and `Resolved`. An approver's
//! patch of `phase` therefore takes the field over without a conflict, and no condition write
//! can remove or reset a decision.
//!
//! Reading one ledger approval: [`lookup`] calls GetApproval for the request's tenant and id
//! (any state); an unknown id and another tenant's approval both read as not found.

use super::FIELD_MANAGER;
use crate::Context;
use crate::error::Error;
use clap::Args;
use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use spendguard_crds::approval_request::{
    ApprovalPhase, ApprovalRequest, ApprovalRequestSpec, ApprovalRequestStatus,
};
use spendguard_crds::condition::Condition;
use spendguard_crds::money::Usd;
use spendguard_proto::ledger::v1 as pb;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, instrument, warn};

/// Field manager that owns `status.phase` while the operator sets it.
pub const PHASE_FIELD_MANAGER: &str = "spendguard-operator-phase";
/// Prefix of a mirrored ApprovalRequest's name; the rest is the ledger approval id.
pub const NAME_PREFIX: &str = "apr-";
/// The condition that tells what the ledger holds for this approval.
pub const RESOLVED: &str = "Resolved";
/// Label on every mirrored ApprovalRequest.
pub const MANAGED_BY_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "spendguard-operator");

/// Largest ListApprovals page (the ledger's maximum).
const PAGE_SIZE: u32 = 500;
/// Pages per mirror pass: 100 × 500 = 50,000 pending approvals. Past it a pass logs a warning
/// and mirrors the rest on the next pass (ids are ordered, so the first pages come first).
const PAGES_MAX: usize = 100;
/// Longest wait before a pending request's ledger record is read again while it is not yet
/// due to expire: only an out-of-band ResolveApproval can change it in that time.
const PENDING_RECHECK_MAX: Duration = Duration::from_secs(600);
/// Added to `expiresAt` before the first check of an overdue request, for clock skew between
/// the operator and the database clock that decides expiry.
const EXPIRY_GRACE: Duration = Duration::from_secs(2);
/// The ledger's limit on ResolveApproval's `reason`, in bytes.
const LEDGER_REASON_BYTES_MAX: usize = 256;

/// `SPENDGUARD_APPROVALS_*` settings.
#[derive(Debug, Clone, Args)]
pub struct ApprovalArgs {
    /// Namespace where pending ledger approvals are mirrored as ApprovalRequests (empty: the
    /// operator's own namespace, POD_NAMESPACE).
    #[arg(
        long = "approvals-namespace",
        env = "SPENDGUARD_APPROVALS_NAMESPACE",
        default_value = ""
    )]
    pub approvals_namespace: String,
    /// How often pending ledger approvals are mirrored, and overdue pending requests re-read.
    #[arg(
        long = "approvals-poll-interval-ms",
        env = "SPENDGUARD_APPROVALS_POLL_INTERVAL_MS",
        default_value_t = 5_000
    )]
    pub approvals_poll_interval_ms: u64,
}

/// Bounds of [`ApprovalArgs::approvals_poll_interval_ms`]: faster than 100 ms only loads the ledger,
/// slower than 10 minutes leaves approvers waiting for requests to appear.
const POLL_INTERVAL_MS_MIN: u64 = 100;
const POLL_INTERVAL_MS_MAX: u64 = 600_000;

/// What the ApprovalRequest controller needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Namespace of the mirrored ApprovalRequests.
    pub namespace: String,
    /// Mirror period, and the re-read period of overdue pending requests.
    pub poll_interval: Duration,
    /// Whether this operator serves the approvals webhook, which stamps `decidedBy` from the
    /// apiserver's user info (`webhook.enabled`). Without it, anyone allowed to patch the
    /// status could write any approver's name, so no decision is forwarded.
    pub approver_stamped_by_webhook: bool,
}

impl ApprovalArgs {
    /// The settings, with `operator_namespace` as the default namespace; `webhook_enabled`: this
    /// operator serves the admission webhooks (the approvals webhook among them).
    ///
    /// # Errors
    /// A poll interval outside 100 ms to 10 minutes (never replaced by a default).
    pub fn settings(
        &self,
        operator_namespace: &str,
        webhook_enabled: bool,
    ) -> Result<Settings, Error> {
        let Self {
            approvals_namespace,
            approvals_poll_interval_ms,
        } = self;
        if !(POLL_INTERVAL_MS_MIN..=POLL_INTERVAL_MS_MAX).contains(approvals_poll_interval_ms) {
            return Err(Error::Startup(format!(
                "SPENDGUARD_APPROVALS_POLL_INTERVAL_MS={approvals_poll_interval_ms} is outside \
                 {POLL_INTERVAL_MS_MIN} to {POLL_INTERVAL_MS_MAX}"
            )));
        }
        let namespace = if approvals_namespace.is_empty() {
            operator_namespace
        } else {
            approvals_namespace
        };
        Ok(Settings {
            namespace: namespace.to_owned(),
            poll_interval: Duration::from_millis(*approvals_poll_interval_ms),
            approver_stamped_by_webhook: webhook_enabled,
        })
    }
}

/// Whether `id` is a UUID in the lowercase hyphenated form the ledger returns (and a valid
/// tail of an object name).
fn is_ledger_uuid(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
        })
}

/// The ApprovalRequest name of a ledger approval id: `apr-<id>`.
///
/// # Errors
/// [`Error::InvalidSpec`] when the id is not a lowercase hyphenated UUID.
pub fn object_name(approval_id: &str) -> Result<String, Error> {
    if !is_ledger_uuid(approval_id) {
        return Err(Error::InvalidSpec(format!(
            "approval id {approval_id:?} is not a lowercase UUID"
        )));
    }
    Ok(format!("{NAME_PREFIX}{approval_id}"))
}

/// RFC 3339 (UTC, milliseconds) of a Unix time in ms.
fn rfc3339_ms(unix_ms: i64) -> Result<String, Error> {
    chrono::DateTime::from_timestamp_millis(unix_ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .ok_or_else(|| Error::InvalidSpec(format!("time {unix_ms} ms is out of range")))
}

/// The spec of the ApprovalRequest mirroring `approval`. The amount is converted exactly
/// (integer nano-USD to the decimal string) and checked to convert back to the same integer.
///
/// # Errors
/// [`Error::InvalidSpec`] for a record the CRD cannot hold (negative amount, malformed id).
pub fn spec_from_ledger(approval: &pb::Approval) -> Result<ApprovalRequestSpec, Error> {
    object_name(&approval.approval_id)?;
    let amount = Usd::from_nano_usd(approval.amount_nano_usd);
    if amount.nano_usd() != Ok(approval.amount_nano_usd) {
        return Err(Error::InvalidSpec(format!(
            "amount {} nano-USD has no USD form the CRD accepts",
            approval.amount_nano_usd
        )));
    }
    Ok(ApprovalRequestSpec {
        tenant: approval.tenant_id.clone(),
        budget: approval.budget_id.clone(),
        amount,
        approval_id: approval.approval_id.clone(),
        reason: approval.reason_code.clone(),
        requested_by: approval.requested_by.clone(),
        expires_at: rfc3339_ms(approval.expires_at_unix_ms)?,
    })
}

/// The new ApprovalRequest for a pending ledger approval.
///
/// # Errors
/// See [`spec_from_ledger`].
pub fn mirror_object(approval: &pb::Approval, namespace: &str) -> Result<ApprovalRequest, Error> {
    let spec = spec_from_ledger(approval)?;
    let mut object = ApprovalRequest::new(&object_name(&approval.approval_id)?, spec);
    object.metadata.namespace = Some(namespace.to_owned());
    object.metadata.labels = Some(
        [(MANAGED_BY_LABEL.0.to_owned(), MANAGED_BY_LABEL.1.to_owned())]
            .into_iter()
            .collect(),
    );
    Ok(object)
}

/// What one mirror pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mirrored {
    /// Pending approvals the ledger listed.
    pub pending: usize,
    /// ApprovalRequests created (an AlreadyExists counts as present, not created).
    pub created: usize,
    /// Records the CRD cannot hold (logged and skipped).
    pub skipped: usize,
}

/// One mirror pass: pages through every tenant's pending ledger approvals and creates the
/// ApprovalRequests that `existing` lacks. Creation is idempotent: AlreadyExists is success.
///
/// # Errors
/// A ledger failure or a failed create; the pass stops there and the next one resumes.
pub async fn mirror(
    ctx: &Context,
    namespace: &str,
    existing: &HashSet<String>,
) -> Result<Mirrored, Error> {
    let api: Api<ApprovalRequest> = Api::namespaced(ctx.kube.clone(), namespace);
    let mut outcome = Mirrored::default();
    let mut page_token = String::new();
    for _ in 0..PAGES_MAX {
        let page = ctx
            .ledger
            .clone()
            .list_approvals(pb::ListApprovalsRequest {
                tenant_id: String::new(),
                state: pb::ApprovalState::Pending.into(),
                page_size: PAGE_SIZE,
                page_token: page_token.clone(),
            })
            .await
            .map_err(|s| Error::ledger(&s))?
            .into_inner();
        outcome.pending = outcome.pending.saturating_add(page.approvals.len());
        for approval in &page.approvals {
            let object = match mirror_object(approval, namespace) {
                Ok(object) => object,
                Err(error) => {
                    warn!(approval_id = %approval.approval_id, %error, "approval not mirrored");
                    outcome.skipped = outcome.skipped.saturating_add(1);
                    continue;
                }
            };
            if existing.contains(&object.name_any()) {
                continue;
            }
            if create(&api, &object).await? {
                info!(approval_id = %approval.approval_id, object = %object.name_any(),
                    "pending approval mirrored");
                outcome.created = outcome.created.saturating_add(1);
            }
        }
        if page.next_page_token.is_empty() {
            return Ok(outcome);
        }
        page_token = page.next_page_token;
    }
    warn!(
        pages = PAGES_MAX,
        "more pending approvals than one pass mirrors; the rest follow on the next passes"
    );
    Ok(outcome)
}

/// Creates `object`; `false` when it already exists.
async fn create(api: &Api<ApprovalRequest>, object: &ApprovalRequest) -> Result<bool, Error> {
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    };
    match api.create(&params, object).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(Error::Kube(error)),
    }
}

/// The ledger's record of `approval_id` for `tenant`, in any state, or `None` when the ledger
/// has no such approval for that tenant (GetApproval answers `APPROVAL_NOT_FOUND` for an
/// unknown id and for another tenant's approval alike).
///
/// # Errors
/// A malformed id ([`Error::InvalidSpec`], checked before any call), a ledger failure, or a
/// ledger answer that is not the record asked for ([`Error::Ledger`] with code `INTERNAL`).
pub async fn lookup(
    ctx: &Context,
    tenant: &str,
    approval_id: &str,
) -> Result<Option<pb::Approval>, Error> {
    if !is_ledger_uuid(approval_id) {
        return Err(Error::InvalidSpec(format!(
            "approvalId {approval_id:?} is not a lowercase UUID"
        )));
    }
    let response = ctx
        .ledger
        .clone()
        .get_approval(pb::GetApprovalRequest {
            tenant_id: tenant.to_owned(),
            approval_id: approval_id.to_owned(),
        })
        .await;
    let approval = match response {
        Ok(response) => response.into_inner().approval,
        Err(status) => {
            return match Error::ledger(&status) {
                Error::Ledger { code, .. } if code == "APPROVAL_NOT_FOUND" => Ok(None),
                error => Err(error),
            };
        }
    };
    // The record must be the one asked for: acting on another approval's state would forward
    // or mark the wrong thing.
    match approval {
        Some(record) if record.approval_id == approval_id && record.tenant_id == tenant => {
            Ok(Some(record))
        }
        other => Err(Error::Ledger {
            code: "INTERNAL".into(),
            message: format!(
                "GetApproval for {approval_id} of tenant {tenant} answered {:?}",
                other.map(|r| (r.approval_id, r.tenant_id))
            ),
        }),
    }
}

fn conditions(request: &ApprovalRequest) -> &[Condition] {
    request
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Condition `type_` of `request`, keeping the previous transition time while its status stays.
fn condition(
    request: &ApprovalRequest,
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
) -> Condition {
    let last_transition_time = match find(conditions(request), type_) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time,
        observed_generation: request.meta().generation.unwrap_or(0),
    }
}

/// How the ledger stands on this request, as the `Resolved` condition and its Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `True` once the ledger record is no longer pending.
    pub resolved: bool,
    /// Stable reason.
    pub reason: &'static str,
    /// Detail.
    pub message: String,
    /// Whether its Event is a Warning (a decision that had no effect, a missing identity).
    pub warning: bool,
}

impl Outcome {
    fn new(resolved: bool, reason: &'static str, message: String, warning: bool) -> Self {
        Self {
            resolved,
            reason,
            message,
            warning,
        }
    }
}

/// Reasons of the `Resolved` condition.
pub mod reason {
    /// Pending in the ledger; nobody decided yet.
    pub const AWAITING_DECISION: &str = "AwaitingDecision";
    /// The ledger recorded this request's decision with the stamped approver.
    pub const LEDGER_RESOLVED: &str = "LedgerResolved";
    /// The ledger expired the approval (before any decision reached it).
    pub const LEDGER_EXPIRED: &str = "LedgerExpired";
    /// The decision reached the ledger after the approval had expired: it had no effect.
    pub const DECIDED_AFTER_EXPIRY: &str = "DecidedAfterExpiry";
    /// The ledger already holds another resolution: this decision had no effect.
    pub const LEDGER_DECIDED_OTHERWISE: &str = "LedgerDecidedOtherwise";
    /// The decision has no `decidedBy` stamped by the webhook, so it is not forwarded.
    pub const APPROVER_IDENTITY_MISSING: &str = "ApproverIdentityMissing";
    /// The approvals webhook is not enabled, so no `decidedBy` can be trusted: not forwarded.
    pub const APPROVER_UNVERIFIED: &str = "ApproverUnverified";
    /// The spec is not the ledger's record of that approval, so the decision is not forwarded.
    pub const SPEC_MISMATCH: &str = "SpecMismatch";
}

fn state_name(state: pb::ApprovalState) -> &'static str {
    match state {
        pb::ApprovalState::Unspecified => "unspecified",
        pb::ApprovalState::Pending => "pending",
        pb::ApprovalState::Approved => "approved",
        pb::ApprovalState::Denied => "denied",
        pb::ApprovalState::Expired => "expired",
        pb::ApprovalState::Cancelled => "cancelled",
    }
}

/// "approved by alice at 2026-…" for a resolved ledger record.
fn describe(approval: &pb::Approval) -> String {
    let at = rfc3339_ms(approval.resolved_at_unix_ms).unwrap_or_else(|_| "unknown time".into());
    match approval.resolved_by.as_str() {
        "" => format!("{} at {at}", state_name(approval.state())),
        by => format!("{} by {by} at {at}", state_name(approval.state())),
    }
}

/// The ledger's reason text: the approver's reason without control characters, cut to the
/// ledger's limit on a character boundary (the full text stays in the ApprovalRequest).
fn ledger_reason(status: &ApprovalRequestStatus) -> String {
    let clean: String = status
        .decision_reason
        .as_deref()
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let end = clean.floor_char_boundary(LEDGER_REASON_BYTES_MAX);
    clean[..end].to_owned()
}

/// What the ApprovalRequest reconciler shares: the operator's [`Context`] and this
/// controller's [`Settings`].
pub struct ApprovalContext {
    /// The operator's shared context.
    pub ctx: Context,
    /// This controller's settings.
    pub settings: Settings,
}

/// Reconciles one ApprovalRequest: forwards a stamped decision to the ledger, or re-reads a
/// pending request's ledger record and expires it when the ledger did.
///
/// # Errors
/// A ledger refusal or failure, or a failed Kubernetes write; the error policy reports it.
#[instrument(skip_all, fields(object = %request.name_any(), approval_id = %request.spec.approval_id))]
pub async fn reconcile(
    request: Arc<ApprovalRequest>,
    shared: Arc<ApprovalContext>,
) -> Result<Action, Error> {
    let ctx = &shared.ctx;
    let work = apply(&request, ctx, &shared.settings);
    super::observed(ctx, request.as_ref(), work).await
}

async fn apply(
    request: &ApprovalRequest,
    ctx: &Context,
    settings: &Settings,
) -> Result<Action, Error> {
    let poll_interval = settings.poll_interval;
    let api: Api<ApprovalRequest> =
        Api::namespaced(ctx.kube.clone(), &request.namespace().unwrap_or_default());
    let status = request.status.clone().unwrap_or_default();
    if request.status.is_none() {
        // A new mirror: the phase manager owns Pending until an approver takes the field over.
        write_phase(&api, request, ApprovalPhase::Pending).await?;
    }
    let (outcome, action) = match status.phase {
        ApprovalPhase::Pending => pending(&api, request, ctx, poll_interval).await?,
        ApprovalPhase::Approved | ApprovalPhase::Denied => {
            if find(conditions(request), RESOLVED).is_some_and(|c| c.status == "True") {
                return Ok(Action::await_change()); // Forwarded once; the ledger keeps it.
            }
            (
                decided(request, &status, ctx, settings).await?,
                Action::await_change(),
            )
        }
        ApprovalPhase::Expired => {
            if find(conditions(request), RESOLVED).is_some_and(|c| c.status == "True") {
                return Ok(Action::await_change());
            }
            let message = "the ledger expired this approval before anyone decided".to_owned();
            let outcome = Outcome::new(true, reason::LEDGER_EXPIRED, message, false);
            (outcome, Action::await_change())
        }
    };
    write_outcome(ctx, &api, request, &outcome).await?;
    Ok(action)
}

/// A pending request: what the ledger holds now, and when to look again.
async fn pending(
    api: &Api<ApprovalRequest>,
    request: &ApprovalRequest,
    ctx: &Context,
    poll_interval: Duration,
) -> Result<(Outcome, Action), Error> {
    let spec = &request.spec;
    let Some(record) = lookup(ctx, &spec.tenant, &spec.approval_id).await? else {
        return Err(Error::Ledger {
            code: "APPROVAL_NOT_FOUND".into(),
            message: format!(
                "the ledger has no approval {} for tenant {}",
                spec.approval_id, spec.tenant
            ),
        });
    };
    match record.state() {
        pb::ApprovalState::Pending | pb::ApprovalState::Unspecified => {
            let expires_at = rfc3339_ms(record.expires_at_unix_ms)?;
            let message = format!("pending in the ledger until {expires_at}");
            let outcome = Outcome::new(false, reason::AWAITING_DECISION, message, false);
            let until_expiry_ms = record
                .expires_at_unix_ms
                .saturating_sub(chrono::Utc::now().timestamp_millis());
            let wait = match u64::try_from(until_expiry_ms) {
                // Not yet due: look again just after it is, or sooner for out-of-band changes.
                Ok(ms) if ms > 0 => Duration::from_millis(ms)
                    .saturating_add(EXPIRY_GRACE)
                    .min(PENDING_RECHECK_MAX),
                // Overdue: the sweeper (or a late decision) expires it soon.
                _ => poll_interval,
            };
            Ok((outcome, Action::requeue(wait)))
        }
        pb::ApprovalState::Expired => {
            write_phase(api, request, ApprovalPhase::Expired).await?;
            let message = format!("the ledger recorded this approval {}", describe(&record));
            let outcome = Outcome::new(true, reason::LEDGER_EXPIRED, message, false);
            Ok((outcome, Action::await_change()))
        }
        pb::ApprovalState::Approved | pb::ApprovalState::Denied | pb::ApprovalState::Cancelled => {
            // Resolved without this request (another client of the ledger); the operator may
            // not set Approved or Denied itself, so the condition tells.
            let message = format!(
                "the ledger already recorded this approval {}, not through this ApprovalRequest",
                describe(&record)
            );
            let outcome = Outcome::new(true, reason::LEDGER_DECIDED_OTHERWISE, message, true);
            Ok((outcome, Action::await_change()))
        }
    }
}

/// A decided request: forward the decision with the stamped approver, once.
async fn decided(
    request: &ApprovalRequest,
    status: &ApprovalRequestStatus,
    ctx: &Context,
    settings: &Settings,
) -> Result<Outcome, Error> {
    if !settings.approver_stamped_by_webhook {
        let message = "the approvals webhook is not enabled (webhook.enabled=false), so \
                       decidedBy was not stamped from the approver's identity and could name \
                       anyone; the decision was not sent to the ledger"
            .to_owned();
        return Ok(Outcome::new(
            false,
            reason::APPROVER_UNVERIFIED,
            message,
            true,
        ));
    }
    let approver = status.decided_by.as_deref().map(str::trim).unwrap_or("");
    if approver.is_empty() {
        let message = "the decision has no decidedBy stamped by the approvals webhook, so it \
                       was not sent to the ledger; decide through the webhook \
                       (kubectl spendguard approve|deny)"
            .to_owned();
        return Ok(Outcome::new(
            false,
            reason::APPROVER_IDENTITY_MISSING,
            message,
            true,
        ));
    }
    let decision = match status.phase {
        ApprovalPhase::Approved => pb::ApprovalDecision::Approve,
        _ => pb::ApprovalDecision::Deny,
    };
    let spec = &request.spec;
    // The approver decided on what this object shows. Anyone who may create ApprovalRequests
    // could show a misleading spec under a real approval id, so the decision is forwarded only
    // if the spec is exactly the ledger's record (an unknown id is left to the ledger's answer).
    if let Some(record) = lookup(ctx, &spec.tenant, &spec.approval_id).await?
        && spec_from_ledger(&record)? != *spec
    {
        let message = format!(
            "this ApprovalRequest's spec differs from the ledger's approval ({}), so the decision \
             was not sent: nobody approves what they did not see",
            describe(&record)
        );
        return Ok(Outcome::new(false, reason::SPEC_MISMATCH, message, true));
    }
    let answer = ctx
        .ledger
        .clone()
        .resolve_approval(pb::ResolveApprovalRequest {
            tenant_id: spec.tenant.clone(),
            approval_id: spec.approval_id.clone(),
            decision: decision.into(),
            approver: approver.to_owned(),
            reason: ledger_reason(status),
        })
        .await
        .map_err(|s| Error::ledger(&s));
    match answer {
        Ok(response) => {
            let record = response.into_inner().approval.unwrap_or_default();
            info!(approver, decision = ?decision, "approval resolved in the ledger");
            let message = format!("the ledger recorded this approval {}", describe(&record));
            Ok(Outcome::new(true, reason::LEDGER_RESOLVED, message, false))
        }
        Err(Error::Ledger { code, .. }) if code == "APPROVAL_EXPIRED" => {
            let message = match lookup(ctx, &spec.tenant, &spec.approval_id).await? {
                Some(record) => format!(
                    "the decision reached the ledger after the approval expired (recorded {}); \
                     it had no effect",
                    describe(&record)
                ),
                None => "the decision reached the ledger after the approval expired; it had \
                         no effect"
                    .to_owned(),
            };
            Ok(Outcome::new(
                true,
                reason::DECIDED_AFTER_EXPIRY,
                message,
                true,
            ))
        }
        Err(Error::Ledger { code, .. }) if code == "APPROVAL_ALREADY_RESOLVED" => {
            let recorded = lookup(ctx, &spec.tenant, &spec.approval_id)
                .await?
                .map_or_else(|| "resolved".to_owned(), |r| describe(&r));
            let message = format!(
                "the ledger, the authority, already recorded this approval {recorded}; this \
                 decision had no effect"
            );
            Ok(Outcome::new(
                true,
                reason::LEDGER_DECIDED_OTHERWISE,
                message,
                true,
            ))
        }
        Err(error) => Err(error),
    }
}

/// Writes `status.phase` under [`PHASE_FIELD_MANAGER`]. The CRD's CEL rule and the webhook
/// refuse any change of a decided phase, so this can only set Pending on a new request or
/// move Pending to Expired.
async fn write_phase(
    api: &Api<ApprovalRequest>,
    request: &ApprovalRequest,
    phase: ApprovalPhase,
) -> Result<(), Error> {
    let patch = json!({
        "apiVersion": ApprovalRequest::api_version(&()),
        "kind": ApprovalRequest::kind(&()),
        "status": {"phase": phase},
    });
    api.patch_status(
        &request.name_any(),
        &PatchParams::apply(PHASE_FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(())
}

/// Writes `Ready=True` and the `Resolved` condition of `outcome`, and publishes an Event when
/// either changes.
async fn write_outcome(
    ctx: &Context,
    api: &Api<ApprovalRequest>,
    request: &ApprovalRequest,
    outcome: &Outcome,
) -> Result<(), Error> {
    let previous = conditions(request);
    let ready = condition(
        request,
        "Ready",
        "True",
        "InSync",
        "the ledger's record is reflected".into(),
    );
    let resolved = condition(
        request,
        RESOLVED,
        if outcome.resolved { "True" } else { "False" },
        outcome.reason,
        outcome.message.clone(),
    );
    let status = json!({"conditions": [ready.clone(), resolved.clone()]});
    super::patch_status(api, request, &status).await?;
    let changed = find(previous, RESOLVED)
        .is_none_or(|c| c.status != resolved.status || c.reason != resolved.reason);
    if changed {
        if outcome.warning {
            ctx.events
                .warning(request, outcome.reason, &outcome.message)
                .await;
        } else {
            ctx.events
                .normal(request, outcome.reason, &outcome.message)
                .await;
        }
    }
    // Ready's Event only when it recovers from a failure (its first True says nothing new).
    if find(previous, "Ready").is_some_and(|c| c.status != "True") {
        ctx.events.on_transition(request, previous, &ready).await;
    }
    Ok(())
}

/// Reports the failure as `Ready=False` (keeping `Resolved` as it was), with a Warning Event
/// when that changes the condition, and retries with a per-object backoff.
pub fn error_policy(
    request: Arc<ApprovalRequest>,
    error: &Error,
    shared: Arc<ApprovalContext>,
) -> Action {
    let ctx = &shared.ctx;
    warn!(object = %request.name_any(), %error, "approval request reconcile failed");
    let ready = condition(
        &request,
        "Ready",
        "False",
        error.reason(),
        error.to_string(),
    );
    let previous = conditions(&request).to_vec();
    let mut kept: Vec<Value> = vec![json!(ready)];
    if let Some(resolved) = find(&previous, RESOLVED) {
        kept.push(json!(resolved));
    }
    let status = json!({"conditions": kept});
    let delay = ctx.backoff.failed(&super::object_key(request.as_ref()));
    let api = Api::namespaced(ctx.kube.clone(), &request.namespace().unwrap_or_default());
    super::report_failure(ctx, api, request, previous, ready, status);
    Action::requeue(delay)
}

/// Names of the ApprovalRequests in `store` (the controller's cache).
fn names(store: &Store<ApprovalRequest>) -> HashSet<String> {
    store.state().iter().map(|r| r.name_any()).collect()
}

/// Mirrors pending ledger approvals every `settings.poll_interval` until its leadership term
/// ends (the controllers are dropped).
/// A failed pass is logged and counted; the next pass retries.
async fn mirror_loop(ctx: Context, settings: Settings, store: Store<ApprovalRequest>) {
    if store.wait_until_ready().await.is_err() {
        warn!("approval request cache ended before it was ready; mirroring without it");
    }
    let mut ticks = tokio::time::interval(settings.poll_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let started = tokio::time::Instant::now();
        let result = mirror(&ctx, &settings.namespace, &names(&store)).await;
        let seconds = started.elapsed().as_secs_f64();
        let reason = result.as_ref().err().map(Error::reason);
        ctx.metrics.reconciled("ApprovalMirror", seconds, reason);
        if let Err(error) = result {
            warn!(%error, "mirroring pending approvals failed");
        }
    }
}

/// Runs the ApprovalRequest controller (on `settings.namespace`) and the mirror of pending
/// ledger approvals until the watch ends.
pub async fn run(ctx: Context, settings: Settings) {
    let api: Api<ApprovalRequest> = Api::namespaced(ctx.kube.clone(), &settings.namespace);
    let controller = Controller::new(api, watcher::Config::default());
    let store = controller.store();
    let shared = Arc::new(ApprovalContext {
        ctx: ctx.clone(),
        settings: settings.clone(),
    });
    let reconciling =
        controller
            .run(reconcile, error_policy, shared)
            .for_each(|result| async move {
                if let Err(error) = result {
                    warn!(%error, "approval request controller event failed");
                }
            });
    tokio::select! {
        () = reconciling => {}
        () = mirror_loop(ctx, settings, store) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_apiserver::{self, ApiServer, Method, StatusCode};

    const ID: &str = "0192a3b4-c5d6-5e7f-8091-a2b3c4d5e6f7";
    const STATUS_PATH: &str = "/apis/spendguard.io/v1alpha1/namespaces/spendguard/approvalrequests/apr-0192a3b4-c5d6-5e7f-8091-a2b3c4d5e6f7/status";

    fn record() -> pb::Approval {
        pb::Approval {
            approval_id: ID.into(),
            tenant_id: "acme".into(),
            budget_id: "team/research".into(),
            amount_nano_usd: 1_234_567_891,
            state: pb::ApprovalState::Pending.into(),
            reason_code: "SOFT_CAP_REACHED".into(),
            requested_by: "acme/agent-7".into(),
            expires_at_unix_ms: 1_796_083_200_123,
            ..pb::Approval::default()
        }
    }

    fn object(status: Option<Value>) -> Value {
        let mut object = json!({
            "apiVersion": "spendguard.io/v1alpha1",
            "kind": "ApprovalRequest",
            "metadata": {"name": format!("apr-{ID}"), "namespace": "spendguard", "uid": "u-1",
                "generation": 1},
            "spec": {"tenant": "acme", "budget": "team/research", "amount": "1.234567891",
                "approvalId": ID, "reason": "SOFT_CAP_REACHED", "requestedBy": "acme/agent-7",
                "expiresAt": "2026-12-01T00:00:00.123Z"},
        });
        if let Some(status) = status {
            object["status"] = status;
        }
        object
    }

    fn parse(object: &Value) -> Arc<ApprovalRequest> {
        Arc::new(serde_json::from_value(object.clone()).unwrap())
    }

    fn shared() -> (Arc<ApprovalContext>, ApiServer) {
        let (ctx, api, _registry) = mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let shared = ApprovalContext {
            ctx: ctx.as_ref().clone(),
            settings: Settings {
                namespace: "spendguard".into(),
                poll_interval: Duration::from_secs(1),
                approver_stamped_by_webhook: true,
            },
        };
        (Arc::new(shared), api)
    }

    /// The reconcile's status write of `object`: its Resolved condition is `(status, reason)`,
    /// with an Event of `event_type` giving the same reason. Returns the written body.
    async fn expect_resolved(
        api: &mut ApiServer,
        object: &Value,
        (status, reason): (&str, &str),
        event_type: &str,
    ) -> Value {
        let body = api.expect_apply(STATUS_PATH, object).await;
        let resolved = condition_of(&body, RESOLVED);
        assert_eq!(
            (&resolved["status"], &resolved["reason"]),
            (&json!(status), &json!(reason))
        );
        let event = api.expect_event("spendguard").await;
        assert_eq!(
            (&event["type"], &event["reason"]),
            (&json!(event_type), &json!(reason))
        );
        body
    }

    fn condition_of<'a>(body: &'a Value, type_: &str) -> &'a Value {
        body["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == type_))
            .unwrap_or_else(|| panic!("no {type_} condition in {body}"))
    }

    // Goal: the mirror's spec is the ledger record, money converted exactly (integer nano-USD
    // to the decimal string and back), the name derived from the id, the time in RFC 3339.
    #[test]
    fn a_ledger_record_maps_onto_the_spec_exactly() {
        let object = mirror_object(&record(), "spendguard").unwrap();
        assert_eq!(object.name_any(), format!("apr-{ID}"));
        assert_eq!(object.namespace().as_deref(), Some("spendguard"));
        let spec = &object.spec;
        assert_eq!(spec.amount, Usd("1.234567891".into()));
        assert_eq!(spec.amount.nano_usd(), Ok(1_234_567_891));
        assert_eq!(spec.expires_at, "2026-12-01T00:00:00.123Z");
        assert_eq!(
            (
                spec.tenant.as_str(),
                spec.budget.as_str(),
                spec.reason.as_str()
            ),
            ("acme", "team/research", "SOFT_CAP_REACHED")
        );
        assert_eq!(spec.requested_by, "acme/agent-7");
        // Whole dollars and the smallest unit.
        let mut whole = record();
        whole.amount_nano_usd = 12_000_000_000;
        assert_eq!(spec_from_ledger(&whole).unwrap().amount.0, "12");
        whole.amount_nano_usd = 1;
        assert_eq!(spec_from_ledger(&whole).unwrap().amount.0, "0.000000001");
        // What the CRD cannot hold is refused, never rounded.
        let mut negative = record();
        negative.amount_nano_usd = -5;
        assert_eq!(
            spec_from_ledger(&negative).unwrap_err().reason(),
            "InvalidSpec"
        );
        let mut upper = record();
        upper.approval_id = ID.to_uppercase();
        assert!(spec_from_ledger(&upper).is_err());
        assert!(object_name("../x").is_err());
    }

    // Goal: the approver's reason fits the ledger's rules: no control characters, at most 256
    // bytes, cut on a character boundary.
    #[test]
    fn the_ledger_reason_is_clean_and_bounded() {
        let status = ApprovalRequestStatus {
            decision_reason: Some(format!("ok\nfine{}", "é".repeat(300))),
            ..ApprovalRequestStatus::default()
        };
        let reason = ledger_reason(&status);
        assert!(reason.starts_with("ok fine"));
        assert!(reason.len() <= LEDGER_REASON_BYTES_MAX && reason.len() >= 255);
        assert_eq!(ledger_reason(&ApprovalRequestStatus::default()), "");
    }

    // Goal: the namespace defaults to the operator's; an invalid interval aborts startup.
    #[test]
    fn settings_default_to_the_operator_namespace_and_refuse_bad_intervals() {
        let args = ApprovalArgs {
            approvals_namespace: String::new(),
            approvals_poll_interval_ms: 5_000,
        };
        let settings = args.settings("spendguard-system", true).unwrap();
        assert_eq!(settings.namespace, "spendguard-system");
        assert!(settings.approver_stamped_by_webhook);
        assert!(
            !args
                .settings("spendguard-system", false)
                .unwrap()
                .approver_stamped_by_webhook
        );
        assert_eq!(settings.poll_interval, Duration::from_secs(5));
        let own = ApprovalArgs {
            approvals_namespace: "approvals".into(),
            approvals_poll_interval_ms: 5_000,
        };
        assert_eq!(own.settings("x", true).unwrap().namespace, "approvals");
        for bad in [0, 99, 600_001] {
            let args = ApprovalArgs {
                approvals_namespace: String::new(),
                approvals_poll_interval_ms: bad,
            };
            assert!(args.settings("x", true).is_err(), "{bad}");
        }
    }

    // Goal: the operator's flags stay a valid clap command with these flags in it (argument
    // ids are field names, so a clash with another flattened group only shows at runtime).
    // Method: clap's own debug assertions over `spendguard operator`'s arguments, then a parse.
    #[test]
    fn the_operator_command_is_valid_with_the_approval_flags() {
        use clap::{Args as _, FromArgMatches as _};
        let command = crate::OperatorArgs::augment_args(clap::Command::new("operator"));
        command.clone().debug_assert();
        let matches = command
            .try_get_matches_from([
                "operator",
                "--approvals-namespace",
                "approvals",
                "--approvals-poll-interval-ms",
                "250",
            ])
            .unwrap();
        let args = crate::OperatorArgs::from_arg_matches(&matches).unwrap();
        let settings = args
            .approvals
            .settings("spendguard-system", args.webhook.enabled)
            .unwrap();
        assert_eq!(settings.namespace, "approvals");
        assert_eq!(settings.poll_interval, Duration::from_millis(250));
    }

    // Goal: a decision without a stamped identity never reaches the ledger; it shows as
    // Resolved=False ApproverIdentityMissing with a Warning Event. Method: an Approved request
    // without decidedBy; the ledger is unreachable, so a call would fail the reconcile.
    #[tokio::test]
    async fn a_decision_without_a_stamped_identity_is_not_forwarded() {
        let (shared, mut api) = shared();
        let decided = object(Some(
            json!({"phase": "Approved", "decisionReason": "trust me"}),
        ));
        let task = tokio::spawn(reconcile(parse(&decided), shared));
        let body = expect_resolved(
            &mut api,
            &decided,
            ("False", reason::APPROVER_IDENTITY_MISSING),
            "Warning",
        )
        .await;
        assert_eq!(
            body["status"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            ["conditions"],
            "the operator's condition write owns no decision field"
        );
        assert_eq!(condition_of(&body, "Ready")["status"], "True");
        assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
        api.expect_no_request().await;
    }

    // Goal: without the approvals webhook (webhook.enabled=false) nobody's `decidedBy` is
    // trusted: anyone who may patch the status could have written any name. A decision that
    // names an approver is not forwarded; it shows as Resolved=False ApproverUnverified.
    #[tokio::test]
    async fn without_the_webhook_no_decision_is_forwarded() {
        let (shared, mut api) = shared();
        let unverified = ApprovalContext {
            ctx: shared.ctx.clone(),
            settings: Settings {
                approver_stamped_by_webhook: false,
                ..shared.settings.clone()
            },
        };
        let decided = object(Some(
            json!({"phase": "Approved", "decidedBy": "cfo@example.com"}),
        ));
        let task = tokio::spawn(reconcile(parse(&decided), Arc::new(unverified)));
        let resolved = ("False", reason::APPROVER_UNVERIFIED);
        expect_resolved(&mut api, &decided, resolved, "Warning").await;
        assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
        api.expect_no_request().await;
    }

    // Goal: a decision already forwarded is not sent again and nothing is written.
    #[tokio::test]
    async fn a_resolved_decision_needs_nothing() {
        let (shared, mut api) = shared();
        let status = json!({"phase": "Denied", "decidedBy": "bob", "conditions": [
            {"type": "Resolved", "status": "True", "reason": "LedgerResolved", "message": "m",
             "lastTransitionTime": "2026-11-25T00:00:00Z", "observedGeneration": 1}]});
        let action = reconcile(parse(&object(Some(status))), shared)
            .await
            .unwrap();
        assert_eq!(action, Action::await_change());
        api.expect_no_request().await;
    }

    // Goal: a new mirror gets phase Pending from the phase field manager before anything else,
    // and the ledger being down is an error (reported by the error policy), not a crash.
    #[tokio::test]
    async fn a_new_request_gets_pending_from_the_phase_manager_first() {
        let (shared, mut api) = shared();
        let new = object(None);
        let task = tokio::spawn(reconcile(parse(&new), shared));
        let request = api.expect(Method::PATCH, STATUS_PATH).await;
        assert_eq!(
            request.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
        request.assert_query(&["fieldManager=spendguard-operator-phase", "force=true"]);
        assert_eq!(request.body["status"], json!({"phase": "Pending"}));
        let mut answer = new.clone();
        answer["status"] = json!({"phase": "Pending"});
        request.respond(StatusCode::OK, &answer);
        let error = task.await.unwrap().unwrap_err();
        assert_eq!(error.reason(), "LedgerUnavailable");
        api.expect_no_request().await;
    }

    // Goal: an Expired request (set by the operator earlier) gets Resolved=True LedgerExpired
    // once, with a Normal Event, and no ledger call.
    #[tokio::test]
    async fn an_expired_request_is_marked_resolved_once() {
        let (shared, mut api) = shared();
        let expired = object(Some(
            json!({"phase": "Expired", "decidedBy": "system:serviceaccount:sg:op"}),
        ));
        let task = tokio::spawn(reconcile(parse(&expired), shared.clone()));
        let resolved = ("True", reason::LEDGER_EXPIRED);
        let body = expect_resolved(&mut api, &expired, resolved, "Normal").await;
        assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
        let mut marked = expired.clone();
        marked["status"] = body["status"].clone();
        marked["status"]["phase"] = json!("Expired");
        assert_eq!(
            reconcile(parse(&marked), shared).await.unwrap(),
            Action::await_change()
        );
        api.expect_no_request().await;
    }

    // Goal: a failure is Ready=False with the stable reason, keeps the Resolved condition as it
    // was, publishes one Warning Event and backs off.
    #[tokio::test]
    async fn a_failure_keeps_resolved_and_backs_off() {
        let (shared, mut api) = shared();
        let resolved = json!({"type": "Resolved", "status": "False", "reason": "AwaitingDecision",
            "message": "pending", "lastTransitionTime": "2026-11-25T00:00:00Z",
            "observedGeneration": 1});
        let pending = object(Some(json!({"phase": "Pending", "conditions": [resolved]})));
        let error = Error::Ledger {
            code: "DEPENDENCY_UNAVAILABLE".into(),
            message: "database down".into(),
        };
        let action = error_policy(parse(&pending), &error, shared.clone());
        assert_eq!(action, Action::requeue(Duration::from_secs(1)));
        let body = api.expect_apply(STATUS_PATH, &pending).await;
        assert_eq!(body["status"]["conditions"][1], resolved);
        let ready = condition_of(&body, "Ready");
        assert_eq!(
            (&ready["status"], &ready["reason"]),
            (&json!("False"), &json!("LedgerUnavailable"))
        );
        assert!(body["status"].get("phase").is_none());
        let event = api.expect_event("spendguard").await;
        assert_eq!(event["type"], "Warning");
        let again = error_policy(parse(&pending), &error, shared);
        assert_eq!(again, Action::requeue(Duration::from_secs(2)));
    }
}
