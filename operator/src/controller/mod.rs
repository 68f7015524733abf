//! One controller per kind.
pub mod budget;
pub mod pricing_version;
