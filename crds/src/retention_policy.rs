//! `RetentionPolicy`: how long a tenant's evidence and payloads are kept (S19).

use crate::condition::{Condition, conditions_schema};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Retention for one tenant.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "spendguard.io",
    version = "v1alpha1",
    kind = "RetentionPolicy",
    namespaced,
    status = "RetentionPolicyStatus",
    shortname = "sgretention",
    category = "spendguard",
    doc = "How long audit evidence and prompt payloads are kept for a tenant.",
    printcolumn(name = "Tenant", type_ = "string", json_path = ".spec.tenant"),
    printcolumn(
        name = "AuditDays",
        type_ = "integer",
        json_path = ".spec.auditRetentionDays"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.redactPayloadsAfterDays) || self.redactPayloadsAfterDays <= self.auditRetentionDays", "message": "payloads cannot outlive the audit records they belong to"}
]))]
pub struct RetentionPolicySpec {
    /// Tenant.
    #[schemars(length(min = 1, max = 63))]
    pub tenant: String,
    /// Days audit evidence is kept.
    #[schemars(range(min = 1, max = 3650))]
    pub audit_retention_days: i64,
    /// Days after which prompt/response payloads are redacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3650))]
    pub redact_payloads_after_days: Option<i64>,
}

/// What the operator reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionPolicyStatus {
    /// Conditions, keyed by type.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}
