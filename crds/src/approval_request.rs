//! `ApprovalRequest`: the human side of REQUIRE_APPROVAL. The ledger holds the record; the
//! operator mirrors pending ones; approvers patch `status` (the webhook stamps their identity).

use crate::condition::{Condition, conditions_schema};
use crate::money::Usd;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Lifecycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ApprovalPhase {
    /// Waiting for a decision.
    #[default]
    Pending,
    /// Approved: the call may proceed.
    Approved,
    /// Denied.
    Denied,
    /// Nobody decided in time.
    Expired,
}

/// A request to spend past a soft cap.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "spendguard.io",
    version = "v1alpha1",
    kind = "ApprovalRequest",
    namespaced,
    status = "ApprovalRequestStatus",
    shortname = "sgapproval",
    category = "spendguard",
    doc = "A call waiting for a human to approve spending past a soft cap.",
    printcolumn(name = "Tenant", type_ = "string", json_path = ".spec.tenant"),
    printcolumn(name = "Amount", type_ = "string", json_path = ".spec.amount"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "DecidedBy", type_ = "string", json_path = ".status.decidedBy"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self == oldSelf", "message": "an ApprovalRequest's spec is immutable"}
]))]
pub struct ApprovalRequestSpec {
    /// Tenant.
    #[schemars(length(min = 1, max = 63))]
    pub tenant: String,
    /// Budget whose soft cap would be crossed.
    pub budget: String,
    /// Amount of the call, in USD.
    pub amount: Usd,
    /// Ledger approval id.
    pub approval_id: String,
    /// Why approval is needed.
    #[serde(default)]
    pub reason: String,
    /// Workload that asked.
    #[serde(default)]
    pub requested_by: String,
    /// When the request expires (RFC 3339).
    pub expires_at: String,
}

/// The decision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(oldSelf.phase) || oldSelf.phase == 'Pending' || self.phase == oldSelf.phase", "message": "a decided ApprovalRequest cannot change its decision"}
]))]
pub struct ApprovalRequestStatus {
    /// Phase.
    #[serde(default)]
    pub phase: ApprovalPhase,
    /// Approver identity, stamped by the admission webhook from the request's userInfo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// When it was decided (RFC 3339), stamped by the admission webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
    /// Why the approver decided as they did (`kubectl spendguard approve --reason`). Set only
    /// together with the decision; immutable afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub decision_reason: Option<String>,
    /// Conditions, keyed by type.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}
