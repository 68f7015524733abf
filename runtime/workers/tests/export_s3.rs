//! Audit export to S3-compatible storage, verification from it, and checkpoint publication,
//! against moto's S3 (server mode, started by `spendguard_testkit::moto`) and the real ledger,
//! forwarder and database. The objects are read back with a separate S3 client, never through
//! the code under test.
#![allow(clippy::unwrap_used)]

mod support;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;
use spendguard_testkit::TestLedger;
use spendguard_testkit::moto::{MotoServer, REGION};
use spendguard_testkit::postgres::runtime_url;
use spendguard_workers::audit::export::{
    ExportOptions, ExportReport, connect_read_only, export, export_to,
};
use spendguard_workers::audit::format::{Manifest, Range};
use spendguard_workers::audit::publish::publish_checkpoints;
use spendguard_workers::audit::sink::{S3Store, Sink};
use spendguard_workers::audit::verify::{VerifyOptions, VerifyReport, verify_s3};
use spendguard_workers::forwarder::{Forwarder, ForwarderMetrics};
use sqlx::PgPool;
use std::sync::Arc;
use support::tenant_activity;

const BUCKET: &str = "audit";
const CHECKPOINT_KEY_NAME: &str = "sg-audit";

fn client(endpoint: &str) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "moto"))
        .http_client(spendguard_evidence::kms::https_client())
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// moto with the test bucket, and a client for it.
async fn moto_bucket() -> (MotoServer, aws_sdk_s3::Client) {
    let moto = MotoServer::start();
    let client = client(&moto.endpoint());
    client.create_bucket().bucket(BUCKET).send().await.unwrap();
    (moto, client)
}

fn sink(client: &aws_sdk_s3::Client, prefix: &str) -> Sink {
    Sink::S3(store(client, prefix))
}

fn store(client: &aws_sdk_s3::Client, prefix: &str) -> S3Store {
    S3Store::from_client(client.clone(), BUCKET, prefix)
}

async fn get(client: &aws_sdk_s3::Client, key: &str) -> Option<Vec<u8>> {
    match client.get_object().bucket(BUCKET).key(key).send().await {
        Ok(out) => Some(out.body.collect().await.unwrap().into_bytes().to_vec()),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => None,
        Err(e) => panic!("GetObject {key}: {e:?}"),
    }
}

async fn put(client: &aws_sdk_s3::Client, key: &str, bytes: &[u8]) {
    client
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(ByteStream::from(bytes.to_vec()))
        .send()
        .await
        .unwrap();
}

async fn delete(client: &aws_sdk_s3::Client, key: &str) {
    client
        .delete_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap();
}

/// Every key under `prefix`, sorted.
async fn list(client: &aws_sdk_s3::Client, prefix: &str) -> Vec<String> {
    let out = client
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix(prefix)
        .send()
        .await
        .unwrap();
    let mut keys: Vec<String> = out
        .contents()
        .iter()
        .map(|o| o.key().unwrap().to_owned())
        .collect();
    keys.sort();
    keys
}

async fn manifest(client: &aws_sdk_s3::Client, prefix: &str) -> Manifest {
    serde_json::from_slice(
        &get(client, &format!("{prefix}manifest.json"))
            .await
            .unwrap(),
    )
    .unwrap()
}

/// Every exported line under `prefix`, in manifest order.
async fn lines(client: &aws_sdk_s3::Client, prefix: &str) -> Vec<Value> {
    let mut all = Vec::new();
    for batch in manifest(client, prefix).await.batches {
        let bytes = get(client, &format!("{prefix}{}", batch.file))
            .await
            .unwrap();
        for line in String::from_utf8(bytes).unwrap().lines() {
            all.push(serde_json::from_str(line).unwrap());
        }
    }
    all
}

async fn verify_at(
    client: &aws_sdk_s3::Client,
    prefix: &str,
    options: &VerifyOptions,
) -> Result<VerifyReport, &'static str> {
    verify_s3(
        &store(client, prefix),
        &format!("s3://{BUCKET}/{prefix}"),
        options,
    )
    .await
    .map_err(|e| e.code())
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

fn resume(options: ExportOptions) -> ExportOptions {
    ExportOptions {
        resume: true,
        ..options
    }
}

async fn forward(pool: &PgPool) {
    let report = Forwarder::new(pool.clone(), true, 1_000, ForwarderMetrics::default())
        .pass()
        .await
        .unwrap();
    assert!(report.quarantined.is_empty(), "{:?}", report.quarantined);
}

/// A forwarder pass that also signs checkpoints with a fixed Ed25519 key; returns its public key.
async fn forward_with_checkpoints(pool: &PgPool) -> Vec<u8> {
    let key = Arc::new(
        spendguard_evidence::LocalEd25519Signer::from_signing_key(
            ed25519_dalek::SigningKey::from_bytes(&[21; 32]),
            None,
            "forwarder",
        )
        .unwrap(),
    );
    let public = spendguard_evidence::Signer::public_key(key.as_ref()).to_bytes();
    let report = Forwarder::new(pool.clone(), true, 1_000, ForwarderMetrics::default())
        .with_checkpoint_signer(key, CHECKPOINT_KEY_NAME)
        .unwrap()
        .pass()
        .await
        .unwrap();
    assert!(report.quarantined.is_empty(), "{:?}", report.quarantined);
    public
}

async fn chain_len(pool: &PgPool, tenant: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_chain WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_s3_export_verifies_from_the_bucket_and_holds_only_that_tenant() {
    // Goal: each tenant's export lands in its prefix as exactly the directory format (same bytes),
    // holds exactly that tenant's chain, verifies from the bucket, and a changed or deleted
    // object fails verification. Method: export two tenants to moto S3 and to directories,
    // compare, then tamper with objects through a separate client.
    let mut ledger = TestLedger::start().await.unwrap();
    tenant_activity(&mut ledger, "acme", 4, "a").await;
    tenant_activity(&mut ledger, "globex", 3, "g").await;
    let pool = ledger.store().pool().clone();
    forward(&pool).await;
    let reader = connect_read_only(&runtime_url(&ledger.database_url))
        .await
        .unwrap();
    let (_moto, s3) = moto_bucket().await;

    for tenant in ["acme", "globex"] {
        let prefix = format!("exports/{tenant}/");
        let report = export_to(&reader, &sink(&s3, &prefix), &options(tenant, 4))
            .await
            .unwrap();
        let len = chain_len(&pool, tenant).await;
        let batches = usize::try_from(len).unwrap().div_ceil(4);
        assert_eq!(
            report,
            ExportReport {
                batches,
                events: u64::try_from(len).unwrap(),
                cursor: Some(len),
                complete: true
            }
        );
        let verified = verify_at(&s3, &prefix, &VerifyOptions::default())
            .await
            .unwrap();
        assert_eq!(verified.tenant_id, tenant);
        assert_eq!(verified.span, Some((1, len)));

        // The objects are the directory format, byte for byte, and nothing else.
        let dir = tempfile::tempdir().unwrap();
        export(&reader, dir.path(), &options(tenant, 4))
            .await
            .unwrap();
        let mut expected: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        expected.sort();
        let keys = list(&s3, &prefix).await;
        assert_eq!(
            keys,
            expected
                .iter()
                .map(|name| format!("{prefix}{name}"))
                .collect::<Vec<_>>()
        );
        assert_eq!(keys.len(), batches + 2, "batches, keys.json, manifest.json");
        for name in &expected {
            assert_eq!(
                get(&s3, &format!("{prefix}{name}")).await.unwrap(),
                std::fs::read(dir.path().join(name)).unwrap(),
                "{name}"
            );
        }

        // Exactly the tenant's chain, and no other tenant's event in the line or the signed bytes.
        let stored: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT chain_seq, canonical_event FROM audit_chain WHERE tenant_id = $1 ORDER BY 1",
        )
        .bind(tenant)
        .fetch_all(&pool)
        .await
        .unwrap();
        let exported: Vec<(i64, Vec<u8>)> = lines(&s3, &prefix)
            .await
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

    // Another tenant can neither continue acme's export nor start one over it.
    let acme = "exports/acme/";
    let before = get(&s3, &format!("{acme}manifest.json")).await.unwrap();
    let error = export_to(&reader, &sink(&s3, acme), &resume(options("globex", 4)))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "TENANT_MISMATCH");
    let error = export_to(&reader, &sink(&s3, acme), &options("globex", 4))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "EXPORT_DIR_NOT_EMPTY");
    assert_eq!(
        get(&s3, &format!("{acme}manifest.json")).await.unwrap(),
        before
    );

    // One changed byte in a batch object fails; restored, it verifies again.
    let batch = format!("{acme}batch-000001.jsonl");
    let original = get(&s3, &batch).await.unwrap();
    let mut tampered = original.clone();
    tampered[10] ^= 0x20;
    put(&s3, &batch, &tampered).await;
    assert_eq!(
        verify_at(&s3, acme, &VerifyOptions::default())
            .await
            .unwrap_err(),
        "MANIFEST_MISMATCH"
    );
    put(&s3, &batch, &original).await;
    verify_at(&s3, acme, &VerifyOptions::default())
        .await
        .unwrap();

    // A deleted batch object fails, and so does a deleted manifest.
    delete(&s3, &format!("{acme}batch-000002.jsonl")).await;
    assert_eq!(
        verify_at(&s3, acme, &VerifyOptions::default())
            .await
            .unwrap_err(),
        "EXPORT_UNREADABLE"
    );
    delete(&s3, &format!("{acme}manifest.json")).await;
    assert_eq!(
        verify_at(&s3, acme, &VerifyOptions::default())
            .await
            .unwrap_err(),
        "EXPORT_UNREADABLE"
    );
}

#[tokio::test]
async fn an_interrupted_s3_export_resumes_without_duplicates_or_gaps() {
    // Goal: a bounded (interrupted) run leaves a verifiable shorter export; resuming from the
    // cursor in the bucket continues exactly after it, even past a batch object that a crash
    // left behind unlisted; a leftover with other bytes is never overwritten, and the run stops
    // with the manifest still claiming only what was written whole.
    let mut ledger = TestLedger::start().await.unwrap();
    tenant_activity(&mut ledger, "acme", 4, "a").await;
    let pool = ledger.store().pool().clone();
    forward(&pool).await;
    let reader = connect_read_only(&runtime_url(&ledger.database_url))
        .await
        .unwrap();
    let (_moto, s3) = moto_bucket().await;
    let bounded = ExportOptions {
        max_batches: Some(1),
        ..options("acme", 3)
    };

    let first = export_to(&reader, &sink(&s3, "run/"), &bounded)
        .await
        .unwrap();
    assert_eq!((first.batches, first.events, first.complete), (1, 3, false));
    let verified = verify_at(&s3, "run/", &VerifyOptions::default())
        .await
        .unwrap();
    assert_eq!(verified.span, Some((1, 3)));
    // The crash: batch 2 was written, its manifest update was not. Same chain, same batch size,
    // so the leftover has exactly the bytes the resumed run will write.
    export_to(&reader, &sink(&s3, "reference/"), &options("acme", 3))
        .await
        .unwrap();
    let leftover = get(&s3, "reference/batch-000002.jsonl").await.unwrap();
    put(&s3, "run/batch-000002.jsonl", &leftover).await;
    verify_at(&s3, "run/", &VerifyOptions::default())
        .await
        .unwrap();

    // More evidence arrives meanwhile; the resumed run reads its cursor back from the bucket.
    tenant_activity(&mut ledger, "acme", 3, "b").await;
    forward(&pool).await;
    let len = chain_len(&pool, "acme").await;
    let rest = export_to(&reader, &sink(&s3, "run/"), &resume(options("acme", 3)))
        .await
        .unwrap();
    assert!(rest.complete);
    assert_eq!(rest.cursor, Some(len));
    assert_eq!(i64::try_from(first.events + rest.events).unwrap(), len);
    export_to(&reader, &sink(&s3, "one-shot/"), &options("acme", 3))
        .await
        .unwrap();
    let resumed = lines(&s3, "run/").await;
    assert_eq!(resumed, lines(&s3, "one-shot/").await);
    let seqs: Vec<i64> = resumed
        .iter()
        .map(|l| l["chain_seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=len).collect::<Vec<_>>(), "no duplicate, no gap");
    verify_at(&s3, "run/", &VerifyOptions::default())
        .await
        .unwrap();
    // Nothing new: no batch, same cursor.
    let again = export_to(&reader, &sink(&s3, "run/"), &resume(options("acme", 3)))
        .await
        .unwrap();
    assert_eq!((again.batches, again.cursor), (0, Some(len)));

    // A leftover batch object with other bytes is not overwritten: the run stops, and the
    // manifest still claims only the first batch, which still verifies.
    export_to(&reader, &sink(&s3, "conflict/"), &bounded)
        .await
        .unwrap();
    let manifest_before = get(&s3, "conflict/manifest.json").await.unwrap();
    put(&s3, "conflict/batch-000002.jsonl", b"{\"not\":\"ours\"}\n").await;
    let error = export_to(
        &reader,
        &sink(&s3, "conflict/"),
        &resume(options("acme", 3)),
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), "EXPORT_OBJECT_CONFLICT", "{error}");
    assert_eq!(
        get(&s3, "conflict/batch-000002.jsonl").await.unwrap(),
        b"{\"not\":\"ours\"}\n"
    );
    assert_eq!(
        get(&s3, "conflict/manifest.json").await.unwrap(),
        manifest_before
    );
    let verified = verify_at(&s3, "conflict/", &VerifyOptions::default())
        .await
        .unwrap();
    assert_eq!((verified.batches, verified.span), (1, Some((1, 3))));
}

#[tokio::test]
async fn storage_failures_have_stable_codes_and_claim_nothing() {
    // Goal: a missing bucket, an unreachable endpoint and a manifest changed behind a run's back
    // each stop with their own stable code, and no failed run leaves a manifest claiming more
    // than was written.
    let mut ledger = TestLedger::start().await.unwrap();
    tenant_activity(&mut ledger, "acme", 2, "a").await;
    let pool = ledger.store().pool().clone();
    forward(&pool).await;
    let reader = connect_read_only(&runtime_url(&ledger.database_url))
        .await
        .unwrap();
    let (moto, s3) = moto_bucket().await;

    let missing = Sink::S3(S3Store::from_client(s3.clone(), "no-such-bucket", "x/"));
    let error = export_to(&reader, &missing, &options("acme", 2))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "EXPORT_BUCKET_NOT_FOUND", "{error}");
    let error = verify_s3(
        &S3Store::from_client(s3.clone(), "no-such-bucket", "x/"),
        "s3://no-such-bucket/x/",
        &VerifyOptions::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), "EXPORT_BUCKET_NOT_FOUND", "{error}");

    // Nothing listens on this port.
    let dead = client(&format!(
        "http://127.0.0.1:{}",
        spendguard_testkit::free_port()
    ));
    let unreachable = Sink::S3(S3Store::from_client(dead, BUCKET, "x/"));
    let error = export_to(&reader, &unreachable, &options("acme", 2))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "EXPORT_STORAGE_UNAVAILABLE", "{error}");
    assert!(list(&s3, "").await.is_empty(), "no object was written");

    // Two writers on one prefix: a run that read the manifest does not overwrite a manifest that
    // another writer replaced since.
    export_to(&reader, &sink(&s3, "shared/"), &options("acme", 2))
        .await
        .unwrap();
    let slow = sink(&s3, "shared/");
    let seen = slow.read("manifest.json").await.unwrap().unwrap();
    let mut other: Manifest = serde_json::from_slice(&seen).unwrap();
    other.batches.clear();
    other.cursor = None;
    let other_bytes = serde_json::to_vec(&other).unwrap();
    sink(&s3, "shared/")
        .replace("manifest.json", &other_bytes)
        .await
        .unwrap();
    let error = slow.replace("manifest.json", &seen).await.unwrap_err();
    assert_eq!(error.code(), "EXPORT_CONCURRENT_WRITER", "{error}");
    assert_eq!(get(&s3, "shared/manifest.json").await.unwrap(), other_bytes);
    drop(moto);
}

#[tokio::test]
async fn published_checkpoints_catch_an_export_cut_back_to_an_older_checkpoint() {
    // Goal: the newest signed checkpoint of each tenant is published outside the database; an
    // old (consistently truncated) export that passes with its own checkpoint fails against the
    // published one, a current export passes; publication never moves back, never follows a
    // rewritten chain, and never overwrites a published note.
    let mut ledger = TestLedger::start().await.unwrap();
    tenant_activity(&mut ledger, "acme", 3, "a").await;
    tenant_activity(&mut ledger, "globex", 2, "g").await;
    let pool = ledger.store().pool().clone();
    let public = forward_with_checkpoints(&pool).await;
    let reader = connect_read_only(&runtime_url(&ledger.database_url))
        .await
        .unwrap();
    let (_moto, s3) = moto_bucket().await;
    export_to(&reader, &sink(&s3, "old/"), &options("acme", 100))
        .await
        .unwrap();
    tenant_activity(&mut ledger, "acme", 3, "b").await;
    forward_with_checkpoints(&pool).await;
    let len = chain_len(&pool, "acme").await;

    let published = publish_checkpoints(&reader, &sink(&s3, "pub/"), &[])
        .await
        .unwrap();
    let summary: Vec<(String, u64, bool)> = published
        .iter()
        .map(|p| (p.tenant_id.clone(), p.tree_size, p.advanced))
        .collect();
    let globex_len = u64::try_from(chain_len(&pool, "globex").await).unwrap();
    let acme_len = u64::try_from(len).unwrap();
    // The ledger's own key registration is the system tenant's chain, checkpointed too.
    let system_len = u64::try_from(chain_len(&pool, "spendguard-system").await).unwrap();
    assert_eq!(
        summary,
        [
            ("acme".to_owned(), acme_len, true),
            ("globex".to_owned(), globex_len, true),
            ("spendguard-system".to_owned(), system_len, true)
        ]
    );
    let newest: String = sqlx::query_scalar(
        "SELECT note FROM audit_checkpoints WHERE tenant_id = 'acme' ORDER BY tree_size DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let latest_key = "pub/checkpoints/acme/latest";
    let latest = get(&s3, latest_key).await.unwrap();
    assert_eq!(latest, newest.as_bytes());
    assert_eq!(
        get(&s3, &format!("pub/checkpoints/acme/{len}.note"))
            .await
            .unwrap(),
        latest
    );
    // Publishing again changes nothing.
    let again = publish_checkpoints(&reader, &sink(&s3, "pub/"), &["acme".to_owned()])
        .await
        .unwrap();
    assert!(!again[0].advanced);

    // The old export is a consistent truncation: its own checkpoint vouches for it, the
    // independently published one does not.
    let own = VerifyOptions {
        checkpoint: Some((CHECKPOINT_KEY_NAME.into(), public.clone())),
        ..VerifyOptions::default()
    };
    verify_at(&s3, "old/", &own).await.unwrap();
    let against_published = VerifyOptions {
        checkpoint_note: Some(latest.clone()),
        ..own.clone()
    };
    assert_eq!(
        verify_at(&s3, "old/", &against_published)
            .await
            .unwrap_err(),
        "CHECKPOINT_MISMATCH"
    );
    export_to(&reader, &sink(&s3, "new/"), &options("acme", 100))
        .await
        .unwrap();
    let verified = verify_at(&s3, "new/", &against_published).await.unwrap();
    assert_eq!(verified.checkpoint, Some(acme_len));

    // A database behind the publication (restored backup) and one with another history (a
    // rewritten chain) are both refused, and `latest` stays.
    for (calls, code) in [
        (1, "EXPORT_CHECKPOINT_ROLLBACK"),
        (8, "EXPORT_CHECKPOINT_FORK"),
    ] {
        let mut other = TestLedger::start().await.unwrap();
        tenant_activity(&mut other, "acme", calls, "o").await;
        forward_with_checkpoints(other.store().pool()).await;
        let other_reader = connect_read_only(&runtime_url(&other.database_url))
            .await
            .unwrap();
        let error = publish_checkpoints(&other_reader, &sink(&s3, "pub/"), &["acme".to_owned()])
            .await
            .unwrap_err();
        assert_eq!(error.code(), code, "{error}");
        assert_eq!(get(&s3, latest_key).await.unwrap(), latest);
    }

    // A published note is never replaced by other bytes.
    let globex_note = format!("pub/checkpoints/globex/{globex_len}.note");
    put(&s3, &globex_note, b"not the note").await;
    delete(&s3, "pub/checkpoints/globex/latest").await;
    let error = publish_checkpoints(&reader, &sink(&s3, "pub/"), &["globex".to_owned()])
        .await
        .unwrap_err();
    assert_eq!(error.code(), "EXPORT_OBJECT_CONFLICT", "{error}");
    assert_eq!(get(&s3, &globex_note).await.unwrap(), b"not the note");
    assert_eq!(get(&s3, "pub/checkpoints/globex/latest").await, None);

    // The same publication into a directory: the files, idempotence, an immutable note, and a
    // `latest` that is another tenant's note refused.
    let dir = tempfile::tempdir().unwrap();
    let local = Sink::Directory(dir.path().to_owned());
    publish_checkpoints(&reader, &local, &[]).await.unwrap();
    let note_path = dir.path().join(format!("checkpoints/acme/{len}.note"));
    let latest_path = dir.path().join("checkpoints/acme/latest");
    assert_eq!(std::fs::read(&note_path).unwrap(), newest.as_bytes());
    assert_eq!(std::fs::read(&latest_path).unwrap(), newest.as_bytes());
    let again = publish_checkpoints(&reader, &local, &[]).await.unwrap();
    assert!(again.iter().all(|p| !p.advanced), "{again:?}");
    std::fs::write(&note_path, b"forged").unwrap();
    std::fs::remove_file(&latest_path).unwrap();
    let error = publish_checkpoints(&reader, &local, &["acme".to_owned()])
        .await
        .unwrap_err();
    assert_eq!(error.code(), "EXPORT_OBJECT_CONFLICT", "{error}");
    assert_eq!(std::fs::read(&note_path).unwrap(), b"forged");
    std::fs::write(dir.path().join("checkpoints/globex/latest"), &latest).unwrap();
    let error = publish_checkpoints(&reader, &local, &["globex".to_owned()])
        .await
        .unwrap_err();
    assert_eq!(
        error.code(),
        "EXPORT_PUBLISHED_CHECKPOINT_INVALID",
        "{error}"
    );
}

/// Runs the `spendguard audit` CLI in a child process (the AWS chain reads the process
/// environment, which a test cannot set safely) and returns its `ok …`/`err …` line.
fn run_child(env: &[(&str, &str)], args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("child.out");
    let mut command = std::process::Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "child_runs_the_audit_cli",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir.path())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", dir.path().join("no-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.path().join("no-credentials"),
        )
        .env("SPENDGUARD_AUDIT_CHILD_OUT", &out)
        .env("SPENDGUARD_AUDIT_CHILD_ARGS", args.join("\n"));
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
    std::fs::read_to_string(out).unwrap()
}

#[tokio::test]
#[ignore = "helper: run in a child process by the_cli_exports_publishes_and_verifies_through_s3"]
async fn child_runs_the_audit_cli() {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        audit: spendguard_workers::audit::AuditCommand,
    }
    let out = std::env::var("SPENDGUARD_AUDIT_CHILD_OUT").expect("only run by its parent test");
    let args = std::env::var("SPENDGUARD_AUDIT_CHILD_ARGS").unwrap();
    let argv: Vec<&str> = std::iter::once("spendguard-audit")
        .chain(args.split('\n'))
        .collect();
    let result = match Cli::try_parse_from(argv) {
        Ok(cli) => match cli.audit.run().await {
            Ok(line) => format!("ok {line}"),
            Err(error) => format!("err {error}"),
        },
        Err(error) => format!("err usage {error}"),
    };
    std::fs::write(out, result).unwrap();
}

#[tokio::test]
async fn the_cli_exports_publishes_and_verifies_through_s3() {
    // Goal: the production path: `--out s3://…` and `verify s3://…` with the endpoint from
    // SPENDGUARD_S3_ENDPOINT and credentials and region from the standard AWS environment
    // variables, through to a verified export and a verified published checkpoint; a missing
    // region is refused with its code before anything is written.
    let mut ledger = TestLedger::start().await.unwrap();
    tenant_activity(&mut ledger, "acme", 3, "a").await;
    let pool = ledger.store().pool().clone();
    let public = forward_with_checkpoints(&pool).await;
    let len = chain_len(&pool, "acme").await;
    let (moto, s3) = moto_bucket().await;
    let runtime = runtime_url(&ledger.database_url);
    let endpoint = moto.endpoint();
    let aws = [
        ("SPENDGUARD_S3_ENDPOINT", endpoint.as_str()),
        ("SPENDGUARD_LEDGER_DATABASE_URL", runtime.as_str()),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", REGION),
    ];

    let no_region: Vec<_> = aws
        .iter()
        .copied()
        .filter(|(name, _)| *name != "AWS_REGION")
        .collect();
    let out = run_child(
        &no_region,
        &["export", "--tenant", "acme", "--out", "s3://audit/cli/acme"],
    );
    assert!(
        out.starts_with("err EXPORT_STORAGE_CONFIG_INVALID: "),
        "{out}"
    );
    assert!(list(&s3, "").await.is_empty());

    let out = run_child(
        &aws,
        &[
            "export",
            "--tenant",
            "acme",
            "--out",
            "s3://audit/cli/acme",
            "--batch-size",
            "2",
        ],
    );
    assert!(
        out.starts_with("ok ") && out.contains(&format!("cursor={len} complete=true")),
        "{out}"
    );
    let out = run_child(&aws, &["verify", "s3://audit/cli/acme"]);
    assert!(out.starts_with("ok OK tenant=acme"), "{out}");
    let out = run_child(&aws, &["publish-checkpoints", "--out", "s3://audit/cli"]);
    assert!(out.contains(&format!("acme@{len}")), "{out}");
    let key = BASE64.encode(&public);
    let checkpoint = [
        "--checkpoint-key",
        key.as_str(),
        "--checkpoint-key-name",
        CHECKPOINT_KEY_NAME,
        "--checkpoint-note",
        "s3://audit/cli/checkpoints/acme/latest",
    ];
    let out = run_child(
        &aws,
        &[&["verify", "s3://audit/cli/acme"][..], &checkpoint].concat(),
    );
    assert!(out.contains(&format!("checkpoint={len}")), "{out}");
    let out = run_child(
        &aws,
        &[&["verify", "s3://audit/cli/nothing-here"][..], &checkpoint].concat(),
    );
    assert!(out.starts_with("err EXPORT_UNREADABLE: "), "{out}");
}
