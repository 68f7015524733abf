//! The SigningKey controller feeding the evidence key registry (S7), with a real ledger
//! (TestLedger on real PostgreSQL) and real Ed25519 public keys, checked in `signing_keys`: once
//! on the mock apiserver (exact requests, `spendguard_operator::mock_apiserver`) and once on a
//! real apiserver (the example CR, then `revoked: true`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use base64::Engine;
use serde_json::{Value, json};
use spendguard_crds::signing_key::SigningKey;
use spendguard_operator::controller::signing_key;
use spendguard_operator::metrics::Metrics;
use spendguard_operator::mock_apiserver::{self, Method, StatusCode, ready_condition};
use spendguard_operator::{Context, controller};
use spendguard_testkit::TestLedger;
use spendguard_testkit::control_plane::{ControlPlane, User};
use std::path::Path;
use std::sync::Arc;

/// The checkout, as cargo names it to this run (`spendguard_testkit::paths`).
const ROOT: &spendguard_testkit::paths::RepoRoot = spendguard_testkit::paths::REPO_ROOT;

const STATUS_PATH: &str = "/apis/spendguard.io/v1alpha1/signingkeys/ledger-2026-11/status";

type Row = (
    String,
    Vec<u8>,
    chrono::DateTime<chrono::Utc>,
    Option<chrono::DateTime<chrono::Utc>>,
    Option<chrono::DateTime<chrono::Utc>>,
);

fn public_key() -> Vec<u8> {
    ed25519_dalek::SigningKey::from_bytes(&[7; 32])
        .verifying_key()
        .to_bytes()
        .to_vec()
}

fn object(revoked: bool, status: Option<Value>) -> Value {
    let mut object = json!({
        "apiVersion": "spendguard.io/v1alpha1",
        "kind": "SigningKey",
        "metadata": {"name": "ledger-2026-11", "uid": "u-7", "generation": 1},
        "spec": {"algorithm": "Ed25519",
            "publicKey": base64::engine::general_purpose::STANDARD.encode(public_key()),
            "notBefore": "2026-11-01T00:00:00Z", "notAfter": "2027-02-01T00:00:00Z",
            "revoked": revoked},
    });
    if let Some(status) = status {
        object["status"] = status;
    }
    object
}

fn parse(object: &Value) -> Arc<SigningKey> {
    Arc::new(serde_json::from_value(object.clone()).unwrap())
}

async fn row(ledger: &TestLedger, key_id: &str) -> Row {
    sqlx::query_as(
        "SELECT algorithm, public_key, valid_from, valid_until, revoked_at FROM signing_keys
          WHERE key_id = $1",
    )
    .bind(key_id)
    .fetch_one(ledger.store().pool())
    .await
    .unwrap()
}

// Goal: a SigningKey becomes a `signing_keys` row (derived key id, raw key, window); status
// carries the key id and Ready=True Registered with one Normal Event. Then `revoked: true` is
// stamped once into status.revokedAt (own field manager, before the ledger call) and lands in
// the row; a later reconcile reuses the stamp, a retry on a cache that lags the stamp reads it
// fresh instead of stamping again, and a later time is refused by the ledger.
#[tokio::test]
async fn a_signing_key_is_registered_then_revoked_once() {
    let ledger = TestLedger::start().await.unwrap();
    let (ctx, mut api, _registry) = mock_apiserver::context(ledger.client.clone());

    // Register.
    let fresh = object(false, None);
    let task = tokio::spawn(signing_key::reconcile(parse(&fresh), ctx.clone()));
    let body = api.expect_apply(STATUS_PATH, &fresh).await;
    let key_id = body["status"]["keyId"].as_str().unwrap().to_owned();
    assert!(key_id.starts_with("ed25519:"), "{key_id}");
    assert!(body["status"].get("revokedAt").is_none(), "{body}");
    let ready = ready_condition(&body);
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&json!("True"), &json!("Registered"))
    );
    let event = api.expect_event("default").await;
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&json!("Normal"), &json!("Registered"))
    );
    task.await.unwrap().unwrap();
    api.expect_no_request().await;
    let (algorithm, key, valid_from, valid_until, revoked_at) = row(&ledger, &key_id).await;
    assert_eq!(algorithm, "ed25519");
    assert_eq!(key, public_key());
    assert_eq!(valid_from.to_rfc3339(), "2026-11-01T00:00:00+00:00");
    assert_eq!(
        valid_until.unwrap().to_rfc3339(),
        "2027-02-01T00:00:00+00:00"
    );
    assert!(revoked_at.is_none());

    // Revoke: the stamp is written first, under its own field manager.
    let revoked = object(true, Some(body["status"].clone()));
    let task = tokio::spawn(signing_key::reconcile(parse(&revoked), ctx.clone()));
    // Read fresh first: the cached object may lag a stamp written before.
    api.expect(Method::GET, STATUS_PATH)
        .await
        .respond(StatusCode::OK, &revoked);
    let stamp = api.expect(Method::PATCH, STATUS_PATH).await;
    stamp.assert_query(&["fieldManager=spendguard-operator-revocation", "force=true"]);
    let stamped_at = stamp.body["status"]["revokedAt"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut answer = revoked.clone();
    answer["status"]["revokedAt"] = json!(stamped_at);
    stamp.respond(StatusCode::OK, &answer);
    let body = api.expect_apply(STATUS_PATH, &revoked).await;
    assert!(body["status"].get("revokedAt").is_none(), "{body}");
    assert_eq!(ready_condition(&body)["reason"], "Revoked");
    let event = api.expect_event("default").await;
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&json!("Normal"), &json!("Revoked"))
    );
    task.await.unwrap().unwrap();
    api.expect_no_request().await;
    let revoked_at = row(&ledger, &key_id).await.4.unwrap();
    let stamped = chrono::DateTime::parse_from_rfc3339(&stamped_at).unwrap();
    assert_eq!(revoked_at.timestamp_millis(), stamped.timestamp_millis());

    // A later reconcile reuses the stamp: no new stamp, the row is unchanged.
    let mut status = body["status"].clone();
    status["revokedAt"] = json!(stamped_at);
    let again = object(true, Some(status.clone()));
    let task = tokio::spawn(signing_key::reconcile(parse(&again), ctx.clone()));
    api.expect_apply(STATUS_PATH, &again).await;
    task.await.unwrap().unwrap();
    api.expect_no_request().await; // Still Revoked: no second Event.
    assert_eq!(row(&ledger, &key_id).await.4.unwrap(), revoked_at);

    // A retry whose cached object has not seen the stamp yet (the stamp was written, the ledger
    // call failed) reads it fresh and sends the same time: no second, later stamp, which the
    // ledger would refuse as irreversible for good.
    let lagging = object(true, Some(body["status"].clone()));
    let task = tokio::spawn(signing_key::reconcile(parse(&lagging), ctx.clone()));
    api.expect(Method::GET, STATUS_PATH)
        .await
        .respond(StatusCode::OK, &again);
    api.expect_apply(STATUS_PATH, &again).await;
    task.await.unwrap().unwrap();
    api.expect_no_request().await;
    assert_eq!(row(&ledger, &key_id).await.4.unwrap(), revoked_at);

    // A later revocation time (status edited by hand) is refused by the ledger.
    status["revokedAt"] = json!("2099-01-01T00:00:00.000Z");
    let later = object(true, Some(status));
    let error = signing_key::reconcile(parse(&later), ctx)
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "LedgerRefused");
    assert!(
        error
            .to_string()
            .contains("SIGNING_KEY_REVOCATION_IRREVERSIBLE"),
        "{error}"
    );
    assert_eq!(row(&ledger, &key_id).await.4.unwrap(), revoked_at);
}

// Goal: on a real apiserver, the example SigningKey is registered (status.keyId, row in
// signing_keys with the SPKI key stored raw); `revoked: true` is stamped into status.revokedAt
// by its own field manager, survives the operator's later status applies, and is the row's
// revoked_at.
#[tokio::test]
async fn a_signing_key_cr_feeds_the_registry_on_a_real_apiserver() {
    let plane = ControlPlane::start().expect("control plane");
    plane.install_crds(&Path::new(ROOT).join("crds/generated/spendguard.io.yaml"));
    let ledger = TestLedger::start().await.unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let kube = plane.client(User::Admin).await.unwrap();
    let context = Context::new(kube, ledger.client.clone(), metrics, "e2e-operator");
    let operator = tokio::spawn(controller::signing_key::run(context));

    let example =
        std::fs::read_to_string(format!("{ROOT}/config/examples/signing-key.yaml")).unwrap();
    plane.admin(&["apply", "-f", "-"], Some(&example));
    let get = |path: &str| {
        [
            "get".to_owned(),
            "signingkey".to_owned(),
            "ledger-2026-11".to_owned(),
            "-o".to_owned(),
            format!("jsonpath={{{path}}}"),
        ]
    };
    let key_path = get(".status.keyId");
    let key_args: Vec<&str> = key_path.iter().map(String::as_str).collect();
    let key_id = plane.poll(&key_args, |k| k.starts_with("ed25519:")).await;
    let (algorithm, key, _, valid_until, revoked_at) = row(&ledger, &key_id).await;
    assert_eq!(algorithm, "ed25519");
    assert_eq!(key.len(), 32, "the SPKI form is stored as the raw key");
    assert_eq!(
        valid_until.unwrap().to_rfc3339(),
        "2027-02-01T00:00:00+00:00"
    );
    assert!(revoked_at.is_none());

    let revoked = example.replace(
        "notAfter: \"2027-02-01T00:00:00Z\"",
        "notAfter: \"2027-02-01T00:00:00Z\"\n  revoked: true",
    );
    assert_ne!(revoked, example);
    plane.admin(&["apply", "-f", "-"], Some(&revoked));
    let reason_path = get(".status.conditions[0].reason");
    let reason_args: Vec<&str> = reason_path.iter().map(String::as_str).collect();
    plane.poll(&reason_args, |r| r == "Revoked").await;
    let stamp_path = get(".status.revokedAt");
    let stamp_args: Vec<&str> = stamp_path.iter().map(String::as_str).collect();
    let stamped_at = plane.admin(&stamp_args, None);
    let stamped = chrono::DateTime::parse_from_rfc3339(&stamped_at)
        .unwrap_or_else(|e| panic!("revokedAt {stamped_at:?}: {e}"));
    let revoked_at = row(&ledger, &key_id).await.4.unwrap();
    assert_eq!(revoked_at.timestamp_millis(), stamped.timestamp_millis());
    operator.abort();
}
