//! Writes every SpendGuard CRD to `crds/generated/spendguard.io.yaml` (or stdout with `-`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let yaml = spendguard_crds::yaml()?;
    match std::env::args().nth(1).as_deref() {
        Some("-") => print!("{yaml}"),
        _ => {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/generated/spendguard.io.yaml");
            std::fs::write(path, yaml)?;
            eprintln!("wrote {path}");
        }
    }
    Ok(())
}
