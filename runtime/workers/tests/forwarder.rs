//! Canonical ingest against the real ledger and database: signed events are chained per tenant
//! exactly once, invalid ones are quarantined with their reason and never chained, and
//! overlapping forwarders cannot forward a row twice.
#![allow(clippy::unwrap_used)]

mod support;

use chrono::Utc;
use spendguard_core::audit::{EventDraft, ProducerStamp};
use spendguard_evidence::{LocalEd25519Signer, Signer};
use spendguard_testkit::TestLedger;
use spendguard_testkit::ledger::reserve_request;
use spendguard_workers::chain::verify_chain;
use spendguard_workers::forwarder::{Forwarder, ForwarderMetrics};
use sqlx::PgPool;
use support::tenant_activity;

fn forwarder(pool: &PgPool) -> Forwarder {
    Forwarder::new(pool.clone(), true, 1_000, ForwarderMetrics::default())
}

async fn count(pool: &PgPool, sql: &'static str, tenant: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(tenant)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn signed_events_are_chained_per_tenant_exactly_once() {
    let mut ledger = TestLedger::start().await.unwrap();
    tenant_activity(&mut ledger, "acme", 3, "k").await;
    tenant_activity(&mut ledger, "globex", 2, "k").await;
    let pool = ledger.store().pool().clone();
    let f = forwarder(&pool);
    let first = f.pass().await.unwrap();
    assert!(first.quarantined.is_empty(), "{:?}", first.quarantined);
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(i64::try_from(first.accepted).unwrap(), outbox);
    for tenant in ["acme", "globex"] {
        let events = count(
            &pool,
            "SELECT count(*) FROM audit_outbox WHERE tenant_id = $1",
            tenant,
        )
        .await;
        assert_eq!(verify_chain(&pool, tenant).await.unwrap(), events);
        let foreign = count(
            &pool,
            "SELECT count(*) FROM audit_chain c JOIN audit_outbox o USING (producer_instance_id, producer_sequence)
              WHERE c.tenant_id = $1 AND o.tenant_id <> c.tenant_id",
            tenant,
        )
        .await;
        assert_eq!(foreign, 0, "a chain holds only its tenant's events");
    }
    assert_eq!(
        f.pass().await.unwrap().accepted,
        0,
        "nothing is forwarded twice"
    );

    // New activity extends the chain from its head.
    tenant_activity(&mut ledger, "acme-2", 1, "k").await;
    let fencing = ledger.tenant_with_lease("acme").await.unwrap();
    ledger
        .client
        .reserve_set(reserve_request("acme", "later", &["b"], 5, &fencing))
        .await
        .unwrap();
    assert!(f.pass().await.unwrap().accepted >= 2);
    let events = count(
        &pool,
        "SELECT count(*) FROM audit_outbox WHERE tenant_id = $1",
        "acme",
    )
    .await;
    assert_eq!(verify_chain(&pool, "acme").await.unwrap(), events);

    // The chain cannot be edited in place.
    let edit = sqlx::query("UPDATE audit_chain SET event_type = 'x' WHERE tenant_id = 'acme'")
        .execute(&pool)
        .await;
    assert!(edit.is_err());
}

/// Inserts an outbox row for producer `forger` as an attacker with database access would.
async fn forge<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    sequence: u64,
    bytes: &[u8],
    sha256: &[u8],
    signer: Option<&LocalEd25519Signer>,
    signed_bytes: &[u8],
) {
    let signed = match signer {
        Some(s) => Some(s.sign(signed_bytes).await.unwrap()),
        None => None,
    };
    insert_row(executor, sequence, bytes, sha256, signed).await;
}

/// Inserts an outbox row for producer `forger` with the signature given.
async fn insert_row<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    sequence: u64,
    bytes: &[u8],
    sha256: &[u8],
    signed: Option<spendguard_evidence::Signed>,
) {
    let (key, algorithm, at, signature, inclusion) = match signed {
        Some(signed) => (
            Some(signed.key_id),
            Some(signed.algorithm.as_str()),
            Some(signed.signed_at),
            Some(signed.signature),
            signed.inclusion.map(|i| i.to_bytes()),
        ),
        None => (None, None, None, None, None),
    };
    sqlx::query(
        "INSERT INTO audit_outbox (producer_instance_id, producer_sequence, tenant_id, event_type, occurred_at,
                                   canonical_event, event_sha256, signing_key_id, signing_algorithm, signed_at,
                                   signature, signature_inclusion)
         VALUES ('forger', $1, 'acme', 'reservation.committed', now(), $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(i64::try_from(sequence).unwrap())
    .bind(bytes)
    .bind(sha256)
    .bind(key)
    .bind(algorithm)
    .bind(at)
    .bind(signature)
    .bind(inclusion)
    .execute(executor)
    .await
    .unwrap();
}

fn event(sequence: u64, amount: &str) -> (Vec<u8>, Vec<u8>) {
    event_of("forger", sequence, amount)
}

/// Canonical bytes and hash of an event stamped by `producer` at `sequence`.
fn event_of(producer: &str, sequence: u64, amount: &str) -> (Vec<u8>, Vec<u8>) {
    let draft = EventDraft {
        tenant_id: "acme".into(),
        event_type: "reservation.committed",
        data: serde_json::json!({"committed_nano_usd": amount}),
    };
    let stamped = draft
        .stamp(&ProducerStamp {
            producer_instance_id: producer.into(),
            producer_sequence: sequence,
            occurred_at: Utc::now(),
        })
        .unwrap();
    (stamped.bytes, stamped.sha256.to_vec())
}

/// Registers `key` in the evidence key registry, valid from an hour ago.
async fn register<'e>(executor: impl sqlx::PgExecutor<'e>, key: &LocalEd25519Signer) {
    let record = key
        .key_record(Utc::now() - chrono::Duration::hours(1), None)
        .unwrap();
    sqlx::query(
        "INSERT INTO signing_keys (key_id, algorithm, public_key, valid_from) VALUES ($1, 'ed25519', $2, $3)",
    )
    .bind(&record.key_id)
    .bind(record.public_key.to_bytes())
    .bind(record.valid_from)
    .execute(executor)
    .await
    .unwrap();
}

fn signer(seed: u8) -> LocalEd25519Signer {
    let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    LocalEd25519Signer::from_signing_key(key, None, "forger").unwrap()
}

#[tokio::test]
async fn invalid_events_are_quarantined_with_their_reason_and_never_chained() {
    let mut ledger = TestLedger::start().await.unwrap();
    tenant_activity(&mut ledger, "acme", 1, "k").await;
    let pool = ledger.store().pool().clone();
    let registered = signer(7);
    register(&pool, &registered).await;
    let unknown = signer(9);
    sqlx::query(
        "INSERT INTO audit_producers (producer_instance_id, claim_token, next_sequence)
         VALUES ('forger', gen_random_uuid(), 12)",
    )
    .execute(&pool)
    .await
    .unwrap();

    let (b1, h1) = event(1, "1");
    forge(&pool, 1, &b1, &h1, None, &b1).await; // unsigned
    let (b2, h2) = event(2, "2");
    forge(&pool, 2, &b2, &h2, Some(&unknown), &b2).await; // key not in the registry
    let (b3, h3) = event(3, "3");
    let (tampered, tampered_hash) = event(3, "3000000");
    forge(&pool, 3, &tampered, &tampered_hash, Some(&registered), &b3).await; // altered after signing
    let _ = h3;
    let (b4, _) = event(4, "4");
    forge(&pool, 4, &b4, &[0u8; 32], Some(&registered), &b4).await; // hash does not match bytes
    // Signed and hashed as they are, but naming another producer, or another sequence, than
    // the row they sit in: the signature envelope takes the producer from the row, so only
    // this comparison keeps one producer's event from passing as another's.
    let (b5, h5) = event_of("ledger-0", 5, "5");
    forge(&pool, 5, &b5, &h5, Some(&registered), &b5).await;
    let (b6, h6) = event(60, "6");
    forge(&pool, 6, &b6, &h6, Some(&registered), &b6).await;
    let (b7, h7) = event(7, "7");
    forge(&pool, 7, &b7, &h7, Some(&registered), &b7).await; // valid
    // Three events under one batch signature: the first as signed, the second with a path too
    // long for its place, the third with the second's proof (a valid proof of another event).
    let batch: Vec<(Vec<u8>, Vec<u8>)> = (8..11).map(|s| event(s, "8")).collect();
    let refs: Vec<&[u8]> = batch.iter().map(|(b, _)| b.as_slice()).collect();
    let signed = registered.sign_batch(&refs).await.unwrap();
    insert_row(&pool, 8, &batch[0].0, &batch[0].1, Some(signed[0].clone())).await;
    let mut cut = signed[1].clone();
    cut.inclusion.as_mut().unwrap().path.clear();
    cut.inclusion.as_mut().unwrap().path.push([0; 32]);
    cut.inclusion.as_mut().unwrap().path.push([0; 32]);
    cut.inclusion.as_mut().unwrap().path.push([0; 32]);
    insert_row(&pool, 9, &batch[1].0, &batch[1].1, Some(cut)).await;
    let borrowed = spendguard_evidence::Signed {
        inclusion: signed[1].inclusion.clone(),
        ..signed[2].clone()
    };
    insert_row(&pool, 10, &batch[2].0, &batch[2].1, Some(borrowed)).await;
    // Signed by a registered key, an hour ahead of the database clock.
    let (b11, h11) = event(11, "11");
    let ahead = registered
        .sign_at(
            &b11,
            spendguard_evidence::envelope::now_ms() + chrono::Duration::hours(1),
        )
        .await
        .unwrap();
    insert_row(&pool, 11, &b11, &h11, Some(ahead)).await;

    let report = forwarder(&pool).pass().await.unwrap();
    let reasons: Vec<&str> = report.quarantined.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "UNSIGNED",
            "KEY_UNKNOWN",
            "SIGNATURE_INVALID",
            "SCHEMA_INVALID",
            "SCHEMA_INVALID",
            "SCHEMA_INVALID",
            "SIGNATURE_MALFORMED",
            "SIGNATURE_INVALID",
            "SIGNED_AT_IN_FUTURE"
        ]
    );
    let chained: Vec<i64> = sqlx::query_scalar(
        "SELECT producer_sequence FROM audit_chain WHERE producer_instance_id = 'forger'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        chained,
        [7, 8],
        "only the valid forged-producer events are chained"
    );
    let stored: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT producer_sequence, reason_code, detail FROM audit_quarantine ORDER BY producer_sequence",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(stored.len(), 9);
    assert!(
        stored[6].2.contains("inclusion") && stored[7].0 == 10,
        "{stored:?}"
    );
    assert_eq!(
        (stored[2].0, stored[2].1.as_str()),
        (3, "SIGNATURE_INVALID")
    );
    assert!(stored[4].2.contains("producer_instance_id"), "{stored:?}");
    assert!(stored[5].2.contains("producer_sequence"), "{stored:?}");
    let events = count(
        &pool,
        "SELECT count(*) FROM audit_outbox WHERE tenant_id = $1",
        "acme",
    )
    .await;
    assert_eq!(verify_chain(&pool, "acme").await.unwrap(), events - 9);
    // Quarantine is evidence too: append-only, and its rows never move into the chain later.
    let edit = sqlx::query("UPDATE audit_quarantine SET reason_code = 'OK'")
        .execute(&pool)
        .await;
    assert!(edit.is_err());
    assert_eq!(forwarder(&pool).pass().await.unwrap(), Default::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_registered_during_a_pass_is_read_with_the_rows_it_signed() {
    // Goal: a pass reads the key registry and the outbox from one snapshot. A key is registered
    // before anything it signs, so the rows a pass sees are signed by keys it sees. Before, each
    // statement had its own snapshot: a pass that loaded the registry before a key was
    // registered, and read the key's first rows after, quarantined them as KEY_UNKNOWN, for
    // good. Method: hold a lock the pass waits on after it loaded the registry; meanwhile
    // register a key and commit a row it signed; then let the pass go on.
    let mut ledger = TestLedger::start().await.unwrap();
    tenant_activity(&mut ledger, "acme", 1, "k").await;
    let pool = ledger.store().pool().clone();
    sqlx::query(
        "INSERT INTO audit_producers (producer_instance_id, claim_token, next_sequence)
         VALUES ('forger', gen_random_uuid(), 2)",
    )
    .execute(&pool)
    .await
    .unwrap();
    forwarder(&pool).pass().await.unwrap();

    let mut holder = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE audit_producers IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let pass = tokio::spawn({
        let pool = pool.clone();
        async move { forwarder(&pool).pass().await }
    });
    while sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
    )
    .fetch_one(&pool)
    .await
    .unwrap()
        == 0
    {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let key = signer(11);
    register(&mut *holder, &key).await;
    let (bytes, sha256) = event(1, "1");
    forge(&mut *holder, 1, &bytes, &sha256, Some(&key), &bytes).await;
    holder.commit().await.unwrap();

    let first = pass.await.unwrap().unwrap();
    assert!(first.quarantined.is_empty(), "{:?}", first.quarantined);
    let second = forwarder(&pool).pass().await.unwrap();
    assert!(second.quarantined.is_empty(), "{:?}", second.quarantined);
    let chained: Vec<i64> = sqlx::query_scalar(
        "SELECT producer_sequence FROM audit_chain WHERE producer_instance_id = 'forger'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(chained, [1], "chained, once the pass saw both");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_forwarders_never_forward_a_row_twice() {
    let mut ledger = TestLedger::start().await.unwrap();
    let pool = ledger.store().pool().clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let racers: Vec<_> = (0..2)
        .map(|_| {
            let (pool, stop) = (pool.clone(), stop.clone());
            tokio::spawn(async move {
                let f = forwarder(&pool);
                let mut conflicts = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Err(e) = f.pass().await {
                        // An overlap is reported as one, not as an unreachable database.
                        assert_eq!(e.code(), "FORWARDER_CURSOR_CONFLICT", "{e}");
                        conflicts += 1;
                    }
                }
                conflicts
            })
        })
        .collect();
    tenant_activity(&mut ledger, "acme", 20, "k").await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for racer in racers {
        racer.await.unwrap();
    }
    forwarder(&pool).pass().await.unwrap();
    let events = count(
        &pool,
        "SELECT count(*) FROM audit_outbox WHERE tenant_id = $1",
        "acme",
    )
    .await;
    assert_eq!(verify_chain(&pool, "acme").await.unwrap(), events);
    let chained: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_chain")
        .fetch_one(&pool)
        .await
        .unwrap();
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(chained, outbox);
}

#[tokio::test]
async fn signed_checkpoints_are_written_per_tenant_and_verify() {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;
    use ed25519_dalek::Verifier as _;
    use sha2::{Digest, Sha256};
    use spendguard_workers::checkpoint;

    let mut ledger = TestLedger::start().await.unwrap();
    tenant_activity(&mut ledger, "acme", 2, "k").await;
    tenant_activity(&mut ledger, "globex", 1, "k").await;
    let pool = ledger.store().pool().clone();
    let key = std::sync::Arc::new(signer(11));
    let public = key.public_key().to_bytes();
    let f = forwarder(&pool)
        .with_checkpoint_signer(key.clone(), "sg-test")
        .unwrap();
    assert!(f.pass().await.unwrap().accepted > 0);

    let latest = |tenant: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (i64, Vec<u8>, String, String)>(
                "SELECT tree_size, root_hash, note, key_name FROM audit_checkpoints
                  WHERE tenant_id = $1 ORDER BY tree_size DESC LIMIT 1",
            )
            .bind(tenant)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let mut acme_note = String::new();
    for tenant in ["acme", "globex"] {
        let length = verify_chain(&pool, tenant).await.unwrap();
        let (size, root, note, key_name) = latest(tenant).await;
        assert_eq!((size, key_name.as_str()), (length, "sg-test"));
        let head: Vec<u8> = sqlx::query_scalar(
            "SELECT chain_hash FROM audit_chain WHERE tenant_id = $1 AND chain_seq = $2",
        )
        .bind(tenant)
        .bind(length)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(root, head);
        let cp = checkpoint::verify(&note, "sg-test", &public).unwrap();
        assert_eq!(cp.origin, format!("spendguard.io/audit/{tenant}"));
        assert_eq!(cp.size, u64::try_from(length).unwrap());
        assert_eq!(cp.root.to_vec(), head);

        // The exact C2SP text, checked independently of the crate's parser.
        let lines: Vec<&str> = note.split_inclusive('\n').collect();
        assert_eq!(lines.len(), 5, "{note:?}");
        assert_eq!(lines[0], format!("spendguard.io/audit/{tenant}\n"));
        assert_eq!(lines[1], format!("{length}\n"));
        assert_eq!(lines[2], format!("{}\n", B64.encode(&head)));
        assert_eq!(lines[3], "\n");
        let sig_line = lines[4]
            .strip_prefix("\u{2014} sg-test ")
            .and_then(|l| l.strip_suffix('\n'))
            .unwrap();
        let blob = B64.decode(sig_line).unwrap();
        assert_eq!(blob.len(), 4 + 64);
        let mut h = Sha256::new();
        h.update(b"sg-test\n\x01");
        h.update(&public);
        assert_eq!(blob[..4], h.finalize()[..4]);
        let body = lines[..3].concat();
        let vk =
            ed25519_dalek::VerifyingKey::from_bytes(&public.clone().try_into().unwrap()).unwrap();
        vk.verify(
            body.as_bytes(),
            &ed25519_dalek::Signature::from_slice(&blob[4..]).unwrap(),
        )
        .unwrap();
        if tenant == "acme" {
            acme_note = note;
        }
    }

    // Tampering with the size, the root or a signature byte fails verification.
    let (size, root, _, _) = latest("acme").await;
    let cut = acme_note.replacen(&format!("\n{size}\n"), &format!("\n{}\n", size - 1), 1);
    assert!(checkpoint::verify(&cut, "sg-test", &public).is_err());
    let mut other_root = root.clone();
    other_root[0] ^= 1;
    let rerooted = acme_note.replacen(&B64.encode(&root), &B64.encode(&other_root), 1);
    assert_ne!(rerooted, acme_note);
    assert!(checkpoint::verify(&rerooted, "sg-test", &public).is_err());
    let (body, sig) = acme_note.split_once("\u{2014} sg-test ").unwrap();
    let mut blob = B64.decode(sig.trim_end()).unwrap();
    blob[20] ^= 1;
    let resigned = format!("{body}\u{2014} sg-test {}\n", B64.encode(&blob));
    assert!(matches!(
        checkpoint::verify(&resigned, "sg-test", &public),
        Err(checkpoint::CheckpointError::BadSignature(_))
    ));
    let wrong_key = signer(12).public_key().to_bytes();
    assert!(checkpoint::verify(&acme_note, "sg-test", &wrong_key).is_err());

    // An idle pass writes nothing; new activity checkpoints only the tenant that grew.
    let total = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_checkpoints")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let before = total(pool.clone()).await;
    assert_eq!(f.pass().await.unwrap().accepted, 0);
    assert_eq!(total(pool.clone()).await, before);
    let fencing = ledger.tenant_with_lease("acme").await.unwrap();
    ledger
        .client
        .reserve_set(reserve_request("acme", "later", &["b"], 5, &fencing))
        .await
        .unwrap();
    assert!(f.pass().await.unwrap().accepted >= 1);
    assert_eq!(total(pool.clone()).await, before + 1);
    let (new_size, _, note, _) = latest("acme").await;
    assert!(new_size > size);
    assert_eq!(
        checkpoint::verify(&note, "sg-test", &public).unwrap().size,
        u64::try_from(verify_chain(&pool, "acme").await.unwrap()).unwrap()
    );

    // Checkpoints are append-only.
    let edit = sqlx::query("UPDATE audit_checkpoints SET note = 'x' WHERE tenant_id = 'acme'")
        .execute(&pool)
        .await;
    assert!(edit.is_err());
}

#[tokio::test]
async fn the_ledger_counts_the_events_the_forwarder_has_not_moved_yet() {
    // Goal: a forwarder that is down or behind shows as a backlog the ledger reports
    // (`spendguard_ledger_evidence_unforwarded`), which empties as the forwarder catches up.
    let mut ledger = TestLedger::start().await.unwrap();
    tenant_activity(&mut ledger, "acme", 3, "k").await;
    let pool = ledger.store().pool().clone();
    let outbox = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_outbox")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let before = outbox().await;
    assert!(before > 0);
    assert_eq!(ledger.store().evidence_unforwarded().await.unwrap(), before);
    forwarder(&pool).pass().await.unwrap();
    assert_eq!(ledger.store().evidence_unforwarded().await.unwrap(), 0);
    tenant_activity(&mut ledger, "globex", 1, "k").await;
    assert_eq!(
        ledger.store().evidence_unforwarded().await.unwrap(),
        outbox().await - before
    );
    assert!(
        ledger
            .metrics_text()
            .contains("spendguard_ledger_evidence_unforwarded"),
        "the gauge is registered"
    );
}

#[tokio::test]
async fn a_ledger_bounding_evidence_lag_refuses_new_spend_until_the_forwarder_catches_up() {
    // Goal: S22's configured durability policy. With a bound of 2 s on how long evidence may wait
    // outside the canonical chain, a forwarder that is down makes the ledger refuse new
    // reservations and approvals (EVIDENCE_BACKLOG, nothing written) while settlements and
    // retries of what exists already (answered as replays) go on, and a retry it cannot tell
    // from new spend is refused;
    // once the forwarder has moved the backlog, reservations are admitted again. No event is
    // dropped either way. Method: a ledger with the bound, activity, no forwarder until the
    // refusal shows; then a commit, an approval, the gauge; then one forwarder pass.
    use spendguard_proto::ledger::v1 as pb;
    let tuning = spendguard_testkit::ledger::LedgerTuning {
        max_evidence_lag_seconds: 2,
        ..Default::default()
    };
    let mut ledger = TestLedger::start_with(&tuning).await.unwrap();
    let fencing = ledger.tenant_with_lease("acme").await.unwrap();
    ledger.budget("acme", "b", 1_000_000).await.unwrap();
    let open = ledger
        .client
        .reserve_set(reserve_request("acme", "before", &["b"], 100, &fencing))
        .await
        .expect("admitted while the backlog is young")
        .into_inner();
    let Some(pb::reserve_set_response::Outcome::Reserved(open)) = open.outcome else {
        panic!("denied")
    };
    let (mut refused, mut refused_key) = (None, None);
    for i in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let key = format!("during-{i}");
        match ledger
            .client
            .reserve_set(reserve_request("acme", &key, &["b"], 100, &fencing))
            .await
        {
            Ok(_) => {}
            Err(status) => {
                refused = Some(status);
                refused_key = Some(key);
                break;
            }
        }
    }
    let refused = refused.expect("refused once the oldest event is older than 2 s");
    assert_eq!(
        spendguard_proto::ledger::error_code(&refused),
        Some(pb::ErrorCode::EvidenceBacklog),
        "{refused:?}"
    );
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    let pool = ledger.store().pool().clone();
    let outbox_before: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    // Approvals are new exposure too.
    let approval = ledger
        .client
        .create_approval(pb::CreateApprovalRequest {
            tenant_id: "acme".into(),
            idempotency_key: "approve-me".into(),
            budget_ids: vec!["b".into()],
            budget_id: "b".into(),
            amount_nano_usd: 100,
            fencing: Some(fencing.clone()),
            ttl_ms: 60_000,
            reason_code: "SOFT_CAP_REACHED".into(),
            pricing: Some(spendguard_testkit::ledger::test_pricing()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        spendguard_proto::ledger::error_code(&approval),
        Some(pb::ErrorCode::EvidenceBacklog)
    );
    // A retry of a reservation made before the backlog is its replay: answered, nothing written.
    // The request that was refused is still refused: it would be new spend.
    let retried = ledger
        .client
        .reserve_set(reserve_request("acme", "before", &["b"], 100, &fencing))
        .await
        .expect("a retry of an existing reservation is answered")
        .into_inner();
    assert!(retried.replayed);
    let Some(pb::reserve_set_response::Outcome::Reserved(replayed)) = retried.outcome else {
        panic!("denied")
    };
    assert_eq!(replayed.reservation_id, open.reservation_id);
    let refused_key = refused_key.expect("a key was refused");
    let again = ledger
        .client
        .reserve_set(reserve_request("acme", &refused_key, &["b"], 100, &fencing))
        .await
        .unwrap_err();
    assert_eq!(
        spendguard_proto::ledger::error_code(&again),
        Some(pb::ErrorCode::EvidenceBacklog)
    );
    // A retry the ledger cannot look up (the reservations are out of reach) is refused as new
    // spend, never answered as an unavailable ledger, which a fail-open contract lets through.
    sqlx::query("ALTER TABLE reservations RENAME TO reservations_out_of_reach")
        .execute(&ledger.owner)
        .await
        .unwrap();
    let unknown = ledger
        .client
        .reserve_set(reserve_request("acme", "before", &["b"], 100, &fencing))
        .await
        .unwrap_err();
    sqlx::query("ALTER TABLE reservations_out_of_reach RENAME TO reservations")
        .execute(&ledger.owner)
        .await
        .unwrap();
    assert_eq!(
        spendguard_proto::ledger::error_code(&unknown),
        Some(pb::ErrorCode::EvidenceBacklog),
        "{unknown:?}"
    );
    let after_refusals: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(after_refusals, outbox_before, "a refusal writes nothing");
    // Settling what is open ends exposure: still accepted.
    ledger
        .client
        .commit(pb::CommitRequest {
            tenant_id: "acme".into(),
            reservation_id: open.reservation_id,
            actual_nano_usd: 60,
            fencing: Some(fencing.clone()),
            deferrable: false,
        })
        .await
        .expect("commits go on");
    assert!(
        ledger.metrics_text().lines().any(|l| l
            .starts_with("spendguard_ledger_evidence_oldest_unforwarded_age_seconds ")
            && !l.ends_with(" 0")),
        "{}",
        ledger.metrics_text()
    );

    forwarder(&pool).pass().await.unwrap();
    let mut admitted = false;
    for i in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let key = format!("after-{i}");
        if ledger
            .client
            .reserve_set(reserve_request("acme", &key, &["b"], 100, &fencing))
            .await
            .is_ok()
        {
            admitted = true;
            break;
        }
    }
    assert!(admitted, "admitted again once the backlog is forwarded");
    // Everything written before the pass, the refusals' time included, is in the chain.
    assert!(verify_chain(&pool, "acme").await.unwrap() >= 3);
}
