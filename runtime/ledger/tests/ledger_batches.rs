//! Group commit at the store level: many commands in one transaction behave exactly as if they ran
//! one by one, including a reservation created and resolved in the same batch.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_core::NanoUsd;
use spendguard_core::plan::{
    Command, Commit, Credit, DecisionContext, Fencing, Outcome, PricingRef, Release, ReserveSet,
};
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

#[tokio::test]
async fn one_batch_equals_sequential_execution() {
    let mut ledger = TestLedger::start().await.unwrap();
    let token = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "b", 100).await.unwrap();
    let fencing = Fencing {
        scope_id: token.scope_id.clone(),
        epoch: token.epoch,
    };
    let store = ledger.store().clone();
    let mut cursor = ledger.producer_cursor().await.unwrap();

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
