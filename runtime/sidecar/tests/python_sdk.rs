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
        let (url, tight, softcap, down, mock) = (
            main.base.clone(),
            tight.base.clone(),
            softcap.base.clone(),
            down.base.clone(),
            main.mock_url.clone(),
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
                .env("SPENDGUARD_SOFTCAP_URL", softcap)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_and_real_clients() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
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
    pytest(&python, &repo, [&main, &tight, &softcap, &down]).await;

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
    pytest(
        &python,
        &repo,
        [&main_credits, &tight_credits, &softcap_credits, &down],
    )
    .await;
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
