//! Validation of SpendGuard objects beyond what the CRD schema and CEL express. Only cheap,
//! deterministic rules:
//!
//! - refused: a Budget whose soft cap exceeds its limit exactly (CEL compares doubles, which
//!   cannot tell `999999999.000000002` from `999999999.000000001`); a PricingVersion that
//!   `core::pricing` refuses (its spec is immutable, so it could never be fixed); a
//!   ContractBundle whose contract does not compile, or that names a Budget of another tenant
//!   (a Budget's tenant is immutable, so every reservation would fail).
//! - warned: references that do not exist yet (PricingVersion, Budgets) or a PricingVersion that
//!   is invalid. `kubectl apply -f dir/` creates objects in file order, so refusing a bundle
//!   whose pricing comes later would break ordinary installs; the ContractBundle controller
//!   reports and retries them (`PricingVersionNotFound`).
//!
//! Lookups that fail (apiserver trouble) become warnings, never refusals: the controllers
//! re-check everything before any bundle reaches a sidecar.

use crate::controller::contract_bundle::contract;
use crate::controller::pricing_version::snapshot;
use kube::ResourceExt;
use kube::api::Api;
use spendguard_core::pricing::Pricing;
use spendguard_crds::budget::Budget;
use spendguard_crds::contract_bundle::ContractBundle;
use spendguard_crds::pricing_version::PricingVersion;

/// A rule's stable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Budget soft cap above its limit.
    SoftCapAboveLimit,
    /// An amount that is not a valid USD amount.
    InvalidAmount,
    /// Prices `core::pricing` refuses.
    PricingInvalid,
    /// The contract does not compile.
    ContractInvalid,
    /// A bundle names a Budget of another tenant.
    TenantMismatch,
    /// The named PricingVersion does not exist (yet).
    PricingVersionNotFound,
    /// The named PricingVersion exists but is invalid.
    PricingVersionInvalid,
    /// A named Budget does not exist (yet).
    BudgetNotFound,
    /// A reference could not be checked.
    LookupFailed,
    /// The object does not deserialize as its kind.
    Malformed,
}

impl Code {
    /// Stable code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SoftCapAboveLimit => "SPENDGUARD_SOFT_CAP_ABOVE_LIMIT",
            Self::InvalidAmount => "SPENDGUARD_INVALID_AMOUNT",
            Self::PricingInvalid => "SPENDGUARD_PRICING_INVALID",
            Self::ContractInvalid => "SPENDGUARD_CONTRACT_INVALID",
            Self::TenantMismatch => "SPENDGUARD_TENANT_MISMATCH",
            Self::PricingVersionNotFound => "SPENDGUARD_PRICING_VERSION_NOT_FOUND",
            Self::PricingVersionInvalid => "SPENDGUARD_PRICING_VERSION_INVALID",
            Self::BudgetNotFound => "SPENDGUARD_BUDGET_NOT_FOUND",
            Self::LookupFailed => "SPENDGUARD_LOOKUP_FAILED",
            Self::Malformed => "SPENDGUARD_MALFORMED",
        }
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Which rule.
    pub code: Code,
    /// For humans.
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

/// What validation concluded: any refusal refuses the object; warnings reach `kubectl`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Reasons to refuse.
    pub refusals: Vec<Finding>,
    /// Things to point out.
    pub warnings: Vec<Finding>,
}

impl Verdict {
    fn refuse(&mut self, code: Code, message: String) {
        self.refusals.push(Finding { code, message });
    }

    fn warn(&mut self, code: Code, message: String) {
        self.warnings.push(Finding { code, message });
    }

    /// The refusal message (all reasons), if any.
    pub fn refusal(&self) -> Option<String> {
        (!self.refusals.is_empty()).then(|| {
            self.refusals
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

/// A Budget: soft cap at most the limit, compared exactly in nano-USD.
pub fn budget(budget: &Budget) -> Verdict {
    let mut verdict = Verdict::default();
    let limit = match budget.spec.limit.nano_usd() {
        Ok(limit) => limit,
        Err(e) => {
            verdict.refuse(Code::InvalidAmount, format!("limit: {e}"));
            return verdict;
        }
    };
    if let Some(soft_cap) = &budget.spec.soft_cap {
        match soft_cap.nano_usd() {
            Ok(cap) if cap > limit => verdict.refuse(
                Code::SoftCapAboveLimit,
                format!(
                    "softCap {} exceeds limit {} (compared exactly)",
                    soft_cap.0, budget.spec.limit.0
                ),
            ),
            Ok(_) => {}
            Err(e) => verdict.refuse(Code::InvalidAmount, format!("softCap: {e}")),
        }
    }
    verdict
}

/// A PricingVersion: the sidecar's own pricing code must accept it.
pub fn pricing_version(pricing: &PricingVersion) -> Verdict {
    let mut verdict = Verdict::default();
    if let Err(e) = Pricing::new(snapshot(pricing)) {
        verdict.refuse(
            Code::PricingInvalid,
            format!("PricingVersion {} is invalid: {e}", pricing.name_any()),
        );
    }
    verdict
}

/// A ContractBundle's own spec: it compiles into a contract, as the controller compiles it.
pub fn contract_bundle(bundle: &ContractBundle) -> Verdict {
    let mut verdict = Verdict::default();
    if let Err(e) = contract(bundle) {
        verdict.refuse(Code::ContractInvalid, e.to_string());
    }
    verdict
}

/// A ContractBundle's references: its PricingVersion and Budgets (same namespace).
pub async fn contract_bundle_references(
    client: &kube::Client,
    namespace: &str,
    bundle: &ContractBundle,
) -> Verdict {
    let mut verdict = Verdict::default();
    let pricing_name = &bundle.spec.pricing_version;
    let pricing: Api<PricingVersion> = Api::all(client.clone());
    match pricing.get_opt(pricing_name).await {
        Ok(Some(found)) => {
            if let Err(e) = Pricing::new(snapshot(&found)) {
                verdict.warn(
                    Code::PricingVersionInvalid,
                    format!("PricingVersion {pricing_name} is invalid ({e}); the bundle will not compile"),
                );
            }
        }
        Ok(None) => verdict.warn(
            Code::PricingVersionNotFound,
            format!(
                "PricingVersion {pricing_name} does not exist; the bundle compiles once it does"
            ),
        ),
        Err(e) => verdict.warn(
            Code::LookupFailed,
            format!("PricingVersion {pricing_name} could not be checked: {e}"),
        ),
    }
    let budgets: Api<Budget> = Api::namespaced(client.clone(), namespace);
    for name in &bundle.spec.budgets {
        match budgets.get_opt(name).await {
            Ok(Some(found)) if found.spec.tenant != bundle.spec.tenant => verdict.refuse(
                Code::TenantMismatch,
                format!(
                    "Budget {namespace}/{name} belongs to tenant {:?}, not to this bundle's tenant {:?}",
                    found.spec.tenant, bundle.spec.tenant
                ),
            ),
            Ok(Some(_)) => {}
            Ok(None) => verdict.warn(
                Code::BudgetNotFound,
                format!("Budget {namespace}/{name} does not exist; calls are refused until it does"),
            ),
            Err(e) => verdict.warn(
                Code::LookupFailed,
                format!("Budget {namespace}/{name} could not be checked: {e}"),
            ),
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use serde_json::json;

    fn budget_with(limit: &str, soft_cap: Option<&str>) -> Budget {
        let mut spec = json!({"tenant": "acme", "limit": limit, "window": "Lifetime"});
        if let Some(cap) = soft_cap {
            spec["softCap"] = json!(cap);
        }
        serde_json::from_value(json!({
            "apiVersion": "spendguard.io/v1alpha1", "kind": "Budget",
            "metadata": {"name": "b", "namespace": "default"}, "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn soft_caps_are_compared_exactly() {
        assert_eq!(budget(&budget_with("10", Some("10"))), Verdict::default());
        assert_eq!(budget(&budget_with("10", None)), Verdict::default());
        // Equal as doubles, so CEL lets it through; exactly, the cap is 1 nano-USD above.
        let verdict = budget(&budget_with(
            "999999999.000000001",
            Some("999999999.000000002"),
        ));
        assert_eq!(verdict.refusals.len(), 1);
        assert_eq!(verdict.refusals[0].code, Code::SoftCapAboveLimit);
        assert!(verdict.refusal().unwrap().starts_with(
            "SPENDGUARD_SOFT_CAP_ABOVE_LIMIT: softCap 999999999.000000002 exceeds limit"
        ));
        let verdict = budget(&budget_with("10", Some("10.")));
        assert_eq!(verdict.refusals[0].code, Code::InvalidAmount);
    }

    #[test]
    fn contracts_must_compile() {
        let bundle: ContractBundle = serde_json::from_value(json!({
            "apiVersion": "spendguard.io/v1alpha1", "kind": "ContractBundle",
            "metadata": {"name": "c", "namespace": "default"},
            "spec": {"tenant": "acme", "pricingVersion": "p", "budgets": ["b"], "maxOutputTokens": 10,
                     "unknownModel": "ReserveCeiling"}
        }))
        .unwrap();
        let verdict = contract_bundle(&bundle);
        assert_eq!(verdict.refusals[0].code, Code::ContractInvalid);
        assert!(verdict.refusals[0].message.contains("unknownModelCeiling"));
        let mut fixed = bundle;
        fixed.spec.unknown_model_ceiling = Some(spendguard_crds::money::Usd("0.50".into()));
        assert_eq!(contract_bundle(&fixed), Verdict::default());
    }
}
