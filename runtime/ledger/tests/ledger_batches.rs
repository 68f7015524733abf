//! Group commit at the store level: many commands in one transaction behave exactly as if they ran
//! one by one, including a reservation created and resolved in the same batch.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_core::NanoUsd;
use spendguard_core::plan::{
    Command, Commit, Credit, DecisionContext, Fencing, Outcome, PricingRef, Release, ReserveSet,
};
use spendguard_ledger::store::{ProducerCursor, Store};
use spendguard_testkit::{TestLedger, invariants};

const T: &str = "tenant-batch";

fn reserve(key: &str, amount: i64, fencing: &Fencing) -> ReserveSet {
    ReserveSet {
        tenant_id: T.into(),
        idempotency_key: key.into(),
        budget_ids: vec!["b".into()],
        amount: NanoUsd::new(amount).unwrap(),
        fencing: fencing.clone(),
        ttl_ms: 60_000,
        // Registered by `tenant_with_lease`.
        pricing: PricingRef {
            version: "test-v1".into(),
            sha256_hex: "ab".repeat(32),
        },
        context: DecisionContext::default(),
        credit: Credit::None,
    }
}

/// A ledger with tenant T, its lease and budget `b` of 100; the ledger's store and a cursor on
/// its writer's producer claim, for batches run beside the idle writer.
async fn setup() -> (TestLedger, Fencing, Store, ProducerCursor) {
    let mut ledger = TestLedger::start().await.unwrap();
    let token = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "b", 100).await.unwrap();
    let fencing = Fencing {
        scope_id: token.scope_id.clone(),
        epoch: token.epoch,
    };
    let store = ledger.store().clone();
    let cursor = ledger.producer_cursor().await.unwrap();
    (ledger, fencing, store, cursor)
}

#[tokio::test]
async fn one_batch_equals_sequential_execution() {
    let (_ledger, fencing, store, mut cursor) = setup().await;

    let first = reserve("a", 60, &fencing);
    let a_id = first.reservation_id();
    let commands = vec![
        Command::ReserveSet(first.clone()),
        // Denied: 60 + 50 > 100 while `a` is open.
        Command::ReserveSet(reserve("b", 50, &fencing)),
        // `a` commits 30 in the same batch: written once, already committed.
        Command::Commit(Commit {
            tenant_id: T.into(),
            reservation_id: a_id,
            actual: NanoUsd::new(30).unwrap(),
            fencing: fencing.clone(),
        }),
        // Now 30 committed: 50 fits, then 20 more fits exactly, then 1 does not.
        Command::ReserveSet(reserve("c", 50, &fencing)),
        Command::ReserveSet(reserve("d", 20, &fencing)),
        Command::ReserveSet(reserve("e", 1, &fencing)),
        // A replay of `a` inside the batch.
        Command::ReserveSet(first),
        Command::Release(Release {
            tenant_id: T.into(),
            reservation_id: reserve("c", 50, &fencing).reservation_id(),
            fencing: fencing.clone(),
            reason: "test".into(),
        }),
    ];
    let before = cursor.next_sequence;
    let outcomes = store
        .run_batch(&mut cursor, &commands)
        .await
        .unwrap()
        .outcomes;
    let kinds: Vec<&str> = outcomes
        .iter()
        .map(|o| match o.as_ref().unwrap() {
            Outcome::Reserved {
                replayed: false, ..
            } => "reserved",
            Outcome::Reserved { replayed: true, .. } => "replayed",
            Outcome::Denied { .. } => "denied",
            Outcome::Committed { .. } => "committed",
            Outcome::Released { .. } => "released",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "reserved",
            "denied",
            "committed",
            "reserved",
            "reserved",
            "denied",
            "replayed",
            "released"
        ]
    );
    // Events: reserve a, commit a, reserve c, reserve d, release c.
    assert_eq!(cursor.next_sequence, before + 5);
    let state: String =
        sqlx::query_scalar("SELECT state FROM reservations WHERE reservation_id = $1")
            .bind(a_id)
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(state, "committed");
    let balance = store
        .balances(T, &["b".to_owned()])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        (balance.money.committed.get(), balance.money.reserved.get()),
        (30, 20)
    );
    invariants::check(store.pool()).await.unwrap();
}

#[tokio::test]
async fn events_are_signed_at_the_batch_time_on_the_database_clock() {
    // Goal: an event's `signed_at` is its batch's time on the database's clock (`occurred_at`,
    // to the millisecond), on the load path and the cached path alike, so a ledger host whose
    // own clock drifts cannot sign events that ingest refuses as signed in the future. Before,
    // it was the host's clock when signing, a little later (and any amount off).
    use spendguard_proto::ledger::v1 as pb;
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "b", 1_000_000).await.unwrap();
    for i in 0..30 {
        let reserved = ledger
            .client
            .reserve_set(spendguard_testkit::ledger::reserve_request(
                T,
                &format!("clock-{i}"),
                &["b"],
                10,
                &fencing,
            ))
            .await
            .unwrap()
            .into_inner();
        let Some(pb::reserve_set_response::Outcome::Reserved(r)) = reserved.outcome else {
            panic!("{reserved:?}");
        };
        ledger
            .client
            .commit(pb::CommitRequest {
                tenant_id: T.into(),
                reservation_id: r.reservation_id,
                actual_nano_usd: 5,
                fencing: Some(fencing.clone()),
                deferrable: false,
            })
            .await
            .unwrap();
    }
    assert!(ledger.batches("cached") > 0, "{}", ledger.metrics_text());
    let (signed, off): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE signed_at IS NOT NULL),
                count(*) FILTER (WHERE signed_at IS DISTINCT FROM date_trunc('milliseconds', occurred_at))
           FROM audit_outbox",
    )
    .fetch_one(ledger.store().pool())
    .await
    .unwrap();
    assert!(signed >= 60, "{signed}");
    assert_eq!(off, 0, "events signed at another time than their batch's");
}

#[tokio::test]
async fn a_batch_is_signed_once_per_tenant_and_each_event_verifies_alone() {
    // Goal: one write batch holding two tenants' events carries one signature per tenant, so a
    // tenant's inclusion proofs (exported with its evidence) hold no hash of the other tenant's
    // events, and every row verifies from its own bytes and proof.
    use spendguard_evidence::{Inclusion, Signed};
    let mut ledger = TestLedger::start().await.unwrap();
    let mut fencings = Vec::new();
    for tenant in [T, "tenant-other"] {
        let token = ledger.tenant_with_lease(tenant).await.unwrap();
        ledger.budget(tenant, "b", 1_000).await.unwrap();
        fencings.push(Fencing {
            scope_id: token.scope_id.clone(),
            epoch: token.epoch,
        });
    }
    let store = ledger.store().clone();
    let mut cursor = ledger.producer_cursor().await.unwrap();
    let before = cursor.next_sequence;
    let commands: Vec<Command> = (0..6)
        .map(|i| {
            let tenant = [T, "tenant-other"][i % 2];
            Command::ReserveSet(ReserveSet {
                tenant_id: tenant.into(),
                ..reserve(&format!("mixed-{i}"), 10, &fencings[i % 2])
            })
        })
        .collect();
    let outcomes = store.run_batch(&mut cursor, &commands).await.unwrap();
    assert!(
        outcomes
            .outcomes
            .iter()
            .all(|o| matches!(o, Ok(Outcome::Reserved { .. })))
    );

    let pool = store.pool();
    let registry = spendguard_testkit::signing::registry(pool).await.unwrap();
    type Row = (
        String,
        Vec<u8>,
        String,
        String,
        String,
        chrono::DateTime<chrono::Utc>,
        Vec<u8>,
        Vec<u8>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT tenant_id, canonical_event, producer_instance_id, signing_key_id, signing_algorithm,
                signed_at, signature, signature_inclusion
           FROM audit_outbox WHERE producer_sequence >= $1 ORDER BY producer_sequence",
    )
    .bind(i64::try_from(before).unwrap())
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 6, "one reservation.reserved per command");
    let mut tenants_by_signature: std::collections::HashMap<Vec<u8>, Vec<(String, u32, u32)>> =
        std::collections::HashMap::new();
    for (tenant, bytes, producer, key_id, algorithm, signed_at, signature, inclusion) in rows {
        let inclusion = Inclusion::from_bytes(&inclusion).unwrap();
        let signed = Signed {
            key_id,
            algorithm: algorithm.parse().unwrap(),
            signed_at,
            producer_id: producer,
            signature: signature.clone(),
            inclusion: Some(inclusion.clone()),
        };
        registry.verify(&signed, &bytes).unwrap();
        tenants_by_signature.entry(signature).or_default().push((
            tenant,
            inclusion.index,
            inclusion.count,
        ));
    }
    assert_eq!(tenants_by_signature.len(), 2, "one signature per tenant");
    for rows in tenants_by_signature.values() {
        assert!(
            rows.iter()
                .all(|(tenant, _, count)| *tenant == rows[0].0 && *count == 3)
        );
        let mut places: Vec<u32> = rows.iter().map(|(_, index, _)| *index).collect();
        places.sort_unstable();
        assert_eq!(places, [0, 1, 2]);
    }
}

#[tokio::test]
async fn a_sweep_batch_waits_for_the_reservations_it_names_before_it_holds_any_candidate() {
    // Goal: a batch that sweeps and commits X, on one replica, cannot deadlock with a session on
    // another that holds X and then wants Y, an expired reservation the sweep would take.
    // Reservation ids are ordered X < Y, so a batch that held its candidate Y while it waited
    // for X in the lock order would close the cycle.
    let (ledger, fencing, store, mut cursor) = setup().await;
    let x = reserve("x", 10, &fencing);
    let y = (0..)
        .map(|n| ReserveSet {
            ttl_ms: 1_000,
            ..reserve(&format!("y{n}"), 10, &fencing)
        })
        .find(|y| y.reservation_id() > x.reservation_id())
        .unwrap();
    let (x_id, y_id) = (x.reservation_id(), y.reservation_id());
    store
        .run_batch(
            &mut cursor,
            &[Command::ReserveSet(x), Command::ReserveSet(y)],
        )
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;

    // Another replica holds X, then wants Y once the batch waits for X.
    let outcomes = ledger
        .batch_beside_another_replica(
            ("reservations", "reservation_id"),
            (x_id, y_id),
            vec![
                Command::SweepExpired(10),
                Command::Commit(Commit {
                    tenant_id: T.into(),
                    reservation_id: x_id,
                    actual: NanoUsd::new(5).unwrap(),
                    fencing,
                }),
            ],
        )
        .await;
    assert!(
        matches!(
            outcomes[0],
            Ok(Outcome::Swept {
                reservations: 1,
                approvals: 0
            })
        ),
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[1], Ok(Outcome::Committed { .. })),
        "{outcomes:?}"
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}
