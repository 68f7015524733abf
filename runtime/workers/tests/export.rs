//! Audit export and offline verification against the real ledger: chains are built by the ledger
//! and the forwarder, exported read-only, and verified without the database; every tampering
//! case is first shown to verify untampered, then to fail with its own code.
#![allow(clippy::unwrap_used)]

mod support;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Utc};
use clap::Parser as _;
use serde_json::Value;
use sha2::{Digest, Sha256};
use spendguard_core::audit::{EventDraft, ProducerStamp};
use spendguard_evidence::Inclusion;
use spendguard_testkit::TestLedger;
use spendguard_testkit::postgres::runtime_url;
use spendguard_workers::audit::AuditCommand;
use spendguard_workers::audit::export::{ExportOptions, connect_read_only, export};
use spendguard_workers::audit::format::{Manifest, Range, sha256_hex};
use spendguard_workers::audit::verify::{VerifyOptions, verify};
use spendguard_workers::chain::link;
use spendguard_workers::forwarder::{Forwarder, ForwarderMetrics};
use sqlx::PgPool;
use std::path::Path;
use support::tenant_activity;

async fn forward(pool: &PgPool) {
    let report = Forwarder::new(pool.clone(), true, 1_000, ForwarderMetrics::default())
        .pass()
        .await
        .unwrap();
    assert!(report.quarantined.is_empty(), "{:?}", report.quarantined);
}

fn options(tenant: &str, batch_size: usize) -> ExportOptions {
    ExportOptions {
        tenant_id: tenant.into(),
        range: Range::default(),
        batch_size,
        resume: false,
        max_batches: None,
    }
}

async fn chain_len(pool: &PgPool, tenant: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_chain WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn manifest(dir: &Path) -> Manifest {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Every exported line, in file order, as JSON.
fn lines(dir: &Path) -> Vec<Value> {
    manifest(dir)
        .batches
        .iter()
        .flat_map(|b| {
            let text = std::fs::read_to_string(dir.join(&b.file)).unwrap();
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn verify_code(dir: &Path) -> &'static str {
    match verify(dir, &VerifyOptions::default()) {
        Ok(report) => panic!("tampered export verified: {report}"),
        Err(e) => e.code(),
    }
}

/// Two tenants with a few events each, chained.
async fn two_tenants() -> (TestLedger, PgPool) {
    let mut ledger = TestLedger::start().await.unwrap();
    tenant_activity(&mut ledger, "acme", 4, "a").await;
    tenant_activity(&mut ledger, "globex", 3, "g").await;
    let pool = ledger.store().pool().clone();
    forward(&pool).await;
    (ledger, pool)
}

#[tokio::test]
async fn a_tenant_export_verifies_and_holds_only_that_tenant() {
    let (ledger, pool) = two_tenants().await;
    let reader = connect_read_only(&runtime_url(&ledger.database_url))
        .await
        .unwrap();
    // The exporter's sessions cannot write, whatever it runs.
    let write = sqlx::query("INSERT INTO forwarder_cursors VALUES ('x', 1)")
        .execute(&reader)
        .await;
    assert!(write.is_err(), "export sessions are read-only");

    for tenant in ["acme", "globex"] {
        let dir = tempfile::tempdir().unwrap();
        let report = export(&reader, dir.path(), &options(tenant, 4))
            .await
            .unwrap();
        let len = chain_len(&pool, tenant).await;
        assert!(len > 4, "several batches");
        assert!(report.complete);
        assert_eq!(report.cursor, Some(len));
        assert_eq!(i64::try_from(report.events).unwrap(), len);
        assert_eq!(report.batches, usize::try_from(len).unwrap().div_ceil(4));

        let verified = verify(dir.path(), &VerifyOptions::default()).unwrap();
        assert_eq!(verified.tenant_id, tenant);
        assert_eq!(verified.span, Some((1, len)));
        assert_eq!(verified.keys, 1);
        assert!(verified.to_string().starts_with("OK tenant="));

        // Exactly the tenant's chain, byte for byte, and nothing else.
        let stored: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT chain_seq, canonical_event FROM audit_chain WHERE tenant_id = $1 ORDER BY 1",
        )
        .bind(tenant)
        .fetch_all(&pool)
        .await
        .unwrap();
        let exported: Vec<(i64, Vec<u8>)> = lines(dir.path())
            .iter()
            .map(|l| {
                assert_eq!(l["tenant_id"], tenant);
                let bytes = BASE64
                    .decode(l["canonical_event"].as_str().unwrap())
                    .unwrap();
                let event: Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(event["tenant_id"], tenant);
                (l["chain_seq"].as_i64().unwrap(), bytes)
            })
            .collect();
        assert_eq!(exported, stored);
    }

    // A tenant without events exports an empty, verifiable manifest.
    let dir = tempfile::tempdir().unwrap();
    let report = export(&reader, dir.path(), &options("initech", 4))
        .await
        .unwrap();
    assert_eq!((report.events, report.cursor), (0, None));
    assert_eq!(
        verify(dir.path(), &VerifyOptions::default())
            .unwrap()
            .events,
        0
    );
}

#[tokio::test]
async fn cross_tenant_attempts_are_refused() {
    let (ledger, _pool) = two_tenants().await;
    let reader = connect_read_only(&runtime_url(&ledger.database_url))
        .await
        .unwrap();
    let acme = tempfile::tempdir().unwrap();
    export(&reader, acme.path(), &options("acme", 100))
        .await
        .unwrap();
    let before = std::fs::read(acme.path().join("manifest.json")).unwrap();

    // Continuing acme's export as globex is refused and changes nothing.
    let as_globex = ExportOptions {
        resume: true,
        ..options("globex", 100)
    };
    let error = export(&reader, acme.path(), &as_globex).await.unwrap_err();
    assert_eq!(error.code(), "TENANT_MISMATCH");
    assert_eq!(
        std::fs::read(acme.path().join("manifest.json")).unwrap(),
        before
    );
    // So is writing a fresh export over it.
    let error = export(&reader, acme.path(), &options("globex", 100))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "EXPORT_DIR_NOT_EMPTY");

    // A globex event spliced into acme's export fails, even with the manifest fixed up and the
    // line relabelled: the signed canonical bytes still name globex.
    let globex = tempfile::tempdir().unwrap();
    export(&reader, globex.path(), &options("globex", 100))
        .await
        .unwrap();
    // It takes the place (position 2) of the acme event it replaces.
    let mut foreign = lines(globex.path())[0].clone();
    foreign["chain_seq"] = 2.into();
    let mut relabelled = foreign.clone();
    relabelled["tenant_id"] = "acme".into();
    for (line, code) in [
        (foreign, "TENANT_MISMATCH"),
        (relabelled, "TENANT_MISMATCH"),
    ] {
        let dir = copy(acme.path());
        edit_lines(dir.path(), |lines| lines[1] = line.clone());
        assert_eq!(verify_code(dir.path()), code);
    }
}

#[tokio::test]
async fn a_resumed_export_equals_a_one_shot_export() {
    let mut ledger = TestLedger::start().await.unwrap();
    tenant_activity(&mut ledger, "acme", 4, "a").await;
    let pool = ledger.store().pool().clone();
    forward(&pool).await;
    let reader = connect_read_only(&runtime_url(&ledger.database_url))
        .await
        .unwrap();

    // Interrupted: one batch, then a crash that left a half-written next batch file.
    let resumed = tempfile::tempdir().unwrap();
    let first = export(
        &reader,
        resumed.path(),
        &ExportOptions {
            max_batches: Some(1),
            ..options("acme", 3)
        },
    )
    .await
    .unwrap();
    assert_eq!((first.batches, first.events, first.complete), (1, 3, false));
    std::fs::write(resumed.path().join("batch-000002.jsonl"), b"{\"torn").unwrap();
    verify(resumed.path(), &VerifyOptions::default()).unwrap();

    // More evidence arrives meanwhile.
    tenant_activity(&mut ledger, "acme", 3, "b").await;
    forward(&pool).await;
    let resume = ExportOptions {
        resume: true,
        ..options("acme", 3)
    };
    let rest = export(&reader, resumed.path(), &resume).await.unwrap();
    let len = chain_len(&pool, "acme").await;
    assert!(rest.complete);
    assert_eq!(rest.cursor, Some(len));
    assert_eq!(i64::try_from(first.events + rest.events).unwrap(), len);

    let one_shot = tempfile::tempdir().unwrap();
    export(&reader, one_shot.path(), &options("acme", 3))
        .await
        .unwrap();
    assert_eq!(lines(resumed.path()), lines(one_shot.path()));
    let seqs: Vec<i64> = lines(resumed.path())
        .iter()
        .map(|l| l["chain_seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=len).collect::<Vec<_>>(), "no duplicate, no gap");
    verify(resumed.path(), &VerifyOptions::default()).unwrap();

    // Resuming with nothing new writes no batch and keeps the cursor.
    let again = export(&reader, resumed.path(), &resume).await.unwrap();
    assert_eq!((again.batches, again.cursor), (0, Some(len)));
    // Resuming against another database (its own acme chain) is refused, shorter or longer.
    for calls in [1, 8] {
        let mut other = TestLedger::start().await.unwrap();
        tenant_activity(&mut other, "acme", calls, "o").await;
        forward(other.store().pool()).await;
        let other_reader = connect_read_only(&runtime_url(&other.database_url))
            .await
            .unwrap();
        let before = std::fs::read(resumed.path().join("manifest.json")).unwrap();
        let error = export(&other_reader, resumed.path(), &resume)
            .await
            .unwrap_err();
        assert_eq!(
            error.code(),
            "EXPORT_CHAIN_INCONSISTENT",
            "{calls}: {error}"
        );
        assert_eq!(
            std::fs::read(resumed.path().join("manifest.json")).unwrap(),
            before
        );
    }
    // A resumed export keeps its range.
    let moved = ExportOptions {
        range: Range {
            from: Some(Utc::now()),
            to: None,
        },
        ..resume
    };
    let error = export(&reader, resumed.path(), &moved).await.unwrap_err();
    assert_eq!(error.code(), "EXPORT_RANGE_INVALID");
}

#[tokio::test]
async fn a_date_range_exports_a_contiguous_anchored_segment() {
    let mut ledger = TestLedger::start().await.unwrap();
    tenant_activity(&mut ledger, "acme", 3, "a").await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let middle: DateTime<Utc> = Utc::now();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    tenant_activity(&mut ledger, "acme", 3, "b").await;
    let pool = ledger.store().pool().clone();
    forward(&pool).await;
    let reader = connect_read_only(&runtime_url(&ledger.database_url))
        .await
        .unwrap();
    let ranged = |from, to| ExportOptions {
        range: Range { from, to },
        ..options("acme", 2)
    };

    let before = tempfile::tempdir().unwrap();
    export(&reader, before.path(), &ranged(None, Some(middle)))
        .await
        .unwrap();
    let after = tempfile::tempdir().unwrap();
    export(&reader, after.path(), &ranged(Some(middle), None))
        .await
        .unwrap();
    let early = verify(before.path(), &VerifyOptions::default()).unwrap();
    let late = verify(after.path(), &VerifyOptions::default()).unwrap();
    let len = chain_len(&pool, "acme").await;
    let (Some((1, split)), Some((start, end))) = (early.span, late.span) else {
        panic!("{early:?} {late:?}")
    };
    assert_eq!((start, end), (split + 1, len), "the halves meet exactly");
    for line in lines(after.path()) {
        let at: DateTime<Utc> = line["occurred_at"].as_str().unwrap().parse().unwrap();
        assert!(at >= middle);
    }
    // The later half is anchored on the earlier half's last link.
    let anchor = manifest(after.path()).anchor_prev_chain_hash.unwrap();
    assert_eq!(
        anchor,
        manifest(before.path()).cursor.unwrap().chain_hash,
        "anchor = previous segment's head"
    );
    let error = export(
        &reader,
        tempfile::tempdir().unwrap().path(),
        &ranged(Some(middle), Some(middle)),
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), "EXPORT_RANGE_INVALID");
}

fn copy(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Rewrites the export's lines (all in batch 1) and fixes the manifest to match, as an attacker
/// with write access would.
fn edit_lines(dir: &Path, edit: impl FnOnce(&mut Vec<Value>)) {
    let mut all = lines(dir);
    edit(&mut all);
    let mut body = Vec::new();
    for line in &all {
        body.extend(serde_json::to_vec(line).unwrap());
        body.push(b'\n');
    }
    std::fs::write(dir.join("batch-000001.jsonl"), &body).unwrap();
    let mut m = manifest(dir);
    let batch = &mut m.batches[0];
    batch.sha256 = sha256_hex(&body);
    batch.events = all.len() as u64;
    batch.first_chain_seq = all[0]["chain_seq"].as_i64().unwrap();
    batch.last_chain_seq = all.last().unwrap()["chain_seq"].as_i64().unwrap();
    let last = all.last().unwrap();
    m.cursor = Some(spendguard_workers::audit::format::Cursor {
        chain_seq: last["chain_seq"].as_i64().unwrap(),
        chain_hash: last["chain_hash"].as_str().unwrap().into(),
    });
    write_manifest(dir, &m);
}

fn write_manifest(dir: &Path, m: &Manifest) {
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec(m).unwrap()).unwrap();
}

/// Rewrites keys.json and the manifest's hash of it.
fn edit_keys(dir: &Path, edit: impl FnOnce(&mut Vec<Value>)) {
    let mut keys: Value =
        serde_json::from_slice(&std::fs::read(dir.join("keys.json")).unwrap()).unwrap();
    edit(keys["keys"].as_array_mut().unwrap());
    let bytes = serde_json::to_vec(&keys).unwrap();
    std::fs::write(dir.join("keys.json"), &bytes).unwrap();
    let mut m = manifest(dir);
    m.keys_sha256 = sha256_hex(&bytes);
    write_manifest(dir, &m);
}

/// Replaces the committed amount inside event `index`'s canonical bytes.
fn alter_event(line: &mut Value) -> Vec<u8> {
    let bytes = BASE64
        .decode(line["canonical_event"].as_str().unwrap())
        .unwrap();
    let mut event: Value = serde_json::from_slice(&bytes).unwrap();
    event["data"]["tampered"] = "1000000000".into();
    let altered = serde_json::to_vec(&event).unwrap();
    line["canonical_event"] = BASE64.encode(&altered).into();
    altered
}

/// Recomputes every link from `from` on, so only the signature can still tell.
fn relink(lines: &mut [Value], from: usize) {
    let mut prev: [u8; 32] = hex::decode(lines[from]["prev_chain_hash"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    for line in &mut lines[from..] {
        let bytes = BASE64
            .decode(line["canonical_event"].as_str().unwrap())
            .unwrap();
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        line["event_sha256"] = hex::encode(digest).into();
        line["prev_chain_hash"] = hex::encode(prev).into();
        prev = link(&prev, &digest);
        line["chain_hash"] = hex::encode(prev).into();
    }
}

#[tokio::test]
async fn exports_of_the_previous_format_still_verify() {
    // Goal: v1 exports (written before batch signatures) stay verifiable: the verifier reads both
    // format tags; the exporter writes v2.
    let (ledger, _pool) = two_tenants().await;
    let reader = connect_read_only(&runtime_url(&ledger.database_url))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    export(&reader, dir.path(), &options("acme", 1_000))
        .await
        .unwrap();
    assert_eq!(manifest(dir.path()).format, "spendguard.audit-export.v2");
    let mut keys: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("keys.json")).unwrap()).unwrap();
    keys["format"] = "spendguard.audit-export.v1".into();
    let bytes = serde_json::to_vec(&keys).unwrap();
    std::fs::write(dir.path().join("keys.json"), &bytes).unwrap();
    let mut m = manifest(dir.path());
    m.format = "spendguard.audit-export.v1".into();
    m.keys_sha256 = sha256_hex(&bytes);
    write_manifest(dir.path(), &m);
    verify(dir.path(), &VerifyOptions::default()).unwrap();
    // Resuming it would mix formats in one directory: refused, and nothing is written.
    let before = files_of(dir.path());
    let resume = ExportOptions {
        resume: true,
        ..options("acme", 1_000)
    };
    let refused = export(&reader, dir.path(), &resume).await.unwrap_err();
    assert_eq!(refused.code(), "MANIFEST_INVALID", "{refused}");
    assert!(refused.to_string().contains("new directory"), "{refused}");
    assert_eq!(files_of(dir.path()), before);
}

/// Every file of `dir` with its bytes, by name.
fn files_of(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(entry.path()).unwrap())
        })
        .collect()
}

#[tokio::test]
async fn tampering_fails_verification_with_its_own_code() {
    let (ledger, _pool) = two_tenants().await;
    let reader = connect_read_only(&runtime_url(&ledger.database_url))
        .await
        .unwrap();
    let original = tempfile::tempdir().unwrap();
    export(&reader, original.path(), &options("acme", 1_000))
        .await
        .unwrap();

    type Tamper = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, &str, Tamper)> = vec![
        (
            "a flipped byte in a batch file",
            "MANIFEST_MISMATCH",
            Box::new(|dir| {
                let path = dir.join("batch-000001.jsonl");
                let mut bytes = std::fs::read(&path).unwrap();
                bytes[40] ^= 0x01;
                std::fs::write(&path, bytes).unwrap();
            }),
        ),
        (
            "a batch truncated by its last line",
            "MANIFEST_MISMATCH",
            Box::new(|dir| {
                let path = dir.join("batch-000001.jsonl");
                let text = std::fs::read_to_string(&path).unwrap();
                let mut kept: Vec<&str> = text.lines().collect();
                kept.pop();
                std::fs::write(&path, kept.join("\n") + "\n").unwrap();
            }),
        ),
        (
            "an edited event, manifest fixed",
            "EVENT_HASH_MISMATCH",
            Box::new(|dir| {
                edit_lines(dir, |lines| {
                    alter_event(&mut lines[2]);
                });
            }),
        ),
        (
            "an edited event with its hash and every later link recomputed",
            "SIGNATURE_INVALID",
            Box::new(|dir| {
                edit_lines(dir, |lines| {
                    alter_event(&mut lines[2]);
                    relink(lines, 2);
                });
            }),
        ),
        (
            "a format this verifier does not know",
            "MANIFEST_INVALID",
            Box::new(|dir| {
                let mut m = manifest(dir);
                m.format = "spendguard.audit-export.v9".into();
                write_manifest(dir, &m);
            }),
        ),
        (
            "an event's batch inclusion proof placing it in another batch",
            "SIGNATURE_INVALID",
            Box::new(|dir| {
                edit_lines(dir, |lines| {
                    // The ledger signs each write batch once and the proof places the event in
                    // it; a well-formed proof for a batch that was never signed fails.
                    let foreign = Inclusion {
                        index: 1,
                        count: 2,
                        path: vec![[0x5a; 32]],
                    };
                    assert!(lines[2]["signature"]["inclusion"].is_string());
                    lines[2]["signature"]["inclusion"] = BASE64.encode(foreign.to_bytes()).into();
                });
            }),
        ),
        (
            "an event's batch inclusion proof cut short",
            "SIGNATURE_MALFORMED",
            Box::new(|dir| {
                edit_lines(dir, |lines| {
                    let proof = lines[2]["signature"]["inclusion"]
                        .as_str()
                        .unwrap()
                        .to_owned();
                    let bytes = BASE64.decode(proof).unwrap();
                    lines[2]["signature"]["inclusion"] = BASE64.encode(&bytes[..5]).into();
                });
            }),
        ),
        (
            "a line field that disagrees with the signed bytes",
            "EVENT_METADATA_MISMATCH",
            Box::new(|dir| {
                edit_lines(dir, |lines| {
                    lines[1]["event_type"] = "reservation.released".into();
                });
            }),
        ),
        (
            "a dropped event, manifest fixed",
            "CHAIN_GAP",
            Box::new(|dir| {
                edit_lines(dir, |lines| {
                    lines.remove(3);
                });
            }),
        ),
        (
            "two events swapped, manifest fixed",
            "CHAIN_GAP",
            Box::new(|dir| {
                edit_lines(dir, |lines| lines.swap(1, 2));
            }),
        ),
        (
            "two events swapped, positions and links recomputed",
            "PRODUCER_SEQUENCE_OUT_OF_ORDER",
            Box::new(|dir| {
                edit_lines(dir, |lines| {
                    lines.swap(1, 2);
                    let (first, second) =
                        (lines[2]["chain_seq"].clone(), lines[1]["chain_seq"].clone());
                    lines[1]["chain_seq"] = first;
                    lines[2]["chain_seq"] = second;
                    lines[1]["prev_chain_hash"] = lines[0]["chain_hash"].clone();
                    relink(lines, 1);
                });
            }),
        ),
        (
            "an event repeated in place of the next, positions and links recomputed",
            "PRODUCER_SEQUENCE_OUT_OF_ORDER",
            Box::new(|dir| {
                edit_lines(dir, |lines| {
                    let mut repeated = lines[1].clone();
                    repeated["chain_seq"] = lines[2]["chain_seq"].clone();
                    lines[2] = repeated;
                    relink(lines, 1);
                });
            }),
        ),
        (
            "a forged link that the next event agrees with",
            "CHAIN_BROKEN",
            Box::new(|dir| {
                edit_lines(dir, |lines| {
                    let forged = hex::encode([7u8; 32]);
                    lines[2]["chain_hash"] = forged.clone().into();
                    lines[3]["prev_chain_hash"] = forged.into();
                });
            }),
        ),
        (
            "a dropped event with later positions renumbered",
            "CHAIN_BROKEN",
            Box::new(|dir| {
                edit_lines(dir, |lines| {
                    lines.remove(3);
                    for line in &mut lines[3..] {
                        let seq = line["chain_seq"].as_i64().unwrap();
                        line["chain_seq"] = (seq - 1).into();
                    }
                });
            }),
        ),
        (
            "the first event dropped, manifest start moved",
            "CHAIN_BROKEN",
            Box::new(|dir| {
                edit_lines(dir, |lines| {
                    lines.remove(0);
                });
                let mut m = manifest(dir);
                m.first_chain_seq = Some(2);
                write_manifest(dir, &m);
            }),
        ),
        (
            "a key removed from keys.json, manifest fixed",
            "KEY_UNKNOWN",
            Box::new(|dir| edit_keys(dir, Vec::clear)),
        ),
        (
            "a key revoked before it signed, manifest fixed",
            "KEY_REVOKED",
            Box::new(|dir| {
                edit_keys(dir, |keys| {
                    keys[0]["revoked_at"] = keys[0]["valid_from"].clone();
                });
            }),
        ),
        (
            "keys.json edited, manifest not fixed",
            "MANIFEST_MISMATCH",
            Box::new(|dir| {
                let path = dir.join("keys.json");
                let text = std::fs::read_to_string(&path).unwrap();
                std::fs::write(
                    &path,
                    text.replace(
                        "\"revoked_at\": null",
                        "\"revoked_at\": \"2000-01-01T00:00:00Z\"",
                    ),
                )
                .unwrap();
            }),
        ),
        (
            "a manifest pointing outside the export",
            "MANIFEST_INVALID",
            Box::new(|dir| {
                let mut m = manifest(dir);
                m.batches[0].file = "../batch-000001.jsonl".into();
                write_manifest(dir, &m);
            }),
        ),
        (
            "a manifest cursor past the last event",
            "MANIFEST_MISMATCH",
            Box::new(|dir| {
                let mut m = manifest(dir);
                m.cursor.as_mut().unwrap().chain_seq += 1;
                write_manifest(dir, &m);
            }),
        ),
    ];
    for (what, code, tamper) in cases {
        let dir = copy(original.path());
        verify(dir.path(), &VerifyOptions::default()).unwrap();
        tamper(dir.path());
        assert_eq!(verify_code(dir.path()), code, "{what}");
    }

    // With the auditor's own trusted keys, a doctored keys.json in the export is irrelevant.
    let dir = copy(original.path());
    let trusted = dir.path().join("trusted-keys.json");
    std::fs::copy(dir.path().join("keys.json"), &trusted).unwrap();
    edit_keys(dir.path(), Vec::clear);
    let with_trusted = VerifyOptions {
        keys: Some(trusted),
        ..VerifyOptions::default()
    };
    verify(dir.path(), &with_trusted).unwrap();
}

#[tokio::test]
async fn unsigned_demo_events_verify_only_when_allowed() {
    let mut ledger = TestLedger::start().await.unwrap();
    tenant_activity(&mut ledger, "acme", 1, "a").await;
    let pool = ledger.store().pool().clone();
    forward(&pool).await;
    // A demo-profile producer's unsigned event, chained by a non-strict forwarder.
    sqlx::query(
        "INSERT INTO audit_producers (producer_instance_id, claim_token, next_sequence)
         VALUES ('demo', gen_random_uuid(), 2)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let stamped = EventDraft {
        tenant_id: "acme".into(),
        event_type: "reservation.committed",
        data: serde_json::json!({"committed_nano_usd": "1"}),
    }
    .stamp(&ProducerStamp {
        producer_instance_id: "demo".into(),
        producer_sequence: 1,
        occurred_at: Utc::now(),
    })
    .unwrap();
    let occurred: String = serde_json::from_slice::<Value>(&stamped.bytes).unwrap()["occurred_at"]
        .as_str()
        .unwrap()
        .into();
    sqlx::query(
        "INSERT INTO audit_outbox (producer_instance_id, producer_sequence, tenant_id, event_type,
                                   occurred_at, canonical_event, event_sha256)
         VALUES ('demo', 1, 'acme', 'reservation.committed', $1::timestamptz, $2, $3)",
    )
    .bind(occurred)
    .bind(&stamped.bytes)
    .bind(stamped.sha256.to_vec())
    .execute(&pool)
    .await
    .unwrap();
    let demo = Forwarder::new(pool.clone(), false, 1_000, ForwarderMetrics::default());
    assert_eq!(demo.pass().await.unwrap().accepted, 1);

    let reader = connect_read_only(&runtime_url(&ledger.database_url))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    export(&reader, dir.path(), &options("acme", 100))
        .await
        .unwrap();
    assert_eq!(verify_code(dir.path()), "UNSIGNED");
    let allow = VerifyOptions {
        allow_unsigned: true,
        ..VerifyOptions::default()
    };
    let report = verify(dir.path(), &allow).unwrap();
    assert_eq!(
        i64::try_from(report.events).unwrap(),
        chain_len(&pool, "acme").await
    );
}

/// `spendguard audit …` as main.rs wires it.
#[derive(clap::Parser)]
struct Cli {
    #[command(subcommand)]
    audit: AuditCommand,
}

async fn run_cli(args: &[&str]) -> anyhow::Result<String> {
    let cli = Cli::try_parse_from([&["spendguard-audit"], args].concat())?;
    cli.audit.run().await
}

#[tokio::test]
async fn the_cli_exports_resumes_and_verifies_with_stable_codes() {
    let mut ledger = TestLedger::start().await.unwrap();
    tenant_activity(&mut ledger, "acme", 2, "a").await;
    let pool = ledger.store().pool().clone();
    forward(&pool).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("acme");
    let out = out.to_str().unwrap();
    let url = runtime_url(&ledger.database_url);
    let url = url.as_str();
    let base = [
        "export",
        "--database-url",
        url,
        "--tenant",
        "acme",
        "--out",
        out,
        "--batch-size",
        "2",
    ];
    let first = run_cli(&[&base[..], &["--max-batches", "1"]].concat())
        .await
        .unwrap();
    assert!(
        first.contains("new_events=2 cursor=2 complete=false"),
        "{first}"
    );
    let rest = run_cli(&[&base[..], &["--resume"]].concat()).await.unwrap();
    let len = chain_len(&pool, "acme").await;
    assert!(
        rest.contains(&format!("cursor={len} complete=true")),
        "{rest}"
    );
    let ok = run_cli(&["verify", out]).await.unwrap();
    assert!(ok.starts_with("OK tenant=acme"), "{ok}");

    let again = run_cli(&base).await.unwrap_err().to_string();
    assert!(again.starts_with("EXPORT_DIR_NOT_EMPTY: "), "{again}");
    let batch = Path::new(out).join("batch-000001.jsonl");
    let mut bytes = std::fs::read(&batch).unwrap();
    bytes[10] ^= 0x20;
    std::fs::write(&batch, bytes).unwrap();
    let failed = run_cli(&["verify", out]).await.unwrap_err().to_string();
    assert!(failed.starts_with("MANIFEST_MISMATCH: "), "{failed}");
    assert!(
        run_cli(&[&base[..], &["--from", "yesterday"]].concat())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_checkpoint_catches_a_cut_tail_with_a_rewritten_manifest() {
    let mut ledger = TestLedger::start().await.unwrap();
    tenant_activity(&mut ledger, "acme", 4, "a").await;
    let pool = ledger.store().pool().clone();
    let key = std::sync::Arc::new(
        spendguard_evidence::LocalEd25519Signer::from_signing_key(
            ed25519_dalek::SigningKey::from_bytes(&[21; 32]),
            None,
            "forwarder",
        )
        .unwrap(),
    );
    let public = spendguard_evidence::Signer::public_key(key.as_ref()).to_bytes();
    let report = Forwarder::new(pool.clone(), true, 1_000, ForwarderMetrics::default())
        .with_checkpoint_signer(key, "sg-audit")
        .unwrap()
        .pass()
        .await
        .unwrap();
    assert!(report.quarantined.is_empty());
    let len = chain_len(&pool, "acme").await;

    let reader = connect_read_only(&runtime_url(&ledger.database_url))
        .await
        .unwrap();
    let original = tempfile::tempdir().unwrap();
    export(&reader, original.path(), &options("acme", 100))
        .await
        .unwrap();
    let note = std::fs::read_to_string(original.path().join("checkpoint.txt")).unwrap();
    assert!(note.starts_with(&format!("spendguard.io/audit/acme\n{len}\n")));
    let with_checkpoint = VerifyOptions {
        checkpoint: Some(("sg-audit".into(), public.clone())),
        ..VerifyOptions::default()
    };
    let verified = verify(original.path(), &with_checkpoint).unwrap();
    assert_eq!(verified.checkpoint, Some(u64::try_from(len).unwrap()));

    let code = |dir: &Path, options: &VerifyOptions| match verify(dir, options) {
        Ok(report) => panic!("verified: {report}"),
        Err(e) => e.code(),
    };
    // Cut the tail and rewrite the manifest: the chain alone still verifies, the checkpoint not.
    let cut = copy(original.path());
    edit_lines(cut.path(), |lines| lines.truncate(lines.len() - 2));
    verify(cut.path(), &VerifyOptions::default()).unwrap();
    assert_eq!(code(cut.path(), &with_checkpoint), "CHECKPOINT_MISMATCH");

    // Re-rooting the note at the cut end breaks its signature.
    let m = manifest(cut.path());
    let cursor = m.cursor.unwrap();
    let root = hex::decode(&cursor.chain_hash).unwrap();
    let body = format!(
        "spendguard.io/audit/acme\n{}\n{}\n",
        cursor.chain_seq,
        BASE64.encode(&root)
    );
    let (_, sig) = note.split_once("\n\n").unwrap();
    std::fs::write(cut.path().join("checkpoint.txt"), format!("{body}\n{sig}")).unwrap();
    assert_eq!(code(cut.path(), &with_checkpoint), "CHECKPOINT_INVALID");

    // A removed checkpoint, another key, or a note for another tenant.
    let dir = copy(original.path());
    std::fs::remove_file(dir.path().join("checkpoint.txt")).unwrap();
    assert_eq!(code(dir.path(), &with_checkpoint), "CHECKPOINT_MISSING");
    let other_key = ed25519_dalek::SigningKey::from_bytes(&[22; 32])
        .verifying_key()
        .to_bytes()
        .to_vec();
    let wrong = VerifyOptions {
        checkpoint: Some(("sg-audit".into(), other_key)),
        ..VerifyOptions::default()
    };
    assert_eq!(code(original.path(), &wrong), "CHECKPOINT_INVALID");

    // The CLI takes the key as base64 or as a file.
    let key_b64 = BASE64.encode(&public);
    let dir_arg = original.path().to_str().unwrap();
    let out = run_cli(&[
        "verify",
        dir_arg,
        "--checkpoint-key",
        &key_b64,
        "--checkpoint-key-name",
        "sg-audit",
    ])
    .await
    .unwrap();
    assert!(out.contains(&format!("checkpoint={len}")), "{out}");
    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_file.path(), format!("{key_b64}\n")).unwrap();
    let error = run_cli(&[
        "verify",
        cut.path().to_str().unwrap(),
        "--checkpoint-key",
        key_file.path().to_str().unwrap(),
        "--checkpoint-key-name",
        "sg-audit",
    ])
    .await
    .unwrap_err();
    assert!(
        error.to_string().starts_with("CHECKPOINT_INVALID"),
        "{error}"
    );
}
