//! ContractBundle controller: compiles the contract and its PricingVersion into one hashed bundle
//! (`core::contract::Bundle`) in a ConfigMap that sidecars mount. The bundle's sha256 is in status;
//! a sidecar refuses a bundle whose bytes do not hash to it.

use crate::Context;
use crate::controller::pricing_version::snapshot;
use crate::error::Error;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use spendguard_core::NanoUsd;
use spendguard_core::contract::{Bundle, Contract, FailPolicy, UnknownModelPolicy};
use spendguard_core::pricing::Pricing;
use spendguard_crds::condition::Condition;
use spendguard_crds::contract_bundle::{self as crd, ContractBundle, ContractBundleStatus};
use spendguard_crds::money::Usd;
use spendguard_crds::pricing_version::PricingVersion;
use spendguard_proto::ledger::v1 as pb;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{instrument, warn};

use super::FIELD_MANAGER;
/// Retry while the referenced PricingVersion is missing or invalid.
const WAIT_FOR_PRICING: Duration = Duration::from_secs(10);

/// Name of the ConfigMap holding a bundle.
pub fn config_map_name(bundle: &ContractBundle) -> String {
    format!("spendguard-bundle-{}", bundle.name_any())
}

fn nano(usd: &Usd) -> Result<NanoUsd, Error> {
    let value = usd.nano_usd().map_err(Error::InvalidSpec)?;
    NanoUsd::new(value).map_err(|e| Error::InvalidSpec(e.to_string()))
}

/// The core contract a ContractBundle stands for. Its version names the object and generation,
/// so every decision records exactly which spec decided it.
///
/// # Errors
/// [`Error::InvalidSpec`] when an amount or limit is out of range.
pub fn contract(bundle: &ContractBundle) -> Result<Contract, Error> {
    let spec = &bundle.spec;
    let unknown_model = match (spec.unknown_model, &spec.unknown_model_ceiling) {
        (crd::UnknownModelPolicy::Stop, _) => UnknownModelPolicy::Stop,
        (crd::UnknownModelPolicy::ReserveCeiling, Some(ceiling)) => {
            UnknownModelPolicy::ReserveCeiling {
                ceiling_nano_usd: nano(ceiling)?,
            }
        }
        (crd::UnknownModelPolicy::ReserveCeiling, None) => {
            return Err(Error::InvalidSpec(
                "ReserveCeiling needs unknownModelCeiling".into(),
            ));
        }
    };
    Ok(Contract {
        version: format!(
            "{}/{}@{}",
            bundle.namespace().unwrap_or_default(),
            bundle.name_any(),
            bundle.meta().generation.unwrap_or(0)
        ),
        allow_models: spec.allow_models.clone(),
        deny_models: spec.deny_models.clone(),
        max_cost_per_call_nano_usd: spec.max_cost_per_call.as_ref().map(nano).transpose()?,
        per_run_limit_nano_usd: spec.per_run_limit.as_ref().map(nano).transpose()?,
        max_output_tokens: u32::try_from(spec.max_output_tokens)
            .map_err(|_| Error::InvalidSpec("maxOutputTokens out of range".into()))?,
        approval_above_soft_cap: spec.approval_above_soft_cap,
        unknown_model,
        fail_policy: match spec.fail_policy {
            crd::FailPolicy::Closed => FailPolicy::Closed,
            crd::FailPolicy::Open => FailPolicy::Open,
        },
    })
}

fn ready(bundle: &ContractBundle, status: &str, reason: &str, message: String) -> Condition {
    let previous = bundle
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    super::ready(bundle, previous, status, reason, message)
}

async fn write_status(
    ctx: &Context,
    bundle: &ContractBundle,
    status: ContractBundleStatus,
) -> Result<(), Error> {
    let api: Api<ContractBundle> =
        Api::namespaced(ctx.kube.clone(), &bundle.namespace().unwrap_or_default());
    super::patch_status(&api, bundle, &status).await
}

/// Compiles the bundle into its ConfigMap and reports its identity.
///
/// # Errors
/// Kubernetes API failures and invalid specs; a missing or invalid PricingVersion is reported
/// as `Ready=False` and retried.
#[instrument(skip_all, fields(object = %bundle.name_any(), namespace = ?bundle.namespace()))]
pub async fn reconcile(bundle: Arc<ContractBundle>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = bundle.namespace().unwrap_or_default();
    let pricing_api: Api<PricingVersion> = Api::all(ctx.kube.clone());
    let waiting = |reason: &str, message: String| ContractBundleStatus {
        conditions: vec![ready(&bundle, "False", reason, message)],
        observed_generation: bundle.meta().generation.unwrap_or(0),
        ..ContractBundleStatus::default()
    };
    let Some(pricing) = pricing_api
        .get_opt(&bundle.spec.pricing_version)
        .await
        .map_err(Error::Kube)?
    else {
        let message = format!(
            "PricingVersion {} does not exist",
            bundle.spec.pricing_version
        );
        write_status(&ctx, &bundle, waiting("PricingVersionNotFound", message)).await?;
        return Ok(Action::requeue(WAIT_FOR_PRICING));
    };
    let snapshot = snapshot(&pricing);
    if let Err(e) = Pricing::new(snapshot.clone()) {
        write_status(
            &ctx,
            &bundle,
            waiting("PricingVersionInvalid", e.to_string()),
        )
        .await?;
        return Ok(Action::requeue(WAIT_FOR_PRICING));
    }
    let contract = contract(&bundle)?;
    register_pricing(&ctx, &bundle.spec.tenant, &snapshot).await?;
    let (bytes, sha256) =
        Bundle::canonical(&contract, &snapshot).map_err(|e| Error::InvalidSpec(e.to_string()))?;
    let budgets: Vec<String> = bundle
        .spec
        .budgets
        .iter()
        .map(|b| format!("{namespace}/{b}"))
        .collect();
    let mut data = BTreeMap::new();
    data.insert(
        "bundle.json".to_owned(),
        String::from_utf8(bytes).map_err(|e| Error::InvalidSpec(e.to_string()))?,
    );
    data.insert("bundle.sha256".to_owned(), sha256.clone());
    data.insert("tenant".to_owned(), bundle.spec.tenant.clone());
    data.insert("budgets".to_owned(), budgets.join(","));
    let config_map = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(&bundle),
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "spendguard", "spendguard.io/contract-bundle": bundle.name_any()},
            "ownerReferences": bundle.controller_owner_ref(&()).map(|o| vec![o]).unwrap_or_default(),
        },
        "data": data,
    });
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.kube.clone(), &namespace);
    config_maps
        .patch(
            &config_map_name(&bundle),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&config_map),
        )
        .await
        .map_err(Error::Kube)?;
    let status = ContractBundleStatus {
        bundle_sha256: sha256,
        config_map: config_map_name(&bundle),
        observed_generation: bundle.meta().generation.unwrap_or(0),
        conditions: vec![ready(
            &bundle,
            "True",
            "Compiled",
            "bundle compiled into its ConfigMap".into(),
        )],
    };
    write_status(&ctx, &bundle, status).await?;
    Ok(Action::await_change())
}

/// Registers the snapshot for the bundle's tenant, so the ledger accepts reservations priced
/// with it and refuses any other version or hash (PRICING_UNKNOWN). Idempotent.
async fn register_pricing(
    ctx: &Context,
    tenant: &str,
    snapshot: &spendguard_core::pricing::PricingSnapshot,
) -> Result<(), Error> {
    let pricing = Pricing::new(snapshot.clone()).map_err(|e| Error::InvalidSpec(e.to_string()))?;
    let mut ledger = ctx.ledger.clone();
    ledger
        .upsert_tenant(pb::UpsertTenantRequest {
            tenant_id: tenant.to_owned(),
            display_name: tenant.to_owned(),
        })
        .await
        .map_err(|s| Error::ledger(&s))?;
    ledger
        .register_pricing(pb::RegisterPricingRequest {
            tenant_id: tenant.to_owned(),
            pricing: Some(pb::PricingRef {
                version: pricing.version().to_owned(),
                sha256_hex: pricing.sha256_hex().to_owned(),
            }),
        })
        .await
        .map_err(|s| Error::ledger(&s))?;
    Ok(())
}

/// Reports the failure and retries.
pub fn error_policy(bundle: Arc<ContractBundle>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(object = %bundle.name_any(), %error, "contract bundle reconcile failed");
    let status = ContractBundleStatus {
        conditions: vec![ready(&bundle, "False", error.reason(), error.to_string())],
        ..bundle.status.clone().unwrap_or_default()
    };
    tokio::spawn(async move {
        if let Err(e) = write_status(&ctx, &bundle, status).await {
            warn!(error = %e, "writing failure condition failed");
        }
    });
    Action::requeue(Duration::from_secs(5))
}

/// Runs the ContractBundle controller until its watch ends. A PricingVersion change requeues
/// the bundles that use it.
pub async fn run(ctx: Context) {
    let bundles: Api<ContractBundle> = Api::all(ctx.kube.clone());
    let pricing: Api<PricingVersion> = Api::all(ctx.kube.clone());
    let controller = Controller::new(bundles, watcher::Config::default());
    let store = controller.store();
    controller
        .watches(
            pricing,
            watcher::Config::default(),
            move |version: PricingVersion| {
                let name = version.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|b| b.spec.pricing_version == name)
                    .map(|b| kube::runtime::reflector::ObjectRef::from_obj(&*b))
                    .collect::<Vec<_>>()
            },
        )
        .run(reconcile, error_policy, Arc::new(ctx))
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "contract bundle controller event failed");
            }
        })
        .await;
}
