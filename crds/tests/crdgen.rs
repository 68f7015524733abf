//! The committed CRD YAML matches the Rust types.

/// This package's directory as cargo names it to this run: `env!` would name the checkout that
/// compiled the test, which a target directory shared by two checkouts reuses.
fn package() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || env!("CARGO_MANIFEST_DIR").into(),
        std::path::PathBuf::from,
    )
}

#[test]
fn generated_crds_are_up_to_date() {
    let fresh = spendguard_crds::yaml().expect("serialize CRDs");
    let chart =
        std::fs::read_to_string(package().join("../charts/spendguard/crds/spendguard.io.yaml"))
            .unwrap_or_default();
    assert!(
        fresh == chart,
        "charts/spendguard/crds is stale: run `cargo run -p spendguard-crds --bin crdgen`"
    );
    let committed =
        std::fs::read_to_string(package().join("generated/spendguard.io.yaml")).unwrap_or_default();
    assert!(
        fresh == committed,
        "crds/generated/spendguard.io.yaml is stale: run `cargo run -p spendguard-crds --bin crdgen`"
    );
}
