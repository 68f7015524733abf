//! Regenerates the committed gRPC code from the .proto files and fails when it drifted.
//!
//! Ordinary builds compile the committed `src/gen` and need no protoc; this test does (Debian's
//! `protobuf-compiler`, installed by `make deps`). Run with `SPENDGUARD_PROTO_BLESS=1` to rewrite
//! `src/gen` after changing a .proto file.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "spendguard/ledger/v1/ledger.proto",
    "spendguard/sidecar/v1/sidecar.proto",
];

#[test]
fn generated_code_is_up_to_date() {
    // As cargo names this package to the run: `env!` would name the checkout that compiled the
    // test, which a target directory shared by two checkouts reuses.
    let root = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from);
    let root = root.as_path();
    let committed = root.join("src/gen");
    let out = tempfile::tempdir().expect("temp dir");
    let protos: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(out.path())
        .compile_protos(&protos, &[root.to_path_buf()])
        .expect("protoc must be installed (make deps) to regenerate proto code");

    let bless = std::env::var_os("SPENDGUARD_PROTO_BLESS").is_some();
    let mut stale = Vec::new();
    for entry in std::fs::read_dir(out.path()).expect("read generated dir") {
        let entry = entry.expect("dir entry");
        let name = entry.file_name();
        let fresh = std::fs::read_to_string(entry.path()).expect("read generated file");
        let target = committed.join(&name);
        let old = std::fs::read_to_string(&target).unwrap_or_default();
        if old != fresh {
            if bless {
                std::fs::write(&target, &fresh).expect("write generated file");
            } else {
                stale.push(name.to_string_lossy().into_owned());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "generated proto code is stale: {stale:?}; run SPENDGUARD_PROTO_BLESS=1 cargo test -p spendguard-proto --test bootstrap"
    );
}
