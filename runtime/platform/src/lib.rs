//! Process plumbing shared by every SpendGuard binary: logging, the admin HTTP server
//! (`/healthz`, `/readyz`, `/metrics`), shutdown signals, and the supervision of a process's
//! long-running parts.

pub mod admin;
pub mod shutdown;
pub mod supervise;
pub mod telemetry;

pub use admin::{AdminServer, Readiness};
pub use telemetry::{CommonArgs, LogFormat};
