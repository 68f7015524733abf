//! SpendGuard's domain: money, ids, stable error codes, budget windows, fencing leases, audit
//! events, and the ledger's batch planner.
//!
//! Everything here is pure: no tokio, sqlx, tonic or kube. The ledger store loads rows, hands them
//! to [`plan::plan_batch`], and writes back the [`plan::Effects`] it returns:
//!
//! ```text
//! requests ─► validate (ids, money) ─► Command ─┐
//!                                  rows locked ─┴─► plan_batch ─► outcomes + effects ─► SQL
//! ```
#![warn(clippy::arithmetic_side_effects)]

pub mod audit;
pub mod contract;
pub mod error;
pub mod ids;
pub mod lease;
pub mod money;
pub mod plan;
pub mod pricing;
pub mod window;

pub use error::{ErrorClass, ErrorCode, LedgerError};
pub use money::NanoUsd;
