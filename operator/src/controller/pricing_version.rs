//! PricingVersion controller: validates the price list with the same code the sidecar uses and
//! publishes its identity (sha256 of the canonical snapshot) in status. Bundles refer to it.

use crate::Context;
use crate::error::Error;
use futures::StreamExt;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use spendguard_core::pricing::{ModelPrice, PriceEntry, Pricing, PricingSnapshot, Provider};
use spendguard_crds::condition::Condition;
use spendguard_crds::pricing_version::{self as crd, PricingVersion, PricingVersionStatus};
use std::sync::Arc;
use std::time::Duration;
use tracing::{instrument, warn};

/// The snapshot a PricingVersion stands for; its `version` is the object's name.
pub fn snapshot(pricing: &PricingVersion) -> PricingSnapshot {
    PricingSnapshot {
        version: pricing.name_any(),
        entries: pricing
            .spec
            .entries
            .iter()
            .map(|e| PriceEntry {
                provider: match e.provider {
                    crd::Provider::Openai => Provider::Openai,
                    crd::Provider::Anthropic => Provider::Anthropic,
                },
                model: e.model.clone(),
                aliases: e.aliases.clone(),
                price: ModelPrice {
                    input: e.price.input,
                    cached_input: e.price.cached_input,
                    cache_write: e.price.cache_write,
                    cache_write_1h: e.price.cache_write_1h,
                    output: e.price.output,
                    reasoning: e.price.reasoning,
                },
            })
            .collect(),
    }
}

fn condition(pricing: &PricingVersion, status: &str, reason: &str, message: String) -> Condition {
    let previous = pricing
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    super::ready(pricing, previous, status, reason, message)
}

/// Validates the prices and writes identity and Ready to status.
///
/// # Errors
/// When status cannot be written (invalid prices are reported in status, not as errors).
#[instrument(skip_all, fields(object = %pricing.name_any()))]
pub async fn reconcile(pricing: Arc<PricingVersion>, ctx: Arc<Context>) -> Result<Action, Error> {
    let status = match Pricing::new(snapshot(&pricing)) {
        Ok(valid) => PricingVersionStatus {
            sha256: valid.sha256_hex().to_owned(),
            models: i64::try_from(pricing.spec.entries.len()).unwrap_or(i64::MAX),
            conditions: vec![condition(
                &pricing,
                "True",
                "Valid",
                "prices are valid and frozen".into(),
            )],
        },
        Err(e) => PricingVersionStatus {
            sha256: String::new(),
            models: 0,
            conditions: vec![condition(
                &pricing,
                "False",
                "InvalidPricing",
                e.to_string(),
            )],
        },
    };
    let api: Api<PricingVersion> = Api::all(ctx.kube.clone());
    super::patch_status(&api, pricing.as_ref(), &status).await?;
    // The spec is immutable: nothing changes until the object does.
    Ok(Action::await_change())
}

/// Retries failed status writes.
pub fn error_policy(pricing: Arc<PricingVersion>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(object = %pricing.name_any(), %error, "pricing version reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the PricingVersion controller until its watch ends.
pub async fn run(ctx: Context) {
    let api: Api<PricingVersion> = Api::all(ctx.kube.clone());
    Controller::new(api, watcher::Config::default())
        .run(reconcile, error_policy, Arc::new(ctx))
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "pricing version controller event failed");
            }
        })
        .await;
}
