//! One controller per kind.
pub mod budget;
