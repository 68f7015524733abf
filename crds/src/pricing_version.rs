//! `PricingVersion`: an immutable price list (nano-USD per million tokens).

use crate::condition::{Condition, conditions_schema};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A model provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// OpenAI.
    Openai,
    /// Anthropic.
    Anthropic,
}

/// Prices in nano-USD per million tokens (so $0.15 per million tokens is 150000000).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelPrice {
    /// Uncached input.
    #[schemars(range(min = 0))]
    pub input: i64,
    /// Cached input.
    #[schemars(range(min = 0))]
    pub cached_input: i64,
    /// Cache writes.
    #[schemars(range(min = 0))]
    pub cache_write: i64,
    /// 1-hour cache writes (defaults to cacheWrite).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub cache_write_1h: Option<i64>,
    /// Output.
    #[schemars(range(min = 0))]
    pub output: i64,
    /// Reasoning output (defaults to output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub reasoning: Option<i64>,
}

/// One priced model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PriceEntry {
    /// Provider.
    pub provider: Provider,
    /// Model name.
    #[schemars(length(min = 1, max = 200))]
    pub model: String,
    /// Other names of the model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Prices.
    pub price: ModelPrice,
}

/// An immutable set of prices; create a new version to change prices.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "spendguard.io",
    version = "v1alpha1",
    kind = "PricingVersion",
    status = "PricingVersionStatus",
    shortname = "sgpricing",
    category = "spendguard",
    doc = "Immutable per-token prices that reservations are priced with.",
    printcolumn(name = "Models", type_ = "integer", json_path = ".status.models"),
    printcolumn(
        name = "SHA256",
        type_ = "string",
        json_path = ".status.sha256",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self == oldSelf", "message": "a PricingVersion is immutable; create a new version"}
]))]
pub struct PricingVersionSpec {
    /// When these prices were captured from the providers (RFC 3339, e.g.
    /// `2026-11-01T00:00:00Z`). A ContractBundle's `pricingMaxAgeHours` is measured from it.
    /// The pattern keeps to the RFC 3339 subset that the apiserver's `date-time` check and the
    /// sidecar's parser read alike (upper-case `T` and `Z`, no leap second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        extend("format" = "date-time"),
        regex(pattern = r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$")
    )]
    pub published_at: Option<String>,
    /// Priced models.
    #[schemars(length(min = 1, max = 2000))]
    pub entries: Vec<PriceEntry>,
}

/// What the operator reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PricingVersionStatus {
    /// sha256 of the canonical snapshot.
    #[serde(default)]
    pub sha256: String,
    /// Number of priced models.
    #[serde(default)]
    pub models: i64,
    /// Conditions, keyed by type.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}
