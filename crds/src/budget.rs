//! `Budget`: a spending limit in the ledger.

use crate::condition::{Condition, conditions_schema};
use crate::money::Usd;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How a budget renews.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum BudgetWindow {
    /// Never renews.
    Lifetime,
    /// Renews at 00:00 UTC.
    CalendarDayUTC,
    /// Renews at 00:00 UTC on the 1st.
    CalendarMonthUTC,
}

/// A budget of one tenant.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "spendguard.io",
    version = "v1alpha1",
    kind = "Budget",
    namespaced,
    status = "BudgetStatus",
    shortname = "sgbudget",
    category = "spendguard",
    doc = "A SpendGuard budget: no LLM call may spend past its limit.",
    printcolumn(name = "Tenant", type_ = "string", json_path = ".spec.tenant"),
    printcolumn(name = "Limit", type_ = "string", json_path = ".spec.limit"),
    printcolumn(name = "Committed", type_ = "string", json_path = ".status.committed"),
    printcolumn(name = "Remaining", type_ = "string", json_path = ".status.remaining"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.softCap) || double(self.softCap) <= double(self.limit)", "message": "softCap must not exceed limit"},
    {"rule": "self.tenant == oldSelf.tenant", "message": "tenant is immutable"}
]))]
pub struct BudgetSpec {
    /// Tenant the budget belongs to.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
    )]
    pub tenant: String,
    /// Hard cap per window, in USD.
    pub limit: Usd,
    /// Approval threshold, in USD (at most the limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_cap: Option<Usd>,
    /// Renewal.
    pub window: BudgetWindow,
}

/// What the operator reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BudgetStatus {
    /// Effective limit of the current window, in USD.
    #[serde(default)]
    pub limit: String,
    /// Reserved in the current window, in USD.
    #[serde(default)]
    pub reserved: String,
    /// Committed in the current window, in USD.
    #[serde(default)]
    pub committed: String,
    /// What new reservations may still take, in USD.
    #[serde(default)]
    pub remaining: String,
    /// Generation last reconciled.
    #[serde(default)]
    pub observed_generation: i64,
    /// Conditions, keyed by type.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}
