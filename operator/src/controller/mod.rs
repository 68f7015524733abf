//! One controller per kind, plus the status plumbing they share.

pub mod budget;
pub mod contract_bundle;
pub mod pricing_version;

use crate::error::Error;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde_json::json;
use spendguard_crds::condition::Condition;

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
