//! KMS signing against moto's server mode (the PyPI package `moto[server]`, pinned in
//! runtime/testkit/moto/moto-requirements.txt, installed into a cached venv by
//! runtime/testkit/moto/moto-venv.sh and started by `spendguard_testkit::moto`).
//!
//! moto's KMS gaps (shared/research/ledger-audit-providers.md §5) and what these tests do about
//! them: DIGEST is hashed again (the signer only sends RAW); GetPublicKey has no KeySpec (the
//! signer does not require it); Sign ignores the key state, so a *disabled* key still signs under
//! moto — the DisabledException/KMSInvalidStateException mapping is covered by the unit test in
//! src/kms.rs, and the deleted-key path here uses moto's reset (NotFoundException).

#![allow(clippy::unwrap_used)]

mod support;

use aws_sdk_kms::types::KeySpec;
use chrono::{DateTime, Duration, Utc};
use spendguard_evidence::{
    Algorithm, ConfigError, EvidenceCode, KeyRecord, KeyRegistry, KmsSigner, SignError, Signed,
    Signer,
};
use std::process::Command;
use support::{KmsClient as _, MotoServer, audit_event, create_signing_key, public_key_spki};

fn t(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap()
}

#[tokio::test]
async fn kms_signatures_verify_with_the_get_public_key_spki() {
    // Goal: a P-256 KMS key signs through KmsSigner and the registry verifies the result from the
    // SPKI that GetPublicKey returns, fetched independently; tampering is caught; an event far
    // above KMS's 4096-byte RAW limit signs too, because only the envelope is sent.
    let moto = MotoServer::start();
    let client = moto.client();
    let kms_key = create_signing_key(&client, KeySpec::EccNistP256).await;
    client
        .create_alias()
        .alias_name("alias/spendguard-ledger")
        .target_key_id(&kms_key)
        .send()
        .await
        .unwrap();
    let signer =
        KmsSigner::from_client(client.clone(), "alias/spendguard-ledger", None, "ledger-0")
            .await
            .unwrap();
    assert_eq!(signer.algorithm(), Algorithm::EcdsaP256Sha256);
    assert!(
        signer.key_id().starts_with("ecdsa-p256:"),
        "{}",
        signer.key_id()
    );

    let spki = public_key_spki(&client, &kms_key).await;
    let record = KeyRecord::new(
        signer.key_id(),
        Algorithm::EcdsaP256Sha256,
        &spki,
        t(0),
        None,
    )
    .unwrap();
    assert_eq!(&record.public_key, signer.public_key());
    assert_eq!(record.public_key.derived_key_id(), signer.key_id());
    let mut registry = KeyRegistry::new();
    registry.upsert(record).unwrap();

    let event = audit_event(1, "kms");
    let signed = signer.sign(&event).await.unwrap();
    assert_eq!(signed.signature.len(), 64);
    assert_eq!(signed.producer_id, "ledger-0");
    registry.verify(&signed, &event).unwrap();
    // KMS returns high-S for about half of all ECDSA signatures and the registry accepts only
    // low-S: eight more signatures make a missing normalisation fail with probability 255/256.
    for i in 0..8 {
        let again = signer.sign(&event).await.unwrap();
        registry
            .verify(&again, &event)
            .unwrap_or_else(|e| panic!("signature {i}: {e}"));
    }

    let mut tampered_event = event.clone();
    tampered_event[10] ^= 0x01;
    assert_eq!(
        registry
            .verify(&signed, &tampered_event)
            .unwrap_err()
            .code(),
        EvidenceCode::SignatureInvalid
    );
    let later = Signed {
        signed_at: signed.signed_at + Duration::milliseconds(1),
        ..signed.clone()
    };
    assert_eq!(
        registry.verify(&later, &event).unwrap_err().code(),
        EvidenceCode::SignatureInvalid
    );
    let mut tampered_signature = signed.clone();
    tampered_signature.signature[5] ^= 0x80;
    assert_eq!(
        registry
            .verify(&tampered_signature, &event)
            .unwrap_err()
            .code(),
        EvidenceCode::SignatureInvalid
    );

    let big = audit_event(2, &"x".repeat(10_000));
    assert!(big.len() > 4096);
    let signed_big = signer.sign(&big).await.unwrap();
    registry.verify(&signed_big, &big).unwrap();

    // A batch takes one KMS signature (low S, like every other) and each event verifies alone.
    let batch: Vec<Vec<u8>> = (10..15).map(|i| audit_event(i, "batch")).collect();
    let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
    let signed_batch = signer.sign_batch(&refs).await.unwrap();
    for (event, s) in batch.iter().zip(&signed_batch) {
        assert_eq!(s.signature, signed_batch[0].signature);
        registry.verify(s, event).unwrap();
    }
    assert_eq!(
        registry
            .verify(&signed_batch[1], &batch[2])
            .unwrap_err()
            .code(),
        EvidenceCode::SignatureInvalid
    );

    // Revocation and windows apply to KMS keys exactly as to local ones.
    registry.revoke(signer.key_id(), signed.signed_at).unwrap();
    assert_eq!(
        registry.verify(&signed, &event).unwrap_err().code(),
        EvidenceCode::KeyRevoked
    );
}

#[tokio::test]
async fn kms_keys_that_cannot_make_p256_signatures_are_refused_at_startup() {
    // Goal: startup refuses a KMS key that is not a P-256 signing key, or that does not exist,
    // with a typed code, instead of failing on the first audit event.
    let moto = MotoServer::start();
    let client = moto.client();

    let p384 = create_signing_key(&client, KeySpec::EccNistP384).await;
    let error = KmsSigner::from_client(client.clone(), &p384, None, "ledger-0")
        .await
        .unwrap_err();
    assert_eq!(
        error.code(),
        EvidenceCode::SigningKmsKeyUnsupported,
        "{error}"
    );

    let symmetric = client.create_key().send().await.unwrap();
    let symmetric = symmetric.key_metadata().unwrap().key_id().to_owned();
    let error = KmsSigner::from_client(client.clone(), &symmetric, None, "ledger-0")
        .await
        .unwrap_err();
    assert!(
        matches!(error, ConfigError::KmsKeyUnsupported { .. }),
        "{error:?}"
    );

    let missing = "0b9e7c44-6a55-4bd1-9a0e-3c7f5d2a1e90";
    let error = KmsSigner::from_client(client.clone(), missing, None, "ledger-0")
        .await
        .unwrap_err();
    assert_eq!(error.code(), EvidenceCode::SigningKeyUnavailable, "{error}");
    assert!(error.to_string().contains("NotFoundException"), "{error}");
}

#[tokio::test]
async fn signing_with_a_deleted_kms_key_gives_a_typed_error() {
    // Goal: when the key disappears under a running signer, signing fails with
    // SIGNING_KEY_UNAVAILABLE (not transient: an operator must act), never with a signature.
    let moto = MotoServer::start();
    let client = moto.client();
    let kms_key = create_signing_key(&client, KeySpec::EccNistP256).await;
    let signer = KmsSigner::from_client(client, &kms_key, Some("ledger-kms-1"), "ledger-0")
        .await
        .unwrap();
    let event = audit_event(3, "deleted");
    signer.sign(&event).await.unwrap();

    moto.reset();
    let error = signer.sign(&event).await.unwrap_err();
    assert_eq!(error.code(), EvidenceCode::SigningKeyUnavailable, "{error}");
    assert!(!error.is_transient());
    let SignError::KeyUnavailable {
        kms_code,
        kms_key: named,
        ..
    } = &error
    else {
        panic!("expected KeyUnavailable, got {error:?}");
    };
    assert_eq!(kms_code, "NotFoundException");
    assert_eq!(named, &kms_key);
}

/// Runs `child_builds_signer_from_environment` in a fresh process with only `env` set (plus
/// PATH/HOME), so the standard AWS chain sees exactly these variables and never tries IMDS.
fn run_child(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("child.out");
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "child_builds_signer_from_environment",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", dir.path().join("no-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.path().join("no-credentials"),
        )
        .env("SPENDGUARD_EVIDENCE_CHILD_OUT", &out);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "child failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read_to_string(&out).expect("the child test ran and wrote its result")
}

#[tokio::test]
async fn signing_args_build_a_kms_signer_from_the_standard_aws_chain() {
    // Goal: the production path, SPENDGUARD_SIGNING_* plus AWS credentials and region from the
    // environment, builds a KMS signer whose signatures verify; without credentials startup
    // refuses with a typed code. Method: run the helper test below in a child process with a
    // controlled environment (the AWS chain reads process env, which a test cannot set safely).
    let moto = MotoServer::start();
    let client = moto.client();
    let kms_key = create_signing_key(&client, KeySpec::EccNistP256).await;
    let endpoint = moto.endpoint();
    let base = [
        ("SPENDGUARD_SIGNING_MODE", "kms"),
        ("SPENDGUARD_SIGNING_KMS_KEY", kms_key.as_str()),
        ("SPENDGUARD_SIGNING_KMS_ENDPOINT_URL", endpoint.as_str()),
        ("SPENDGUARD_SIGNING_KMS_TIMEOUT_MS", "5000"),
        ("AWS_REGION", support::REGION),
    ];

    let with_credentials: Vec<_> = base
        .iter()
        .copied()
        .chain([
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
        ])
        .collect();
    let result = run_child(&with_credentials);
    let fields: Vec<&str> = result.split_whitespace().collect();
    let ["ok", key_id, signed_at_ms, signature_hex] = fields[..] else {
        panic!("child did not sign: {result}");
    };
    let signed = Signed {
        key_id: key_id.to_owned(),
        algorithm: Algorithm::EcdsaP256Sha256,
        signed_at: t(signed_at_ms.parse().unwrap()),
        producer_id: "child-0".to_owned(),
        signature: hex::decode(signature_hex).unwrap(),
        inclusion: None,
    };
    let spki = public_key_spki(&client, &kms_key).await;
    let mut registry = KeyRegistry::new();
    registry
        .upsert(KeyRecord::new(key_id, Algorithm::EcdsaP256Sha256, &spki, t(0), None).unwrap())
        .unwrap();
    registry.verify(&signed, &audit_event(9, "child")).unwrap();

    let result = run_child(&base);
    assert!(
        result.starts_with("err SIGNING_CREDENTIALS_MISSING "),
        "startup without credentials must refuse: {result}"
    );
}

#[tokio::test]
#[ignore = "helper: run in a child process by signing_args_build_a_kms_signer_from_the_standard_aws_chain"]
async fn child_builds_signer_from_environment() {
    use clap::Parser;
    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        signing: spendguard_evidence::SigningArgs,
    }
    let out = std::env::var("SPENDGUARD_EVIDENCE_CHILD_OUT").expect("only run by its parent test");
    let args = Args::parse_from(["child"]);
    let result = match args.signing.build("child-0").await {
        Ok(spendguard_evidence::Signing::Enabled(signer)) => {
            let signed = signer.sign(&audit_event(9, "child")).await.unwrap();
            format!(
                "ok {} {} {}",
                signed.key_id,
                signed.signed_at.timestamp_millis(),
                hex::encode(&signed.signature)
            )
        }
        Ok(spendguard_evidence::Signing::Disabled) => "disabled".to_owned(),
        Err(error) => format!("err {} {error}", error.code()),
    };
    std::fs::write(out, result).unwrap();
}
