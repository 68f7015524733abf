//! The operator's admin server (platform `AdminServer` on `SPENDGUARD_ADMIN_ADDR`): `/healthz`,
//! `/metrics`, and `/readyz`, which is ready when the Kubernetes API answers and, on the
//! leader, the controllers run. A standby is ready too: it serves the admission webhooks.

use spendguard_leader::LeaderHandle;
use spendguard_platform::Readiness;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Bound on the readiness probe's API call, below the kubelet's default 1 s probe timeout.
const API_CHECK_TIMEOUT: Duration = Duration::from_millis(800);

/// Whether this replica's controllers are running; set by the leader loop.
#[derive(Clone, Debug, Default)]
pub struct ControllersRunning(Arc<AtomicBool>);

impl ControllersRunning {
    /// Records whether the controllers run.
    pub fn set(&self, running: bool) {
        self.0.store(running, Ordering::SeqCst);
    }

    /// Whether the controllers run.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The readiness check: the API server answers `/version` in time, and a leader runs its
/// controllers.
pub fn readiness(
    kube: kube::Client,
    leader: LeaderHandle,
    running: ControllersRunning,
) -> Readiness {
    Arc::new(move || {
        let kube = kube.clone();
        let leader = leader.clone();
        let running = running.clone();
        Box::pin(async move {
            match tokio::time::timeout(API_CHECK_TIMEOUT, kube.apiserver_version()).await {
                Err(_) => return Err("kubernetes api: no answer in time".to_owned()),
                Ok(Err(error)) => return Err(format!("kubernetes api: {error}")),
                Ok(Ok(_)) => {}
            }
            if leader.is_leader() && !running.get() {
                return Err("leading, but the controllers are not running yet".to_owned());
            }
            Ok(())
        })
    })
}
