//! One controller per kind, plus the status plumbing they share.

pub mod approval_request;
pub mod budget;
pub mod contract_bundle;
pub mod pricing_version;
pub mod retention_policy;
pub mod signing_key;

use crate::Context;
use crate::error::Error;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde_json::json;
use spendguard_crds::condition::Condition;
use std::future::Future;

/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "spendguard-operator";

/// The `Ready` condition of `object` with `status`, keeping the previous transition time when
/// the status did not change (so periodic reconciles do not churn).
pub fn ready<K: Resource>(
    object: &K,
    previous: &[Condition],
    status: &str,
    reason: &str,
    message: String,
) -> Condition {
    let last_transition_time = match previous.iter().find(|c| c.type_ == "Ready") {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time,
        observed_generation: object.meta().generation.unwrap_or(0),
    }
}

/// Writes `status` with server-side apply under [`FIELD_MANAGER`].
///
/// # Errors
/// [`Error::Kube`].
pub async fn patch_status<K, S>(api: &Api<K>, object: &K, status: &S) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &object.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(())
}

/// The backoff key of `object`: `kind/namespace/name`.
pub fn object_key<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.meta().name.as_deref().unwrap_or_default()
    )
}

/// Runs one reconcile of `object`, recording its outcome and duration in the metrics and
/// clearing its backoff on success.
///
/// # Errors
/// Whatever `reconcile` returns.
pub async fn observed<K, F>(ctx: &Context, object: &K, reconcile: F) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()>,
    F: Future<Output = Result<Action, Error>>,
{
    let key = object_key(object);
    // The last failure's status write first: a success must not be overwritten by it.
    ctx.after_failure_report(&key).await;
    let started = tokio::time::Instant::now();
    let result = reconcile.await;
    let kind = kind_label(&K::kind(&()));
    let seconds = started.elapsed().as_secs_f64();
    ctx.metrics
        .reconciled(kind, seconds, result.as_ref().err().map(Error::reason));
    if result.is_ok() {
        ctx.backoff.succeeded(&key);
    }
    result
}

/// The metric label of a kind: a `&'static str` from a fixed set, so cardinality stays bounded.
fn kind_label(kind: &str) -> &'static str {
    match kind {
        "Budget" => "Budget",
        "ContractBundle" => "ContractBundle",
        "PricingVersion" => "PricingVersion",
        "SigningKey" => "SigningKey",
        "ApprovalRequest" => "ApprovalRequest",
        "RetentionPolicy" => "RetentionPolicy",
        _ => "Other",
    }
}

/// How long a failure's status write and Event may take before they are given up: the object's
/// next reconcile waits for them.
pub const FAILURE_REPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Writes status and then publishes the Event for its Ready transition (if any), off the
/// controller's path: error policies are synchronous, and the next reconcile retries anyway.
/// That next reconcile of the object waits for this write first ([`observed`]), so a slow
/// failure write never lands over the newer outcome.
pub fn report_failure<K, S>(
    ctx: &Context,
    api: Api<K>,
    object: std::sync::Arc<K>,
    previous: Vec<Condition>,
    next: Condition,
    status: S,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    S: Serialize + Send + Sync + 'static,
{
    let events = ctx.events.clone();
    let term = ctx.clone();
    let key = object_key(object.as_ref());
    let report = tokio::spawn(async move {
        let report = async {
            if let Err(error) = patch_status(&api, object.as_ref(), &status).await {
                tracing::warn!(%error, "writing failure condition failed");
                return;
            }
            events
                .on_transition(object.as_ref(), &previous, &next)
                .await;
        };
        // A replica that lost its lease writes nothing after its successor may have started:
        // checked first, so a task first polled after the term ended sends nothing. Bounded,
        // since the object's next reconcile waits for it (kube's client has no read timeout).
        tokio::select! {
            biased;
            () = term.term_ended() => {}
            () = report => {}
            () = tokio::time::sleep(FAILURE_REPORT_TIMEOUT) => {
                tracing::warn!("writing failure condition timed out");
            }
        }
    });
    ctx.hold_failure_report(key, report);
}
