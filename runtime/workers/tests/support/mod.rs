//! Ledger activity for the worker tests: real reservations and commits, so the outbox holds real
//! signed events.
#![allow(dead_code, clippy::unwrap_used, unreachable_pub)]

use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::TestLedger;
use spendguard_testkit::ledger::reserve_request;

/// Creates `tenant` (lease, budget `b`) and makes `calls` reserve+commit pairs keyed `<tag><i>`.
pub async fn tenant_activity(ledger: &mut TestLedger, tenant: &str, calls: usize, tag: &str) {
    let fencing = ledger.tenant_with_lease(tenant).await.unwrap();
    ledger.budget(tenant, "b", 1_000_000).await.unwrap();
    for i in 0..calls {
        let r = ledger
            .client
            .reserve_set(reserve_request(
                tenant,
                &format!("{tag}{i}"),
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
                deferrable: false,
            })
            .await
            .unwrap();
    }
}
