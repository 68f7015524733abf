//! Deferrable requests (`deferrable = true`: settlements and credit draws nobody waits on) are
//! held for the ledger's defer window so they share one transaction; the first urgent request,
//! a full batch or the window's end sends them. The flag never changes an outcome.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_ledger::LedgerTuning;
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::ledger::reserve_request;
use spendguard_testkit::{TestLedger, invariants};
use std::time::Duration;
use tokio::task::JoinHandle;

const T: &str = "tenant-defer";

/// Long enough that nothing in a test reaches it by accident.
const LIVENESS: Duration = Duration::from_secs(20);

async fn ledger_with_window(window: Duration) -> (TestLedger, pb::FencingToken) {
    let tuning = LedgerTuning {
        defer_max_us: u64::try_from(window.as_micros()).unwrap(),
        ..LedgerTuning::default()
    };
    let mut ledger = TestLedger::start_with(&tuning).await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "b", 1_000_000).await.unwrap();
    (ledger, fencing)
}

/// Reserves `n` calls named `prefix-i` (urgent requests) and returns their reservation ids.
async fn reserved(
    ledger: &mut TestLedger,
    fencing: &pb::FencingToken,
    prefix: &str,
    n: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let response = ledger
            .client
            .reserve_set(reserve_request(
                T,
                &format!("{prefix}-{i}"),
                &["b"],
                100,
                fencing,
            ))
            .await
            .unwrap()
            .into_inner();
        let Some(pb::reserve_set_response::Outcome::Reserved(r)) = response.outcome else {
            panic!("not reserved: {response:?}");
        };
        ids.push(r.reservation_id);
    }
    ids
}

fn commit(id: &str, fencing: &pb::FencingToken, deferrable: bool) -> pb::CommitRequest {
    pb::CommitRequest {
        tenant_id: T.into(),
        reservation_id: id.into(),
        actual_nano_usd: 60,
        fencing: Some(fencing.clone()),
        deferrable,
    }
}

/// Sends a deferrable commit of every id at once, each on its own task.
fn commit_in_background(
    ledger: &TestLedger,
    fencing: &pb::FencingToken,
    ids: &[String],
) -> Vec<JoinHandle<pb::CommitResponse>> {
    ids.iter()
        .map(|id| {
            let mut client = ledger.client.clone();
            let request = commit(id, fencing, true);
            tokio::spawn(async move { client.commit(request).await.unwrap().into_inner() })
        })
        .collect()
}

async fn answers(tasks: Vec<JoinHandle<pb::CommitResponse>>) -> Vec<pb::CommitResponse> {
    let mut answers = Vec::new();
    for task in tasks {
        let answer = tokio::time::timeout(LIVENESS, task)
            .await
            .expect("a held request was never sent")
            .unwrap();
        answers.push(answer);
    }
    answers
}

/// How many transactions last wrote these reservations (their rows' `xmin`).
async fn writing_transactions(ledger: &TestLedger, ids: &[String]) -> i64 {
    sqlx::query_scalar(
        "SELECT count(DISTINCT xmin::text) FROM reservations WHERE reservation_id::text = ANY($1)",
    )
    .bind(ids)
    .fetch_one(ledger.store().pool())
    .await
    .unwrap()
}

async fn open_reservations(ledger: &TestLedger, ids: &[String]) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM reservations WHERE reservation_id::text = ANY($1) AND state = 'reserved'",
    )
    .bind(ids)
    .fetch_one(ledger.store().pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn deferrable_commits_wait_for_the_first_urgent_request_and_share_its_transaction() {
    let (mut ledger, fencing) = ledger_with_window(Duration::from_secs(600)).await;
    let mut ids = reserved(&mut ledger, &fencing, "call", 5).await;
    let commits = commit_in_background(&ledger, &fencing, &ids);

    // Held: nothing answered, nothing written, while no urgent request comes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(commits.iter().all(|c| !c.is_finished()));
    assert_eq!(open_reservations(&ledger, &ids).await, 5);

    // An urgent reserve sends them all with it, in its own transaction.
    ids.extend(reserved(&mut ledger, &fencing, "urgent", 1).await);
    let answers = answers(commits).await;
    assert!(
        answers
            .iter()
            .all(|a| a.committed_nano_usd == 60 && !a.replayed)
    );
    assert_eq!(
        open_reservations(&ledger, &ids).await,
        1,
        "only the urgent one"
    );
    assert_eq!(writing_transactions(&ledger, &ids).await, 1);

    // The flag is not part of the request's identity: an urgent retry replays.
    let retry = ledger
        .client
        .commit(commit(&ids[0], &fencing, false))
        .await
        .unwrap()
        .into_inner();
    assert!(
        retry.replayed && retry.committed_nano_usd == 60,
        "{retry:?}"
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_held_batch_leaves_when_its_window_ends_or_when_it_is_full() {
    // The window's end, with nothing else coming; a deferrable reserve (a draw's shape) among
    // the commits.
    let (mut ledger, fencing) = ledger_with_window(Duration::from_secs(1)).await;
    let ids = reserved(&mut ledger, &fencing, "call", 3).await;
    let commits = commit_in_background(&ledger, &fencing, &ids);
    // Held for the window (from the first one's submission), not sent at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(commits.iter().all(|c| !c.is_finished()));
    let mut client = ledger.client.clone();
    let deferrable_reserve = tokio::spawn(async move {
        client
            .reserve_set(pb::ReserveSetRequest {
                deferrable: true,
                ..reserve_request(T, "deferred", &["b"], 100, &fencing)
            })
            .await
            .unwrap()
            .into_inner()
    });
    answers(commits).await;
    let reserve = tokio::time::timeout(LIVENESS, deferrable_reserve)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        reserve.outcome,
        Some(pb::reserve_set_response::Outcome::Reserved(_))
    ));
    assert_eq!(open_reservations(&ledger, &ids).await, 0);

    // A full batch, inside a window nothing reaches.
    let (mut ledger, fencing) = ledger_with_window(Duration::from_secs(600)).await;
    let ids = reserved(
        &mut ledger,
        &fencing,
        "call",
        spendguard_ledger::writer::HELD_COMMANDS_MAX,
    )
    .await;
    answers(commit_in_background(&ledger, &fencing, &ids)).await;
    assert_eq!(open_reservations(&ledger, &ids).await, 0);
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_graceful_stop_sends_held_requests_at_once() {
    // A window nothing reaches: only the stop can send the held commits. The servers wait for
    // in-flight RPCs before the writer's queue closes, so the writer must stop holding first.
    let (mut ledger, fencing) = ledger_with_window(Duration::from_secs(600)).await;
    let ids = reserved(&mut ledger, &fencing, "call", 3).await;
    let commits = commit_in_background(&ledger, &fencing, &ids);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(commits.iter().all(|c| !c.is_finished()), "held");

    let pool = ledger.store().pool().clone();
    tokio::time::timeout(LIVENESS, ledger.stop())
        .await
        .expect("the stop waited for the held requests' window");
    let answers = answers(commits).await;
    assert!(answers.iter().all(|a| a.committed_nano_usd == 60));
    let committed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reservations WHERE reservation_id::text = ANY($1) AND state = 'committed'",
    )
    .bind(&ids)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(committed, 3);
    invariants::check(&pool).await.unwrap();
}
