//! The Python SDK and the real provider clients (`openai`, `anthropic`, LangChain, Pydantic-AI),
//! unchanged except their base URL, against running sidecars: pytest in `sdk/python/tests`
//! runs inside this test, which provides the stack. The venv is built (or reused) by
//! `sdk/python/scripts/venv.sh`.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Command;
use support::{Options, Stack, fixed_credits};

fn venv_python(repo: &Path) -> String {
    let out = Command::new("bash")
        .arg(repo.join("sdk/python/scripts/venv.sh"))
        .output()
        .expect("run sdk/python/scripts/venv.sh");
    assert!(
        out.status.success(),
        "building the SDK venv failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .expect("venv.sh prints the python path last")
        .trim()
        .to_owned()
}

/// Runs the SDK's pytest suite against `main` (every kind of call), `tight` (every priced call
/// STOPs), `softcap` (every call needs approval) and `down` (its ledger is gone).
async fn pytest(python: &str, repo: &Path, [main, tight, softcap, down]: [&Stack; 4]) {
    let output = tokio::task::spawn_blocking({
        let (python, repo) = (python.to_owned(), repo.to_owned());
        // Every stack's mock, the main one first: refusals are looked for at all of them.
        let mocks = [main, tight, softcap, down].map(|stack| stack.mock_url.clone());
        let (url, tight, softcap_url, down, mock) = (
            main.base.clone(),
            tight.base.clone(),
            softcap.base.clone(),
            down.base.clone(),
            mocks.join(","),
        );
        move || {
            Command::new(python)
                .args([
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "sdk/python/tests",
                ])
                .current_dir(repo)
                .env("SPENDGUARD_URL", url)
                .env("SPENDGUARD_TIGHT_URL", tight)
                .env("SPENDGUARD_SOFTCAP_URL", softcap_url)
                .env("SPENDGUARD_DOWN_URL", down)
                .env("SPENDGUARD_MOCK_URL", mock)
                .output()
                .expect("run pytest")
        }
    })
    .await
    .unwrap();
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{report}");
    assert!(output.status.success(), "pytest failed:\n{report}");
}

/// Plays the human approver of `stack` (as `kubectl spendguard approve`/`deny` would, through the
/// operator): a pending approval of a call named `approve-*` is approved, `deny-*` denied; the
/// rest stay pending.
fn approver(stack: &Stack) -> tokio::task::JoinHandle<()> {
    use spendguard_proto::ledger::v1 as pb;
    let mut ledger = stack.ledger.client.clone();
    tokio::spawn(async move {
        let mut page_token = String::new();
        loop {
            let page = ledger
                .list_approvals(pb::ListApprovalsRequest {
                    tenant_id: support::TENANT.into(),
                    state: pb::ApprovalState::Pending.into(),
                    page_size: 500,
                    page_token: std::mem::take(&mut page_token),
                })
                .await
                .map(|r| r.into_inner())
                .unwrap_or_default();
            page_token = page.next_page_token;
            for approval in page.approvals {
                let call_id = approval.context.map(|c| c.call_id).unwrap_or_default();
                let decision = if call_id.starts_with("approve-") {
                    pb::ApprovalDecision::Approve
                } else if call_id.starts_with("deny-") {
                    pb::ApprovalDecision::Deny
                } else {
                    continue;
                };
                let _ = ledger
                    .resolve_approval(pb::ResolveApprovalRequest {
                        tenant_id: support::TENANT.into(),
                        approval_id: approval.approval_id,
                        decision: decision.into(),
                        approver: "pytest-approver".into(),
                        reason: "decided by the test harness".into(),
                    })
                    .await;
            }
            if page_token.is_empty() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_and_real_clients() {
    let repo = spendguard_testkit::paths::repo_root().to_path_buf();
    let python = venv_python(&repo);
    let main = Stack::start(Options::default()).await;
    // No call's worst case fits: every priced call is STOP / BUDGET_EXHAUSTED.
    let tight = Stack::start(Options {
        limit: 1_000_000,
        ..Options::default()
    })
    .await;
    // Every worst case crosses the soft cap: REQUIRE_APPROVAL / SOFT_CAP_REACHED.
    let softcap = Stack::start(Options {
        limit: 100_000_000_000,
        soft_cap: 1_000_000,
        ..Options::default()
    })
    .await;
    // Its ledger stops once the sidecar holds its lease: every call fails closed (503).
    let mut down = Stack::start(Options::default()).await;
    down.ledger.stop().await;
    let approving = approver(&softcap);
    pytest(&python, &repo, [&main, &tight, &softcap, &down]).await;
    approving.abort();

    // The same clients, unchanged, against a sidecar admitting calls inside credits
    // (docs/design/credits.md): the tight budget has no room for a credit and the soft-capped
    // one gets none, so their sidecars reserve call by call as before.
    let with_credits = |options: Options| Options {
        flags: fixed_credits(10_000_000_000),
        ..options
    };
    let main_credits = Stack::start(with_credits(Options::default())).await;
    let tight_credits = Stack::start(with_credits(Options {
        limit: 1_000_000,
        ..Options::default()
    }))
    .await;
    let softcap_credits = Stack::start(with_credits(Options {
        limit: 100_000_000_000,
        soft_cap: 1_000_000,
        ..Options::default()
    }))
    .await;
    let approving = approver(&softcap_credits);
    pytest(
        &python,
        &repo,
        [&main_credits, &tight_credits, &softcap_credits, &down],
    )
    .await;
    approving.abort();
    let drawn: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reservations WHERE drawn_from_reservation_id IS NOT NULL",
    )
    .fetch_one(main_credits.ledger.store().pool())
    .await
    .unwrap();
    assert!(
        drawn > 0,
        "the real clients' calls were admitted inside credits"
    );
    spendguard_testkit::invariants::check(main_credits.ledger.store().pool())
        .await
        .unwrap();
    drop((main, tight, softcap, down));
}
