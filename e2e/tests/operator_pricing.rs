//! PricingVersion and ContractBundle controllers: a PricingVersion's status carries the identity
//! core::pricing computes (an invalid list is reported, not used), and a ContractBundle compiles
//! into a ConfigMap whose bytes verify against the published hash, as a sidecar checks them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use spendguard_core::contract::Bundle;
use spendguard_core::pricing::Pricing;
use spendguard_operator::metrics::Metrics;
use spendguard_operator::{Context, controller};
use spendguard_testkit::TestLedger;
use spendguard_testkit::control_plane::{ControlPlane, User};
use std::path::Path;

/// The checkout, as cargo names it to this run (`spendguard_testkit::paths`).
const ROOT: &spendguard_testkit::paths::RepoRoot = spendguard_testkit::paths::REPO_ROOT;

fn example(name: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/config/examples/{name}.yaml")).unwrap()
}

/// Polls until `object` has an Event with `reason` in `namespace`, and returns its type.
async fn wait_for_event(
    plane: &ControlPlane,
    namespace: &str,
    object: &str,
    reason: &str,
) -> String {
    let selector = format!("involvedObject.name={object},reason={reason}");
    plane
        .poll(
            &[
                "get",
                "events",
                "-n",
                namespace,
                "--field-selector",
                &selector,
                "-o",
                "jsonpath={.items[*].type}",
            ],
            |t| !t.is_empty(),
        )
        .await
}

async fn setup() -> (ControlPlane, Context, TestLedger) {
    let plane = ControlPlane::start().expect("control plane");
    plane.install_crds(&Path::new(ROOT).join("crds/generated/spendguard.io.yaml"));
    let ledger = TestLedger::start().await.unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = std::sync::Arc::new(Metrics::register(&mut registry));
    let kube = plane.client(User::Admin).await.unwrap();
    let context = Context::new(kube, ledger.client.clone(), metrics, "e2e-operator");
    (plane, context, ledger)
}

#[tokio::test]
async fn pricing_versions_publish_their_identity() {
    let (plane, context, _ledger) = setup().await;
    let kube = context.kube.clone();
    let operator = tokio::spawn(controller::pricing_version::run(context));
    let pricing = example("pricing-version");
    plane.admin(&["apply", "-f", "-"], Some(&pricing));
    let sha = plane
        .poll(
            &[
                "get",
                "pricingversion",
                "pricing-2026-11-01",
                "-o",
                "jsonpath={.status.sha256}",
            ],
            |s| s.len() == 64,
        )
        .await;
    let api: kube::Api<spendguard_crds::pricing_version::PricingVersion> = kube::Api::all(kube);
    let object = api.get("pricing-2026-11-01").await.unwrap();
    let expected = Pricing::new(controller::pricing_version::snapshot(&object)).unwrap();
    assert_eq!(sha, expected.sha256_hex());
    // Cluster-scoped objects get their Events in `default`.
    assert_eq!(
        wait_for_event(&plane, "default", "pricing-2026-11-01", "Valid").await,
        "Normal"
    );
    assert_eq!(
        plane.admin(
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

    // An alias claiming a name its provider already uses is refused, reported and not used. (The
    // same name under another provider is fine: names are per provider.)
    let broken = pricing.replace("name: pricing-2026-11-01", "name: pricing-broken");
    let duplicate = broken.replace("aliases: [\"gpt-5-2025-08-07\"]", "aliases: [\"gpt-5\"]");
    assert_ne!(duplicate, broken);
    plane.admin(&["apply", "-f", "-"], Some(&duplicate));
    plane
        .poll(
            &[
                "get",
                "pricingversion",
                "pricing-broken",
                "-o",
                "jsonpath={.status.conditions[0].reason}",
            ],
            |s| s == "InvalidPricing",
        )
        .await;
    assert_eq!(
        wait_for_event(&plane, "default", "pricing-broken", "InvalidPricing").await,
        "Warning"
    );
    assert_eq!(
        plane.admin(
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
    let (plane, context, mut ledger) = setup().await;
    let operator = tokio::spawn(controller::contract_bundle::run(context));
    let reason = [
        "get",
        "contractbundle",
        "research-agent",
        "-n",
        "default",
        "-o",
        "jsonpath={.status.conditions[0].reason}",
    ];

    // The bundle arrives before its pricing: reported, then compiled once the pricing exists.
    plane.admin(&["apply", "-f", "-"], Some(&example("contract-bundle")));
    plane.poll(&reason, |r| r == "PricingVersionNotFound").await;
    let bundle = "research-agent";
    assert_eq!(
        wait_for_event(&plane, "default", bundle, "PricingVersionNotFound").await,
        "Warning"
    );
    plane.admin(&["apply", "-f", "-"], Some(&example("pricing-version")));
    plane.poll(&reason, |r| r == "Compiled").await;
    assert_eq!(
        wait_for_event(&plane, "default", bundle, "Compiled").await,
        "Normal"
    );

    let sha = plane.admin(
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
    let config_map = [
        "get",
        "configmap",
        "spendguard-bundle-research-agent",
        "-n",
        "default",
        "-o",
    ];
    let bytes = plane.admin(
        &[&config_map[..], &["jsonpath={.data.bundle\\.json}"]].concat(),
        None,
    );
    let bundle = Bundle::from_json_verified(bytes.as_bytes(), &sha).unwrap();
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
    assert_eq!(
        plane.admin(
            &[&config_map[..], &["jsonpath={.data.budgets}"]].concat(),
            None
        ),
        "default/team-research"
    );
    assert!(Bundle::from_json_verified(bytes.replace("4096", "4097").as_bytes(), &sha).is_err());
    assert_eq!(
        bundle.pricing.published_at().map(|t| t.to_rfc3339()),
        Some("2026-11-01T00:00:00+00:00".to_owned())
    );
    assert_eq!(bundle.contract.pricing_max_age, None);

    // Sidecars trust the ConfigMap (its hash sits beside it), so the operator re-asserts it: an
    // edit of the bundle and its hash is undone, and a deleted ConfigMap comes back, with no
    // change to the ContractBundle.
    let config_map_name = "spendguard-bundle-research-agent";
    let bundle_json = [&config_map[..], &["jsonpath={.data.bundle\\.json}"]].concat();
    let edit_config_map = |data: &str| {
        let patch = format!(r#"{{"data":{data}}}"#);
        let args = ["patch", "configmap", config_map_name, "-n", "default"];
        plane.admin(
            &[&args[..], &["--type", "merge", "-p", &patch]].concat(),
            None,
        );
    };
    edit_config_map(r#"{"bundle.json":"{}","bundle.sha256":"00"}"#);
    plane.poll(&bundle_json, |json| json == bytes).await;
    assert_eq!(
        plane.admin(
            &[&config_map[..], &["jsonpath={.data.bundle\\.sha256}"]].concat(),
            None
        ),
        sha
    );
    plane.admin(
        &[
            "delete",
            "configmap",
            config_map_name,
            "-n",
            "default",
            "--wait=false",
        ],
        None,
    );
    plane.poll(&bundle_json, |json| json == bytes).await;
    // Also while the ledger is away: the compiled bundle's pricing was registered before.
    let (database_url, address, control_address) = {
        let running = ledger.ledger.as_ref().unwrap();
        (
            ledger.database_url.clone(),
            running.addr,
            running.control_addr,
        )
    };
    ledger.stop().await;
    edit_config_map(r#"{"bundle.json":"{}"}"#);
    plane.poll(&bundle_json, |json| json == bytes).await;
    let ledger = TestLedger::start_at_both(&database_url, "ledger-0", address, control_address)
        .await
        .unwrap();

    // S22: a contract that limits its pricing's age compiles with the limit and its policy, and
    // one that limits the age of undated pricing is an invalid spec (nothing compiled).
    let limited = example("contract-bundle").replace(
        "failPolicy: Closed",
        "failPolicy: Closed\n  pricingMaxAgeHours: 720\n  onStalePricing: Continue",
    );
    plane.admin(&["apply", "-f", "-"], Some(&limited));
    let max_age = plane
        .poll(
            &[&config_map[..], &["jsonpath={.data.bundle\\.json}"]].concat(),
            |json| json.contains("pricing_max_age"),
        )
        .await;
    let compiled: serde_json::Value = serde_json::from_str(&max_age).unwrap();
    assert_eq!(
        compiled["contract"]["pricing_max_age"],
        serde_json::json!({"hours": 720, "on_stale": "continue"})
    );
    let undated = example("pricing-version")
        .replace("name: pricing-2026-11-01", "name: pricing-undated")
        .replace("publishedAt: \"2026-11-01T00:00:00Z\"", "");
    plane.admin(&["apply", "-f", "-"], Some(&undated));
    plane.admin(
        &["apply", "-f", "-"],
        Some(&limited.replace(
            "pricingVersion: pricing-2026-11-01",
            "pricingVersion: pricing-undated",
        )),
    );
    plane.poll(&reason, |r| r == "InvalidSpec").await;
    let message = plane.admin(
        &[&reason[..6], &["jsonpath={.status.conditions[0].message}"]].concat(),
        None,
    );
    assert!(message.contains("no published_at"), "{message}");
    // Refused before anything reached the ledger: the undated pricing was never registered for
    // the tenant (the dated one, compiled above, was).
    let registered = |version: &'static str| {
        let pool = ledger.store().pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pricing_registrations WHERE version = $1",
            )
            .bind(version)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(registered("pricing-2026-11-01").await, 1);
    assert_eq!(registered("pricing-undated").await, 0);
    operator.abort();
}
