//! Property tests: random sequences of reserve, commit, release, replay, sweep and lease
//! renewals and restarts, and of credits opened, drawn from and released, against the real
//! ledger and a tiny model. Any of them may present the epoch a restart made stale. The second
//! property adds time: reservations of the shortest TTL lapse, so commits are booked late,
//! releases are refused, credits stop lending and sweeps expire what is left. Outcomes match the
//! model, and afterwards every database invariant holds (journal sums to balances, no overspend,
//! resolve-once, contiguous producer sequences).
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::ledger::reserve_request;
use spendguard_testkit::{TestLedger, invariants};

const T: &str = "tenant-p";
const BUDGETS: [&str; 3] = ["run", "workflow", "tenant"];
const LIMITS: [i64; 3] = [300, 600, 1_000];

/// The shortest TTL the ledger takes, for reservations that lapse within a case.
const SHORT_TTL_MS: u32 = 1_000;
/// Every other reservation outlives the case.
const LONG_TTL_MS: u32 = 600_000;
/// A short reservation sent less than this long ago is surely still open when the ledger
/// decides, which happens a little after the test sends, on the database clock (or the cached
/// path's estimate of it, measured on every load)...
const SURELY_OPEN: Duration = Duration::from_millis(500);
/// ...and one answered longer ago than this has surely lapsed. In between the test waits.
const SURELY_LAPSED: Duration = Duration::from_millis(1_500);

#[derive(Debug, Clone)]
enum Op {
    Reserve {
        mask: u8,
        amount: i64,
        short: bool,
        stale: bool,
    },
    Commit {
        pick: usize,
        actual: i64,
        stale: bool,
    },
    Release {
        pick: usize,
        stale: bool,
    },
    Replay {
        pick: usize,
        stale: bool,
    },
    OpenCredit {
        mask: u8,
        amount: i64,
        short: bool,
        stale: bool,
    },
    Draw {
        pick: usize,
        amount: i64,
        short: bool,
        stale: bool,
    },
    /// The workload asks for its scope again: renewing keeps the epoch, restarting raises it and
    /// makes the one before stale. `keyed`: with a request id of its own, so that it can be
    /// retried.
    Lease {
        restart: bool,
        keyed: bool,
    },
    /// An earlier keyed acquire sent again (its answer lost, say): it gets the first answer and
    /// changes nothing, whatever the lease has become since.
    LeaseRetry {
        pick: usize,
    },
    /// SweepExpired, as the TTL worker calls it.
    Sweep,
    /// Waits until every short reservation has lapsed.
    Pass,
}

/// Random operations; with `time`, short TTLs and waits for them to lapse.
fn op(time: bool) -> BoxedStrategy<Op> {
    // Now and then an operation presents the epoch a restart made stale (when there is one).
    let stale = || proptest::bool::weighted(0.15);
    let short = move || proptest::bool::ANY.prop_map(move |s| s && time);
    let any = prop_oneof![
        3 => (1u8..8, 1i64..250, short(), stale()).prop_map(|(mask, amount, short, stale)| {
            Op::Reserve { mask, amount, short, stale }
        }),
        2 => (0usize..64, 0i64..300, stale())
            .prop_map(|(pick, actual, stale)| Op::Commit { pick, actual, stale }),
        1 => (0usize..64, stale()).prop_map(|(pick, stale)| Op::Release { pick, stale }),
        1 => (0usize..64, stale()).prop_map(|(pick, stale)| Op::Replay { pick, stale }),
        1 => (1u8..8, 1i64..400, short(), stale()).prop_map(|(mask, amount, short, stale)| {
            Op::OpenCredit { mask, amount, short, stale }
        }),
        2 => (0usize..64, 1i64..120, short(), stale()).prop_map(|(pick, amount, short, stale)| {
            Op::Draw { pick, amount, short, stale }
        }),
        1 => (proptest::bool::ANY, proptest::bool::ANY)
            .prop_map(|(restart, keyed)| Op::Lease { restart, keyed }),
        1 => (0usize..64).prop_map(|pick| Op::LeaseRetry { pick }),
        1 => Just(Op::Sweep),
    ];
    if time {
        prop_oneof![12 => any, 2 => Just(Op::Pass)].boxed()
    } else {
        any.boxed()
    }
}

/// The lease as stored and the length of its history: what a retried acquire must not change.
async fn lease_rows(
    ledger: &TestLedger,
) -> (i64, Vec<(String, i64, chrono::DateTime<chrono::Utc>)>) {
    let pool = ledger.store().pool();
    let history: i64 = sqlx::query_scalar("SELECT count(*) FROM fencing_scope_events")
        .fetch_one(pool)
        .await
        .unwrap();
    let scopes = sqlx::query_as(
        "SELECT owner_workload_id, epoch, expires_at FROM fencing_scopes ORDER BY scope_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    (history, scopes)
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
    /// For a short TTL: when the ReserveSet was sent and when it was answered, which bound when
    /// the ledger created it.
    short: Option<(Instant, Instant)>,
}

impl Open {
    /// Past its TTL on the ledger's clock (the case has waited out any doubt: [`settle`]),
    /// whether or not a sweep or a late commit has expired it yet.
    fn lapsed(&self) -> bool {
        self.short
            .is_some_and(|(_, answered)| answered.elapsed() >= SURELY_LAPSED)
    }

    /// The state a replay of its ReserveSet reports.
    fn state(&self) -> pb::ReservationState {
        match self.resolved {
            None if self.lapsed() => pb::ReservationState::Expired,
            None => pb::ReservationState::Open,
            Some(Resolved::Committed(_)) => pb::ReservationState::Committed,
            Some(Resolved::Released(_)) => pb::ReservationState::Released,
            Some(Resolved::Expired { .. }) => pb::ReservationState::Expired,
        }
    }
}

/// Waits until no open short reservation is in doubt (neither surely open nor surely lapsed),
/// and if one was, until all of them have lapsed: then no later operation of the case finds one
/// crossing its TTL while the ledger decides.
async fn settle(open: &[Open], all: bool) {
    let short = || {
        open.iter()
            .filter(|o| o.resolved.is_none())
            .filter_map(|o| o.short)
    };
    let in_doubt = short().any(|(sent, answered)| {
        sent.elapsed() >= SURELY_OPEN && answered.elapsed() < SURELY_LAPSED
    });
    if (in_doubt || all)
        && let Some(last) = short().map(|(_, answered)| answered).max()
    {
        tokio::time::sleep_until((last + SURELY_LAPSED).into()).await;
    }
}

/// How a reservation of the model was resolved, which decides what a second resolution gets.
#[derive(Debug, Clone, Copy)]
enum Resolved {
    /// With this actual usage.
    Committed(i64),
    /// Giving back this much.
    Released(i64),
    /// Past its TTL, by a sweep or a late commit; with the late commit's actual once booked.
    Expired { late: Option<i64> },
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

/// The budgets of a reservation.
fn chosen(mask: u8) -> impl Iterator<Item = usize> {
    (0..3).filter(move |i| mask & (1 << i) != 0)
}

async fn run(ops: Vec<Op>) {
    let mut ledger = TestLedger::start().await.unwrap();
    let mut fencing = ledger.tenant_with_lease(T).await.unwrap();
    // The token of the epoch before the last restart.
    let mut stale_token: Option<pb::FencingToken> = None;
    for (budget, limit) in BUDGETS.iter().zip(LIMITS) {
        ledger.budget(T, budget, limit).await.unwrap();
    }
    let mut model = [Model::default(); 3];
    let mut open: Vec<Open> = Vec::new();
    // Keyed acquires and their first answers.
    let mut acquires: Vec<(
        pb::AcquireFencingLeaseRequest,
        pb::AcquireFencingLeaseResponse,
    )> = Vec::new();
    for (n, op) in ops.into_iter().enumerate() {
        settle(&open, matches!(op, Op::Pass)).await;
        let stale = match op {
            Op::Reserve { stale, .. }
            | Op::Commit { stale, .. }
            | Op::Release { stale, .. }
            | Op::Replay { stale, .. }
            | Op::OpenCredit { stale, .. }
            | Op::Draw { stale, .. } => stale && stale_token.is_some(),
            Op::Lease { .. } | Op::LeaseRetry { .. } | Op::Sweep | Op::Pass => false,
        };
        let token = if stale {
            stale_token.clone().unwrap()
        } else {
            fencing.clone()
        };
        match op {
            Op::Reserve {
                mask,
                amount,
                short,
                ..
            }
            | Op::OpenCredit {
                mask,
                amount,
                short,
                ..
            } => {
                let is_credit = matches!(op, Op::OpenCredit { .. });
                let names: Vec<&str> = chosen(mask).map(|i| BUDGETS[i]).collect();
                let fits =
                    chosen(mask).all(|i| model[i].used + model[i].reserved + amount <= LIMITS[i]);
                let request = pb::ReserveSetRequest {
                    credit: is_credit,
                    ttl_ms: if short { SHORT_TTL_MS } else { LONG_TTL_MS },
                    ..reserve_request(T, &format!("k{n}"), &names, amount, &token)
                };
                let sent = Instant::now();
                let result = ledger.client.reserve_set(request.clone()).await;
                if stale {
                    assert_eq!(refused_with(result), Some(pb::ErrorCode::FencingEpochStale));
                    continue;
                }
                let response = result.unwrap().into_inner();
                match response.outcome {
                    Some(pb::reserve_set_response::Outcome::Reserved(r)) => {
                        assert!(fits, "reserved {amount} on {names:?} beyond the model");
                        for i in chosen(mask) {
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
                            short: short.then(|| (sent, Instant::now())),
                        });
                    }
                    Some(pb::reserve_set_response::Outcome::Denied(_)) => {
                        assert!(!fits, "denied {amount} on {names:?} that fits")
                    }
                    None => panic!("no outcome"),
                }
            }
            Op::Commit { pick, actual, .. } => {
                if open.is_empty() {
                    continue;
                }
                let len = open.len();
                let o = &mut open[pick % len];
                let lapsed = o.lapsed();
                let result = ledger
                    .client
                    .commit(pb::CommitRequest {
                        tenant_id: T.into(),
                        reservation_id: o.id.clone(),
                        actual_nano_usd: actual,
                        fencing: Some(token),
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
                // A settled reservation answers before the epoch is looked at: the same actual
                // replays, another conflicts.
                match o.resolved {
                    Some(Resolved::Committed(first))
                    | Some(Resolved::Expired { late: Some(first) })
                        if first == actual =>
                    {
                        let c = result.unwrap().into_inner();
                        assert!(c.replayed);
                        assert_eq!(c.committed_nano_usd + c.overrun_nano_usd, actual);
                        assert_eq!(c.late, matches!(o.resolved, Some(Resolved::Expired { .. })));
                        continue;
                    }
                    Some(Resolved::Committed(_)) | Some(Resolved::Expired { late: Some(_) }) => {
                        let code = refused_with(result);
                        assert_eq!(code, Some(pb::ErrorCode::IdempotencyConflict));
                        continue;
                    }
                    Some(Resolved::Released(_)) => {
                        let code = refused_with(result);
                        assert_eq!(code, Some(pb::ErrorCode::ReservationAlreadyResolved));
                        continue;
                    }
                    Some(Resolved::Expired { late: None }) | None => {}
                }
                if stale {
                    assert_eq!(refused_with(result), Some(pb::ErrorCode::FencingEpochStale));
                    continue;
                }
                let c = result.unwrap().into_inner();
                assert!(!c.replayed);
                let swept = matches!(o.resolved, Some(Resolved::Expired { late: None }));
                if swept || lapsed {
                    // Booked late: what it held went back at its expiry (now, if no sweep came
                    // first), and all of actual is an overrun.
                    assert!(c.late, "{c:?}");
                    assert_eq!(
                        (
                            c.committed_nano_usd,
                            c.released_nano_usd,
                            c.overrun_nano_usd
                        ),
                        (0, o.amount, actual)
                    );
                    for i in chosen(o.mask) {
                        if !swept {
                            model[i].reserved -= held(o);
                        }
                        model[i].used += actual;
                    }
                    o.resolved = Some(Resolved::Expired { late: Some(actual) });
                    continue;
                }
                assert!(!c.late);
                assert_eq!(c.committed_nano_usd + c.overrun_nano_usd, actual);
                for i in chosen(o.mask) {
                    model[i].reserved -= o.amount;
                    model[i].used += actual;
                }
                o.resolved = Some(Resolved::Committed(actual));
            }
            Op::Release { pick, .. } => {
                if open.is_empty() {
                    continue;
                }
                let len = open.len();
                let o = &mut open[pick % len];
                let lapsed = o.lapsed();
                let result = ledger
                    .client
                    .release(pb::ReleaseRequest {
                        tenant_id: T.into(),
                        reservation_id: o.id.clone(),
                        fencing: Some(token),
                        reason: "p".into(),
                        deferrable: false,
                    })
                    .await;
                let code = match o.resolved {
                    Some(Resolved::Released(first)) => {
                        let r = result.unwrap().into_inner();
                        assert!(r.replayed);
                        assert_eq!(r.released_nano_usd, first);
                        continue;
                    }
                    Some(Resolved::Committed(_)) => pb::ErrorCode::ReservationAlreadyResolved,
                    // What it held went back when it expired.
                    Some(Resolved::Expired { .. }) => pb::ErrorCode::ReservationExpired,
                    None if stale => pb::ErrorCode::FencingEpochStale,
                    None if lapsed => pb::ErrorCode::ReservationExpired,
                    None => {
                        let r = result.unwrap().into_inner();
                        assert!(!r.replayed);
                        assert_eq!(r.released_nano_usd, held(o));
                        for i in chosen(o.mask) {
                            model[i].reserved -= held(o);
                        }
                        o.resolved = Some(Resolved::Released(held(o)));
                        continue;
                    }
                };
                assert_eq!(refused_with(result), Some(code));
            }
            Op::Replay { pick, .. } => {
                let Some(o) = (!open.is_empty()).then(|| &open[pick % open.len()]) else {
                    continue;
                };
                // Judged before the call, as for every operation: a slow answer must not turn it.
                let state = o.state();
                // A retry under the scope's next epoch (a restarted workload) replays too; a
                // stale epoch is refused before the key is looked up.
                let request = pb::ReserveSetRequest {
                    fencing: Some(token),
                    ..o.request.clone()
                };
                let result = ledger.client.reserve_set(request).await;
                if stale {
                    assert_eq!(refused_with(result), Some(pb::ErrorCode::FencingEpochStale));
                    continue;
                }
                let response = result.unwrap().into_inner();
                assert!(response.replayed);
                let Some(pb::reserve_set_response::Outcome::Reserved(r)) = response.outcome else {
                    panic!("a replay of a reservation: {response:?}");
                };
                assert_eq!(r.reservation_id, o.id);
                assert_eq!(r.state(), state, "{}", o.id);
            }
            Op::Draw {
                pick,
                amount,
                short,
                ..
            } => {
                let credits: Vec<usize> = (0..open.len()).filter(|&i| open[i].is_credit).collect();
                if credits.is_empty() {
                    continue;
                }
                let c = credits[pick % credits.len()];
                let (credit_id, mask) = (open[c].id.clone(), open[c].mask);
                let credit_lapsed = open[c].lapsed();
                let names: Vec<&str> = chosen(mask).map(|i| BUDGETS[i]).collect();
                let request = pb::ReserveSetRequest {
                    draw_from_reservation_id: credit_id,
                    ttl_ms: if short { SHORT_TTL_MS } else { LONG_TTL_MS },
                    ..reserve_request(T, &format!("k{n}"), &names, amount, &token)
                };
                let sent = Instant::now();
                let result = ledger.client.reserve_set(request.clone()).await;
                if stale {
                    assert_eq!(refused_with(result), Some(pb::ErrorCode::FencingEpochStale));
                    continue;
                }
                let credit = &open[c];
                if credit.resolved.is_some() || credit_lapsed || amount > held(credit) {
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
                    short: short.then(|| (sent, Instant::now())),
                });
            }
            Op::Lease { restart, keyed } => {
                let request = pb::AcquireFencingLeaseRequest {
                    scope_id: fencing.scope_id.clone(),
                    tenant_id: T.into(),
                    workload_instance_id: format!("{T}-w"),
                    ttl_ms: 600_000,
                    expected_epoch: if restart { 0 } else { fencing.epoch },
                    force: false,
                    request_id: if keyed {
                        format!("acquire-{n}")
                    } else {
                        String::new()
                    },
                };
                let lease = ledger
                    .client
                    .acquire_fencing_lease(request.clone())
                    .await
                    .unwrap()
                    .into_inner();
                assert!(!lease.replayed);
                if keyed {
                    acquires.push((request, lease));
                }
                if restart {
                    assert_eq!(lease.outcome(), pb::LeaseOutcome::Restarted);
                    assert_eq!(lease.epoch, fencing.epoch + 1);
                    stale_token = Some(fencing.clone());
                    fencing.epoch = lease.epoch;
                } else {
                    assert_eq!(lease.outcome(), pb::LeaseOutcome::Renewed);
                    assert_eq!(lease.epoch, fencing.epoch);
                }
            }
            Op::LeaseRetry { pick } => {
                if acquires.is_empty() {
                    continue;
                }
                let (request, first) = &acquires[pick % acquires.len()];
                let before = lease_rows(&ledger).await;
                let again = ledger
                    .client
                    .acquire_fencing_lease(request.clone())
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(
                    again,
                    pb::AcquireFencingLeaseResponse {
                        replayed: true,
                        ..*first
                    }
                );
                assert_eq!(lease_rows(&ledger).await, before, "a retry changes nothing");
                // The model's epoch stays: the next operation under it must still pass.
            }
            Op::Sweep => {
                // Every reservation past its TTL and still open expires, giving back what it
                // held (a credit what it had not lent); nothing else does.
                let mut expected = 0;
                for o in open
                    .iter_mut()
                    .filter(|o| o.resolved.is_none() && o.lapsed())
                {
                    for i in chosen(o.mask) {
                        model[i].reserved -= held(o);
                    }
                    o.resolved = Some(Resolved::Expired { late: None });
                    expected += 1;
                }
                let swept = ledger
                    .client
                    .sweep_expired(pb::SweepExpiredRequest {
                        max_reservations: 10_000,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(swept.expired, expected);
            }
            Op::Pass => {}
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

fn block_on(ops: Vec<Op>) {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(ops));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn random_sequences_keep_every_invariant(ops in proptest::collection::vec(op(false), 1..40)) {
        block_on(ops);
    }
}

proptest! {
    // A case waits up to 1.5 s for each pass, so fewer of them.
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
    #[test]
    fn random_sequences_with_lapsing_ttls_keep_every_invariant(
        ops in proptest::collection::vec(op(true), 8..40)
    ) {
        block_on(ops);
    }
}
