//! Process plumbing shared by every SpendGuard binary: logging, the admin HTTP server
//! (`/healthz`, `/readyz`, `/metrics`) and shutdown signals.

pub mod admin;
pub mod shutdown;
pub mod telemetry;

pub use admin::{AdminServer, Readiness};
pub use telemetry::{CommonArgs, LogFormat};
