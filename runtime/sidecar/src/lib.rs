//! The SpendGuard sidecar. Built so far: the fencing lease lifecycle (spec S4). The decision
//! API, contract evaluation wiring and the provider proxy arrive with issue 3.
//!
//! ```text
//! start ─► acquire (expected_epoch 0) ─► Held ─► renew every ttl/3 ─► Held …
//!                                          │ renew fails past the grace window ─► Draining
//!                                          │ epoch taken over (stale)            ─► Lost (for good)
//!                                          └ shutdown ─► Draining ─► in-flight done ─► Stopped
//! ```

pub mod lease;
