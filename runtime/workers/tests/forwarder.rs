//! Canonical ingest against the real ledger and database: signed events are chained per tenant
//! exactly once, invalid ones are quarantined with their reason and never chained, and
//! overlapping forwarders cannot forward a row twice.
#![allow(clippy::unwrap_used)]

use chrono::Utc;
use spendguard_core::audit::{EventDraft, ProducerStamp};
use spendguard_evidence::{LocalEd25519Signer, Signer};
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::TestLedger;
use spendguard_testkit::ledger::reserve_request;
use spendguard_workers::chain::verify_chain;
use spendguard_workers::forwarder::{Forwarder, ForwarderMetrics};
use sqlx::PgPool;

fn forwarder(pool: &PgPool) -> Forwarder {
    Forwarder::new(pool.clone(), true, 1_000, ForwarderMetrics::default())
}

async fn tenant_activity(ledger: &mut TestLedger, tenant: &str, calls: usize) {
    let fencing = ledger.tenant_with_lease(tenant).await.unwrap();
    ledger.budget(tenant, "b", 1_000_000).await.unwrap();
    for i in 0..calls {
        let r = ledger
            .client
            .reserve_set(reserve_request(
                tenant,
                &format!("k{i}"),
                &["b"],
                100,
                &fencing,
            ))
            .await
            .unwrap()
            .into_inner();
        let Some(pb::reserve_set_response::Outcome::Reserved(r)) = r.outcome else {
            panic!("denied")
        };
        ledger
            .client
            .commit(pb::CommitRequest {
                tenant_id: tenant.into(),
                reservation_id: r.reservation_id,
                actual_nano_usd: 60,
                fencing: Some(fencing.clone()),
            })
            .await
            .unwrap();
    }
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
    tenant_activity(&mut ledger, "acme", 3).await;
    tenant_activity(&mut ledger, "globex", 2).await;
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
    tenant_activity(&mut ledger, "acme-2", 1).await;
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
#[allow(clippy::too_many_arguments)]
async fn forge(
    pool: &PgPool,
    sequence: u64,
    bytes: &[u8],
    sha256: &[u8],
    signer: Option<&LocalEd25519Signer>,
    signed_bytes: &[u8],
) {
    let (key, algorithm, at, signature) = match signer {
        Some(s) => {
            let signed = s.sign(signed_bytes).await.unwrap();
            (
                Some(signed.key_id),
                Some(signed.algorithm.as_str()),
                Some(signed.signed_at),
                Some(signed.signature),
            )
        }
        None => (None, None, None, None),
    };
    sqlx::query(
        "INSERT INTO audit_outbox (producer_instance_id, producer_sequence, tenant_id, event_type, occurred_at,
                                   canonical_event, event_sha256, signing_key_id, signing_algorithm, signed_at, signature)
         VALUES ('forger', $1, 'acme', 'reservation.committed', now(), $2, $3, $4, $5, $6, $7)",
    )
    .bind(i64::try_from(sequence).unwrap())
    .bind(bytes)
    .bind(sha256)
    .bind(key)
    .bind(algorithm)
    .bind(at)
    .bind(signature)
    .execute(pool)
    .await
    .unwrap();
}

fn event(sequence: u64, amount: &str) -> (Vec<u8>, Vec<u8>) {
    let draft = EventDraft {
        tenant_id: "acme".into(),
        event_type: "reservation.committed",
        data: serde_json::json!({"committed_nano_usd": amount}),
    };
    let stamped = draft
        .stamp(&ProducerStamp {
            producer_instance_id: "forger".into(),
            producer_sequence: sequence,
            occurred_at: Utc::now(),
        })
        .unwrap();
    (stamped.bytes, stamped.sha256.to_vec())
}

fn signer(seed: u8) -> LocalEd25519Signer {
    let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    LocalEd25519Signer::from_signing_key(key, None, "forger").unwrap()
}

#[tokio::test]
async fn invalid_events_are_quarantined_with_their_reason_and_never_chained() {
    let mut ledger = TestLedger::start().await.unwrap();
    tenant_activity(&mut ledger, "acme", 1).await;
    let pool = ledger.store().pool().clone();
    let registered = signer(7);
    let record = registered
        .key_record(Utc::now() - chrono::Duration::hours(1), None)
        .unwrap();
    sqlx::query(
        "INSERT INTO signing_keys (key_id, algorithm, public_key, valid_from) VALUES ($1, 'ed25519', $2, $3)",
    )
    .bind(&record.key_id)
    .bind(record.public_key.to_bytes())
    .bind(record.valid_from)
    .execute(&pool)
    .await
    .unwrap();
    let unknown = signer(9);
    sqlx::query(
        "INSERT INTO audit_producers (producer_instance_id, claim_token, next_sequence)
         VALUES ('forger', gen_random_uuid(), 6)",
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
    let (b5, h5) = event(5, "5");
    forge(&pool, 5, &b5, &h5, Some(&registered), &b5).await; // valid

    let report = forwarder(&pool).pass().await.unwrap();
    let reasons: Vec<&str> = report.quarantined.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "UNSIGNED",
            "KEY_UNKNOWN",
            "SIGNATURE_INVALID",
            "SCHEMA_INVALID"
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
        [5],
        "only the valid forged-producer event is chained"
    );
    let stored: Vec<(i64, String)> = sqlx::query_as(
        "SELECT producer_sequence, reason_code FROM audit_quarantine ORDER BY producer_sequence",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(stored.len(), 4);
    assert_eq!(stored[2], (3, "SIGNATURE_INVALID".to_owned()));
    let events = count(
        &pool,
        "SELECT count(*) FROM audit_outbox WHERE tenant_id = $1",
        "acme",
    )
    .await;
    assert_eq!(verify_chain(&pool, "acme").await.unwrap(), events - 4);
    // Quarantine is evidence too: append-only, and its rows never move into the chain later.
    let edit = sqlx::query("UPDATE audit_quarantine SET reason_code = 'OK'")
        .execute(&pool)
        .await;
    assert!(edit.is_err());
    assert_eq!(forwarder(&pool).pass().await.unwrap(), Default::default());
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
                    if f.pass().await.is_err() {
                        conflicts += 1;
                    }
                }
                conflicts
            })
        })
        .collect();
    tenant_activity(&mut ledger, "acme", 20).await;
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
