//! Shutdown signals.

use tokio::signal::unix::{SignalKind, signal};

/// Resolves on SIGTERM or SIGINT.
///
/// # Panics
/// Never in practice: installing a signal handler fails only when the runtime has no signal
/// driver, which every SpendGuard runtime enables.
pub async fn signalled() {
    #[allow(clippy::expect_used)]
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; shutting down"),
    }
}
