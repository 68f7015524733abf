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
use spendguard_core::contract::{
    Bundle, Contract, FailPolicy, PricingMaxAge, StalePricingAction, UnknownModelPolicy,
};
use spendguard_core::pricing::Pricing;
use spendguard_crds::condition::Condition;
use spendguard_crds::contract_bundle::{self as crd, ContractBundle, ContractBundleStatus};
use spendguard_crds::money::Usd;
use spendguard_crds::pricing_version::PricingVersion;
use spendguard_proto::ledger::v1 as pb;
use std::collections::BTreeMap;
use std::sync::Arc;
use tracing::{instrument, warn};

use super::FIELD_MANAGER;

/// Label naming the ContractBundle a ConfigMap holds; the controller watches only those.
const BUNDLE_LABEL: &str = "spendguard.io/contract-bundle";

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
        pricing_max_age: spec
            .pricing_max_age_hours
            .map(|hours| {
                Ok::<_, Error>(PricingMaxAge {
                    hours: u32::try_from(hours).map_err(|_| {
                        Error::InvalidSpec("pricingMaxAgeHours out of range".into())
                    })?,
                    on_stale: match spec.on_stale_pricing {
                        crd::StalePricingPolicy::Stop => StalePricingAction::Stop,
                        crd::StalePricingPolicy::Continue => StalePricingAction::Continue,
                    },
                })
            })
            .transpose()?,
    })
}

fn conditions(bundle: &ContractBundle) -> &[Condition] {
    bundle
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

fn ready(bundle: &ContractBundle, status: &str, reason: &str, message: String) -> Condition {
    super::ready(bundle, conditions(bundle), status, reason, message)
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
/// Kubernetes API failures, invalid specs, and a missing or invalid PricingVersion; the error
/// policy reports each as `Ready=False` and retries (a PricingVersion change also requeues).
#[instrument(skip_all, fields(object = %bundle.name_any(), namespace = ?bundle.namespace()))]
pub async fn reconcile(bundle: Arc<ContractBundle>, ctx: Arc<Context>) -> Result<Action, Error> {
    super::observed(&ctx, bundle.as_ref(), compile(&bundle, &ctx)).await
}

async fn compile(bundle: &ContractBundle, ctx: &Context) -> Result<Action, Error> {
    let namespace = bundle.namespace().unwrap_or_default();
    let pricing_api: Api<PricingVersion> = Api::all(ctx.kube.clone());
    let name = &bundle.spec.pricing_version;
    let Some(pricing) = pricing_api.get_opt(name).await.map_err(Error::Kube)? else {
        return Err(Error::PricingVersionNotFound(name.clone()));
    };
    let snapshot = snapshot(&pricing);
    if let Err(e) = Pricing::new(snapshot.clone()) {
        return Err(Error::PricingVersionInvalid {
            name: name.clone(),
            message: e.to_string(),
        });
    }
    let contract = contract(bundle)?;
    // Checked before anything is written: a contract that limits the age of undated pricing is
    // an invalid spec.
    let (bytes, sha256) =
        Bundle::canonical(&contract, &snapshot).map_err(|e| Error::InvalidSpec(e.to_string()))?;
    // A bundle compiled before had its pricing registered then (registrations are immutable):
    // its ConfigMap is applied first, so an edited or deleted one is put back even while the
    // ledger is away. A new bundle's pricing is registered first, so no sidecar loads a bundle
    // the ledger would refuse (PRICING_UNKNOWN).
    let compiled_before = bundle
        .status
        .as_ref()
        .is_some_and(|s| s.bundle_sha256 == sha256);
    if !compiled_before {
        register_pricing(ctx, &bundle.spec.tenant, &snapshot).await?;
    }
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
            "name": config_map_name(bundle),
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "spendguard", BUNDLE_LABEL: bundle.name_any()},
            "ownerReferences": bundle.controller_owner_ref(&()).map(|o| vec![o]).unwrap_or_default(),
        },
        "data": data,
    });
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.kube.clone(), &namespace);
    config_maps
        .patch(
            &config_map_name(bundle),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&config_map),
        )
        .await
        .map_err(Error::Kube)?;
    if compiled_before {
        // Again, idempotent: a ledger restored from an older backup gets it back.
        register_pricing(ctx, &bundle.spec.tenant, &snapshot).await?;
    }
    let condition = ready(
        bundle,
        "True",
        "Compiled",
        "bundle compiled into its ConfigMap".into(),
    );
    let status = ContractBundleStatus {
        bundle_sha256: sha256,
        config_map: config_map_name(bundle),
        observed_generation: bundle.meta().generation.unwrap_or(0),
        conditions: vec![condition.clone()],
    };
    write_status(ctx, bundle, status).await?;
    ctx.events
        .on_transition(bundle, conditions(bundle), &condition)
        .await;
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

/// Reports the failure as `Ready=False` (and a Warning Event when that changes the condition)
/// and retries with a per-object backoff. The last compiled ConfigMap and its hash stay in
/// status: sidecars keep using them until a new bundle compiles.
pub fn error_policy(bundle: Arc<ContractBundle>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(object = %bundle.name_any(), %error, "contract bundle reconcile failed");
    let condition = ready(&bundle, "False", error.reason(), error.to_string());
    let previous = conditions(&bundle).to_vec();
    let status = ContractBundleStatus {
        conditions: vec![condition.clone()],
        ..bundle.status.clone().unwrap_or_default()
    };
    let delay = ctx.backoff.failed(&super::object_key(bundle.as_ref()));
    let api = Api::namespaced(ctx.kube.clone(), &bundle.namespace().unwrap_or_default());
    super::report_failure(&ctx, api, bundle, previous, condition, status);
    Action::requeue(delay)
}

/// Runs the ContractBundle controller until its watch ends. A PricingVersion change requeues
/// the bundles that use it. A change to a bundle's ConfigMap (an edit, a deletion) requeues its
/// bundle, whose reconcile applies the compiled content again: sidecars trust the ConfigMap
/// (its hash sits beside it), so it is re-asserted rather than left as someone edited it.
pub async fn run(ctx: Context) {
    let bundles: Api<ContractBundle> = Api::all(ctx.kube.clone());
    let pricing: Api<PricingVersion> = Api::all(ctx.kube.clone());
    let config_maps: Api<ConfigMap> = Api::all(ctx.kube.clone());
    let controller = Controller::new(bundles, watcher::Config::default());
    let store = controller.store();
    controller
        .owns(config_maps, watcher::Config::default().labels(BUNDLE_LABEL))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_apiserver::{self, ApiServer, ready_condition};
    use http::Method;
    use serde_json::{Value, json};
    use std::time::Duration;

    const PRICING_PATH: &str = "/apis/spendguard.io/v1alpha1/pricingversions/p1";
    const STATUS_PATH: &str =
        "/apis/spendguard.io/v1alpha1/namespaces/team/contractbundles/agent/status";

    fn bundle(extra_spec: Value) -> Value {
        let mut object = json!({
            "apiVersion": "spendguard.io/v1alpha1",
            "kind": "ContractBundle",
            "metadata": {"name": "agent", "namespace": "team", "uid": "u-2", "generation": 3},
            "spec": {"tenant": "acme", "pricingVersion": "p1", "budgets": ["b1"],
                "maxOutputTokens": 4096},
        });
        for (key, value) in extra_spec.as_object().unwrap() {
            object["spec"][key] = value.clone();
        }
        object
    }

    fn pricing(aliases: &[&str]) -> Value {
        json!({
            "apiVersion": "spendguard.io/v1alpha1",
            "kind": "PricingVersion",
            "metadata": {"name": "p1", "uid": "u-1"},
            "spec": {"entries": [{"provider": "openai", "model": "gpt-5", "aliases": aliases,
                "price": {"input": 1, "cachedInput": 1, "cacheWrite": 1, "output": 2}}]},
        })
    }

    fn parse(object: &Value) -> Arc<ContractBundle> {
        Arc::new(serde_json::from_value(object.clone()).unwrap())
    }

    /// Runs the error policy for `error` and asserts its status patch (Ready=False with the
    /// error's reason) and Warning Event.
    async fn assert_reported(
        api: &mut ApiServer,
        object: &Value,
        ctx: Arc<Context>,
        error: &Error,
    ) {
        let action = error_policy(parse(object), error, ctx);
        assert_eq!(action, Action::requeue(Duration::from_secs(1)));
        let body = api.expect_apply(STATUS_PATH, object).await;
        let ready = ready_condition(&body);
        assert_eq!(
            (&ready["status"], &ready["reason"]),
            (&json!("False"), &json!(error.reason()))
        );
        assert_eq!(ready["observedGeneration"], 3);
        assert_eq!(ready["message"], error.to_string());
        let event = api.expect_event("team").await;
        assert_eq!(
            (&event["type"], &event["reason"]),
            (&json!("Warning"), &json!(error.reason()))
        );
        assert_eq!(
            (&event["regarding"]["kind"], &event["regarding"]["name"]),
            (&json!("ContractBundle"), &json!("agent"))
        );
    }

    // Goal: a bundle whose PricingVersion does not exist asks for it once, then reports
    // Ready=False PricingVersionNotFound with a Warning Event and retries with backoff.
    // Method: the mock answers the GET with 404.
    #[tokio::test]
    async fn a_missing_pricing_version_is_reported_and_retried() {
        let (ctx, mut api, _registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let object = bundle(json!({}));
        let task = tokio::spawn(reconcile(parse(&object), ctx.clone()));
        api.expect(Method::GET, PRICING_PATH).await.not_found();
        let error = task.await.unwrap().unwrap_err();
        assert!(matches!(&error, Error::PricingVersionNotFound(name) if name == "p1"));
        assert_reported(&mut api, &object, ctx.clone(), &error).await;
        // The next failure waits longer.
        let again = error_policy(parse(&object), &error, ctx);
        assert_eq!(again, Action::requeue(Duration::from_secs(2)));
    }

    // Goal: a PricingVersion core::pricing refuses is never compiled into a bundle.
    // Method: the GET returns prices with a duplicate name; nothing but status and the Event
    // follow (no ConfigMap, no ledger call).
    #[tokio::test]
    async fn an_invalid_pricing_version_is_reported() {
        let (ctx, mut api, _registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let object = bundle(json!({}));
        let task = tokio::spawn(reconcile(parse(&object), ctx.clone()));
        api.expect(Method::GET, PRICING_PATH)
            .await
            .respond(http::StatusCode::OK, &pricing(&["gpt-5"]));
        let error = task.await.unwrap().unwrap_err();
        assert_eq!(error.reason(), "PricingVersionInvalid");
        api.expect_no_request().await;
        assert_reported(&mut api, &object, ctx, &error).await;
    }

    // Goal: a spec the CRD schema lets through but the contract cannot use (ReserveCeiling
    // without a ceiling) is InvalidSpec, found before the ledger or a ConfigMap is touched.
    #[tokio::test]
    async fn an_unusable_spec_is_invalid_spec() {
        let (ctx, mut api, _registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let object = bundle(json!({"unknownModel": "ReserveCeiling"}));
        let task = tokio::spawn(reconcile(parse(&object), ctx.clone()));
        api.expect(Method::GET, PRICING_PATH)
            .await
            .respond(http::StatusCode::OK, &pricing(&[]));
        let error = task.await.unwrap().unwrap_err();
        assert_eq!(error.reason(), "InvalidSpec");
        api.expect_no_request().await;
        assert_reported(&mut api, &object, ctx, &error).await;
    }

    // Goal: a failure keeps the last compiled hash and ConfigMap in status (sidecars still use
    // them) and, when the condition already says so, publishes no second Event.
    #[tokio::test]
    async fn a_repeated_failure_keeps_the_compiled_bundle_and_stays_quiet() {
        let (ctx, mut api, _registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let mut object = bundle(json!({}));
        object["status"] = json!({"bundleSha256": "abc", "configMap": "spendguard-bundle-agent",
            "observedGeneration": 2, "conditions": [{"type": "Ready", "status": "False",
            "reason": "PricingVersionNotFound", "message": "m",
            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 2}]});
        let error = Error::PricingVersionNotFound("p1".into());
        error_policy(parse(&object), &error, ctx);
        let body = api.expect_apply(STATUS_PATH, &object).await;
        assert_eq!(body["status"]["bundleSha256"], "abc");
        assert_eq!(body["status"]["configMap"], "spendguard-bundle-agent");
        assert_eq!(
            ready_condition(&body)["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );
        api.expect_no_request().await;
    }
}
