//! `spendguard worker ttl-sweeper`: under a leader lease, asks the ledger to expire reservations
//! whose TTL passed and pending approvals past their expiry (SweepExpired runs on the database
//! clock), until none are left, then waits.

use spendguard_proto::ledger::v1 as pb;
use std::time::Duration;
use tonic::transport::Channel;
use tracing::{info, warn};

/// Reservations (and, separately, approvals) expired per call.
pub const SWEEP_BATCH: u32 = 1_000;

/// Expires everything that is due now; returns how many reservations and approvals were expired.
///
/// # Errors
/// The ledger's status.
pub async fn sweep_due(
    ledger: &mut pb::ledger_client::LedgerClient<Channel>,
) -> Result<u64, tonic::Status> {
    let mut total = 0u64;
    loop {
        let swept = ledger
            .sweep_expired(pb::SweepExpiredRequest {
                max_reservations: SWEEP_BATCH,
            })
            .await?
            .into_inner();
        total += u64::from(swept.expired) + u64::from(swept.approvals_expired);
        if swept.expired < SWEEP_BATCH && swept.approvals_expired < SWEEP_BATCH {
            return Ok(total);
        }
    }
}

/// Sweeps every `interval` while `leader` leads, until `shutdown` resolves.
pub async fn run(
    mut ledger: pb::ledger_client::LedgerClient<Channel>,
    leader: spendguard_leader::LeaderHandle,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        if leader.is_leader() {
            match sweep_due(&mut ledger).await {
                Ok(0) => {}
                Ok(expired) => info!(expired, "expired reservations and approvals swept"),
                Err(e) => warn!(error = %e, "sweep failed; retrying at the next interval"),
            }
        }
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
