//! SigningKey controller: feeds the evidence key registry (`signing_keys`, S7) through the
//! ledger's `RegisterSigningKey` admin RPC and reports the derived key id and Ready in status.
//!
//! The CR carries `revoked: bool`, the ledger a revocation time. The first reconcile that sees
//! `revoked: true` stamps the time into `status.revokedAt` — under its own field manager
//! ([`REVOCATION_FIELD_MANAGER`], so no other status write can clear it) and *before* the ledger
//! is called — and every later reconcile sends that same time. A revocation therefore never moves
//! later; the ledger refuses that anyway (SIGNING_KEY_REVOCATION_IRREVERSIBLE).

use super::ready;
use crate::Context;
use crate::error::Error;
use base64::Engine;
use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use spendguard_crds::condition::Condition;
use spendguard_crds::signing_key::{SigningAlgorithm, SigningKey, SigningKeyStatus};
use spendguard_evidence::{Algorithm, PublicKey};
use spendguard_proto::ledger::v1 as pb;
use std::sync::Arc;
use std::time::Duration;
use tracing::{instrument, warn};

/// Field manager that owns `status.revokedAt` alone.
pub const REVOCATION_FIELD_MANAGER: &str = "spendguard-operator-revocation";

/// How often a registered key is re-sent (idempotent), so a ledger database restored from an
/// older backup regains the key and its revocation.
const REFRESH_INTERVAL: Duration = Duration::from_secs(600);

fn conditions(key: &SigningKey) -> &[Condition] {
    key.status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

fn time_ms(field: &str, value: &str) -> Result<i64, Error> {
    chrono::DateTime::parse_from_rfc3339(value)
        .map(|t| t.timestamp_millis())
        .map_err(|e| Error::InvalidSpec(format!("{field}: {e}")))
}

/// The ledger request for `key`, with `revoked_at` (RFC 3339) when it is revoked. Also returns
/// the key id derived from the public key.
///
/// # Errors
/// [`Error::InvalidSpec`] for a public key or time the schema let through but cannot be used.
pub fn request(
    key: &SigningKey,
    revoked_at: Option<&str>,
) -> Result<pb::RegisterSigningKeyRequest, Error> {
    let algorithm = match key.spec.algorithm {
        SigningAlgorithm::Ed25519 => Algorithm::Ed25519,
        SigningAlgorithm::EcdsaP256Sha256 => Algorithm::EcdsaP256Sha256,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key.spec.public_key.trim())
        .map_err(|e| Error::InvalidSpec(format!("publicKey is not base64: {e}")))?;
    let public_key = PublicKey::from_bytes(algorithm, &bytes)
        .map_err(|e| Error::InvalidSpec(format!("publicKey: {e}")))?;
    let revoked_at_unix_ms = match revoked_at {
        Some(at) => time_ms("status.revokedAt", at)?,
        None => 0,
    };
    Ok(pb::RegisterSigningKeyRequest {
        key_id: public_key.derived_key_id(),
        algorithm: algorithm.as_str().to_owned(),
        public_key: public_key.to_bytes(),
        valid_from_unix_ms: time_ms("notBefore", &key.spec.not_before)?,
        valid_until_unix_ms: time_ms("notAfter", &key.spec.not_after)?,
        revoked_at_unix_ms,
    })
}

/// Registers the key (and its revocation) in the ledger and writes key id and Ready to status.
///
/// # Errors
/// An unusable spec, a ledger refusal or failure, or a failed status write; the error policy
/// reports it.
#[instrument(skip_all, fields(object = %key.name_any()))]
pub async fn reconcile(key: Arc<SigningKey>, ctx: Arc<Context>) -> Result<Action, Error> {
    super::observed(&ctx, key.as_ref(), apply(&key, &ctx)).await
}

async fn apply(key: &SigningKey, ctx: &Context) -> Result<Action, Error> {
    let api: Api<SigningKey> = Api::all(ctx.kube.clone());
    // Validate before stamping anything.
    request(key, None)?;
    let stamped = key.status.as_ref().and_then(|s| s.revoked_at.clone());
    let revoked_at = match (key.spec.revoked, stamped) {
        (false, _) => None,
        (true, Some(at)) => Some(at),
        (true, None) => {
            // The object may come from a cache behind a stamp an earlier attempt wrote (its
            // ledger call failed after): read it fresh, so the time is stamped once and a
            // revocation never moves later.
            let fresh = api.get_status(&key.name_any()).await.map_err(Error::Kube)?;
            match fresh.status.and_then(|s| s.revoked_at) {
                Some(at) => Some(at),
                None => {
                    let at =
                        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                    stamp_revocation(&api, key, &at).await?;
                    Some(at)
                }
            }
        }
    };
    let request = request(key, revoked_at.as_deref())?;
    let key_id = request.key_id.clone();
    let response = ctx
        .ledger
        .clone()
        .register_signing_key(request)
        .await
        .map_err(|s| Error::ledger(&s))?
        .into_inner();
    let message = match (&revoked_at, response.changed) {
        (Some(at), _) => format!("key {key_id} registered, revoked at {at}"),
        (None, true) => format!("key {key_id} registered in the evidence key registry"),
        (None, false) => format!("key {key_id} is registered"),
    };
    // A revocation changes the reason, so it is announced by a Normal Event once.
    let reason = if revoked_at.is_some() {
        "Revoked"
    } else {
        "Registered"
    };
    let condition = ready(key, conditions(key), "True", reason, message);
    let status = SigningKeyStatus {
        key_id,
        revoked_at: None, // Owned by REVOCATION_FIELD_MANAGER; this apply leaves it alone.
        conditions: vec![condition.clone()],
    };
    super::patch_status(&api, key, &status).await?;
    ctx.events
        .on_transition(key, conditions(key), &condition)
        .await;
    Ok(Action::requeue(REFRESH_INTERVAL))
}

/// Writes `status.revokedAt` under [`REVOCATION_FIELD_MANAGER`].
async fn stamp_revocation(api: &Api<SigningKey>, key: &SigningKey, at: &str) -> Result<(), Error> {
    let patch = json!({
        "apiVersion": SigningKey::api_version(&()),
        "kind": SigningKey::kind(&()),
        "status": {"revokedAt": at},
    });
    api.patch_status(
        &key.name_any(),
        &PatchParams::apply(REVOCATION_FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(())
}

/// Reports the failure as `Ready=False` (and a Warning Event when that changes the condition)
/// and retries with a per-object backoff. The key id already published stays in status.
pub fn error_policy(key: Arc<SigningKey>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(object = %key.name_any(), %error, "signing key reconcile failed");
    let condition = ready(
        key.as_ref(),
        conditions(&key),
        "False",
        error.reason(),
        error.to_string(),
    );
    let previous = conditions(&key).to_vec();
    let status = SigningKeyStatus {
        key_id: key
            .status
            .as_ref()
            .map(|s| s.key_id.clone())
            .unwrap_or_default(),
        revoked_at: None, // Never written by this field manager.
        conditions: vec![condition.clone()],
    };
    let delay = ctx.backoff.failed(&super::object_key(key.as_ref()));
    let api = Api::all(ctx.kube.clone());
    super::report_failure(&ctx, api, key, previous, condition, status);
    Action::requeue(delay)
}

/// Runs the SigningKey controller until its watch ends.
pub async fn run(ctx: Context) {
    let api: Api<SigningKey> = Api::all(ctx.kube.clone());
    Controller::new(api, watcher::Config::default())
        .run(reconcile, error_policy, Arc::new(ctx))
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "signing key controller event failed");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_apiserver;
    use serde_json::Value;

    /// RFC 8032 test vector 1 public key.
    const ED25519_RAW_HEX: &str =
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn object(public_key: &str, revoked: bool, status: Option<Value>) -> Arc<SigningKey> {
        let mut object = json!({
            "apiVersion": "spendguard.io/v1alpha1",
            "kind": "SigningKey",
            "metadata": {"name": "k1", "uid": "u-9", "generation": 1},
            "spec": {"algorithm": "Ed25519", "publicKey": public_key,
                "notBefore": "2026-11-01T00:00:00Z", "notAfter": "2027-02-01T00:00:00Z",
                "revoked": revoked},
        });
        if let Some(status) = status {
            object["status"] = status;
        }
        Arc::new(serde_json::from_value(object).unwrap())
    }

    fn raw_b64() -> String {
        let raw: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&ED25519_RAW_HEX[i * 2..i * 2 + 2], 16).unwrap())
            .collect();
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    // Goal: the spec maps onto the RPC: derived key id, canonical key bytes (SPKI and raw forms
    // are the same key), window in Unix ms, revocation only when stamped.
    #[test]
    fn the_spec_maps_onto_the_request() {
        let raw = request(&object(&raw_b64(), false, None), None).unwrap();
        assert_eq!(raw.algorithm, "ed25519");
        assert_eq!(raw.public_key.len(), 32);
        assert!(raw.key_id.starts_with("ed25519:"), "{}", raw.key_id);
        assert_eq!(raw.valid_from_unix_ms, 1_793_491_200_000);
        assert_eq!(raw.valid_until_unix_ms, 1_801_440_000_000);
        assert_eq!(raw.revoked_at_unix_ms, 0);
        // The example CR's SPKI form.
        let spki = "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=";
        let from_spki = request(&object(spki, false, None), None).unwrap();
        assert_eq!(from_spki.public_key.len(), 32);
        let revoked = request(
            &object(&raw_b64(), true, None),
            Some("2026-12-01T00:00:00.000Z"),
        )
        .unwrap();
        assert_eq!(revoked.revoked_at_unix_ms, 1_796_083_200_000);
    }

    // Goal: a key the evidence crate refuses is InvalidSpec, found before any write.
    #[tokio::test]
    async fn an_invalid_public_key_is_invalid_spec_and_writes_nothing() {
        let (ctx, mut api, _registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let key = object("AAAA", true, None);
        let error = reconcile(key, ctx).await.unwrap_err();
        assert_eq!(error.reason(), "InvalidSpec");
        api.expect_no_request().await;
    }
}
