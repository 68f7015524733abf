//! The committed CRD YAML matches the Rust types.

#[test]
fn generated_crds_are_up_to_date() {
    let fresh = spendguard_crds::yaml().expect("serialize CRDs");
    let chart = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/spendguard/crds/spendguard.io.yaml"
    ))
    .unwrap_or_default();
    assert!(
        fresh == chart,
        "charts/spendguard/crds is stale: run `cargo run -p spendguard-crds --bin crdgen`"
    );
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/generated/spendguard.io.yaml"
    ))
    .unwrap_or_default();
    assert!(
        fresh == committed,
        "crds/generated/spendguard.io.yaml is stale: run `cargo run -p spendguard-crds --bin crdgen`"
    );
}
