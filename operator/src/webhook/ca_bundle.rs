//! Puts the CA into the webhook configurations the chart creates, so the apiserver trusts our
//! serving certificates. Every replica does it with the same CA, so they never fight; a write is
//! made only when some webhook's `caBundle` differs (a fresh install, or a Helm upgrade that
//! recreated the configuration).

use super::WebhookError;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, ValidatingWebhook,
    ValidatingWebhookConfiguration,
};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

/// Field manager of the caBundle writes.
const FIELD_MANAGER: &str = "spendguard-operator-webhook";

/// The configurations to keep trusting our CA.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Configurations {
    /// MutatingWebhookConfiguration name (injection); `None` to leave alone.
    pub mutating: Option<String>,
    /// ValidatingWebhookConfiguration name; `None` to leave alone.
    pub validating: Option<String>,
    /// MutatingWebhookConfiguration of the approvals webhook; `None` to leave alone.
    pub approvals: Option<String>,
}

/// Patches `ca_pem` into every webhook of every named configuration. Returns how many webhooks were
/// changed (0 when all already trusted it).
///
/// # Errors
/// [`WebhookError::CaBundle`] when a configuration is missing or cannot be patched.
pub async fn patch(
    client: &kube::Client,
    configurations: &Configurations,
    ca_pem: &str,
) -> Result<usize, WebhookError> {
    // Every configuration is tried, so one that is missing or refused does not keep the others
    // on a stale CA (they would fail closed); the first failure is reported after.
    let mut results = Vec::new();
    let mutating = [&configurations.mutating, &configurations.approvals];
    for name in mutating.into_iter().flatten() {
        let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        let webhooks = |c: &MutatingWebhookConfiguration| c.webhooks.clone().unwrap_or_default();
        let patched = patch_one(&api, name, ca_pem, webhooks, |w: MutatingWebhook| {
            (w.name, w.client_config.ca_bundle)
        });
        results.push(patched.await);
    }
    if let Some(name) = &configurations.validating {
        let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
        let webhooks = |c: &ValidatingWebhookConfiguration| c.webhooks.clone().unwrap_or_default();
        let patched = patch_one(&api, name, ca_pem, webhooks, |w: ValidatingWebhook| {
            (w.name, w.client_config.ca_bundle)
        });
        results.push(patched.await);
    }
    let mut changed = 0;
    let mut first_failure = None;
    for result in results {
        match result {
            Ok(n) => changed += n,
            Err(e) => {
                first_failure.get_or_insert(e);
            }
        }
    }
    first_failure.map_or(Ok(changed), Err)
}

/// Patches the webhooks of configuration `name` whose `caBundle` is not `ca_pem`
/// (`webhooks` lists a configuration's webhooks, `name_and_bundle` reads one's name and bundle).
async fn patch_one<K, W>(
    api: &Api<K>,
    name: &str,
    ca_pem: &str,
    webhooks: impl Fn(&K) -> Vec<W>,
    name_and_bundle: impl Fn(W) -> (String, Option<ByteString>),
) -> Result<usize, WebhookError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let current = get(api, name).await?;
    let stale: Vec<String> = webhooks(&current)
        .into_iter()
        .map(name_and_bundle)
        .filter(|(_, bundle)| bundle.as_ref().map(|b| &b.0[..]) != Some(ca_pem.as_bytes()))
        .map(|(name, _)| name)
        .collect();
    apply(api, name, &stale, ca_pem).await
}

async fn get<K>(api: &Api<K>, name: &str) -> Result<K, WebhookError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name)
        .await
        .map_err(|e| WebhookError::CaBundle {
            configuration: name.to_owned(),
            detail: e.to_string(),
        })?
        .ok_or_else(|| WebhookError::CaBundle {
            configuration: name.to_owned(),
            detail: "not found (the chart creates it)".into(),
        })
}

/// A strategic merge patch: `webhooks` merges by `name`, so only `caBundle` of the named
/// webhooks changes and the rest of the chart's configuration stays as Helm wrote it.
async fn apply<K>(
    api: &Api<K>,
    name: &str,
    webhooks: &[String],
    ca_pem: &str,
) -> Result<usize, WebhookError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if webhooks.is_empty() {
        return Ok(0);
    }
    let bundle = ByteString(ca_pem.as_bytes().to_vec());
    let patch = json!({
        "webhooks": webhooks
            .iter()
            .map(|w| json!({"name": w, "clientConfig": {"caBundle": bundle}}))
            .collect::<Vec<_>>(),
    });
    api.patch(
        name,
        &PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        },
        &Patch::Strategic(&patch),
    )
    .await
    .map_err(|e| WebhookError::CaBundle {
        configuration: name.to_owned(),
        detail: e.to_string(),
    })?;
    Ok(webhooks.len())
}
