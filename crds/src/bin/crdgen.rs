//! Writes every SpendGuard CRD to `crds/generated/spendguard.io.yaml` and the Helm chart's
//! `charts/spendguard/crds/spendguard.io.yaml` (or to stdout with `-`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let yaml = spendguard_crds::yaml()?;
    match std::env::args().nth(1).as_deref() {
        Some("-") => print!("{yaml}"),
        _ => {
            // As `cargo run` names this package (the checkout it runs in), else as compiled.
            let package = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
                || env!("CARGO_MANIFEST_DIR").into(),
                std::path::PathBuf::from,
            );
            for path in [
                package.join("generated/spendguard.io.yaml"),
                package.join("../charts/spendguard/crds/spendguard.io.yaml"),
            ] {
                std::fs::write(&path, &yaml)?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}
