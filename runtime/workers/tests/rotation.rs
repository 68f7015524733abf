//! The S7 rotation drill on the live system: a ledger replica with a new key joins (additive),
//! both sign during the overlap, the old replica stops (cutover), and the old key's window closes
//! and it is revoked after the overlap. No call fails at any point; canonical ingest chains every
//! event with nothing quarantined, and the export verifies offline with both keys.
#![allow(clippy::unwrap_used)]

use chrono::{DateTime, Duration, Utc};
use spendguard_proto::ledger::v1 as pb;
use spendguard_proto::ledger::v1::ledger_client::LedgerClient;
use spendguard_testkit::TestLedger;
use spendguard_testkit::ledger::reserve_request;
use spendguard_testkit::postgres::runtime_url;
use spendguard_workers::audit::export::{ExportOptions, connect_read_only, export};
use spendguard_workers::audit::format::Range;
use spendguard_workers::audit::verify::{VerifyOptions, verify};
use spendguard_workers::chain::verify_chain;
use spendguard_workers::forwarder::{Forwarder, ForwarderMetrics};
use tonic::transport::Channel;

const T: &str = "acme";

/// `n` reserve+commit pairs through `client`; every one must succeed.
async fn pairs(mut client: LedgerClient<Channel>, fencing: pb::FencingToken, tag: &str, n: usize) {
    for i in 0..n {
        let reserved = client
            .reserve_set(reserve_request(
                T,
                &format!("{tag}-{i}"),
                &["b"],
                100,
                &fencing,
            ))
            .await
            .unwrap_or_else(|e| panic!("{tag}-{i}: reserve failed during the drill: {e}"))
            .into_inner();
        let Some(pb::reserve_set_response::Outcome::Reserved(r)) = reserved.outcome else {
            panic!("{tag}-{i}: denied")
        };
        client
            .commit(pb::CommitRequest {
                tenant_id: T.into(),
                reservation_id: r.reservation_id,
                actual_nano_usd: 60,
                fencing: Some(fencing.clone()),
                deferrable: false,
            })
            .await
            .unwrap_or_else(|e| panic!("{tag}-{i}: commit failed during the drill: {e}"));
    }
}

#[tokio::test]
async fn a_key_rotation_drill_loses_no_call_and_no_event() {
    let mut old = TestLedger::start().await.unwrap();
    let fencing = old.tenant_with_lease(T).await.unwrap();
    old.budget(T, "b", 1_000_000).await.unwrap();
    let pool = old.store().pool().clone();
    pairs(old.client.clone(), fencing.clone(), "before", 10).await;
    let (old_key, algorithm, public_key, valid_from): (String, String, Vec<u8>, DateTime<Utc>) =
        sqlx::query_as("SELECT key_id, algorithm, public_key, valid_from FROM signing_keys")
            .fetch_one(&pool)
            .await
            .unwrap();

    // 1. Additive: a replica with a new key joins; it publishes its key before it signs.
    let mut new = TestLedger::start_on(&old.database_url, "ledger-1")
        .await
        .unwrap();
    let keys: Vec<String> = sqlx::query_scalar("SELECT key_id FROM signing_keys")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");

    // 2. Overlap: both replicas take traffic at once, each signing with its own key.
    tokio::join!(
        pairs(old.client.clone(), fencing.clone(), "overlap-old", 10),
        pairs(new.client.clone(), fencing.clone(), "overlap-new", 10),
    );

    // 3. Cutover: the old replica drains and stops; traffic continues on the new one.
    old.stop().await;
    pairs(new.client.clone(), fencing.clone(), "after", 10).await;

    // 4. The old key's window closes after its last signature, and it is revoked after the
    //    overlap, as the SigningKey controller does with RegisterSigningKey.
    let last_old: DateTime<Utc> =
        sqlx::query_scalar("SELECT max(signed_at) FROM audit_outbox WHERE signing_key_id = $1")
            .bind(&old_key)
            .fetch_one(&pool)
            .await
            .unwrap();
    let closed = last_old + Duration::milliseconds(1);
    let changed = new
        .client
        .register_signing_key(pb::RegisterSigningKeyRequest {
            key_id: old_key.clone(),
            algorithm,
            public_key,
            valid_from_unix_ms: valid_from.timestamp_millis(),
            valid_until_unix_ms: closed.timestamp_millis(),
            revoked_at_unix_ms: closed.timestamp_millis() + 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(changed.changed);
    pairs(new.client.clone(), fencing.clone(), "revoked", 5).await;

    // 5. Ingest: every event of the drill is chained and nothing is quarantined.
    let forwarder = Forwarder::new(pool.clone(), true, 1_000, ForwarderMetrics::default());
    loop {
        let pass = forwarder.pass().await.unwrap();
        assert!(pass.quarantined.is_empty(), "{:?}", pass.quarantined);
        if pass.accepted == 0 {
            break;
        }
    }
    let signed_by_old: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_outbox WHERE signing_key_id = $1")
            .bind(&old_key)
            .fetch_one(&pool)
            .await
            .unwrap();
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_outbox WHERE tenant_id = $1")
        .bind(T)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(signed_by_old > 0 && signed_by_old < events);
    assert_eq!(verify_chain(&pool, T).await.unwrap(), events);
    // (10 + 10 + 10 + 10 + 5) pairs of two events each, plus the tenant, pricing, lease and
    // budget set-up events.
    assert!(events >= 90, "{events}");

    // 6. Offline: the export verifies, events signed by both keys included.
    let reader = connect_read_only(&runtime_url(&new.database_url))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = ExportOptions {
        tenant_id: T.into(),
        range: Range::default(),
        batch_size: 50,
        resume: false,
        max_batches: None,
    };
    let exported = export(&reader, dir.path(), &options).await.unwrap();
    assert_eq!(i64::try_from(exported.events).unwrap(), events);
    verify(dir.path(), &VerifyOptions::default()).unwrap();
}
