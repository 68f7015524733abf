//! The ledger's batch planner: given the rows a batch locked and its commands in arrival order,
//! decide every command's outcome and the writes that make them durable.
//!
//! Group commit: the ledger runs many commands in one database transaction. The store locks every
//! row the batch touches (in a fixed order, so batches cannot deadlock), this module decides each
//! command against the in-memory copy sequentially — exactly as if they ran one by one — and the
//! store writes the [`Effects`] in a handful of set-based statements. Database constraints re-check
//! the money invariants on the result, so a bug here fails the batch instead of overspending.
//!
//! # Guarantees
//! - After every command, for every window: `reserved >= 0` and `committed + reserved <= limit`.
//! - A reservation is reserved once and resolved (committed, released or expired) at most once.
//! - Every state change emits exactly one audit event draft; a refused or replayed command emits
//!   nothing and writes nothing, with one exception: a ResolveApproval that finds its approval
//!   pending past its expiry is refused (`APPROVAL_EXPIRED`) and expires it in the same batch.
//! - An approval leaves `pending` at most once and moves no money.

use crate::audit::{EventDraft, canonical_sha256, format_time};
use crate::error::LedgerError;
use crate::lease::{
    AcquireLease, LeaseGrant, LeaseOutcome, LeaseState, RecordedAcquire, check_fencing,
};
use crate::money::{MoneyError, NanoUsd};
use crate::window::BudgetWindow;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

/// Most budgets one ReserveSet may span.
pub const RESERVE_SET_BUDGETS_MAX: usize = 8;

// === Commands ===

/// A fencing token presented with a mutation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fencing {
    /// Scope.
    pub scope_id: String,
    /// Epoch, >= 1 (validated before planning).
    pub epoch: u64,
}

/// The pricing snapshot a reservation was priced with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PricingRef {
    /// Version name.
    pub version: String,
    /// Lowercase hex sha256 of the snapshot.
    pub sha256_hex: String,
}

/// Why the caller reserved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionContext {
    /// Agent run.
    pub run_id: String,
    /// Workflow.
    pub workflow_id: String,
    /// LLM call.
    pub call_id: String,
    /// Provider.
    pub provider: String,
    /// Model.
    pub model: String,
    /// Contract version that decided.
    pub contract_version: String,
    /// Priced from a snapshot older than the contract accepts, which continues then (S22).
    /// Serialized only when true, so the fingerprints and events of other decisions are as
    /// they were before the field existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pricing_stale: bool,
    /// The approval a resumed call goes ahead under (S16; a ReserveSet checks it). Serialized
    /// only when set, like `pricing_stale`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<Uuid>,
}

/// Reserve `amount` against every budget in `budget_ids`, all or nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReserveSet {
    /// Tenant.
    pub tenant_id: String,
    /// Idempotency key, unique per tenant.
    pub idempotency_key: String,
    /// Distinct budgets, 1..=8, in request order.
    pub budget_ids: Vec<String>,
    /// Amount reserved against each budget.
    pub amount: NanoUsd,
    /// Fencing token. Only its scope is part of the fingerprint: the reservation belongs to the
    /// scope, so another scope's request with the same key conflicts; the epoch authorises the
    /// request and is not what is asked, so a retry after the sidecar re-acquired its lease (a
    /// restart) replays the reservation instead of conflicting. A stale epoch is still refused
    /// before any replay.
    #[serde(serialize_with = "scope_of")]
    pub fencing: Fencing,
    /// Lifetime of the reservation.
    pub ttl_ms: u32,
    /// Pricing snapshot.
    pub pricing: PricingRef,
    /// Decision context. Its `pricing_stale` marker is recorded but is not part of the
    /// fingerprint: it depends on when the sidecar decided, so a retry across the contract's
    /// pricing age limit is the same request.
    #[serde(serialize_with = "context_of")]
    pub context: DecisionContext,
    /// Whether this opens a credit or draws from one. Only opening a credit enters the
    /// fingerprint: a draw reserves the same call as an ordinary request, whichever credit funds
    /// it, so a retry through another credit (after a sidecar restart) or without one replays
    /// the call's reservation instead of reserving it twice; and an ordinary reservation's
    /// fingerprint is what it was before credits existed.
    #[serde(skip_serializing_if = "Credit::is_not_open")]
    pub credit: Credit,
}

/// How a ReserveSet relates to credits: money a sidecar reserves once and then admits calls
/// inside without waiting for the ledger (docs/design/credits.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Credit {
    /// An ordinary reservation, taken from the budgets' headroom.
    #[default]
    None,
    /// Opens a credit: reserved from the budgets' headroom, drawn from by later ReserveSets,
    /// never committed.
    Open,
    /// A call's reservation taken from this open credit (same tenant, scope and budgets)
    /// instead of the budgets' headroom.
    DrawFrom(Uuid),
}

impl Credit {
    /// Anything but opening a credit.
    pub fn is_not_open(&self) -> bool {
        *self != Self::Open
    }
}

/// The UUIDv5 of `(tenant_id, key)` in `namespace`: a retry finds its row by primary key, with no
/// second index lookup, and each kind of row has a namespace of its own.
fn keyed_id(namespace: &Uuid, tenant_id: &str, key: &str) -> Uuid {
    Uuid::new_v5(namespace, format!("{tenant_id}\n{key}").as_bytes())
}

/// A fencing token as it enters a fingerprint: its scope only.
fn scope_of<S: serde::Serializer>(fencing: &Fencing, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&fencing.scope_id)
}

impl DecisionContext {
    /// This context as it enters an idempotency fingerprint: without the `pricing_stale`
    /// marker, which depends on when the sidecar decided, not on what it asked; and without the
    /// approval id, which the resumed call's key already names (`<call id>/approved/<id>`), so
    /// a resumed reservation written before the field existed still replays.
    fn fingerprinted(&self) -> Self {
        Self {
            pricing_stale: false,
            approval_id: None,
            ..self.clone()
        }
    }
}

/// A decision context as it enters a fingerprint.
fn context_of<S: serde::Serializer>(
    context: &DecisionContext,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    context.fingerprinted().serialize(serializer)
}

/// An approval's context as it enters a fingerprint.
fn approval_context_of<S: serde::Serializer>(
    context: &ApprovalContext,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    ApprovalContext {
        decision: context.decision.fingerprinted(),
        ..context.clone()
    }
    .serialize(serializer)
}

/// Namespace of reservation ids (UUIDv5 over tenant and idempotency key).
const RESERVATION_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5b7e_2a4c_9d61_4f0e_8c3a_0d1e_6f2b_7a91);

/// The id of the reservation `(tenant_id, idempotency_key)` makes, which a sidecar admitting a
/// call from its credit answers before the ledger has recorded the draw.
pub fn reservation_id_for(tenant_id: &str, idempotency_key: &str) -> Uuid {
    keyed_id(&RESERVATION_ID_NAMESPACE, tenant_id, idempotency_key)
}

impl ReserveSet {
    /// The reservation's id, derived from `(tenant_id, idempotency_key)`: a retry finds its
    /// reservation by primary key, with no second index lookup.
    pub fn reservation_id(&self) -> Uuid {
        keyed_id(
            &RESERVATION_ID_NAMESPACE,
            &self.tenant_id,
            &self.idempotency_key,
        )
    }

    /// sha256 over the canonical JSON of every request field but the fencing epoch and the
    /// `pricing_stale` marker: the idempotency fingerprint.
    pub fn fingerprint(&self) -> String {
        canonical_sha256(self)
    }

    /// The fingerprint as ledgers before 2026-11-26 computed it, with the whole fencing token
    /// and `epoch` in it: reservations written then hold it, with the epoch they were made
    /// under. A retry that matches it with that row's epoch is the same request.
    pub fn fingerprint_before_2026_11_26(&self, epoch: u64) -> String {
        #[derive(Serialize)]
        struct WithEpoch<'a> {
            tenant_id: &'a str,
            idempotency_key: &'a str,
            budget_ids: &'a [String],
            amount: NanoUsd,
            fencing: Fencing,
            ttl_ms: u32,
            pricing: &'a PricingRef,
            #[serde(serialize_with = "context_of")]
            context: DecisionContext,
        }
        canonical_sha256(&WithEpoch {
            tenant_id: &self.tenant_id,
            idempotency_key: &self.idempotency_key,
            budget_ids: &self.budget_ids,
            amount: self.amount,
            fencing: Fencing {
                scope_id: self.fencing.scope_id.clone(),
                epoch,
            },
            ttl_ms: self.ttl_ms,
            pricing: &self.pricing,
            context: self.context.clone(),
        })
    }
}

/// Commit actual usage against a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Tenant.
    pub tenant_id: String,
    /// Reservation.
    pub reservation_id: Uuid,
    /// Provider-reported cost.
    pub actual: NanoUsd,
    /// Fencing token.
    pub fencing: Fencing,
}

/// Release a reservation unspent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Tenant.
    pub tenant_id: String,
    /// Reservation.
    pub reservation_id: Uuid,
    /// Fencing token.
    pub fencing: Fencing,
    /// Short reason for the audit trail.
    pub reason: String,
}

/// Create or update a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpsertTenant {
    /// Tenant.
    pub tenant_id: String,
    /// Human name.
    pub display_name: String,
}

/// Create or update a budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpsertBudget {
    /// Tenant.
    pub tenant_id: String,
    /// Budget.
    pub budget_id: String,
    /// The budget's definition.
    pub definition: BudgetRow,
    /// Only create it, or repeat its definition (the data path's run budgets): changing an
    /// existing budget is PERMISSION_DENIED.
    pub create_only: bool,
}

/// Register a pricing snapshot for a tenant: reservations must name a registered version and
/// hash (the operator registers each ContractBundle's PricingVersion).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterPricing {
    /// Tenant.
    pub tenant_id: String,
    /// Version and hash.
    pub pricing: PricingRef,
}

/// A (tenant, pricing version) pair.
pub type PricingKey = (String, String);

/// Longest time a human has to decide an approval: a week.
pub const APPROVAL_TTL_MS_MAX: u32 = 604_800_000;
/// Shortest approval TTL.
pub const APPROVAL_TTL_MS_MIN: u32 = 1_000;

/// The immutable decision context of an approval, stored as canonical JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalContext {
    /// Stable reason code of the decision (e.g. `SOFT_CAP_REACHED`).
    pub reason_code: String,
    /// Workload that asked.
    pub requested_by: String,
    /// Pricing snapshot the call was priced with.
    pub pricing: PricingRef,
    /// Hash of the contract bundle that decided (may be empty).
    pub bundle_sha256_hex: String,
    /// Call, run, workflow, provider, model and contract version.
    pub decision: DecisionContext,
}

/// Open a pending approval for a call that would cross a soft cap (S14).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreateApproval {
    /// Tenant.
    pub tenant_id: String,
    /// Idempotency key, unique per tenant (the sidecar's call id).
    pub idempotency_key: String,
    /// Budgets the call reserves against, 1..=8, distinct.
    pub budget_ids: Vec<String>,
    /// The budget whose soft cap would be crossed (one of `budget_ids`).
    pub budget_id: String,
    /// The call's worst-case amount.
    pub amount: NanoUsd,
    /// Fencing token. Not part of the fingerprint: it authorises the request, it is not what is
    /// asked, so a retry after the sidecar re-acquired its lease replays instead of conflicting.
    #[serde(skip)]
    pub fencing: Fencing,
    /// Time a human has to decide.
    pub ttl_ms: u32,
    /// Immutable decision context (its `pricing_stale` marker is not part of the fingerprint).
    #[serde(serialize_with = "approval_context_of")]
    pub context: ApprovalContext,
}

/// Namespace of approval ids (UUIDv5 over tenant and idempotency key); distinct from the
/// reservations' so one call id yields different reservation and approval ids.
const APPROVAL_ID_NAMESPACE: Uuid = Uuid::from_u128(0x9c41_7d2e_3b58_4a06_b1f9_62e0_d84c_15a3);

/// The id of the approval a tenant's CreateApproval with `idempotency_key` opens (or opened):
/// a client that lost the answer can look the approval up by the key it sent.
pub fn approval_id_for(tenant_id: &str, idempotency_key: &str) -> Uuid {
    keyed_id(&APPROVAL_ID_NAMESPACE, tenant_id, idempotency_key)
}

/// The idempotency key of a call's reservation once it resumes under `approval_id`: the call's
/// first reservation was released when it asked for approval, so the resumed one needs a key of
/// its own. The ledger accepts a reservation under an approval only with this key, so one human
/// decision backs one reservation: its id is UUIDv5 of the key, and every retry replays it. A
/// call id holds no `/`, so the key names one call and one approval. `approval_id` as the ledger
/// writes it (a hyphenated lower-case UUID).
pub fn resume_key(call_id: &str, approval_id: &str) -> String {
    format!("{call_id}/approved/{approval_id}")
}

impl CreateApproval {
    /// The approval's id, derived from `(tenant_id, idempotency_key)`.
    pub fn approval_id(&self) -> Uuid {
        approval_id_for(&self.tenant_id, &self.idempotency_key)
    }

    /// sha256 over the canonical JSON of every request field but the fencing token.
    pub fn fingerprint(&self) -> String {
        canonical_sha256(self)
    }
}

/// A human's decision on an approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalDecision {
    /// Let the call be retried (it makes a fresh ReserveSet).
    Approve,
    /// Refuse it.
    Deny,
}

impl ApprovalDecision {
    /// The state the decision leads to.
    pub const fn state(self) -> ApprovalState {
        match self {
            Self::Approve => ApprovalState::Approved,
            Self::Deny => ApprovalState::Denied,
        }
    }
}

/// Approve or deny a pending approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveApproval {
    /// Tenant.
    pub tenant_id: String,
    /// Approval.
    pub approval_id: Uuid,
    /// Decision.
    pub decision: ApprovalDecision,
    /// Approver identity (non-empty, validated before planning).
    pub approver: String,
    /// Free text for the audit trail.
    pub reason: String,
}

/// Lifecycle of an approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalState {
    /// Waiting for a human.
    Pending,
    /// Approved by a named approver.
    Approved,
    /// Denied by a named approver.
    Denied,
    /// Nobody decided in time (database clock).
    Expired,
    /// Withdrawn (no command sets this yet; the schema allows it).
    Cancelled,
}

impl ApprovalState {
    /// Database name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses the database name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "pending" => Some(Self::Pending),
            "approved" => Some(Self::Approved),
            "denied" => Some(Self::Denied),
            "expired" => Some(Self::Expired),
            "cancelled" => Some(Self::Cancelled),
            _ => None,
        }
    }
}

/// An approval as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRow {
    /// Id.
    pub id: Uuid,
    /// Tenant.
    pub tenant_id: String,
    /// Idempotency key.
    pub idempotency_key: String,
    /// Request fingerprint.
    pub fingerprint: String,
    /// Budgets of the call, in request order.
    pub budget_ids: Vec<String>,
    /// The budget whose soft cap would be crossed.
    pub budget_id: String,
    /// The call's worst-case amount.
    pub amount: NanoUsd,
    /// Immutable decision context.
    pub context: ApprovalContext,
    /// Scope that asked.
    pub fencing_scope_id: String,
    /// Epoch that asked.
    pub fencing_epoch: u64,
    /// Database time of creation.
    pub created_at: DateTime<Utc>,
    /// When it expires unless resolved.
    pub expires_at: DateTime<Utc>,
    /// Current state.
    pub state: ApprovalState,
    /// Approver (approved/denied).
    pub resolved_by: Option<String>,
    /// When it left `pending`.
    pub resolved_at: Option<DateTime<Utc>>,
    /// Approver's reason.
    pub resolution_reason: Option<String>,
}

/// Longest audit retention (the RetentionPolicy CRD's bound): ten years.
pub const RETENTION_DAYS_MAX: u32 = 3_650;

/// A tenant's retention policy (S19).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Days audit evidence is kept, 1..=[`RETENTION_DAYS_MAX`].
    pub audit_retention_days: u32,
    /// Days after which payloads are redacted, `<= audit_retention_days`; `None` = never earlier.
    pub redact_payloads_after_days: Option<u32>,
}

/// Set a tenant's retention policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpsertRetentionPolicy {
    /// Tenant.
    pub tenant_id: String,
    /// The policy (validated before planning).
    pub policy: RetentionPolicy,
}

/// Reserved tenant id under which the ledger writes audit events that belong to no customer
/// tenant (the evidence key registry, S7). UpsertTenant refuses this id, and no `tenants` row is
/// needed: `audit_outbox` (and the export chain) key events by tenant id without a foreign key.
pub const SYSTEM_TENANT_ID: &str = "spendguard-system";

/// A key of the evidence key registry (`signing_keys`), as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyRow {
    /// Algorithm name (`ed25519`, `ecdsa-p256-sha256`), validated before planning.
    pub algorithm: String,
    /// Canonical public key bytes, validated before planning.
    pub public_key: Vec<u8>,
    /// Start of validity.
    pub valid_from: DateTime<Utc>,
    /// End of validity; `None` is open-ended.
    pub valid_until: Option<DateTime<Utc>>,
    /// Revocation; set once, then only moved earlier.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Register a producer public key, or change its validity end or revocation (S7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterSigningKey {
    /// Key id.
    pub key_id: String,
    /// The desired row.
    pub key: SigningKeyRow,
}

/// Record, after the fact, a call the sidecar let through fail-open while the ledger was
/// unreachable (S22): its decision context and actual cost. The cost is booked as a flagged
/// overrun on the current window of every budget (nothing was reserved), so balances show it
/// and later reservations see less room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordFailOpen {
    /// Tenant.
    pub tenant_id: String,
    /// The decided call; the idempotency key.
    pub call_id: String,
    /// Budgets the call would have reserved against, 1..=8, distinct, in request order.
    pub budget_ids: Vec<String>,
    /// Provider-reported cost priced from `pricing`; zero when the call failed.
    pub actual: NanoUsd,
    /// Scope and epoch current in the sidecar when it decided. Part of the fingerprint (it is
    /// what is recorded), and never required to be current.
    pub fencing: Fencing,
    /// Pricing snapshot the cost was computed with.
    pub pricing: PricingRef,
    /// Hash of the contract bundle that decided (may be empty).
    pub contract_sha256_hex: String,
    /// When the sidecar decided (its clock).
    pub decided_at: DateTime<Utc>,
    /// Run, workflow, call, provider, model and contract version.
    pub context: DecisionContext,
}

/// Namespace of fail-open record ids (UUIDv5 over tenant and call id); distinct from the
/// reservations' and approvals', so a call's fail-open record never collides with either.
const FAIL_OPEN_ID_NAMESPACE: Uuid = Uuid::from_u128(0x2f8d_61c4_0a7b_4e93_9d15_c3e8_74b0_5a6f);

impl RecordFailOpen {
    /// The record's id, derived from `(tenant_id, call_id)`.
    pub fn record_id(&self) -> Uuid {
        keyed_id(&FAIL_OPEN_ID_NAMESPACE, &self.tenant_id, &self.call_id)
    }

    /// sha256 over the canonical JSON of every request field: the idempotency fingerprint.
    pub fn fingerprint(&self) -> String {
        canonical_sha256(self)
    }
}

/// A fail-open record as stored (immutable once written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailOpenRow {
    /// Id.
    pub id: Uuid,
    /// Tenant.
    pub tenant_id: String,
    /// Call id.
    pub call_id: String,
    /// Request fingerprint.
    pub fingerprint: String,
    /// Windows charged (current window of each budget when recorded), in request order.
    pub windows: Vec<WindowKey>,
    /// Actual cost, booked as overrun on every window.
    pub actual: NanoUsd,
    /// Scope presented.
    pub fencing_scope_id: String,
    /// Epoch presented.
    pub fencing_epoch: u64,
    /// The scope's epoch when recorded.
    pub epoch_current: u64,
    /// Sidecar time of the decision.
    pub decided_at: DateTime<Utc>,
    /// Database time of the record.
    pub recorded_at: DateTime<Utc>,
}

impl FailOpenRow {
    /// Whether the presented epoch was older than the scope's when recorded.
    pub fn epoch_stale(&self) -> bool {
        self.fencing_epoch < self.epoch_current
    }
}

/// Record, after the fact, STOP decisions a sidecar answered (S22: every decision outcome is
/// auditable or explicitly marked as not published). Moves no money.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordStops {
    /// Tenant.
    pub tenant_id: String,
    /// The deciding sidecar's fencing scope (the tenant's).
    pub fencing_scope_id: String,
    /// Pricing snapshot the sidecar decided with, recorded as presented.
    pub pricing: PricingRef,
    /// Hash of the contract bundle that decided (may be empty).
    pub contract_sha256_hex: String,
    /// 1..=[`STOP_RECORDS_MAX`] records with distinct ids.
    pub stops: Vec<StopRecord>,
}

/// Prefix of a run's own budget id (`runs/<run id>`): the budget a sidecar creates for a
/// contract's per-run limit, and the only kind the ledger's data path lets it create.
pub const RUN_BUDGET_PREFIX: &str = "runs/";

/// Most records one RecordStops carries.
pub const STOP_RECORDS_MAX: usize = 256;

/// Longest free-text field of a request (decision context values, display names, reasons).
pub const TEXT_LEN_MAX: usize = 256;

/// Longest detail of a stop record.
pub const STOP_DETAIL_LEN_MAX: usize = 1_024;

/// One STOP decision, or a summary of several that were not published one by one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StopRecord {
    /// Chosen by the sidecar when it decided; the idempotency key.
    pub record_id: Uuid,
    /// The refused call; `None` for a summary.
    pub call_id: Option<String>,
    /// Stable reason code.
    pub reason: String,
    /// Human detail.
    pub detail: String,
    /// The budget that stopped the call, if a budget did.
    pub budget_id: Option<String>,
    /// The call's priced worst case (zero when it was not priced).
    pub worst_case: NanoUsd,
    /// First decision this record stands for (sidecar clock).
    pub first_decided_at: DateTime<Utc>,
    /// Last decision this record stands for (equal to the first for one call).
    pub last_decided_at: DateTime<Utc>,
    /// How many STOPs it stands for (1 for a call).
    pub count: u64,
    /// The epoch the sidecar held when it decided, if it held one.
    pub fencing_epoch: Option<u64>,
    /// Run, workflow, call, provider, model and contract version (default for a summary).
    pub context: DecisionContext,
}

/// A stop record as stored (immutable once written): what a retry is compared with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopRow {
    /// Id.
    pub id: Uuid,
    /// Tenant.
    pub tenant_id: String,
    /// The refused call (`None` for a summary).
    pub call_id: Option<String>,
    /// Stable reason code.
    pub reason: String,
    /// How many STOPs it stands for.
    pub count: u64,
    /// sha256 over the canonical JSON of the record and the request fields it was sent with.
    pub fingerprint: String,
}

impl RecordStops {
    /// The idempotency fingerprint of `stop` as sent in this request: the record with the
    /// request-level fields it is recorded with.
    pub fn fingerprint(&self, stop: &StopRecord) -> String {
        #[derive(Serialize)]
        struct Fingerprinted<'a> {
            tenant_id: &'a str,
            fencing_scope_id: &'a str,
            pricing: &'a PricingRef,
            contract_sha256_hex: &'a str,
            stop: &'a StopRecord,
        }
        canonical_sha256(&Fingerprinted {
            tenant_id: &self.tenant_id,
            fencing_scope_id: &self.fencing_scope_id,
            pricing: &self.pricing,
            contract_sha256_hex: &self.contract_sha256_hex,
            stop,
        })
    }
}

/// One mutation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // Commands live briefly in a bounded queue; boxing buys nothing.
pub enum Command {
    /// See [`ReserveSet`].
    ReserveSet(ReserveSet),
    /// See [`Commit`].
    Commit(Commit),
    /// See [`Release`].
    Release(Release),
    /// Expire up to this many reservations whose TTL passed.
    SweepExpired(u32),
    /// See [`AcquireLease`].
    AcquireLease(AcquireLease),
    /// See [`UpsertTenant`].
    UpsertTenant(UpsertTenant),
    /// See [`UpsertBudget`].
    UpsertBudget(UpsertBudget),
    /// See [`RegisterPricing`].
    RegisterPricing(RegisterPricing),
    /// See [`RegisterSigningKey`].
    RegisterSigningKey(RegisterSigningKey),
    /// See [`CreateApproval`].
    CreateApproval(CreateApproval),
    /// See [`ResolveApproval`].
    ResolveApproval(ResolveApproval),
    /// See [`UpsertRetentionPolicy`].
    UpsertRetentionPolicy(UpsertRetentionPolicy),
    /// See [`RecordFailOpen`].
    RecordFailOpen(RecordFailOpen),
    /// See [`RecordStops`].
    RecordStops(RecordStops),
}

// === Rows ===

/// A budget's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BudgetKey {
    /// Tenant.
    pub tenant_id: String,
    /// Budget.
    pub budget_id: String,
}

/// One window of one budget.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WindowKey {
    /// Budget.
    pub budget: BudgetKey,
    /// Window start.
    pub start: DateTime<Utc>,
}

/// A budget's definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetRow {
    /// Hard cap per window.
    pub limit: NanoUsd,
    /// Approval threshold, if any (<= limit).
    pub soft_cap: Option<NanoUsd>,
    /// Renewal.
    pub window: BudgetWindow,
}

/// Money of one budget window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowRow {
    /// Effective limit of this window.
    pub limit: NanoUsd,
    /// Open reservations.
    pub reserved: NanoUsd,
    /// Committed usage covered by reservations.
    pub committed: NanoUsd,
    /// Usage above reservations.
    pub overrun: NanoUsd,
}

impl WindowRow {
    /// This window under its budget's limit `budget_limit`, which may have been lowered since
    /// the window took its limit: brought down to it, but never below what the window holds
    /// (committed and reserved), as lowering a limit does (`upsert_budget`). A window clamped at
    /// its usage by a lowered limit would otherwise hand out again what its reservations
    /// release afterwards.
    #[must_use]
    pub fn under_budget_limit(self, budget_limit: NanoUsd) -> Self {
        let held = self.committed.get().saturating_add(self.reserved.get());
        let floor = budget_limit.get().max(held);
        match NanoUsd::new(floor) {
            Ok(limit) if limit < self.limit => Self { limit, ..self },
            _ => self,
        }
    }

    /// What a new reservation may still take.
    pub fn remaining(&self) -> NanoUsd {
        self.limit
            .saturating_sub(self.committed)
            .saturating_sub(self.reserved)
            .saturating_sub(self.overrun)
    }
}

/// Lifecycle of a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationState {
    /// Open.
    Reserved,
    /// Resolved by Commit.
    Committed,
    /// Resolved by Release.
    Released,
    /// Resolved by the TTL sweep.
    Expired,
}

impl ReservationState {
    /// Database name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "reserved",
            Self::Committed => "committed",
            Self::Released => "released",
            Self::Expired => "expired",
        }
    }

    /// Parses the database name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "reserved" => Some(Self::Reserved),
            "committed" => Some(Self::Committed),
            "released" => Some(Self::Released),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }
}

/// How a reservation was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution {
    /// Final state.
    pub state: ReservationState,
    /// Actual usage (Commit only).
    pub actual: NanoUsd,
    /// Part covered by the reservation.
    pub committed: NanoUsd,
    /// Part returned to the budgets.
    pub released: NanoUsd,
    /// Part above the reservation.
    pub overrun: NanoUsd,
    /// Fencing epoch of the resolving call (0 for the TTL sweep).
    pub epoch: u64,
}

/// A reservation as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationRow {
    /// Id.
    pub id: Uuid,
    /// Tenant.
    pub tenant_id: String,
    /// Idempotency key.
    pub idempotency_key: String,
    /// Request fingerprint.
    pub fingerprint: String,
    /// Windows charged, in request order.
    pub windows: Vec<WindowKey>,
    /// Amount per window.
    pub amount: NanoUsd,
    /// Scope that reserved.
    pub fencing_scope_id: String,
    /// Epoch that reserved.
    pub fencing_epoch: u64,
    /// When it lapses.
    pub expires_at: DateTime<Utc>,
    /// Resolution, once resolved.
    pub resolution: Option<Resolution>,
    /// A credit (drawn from, never committed).
    pub is_credit: bool,
    /// For a credit: how much calls have drawn from it so far.
    pub drawn: NanoUsd,
    /// For a call's reservation drawn from a credit: that credit.
    pub drawn_from: Option<Uuid>,
}

impl ReservationRow {
    /// Current state.
    pub fn state(&self) -> ReservationState {
        self.resolution
            .map_or(ReservationState::Reserved, |r| r.state)
    }

    /// What the reservation holds of the budgets' reserved money while open: its amount, less
    /// what calls drew from it if it is a credit (that money is held by their reservations).
    pub fn undrawn(&self) -> NanoUsd {
        self.amount.saturating_sub(self.drawn)
    }
}

/// Everything a batch locked, as of the transaction's database time `now`.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Database time of the transaction.
    pub now: DateTime<Utc>,
    /// Tenants referenced, with display names.
    pub tenants: BTreeMap<String, String>,
    /// Budgets referenced.
    pub budgets: BTreeMap<BudgetKey, BudgetRow>,
    /// Windows referenced that exist.
    pub windows: BTreeMap<WindowKey, WindowRow>,
    /// Fencing scopes referenced that exist.
    pub scopes: BTreeMap<String, LeaseState>,
    /// Acquires recorded with the request ids the batch's acquires carry, by (scope, request id).
    pub lease_requests: BTreeMap<(String, String), RecordedAcquire>,
    /// Reservations referenced by id or idempotency key, and sweep candidates.
    pub reservations: BTreeMap<Uuid, ReservationRow>,
    /// Open reservations past their TTL, oldest first (locked for the sweep).
    pub expired_candidates: Vec<Uuid>,
    /// Registered pricing hashes referenced.
    pub pricing: BTreeMap<PricingKey, String>,
    /// Signing keys referenced that exist.
    pub signing_keys: BTreeMap<String, SigningKeyRow>,
    /// Approvals referenced by id, and sweep candidates.
    pub approvals: BTreeMap<Uuid, ApprovalRow>,
    /// Pending approvals past their expiry, oldest first (locked for the sweep).
    pub expired_approval_candidates: Vec<Uuid>,
    /// Retention policies referenced that exist, with their last update.
    pub retention_policies: BTreeMap<String, (RetentionPolicy, DateTime<Utc>)>,
    /// Fail-open records referenced by id that exist.
    pub fail_open_records: BTreeMap<Uuid, FailOpenRow>,
    /// Stop records referenced by id that exist.
    pub stop_records: BTreeMap<Uuid, StopRow>,
}

/// What the store must load for a batch, derived from its commands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs {
    /// Tenants.
    pub tenant_ids: BTreeSet<String>,
    /// Budgets.
    pub budgets: BTreeSet<BudgetKey>,
    /// Scopes.
    pub scope_ids: BTreeSet<String>,
    /// Acquires to look up by (scope, request id).
    pub lease_requests: BTreeSet<(String, String)>,
    /// Reservations by id (a ReserveSet's id is derived from its idempotency key).
    pub reservation_ids: BTreeSet<Uuid>,
    /// Sweep candidates to lock.
    pub sweep_max: u32,
    /// Pricing registrations.
    pub pricing: BTreeSet<PricingKey>,
    /// Signing keys.
    pub signing_key_ids: BTreeSet<String>,
    /// Approvals by id (a CreateApproval's id is derived from its idempotency key).
    pub approval_ids: BTreeSet<Uuid>,
    /// Tenants whose retention policy a command sets.
    pub retention_tenant_ids: BTreeSet<String>,
    /// Fail-open records by id (derived from tenant and call id).
    pub fail_open_ids: BTreeSet<Uuid>,
    /// Stop records by id.
    pub stop_ids: BTreeSet<Uuid>,
}

impl Needs {
    /// Collects the keys `commands` reference.
    pub fn of(commands: &[Command]) -> Self {
        let mut needs = Self::default();
        for command in commands {
            match command {
                Command::ReserveSet(r) => {
                    needs.tenant_ids.insert(r.tenant_id.clone());
                    needs
                        .pricing
                        .insert((r.tenant_id.clone(), r.pricing.version.clone()));
                    needs.scope_ids.insert(r.fencing.scope_id.clone());
                    needs.reservation_ids.insert(r.reservation_id());
                    if let Credit::DrawFrom(credit) = r.credit {
                        needs.reservation_ids.insert(credit);
                    }
                    if let Some(approval) = r.context.approval_id {
                        needs.approval_ids.insert(approval);
                    }
                    for budget_id in &r.budget_ids {
                        needs.budgets.insert(BudgetKey {
                            tenant_id: r.tenant_id.clone(),
                            budget_id: budget_id.clone(),
                        });
                    }
                }
                Command::Commit(c) => {
                    needs.scope_ids.insert(c.fencing.scope_id.clone());
                    needs.reservation_ids.insert(c.reservation_id);
                }
                Command::Release(r) => {
                    needs.scope_ids.insert(r.fencing.scope_id.clone());
                    needs.reservation_ids.insert(r.reservation_id);
                }
                Command::SweepExpired(max) => {
                    needs.sweep_max = needs.sweep_max.saturating_add(*max);
                }
                Command::AcquireLease(a) => {
                    needs.tenant_ids.insert(a.tenant_id.clone());
                    needs.scope_ids.insert(a.scope_id.clone());
                    if let Some(request_id) = &a.request_id {
                        needs
                            .lease_requests
                            .insert((a.scope_id.clone(), request_id.clone()));
                    }
                }
                Command::UpsertTenant(t) => {
                    needs.tenant_ids.insert(t.tenant_id.clone());
                }
                Command::RegisterPricing(p) => {
                    needs.tenant_ids.insert(p.tenant_id.clone());
                    needs
                        .pricing
                        .insert((p.tenant_id.clone(), p.pricing.version.clone()));
                }
                Command::RegisterSigningKey(k) => {
                    needs.signing_key_ids.insert(k.key_id.clone());
                }
                Command::CreateApproval(a) => {
                    needs.tenant_ids.insert(a.tenant_id.clone());
                    needs.scope_ids.insert(a.fencing.scope_id.clone());
                    needs.approval_ids.insert(a.approval_id());
                    for budget_id in &a.budget_ids {
                        needs.budgets.insert(BudgetKey {
                            tenant_id: a.tenant_id.clone(),
                            budget_id: budget_id.clone(),
                        });
                    }
                }
                Command::ResolveApproval(r) => {
                    needs.approval_ids.insert(r.approval_id);
                }
                Command::UpsertRetentionPolicy(p) => {
                    needs.tenant_ids.insert(p.tenant_id.clone());
                    needs.retention_tenant_ids.insert(p.tenant_id.clone());
                }
                Command::RecordFailOpen(f) => {
                    needs.tenant_ids.insert(f.tenant_id.clone());
                    needs
                        .pricing
                        .insert((f.tenant_id.clone(), f.pricing.version.clone()));
                    needs.scope_ids.insert(f.fencing.scope_id.clone());
                    needs.fail_open_ids.insert(f.record_id());
                    for budget_id in &f.budget_ids {
                        needs.budgets.insert(BudgetKey {
                            tenant_id: f.tenant_id.clone(),
                            budget_id: budget_id.clone(),
                        });
                    }
                }
                Command::RecordStops(r) => {
                    needs.tenant_ids.insert(r.tenant_id.clone());
                    needs.scope_ids.insert(r.fencing_scope_id.clone());
                    needs
                        .stop_ids
                        .extend(r.stops.iter().map(|stop| stop.record_id));
                }
                Command::UpsertBudget(b) => {
                    needs.tenant_ids.insert(b.tenant_id.clone());
                    needs.budgets.insert(BudgetKey {
                        tenant_id: b.tenant_id.clone(),
                        budget_id: b.budget_id.clone(),
                    });
                }
            }
        }
        needs
    }
}

/// The windows a batch may touch, once budgets and reservations are loaded: the current window of
/// every referenced budget (under its stored and, for upserts, its new window kind) and every
/// window of every loaded reservation.
pub fn windows_needed(commands: &[Command], snapshot: &Snapshot) -> BTreeSet<WindowKey> {
    let now = snapshot.now;
    let mut keys = BTreeSet::new();
    for (key, budget) in &snapshot.budgets {
        keys.insert(WindowKey {
            budget: key.clone(),
            start: budget.window.start_containing(now),
        });
    }
    for command in commands {
        if let Command::UpsertBudget(b) = command {
            let budget = BudgetKey {
                tenant_id: b.tenant_id.clone(),
                budget_id: b.budget_id.clone(),
            };
            keys.insert(WindowKey {
                budget,
                start: b.definition.window.start_containing(now),
            });
        }
    }
    for reservation in snapshot.reservations.values() {
        keys.extend(reservation.windows.iter().cloned());
    }
    keys
}

// === Outcomes and effects ===

/// Balance of one budget's window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    /// Budget.
    pub budget_id: String,
    /// Renewal kind.
    pub window: BudgetWindow,
    /// Window start.
    pub window_start: DateTime<Utc>,
    /// Budget soft cap.
    pub soft_cap: Option<NanoUsd>,
    /// Money.
    pub money: WindowRow,
}

/// The result of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// ReserveSet succeeded (or replayed).
    Reserved {
        /// Id.
        reservation_id: Uuid,
        /// Amount per budget.
        amount: NanoUsd,
        /// Expiry.
        expires_at: DateTime<Utc>,
        /// Balances after the reservation, in request order.
        balances: Vec<Balance>,
        /// Where the reservation stands now: `Reserved` unless a replay finds it resolved, in
        /// which case nothing may be spent under it any more.
        state: ReservationState,
        /// For a credit, or a reservation drawn from one: what the credit has left to draw.
        credit_remaining: Option<NanoUsd>,
        /// A retry of an earlier identical request.
        replayed: bool,
    },
    /// ReserveSet refused for lack of headroom; nothing written.
    Denied {
        /// First budget in request order without headroom.
        budget_id: String,
        /// Its remaining headroom.
        remaining: NanoUsd,
    },
    /// Commit succeeded (or replayed).
    Committed {
        /// Id.
        reservation_id: Uuid,
        /// Its resolution.
        resolution: Resolution,
        /// Replay.
        replayed: bool,
    },
    /// Release succeeded (or replayed).
    Released {
        /// Id.
        reservation_id: Uuid,
        /// Amount returned.
        released: NanoUsd,
        /// Replay.
        replayed: bool,
    },
    /// Sweep expired this many reservations and approvals.
    Swept {
        /// Reservations expired.
        reservations: u32,
        /// Pending approvals expired.
        approvals: u32,
    },
    /// Retention policy set (or already identical).
    RetentionPolicyUpserted {
        /// The tenant had no policy before.
        created: bool,
        /// Anything written.
        changed: bool,
        /// The policy now.
        policy: RetentionPolicy,
        /// When it was last changed.
        updated_at: DateTime<Utc>,
    },
    /// CreateApproval or ResolveApproval succeeded (or replayed).
    Approval {
        /// The approval after the command (boxed: the largest outcome by far).
        approval: Box<ApprovalRow>,
        /// A retry of an earlier identical request (or the same decision again).
        replayed: bool,
    },
    /// RecordFailOpen succeeded (or replayed).
    FailOpenRecorded {
        /// The record (as first written, for a replay).
        record: Box<FailOpenRow>,
        /// Current-window balances of its budgets, in request order.
        balances: Vec<Balance>,
        /// A retry of an earlier identical request.
        replayed: bool,
    },
    /// RecordStops succeeded.
    StopsRecorded {
        /// Records written now.
        recorded: u32,
        /// Records an earlier identical request wrote.
        replayed: u32,
    },
    /// Lease granted.
    Lease {
        /// The grant (a replay's is the first answer, as it was then).
        grant: LeaseGrant,
        /// Whether this answers a retry of an acquire with the same request id.
        replayed: bool,
    },
    /// Tenant upserted.
    TenantUpserted {
        /// Newly created.
        created: bool,
    },
    /// Pricing registered.
    PricingRegistered {
        /// Newly registered.
        created: bool,
    },
    /// Signing key registered or updated.
    SigningKeyRegistered {
        /// Newly registered.
        created: bool,
        /// Anything written (false for an identical repeat).
        changed: bool,
    },
    /// Budget upserted.
    BudgetUpserted {
        /// Newly created.
        created: bool,
        /// Current window after the change.
        balance: Balance,
    },
}

/// Kinds of journal entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A window opened with its limit.
    WindowOpen,
    /// A limit change.
    LimitSet,
    /// Money reserved.
    Reserve,
    /// A reservation committed.
    Commit,
    /// Usage above a reservation (flagged; never dropped).
    Overrun,
    /// A reservation released.
    Release,
    /// A reservation expired.
    Expire,
}

impl EntryKind {
    /// Database name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::WindowOpen => "window_open",
            Self::LimitSet => "limit_set",
            Self::Reserve => "reserve",
            Self::Commit => "commit",
            Self::Overrun => "overrun",
            Self::Release => "release",
            Self::Expire => "expire",
        }
    }
}

/// One append-only journal entry. Window balances are the sums of their entries' deltas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    /// Window.
    pub window: WindowKey,
    /// Reservation, when the entry moves reserved money.
    pub reservation_id: Option<Uuid>,
    /// Kind.
    pub kind: EntryKind,
    /// Change of limit.
    pub limit_delta: i64,
    /// Change of reserved.
    pub reserved_delta: i64,
    /// Change of committed.
    pub committed_delta: i64,
    /// Change of overrun.
    pub overrun_delta: i64,
}

/// A fencing transition for the scope history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseEvent {
    /// Scope.
    pub scope_id: String,
    /// Grant.
    pub grant: LeaseGrant,
    /// The request id the acquire carried, with its fingerprint.
    pub request: Option<(String, String)>,
}

/// Writes that make a batch's outcomes durable, in the order the store applies them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effects {
    /// Tenants to insert or update.
    pub tenants: BTreeMap<String, String>,
    /// Budgets to insert or update.
    pub budgets: BTreeMap<BudgetKey, BudgetRow>,
    /// Pricing registrations to insert.
    pub pricing: BTreeMap<PricingKey, String>,
    /// Signing keys to insert or update (final state).
    pub signing_keys: BTreeMap<String, SigningKeyRow>,
    /// Windows to create (with zero money; their limit arrives as a WindowOpen entry).
    pub new_windows: BTreeSet<WindowKey>,
    /// Final lease state of every changed scope.
    pub leases: BTreeMap<String, LeaseState>,
    /// Scope history rows.
    pub lease_events: Vec<LeaseEvent>,
    /// Reservations to insert, already resolved if this batch resolved them.
    pub new_reservations: Vec<ReservationRow>,
    /// Existing reservations resolved.
    pub resolutions: Vec<(Uuid, Resolution)>,
    /// Usage committed after a reservation had expired in an earlier batch: the expired row's
    /// actual and overrun (both that amount) and the committing epoch as its resolved epoch
    /// (see `Planner::commit_late`).
    pub late_usage: Vec<(Uuid, NanoUsd, u64)>,
    /// Credits drawn from, with their new drawn total (written with their resolution when the
    /// batch also resolves them).
    pub credit_draws: BTreeMap<Uuid, NanoUsd>,
    /// Journal entries.
    pub entries: Vec<JournalEntry>,
    /// Approvals to insert (ids), a subset of `approvals`.
    pub new_approval_ids: BTreeSet<Uuid>,
    /// Final state of every approval created or resolved by the batch.
    pub approvals: BTreeMap<Uuid, ApprovalRow>,
    /// Reservations made under an approval, as (approval, reservation): one per approval, which
    /// the database holds too (`approval_uses`).
    pub approval_uses: Vec<(Uuid, Uuid)>,
    /// Retention policies to insert or update (final state).
    pub retention_policies: BTreeMap<String, RetentionPolicy>,
    /// Fail-open records to insert (written before the journal entries that name them).
    pub fail_open_records: Vec<FailOpenRow>,
    /// Stop records to insert.
    pub stop_records: Vec<StopRow>,
    /// Audit events, one per state change.
    pub events: Vec<EventDraft>,
}

impl Effects {
    /// Whether the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Whether the batch only moves money: reservations, resolutions, credits' drawn totals,
    /// journal and events (what the ledger's cached path writes). Destructured so that a new
    /// kind of effect must decide.
    pub fn only_moves_money(&self) -> bool {
        let Self {
            tenants,
            budgets,
            pricing,
            signing_keys,
            new_windows,
            leases,
            lease_events,
            new_reservations: _,
            resolutions: _,
            late_usage,
            credit_draws: _,
            entries: _,
            new_approval_ids,
            approvals,
            approval_uses,
            retention_policies,
            fail_open_records,
            stop_records,
            events: _,
        } = self;
        tenants.is_empty()
            && late_usage.is_empty()
            && budgets.is_empty()
            && pricing.is_empty()
            && signing_keys.is_empty()
            && new_windows.is_empty()
            && leases.is_empty()
            && lease_events.is_empty()
            && new_approval_ids.is_empty()
            && approvals.is_empty()
            && approval_uses.is_empty()
            && retention_policies.is_empty()
            && fail_open_records.is_empty()
            && stop_records.is_empty()
    }
}

// === Planning ===

/// Decides every command in order against `snapshot`.
///
/// # Assumptions
/// The store loaded every row [`Needs::of`] and [`windows_needed`] name, locked, in one
/// transaction whose clock reads `snapshot.now`.
pub fn plan_batch(
    snapshot: Snapshot,
    commands: &[Command],
) -> (Vec<Result<Outcome, LedgerError>>, Effects) {
    let (outcomes, effects, _) = plan_batch_keeping_state(snapshot, commands);
    (outcomes, effects)
}

/// [`plan_batch`], also returning the state after the batch: what the rows will hold once its
/// effects are committed (the ledger caches it to plan the next batch without reading them).
pub fn plan_batch_keeping_state(
    snapshot: Snapshot,
    commands: &[Command],
) -> (Vec<Result<Outcome, LedgerError>>, Effects, Snapshot) {
    let mut planner = Planner {
        state: snapshot,
        effects: Effects::default(),
    };
    let outcomes = commands.iter().map(|c| planner.apply(c)).collect();
    (outcomes, planner.effects, planner.state)
}

struct Planner {
    state: Snapshot,
    effects: Effects,
}

fn money_error(field: &'static str) -> impl Fn(MoneyError) -> LedgerError {
    move |source| LedgerError::AmountInvalid { field, source }
}

fn delta(amount: NanoUsd) -> i64 {
    amount.get()
}

fn negative(amount: NanoUsd) -> i64 {
    // Amounts are bounded by AMOUNT_MAX_NANO_USD, so negation cannot overflow.
    amount.get().saturating_neg()
}

impl Planner {
    fn apply(&mut self, command: &Command) -> Result<Outcome, LedgerError> {
        match command {
            Command::ReserveSet(r) => self.reserve_set(r),
            Command::Commit(c) => self.commit(c),
            Command::Release(r) => self.release(r),
            Command::SweepExpired(max) => Ok(self.sweep(*max)),
            Command::CreateApproval(a) => self.create_approval(a),
            Command::ResolveApproval(r) => self.resolve_approval(r),
            Command::UpsertRetentionPolicy(p) => self.upsert_retention_policy(p),
            Command::RecordFailOpen(f) => self.record_fail_open(f),
            Command::RecordStops(r) => self.record_stops(r),
            Command::AcquireLease(a) => self.acquire_lease(a),
            Command::UpsertTenant(t) => Ok(self.upsert_tenant(t)),
            Command::UpsertBudget(b) => self.upsert_budget(b),
            Command::RegisterPricing(p) => self.register_pricing(p),
            Command::RegisterSigningKey(k) => self.register_signing_key(k),
        }
    }

    fn require_tenant(&self, tenant_id: &str) -> Result<(), LedgerError> {
        if self.state.tenants.contains_key(tenant_id) {
            Ok(())
        } else {
            Err(LedgerError::TenantNotFound(tenant_id.to_owned()))
        }
    }

    /// The window's money, or a fresh window at the budget's limit if it does not exist yet.
    fn window(&self, key: &WindowKey) -> WindowRow {
        self.state
            .windows
            .get(key)
            .copied()
            .unwrap_or_else(|| WindowRow {
                limit: self
                    .state
                    .budgets
                    .get(&key.budget)
                    .map_or(NanoUsd::ZERO, |b| b.limit),
                ..WindowRow::default()
            })
    }

    /// A current window's money under its budget's limit ([`WindowRow::under_budget_limit`]).
    fn current_window(&self, key: &WindowKey) -> WindowRow {
        let row = self.window(key);
        match self.state.budgets.get(&key.budget) {
            Some(budget) => row.under_budget_limit(budget.limit),
            None => row,
        }
    }

    /// Creates the window (journaling its limit) if this batch is its first use.
    fn open_window(&mut self, key: &WindowKey) {
        if self.state.windows.contains_key(key) {
            return;
        }
        let row = self.window(key);
        self.state.windows.insert(key.clone(), row);
        self.effects.new_windows.insert(key.clone());
        self.journal(
            key,
            None,
            EntryKind::WindowOpen,
            [delta(row.limit), 0, 0, 0],
        );
    }

    /// Appends an entry and applies its deltas `[limit, reserved, committed, overrun]`.
    fn journal(
        &mut self,
        key: &WindowKey,
        reservation_id: Option<Uuid>,
        kind: EntryKind,
        d: [i64; 4],
    ) {
        self.effects.entries.push(JournalEntry {
            window: key.clone(),
            reservation_id,
            kind,
            limit_delta: d[0],
            reserved_delta: d[1],
            committed_delta: d[2],
            overrun_delta: d[3],
        });
        if kind == EntryKind::WindowOpen {
            return; // The row already holds its limit.
        }
        let row = self.state.windows.entry(key.clone()).or_default();
        let apply = |v: NanoUsd, d: i64| NanoUsd::new(v.get().saturating_add(d)).unwrap_or(v);
        row.limit = apply(row.limit, d[0]);
        row.reserved = apply(row.reserved, d[1]);
        row.committed = apply(row.committed, d[2]);
        row.overrun = apply(row.overrun, d[3]);
        debug_assert!(row.committed.get().saturating_add(row.reserved.get()) <= row.limit.get());
    }

    /// A window's balance as GetBalances shows it: the current window under its budget's limit
    /// ([`Planner::current_window`]), an older one (a replayed reservation's) as it stands.
    fn balance(&self, key: &WindowKey) -> Balance {
        let budget = self.state.budgets.get(&key.budget);
        let current =
            budget.is_some_and(|b| b.window.start_containing(self.state.now) == key.start);
        Balance {
            budget_id: key.budget.budget_id.clone(),
            window: budget.map_or(BudgetWindow::Lifetime, |b| b.window),
            window_start: key.start,
            soft_cap: budget.and_then(|b| b.soft_cap),
            money: if current {
                self.current_window(key)
            } else {
                self.window(key)
            },
        }
    }

    fn event(&mut self, tenant_id: &str, event_type: &'static str, data: serde_json::Value) {
        self.effects.events.push(EventDraft {
            tenant_id: tenant_id.to_owned(),
            event_type,
            data,
        });
    }

    fn reserve_set(&mut self, r: &ReserveSet) -> Result<Outcome, LedgerError> {
        self.require_tenant(&r.tenant_id)?;
        let scope = self.state.scopes.get(&r.fencing.scope_id);
        check_fencing(
            &r.fencing.scope_id,
            &r.tenant_id,
            r.fencing.epoch,
            scope,
            Some(self.state.now),
        )?;
        let fingerprint = r.fingerprint();
        let reservation_id = r.reservation_id();
        if let Some(existing) = self.state.reservations.get(&reservation_id) {
            if existing.tenant_id != r.tenant_id || existing.idempotency_key != r.idempotency_key {
                // A UUIDv5 collision: astronomically unlikely, refused rather than merged.
                return Err(LedgerError::IdempotencyConflict(r.idempotency_key.clone()));
            }
            // Rows written before 2026-11-26 hold the old form; no credit existed then.
            let old_form = r.credit != Credit::Open
                && existing.fingerprint == r.fingerprint_before_2026_11_26(existing.fencing_epoch);
            if existing.fingerprint != fingerprint && !old_form {
                return Err(LedgerError::IdempotencyConflict(r.idempotency_key.clone()));
            }
            return Ok(Outcome::Reserved {
                reservation_id: existing.id,
                amount: existing.amount,
                expires_at: existing.expires_at,
                balances: existing.windows.iter().map(|w| self.balance(w)).collect(),
                // Past its expiry it is spent, whether or not the sweep has reached it yet: a
                // Commit is booked late, all of it an overrun (`commit_late`).
                state: match existing.state() {
                    ReservationState::Reserved if existing.expires_at <= self.state.now => {
                        ReservationState::Expired
                    }
                    state => state,
                },
                credit_remaining: self.credit_remaining(existing),
                replayed: true,
            });
        }
        let registered = self
            .state
            .pricing
            .get(&(r.tenant_id.clone(), r.pricing.version.clone()));
        if registered != Some(&r.pricing.sha256_hex) {
            return Err(LedgerError::PricingUnknown {
                tenant_id: r.tenant_id.clone(),
                version: r.pricing.version.clone(),
                sha256_hex: r.pricing.sha256_hex.clone(),
            });
        }
        if let Some(approval) = r.context.approval_id {
            self.check_approved(r, approval)?;
        }
        let drawn_from = match r.credit {
            Credit::DrawFrom(credit) => Some(credit),
            Credit::None | Credit::Open => None,
        };
        let windows = match drawn_from {
            Some(credit) => self.drawable_credit(r, credit)?,
            None => {
                let windows = self.current_windows(&r.tenant_id, &r.budget_ids)?;
                for key in &windows {
                    let remaining = self.current_window(key).remaining();
                    if r.amount > remaining {
                        return Ok(Outcome::Denied {
                            budget_id: key.budget.budget_id.clone(),
                            remaining,
                        });
                    }
                }
                windows
            }
        };
        let expires_at = self
            .state
            .now
            .checked_add_signed(Duration::milliseconds(i64::from(r.ttl_ms)))
            .unwrap_or(self.state.now);
        // A drawn reservation moves no money into the budgets' reserved: its credit holds it
        // already, and hands it over by counting it drawn (released at the credit's end
        // without it). Its reserve entry (of 0) still records it in the journal.
        let held = if drawn_from.is_some() {
            NanoUsd::ZERO
        } else {
            r.amount
        };
        for key in &windows {
            self.open_window(key);
            if drawn_from.is_none() {
                // A window clamped at its usage by a lowered limit comes down to the budget's
                // limit first, so the database's check holds this reservation to it.
                let lowered = self
                    .current_window(key)
                    .limit
                    .get()
                    .saturating_sub(self.window(key).limit.get());
                if lowered != 0 {
                    self.journal(key, None, EntryKind::LimitSet, [lowered, 0, 0, 0]);
                }
            }
            self.journal(
                key,
                Some(reservation_id),
                EntryKind::Reserve,
                [0, delta(held), 0, 0],
            );
        }
        let row = ReservationRow {
            id: reservation_id,
            tenant_id: r.tenant_id.clone(),
            idempotency_key: r.idempotency_key.clone(),
            fingerprint,
            windows: windows.clone(),
            amount: r.amount,
            fencing_scope_id: r.fencing.scope_id.clone(),
            fencing_epoch: r.fencing.epoch,
            expires_at,
            resolution: None,
            is_credit: r.credit == Credit::Open,
            drawn: NanoUsd::ZERO,
            drawn_from,
        };
        if let Some(credit) = drawn_from {
            self.draw(credit, r.amount);
        }
        let credit_remaining = self.credit_remaining(&row);
        self.state.reservations.insert(row.id, row.clone());
        self.effects.new_reservations.push(row);
        if let Some(approval) = r.context.approval_id {
            self.effects.approval_uses.push((approval, reservation_id));
        }
        let window_data: Vec<_> = windows
            .iter()
            .map(|w| json!({"budget_id": w.budget.budget_id, "window_start": format_time(w.start)}))
            .collect();
        let mut data = json!({
            "reservation_id": reservation_id.to_string(),
            "idempotency_key": r.idempotency_key,
            "amount_nano_usd": r.amount.get().to_string(),
            "windows": window_data,
            "fencing": {"scope_id": r.fencing.scope_id, "epoch": r.fencing.epoch},
            "expires_at": format_time(expires_at),
            "pricing": r.pricing,
            "context": r.context,
        });
        // Only credits and their draws carry credit members: other events keep their shape.
        match r.credit {
            Credit::None => {}
            Credit::Open => data["credit"] = json!(true),
            Credit::DrawFrom(credit) => {
                data["drawn_from_reservation_id"] = json!(credit.to_string());
            }
        }
        self.event(&r.tenant_id, "reservation.reserved", data);
        Ok(Outcome::Reserved {
            reservation_id,
            amount: r.amount,
            expires_at,
            balances: windows.iter().map(|w| self.balance(w)).collect(),
            state: ReservationState::Reserved,
            credit_remaining,
            replayed: false,
        })
    }

    /// The current window of each budget, in request order.
    fn current_windows(
        &self,
        tenant_id: &str,
        budget_ids: &[String],
    ) -> Result<Vec<WindowKey>, LedgerError> {
        let mut windows = Vec::with_capacity(budget_ids.len());
        for budget_id in budget_ids {
            let budget = BudgetKey {
                tenant_id: tenant_id.to_owned(),
                budget_id: budget_id.clone(),
            };
            let Some(definition) = self.state.budgets.get(&budget) else {
                return Err(LedgerError::BudgetNotFound {
                    tenant_id: tenant_id.to_owned(),
                    budget_id: budget_id.clone(),
                });
            };
            let start = definition.window.start_containing(self.state.now);
            windows.push(WindowKey { budget, start });
        }
        Ok(windows)
    }

    /// The windows of the credit `r` draws from, once it is known to cover `r`: an open,
    /// unexpired credit of the same tenant, scope and budgets (in order), in windows that are
    /// still current, with at least `r.amount` undrawn.
    fn drawable_credit(&self, r: &ReserveSet, id: Uuid) -> Result<Vec<WindowKey>, LedgerError> {
        let unavailable = |reason: String| LedgerError::CreditUnavailable { id, reason };
        let credit = self
            .state
            .reservations
            .get(&id)
            .filter(|c| c.tenant_id == r.tenant_id)
            .ok_or(LedgerError::ReservationNotFound(id))?;
        if !credit.is_credit {
            return Err(unavailable("the reservation is not a credit".into()));
        }
        if credit.fencing_scope_id != r.fencing.scope_id {
            return Err(unavailable(
                "the credit belongs to another fencing scope".into(),
            ));
        }
        if !credit
            .windows
            .iter()
            .map(|w| &w.budget.budget_id)
            .eq(r.budget_ids.iter())
        {
            return Err(unavailable(
                "budget_ids are not the credit's, in its order".into(),
            ));
        }
        if let Some(done) = credit.resolution {
            return Err(unavailable(format!(
                "the credit is {}",
                done.state.as_str()
            )));
        }
        if credit.expires_at <= self.state.now {
            return Err(unavailable("the credit expired".into()));
        }
        // Money drawn now belongs to the current window: a credit of an ended one is spent.
        if self.current_windows(&r.tenant_id, &r.budget_ids)? != credit.windows {
            return Err(unavailable(
                "a budget window of the credit has ended".into(),
            ));
        }
        let left = credit.undrawn();
        if r.amount > left {
            return Err(unavailable(format!(
                "{} nano-USD left, {} asked",
                left.get(),
                r.amount.get()
            )));
        }
        Ok(credit.windows.clone())
    }

    /// Counts `amount` as drawn from `credit` (which [`Self::drawable_credit`] checked).
    fn draw(&mut self, credit: Uuid, amount: NanoUsd) {
        let Some(row) = self.state.reservations.get_mut(&credit) else {
            return;
        };
        // At most the credit's amount: `drawable_credit` checked `amount` against what is left.
        row.drawn = row.drawn.checked_add(amount).unwrap_or(row.amount);
        let drawn = row.drawn;
        // A credit opened in this batch is written once, with its drawn total.
        match self
            .effects
            .new_reservations
            .iter_mut()
            .find(|r| r.id == credit)
        {
            Some(new) => new.drawn = drawn,
            None => {
                self.effects.credit_draws.insert(credit, drawn);
            }
        }
    }

    /// What the credit of `row` (itself, or the one it was drawn from) has left to draw.
    fn credit_remaining(&self, row: &ReservationRow) -> Option<NanoUsd> {
        if row.is_credit {
            return Some(
                self.state
                    .reservations
                    .get(&row.id)
                    .unwrap_or(row)
                    .undrawn(),
            );
        }
        let credit = self.state.reservations.get(&row.drawn_from?)?;
        Some(credit.undrawn())
    }

    /// Finds a reservation of `tenant_id` presented with `fencing`.
    fn reservation(
        &self,
        tenant_id: &str,
        id: Uuid,
        fencing: &Fencing,
    ) -> Result<&ReservationRow, LedgerError> {
        let row = self
            .state
            .reservations
            .get(&id)
            .filter(|r| r.tenant_id == tenant_id)
            .ok_or(LedgerError::ReservationNotFound(id))?;
        if row.fencing_scope_id != fencing.scope_id {
            return Err(LedgerError::InvalidArgument {
                field: "fencing.scope_id",
                reason: "the reservation belongs to another fencing scope".to_owned(),
            });
        }
        Ok(row)
    }

    /// Fencing and expiry checks shared by Commit and Release, after replays were answered (a
    /// Commit past the TTL never gets here: see `commit_late`).
    fn check_settle(
        &self,
        row: &ReservationRow,
        tenant_id: &str,
        fencing: &Fencing,
    ) -> Result<(), LedgerError> {
        self.check_epoch(tenant_id, fencing)?;
        if row.expires_at <= self.state.now {
            return Err(LedgerError::ReservationExpired(row.id));
        }
        Ok(())
    }

    /// The settling caller's epoch is its scope's current one.
    fn check_epoch(&self, tenant_id: &str, fencing: &Fencing) -> Result<(), LedgerError> {
        let scope = self.state.scopes.get(&fencing.scope_id);
        check_fencing(&fencing.scope_id, tenant_id, fencing.epoch, scope, None).map(|_| ())
    }

    /// Records a resolution. A reservation created in this same batch is written once, already
    /// resolved, so the store never has to update a row it inserts in the same statement.
    fn resolve(&mut self, id: Uuid, resolution: Resolution) {
        if let Some(row) = self.state.reservations.get_mut(&id) {
            row.resolution = Some(resolution);
        }
        match self
            .effects
            .new_reservations
            .iter_mut()
            .find(|r| r.id == id)
        {
            Some(new) => new.resolution = Some(resolution),
            None => self.effects.resolutions.push((id, resolution)),
        }
    }

    fn commit(&mut self, c: &Commit) -> Result<Outcome, LedgerError> {
        let row = self.reservation(&c.tenant_id, c.reservation_id, &c.fencing)?;
        if row.is_credit {
            return Err(LedgerError::InvalidArgument {
                field: "reservation_id",
                reason: "a credit is drawn from, never committed; release it to return the rest"
                    .to_owned(),
            });
        }
        match row.resolution {
            Some(done) if done.state == ReservationState::Committed => {
                if done.actual != c.actual {
                    return Err(LedgerError::IdempotencyConflict(
                        c.reservation_id.to_string(),
                    ));
                }
                return Ok(Outcome::Committed {
                    reservation_id: row.id,
                    resolution: done,
                    replayed: true,
                });
            }
            Some(done) if done.state == ReservationState::Expired => {
                let windows = row.windows.clone();
                return self.commit_late(c, windows, Some(done));
            }
            Some(done) => {
                return Err(LedgerError::ReservationAlreadyResolved {
                    id: row.id,
                    state: done.state.as_str(),
                });
            }
            None if row.expires_at <= self.state.now => {
                let windows = row.windows.clone();
                return self.commit_late(c, windows, None);
            }
            None => {}
        }
        self.check_settle(row, &c.tenant_id, &c.fencing)?;
        let amount = row.amount;
        let windows = row.windows.clone();
        let committed = c.actual.min(amount);
        let released = amount.saturating_sub(committed);
        let overrun = c.actual.saturating_sub(amount);
        for key in &windows {
            let current = self.window(key).overrun;
            current
                .checked_add(overrun)
                .map_err(money_error("actual_nano_usd"))?;
        }
        let resolution = Resolution {
            state: ReservationState::Committed,
            actual: c.actual,
            committed,
            released,
            overrun,
            epoch: c.fencing.epoch,
        };
        for key in &windows {
            self.journal(
                key,
                Some(c.reservation_id),
                EntryKind::Commit,
                [0, negative(amount), delta(committed), 0],
            );
            if !overrun.is_zero() {
                self.journal(
                    key,
                    Some(c.reservation_id),
                    EntryKind::Overrun,
                    [0, 0, 0, delta(overrun)],
                );
            }
        }
        self.resolve(c.reservation_id, resolution);
        self.event(
            &c.tenant_id,
            "reservation.committed",
            json!({
                "reservation_id": c.reservation_id.to_string(),
                "actual_nano_usd": c.actual.get().to_string(),
                "committed_nano_usd": committed.get().to_string(),
                "released_nano_usd": released.get().to_string(),
                "overrun_nano_usd": overrun.get().to_string(),
                "overrun": !overrun.is_zero(),
                "fencing": {"scope_id": c.fencing.scope_id, "epoch": c.fencing.epoch},
            }),
        );
        Ok(Outcome::Committed {
            reservation_id: c.reservation_id,
            resolution,
            replayed: false,
        })
    }

    /// A reservation that names the approval it goes ahead under (S16): the tenant's approval,
    /// asked for this call, approved, for the same budgets, and for at least this amount (the
    /// human approved that worst case, not more). The soft cap itself is the sidecar's question; this check
    /// makes the approval the reservation's evidence names one that really let it go ahead.
    fn check_approved(&self, r: &ReserveSet, approval_id: Uuid) -> Result<(), LedgerError> {
        let approval = self
            .state
            .approvals
            .get(&approval_id)
            .filter(|a| a.tenant_id == r.tenant_id)
            .ok_or(LedgerError::ApprovalNotFound(approval_id))?;
        // An approval is asked under the call's id (its idempotency key), and the resumed call
        // names itself in its context: one human decision lets one call go ahead.
        if approval.idempotency_key != r.context.call_id {
            return Err(LedgerError::InvalidArgument {
                field: "context.approval_id",
                reason: "the approval was asked for another call".to_owned(),
            });
        }
        // And only under the key that names the approval: another key would be another
        // reservation, and one approval would back as many calls as keys were tried.
        if r.idempotency_key != resume_key(&approval.idempotency_key, &approval_id.to_string()) {
            return Err(LedgerError::InvalidArgument {
                field: "idempotency_key",
                reason: format!(
                    "a call resumed under approval {approval_id} reserves under `<call id>/approved/<approval id>`, once"
                ),
            });
        }
        if approval.state != ApprovalState::Approved {
            return Err(LedgerError::ApprovalNotApproved {
                id: approval_id,
                state: approval.state.as_str(),
            });
        }
        if approval.budget_ids != r.budget_ids {
            return Err(LedgerError::InvalidArgument {
                field: "context.approval_id",
                reason: "the approval was asked for other budgets".to_owned(),
            });
        }
        if r.amount > approval.amount {
            return Err(LedgerError::InvalidArgument {
                field: "context.approval_id",
                reason: format!(
                    "the approval covers {} nano-USD, less than this reservation",
                    approval.amount.get()
                ),
            });
        }
        Ok(())
    }

    /// A commit that arrives after its reservation's TTL (the call outlived it): the spend
    /// happened, so it is booked, never dropped. Nothing the reservation held is committed: that
    /// went back to the budgets when it expired (now, if the sweep has not run yet), and all of
    /// `actual` is an overrun entry against the reservation's own windows, flagged by its event
    /// (`reservation.committed_late`). The row stays `expired`, carrying the late actual as its
    /// actual and overrun and the committing epoch as its resolved epoch (which the sweep leaves
    /// at none: that is how a late commit is told from a plain expiry). Retried with the same
    /// actual it replays; with another (0 included) it conflicts. `expired`: the resolution the
    /// sweep left, if it ran.
    fn commit_late(
        &mut self,
        c: &Commit,
        windows: Vec<WindowKey>,
        expired: Option<Resolution>,
    ) -> Result<Outcome, LedgerError> {
        if let Some(done) = expired
            && done.epoch != 0
        {
            // Committed late before: the same actual replays, another conflicts.
            if done.actual != c.actual {
                return Err(LedgerError::IdempotencyConflict(
                    c.reservation_id.to_string(),
                ));
            }
            return Ok(Outcome::Committed {
                reservation_id: c.reservation_id,
                resolution: done,
                replayed: true,
            });
        }
        self.check_epoch(&c.tenant_id, &c.fencing)?;
        for key in &windows {
            self.window(key)
                .overrun
                .checked_add(c.actual)
                .map_err(money_error("actual_nano_usd"))?;
        }
        // Not swept yet: expired now, exactly as the sweep would, so what it held goes back.
        let released = match expired {
            Some(done) => done.released,
            None => self.expire_reservation(c.reservation_id),
        };
        if !c.actual.is_zero() {
            for key in &windows {
                self.journal(
                    key,
                    Some(c.reservation_id),
                    EntryKind::Overrun,
                    [0, 0, 0, delta(c.actual)],
                );
            }
        }
        let resolution = Resolution {
            state: ReservationState::Expired,
            actual: c.actual,
            committed: NanoUsd::ZERO,
            released,
            overrun: c.actual,
            epoch: c.fencing.epoch,
        };
        self.book_late(c.reservation_id, resolution);
        self.event(
            &c.tenant_id,
            "reservation.committed_late",
            json!({
                "reservation_id": c.reservation_id.to_string(),
                "actual_nano_usd": c.actual.get().to_string(),
                "overrun_nano_usd": c.actual.get().to_string(),
                "fencing": {"scope_id": c.fencing.scope_id, "epoch": c.fencing.epoch},
            }),
        );
        Ok(Outcome::Committed {
            reservation_id: c.reservation_id,
            resolution,
            replayed: false,
        })
    }

    /// Records late usage on a reservation already expired: in this batch's own resolution of it
    /// (the sweep's or the late commit's own expiry, earlier in the batch; a reservation made in
    /// this batch expires in it only with a zero TTL, which the RPC layer refuses), else as a late
    /// booking on the stored row.
    fn book_late(&mut self, id: Uuid, resolution: Resolution) {
        if let Some(row) = self.state.reservations.get_mut(&id) {
            row.resolution = Some(resolution);
        }
        if let Some(new) = self
            .effects
            .new_reservations
            .iter_mut()
            .find(|r| r.id == id)
        {
            new.resolution = Some(resolution);
        } else if let Some((_, resolved)) =
            self.effects.resolutions.iter_mut().find(|(r, _)| *r == id)
        {
            *resolved = resolution;
        } else {
            self.effects
                .late_usage
                .push((id, resolution.actual, resolution.epoch));
        }
    }

    fn release(&mut self, r: &Release) -> Result<Outcome, LedgerError> {
        let row = self.reservation(&r.tenant_id, r.reservation_id, &r.fencing)?;
        match row.resolution {
            Some(done) if done.state == ReservationState::Released => {
                return Ok(Outcome::Released {
                    reservation_id: row.id,
                    released: done.released,
                    replayed: true,
                });
            }
            // What it held went back when it expired: nothing is left to release.
            Some(done) if done.state == ReservationState::Expired => {
                return Err(LedgerError::ReservationExpired(row.id));
            }
            Some(done) => {
                return Err(LedgerError::ReservationAlreadyResolved {
                    id: row.id,
                    state: done.state.as_str(),
                });
            }
            None => {}
        }
        self.check_settle(row, &r.tenant_id, &r.fencing)?;
        let (amount, credit_drawn) = self.give_back(
            r.reservation_id,
            EntryKind::Release,
            ReservationState::Released,
            r.fencing.epoch,
        );
        let mut data = json!({
            "reservation_id": r.reservation_id.to_string(),
            "released_nano_usd": amount.get().to_string(),
            "reason": r.reason,
            "fencing": {"scope_id": r.fencing.scope_id, "epoch": r.fencing.epoch},
        });
        if let Some(drawn) = credit_drawn {
            data["credit_drawn_nano_usd"] = json!(drawn.get().to_string());
        }
        self.event(&r.tenant_id, "reservation.released", data);
        Ok(Outcome::Released {
            reservation_id: r.reservation_id,
            released: amount,
            replayed: false,
        })
    }

    fn sweep(&mut self, max: u32) -> Outcome {
        let mut expired = 0u32;
        let candidates = self.state.expired_candidates.clone();
        for id in candidates {
            if expired >= max {
                break;
            }
            let Some(row) = self.state.reservations.get(&id) else {
                continue;
            };
            if row.resolution.is_some() || row.expires_at > self.state.now {
                continue;
            }
            self.expire_reservation(id);
            expired = expired.saturating_add(1);
        }
        let mut approvals = 0u32;
        for id in self.state.expired_approval_candidates.clone() {
            if approvals >= max {
                break;
            }
            let Some(row) = self.state.approvals.get(&id) else {
                continue;
            };
            if row.state != ApprovalState::Pending || row.expires_at > self.state.now {
                continue;
            }
            self.expire_approval(id);
            approvals = approvals.saturating_add(1);
        }
        Outcome::Swept {
            reservations: expired,
            approvals,
        }
    }

    /// Expires an open reservation past its TTL: what it still holds (a credit: what was not
    /// drawn) goes back to its windows, its row resolves `expired` with no epoch (no caller
    /// settled it), and `reservation.expired` is its event. Returns the amount released. Used by
    /// the sweep and by a commit that finds its reservation past the TTL before the sweep did.
    fn expire_reservation(&mut self, id: Uuid) -> NanoUsd {
        let Some(tenant_id) = self
            .state
            .reservations
            .get(&id)
            .map(|r| r.tenant_id.clone())
        else {
            return NanoUsd::ZERO;
        };
        let (amount, credit_drawn) =
            self.give_back(id, EntryKind::Expire, ReservationState::Expired, 0);
        let mut data = json!({"reservation_id": id.to_string(), "released_nano_usd": amount.get().to_string()});
        if let Some(drawn) = credit_drawn {
            data["credit_drawn_nano_usd"] = json!(drawn.get().to_string());
        }
        self.event(&tenant_id, "reservation.expired", data);
        amount
    }

    /// Returns what an open reservation still holds to its windows (a credit: what was not
    /// drawn; its draws are released or committed on their own) as `kind` entries, and resolves
    /// it `state` under `epoch` (0: nobody settled it). Returns the amount and, for a credit,
    /// what was drawn from it.
    fn give_back(
        &mut self,
        id: Uuid,
        kind: EntryKind,
        state: ReservationState,
        epoch: u64,
    ) -> (NanoUsd, Option<NanoUsd>) {
        let Some(row) = self.state.reservations.get(&id) else {
            return (NanoUsd::ZERO, None);
        };
        let (amount, windows) = (row.undrawn(), row.windows.clone());
        let credit_drawn = row.is_credit.then_some(row.drawn);
        for key in &windows {
            self.journal(key, Some(id), kind, [0, negative(amount), 0, 0]);
        }
        let resolution = Resolution {
            state,
            actual: NanoUsd::ZERO,
            committed: NanoUsd::ZERO,
            released: amount,
            overrun: NanoUsd::ZERO,
            epoch,
        };
        self.resolve(id, resolution);
        (amount, credit_drawn)
    }

    fn upsert_retention_policy(
        &mut self,
        p: &UpsertRetentionPolicy,
    ) -> Result<Outcome, LedgerError> {
        self.require_tenant(&p.tenant_id)?;
        let previous = self.state.retention_policies.get(&p.tenant_id).copied();
        if let Some((old, updated_at)) = previous
            && old == p.policy
        {
            return Ok(Outcome::RetentionPolicyUpserted {
                created: false,
                changed: false,
                policy: old,
                updated_at,
            });
        }
        let now = self.state.now;
        self.state
            .retention_policies
            .insert(p.tenant_id.clone(), (p.policy, now));
        self.effects
            .retention_policies
            .insert(p.tenant_id.clone(), p.policy);
        let days = |policy: Option<RetentionPolicy>| {
            policy.map(|x| {
                json!({
                    "audit_retention_days": x.audit_retention_days,
                    "redact_payloads_after_days": x.redact_payloads_after_days,
                })
            })
        };
        self.event(
            &p.tenant_id,
            "retention_policy.upserted",
            json!({
                "previous": days(previous.map(|(old, _)| old)),
                "policy": days(Some(p.policy)),
            }),
        );
        Ok(Outcome::RetentionPolicyUpserted {
            created: previous.is_none(),
            changed: true,
            policy: p.policy,
            updated_at: now,
        })
    }

    fn record_fail_open(&mut self, f: &RecordFailOpen) -> Result<Outcome, LedgerError> {
        self.require_tenant(&f.tenant_id)?;
        // The scope must be the tenant's, but its epoch is not checked: the lease may have moved
        // on while the ledger was down, and the record keeps what the sidecar presented.
        let epoch_current = self
            .state
            .scopes
            .get(&f.fencing.scope_id)
            .filter(|s| s.tenant_id == f.tenant_id)
            .map(|s| s.epoch)
            .ok_or_else(|| LedgerError::FencingScopeNotFound(f.fencing.scope_id.clone()))?;
        let record_id = f.record_id();
        let fingerprint = f.fingerprint();
        if let Some(existing) = self.state.fail_open_records.get(&record_id) {
            // A different tenant or call would be a UUIDv5 collision: refused, never merged.
            if existing.tenant_id != f.tenant_id
                || existing.call_id != f.call_id
                || existing.fingerprint != fingerprint
            {
                return Err(LedgerError::IdempotencyConflict(f.call_id.clone()));
            }
            let record = existing.clone();
            let balances = self.current_balances(&f.tenant_id, &f.budget_ids);
            return Ok(Outcome::FailOpenRecorded {
                record: Box::new(record),
                balances,
                replayed: true,
            });
        }
        if f.fencing.epoch > epoch_current {
            return Err(epoch_never_issued(
                &f.fencing.scope_id,
                f.fencing.epoch,
                epoch_current,
            ));
        }
        let registered = self
            .state
            .pricing
            .get(&(f.tenant_id.clone(), f.pricing.version.clone()));
        if registered != Some(&f.pricing.sha256_hex) {
            return Err(LedgerError::PricingUnknown {
                tenant_id: f.tenant_id.clone(),
                version: f.pricing.version.clone(),
                sha256_hex: f.pricing.sha256_hex.clone(),
            });
        }
        let mut windows = Vec::with_capacity(f.budget_ids.len());
        for budget_id in &f.budget_ids {
            let budget = BudgetKey {
                tenant_id: f.tenant_id.clone(),
                budget_id: budget_id.clone(),
            };
            let definition =
                self.state
                    .budgets
                    .get(&budget)
                    .ok_or_else(|| LedgerError::BudgetNotFound {
                        tenant_id: f.tenant_id.clone(),
                        budget_id: budget_id.clone(),
                    })?;
            let start = definition.window.start_containing(self.state.now);
            let key = WindowKey { budget, start };
            // The overrun column must not overflow; check every window before writing any.
            self.window(&key)
                .overrun
                .checked_add(f.actual)
                .map_err(money_error("actual_nano_usd"))?;
            windows.push(key);
        }
        let row = FailOpenRow {
            id: record_id,
            tenant_id: f.tenant_id.clone(),
            call_id: f.call_id.clone(),
            fingerprint,
            windows: windows.clone(),
            actual: f.actual,
            fencing_scope_id: f.fencing.scope_id.clone(),
            fencing_epoch: f.fencing.epoch,
            epoch_current,
            decided_at: f.decided_at,
            recorded_at: self.state.now,
        };
        for key in &windows {
            self.open_window(key);
            if !f.actual.is_zero() {
                // Spend past any reservation: the existing overrun mechanism, reserved = 0.
                self.journal(
                    key,
                    Some(record_id),
                    EntryKind::Overrun,
                    [0, 0, 0, delta(f.actual)],
                );
            }
        }
        self.event(
            &f.tenant_id,
            "decision.fail_open",
            json!({
                "record_id": record_id.to_string(),
                "call_id": f.call_id,
                "budget_ids": f.budget_ids,
                "window_starts": windows.iter().map(|w| format_time(w.start)).collect::<Vec<_>>(),
                "actual_nano_usd": f.actual.get().to_string(),
                "overrun_nano_usd": f.actual.get().to_string(),
                "overrun": !f.actual.is_zero(),
                "decided_at": format_time(f.decided_at),
                "fencing": {
                    "scope_id": f.fencing.scope_id,
                    "epoch": f.fencing.epoch,
                    "epoch_current": epoch_current,
                    "epoch_stale": row.epoch_stale(),
                },
                "pricing": f.pricing,
                "contract_sha256_hex": f.contract_sha256_hex,
                "context": f.context,
            }),
        );
        self.state.fail_open_records.insert(record_id, row.clone());
        self.effects.fail_open_records.push(row.clone());
        let balances = windows.iter().map(|key| self.balance(key)).collect();
        Ok(Outcome::FailOpenRecorded {
            record: Box::new(row),
            balances,
            replayed: false,
        })
    }

    fn record_stops(&mut self, r: &RecordStops) -> Result<Outcome, LedgerError> {
        self.require_tenant(&r.tenant_id)?;
        // The scope names the deciding sidecar; its epoch is recorded per record, as presented
        // (a STOP moves no money, and a sidecar whose lease lapsed still refuses calls).
        let epoch_current = self
            .state
            .scopes
            .get(&r.fencing_scope_id)
            .filter(|s| s.tenant_id == r.tenant_id)
            .map(|s| s.epoch)
            .ok_or_else(|| LedgerError::FencingScopeNotFound(r.fencing_scope_id.clone()))?;
        // Every record is checked before any is written: a conflict changes nothing.
        let mut fresh = Vec::with_capacity(r.stops.len());
        let mut replayed = 0_u32;
        for stop in &r.stops {
            let fingerprint = r.fingerprint(stop);
            match self.state.stop_records.get(&stop.record_id) {
                Some(existing)
                    if existing.tenant_id == r.tenant_id && existing.fingerprint == fingerprint =>
                {
                    replayed = replayed.saturating_add(1);
                }
                Some(_) => {
                    return Err(LedgerError::IdempotencyConflict(stop.record_id.to_string()));
                }
                None if stop
                    .fencing_epoch
                    .is_some_and(|epoch| epoch > epoch_current) =>
                {
                    return Err(epoch_never_issued(
                        &r.fencing_scope_id,
                        stop.fencing_epoch.unwrap_or_default(),
                        epoch_current,
                    ));
                }
                None => fresh.push((stop, fingerprint)),
            }
        }
        let recorded = u32::try_from(fresh.len()).unwrap_or(u32::MAX);
        for (stop, fingerprint) in fresh {
            let event_type = if stop.call_id.is_some() {
                "decision.stopped"
            } else {
                "decision.stops_unpublished"
            };
            self.event(
                &r.tenant_id,
                event_type,
                json!({
                    "record_id": stop.record_id.to_string(),
                    "call_id": stop.call_id,
                    "reason": stop.reason,
                    "detail": stop.detail,
                    "budget_id": stop.budget_id,
                    "worst_case_nano_usd": stop.worst_case.get().to_string(),
                    "count": stop.count,
                    "first_decided_at": format_time(stop.first_decided_at),
                    "last_decided_at": format_time(stop.last_decided_at),
                    "fencing": {
                        "scope_id": r.fencing_scope_id,
                        "epoch": stop.fencing_epoch,
                        "epoch_current": epoch_current,
                    },
                    "pricing": r.pricing,
                    "contract_sha256_hex": r.contract_sha256_hex,
                    "context": stop.context,
                }),
            );
            let row = StopRow {
                id: stop.record_id,
                tenant_id: r.tenant_id.clone(),
                call_id: stop.call_id.clone(),
                reason: stop.reason.clone(),
                count: stop.count,
                fingerprint,
            };
            self.state.stop_records.insert(row.id, row.clone());
            self.effects.stop_records.push(row);
        }
        Ok(Outcome::StopsRecorded { recorded, replayed })
    }

    /// Balances of the current windows of `budget_ids` (budgets that are not loaded are skipped).
    fn current_balances(&self, tenant_id: &str, budget_ids: &[String]) -> Vec<Balance> {
        budget_ids
            .iter()
            .filter_map(|budget_id| {
                let budget = BudgetKey {
                    tenant_id: tenant_id.to_owned(),
                    budget_id: budget_id.clone(),
                };
                let start = self
                    .state
                    .budgets
                    .get(&budget)?
                    .window
                    .start_containing(self.state.now);
                Some(self.balance(&WindowKey { budget, start }))
            })
            .collect()
    }

    /// Records the final state of an approval (inserted if this batch created it).
    fn put_approval(&mut self, row: ApprovalRow) {
        self.state.approvals.insert(row.id, row.clone());
        self.effects.approvals.insert(row.id, row);
    }

    /// Expires a pending approval: state, `resolved_at` and the `approval.expired` event.
    fn expire_approval(&mut self, id: Uuid) {
        let Some(mut row) = self.state.approvals.get(&id).cloned() else {
            return;
        };
        debug_assert_eq!(row.state, ApprovalState::Pending);
        row.state = ApprovalState::Expired;
        row.resolved_at = Some(self.state.now);
        self.event(
            &row.tenant_id,
            "approval.expired",
            json!({
                "approval_id": id.to_string(),
                "budget_id": row.budget_id,
                "amount_nano_usd": row.amount.get().to_string(),
                "expires_at": format_time(row.expires_at),
            }),
        );
        self.put_approval(row);
    }

    fn create_approval(&mut self, a: &CreateApproval) -> Result<Outcome, LedgerError> {
        self.require_tenant(&a.tenant_id)?;
        let scope = self.state.scopes.get(&a.fencing.scope_id);
        check_fencing(
            &a.fencing.scope_id,
            &a.tenant_id,
            a.fencing.epoch,
            scope,
            Some(self.state.now),
        )?;
        let approval_id = a.approval_id();
        let fingerprint = a.fingerprint();
        if let Some(existing) = self.state.approvals.get(&approval_id) {
            // A different tenant or key would be a UUIDv5 collision: refused, never merged.
            if existing.tenant_id != a.tenant_id
                || existing.idempotency_key != a.idempotency_key
                || existing.fingerprint != fingerprint
            {
                return Err(LedgerError::IdempotencyConflict(a.idempotency_key.clone()));
            }
            return Ok(Outcome::Approval {
                approval: Box::new(existing.clone()),
                replayed: true,
            });
        }
        for budget_id in &a.budget_ids {
            let key = BudgetKey {
                tenant_id: a.tenant_id.clone(),
                budget_id: budget_id.clone(),
            };
            if !self.state.budgets.contains_key(&key) {
                return Err(LedgerError::BudgetNotFound {
                    tenant_id: a.tenant_id.clone(),
                    budget_id: budget_id.clone(),
                });
            }
        }
        let expires_at = self
            .state
            .now
            .checked_add_signed(Duration::milliseconds(i64::from(a.ttl_ms)))
            .unwrap_or(self.state.now);
        let row = ApprovalRow {
            id: approval_id,
            tenant_id: a.tenant_id.clone(),
            idempotency_key: a.idempotency_key.clone(),
            fingerprint,
            budget_ids: a.budget_ids.clone(),
            budget_id: a.budget_id.clone(),
            amount: a.amount,
            context: a.context.clone(),
            fencing_scope_id: a.fencing.scope_id.clone(),
            fencing_epoch: a.fencing.epoch,
            created_at: self.state.now,
            expires_at,
            state: ApprovalState::Pending,
            resolved_by: None,
            resolved_at: None,
            resolution_reason: None,
        };
        self.event(
            &a.tenant_id,
            "approval.created",
            json!({
                "approval_id": approval_id.to_string(),
                "idempotency_key": a.idempotency_key,
                "budget_ids": a.budget_ids,
                "budget_id": a.budget_id,
                "amount_nano_usd": a.amount.get().to_string(),
                "expires_at": format_time(expires_at),
                "fencing": {"scope_id": a.fencing.scope_id, "epoch": a.fencing.epoch},
                "context": a.context,
            }),
        );
        self.effects.new_approval_ids.insert(approval_id);
        self.put_approval(row.clone());
        Ok(Outcome::Approval {
            approval: Box::new(row),
            replayed: false,
        })
    }

    fn resolve_approval(&mut self, r: &ResolveApproval) -> Result<Outcome, LedgerError> {
        let mut row = self
            .state
            .approvals
            .get(&r.approval_id)
            .filter(|a| a.tenant_id == r.tenant_id)
            .cloned()
            .ok_or(LedgerError::ApprovalNotFound(r.approval_id))?;
        let wanted = r.decision.state();
        match row.state {
            ApprovalState::Pending => {}
            state if state == wanted => {
                return Ok(Outcome::Approval {
                    approval: Box::new(row),
                    replayed: true,
                });
            }
            ApprovalState::Expired => return Err(LedgerError::ApprovalExpired(r.approval_id)),
            state => {
                return Err(LedgerError::ApprovalAlreadyResolved {
                    id: r.approval_id,
                    state: state.as_str(),
                });
            }
        }
        if row.expires_at <= self.state.now {
            // Too late: the record expires now, exactly once (the sweep skips non-pending rows).
            self.expire_approval(r.approval_id);
            return Err(LedgerError::ApprovalExpired(r.approval_id));
        }
        row.state = wanted;
        row.resolved_by = Some(r.approver.clone());
        row.resolved_at = Some(self.state.now);
        row.resolution_reason = (!r.reason.is_empty()).then(|| r.reason.clone());
        let event_type = match r.decision {
            ApprovalDecision::Approve => "approval.approved",
            ApprovalDecision::Deny => "approval.denied",
        };
        self.event(
            &r.tenant_id,
            event_type,
            json!({
                "approval_id": r.approval_id.to_string(),
                "budget_id": row.budget_id,
                "amount_nano_usd": row.amount.get().to_string(),
                "approver": r.approver,
                "reason": r.reason,
            }),
        );
        self.put_approval(row.clone());
        Ok(Outcome::Approval {
            approval: Box::new(row),
            replayed: false,
        })
    }

    fn acquire_lease(&mut self, a: &AcquireLease) -> Result<Outcome, LedgerError> {
        self.require_tenant(&a.tenant_id)?;
        let current = self.state.scopes.get(&a.scope_id);
        if current.is_some_and(|scope| scope.tenant_id != a.tenant_id) {
            return Err(LedgerError::FencingScopeNotFound(a.scope_id.clone()));
        }
        let request = a
            .request_id
            .as_ref()
            .map(|id| (id.clone(), a.fingerprint()));
        if let Some((id, fingerprint)) = &request
            && let Some(recorded) = self
                .state
                .lease_requests
                .get(&(a.scope_id.clone(), id.clone()))
        {
            // A retry: the first answer, whatever the lease has become since; nothing changes.
            if recorded.request_sha256 != *fingerprint {
                return Err(LedgerError::IdempotencyConflict(id.clone()));
            }
            return Ok(Outcome::Lease {
                grant: recorded.grant.clone(),
                replayed: true,
            });
        }
        let grant = a.decide(current, self.state.now)?;
        self.state
            .scopes
            .insert(a.scope_id.clone(), grant.state.clone());
        self.effects
            .leases
            .insert(a.scope_id.clone(), grant.state.clone());
        if let Some((id, fingerprint)) = &request {
            self.state.lease_requests.insert(
                (a.scope_id.clone(), id.clone()),
                RecordedAcquire {
                    request_sha256: fingerprint.clone(),
                    grant: grant.clone(),
                },
            );
        }
        self.effects.lease_events.push(LeaseEvent {
            scope_id: a.scope_id.clone(),
            grant: grant.clone(),
            request,
        });
        self.event(
            &a.tenant_id,
            "fencing.lease_acquired",
            json!({
                "scope_id": a.scope_id,
                "workload_instance_id": a.workload_instance_id,
                "outcome": grant.outcome.as_str(),
                "previous_epoch": grant.previous_epoch,
                "epoch": grant.state.epoch,
                "expires_at": format_time(grant.state.expires_at),
                // Whether the force flag took the lease before its expiry, not whether the flag
                // was sent: a forced acquire of an expired lease is a plain takeover.
                "forced": grant.outcome == LeaseOutcome::Forced,
            }),
        );
        Ok(Outcome::Lease {
            grant,
            replayed: false,
        })
    }

    fn upsert_tenant(&mut self, t: &UpsertTenant) -> Outcome {
        let previous = self.state.tenants.get(&t.tenant_id);
        if previous == Some(&t.display_name) {
            return Outcome::TenantUpserted { created: false };
        }
        let created = previous.is_none();
        self.state
            .tenants
            .insert(t.tenant_id.clone(), t.display_name.clone());
        self.effects
            .tenants
            .insert(t.tenant_id.clone(), t.display_name.clone());
        self.event(
            &t.tenant_id,
            "tenant.upserted",
            json!({"display_name": t.display_name, "created": created}),
        );
        Outcome::TenantUpserted { created }
    }

    fn register_pricing(&mut self, p: &RegisterPricing) -> Result<Outcome, LedgerError> {
        self.require_tenant(&p.tenant_id)?;
        let key = (p.tenant_id.clone(), p.pricing.version.clone());
        match self.state.pricing.get(&key) {
            Some(sha) if *sha == p.pricing.sha256_hex => {
                return Ok(Outcome::PricingRegistered { created: false });
            }
            Some(_) => {
                return Err(LedgerError::PricingConflict {
                    version: p.pricing.version.clone(),
                });
            }
            None => {}
        }
        self.state
            .pricing
            .insert(key.clone(), p.pricing.sha256_hex.clone());
        self.effects
            .pricing
            .insert(key, p.pricing.sha256_hex.clone());
        self.event(
            &p.tenant_id,
            "pricing.registered",
            json!({"version": p.pricing.version, "sha256_hex": p.pricing.sha256_hex}),
        );
        Ok(Outcome::PricingRegistered { created: true })
    }

    fn register_signing_key(&mut self, k: &RegisterSigningKey) -> Result<Outcome, LedgerError> {
        let new = &k.key;
        let time = |t: Option<DateTime<Utc>>| t.map(format_time);
        let Some(old) = self.state.signing_keys.get(&k.key_id).cloned() else {
            self.state
                .signing_keys
                .insert(k.key_id.clone(), new.clone());
            self.effects
                .signing_keys
                .insert(k.key_id.clone(), new.clone());
            self.event(
                SYSTEM_TENANT_ID,
                "signing_key.registered",
                json!({
                    "key_id": k.key_id,
                    "algorithm": new.algorithm,
                    "public_key_sha256": hex::encode(Sha256::digest(&new.public_key)),
                    "valid_from": format_time(new.valid_from),
                    "valid_until": time(new.valid_until),
                    "revoked_at": time(new.revoked_at),
                }),
            );
            return Ok(Outcome::SigningKeyRegistered {
                created: true,
                changed: true,
            });
        };
        if old.algorithm != new.algorithm
            || old.public_key != new.public_key
            || old.valid_from != new.valid_from
        {
            return Err(LedgerError::SigningKeyConflict {
                key_id: k.key_id.clone(),
            });
        }
        if let Some(old_revoked) = old.revoked_at
            && new.revoked_at.is_none_or(|r| r > old_revoked)
        {
            return Err(LedgerError::SigningKeyRevocationIrreversible {
                key_id: k.key_id.clone(),
            });
        }
        // An end that has passed is final: reopening it would make signatures made after it
        // (with a key that may have leaked since) valid again. Closing a window that is still
        // open, even at an instant already past (a rotation closes the old key's window just
        // after its last signature), stays allowed; revocation is how past signatures lose trust.
        let ended = old.valid_until.is_some_and(|end| end <= self.state.now);
        let mut kept;
        let new = if ended && old.valid_until != new.valid_until {
            if new.revoked_at.is_none() {
                return Err(LedgerError::SigningKeyWindowClosed {
                    key_id: k.key_id.clone(),
                });
            }
            // A revocation is never held back by a window change it arrives with (the
            // SigningKey controller sends the whole spec): it applies, and the ended window
            // stays as it was, which only narrows what verifies.
            kept = new.clone();
            kept.valid_until = old.valid_until;
            &kept
        } else {
            new
        };
        if old == *new {
            return Ok(Outcome::SigningKeyRegistered {
                created: false,
                changed: false,
            });
        }
        if old.valid_until != new.valid_until {
            self.event(
                SYSTEM_TENANT_ID,
                "signing_key.window_changed",
                json!({
                    "key_id": k.key_id,
                    "valid_from": format_time(new.valid_from),
                    "previous_valid_until": time(old.valid_until),
                    "valid_until": time(new.valid_until),
                }),
            );
        }
        if old.revoked_at != new.revoked_at {
            self.event(
                SYSTEM_TENANT_ID,
                "signing_key.revoked",
                json!({
                    "key_id": k.key_id,
                    "previous_revoked_at": time(old.revoked_at),
                    "revoked_at": time(new.revoked_at),
                }),
            );
        }
        self.state
            .signing_keys
            .insert(k.key_id.clone(), new.clone());
        self.effects
            .signing_keys
            .insert(k.key_id.clone(), new.clone());
        Ok(Outcome::SigningKeyRegistered {
            created: false,
            changed: true,
        })
    }

    fn upsert_budget(&mut self, b: &UpsertBudget) -> Result<Outcome, LedgerError> {
        self.require_tenant(&b.tenant_id)?;
        let key = BudgetKey {
            tenant_id: b.tenant_id.clone(),
            budget_id: b.budget_id.clone(),
        };
        let window_key = WindowKey {
            budget: key.clone(),
            start: b.definition.window.start_containing(self.state.now),
        };
        let previous = self.state.budgets.get(&key);
        if b.create_only && previous.is_some_and(|p| p != &b.definition) {
            return Err(LedgerError::PermissionDenied(format!(
                "budget {} exists with another definition; only the control listener changes it",
                b.budget_id
            )));
        }
        if previous == Some(&b.definition) {
            return Ok(Outcome::BudgetUpserted {
                created: false,
                balance: self.balance(&window_key),
            });
        }
        let created = previous.is_none();
        self.state.budgets.insert(key.clone(), b.definition.clone());
        self.effects.budgets.insert(key, b.definition.clone());
        // The current window takes the new limit at once, but never below what it already holds:
        // lowering a limit under current usage stops new reservations without rewriting history.
        if let Some(row) = self.state.windows.get(&window_key).copied() {
            let floor = row
                .committed
                .checked_add(row.reserved)
                .map_err(money_error("limit_nano_usd"))?;
            let target = if b.definition.limit < floor {
                floor
            } else {
                b.definition.limit
            };
            let change = target.get().saturating_sub(row.limit.get());
            if change != 0 {
                self.journal(&window_key, None, EntryKind::LimitSet, [change, 0, 0, 0]);
            }
        }
        self.event(
            &b.tenant_id,
            "budget.upserted",
            json!({
                "budget_id": b.budget_id,
                "limit_nano_usd": b.definition.limit.get().to_string(),
                "soft_cap_nano_usd": b.definition.soft_cap.map(|s| s.get().to_string()),
                "window": b.definition.window.as_str(),
                "created": created,
            }),
        );
        Ok(Outcome::BudgetUpserted {
            created,
            balance: self.balance(&window_key),
        })
    }
}

/// The refusal of an after-the-fact record (fail-open, STOP) that presents an epoch its scope
/// never had: records keep the epoch a sidecar decided under, which may be older than the
/// scope's now, never newer.
fn epoch_never_issued(scope_id: &str, presented: u64, current: u64) -> LedgerError {
    LedgerError::FencingEpochStale {
        scope_id: scope_id.to_owned(),
        presented,
        current,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod fingerprint_tests {
    use super::*;

    fn request() -> ReserveSet {
        ReserveSet {
            tenant_id: "t".into(),
            idempotency_key: "k".into(),
            budget_ids: vec!["b".into()],
            amount: NanoUsd::new(5).unwrap(),
            fencing: Fencing {
                scope_id: "s".into(),
                epoch: 3,
            },
            ttl_ms: 1_000,
            pricing: PricingRef {
                version: "p".into(),
                sha256_hex: "ab".repeat(32),
            },
            context: DecisionContext {
                call_id: "k".into(),
                ..DecisionContext::default()
            },
            credit: Credit::None,
        }
    }

    #[test]
    fn a_reservations_fingerprint_holds_its_scope_but_not_its_epoch_or_stale_marker() {
        let a = request();
        let later_epoch = ReserveSet {
            fencing: Fencing {
                epoch: 4,
                ..a.fencing.clone()
            },
            ..a.clone()
        };
        let marked = ReserveSet {
            context: DecisionContext {
                pricing_stale: true,
                ..a.context.clone()
            },
            ..a.clone()
        };
        assert_eq!(a.fingerprint(), later_epoch.fingerprint());
        assert_eq!(a.fingerprint(), marked.fingerprint());
        // A resumed reservation written before approval ids were sent replays for a sidecar
        // that sends one (its key names the approval already).
        let naming_its_approval = ReserveSet {
            context: DecisionContext {
                approval_id: Some(Uuid::from_u128(5)),
                ..a.context.clone()
            },
            ..a.clone()
        };
        assert_eq!(a.fingerprint(), naming_its_approval.fingerprint());
        let other_scope = ReserveSet {
            fencing: Fencing {
                scope_id: "s2".into(),
                ..a.fencing.clone()
            },
            ..a.clone()
        };
        let other_amount = ReserveSet {
            amount: NanoUsd::new(6).unwrap(),
            ..a.clone()
        };
        assert_ne!(a.fingerprint(), other_scope.fingerprint());
        assert_ne!(a.fingerprint(), other_amount.fingerprint());
    }

    #[test]
    fn the_fingerprint_before_2026_11_26_is_the_whole_request_with_the_rows_epoch() {
        // What the derived Serialize of ReserveSet produced until then: every field, the fencing
        // token whole.
        let old = canonical_sha256(&serde_json::json!({
            "tenant_id": "t", "idempotency_key": "k", "budget_ids": ["b"], "amount": 5,
            "fencing": {"scope_id": "s", "epoch": 3}, "ttl_ms": 1000,
            "pricing": {"version": "p", "sha256_hex": "ab".repeat(32)},
            "context": {"run_id": "", "workflow_id": "", "call_id": "k", "provider": "",
                        "model": "", "contract_version": ""}
        }));
        let a = request();
        assert_eq!(a.fingerprint_before_2026_11_26(3), old);
        assert_ne!(a.fingerprint_before_2026_11_26(4), old);
        assert_ne!(a.fingerprint(), old);
    }

    #[test]
    fn an_approvals_fingerprint_leaves_out_the_stale_marker() {
        let approval = |pricing_stale| CreateApproval {
            tenant_id: "t".into(),
            idempotency_key: "k".into(),
            budget_ids: vec!["b".into()],
            budget_id: "b".into(),
            amount: NanoUsd::new(5).unwrap(),
            fencing: Fencing {
                scope_id: "s".into(),
                epoch: 1,
            },
            ttl_ms: 60_000,
            context: ApprovalContext {
                decision: DecisionContext {
                    pricing_stale,
                    ..DecisionContext::default()
                },
                ..ApprovalContext::default()
            },
        };
        assert_eq!(approval(false).fingerprint(), approval(true).fingerprint());
    }

    #[test]
    fn fingerprints_of_amounts_a_double_holds_are_the_bytes_stored_before_the_exact_rule() {
        // Fingerprints stored before 2026-11-28 are sha256 of the request's own RFC 8785 bytes;
        // the exact-integer rule (via a JSON tree) must give the same for every amount up to
        // 2^53, through the real requests' Serialize, not only hand-made JSON.
        fn rfc_8785_sha256<T: Serialize>(value: &T) -> String {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(
                serde_json_canonicalizer::to_vec(value).unwrap(),
            ))
        }
        for amount in [1, 600, 1 << 53] {
            let reserve = ReserveSet {
                amount: NanoUsd::new(amount).unwrap(),
                ..request()
            };
            assert_eq!(reserve.fingerprint(), rfc_8785_sha256(&reserve));
            let approval = CreateApproval {
                tenant_id: "t".into(),
                idempotency_key: "k".into(),
                budget_ids: vec!["b".into(), "c".into()],
                budget_id: "c".into(),
                amount: NanoUsd::new(amount).unwrap(),
                fencing: Fencing {
                    scope_id: "s".into(),
                    epoch: 7,
                },
                ttl_ms: 60_000,
                context: ApprovalContext::default(),
            };
            assert_eq!(approval.fingerprint(), rfc_8785_sha256(&approval));
        }
        let beyond = ReserveSet {
            amount: NanoUsd::new((1 << 53) + 1).unwrap(),
            ..request()
        };
        assert_ne!(beyond.fingerprint(), rfc_8785_sha256(&beyond));
    }
}

/// Credits, draws and late commits, planned on hand-made snapshots.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::arithmetic_side_effects)]
mod settlement_tests {
    use super::*;
    use chrono::TimeZone;

    const TENANT: &str = "t";
    const SCOPE: &str = "s";

    /// A snapshot at `now` with a daily budget `b` and an open credit of 500 opened in the window
    /// that starts at `credit_window`.
    fn with_credit(now: DateTime<Utc>, credit_window: DateTime<Utc>) -> (Snapshot, Uuid) {
        let budget = BudgetKey {
            tenant_id: TENANT.into(),
            budget_id: "b".into(),
        };
        let window = WindowKey {
            budget: budget.clone(),
            start: credit_window,
        };
        let credit = ReservationRow {
            id: Uuid::from_u128(7),
            tenant_id: TENANT.into(),
            idempotency_key: "credit".into(),
            fingerprint: String::new(),
            windows: vec![window.clone()],
            amount: NanoUsd::new(500).unwrap(),
            fencing_scope_id: SCOPE.into(),
            fencing_epoch: 1,
            expires_at: now + Duration::hours(1),
            resolution: None,
            is_credit: true,
            drawn: NanoUsd::ZERO,
            drawn_from: None,
        };
        let mut snapshot = Snapshot {
            now,
            ..Snapshot::default()
        };
        snapshot.tenants.insert(TENANT.into(), TENANT.into());
        snapshot.budgets.insert(
            budget,
            BudgetRow {
                limit: NanoUsd::new(1_000).unwrap(),
                soft_cap: None,
                window: BudgetWindow::CalendarDayUtc,
            },
        );
        snapshot.windows.insert(
            window,
            WindowRow {
                limit: NanoUsd::new(1_000).unwrap(),
                reserved: NanoUsd::new(500).unwrap(),
                ..WindowRow::default()
            },
        );
        snapshot.scopes.insert(
            SCOPE.into(),
            LeaseState {
                tenant_id: TENANT.into(),
                owner: "w".into(),
                epoch: 1,
                expires_at: now + Duration::hours(1),
            },
        );
        snapshot
            .pricing
            .insert((TENANT.into(), "p".into()), "ab".repeat(32));
        snapshot.reservations.insert(credit.id, credit.clone());
        (snapshot, credit.id)
    }

    fn draw(credit: Uuid, amount: i64) -> Command {
        Command::ReserveSet(ReserveSet {
            tenant_id: TENANT.into(),
            idempotency_key: "call".into(),
            budget_ids: vec!["b".into()],
            amount: NanoUsd::new(amount).unwrap(),
            fencing: Fencing {
                scope_id: SCOPE.into(),
                epoch: 1,
            },
            ttl_ms: 60_000,
            pricing: PricingRef {
                version: "p".into(),
                sha256_hex: "ab".repeat(32),
            },
            context: DecisionContext::default(),
            credit: Credit::DrawFrom(credit),
        })
    }

    #[test]
    fn a_credit_of_a_window_that_ended_cannot_be_drawn() {
        let today = Utc.with_ymd_and_hms(2026, 11, 26, 0, 0, 0).unwrap();
        let now = today + Duration::minutes(1);
        let (snapshot, credit) = with_credit(now, today - Duration::days(1));
        let (outcomes, effects) = plan_batch(snapshot, &[draw(credit, 100)]);
        assert_eq!(
            outcomes[0].as_ref().unwrap_err().code(),
            crate::ErrorCode::CreditUnavailable
        );
        assert!(effects.is_empty());

        // The same credit in the current window is drawn, without touching the window's money.
        let (snapshot, credit) = with_credit(now, today);
        let (outcomes, effects) = plan_batch(snapshot, &[draw(credit, 100)]);
        assert!(
            matches!(
                outcomes[0],
                Ok(Outcome::Reserved {
                    credit_remaining: Some(left),
                    ..
                }) if left.get() == 400
            ),
            "{outcomes:?}"
        );
        assert_eq!(
            effects.credit_draws.get(&credit).map(|d| d.get()),
            Some(100)
        );
        assert!(effects.entries.iter().all(|e| e.reserved_delta == 0));
    }

    /// A snapshot holding reservation 9 (500 of budget `b`, not a credit) whose TTL ended a
    /// minute ago, swept (`resolution`) or not.
    fn with_lapsed(resolution: Option<Resolution>) -> (Snapshot, Uuid) {
        let now = Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap();
        let (mut snapshot, credit) = with_credit(
            now,
            now.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc(),
        );
        let mut lapsed = snapshot.reservations.remove(&credit).unwrap();
        lapsed.id = Uuid::from_u128(9);
        lapsed.is_credit = false;
        lapsed.expires_at = now - Duration::minutes(1);
        lapsed.resolution = resolution;
        if resolution.is_some() {
            // Swept earlier: its 500 is back in the window.
            for window in snapshot.windows.values_mut() {
                window.reserved = NanoUsd::ZERO;
            }
        } else {
            snapshot.expired_candidates.push(lapsed.id);
        }
        snapshot.reservations.insert(lapsed.id, lapsed.clone());
        (snapshot, lapsed.id)
    }

    fn commit_of(id: Uuid, actual: i64) -> Command {
        Command::Commit(Commit {
            tenant_id: TENANT.into(),
            reservation_id: id,
            actual: NanoUsd::new(actual).unwrap(),
            fencing: Fencing {
                scope_id: SCOPE.into(),
                epoch: 1,
            },
        })
    }

    #[test]
    fn a_commit_after_the_ttl_is_booked_late_in_one_resolution() {
        // Swept and committed in one batch: one resolution of the row (a statement cannot update
        // a row twice), carrying the late usage; an expire entry and an overrun entry.
        let (snapshot, id) = with_lapsed(None);
        let (outcomes, effects) =
            plan_batch(snapshot, &[Command::SweepExpired(10), commit_of(id, 300)]);
        let Ok(Outcome::Committed {
            resolution,
            replayed: false,
            ..
        }) = &outcomes[1]
        else {
            panic!("{outcomes:?}")
        };
        assert_eq!(resolution.state, ReservationState::Expired);
        assert_eq!(
            (
                resolution.actual.get(),
                resolution.overrun.get(),
                resolution.released.get()
            ),
            (300, 300, 500)
        );
        assert_eq!(
            resolution.epoch, 1,
            "the committing epoch marks a late commit"
        );
        assert_eq!(effects.resolutions, vec![(id, *resolution)]);
        assert!(effects.late_usage.is_empty() && effects.only_moves_money());
        let deltas: Vec<(EntryKind, i64, i64)> = effects
            .entries
            .iter()
            .map(|e| (e.kind, e.reserved_delta, e.overrun_delta))
            .collect();
        assert_eq!(
            deltas,
            [(EntryKind::Expire, -500, 0), (EntryKind::Overrun, 0, 300)]
        );

        // Swept in an earlier batch: the stored row takes the late usage (the load path only).
        let swept = Resolution {
            state: ReservationState::Expired,
            actual: NanoUsd::ZERO,
            committed: NanoUsd::ZERO,
            released: NanoUsd::new(500).unwrap(),
            overrun: NanoUsd::ZERO,
            epoch: 0,
        };
        let (snapshot, id) = with_lapsed(Some(swept));
        let (outcomes, effects) = plan_batch(
            snapshot,
            &[commit_of(id, 300), commit_of(id, 300), commit_of(id, 301)],
        );
        assert!(matches!(
            outcomes[0],
            Ok(Outcome::Committed {
                replayed: false,
                ..
            })
        ));
        assert!(matches!(
            outcomes[1],
            Ok(Outcome::Committed { replayed: true, .. })
        ));
        assert_eq!(
            outcomes[2].as_ref().unwrap_err().code(),
            crate::ErrorCode::IdempotencyConflict
        );
        assert_eq!(
            effects.late_usage,
            vec![(id, NanoUsd::new(300).unwrap(), 1)]
        );
        assert!(effects.resolutions.is_empty() && !effects.only_moves_money());

        // A late commit of 0 is a commit too: it books nothing, and another actual conflicts.
        let (snapshot, id) = with_lapsed(Some(swept));
        let (outcomes, effects) = plan_batch(snapshot, &[commit_of(id, 0), commit_of(id, 300)]);
        assert!(matches!(
            outcomes[0],
            Ok(Outcome::Committed {
                replayed: false,
                ..
            })
        ));
        assert_eq!(
            outcomes[1].as_ref().unwrap_err().code(),
            crate::ErrorCode::IdempotencyConflict
        );
        assert_eq!(effects.late_usage, vec![(id, NanoUsd::ZERO, 1)]);
        assert!(effects.entries.is_empty(), "nothing to book");
    }

    #[test]
    fn only_opening_a_credit_changes_a_reservations_fingerprint() {
        let Command::ReserveSet(drawn) = draw(Uuid::from_u128(7), 100) else {
            unreachable!()
        };
        let plain = ReserveSet {
            credit: Credit::None,
            ..drawn.clone()
        };
        let open = ReserveSet {
            credit: Credit::Open,
            ..drawn.clone()
        };
        // An ordinary request serializes as it did before credits existed.
        let json = serde_json::to_value(&plain).unwrap();
        assert!(json.get("credit").is_none(), "{json}");
        // A draw is the same call whichever credit funds it.
        let other_credit = ReserveSet {
            credit: Credit::DrawFrom(Uuid::from_u128(8)),
            ..drawn.clone()
        };
        assert_eq!(drawn.fingerprint(), plain.fingerprint());
        assert_eq!(other_credit.fingerprint(), plain.fingerprint());
        assert_ne!(open.fingerprint(), plain.fingerprint());
        assert_eq!(
            reservation_id_for(&drawn.tenant_id, &drawn.idempotency_key),
            drawn.reservation_id()
        );
    }

    #[test]
    fn two_acquires_with_one_request_id_in_one_batch_are_one_acquire_and_its_replay() {
        let now = Utc.with_ymd_and_hms(2026, 11, 28, 6, 0, 0).unwrap();
        let (snapshot, _) = with_credit(now, now);
        let acquire = |expected_epoch: u64, request_id: &str| {
            Command::AcquireLease(AcquireLease {
                scope_id: SCOPE.into(),
                tenant_id: TENANT.into(),
                workload_instance_id: "w".into(),
                ttl_ms: 10_000,
                expected_epoch,
                force: false,
                request_id: Some(request_id.into()),
            })
        };
        let (outcomes, effects) = plan_batch(
            snapshot,
            &[
                acquire(0, "start"),
                acquire(0, "start"),
                acquire(1, "start"),
            ],
        );
        let Ok(Outcome::Lease {
            grant: first,
            replayed: false,
        }) = &outcomes[0]
        else {
            panic!("{outcomes:?}")
        };
        assert_eq!(
            (first.outcome, first.state.epoch),
            (LeaseOutcome::Restarted, 2)
        );
        assert_eq!(
            outcomes[1],
            Ok(Outcome::Lease {
                grant: first.clone(),
                replayed: true
            })
        );
        assert_eq!(
            outcomes[2].as_ref().unwrap_err().code(),
            crate::ErrorCode::IdempotencyConflict
        );
        assert_eq!(effects.lease_events.len(), 1, "one history row");
        assert_eq!(
            effects.lease_events[0]
                .request
                .as_ref()
                .map(|(id, _)| id.as_str()),
            Some("start")
        );
        assert_eq!(effects.events.len(), 1, "one audit event");
    }
}
