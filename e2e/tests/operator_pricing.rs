//! A PricingVersion's status carries the same identity the sidecar computes for its snapshot,
//! and an invalid price list is reported as Ready=False instead of being used.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use spendguard_operator::{Context, controller};
use spendguard_testkit::TestLedger;
use spendguard_testkit::control_plane::{ControlPlane, User};
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn kubectl(plane: &ControlPlane, args: &[&str], stdin: Option<&str>) -> String {
    let mut command = plane.kubectl(User::Admin);
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubectl {args:?}: {text}");
    text
}

async fn wait_for(
    plane: &ControlPlane,
    name: &str,
    jsonpath: &str,
    want: impl Fn(&str) -> bool,
) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        last = kubectl(
            plane,
            &[
                "get",
                "pricingversion",
                name,
                "-o",
                &format!("jsonpath={jsonpath}"),
            ],
            None,
        );
        if want(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} {jsonpath} stayed {last:?}");
}

#[tokio::test]
async fn pricing_versions_publish_their_identity() {
    let plane = ControlPlane::start().expect("control plane");
    kubectl(
        &plane,
        &[
            "apply",
            "-f",
            &format!("{ROOT}/crds/generated/spendguard.io.yaml"),
        ],
        None,
    );
    kubectl(
        &plane,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "--all",
            "crd",
        ],
        None,
    );
    let ledger = TestLedger::start().await.unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(plane.kubeconfig(User::Admin)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let kube = kube::Client::try_from(config).unwrap();
    let operator = tokio::spawn(controller::pricing_version::run(Context {
        kube: kube.clone(),
        ledger: ledger.client.clone(),
    }));

    let example =
        std::fs::read_to_string(format!("{ROOT}/config/examples/pricing-version.yaml")).unwrap();
    kubectl(&plane, &["apply", "-f", "-"], Some(&example));
    let sha = wait_for(&plane, "pricing-2026-11-01", "{.status.sha256}", |s| {
        s.len() == 64
    })
    .await;
    // The identity is exactly what core::pricing computes for the same snapshot.
    let api: kube::Api<spendguard_crds::pricing_version::PricingVersion> = kube::Api::all(kube);
    let object = api.get("pricing-2026-11-01").await.unwrap();
    let expected =
        spendguard_core::pricing::Pricing::new(controller::pricing_version::snapshot(&object))
            .unwrap();
    assert_eq!(sha, expected.sha256_hex());
    assert_eq!(
        kubectl(
            &plane,
            &[
                "get",
                "pricingversion",
                "pricing-2026-11-01",
                "-o",
                "jsonpath={.status.models}"
            ],
            None
        ),
        "2"
    );

    // An alias claiming a name its provider already uses: refused by validation, reported, not
    // used. (The same name under another provider is fine: names are per provider.)
    let duplicate = example
        .replace("name: pricing-2026-11-01", "name: pricing-broken")
        .replace("aliases: [\"gpt-5-2025-08-07\"]", "aliases: [\"gpt-5\"]");
    assert_ne!(
        duplicate,
        example.replace("name: pricing-2026-11-01", "name: pricing-broken")
    );
    kubectl(&plane, &["apply", "-f", "-"], Some(&duplicate));
    wait_for(
        &plane,
        "pricing-broken",
        "{.status.conditions[0].reason}",
        |s| s == "InvalidPricing",
    )
    .await;
    assert_eq!(
        kubectl(
            &plane,
            &[
                "get",
                "pricingversion",
                "pricing-broken",
                "-o",
                "jsonpath={.status.sha256}"
            ],
            None
        ),
        ""
    );
    operator.abort();
}
