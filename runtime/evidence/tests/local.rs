//! Local Ed25519 signing and the key registry: round trip, tamper detection over every covered
//! field, revocation, validity windows, rotation, startup configuration and key hygiene.
//! Keys are made with the real `openssl` CLI, as an operator would make them.

#![allow(clippy::unwrap_used)]

mod support;

use chrono::{DateTime, Duration, Utc};
use clap::Parser;
use spendguard_evidence::{
    Algorithm, ConfigError, EvidenceCode, KeyRecord, KeyRegistry, LocalEd25519Signer, Signed,
    Signer, Signing, SigningArgs, VerifiedSignatures, VerifyError,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use support::audit_event;

fn t(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap()
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is needed for these tests (make deps installs it)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// Generates an Ed25519 PKCS#8 PEM key file with openssl.
fn openssl_ed25519_key(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    openssl(&[
        "genpkey",
        "-algorithm",
        "ed25519",
        "-out",
        path.to_str().unwrap(),
    ]);
    path
}

fn code(result: Result<&KeyRecord, VerifyError>) -> EvidenceCode {
    result.unwrap_err().code()
}

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    signing: SigningArgs,
}

fn args(argv: &[&str]) -> SigningArgs {
    Args::try_parse_from(std::iter::once("test").chain(argv.iter().copied()))
        .unwrap()
        .signing
}

#[tokio::test]
async fn local_signature_round_trips_and_binds_every_covered_field() {
    // Goal: a signature verifies over the exact bytes and nothing else. Method: sign a real
    // canonical event with an openssl-made key, then change each covered input (every bit of the
    // event and of the signature, the time by 1 ms, the key id, the producer, the algorithm) and
    // expect the precise refusal.
    let dir = tempfile::tempdir().unwrap();
    let path = openssl_ed25519_key(dir.path(), "signing.pem");
    let signer = LocalEd25519Signer::from_pem_file(&path, None, "ledger-0").unwrap();

    // The public key is the one openssl derives, and the id is derived from it.
    let spki = openssl(&[
        "pkey",
        "-in",
        path.to_str().unwrap(),
        "-pubout",
        "-outform",
        "DER",
    ]);
    let from_openssl =
        spendguard_evidence::PublicKey::from_bytes(Algorithm::Ed25519, &spki).unwrap();
    assert_eq!(&from_openssl, signer.public_key());
    assert_eq!(signer.key_id(), from_openssl.derived_key_id());
    assert!(signer.key_id().starts_with("ed25519:"));

    let mut registry = KeyRegistry::new();
    registry
        .upsert(signer.key_record(t(0), None).unwrap())
        .unwrap();
    // The same public key under a second id: a signature must not move between ids.
    registry
        .upsert(KeyRecord {
            key_id: "alias-of-same-key".into(),
            ..signer.key_record(t(0), None).unwrap()
        })
        .unwrap();

    let event = audit_event(1, "round trip");
    let before = Utc::now();
    let signed = signer.sign(&event).await.unwrap();
    let after = Utc::now();
    assert_eq!(
        signed.signed_at.timestamp_subsec_nanos() % 1_000_000,
        0,
        "whole milliseconds"
    );
    assert!(signed.signed_at >= before - Duration::milliseconds(1) && signed.signed_at <= after);
    assert_eq!(signed.producer_id, "ledger-0");
    assert_eq!(signed.algorithm, Algorithm::Ed25519);
    assert_eq!(signed.signature.len(), 64);
    assert_eq!(
        registry.verify(&signed, &event).unwrap().key_id,
        signer.key_id()
    );

    // Stable: the same bytes at the same instant give the same signature (Ed25519 is deterministic).
    let again = signer.sign_at(&event, signed.signed_at).await.unwrap();
    assert_eq!(again, signed);

    // One flipped bit in every byte, the bit position rotating, plus every bit of the first byte
    // of R and of S (all bits of everything takes ~30 s in a debug build).
    for byte in 0..event.len() {
        let mut tampered = event.clone();
        tampered[byte] ^= 1 << (byte % 8);
        assert_eq!(
            code(registry.verify(&signed, &tampered)),
            EvidenceCode::SignatureInvalid,
            "event byte {byte}"
        );
    }
    let signature_flips = (0..64)
        .map(|byte| (byte, byte % 8))
        .chain((0..8).flat_map(|bit| [(0, bit), (32, bit)]));
    for (byte, bit) in signature_flips {
        let mut tampered = signed.clone();
        tampered.signature[byte] ^= 1 << bit;
        assert_eq!(
            code(registry.verify(&tampered, &event)),
            EvidenceCode::SignatureInvalid,
            "signature byte {byte} bit {bit}"
        );
    }
    for delta in [-1, 1, 1000, -86_400_000] {
        let tampered = Signed {
            signed_at: signed.signed_at + Duration::milliseconds(delta),
            ..signed.clone()
        };
        assert_eq!(
            code(registry.verify(&tampered, &event)),
            EvidenceCode::SignatureInvalid,
            "signed_at {delta} ms"
        );
    }
    let sub_ms = Signed {
        signed_at: signed.signed_at + Duration::microseconds(1),
        ..signed.clone()
    };
    assert_eq!(
        code(registry.verify(&sub_ms, &event)),
        EvidenceCode::SignatureMalformed
    );

    let moved = Signed {
        key_id: "alias-of-same-key".into(),
        ..signed.clone()
    };
    assert_eq!(
        code(registry.verify(&moved, &event)),
        EvidenceCode::SignatureInvalid
    );
    for i in 0..signed.key_id.len() {
        let mut key_id = signed.key_id.clone().into_bytes();
        key_id[i] = if key_id[i] == b'0' { b'1' } else { b'0' };
        let tampered = Signed {
            key_id: String::from_utf8(key_id).unwrap(),
            ..signed.clone()
        };
        assert_eq!(
            code(registry.verify(&tampered, &event)),
            EvidenceCode::KeyUnknown,
            "key id char {i}"
        );
    }
    for producer_id in ["ledger-1", "ledger-00", "sidecar-0"] {
        let tampered = Signed {
            producer_id: producer_id.into(),
            ..signed.clone()
        };
        assert_eq!(
            code(registry.verify(&tampered, &event)),
            EvidenceCode::SignatureInvalid,
            "{producer_id}"
        );
    }
    let other_algorithm = Signed {
        algorithm: Algorithm::EcdsaP256Sha256,
        ..signed.clone()
    };
    assert_eq!(
        code(registry.verify(&other_algorithm, &event)),
        EvidenceCode::AlgorithmMismatch
    );
    let truncated = Signed {
        signature: signed.signature[..63].to_vec(),
        ..signed.clone()
    };
    assert_eq!(
        code(registry.verify(&truncated, &event)),
        EvidenceCode::SignatureMalformed
    );
}

#[tokio::test]
async fn revoked_and_out_of_window_signatures_fail_with_their_codes() {
    // Goal: the signed time is judged against the key's window [valid_from, valid_until) and its
    // revocation instant; an invalid signature is reported as such even on a revoked key, so a
    // forged time cannot choose its quarantine reason.
    let key = ed25519_dalek::SigningKey::from_bytes(&[11; 32]);
    let signer = LocalEd25519Signer::from_signing_key(key, Some("k-2026"), "ledger-0").unwrap();
    let mut registry = KeyRegistry::new();
    registry
        .upsert(signer.key_record(t(1_000), Some(t(2_000))).unwrap())
        .unwrap();
    let event = audit_event(2, "window");

    let at = |ms| signer.sign_at(&event, t(ms));
    assert_eq!(
        code(registry.verify(&at(999).await.unwrap(), &event)),
        EvidenceCode::KeyOutsideWindow
    );
    registry.verify(&at(1_000).await.unwrap(), &event).unwrap();
    registry.verify(&at(1_999).await.unwrap(), &event).unwrap();
    assert_eq!(
        code(registry.verify(&at(2_000).await.unwrap(), &event)),
        EvidenceCode::KeyOutsideWindow
    );

    registry.revoke("k-2026", t(1_500)).unwrap();
    registry.verify(&at(1_499).await.unwrap(), &event).unwrap();
    assert_eq!(
        code(registry.verify(&at(1_500).await.unwrap(), &event)),
        EvidenceCode::KeyRevoked
    );
    assert_eq!(
        code(registry.verify(&at(1_700).await.unwrap(), &event)),
        EvidenceCode::KeyRevoked
    );
    assert_eq!(
        code(registry.verify(&at(2_500).await.unwrap(), &event)),
        EvidenceCode::KeyRevoked
    );
    let forged = Signed {
        signed_at: t(1_200),
        ..at(1_700).await.unwrap()
    };
    assert_eq!(
        code(registry.verify(&forged, &event)),
        EvidenceCode::SignatureInvalid
    );

    // Ingest also bounds how far in the future a signed time may lie (clock skew allowance).
    let mut open = KeyRegistry::new();
    open.upsert(signer.key_record(t(0), None).unwrap()).unwrap();
    let now = Utc::now();
    let skew = Duration::seconds(60);
    let soon = signer
        .sign_at(
            &event,
            spendguard_evidence::envelope::truncate_to_ms(now + Duration::seconds(30)),
        )
        .await
        .unwrap();
    open.verify_at(&soon, &event, now, skew).unwrap();
    let later = signer
        .sign_at(
            &event,
            spendguard_evidence::envelope::truncate_to_ms(now + Duration::minutes(10)),
        )
        .await
        .unwrap();
    let error = open.verify_at(&later, &event, now, skew).unwrap_err();
    assert_eq!(error.code(), EvidenceCode::SignedAtInFuture);
}

#[tokio::test]
async fn rotation_overlap_verifies_each_event_by_its_own_key_window() {
    // Goal: the S7 rotation sequence (add new key, cut over, revoke the old one after the overlap)
    // never rejects an event that was valid when it was signed, and never accepts one signed by a
    // key outside its window. Method: drive the registry through each phase and check events
    // signed by both keys at instants before, inside and after the overlap.
    let (t0, t1, t2, t3) = (t(10_000), t(20_000), t(30_000), t(40_000));
    let old = LocalEd25519Signer::from_signing_key(
        ed25519_dalek::SigningKey::from_bytes(&[21; 32]),
        None,
        "ledger-0",
    )
    .unwrap();
    let new = LocalEd25519Signer::from_signing_key(
        ed25519_dalek::SigningKey::from_bytes(&[22; 32]),
        None,
        "ledger-0",
    )
    .unwrap();
    assert_ne!(old.key_id(), new.key_id());
    let event = audit_event(3, "rotation");
    let ms = |d: DateTime<Utc>, offset: i64| d + Duration::milliseconds(offset);

    let old_early = old.sign_at(&event, ms(t0, 5_000)).await.unwrap();
    let old_overlap = old.sign_at(&event, ms(t1, 5_000)).await.unwrap();
    let old_late = old.sign_at(&event, ms(t2, 1)).await.unwrap();
    let new_early = new.sign_at(&event, ms(t1, -1)).await.unwrap();
    let new_overlap = new.sign_at(&event, ms(t1, 5_000)).await.unwrap();
    let new_late = new.sign_at(&event, ms(t3, 5_000)).await.unwrap();

    // Phase 0: only the old key, open-ended.
    let mut registry = KeyRegistry::new();
    registry.upsert(old.key_record(t0, None).unwrap()).unwrap();
    registry.verify(&old_early, &event).unwrap();
    assert_eq!(
        code(registry.verify(&new_overlap, &event)),
        EvidenceCode::KeyUnknown
    );

    // Phase 1, additive: the new key is published from t1; both verify in the overlap.
    registry.upsert(new.key_record(t1, None).unwrap()).unwrap();
    registry.verify(&old_overlap, &event).unwrap();
    registry.verify(&new_overlap, &event).unwrap();
    assert_eq!(
        code(registry.verify(&new_early, &event)),
        EvidenceCode::KeyOutsideWindow
    );

    // Phase 2, cutover: the old key's window closes at t2.
    registry
        .upsert(old.key_record(t0, Some(t2)).unwrap())
        .unwrap();
    registry.verify(&old_early, &event).unwrap();
    registry.verify(&old_overlap, &event).unwrap();
    assert_eq!(
        code(registry.verify(&old_late, &event)),
        EvidenceCode::KeyOutsideWindow
    );
    registry.verify(&new_late, &event).unwrap();

    // Phase 3, revoke after the overlap: old evidence is not orphaned, the old key signs nothing new.
    registry.revoke(old.key_id(), t3).unwrap();
    registry.verify(&old_early, &event).unwrap();
    registry.verify(&old_overlap, &event).unwrap();
    let old_after_revoke = old.sign_at(&event, ms(t3, 1)).await.unwrap();
    assert_eq!(
        code(registry.verify(&old_after_revoke, &event)),
        EvidenceCode::KeyRevoked
    );
    registry.verify(&new_overlap, &event).unwrap();
    registry.verify(&new_late, &event).unwrap();
}

#[tokio::test]
async fn startup_refuses_unsafe_or_incomplete_signing_config() {
    // Goal: S6 "missing signing config refuses startup outside demo" and "disabled only in demo",
    // with a typed code for each refusal, and no silent fallback for settings of another mode.
    let dir = tempfile::tempdir().unwrap();
    let key = openssl_ed25519_key(dir.path(), "signing.pem");
    let key = key.to_str().unwrap();
    let refused = async |argv: &[&str]| args(argv).build("ledger-0").await.unwrap_err().code();

    assert_eq!(refused(&[]).await, EvidenceCode::SigningModeMissing);
    assert_eq!(
        refused(&["--profile", "production"]).await,
        EvidenceCode::SigningModeMissing
    );
    assert_eq!(
        refused(&["--signing-mode", "disabled"]).await,
        EvidenceCode::SigningDisabledOutsideDemo
    );
    assert_eq!(
        refused(&["--signing-mode", "local"]).await,
        EvidenceCode::SigningConfigMissing
    );
    assert_eq!(
        refused(&["--signing-mode", "kms"]).await,
        EvidenceCode::SigningConfigMissing
    );
    assert_eq!(
        refused(&[
            "--signing-mode",
            "local",
            "--signing-key-file",
            key,
            "--signing-kms-key",
            "alias/x"
        ])
        .await,
        EvidenceCode::SigningConfigConflict
    );
    assert_eq!(
        refused(&[
            "--signing-mode",
            "kms",
            "--signing-kms-key",
            "alias/x",
            "--signing-key-file",
            key
        ])
        .await,
        EvidenceCode::SigningConfigConflict
    );
    assert_eq!(
        refused(&[
            "--profile",
            "demo",
            "--signing-mode",
            "disabled",
            "--signing-key-file",
            key
        ])
        .await,
        EvidenceCode::SigningConfigConflict
    );
    assert_eq!(
        refused(&[
            "--signing-mode",
            "local",
            "--signing-key-file",
            "/nonexistent/signing.pem"
        ])
        .await,
        EvidenceCode::SigningKeyFileUnreadable
    );
    assert_eq!(
        refused(&[
            "--signing-mode",
            "local",
            "--signing-key-file",
            key,
            "--signing-key-id",
            "has space"
        ])
        .await,
        EvidenceCode::SigningConfigInvalid
    );
    let disabled = args(&["--profile", "demo", "--signing-mode", "disabled"])
        .build("ledger-0")
        .await
        .unwrap();
    assert!(matches!(disabled, Signing::Disabled));
    let demo_default = args(&["--profile", "demo"])
        .build("ledger-0")
        .await
        .unwrap();
    assert!(matches!(demo_default, Signing::Disabled));

    // Unknown values abort at parse time instead of falling back.
    assert!(Args::try_parse_from(["test", "--signing-mode", "none"]).is_err());
    assert!(Args::try_parse_from(["test", "--profile", "staging"]).is_err());

    let Signing::Enabled(signer) = args(&[
        "--signing-mode",
        "local",
        "--signing-key-file",
        key,
        "--signing-key-id",
        "ledger-key-2026-11",
    ])
    .build("ledger-0")
    .await
    .unwrap() else {
        panic!("local mode builds a signer");
    };
    assert_eq!(signer.key_id(), "ledger-key-2026-11");
    let event = audit_event(4, "configured");
    let signed = signer.sign(&event).await.unwrap();
    let mut registry = KeyRegistry::new();
    registry
        .upsert(signer.key_record(t(0), None).unwrap())
        .unwrap();
    registry.verify(&signed, &event).unwrap();

    // Files that are not an Ed25519 PKCS#8 key.
    let p256 = dir.path().join("p256.pem");
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        p256.to_str().unwrap(),
    ]);
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a key").unwrap();
    let huge = dir.path().join("huge.pem");
    std::fs::write(&huge, vec![b'A'; 20_000]).unwrap();
    for (path, expected) in [
        (&p256, EvidenceCode::SigningKeyInvalid),
        (&garbage, EvidenceCode::SigningKeyInvalid),
        (&huge, EvidenceCode::SigningKeyFileUnreadable),
    ] {
        let error: ConfigError =
            LocalEd25519Signer::from_pem_file(path, None, "ledger-0").unwrap_err();
        assert_eq!(error.code(), expected, "{}", path.display());
    }
}

/// A `MakeWriter` that collects log lines in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn private_key_material_never_appears_in_debug_display_errors_or_logs() {
    // Goal: S6 "private keys never appear in logs, errors or rows". Method: take an openssl key,
    // compute every textual form of its secret (hex, base64, the PEM body), then format the
    // signer, the startup outcome, the signature, every refusal of a key-bearing file and the
    // startup log, and search all of it for those forms.
    let dir = tempfile::tempdir().unwrap();
    let path = openssl_ed25519_key(dir.path(), "signing.pem");
    let pem = std::fs::read_to_string(&path).unwrap();
    let secret = {
        use ed25519_dalek::pkcs8::DecodePrivateKey as _;
        ed25519_dalek::SigningKey::from_pkcs8_pem(&pem)
            .unwrap()
            .to_bytes()
    };
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let forms = {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        vec![
            hex::encode(secret),
            hex::encode_upper(secret),
            b64.encode(secret),
            body.clone(),
            body[body.len() - 24..].to_owned(), // the tail of the DER holds the secret
            format!("{secret:?}"),
        ]
    };

    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_max_level(tracing::Level::TRACE)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let key = path.to_str().unwrap();
    let mut texts = Vec::new();
    let signing_args = args(&["--signing-mode", "local", "--signing-key-file", key]);
    texts.push(format!("{signing_args:?}"));
    let signing = signing_args.build("ledger-0").await.unwrap();
    texts.push(format!("{signing:?}"));
    let Signing::Enabled(signer) = &signing else {
        panic!("local signer")
    };
    texts.push(format!("{signer:?}"));
    texts.push(format!("{:?}", signer.public_key()));
    let signed = signer.sign(&audit_event(5, "hygiene")).await.unwrap();
    texts.push(format!("{signed:?}"));

    // Files that hold the secret but are refused: the refusal must not echo them.
    let hex_file = dir.path().join("hex.pem");
    std::fs::write(&hex_file, hex::encode(secret)).unwrap();
    let broken_pem = dir.path().join("broken.pem");
    std::fs::write(
        &broken_pem,
        pem.replacen("PRIVATE KEY", "EC PRIVATE KEY", 1),
    )
    .unwrap();
    let huge = dir.path().join("huge.pem");
    std::fs::write(&huge, pem.repeat(200)).unwrap();
    for file in [&hex_file, &broken_pem, &huge] {
        let error = args(&[
            "--signing-mode",
            "local",
            "--signing-key-file",
            file.to_str().unwrap(),
        ])
        .build("ledger-0")
        .await
        .unwrap_err();
        texts.push(format!("{error} {error:?}"));
    }
    drop(_guard);
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("audit event signing ready"),
        "startup is logged: {logs}"
    );
    texts.push(logs);

    for text in &texts {
        for form in &forms {
            assert!(
                !text.contains(form.as_str()),
                "key material {form:?} leaked into: {text}"
            );
        }
    }
}

/// A signer of producer `ledger-0` with the key of `seed`, and a registry holding that key.
fn signer_and_registry(seed: u8) -> (LocalEd25519Signer, KeyRegistry) {
    let signer = LocalEd25519Signer::from_signing_key(
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32]),
        None,
        "ledger-0",
    )
    .unwrap();
    let mut registry = KeyRegistry::new();
    registry
        .upsert(signer.key_record(t(0), None).unwrap())
        .unwrap();
    (signer, registry)
}

#[tokio::test]
async fn a_batch_signature_verifies_each_event_alone_and_nothing_else() {
    // Goal: one signature over a batch still proves every event on its own, and no event can be
    // swapped, moved within the batch, lifted into another batch or passed off as singly signed.
    // Method: sign batches of several sizes, verify each event with only its own row (bytes,
    // signature, inclusion), then tamper with each part and expect the precise refusal.
    let (signer, registry) = signer_and_registry(31);
    for n in [1, 2, 3, 7, 8, 9] {
        let events: Vec<Vec<u8>> = (0..n).map(|i| audit_event(i, "batch")).collect();
        let refs: Vec<&[u8]> = events.iter().map(Vec::as_slice).collect();
        let signed = signer.sign_batch(&refs).await.unwrap();
        assert_eq!(signed.len(), events.len());
        for (event, s) in events.iter().zip(&signed) {
            registry.verify(s, event).unwrap();
            assert_eq!(s.signature, signed[0].signature, "one signature per batch");
        }
        if n > 1 {
            // Another event of the same batch under this event's proof.
            assert_eq!(
                code(registry.verify(&signed[0], &events[1])),
                EvidenceCode::SignatureInvalid
            );
        }
        let last = signed.last().unwrap();
        let last_event = events.last().unwrap();
        // The batch signature without its proof is not a signature over the event alone.
        let unproven = Signed {
            inclusion: None,
            ..last.clone()
        };
        assert_eq!(
            code(registry.verify(&unproven, last_event)),
            EvidenceCode::SignatureInvalid
        );
        // A path that does not fit its place is malformed, not merely invalid.
        let mut ragged = last.clone();
        ragged.inclusion.as_mut().unwrap().path.push([0; 32]);
        assert_eq!(
            code(registry.verify(&ragged, last_event)),
            EvidenceCode::SignatureMalformed
        );
        let mut recounted = last.clone();
        recounted.inclusion.as_mut().unwrap().count += 1;
        assert!(matches!(
            code(registry.verify(&recounted, last_event)),
            EvidenceCode::SignatureInvalid | EvidenceCode::SignatureMalformed
        ));
        // The time and producer are covered as in a single signature.
        let later = Signed {
            signed_at: last.signed_at + Duration::milliseconds(1),
            ..last.clone()
        };
        assert_eq!(
            code(registry.verify(&later, last_event)),
            EvidenceCode::SignatureInvalid
        );
    }

    // An event signed alone cannot borrow a batch's proof, and a batch's event cannot be lifted
    // into another batch's signature.
    let a: Vec<Vec<u8>> = (0..4).map(|i| audit_event(i, "a")).collect();
    let b: Vec<Vec<u8>> = (0..4).map(|i| audit_event(i, "b")).collect();
    let signed_a = signer
        .sign_batch(&a.iter().map(Vec::as_slice).collect::<Vec<_>>())
        .await
        .unwrap();
    let signed_b = signer
        .sign_batch_at(
            &b.iter().map(Vec::as_slice).collect::<Vec<_>>(),
            signed_a[0].signed_at,
        )
        .await
        .unwrap();
    let lifted = Signed {
        inclusion: signed_a[2].inclusion.clone(),
        ..signed_b[2].clone()
    };
    assert_eq!(
        code(registry.verify(&lifted, &a[2])),
        EvidenceCode::SignatureInvalid
    );
    registry.verify(&lifted, &b[2]).unwrap_err();
    let single = signer.sign(&a[0]).await.unwrap();
    let borrowed = Signed {
        inclusion: signed_a[0].inclusion.clone(),
        ..single
    };
    assert_eq!(
        code(registry.verify(&borrowed, &a[0])),
        EvidenceCode::SignatureInvalid
    );

    // No batch of nothing.
    assert_eq!(
        signer.sign_batch(&[]).await.unwrap_err().code(),
        EvidenceCode::SigningInputInvalid
    );
}

#[tokio::test]
async fn a_batch_pays_one_signature_check_and_every_event_is_still_judged() {
    // Goal: with a cache of verified signatures, the events of one batch cost one cryptographic
    // check, while each event is still tied to its own bytes and proof, and revocation and
    // windows are still judged per event.
    let (signer, mut registry) = signer_and_registry(41);
    let events: Vec<Vec<u8>> = (0..8).map(|i| audit_event(i, "cached")).collect();
    let refs: Vec<&[u8]> = events.iter().map(Vec::as_slice).collect();
    let signed = signer.sign_batch_at(&refs, t(5_000)).await.unwrap();
    let mut cache = VerifiedSignatures::default();
    for (event, s) in events.iter().zip(&signed) {
        registry.verify_cached(s, event, &mut cache).unwrap();
    }
    assert_eq!(cache.checks(), 1, "one check for the whole batch");

    // Another event under a cached signature rebuilds another envelope: checked, and refused.
    let mut tampered = events[3].clone();
    tampered[10] ^= 1;
    assert_eq!(
        code(registry.verify_cached(&signed[3], &tampered, &mut cache)),
        EvidenceCode::SignatureInvalid
    );
    assert_eq!(cache.checks(), 2);
    // Revocation is judged on a cached signature too.
    registry.revoke(signer.key_id(), t(4_000)).unwrap();
    assert_eq!(
        code(registry.verify_cached(&signed[0], &events[0], &mut cache)),
        EvidenceCode::KeyRevoked
    );
}
