//! Property test: random sequences of reserve, commit, release and replay, and of credits opened,
//! drawn from and released, against the real ledger and a tiny model. Outcomes match the model, and afterwards every database invariant
//! holds (journal sums to balances, no overspend, resolve-once, contiguous producer sequences).
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use proptest::prelude::*;
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::ledger::reserve_request;
use spendguard_testkit::{TestLedger, invariants};

const T: &str = "tenant-p";
const BUDGETS: [&str; 3] = ["run", "workflow", "tenant"];
const LIMITS: [i64; 3] = [300, 600, 1_000];

#[derive(Debug, Clone)]
enum Op {
    Reserve { mask: u8, amount: i64 },
    Commit { pick: usize, actual: i64 },
    Release { pick: usize },
    Replay { pick: usize },
    OpenCredit { mask: u8, amount: i64 },
    Draw { pick: usize, amount: i64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u8..8, 1i64..250).prop_map(|(mask, amount)| Op::Reserve { mask, amount }),
        2 => (0usize..64, 0i64..300).prop_map(|(pick, actual)| Op::Commit { pick, actual }),
        1 => (0usize..64).prop_map(|pick| Op::Release { pick }),
        1 => (0usize..64).prop_map(|pick| Op::Replay { pick }),
        1 => (1u8..8, 1i64..400).prop_map(|(mask, amount)| Op::OpenCredit { mask, amount }),
        2 => (0usize..64, 1i64..120).prop_map(|(pick, amount)| Op::Draw { pick, amount }),
    ]
}

struct Open {
    id: String,
    /// What a replay sends again.
    request: pb::ReserveSetRequest,
    mask: u8,
    amount: i64,
    resolved: Option<Resolved>,
    is_credit: bool,
    /// For a credit: drawn so far.
    drawn: i64,
}

/// How a reservation of the model was resolved, which decides what a second resolution gets.
#[derive(Debug, Clone, Copy)]
enum Resolved {
    /// With this actual usage.
    Committed(i64),
    /// Giving back this much.
    Released(i64),
}

/// The stable code of a refused call.
fn refused_with<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> Option<pb::ErrorCode> {
    spendguard_proto::ledger::error_code(&result.expect_err("refused"))
}

/// What a reservation holds of its budgets' reserved money while open.
fn held(o: &Open) -> i64 {
    o.amount - o.drawn
}

/// Model of one budget: spent (committed + overrun) and reserved.
#[derive(Default, Clone, Copy)]
struct Model {
    used: i64,
    reserved: i64,
}

async fn run(ops: Vec<Op>) {
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    for (budget, limit) in BUDGETS.iter().zip(LIMITS) {
        ledger.budget(T, budget, limit).await.unwrap();
    }
    let mut model = [Model::default(); 3];
    let mut open: Vec<Open> = Vec::new();
    for (n, op) in ops.into_iter().enumerate() {
        match op {
            Op::Reserve { mask, amount } | Op::OpenCredit { mask, amount } => {
                let is_credit = matches!(op, Op::OpenCredit { .. });
                let chosen: Vec<usize> = (0..3).filter(|i| mask & (1 << i) != 0).collect();
                let names: Vec<&str> = chosen.iter().map(|&i| BUDGETS[i]).collect();
                let fits = chosen
                    .iter()
                    .all(|&i| model[i].used + model[i].reserved + amount <= LIMITS[i]);
                let request = pb::ReserveSetRequest {
                    credit: is_credit,
                    ..reserve_request(T, &format!("k{n}"), &names, amount, &fencing)
                };
                let response = ledger
                    .client
                    .reserve_set(request.clone())
                    .await
                    .unwrap()
                    .into_inner();
                match response.outcome {
                    Some(pb::reserve_set_response::Outcome::Reserved(r)) => {
                        assert!(fits, "reserved {amount} on {names:?} beyond the model");
                        for &i in &chosen {
                            model[i].reserved += amount;
                        }
                        open.push(Open {
                            id: r.reservation_id,
                            request,
                            mask,
                            amount,
                            resolved: None,
                            is_credit,
                            drawn: 0,
                        });
                    }
                    Some(pb::reserve_set_response::Outcome::Denied(_)) => {
                        assert!(!fits, "denied {amount} on {names:?} that fits")
                    }
                    None => panic!("no outcome"),
                }
            }
            Op::Commit { pick, actual } => {
                if open.is_empty() {
                    continue;
                }
                let len = open.len();
                let o = &mut open[pick % len];
                let result = ledger
                    .client
                    .commit(pb::CommitRequest {
                        tenant_id: T.into(),
                        reservation_id: o.id.clone(),
                        actual_nano_usd: actual,
                        fencing: Some(fencing.clone()),
                        deferrable: false,
                    })
                    .await;
                if o.is_credit {
                    let code = refused_with(result);
                    assert_eq!(
                        code,
                        Some(pb::ErrorCode::InvalidArgument),
                        "a credit committed"
                    );
                    continue;
                }
                match o.resolved {
                    // The same commit again is its replay; another actual conflicts with it.
                    Some(Resolved::Committed(first)) if first == actual => {
                        let c = result.unwrap().into_inner();
                        assert!(c.replayed);
                        assert_eq!(c.committed_nano_usd + c.overrun_nano_usd, actual);
                        continue;
                    }
                    Some(Resolved::Committed(_)) => {
                        let code = refused_with(result);
                        assert_eq!(code, Some(pb::ErrorCode::IdempotencyConflict));
                        continue;
                    }
                    Some(Resolved::Released(_)) => {
                        let code = refused_with(result);
                        assert_eq!(code, Some(pb::ErrorCode::ReservationAlreadyResolved));
                        continue;
                    }
                    None => {}
                }
                let c = result.unwrap().into_inner();
                assert!(!c.replayed);
                assert_eq!(c.committed_nano_usd + c.overrun_nano_usd, actual);
                for i in (0..3).filter(|i| o.mask & (1 << i) != 0) {
                    model[i].reserved -= o.amount;
                    model[i].used += actual;
                }
                o.resolved = Some(Resolved::Committed(actual));
            }
            Op::Release { pick } => {
                if open.is_empty() {
                    continue;
                }
                let len = open.len();
                let o = &mut open[pick % len];
                let result = ledger
                    .client
                    .release(pb::ReleaseRequest {
                        tenant_id: T.into(),
                        reservation_id: o.id.clone(),
                        fencing: Some(fencing.clone()),
                        reason: "p".into(),
                        deferrable: false,
                    })
                    .await;
                match o.resolved {
                    Some(Resolved::Released(first)) => {
                        let r = result.unwrap().into_inner();
                        assert!(r.replayed);
                        assert_eq!(r.released_nano_usd, first);
                        continue;
                    }
                    Some(Resolved::Committed(_)) => {
                        let code = refused_with(result);
                        assert_eq!(code, Some(pb::ErrorCode::ReservationAlreadyResolved));
                        continue;
                    }
                    None => {}
                }
                let r = result.unwrap().into_inner();
                assert!(!r.replayed);
                assert_eq!(r.released_nano_usd, held(o));
                for i in (0..3).filter(|i| o.mask & (1 << i) != 0) {
                    model[i].reserved -= held(o);
                }
                o.resolved = Some(Resolved::Released(held(o)));
            }
            Op::Replay { pick } => {
                let Some(o) = (!open.is_empty()).then(|| &open[pick % open.len()]) else {
                    continue;
                };
                let response = ledger
                    .client
                    .reserve_set(o.request.clone())
                    .await
                    .unwrap()
                    .into_inner();
                assert!(response.replayed);
                let Some(pb::reserve_set_response::Outcome::Reserved(r)) = response.outcome else {
                    panic!("a replay of a reservation: {response:?}");
                };
                assert_eq!(r.reservation_id, o.id);
            }
            Op::Draw { pick, amount } => {
                let credits: Vec<usize> = (0..open.len()).filter(|&i| open[i].is_credit).collect();
                if credits.is_empty() {
                    continue;
                }
                let c = credits[pick % credits.len()];
                let (credit_id, mask) = (open[c].id.clone(), open[c].mask);
                let names: Vec<&str> = (0..3)
                    .filter(|i| mask & (1 << i) != 0)
                    .map(|i| BUDGETS[i])
                    .collect();
                let request = pb::ReserveSetRequest {
                    draw_from_reservation_id: credit_id,
                    ..reserve_request(T, &format!("k{n}"), &names, amount, &fencing)
                };
                let result = ledger.client.reserve_set(request.clone()).await;
                if open[c].resolved.is_some() || amount > held(&open[c]) {
                    let status = result.unwrap_err();
                    assert_eq!(
                        spendguard_proto::ledger::error_code(&status),
                        Some(pb::ErrorCode::CreditUnavailable),
                        "{status:?}"
                    );
                    continue;
                }
                let response = result.unwrap().into_inner();
                let Some(pb::reserve_set_response::Outcome::Reserved(r)) = response.outcome else {
                    panic!("{response:?}");
                };
                // The budgets' money does not move: it passes from the credit to the draw.
                open[c].drawn += amount;
                assert_eq!(r.credit_remaining_nano_usd, held(&open[c]));
                open.push(Open {
                    id: r.reservation_id,
                    request,
                    mask,
                    amount,
                    resolved: None,
                    is_credit: false,
                    drawn: 0,
                });
            }
        }
    }
    let balances = ledger
        .client
        .get_balances(pb::GetBalancesRequest {
            tenant_id: T.into(),
            budget_ids: BUDGETS.iter().map(|b| (*b).to_owned()).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .balances;
    assert_eq!(balances.len(), BUDGETS.len());
    for (i, b) in balances.iter().enumerate() {
        assert_eq!(b.budget_id, BUDGETS[i]);
        assert_eq!(b.reserved_nano_usd, model[i].reserved, "{}", b.budget_id);
        assert_eq!(
            b.committed_nano_usd + b.overrun_nano_usd,
            model[i].used,
            "{}",
            b.budget_id
        );
    }
    invariants::check(ledger.store().pool()).await.unwrap();
    ledger.stop().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn random_sequences_keep_every_invariant(ops in proptest::collection::vec(op(), 1..40)) {
        tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(run(ops));
    }
}
