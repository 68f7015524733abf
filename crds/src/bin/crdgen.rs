//! Writes every SpendGuard CRD to `crds/generated/spendguard.io.yaml` and the Helm chart's
//! `charts/spendguard/crds/spendguard.io.yaml` (or to stdout with `-`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let yaml = spendguard_crds::yaml()?;
    match std::env::args().nth(1).as_deref() {
        Some("-") => print!("{yaml}"),
        _ => {
            for path in [
                concat!(env!("CARGO_MANIFEST_DIR"), "/generated/spendguard.io.yaml"),
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../charts/spendguard/crds/spendguard.io.yaml"
                ),
            ] {
                std::fs::write(path, &yaml)?;
                eprintln!("wrote {path}");
            }
        }
    }
    Ok(())
}
