//! `ContractBundle`: a workflow's spending contract, compiled with its pricing into a hashed
//! bundle that sidecars mount.

use crate::condition::{Condition, conditions_schema};
use crate::money::Usd;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What to do with a model that has no price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UnknownModelPolicy {
    /// Refuse the call (default).
    Stop,
    /// Reserve `unknownModelCeiling` instead.
    ReserveCeiling,
}

/// What to do when the ledger is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FailPolicy {
    /// Refuse the call (default).
    Closed,
    /// Let it through, marked fail_open in the evidence.
    Open,
}

/// What to do with a call priced from a PricingVersion older than `pricingMaxAgeHours`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum StalePricingPolicy {
    /// Refuse the call, PRICING_STALE (default).
    Stop,
    /// Decide it as usual and mark its evidence pricing_stale.
    Continue,
}

fn default_stale() -> StalePricingPolicy {
    StalePricingPolicy::Stop
}

fn default_true() -> bool {
    true
}

fn default_unknown() -> UnknownModelPolicy {
    UnknownModelPolicy::Stop
}

fn default_fail() -> FailPolicy {
    FailPolicy::Closed
}

/// A contract for the workloads that mount this bundle.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "spendguard.io",
    version = "v1alpha1",
    kind = "ContractBundle",
    namespaced,
    status = "ContractBundleStatus",
    shortname = "sgcontract",
    category = "spendguard",
    doc = "A spending contract plus the pricing it uses, compiled into a bundle for sidecars.",
    printcolumn(name = "Tenant", type_ = "string", json_path = ".spec.tenant"),
    printcolumn(name = "Pricing", type_ = "string", json_path = ".spec.pricingVersion"),
    printcolumn(
        name = "Bundle",
        type_ = "string",
        json_path = ".status.bundleSha256",
        priority = 1
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.unknownModel != 'ReserveCeiling' || has(self.unknownModelCeiling)", "message": "unknownModel ReserveCeiling needs unknownModelCeiling"},
    {"rule": "!has(self.allowModels) || !has(self.denyModels) || self.allowModels.all(m, !(m in self.denyModels))", "message": "a model cannot be both allowed and denied"}
]))]
pub struct ContractBundleSpec {
    /// Tenant.
    #[schemars(length(min = 1, max = 63))]
    pub tenant: String,
    /// Name of the PricingVersion to price calls with.
    #[schemars(length(min = 1, max = 253))]
    pub pricing_version: String,
    /// Budgets every call reserves against (names of Budgets in this namespace). At most 7: a
    /// ReserveSet holds 8 budgets, and a call with a run id adds its run's own. Each becomes the
    /// ledger budget `<namespace>/<name>`, at most 253 characters, so a name is at most 189.
    #[schemars(
        length(min = 1, max = 7),
        inner(
            length(min = 1, max = 189),
            regex(pattern = r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
        )
    )]
    pub budgets: Vec<String>,
    /// Models allowed (empty: every priced model).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 200)))]
    pub allow_models: Vec<String>,
    /// Models refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 200)))]
    pub deny_models: Vec<String>,
    /// Largest worst-case cost of one call, in USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_per_call: Option<Usd>,
    /// Limit of each run's own budget, in USD: calls carrying a run id (the
    /// `x-spendguard-run-id` header or the SDK's run_id) also reserve against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_run_limit: Option<Usd>,
    /// Output-token cap.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_output_tokens: i64,
    /// Require approval past a budget's soft cap.
    #[serde(default = "default_true")]
    pub approval_above_soft_cap: bool,
    /// Unknown-model handling.
    #[serde(default = "default_unknown")]
    pub unknown_model: UnknownModelPolicy,
    /// Ceiling reserved for a call to an unknown model, per completion asked for, in USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown_model_ceiling: Option<Usd>,
    /// Ledger-unavailable handling.
    #[serde(default = "default_fail")]
    pub fail_policy: FailPolicy,
    /// The oldest pricing accepted, in hours since the PricingVersion's `publishedAt` (which it
    /// then must have). Unset: any age.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 87_600))]
    pub pricing_max_age_hours: Option<i64>,
    /// What a call priced from older pricing gets.
    #[serde(default = "default_stale")]
    pub on_stale_pricing: StalePricingPolicy,
}

/// What the operator reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContractBundleStatus {
    /// sha256 of the compiled bundle.
    #[serde(default)]
    pub bundle_sha256: String,
    /// ConfigMap holding the bundle.
    #[serde(default)]
    pub config_map: String,
    /// Generation last reconciled.
    #[serde(default)]
    pub observed_generation: i64,
    /// Conditions, keyed by type.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}
