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

#[tokio::test]
async fn contract_bundles_compile_into_verifiable_config_maps() {
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
    let operator = tokio::spawn(controller::contract_bundle::run(Context {
        kube,
        ledger: ledger.client.clone(),
    }));

    // The bundle arrives before its pricing: reported, then compiled once the pricing exists.
    let contract =
        std::fs::read_to_string(format!("{ROOT}/config/examples/contract-bundle.yaml")).unwrap();
    kubectl(&plane, &["apply", "-f", "-"], Some(&contract));
    let reason = |plane: &ControlPlane| {
        kubectl(
            plane,
            &[
                "get",
                "contractbundle",
                "research-agent",
                "-n",
                "default",
                "-o",
                "jsonpath={.status.conditions[0].reason}",
            ],
            None,
        )
    };
    let mut last = String::new();
    for _ in 0..100 {
        last = reason(&plane);
        if last == "PricingVersionNotFound" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last, "PricingVersionNotFound");
    let pricing =
        std::fs::read_to_string(format!("{ROOT}/config/examples/pricing-version.yaml")).unwrap();
    kubectl(&plane, &["apply", "-f", "-"], Some(&pricing));
    for _ in 0..150 {
        last = reason(&plane);
        if last == "Compiled" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last, "Compiled");

    // The ConfigMap holds bytes that verify against the published hash, as a sidecar checks.
    let sha = kubectl(
        &plane,
        &[
            "get",
            "contractbundle",
            "research-agent",
            "-n",
            "default",
            "-o",
            "jsonpath={.status.bundleSha256}",
        ],
        None,
    );
    let bytes = kubectl(
        &plane,
        &[
            "get",
            "configmap",
            "spendguard-bundle-research-agent",
            "-n",
            "default",
            "-o",
            "jsonpath={.data.bundle\\.json}",
        ],
        None,
    );
    let bundle =
        spendguard_core::contract::Bundle::from_json_verified(bytes.as_bytes(), &sha).unwrap();
    assert_eq!(bundle.contract.max_output_tokens, 4096);
    assert_eq!(
        bundle.contract.max_cost_per_call_nano_usd.map(|n| n.get()),
        Some(2_000_000_000)
    );
    assert_eq!(bundle.pricing.version(), "pricing-2026-11-01");
    assert!(
        bundle
            .contract
            .version
            .starts_with("default/research-agent@")
    );
    let budgets = kubectl(
        &plane,
        &[
            "get",
            "configmap",
            "spendguard-bundle-research-agent",
            "-n",
            "default",
            "-o",
            "jsonpath={.data.budgets}",
        ],
        None,
    );
    assert_eq!(budgets, "default/team-research");
    let tampered = bytes.replace("4096", "4097");
    assert!(
        spendguard_core::contract::Bundle::from_json_verified(tampered.as_bytes(), &sha).is_err()
    );
    operator.abort();
}
