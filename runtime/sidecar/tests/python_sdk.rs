//! The Python SDK and the real provider clients (`openai`, `anthropic`, LangChain, Pydantic-AI),
//! unchanged except their base URL, against running sidecars: pytest in `sdk/python/tests`
//! runs inside this test, which provides the stack. The venv is built (or reused) by
//! `sdk/python/scripts/venv.sh`.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Command;
use support::{Options, Stack};

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
    let output = tokio::task::spawn_blocking({
        let (url, tight, softcap, mock) = (
            main.base.clone(),
            tight.base.clone(),
            softcap.base.clone(),
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
    drop((main, tight, softcap));
}
