//! One controller per kind.
pub mod budget;
pub mod contract_bundle;
pub mod pricing_version;
