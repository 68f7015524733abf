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
use tracing::{instrument, warn};

/// The snapshot a PricingVersion stands for; its `version` is the object's name.
pub fn snapshot(pricing: &PricingVersion) -> PricingSnapshot {
    PricingSnapshot {
        version: pricing.name_any(),
        published_at: pricing.spec.published_at.clone(),
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

fn conditions(pricing: &PricingVersion) -> &[Condition] {
    pricing
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

fn condition(pricing: &PricingVersion, status: &str, reason: &str, message: String) -> Condition {
    super::ready(pricing, conditions(pricing), status, reason, message)
}

/// Validates the prices and writes identity and Ready to status.
///
/// # Errors
/// When status cannot be written (invalid prices are reported in status, not as errors).
#[instrument(skip_all, fields(object = %pricing.name_any()))]
pub async fn reconcile(pricing: Arc<PricingVersion>, ctx: Arc<Context>) -> Result<Action, Error> {
    super::observed(&ctx, pricing.as_ref(), validate(&pricing, &ctx)).await
}

async fn validate(pricing: &PricingVersion, ctx: &Context) -> Result<Action, Error> {
    let status = match Pricing::new(snapshot(pricing)) {
        Ok(valid) => PricingVersionStatus {
            sha256: valid.sha256_hex().to_owned(),
            models: i64::try_from(pricing.spec.entries.len()).unwrap_or(i64::MAX),
            conditions: vec![condition(
                pricing,
                "True",
                "Valid",
                "prices are valid and frozen".into(),
            )],
        },
        Err(e) => PricingVersionStatus {
            sha256: String::new(),
            models: 0,
            conditions: vec![condition(pricing, "False", "InvalidPricing", e.to_string())],
        },
    };
    let api: Api<PricingVersion> = Api::all(ctx.kube.clone());
    super::patch_status(&api, pricing, &status).await?;
    ctx.events
        .on_transition(pricing, conditions(pricing), &status.conditions[0])
        .await;
    // The spec is immutable: nothing changes until the object does.
    Ok(Action::await_change())
}

/// Retries failed status writes with a per-object backoff. (The only failure is the status
/// write itself, so there is no condition to write about it.)
pub fn error_policy(pricing: Arc<PricingVersion>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(object = %pricing.name_any(), %error, "pricing version reconcile failed");
    Action::requeue(ctx.backoff.failed(&super::object_key(pricing.as_ref())))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_apiserver::{self, ready_condition};
    use serde_json::{Value, json};
    use std::time::Duration;

    const STATUS_PATH: &str = "/apis/spendguard.io/v1alpha1/pricingversions/p1/status";

    fn object(aliases: &[&str], status: Option<Value>) -> Value {
        let mut object = json!({
            "apiVersion": "spendguard.io/v1alpha1",
            "kind": "PricingVersion",
            "metadata": {"name": "p1", "uid": "u-1", "generation": 1},
            "spec": {"entries": [{
                "provider": "openai", "model": "gpt-5", "aliases": aliases,
                "price": {"input": 1, "cachedInput": 1, "cacheWrite": 1, "output": 2},
            }]},
        });
        if let Some(status) = status {
            object["status"] = status;
        }
        object
    }

    fn parse(object: &Value) -> Arc<PricingVersion> {
        Arc::new(serde_json::from_value(object.clone()).unwrap())
    }

    // Goal: a valid list publishes its sha256, model count and Ready=True, with a Normal Event
    // on the cluster-scoped object (Events land in `default`). Method: mock apiserver.
    #[tokio::test]
    async fn valid_prices_publish_identity_and_a_normal_event() {
        let (ctx, mut api, _registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let object = object(&[], None);
        let pricing = parse(&object);
        let expected_sha = Pricing::new(snapshot(&pricing))
            .unwrap()
            .sha256_hex()
            .to_owned();
        let task = tokio::spawn(reconcile(pricing, ctx));
        let body = api.expect_apply(STATUS_PATH, &object).await;
        assert_eq!(
            (&body["apiVersion"], &body["kind"]),
            (&json!("spendguard.io/v1alpha1"), &json!("PricingVersion"))
        );
        assert_eq!(body["status"]["sha256"], expected_sha);
        assert_eq!(body["status"]["models"], 1);
        let ready = ready_condition(&body);
        assert_eq!(
            (&ready["status"], &ready["reason"]),
            (&json!("True"), &json!("Valid"))
        );
        let event = api.expect_event("default").await;
        assert_eq!(
            (&event["type"], &event["reason"]),
            (&json!("Normal"), &json!("Valid"))
        );
        assert_eq!(event["regarding"]["kind"], "PricingVersion");
        assert_eq!(event["regarding"]["name"], "p1");
        assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
        api.expect_no_request().await;
    }

    // Goal: refused prices are reported (no hash) with a Warning Event, not returned as an
    // error. Method: an alias that repeats the model's own name.
    #[tokio::test]
    async fn invalid_prices_are_reported_with_a_warning_event() {
        let (ctx, mut api, _registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let object = object(&["gpt-5"], None);
        let task = tokio::spawn(reconcile(parse(&object), ctx));
        let body = api.expect_apply(STATUS_PATH, &object).await;
        assert_eq!(body["status"]["sha256"], "");
        assert_eq!(body["status"]["models"], 0);
        let ready = ready_condition(&body);
        assert_eq!(
            (&ready["status"], &ready["reason"]),
            (&json!("False"), &json!("InvalidPricing"))
        );
        let event = api.expect_event("default").await;
        assert_eq!(
            (&event["type"], &event["reason"]),
            (&json!("Warning"), &json!("InvalidPricing"))
        );
        assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    }

    // Goal: a resync that changes nothing keeps the transition time and publishes no Event.
    // Method: reconcile an object whose status already says Ready=True Valid.
    #[tokio::test]
    async fn an_unchanged_condition_publishes_no_event() {
        let (ctx, mut api, _registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let status = json!({"sha256": "x", "models": 1, "conditions": [{
            "type": "Ready", "status": "True", "reason": "Valid", "message": "m",
            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1,
        }]});
        let object = object(&[], Some(status));
        let task = tokio::spawn(reconcile(parse(&object), ctx));
        let body = api.expect_apply(STATUS_PATH, &object).await;
        assert_eq!(
            ready_condition(&body)["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
        api.expect_no_request().await;
    }

    // Goal: a failed status write is returned, counted, and retried with growing delays.
    // Method: the mock answers 500.
    #[tokio::test]
    async fn a_failed_status_write_backs_off() {
        let (ctx, mut api, registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let object = object(&[], None);
        let pricing = parse(&object);
        let task = tokio::spawn(reconcile(pricing.clone(), ctx.clone()));
        let failure = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": "etcd down", "reason": "InternalError", "code": 500});
        api.expect(http::Method::PATCH, STATUS_PATH)
            .await
            .respond(http::StatusCode::INTERNAL_SERVER_ERROR, &failure);
        let error = task.await.unwrap().unwrap_err();
        assert_eq!(error.reason(), "KubernetesApiError");
        let first = error_policy(pricing.clone(), &error, ctx.clone());
        let second = error_policy(pricing, &error, ctx);
        assert_eq!(first, Action::requeue(Duration::from_secs(1)));
        assert_eq!(second, Action::requeue(Duration::from_secs(2)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "reconcile_errors_total{kind=\"PricingVersion\",reason=\"KubernetesApiError\"} 1"
            ),
            "{text}"
        );
    }
}
