//! Loading the compiled bundle the operator writes into a ConfigMap (mounted as a directory):
//! `bundle.json` (canonical contract + pricing snapshot), `bundle.sha256` (its id), `tenant`
//! and `budgets` (comma-separated budget ids). A hash mismatch or an unknown field refuses
//! startup: a sidecar never decides on a bundle nobody compiled.

use crate::error::SidecarError;
use spendguard_core::contract::Bundle;
use spendguard_core::pricing::Pricing;
use spendguard_proto::ledger::v1 as pb;
use std::path::Path;

/// How the ledger names `pricing`: the version and hash it was registered under (the operator
/// registers each bundle's snapshot for its tenant).
pub fn pricing_ref(pricing: &Pricing) -> pb::PricingRef {
    pb::PricingRef {
        version: pricing.version().to_owned(),
        sha256_hex: pricing.sha256_hex().to_owned(),
    }
}

/// A verified bundle and the identity it names.
#[derive(Debug)]
pub struct Loaded {
    /// Contract and pricing.
    pub bundle: Bundle,
    /// Tenant.
    pub tenant_id: String,
    /// Budgets every call reserves against.
    pub budget_ids: Vec<String>,
}

fn read(dir: &Path, name: &'static str) -> Result<String, SidecarError> {
    let path = dir.join(name);
    std::fs::read_to_string(&path).map_err(|e| SidecarError::InvalidArgument {
        field: "bundle_dir",
        message: format!("reading {}: {e}", path.display()),
    })
}

/// Loads and verifies the bundle in `dir`.
///
/// # Errors
/// [`SidecarError::InvalidArgument`] naming the file or field at fault.
pub fn load(dir: &Path) -> Result<Loaded, SidecarError> {
    let json = read(dir, "bundle.json")?;
    let expected = read(dir, "bundle.sha256")?;
    let bundle = Bundle::from_json_verified(json.as_bytes(), expected.trim())
        .map_err(|e| SidecarError::invalid("bundle.json", e.to_string()))?;
    let tenant_id = read(dir, "tenant")?.trim().to_owned();
    spendguard_core::ids::check_name("tenant", &tenant_id)
        .map_err(|e| SidecarError::invalid("tenant", e.to_string()))?;
    let budget_ids: Vec<String> = read(dir, "budgets")?
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .map(str::to_owned)
        .collect();
    if budget_ids.is_empty() || budget_ids.len() > 7 {
        // The ledger takes up to 8 budgets per reservation; one is kept for the run budget.
        return Err(SidecarError::invalid("budgets", "must name 1 to 7 budgets"));
    }
    for budget in &budget_ids {
        spendguard_core::ids::check_name("budgets", budget)
            .map_err(|e| SidecarError::invalid("budgets", e.to_string()))?;
    }
    Ok(Loaded {
        bundle,
        tenant_id,
        budget_ids,
    })
}

/// Writes a bundle directory (what the operator's ConfigMap mounts as; tests and the demo use
/// it for local runs).
///
/// # Errors
/// I/O errors.
pub fn write(
    dir: &Path,
    canonical_json: &[u8],
    sha256_hex: &str,
    tenant_id: &str,
    budget_ids: &[&str],
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("bundle.json"), canonical_json)?;
    std::fs::write(dir.join("bundle.sha256"), sha256_hex)?;
    std::fs::write(dir.join("tenant"), tenant_id)?;
    std::fs::write(dir.join("budgets"), budget_ids.join(","))
}
