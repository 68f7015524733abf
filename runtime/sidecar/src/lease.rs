//! The sidecar's fencing lease (S4): acquired before any decision, renewed in the background,
//! and the only source of the epoch a decision may carry.
//!
//! # Guarantees
//! - No epoch is handed out before an acquire succeeded, and never epoch 0.
//! - A handed-out epoch is one the ledger confirmed within the last TTL, measured on this
//!   process's monotonic clock from *before* the confirming request was first sent (a retry
//!   carries the first send's request id, so its answer may be that send's grant), minus a
//!   safety margin. A stale cached epoch cannot be used: the ledger refuses it anyway (FENCING_EPOCH_STALE),
//!   and locally it expires.
//! - When renewals keep failing past the grace window, new decisions are refused (draining,
//!   fail closed) while the process stays alive to recover.
//! - A restart acquires afresh (`expected_epoch = 0`), so the ledger bumps the epoch: no reuse.

use spendguard_proto::ledger::v1 as pb;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Channel;
use tracing::{info, warn};

type LedgerClient = pb::ledger_client::LedgerClient<Channel>;

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Fencing scope.
    pub scope_id: String,
    /// Tenant of the scope.
    pub tenant_id: String,
    /// This pod's stable id (downward API pod name).
    pub workload_instance_id: String,
    /// Lease length requested from the ledger.
    pub ttl: Duration,
    /// How long renewals may fail before new decisions are refused. Must be below `ttl`.
    pub grace: Duration,
    /// Subtracted from the locally computed validity to absorb scheduling delays.
    pub safety_margin: Duration,
}

/// Why a decision cannot get an epoch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// Not acquired yet.
    #[error("fencing lease not acquired yet")]
    NotAcquired,
    /// Renewals failed past the grace window, or shutdown began.
    #[error("fencing lease is draining; new decisions are refused")]
    Draining,
    /// Another holder took the scope over; this process no longer decides.
    #[error("fencing lease was taken over by another holder")]
    Lost,
    /// The configuration is unsafe.
    #[error("invalid lease configuration: {0}")]
    Config(&'static str),
}

/// The lease as decisions see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Before the first successful acquire.
    Acquiring,
    /// Held: decisions may use `epoch` until `valid_until`.
    Held {
        /// Epoch minted by the ledger.
        epoch: u64,
        /// Local monotonic deadline.
        valid_until: Instant,
        /// Last successful renewal (local).
        renewed_at: Instant,
    },
    /// New decisions refused (renewal failing past grace, or shutting down). In-flight calls may
    /// still settle with the last epoch; the ledger judges whether it is still current.
    Draining {
        /// The last epoch held, if any.
        epoch: Option<u64>,
    },
    /// Taken over by another holder.
    Lost,
}

/// A cheap, cloneable view of the lease.
#[derive(Clone)]
pub struct Lease {
    state: watch::Receiver<LeaseState>,
}

impl Lease {
    /// The epoch a new decision must carry.
    ///
    /// # Errors
    /// [`LeaseError`] unless the lease is held and locally valid.
    pub fn epoch_for_decision(&self) -> Result<u64, LeaseError> {
        match *self.state.borrow() {
            LeaseState::Held {
                epoch, valid_until, ..
            } if Instant::now() < valid_until => Ok(epoch),
            LeaseState::Held { .. } | LeaseState::Draining { .. } => Err(LeaseError::Draining),
            LeaseState::Acquiring => Err(LeaseError::NotAcquired),
            LeaseState::Lost => Err(LeaseError::Lost),
        }
    }

    /// The epoch an in-flight call settles (commits or releases) with: also while draining, so
    /// shutdown can finish in-flight calls before the lease lapses.
    ///
    /// # Errors
    /// [`LeaseError`] when no epoch was ever held, or the scope was taken over.
    pub fn epoch_for_settlement(&self) -> Result<u64, LeaseError> {
        match *self.state.borrow() {
            LeaseState::Held { epoch, .. } | LeaseState::Draining { epoch: Some(epoch) } => {
                Ok(epoch)
            }
            LeaseState::Draining { epoch: None } => Err(LeaseError::Draining),
            LeaseState::Acquiring => Err(LeaseError::NotAcquired),
            LeaseState::Lost => Err(LeaseError::Lost),
        }
    }

    /// Readiness: a valid lease. Liveness does not depend on it.
    pub fn is_ready(&self) -> bool {
        self.epoch_for_decision().is_ok()
    }

    /// The current state.
    pub fn state(&self) -> LeaseState {
        *self.state.borrow()
    }

    /// Waits until the state satisfies `predicate`.
    pub async fn wait_for(&mut self, predicate: impl FnMut(&LeaseState) -> bool) -> LeaseState {
        let waited = self.state.wait_for(predicate).await.map(|state| *state);
        waited.unwrap_or_else(|_| *self.state.borrow())
    }
}

/// Owns the lease: acquires, renews, and drains on shutdown.
pub struct LeaseKeeper {
    client: LedgerClient,
    config: LeaseConfig,
    state: watch::Sender<LeaseState>,
    /// The request whose outcome is unknown (no answer, or the ledger's "may or may not have
    /// happened"): sent again with the same request id, so that an acquire that landed is
    /// answered as it was instead of raising the epoch once more.
    unanswered: Option<Unanswered>,
}

/// An acquire or renewal sent and not answered yet.
struct Unanswered {
    expected_epoch: u64,
    request_id: String,
    /// When it was first sent: the ledger granted it no earlier, so a lease counted from here
    /// never outlives the ledger's (a retry that is answered with the first grant included).
    first_sent_at: Instant,
}

impl Unanswered {
    /// The request to send at `now`: `pending` again if it is for the same expected epoch and
    /// younger than a lease's life, otherwise a new one. A grant is counted from the first send,
    /// so an id resent late brings a lease with little life left, which the next renewal
    /// replaces; past a whole lease's life the answer would be over on arrival (an acquire afresh
    /// that had landed is then raised once more, as without ids).
    fn resend_or_new(
        pending: Option<Self>,
        expected_epoch: u64,
        now: Instant,
        lease_life: Duration,
    ) -> Self {
        match pending {
            Some(pending)
                if pending.expected_epoch == expected_epoch
                    && now.saturating_duration_since(pending.first_sent_at) < lease_life =>
            {
                pending
            }
            _ => Self {
                expected_epoch,
                request_id: format!("lease/{}", uuid::Uuid::new_v4()),
                first_sent_at: now,
            },
        }
    }

    /// The lease its answer grants: valid from its first send (the ledger's grant came no
    /// earlier), with the grace for failing renewals counted from this send, which was answered.
    fn granted(&self, epoch: u64, sent_at: Instant, lease_life: Duration) -> LeaseState {
        LeaseState::Held {
            epoch,
            valid_until: self.first_sent_at + lease_life,
            renewed_at: sent_at,
        }
    }
}

/// The pause after a granted renewal: the usual third of the TTL, or half of what is left of the
/// lease when that is shorter (a retried attempt's lease, counted from its first send), but never
/// under half of [`RETRY_FIRST`].
fn renewal_wait(renew_every: Duration, valid_until: Instant, now: Instant) -> Duration {
    renew_every
        .min(valid_until.saturating_duration_since(now) / 2)
        .max(RETRY_FIRST / 2)
}

/// Whether a failed acquire may have landed: anything but the ledger's own refusal (no answer,
/// an answer that is not the ledger's, or one saying it is away, which covers its "may or may
/// not have happened"). Resending its request id is then right (a landed one is replayed, one
/// not taken is decided afresh); after a refusal nothing landed and the next attempt is new.
fn outcome_unknown(status: &tonic::Status) -> bool {
    !spendguard_proto::ledger::Answer::of(status).ledger_refused()
}

impl LeaseKeeper {
    /// Creates the keeper and the view decisions use.
    ///
    /// # Errors
    /// [`LeaseError::Config`] when `grace + safety_margin >= ttl` (the lease could lapse on the
    /// ledger while decisions still use it) or the TTL is below one second.
    pub fn new(client: LedgerClient, config: LeaseConfig) -> Result<(Self, Lease), LeaseError> {
        if config.ttl < Duration::from_secs(1) {
            return Err(LeaseError::Config("ttl must be at least 1 s"));
        }
        if config.grace + config.safety_margin >= config.ttl {
            return Err(LeaseError::Config(
                "grace + safety margin must be below the ttl",
            ));
        }
        let (state, receiver) = watch::channel(LeaseState::Acquiring);
        Ok((
            Self {
                client,
                config,
                state,
                unanswered: None,
            },
            Lease { state: receiver },
        ))
    }

    fn ttl_ms(&self) -> u32 {
        u32::try_from(self.config.ttl.as_millis()).unwrap_or(u32::MAX)
    }

    /// One acquire or renewal. Returns the new state, or `None` when it failed without saying
    /// what the lease is now (no answer, or a refusal other than a takeover's or a held lease's):
    /// the caller keeps the current state until the grace window runs out.
    async fn attempt(&mut self, expected_epoch: u64) -> Option<LeaseState> {
        let lease_life = self.config.ttl.saturating_sub(self.config.safety_margin);
        let sent_at = Instant::now();
        let pending =
            Unanswered::resend_or_new(self.unanswered.take(), expected_epoch, sent_at, lease_life);
        let request = pb::AcquireFencingLeaseRequest {
            scope_id: self.config.scope_id.clone(),
            tenant_id: self.config.tenant_id.clone(),
            workload_instance_id: self.config.workload_instance_id.clone(),
            ttl_ms: self.ttl_ms(),
            expected_epoch,
            force: false,
            request_id: pending.request_id.clone(),
        };
        let mut request = tonic::Request::new(request);
        request.set_timeout(self.config.ttl / 3);
        match self.client.acquire_fencing_lease(request).await {
            Ok(response) => {
                let epoch = response.into_inner().epoch;
                if epoch == 0 {
                    warn!("ledger returned epoch 0; refusing it");
                    return None;
                }
                Some(pending.granted(epoch, sent_at, lease_life))
            }
            Err(status) if outcome_unknown(&status) => {
                warn!(error = %status.message(), "fencing lease request failed; it is sent again with its request id");
                self.unanswered = Some(pending);
                None
            }
            Err(status) => match spendguard_proto::ledger::error_code(&status) {
                Some(pb::ErrorCode::FencingEpochStale) => Some(LeaseState::Lost),
                Some(pb::ErrorCode::FencingLeaseHeld) if expected_epoch == 0 => {
                    Some(LeaseState::Acquiring)
                }
                _ => {
                    warn!(error = %status.message(), "fencing lease request failed");
                    None
                }
            },
        }
    }

    /// Runs until `shutdown` resolves, then drains: new decisions are refused and the keeper
    /// returns, so the caller can wait for in-flight calls before exiting. The lease is not
    /// released early: it lapses after its TTL, so a successor cannot overlap in-flight commits.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let renew_every = self.config.ttl / 3;
        // After a failed renewal the next one comes sooner, doubling up to the renewal period:
        // one slow answer (a batch held by a lock, a ledger restart) must not use up the grace
        // window waiting for the next regular renewal.
        let mut retry_after = RETRY_FIRST;
        loop {
            let current = *self.state.borrow();
            let expected_epoch = match current {
                LeaseState::Held { epoch, .. } => epoch,
                // A fresh acquire: the ledger bumps the epoch for a restart or takeover.
                LeaseState::Acquiring | LeaseState::Draining { .. } => 0,
                // Someone else holds the scope now — possibly a newer incarnation of this pod.
                // Re-acquiring would fight it, so this process stops deciding for good; it stays
                // alive (not ready) until it is replaced.
                LeaseState::Lost => {
                    shutdown.await;
                    return;
                }
            };
            let next = self.attempt(expected_epoch).await;
            let now = Instant::now();
            let new_state = match (next, current) {
                (Some(state @ LeaseState::Held { epoch, .. }), _) => {
                    if !matches!(current, LeaseState::Held { epoch: e, .. } if e == epoch) {
                        info!(epoch, scope_id = %self.config.scope_id, "fencing lease acquired");
                    }
                    state
                }
                (Some(LeaseState::Lost), _) => {
                    warn!(scope_id = %self.config.scope_id, "fencing lease taken over; decisions refused");
                    LeaseState::Lost
                }
                (Some(other), _) => other,
                // No answer: keep serving within the grace window, then drain.
                (None, LeaseState::Held { renewed_at, .. })
                    if now.duration_since(renewed_at) > self.config.grace =>
                {
                    warn!(scope_id = %self.config.scope_id, "fencing lease renewal failing past the grace window; draining");
                    draining(current)
                }
                (None, state) => state,
            };
            self.state.send_replace(new_state);
            let wait = match (next, new_state) {
                (Some(_), LeaseState::Held { valid_until, .. }) => {
                    retry_after = RETRY_FIRST;
                    renewal_wait(renew_every, valid_until, now)
                }
                (None, LeaseState::Held { .. }) => {
                    let wait = jittered(retry_after.min(renew_every));
                    retry_after = (retry_after * 2).min(renew_every);
                    wait
                }
                _ => jittered(RETRY_FIRST),
            };
            tokio::select! {
                () = &mut shutdown => {
                    let current = *self.state.borrow();
                    self.state.send_replace(draining(current));
                    info!("sidecar draining: new decisions refused");
                    return;
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// First pause after a failed renewal (and between attempts while not holding the lease).
const RETRY_FIRST: Duration = Duration::from_millis(250);

/// Half of `wait` plus a random part of the other half, so that the sidecars whose renewals
/// failed on the same ledger blip do not all retry at the same instants.
fn jittered(wait: Duration) -> Duration {
    use std::hash::BuildHasher as _;
    // Each RandomState::new() gets new keys (std seeds them per thread, then increments them),
    // so this is a new pseudo-random number on each call; good enough to spread retries.
    let random = std::collections::hash_map::RandomState::new().hash_one(0u8);
    let half = wait / 2;
    half + half.mul_f64((random % 1_000_000) as f64 / 1_000_000.0)
}

/// The draining state that follows `current`, keeping its epoch for in-flight settlements.
fn draining(current: LeaseState) -> LeaseState {
    let epoch = match current {
        LeaseState::Held { epoch, .. } => Some(epoch),
        LeaseState::Draining { epoch } => epoch,
        LeaseState::Acquiring | LeaseState::Lost => None,
    };
    LeaseState::Draining { epoch }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lease_past_its_local_deadline_gives_no_epoch_to_decide_with() {
        // S4: no decision may use a stale cached epoch, even if the keeper stalled and never
        // moved the state on: the deadline alone refuses it. Settlements of in-flight calls
        // still get it (the ledger fences them if the scope moved on).
        let now = Instant::now();
        let held = |valid_until| LeaseState::Held {
            epoch: 7,
            valid_until,
            renewed_at: now,
        };
        let (keeper, state) = watch::channel(held(now + Duration::from_secs(60)));
        let lease = Lease { state };
        assert_eq!(lease.epoch_for_decision().unwrap(), 7);
        let lapsed = now.checked_sub(Duration::from_millis(1)).unwrap_or(now);
        keeper.send_replace(held(lapsed));
        assert!(matches!(
            lease.epoch_for_decision(),
            Err(LeaseError::Draining)
        ));
        assert_eq!(lease.epoch_for_settlement().unwrap(), 7);
    }

    #[test]
    fn an_attempt_whose_outcome_is_unknown_is_resent_with_its_id_within_a_lease_life() {
        let life = Duration::from_secs(14);
        let start = Instant::now();
        let first = Unanswered::resend_or_new(None, 0, start, life);
        let (id, sent) = (first.request_id.clone(), first.first_sent_at);
        let later = start + Duration::from_secs(5);
        let again = Unanswered::resend_or_new(Some(first), 0, later, life);
        assert_eq!((&again.request_id, again.first_sent_at), (&id, sent));
        // A grant to the resent id counts from the first send; the grace from this one.
        assert_eq!(
            again.granted(3, later, life),
            LeaseState::Held {
                epoch: 3,
                valid_until: start + life,
                renewed_at: later,
            }
        );
        // Another expected epoch, or a lease's life later: a new request.
        let renewal = Unanswered::resend_or_new(Some(again), 3, later, life);
        assert_ne!(renewal.request_id, id);
        let stale = Unanswered::resend_or_new(Some(renewal), 3, later + life, life);
        assert_eq!(stale.first_sent_at, later + life);

        // A status as the ledger answers (its detail and the header naming its code), or, with
        // no code, a transport failure.
        let unknown = |code: Option<pb::ErrorCode>| {
            let Some(code) = code else {
                return outcome_unknown(&tonic::Status::unavailable("connection refused"));
            };
            let detail = pb::ErrorDetail {
                code: code as i32,
                message: "x".into(),
                field: String::new(),
            };
            let mut status = tonic::Status::with_details(
                tonic::Code::Unavailable,
                "x",
                prost::Message::encode_to_vec(&detail).into(),
            );
            status.metadata_mut().insert(
                spendguard_proto::ledger::ERROR_CODE_HEADER,
                spendguard_proto::ledger::code_name(code).parse().unwrap(),
            );
            outcome_unknown(&status)
        };
        assert!(unknown(None));
        for code in [
            pb::ErrorCode::DependencyUnavailable,
            pb::ErrorCode::Overloaded,
            pb::ErrorCode::ShuttingDown,
            pb::ErrorCode::SigningUnavailable,
        ] {
            assert!(unknown(Some(code)), "{code:?}");
        }
        // Refusals, INTERNAL among them (the ledger rolled the acquire back).
        for code in [
            pb::ErrorCode::FencingLeaseHeld,
            pb::ErrorCode::FencingEpochStale,
            pb::ErrorCode::IdempotencyConflict,
            pb::ErrorCode::Internal,
        ] {
            assert!(!unknown(Some(code)), "{code:?}");
        }
    }

    #[test]
    fn a_renewal_comes_within_half_of_what_is_left_of_the_lease() {
        let (every, now) = (Duration::from_secs(5), Instant::now());
        assert_eq!(
            renewal_wait(every, now + Duration::from_secs(14), now),
            every
        );
        assert_eq!(
            renewal_wait(every, now + Duration::from_secs(4), now),
            Duration::from_secs(2)
        );
        assert_eq!(
            renewal_wait(every, now, now),
            RETRY_FIRST / 2,
            "never a busy loop"
        );
    }

    #[test]
    fn retries_are_spread_over_the_second_half_of_the_wait() {
        let wait = Duration::from_millis(1_000);
        let waits: Vec<Duration> = (0..200).map(|_| jittered(wait)).collect();
        assert!(
            waits.iter().all(|w| *w >= wait / 2 && *w < wait),
            "{waits:?}"
        );
        let (low, high) = waits
            .iter()
            .partition::<Vec<&Duration>, _>(|w| **w < wait * 3 / 4);
        // 200 fair draws put fewer than 50 on one side of the middle with negligible odds.
        assert!(
            low.len() > 50 && high.len() > 50,
            "{} / {}",
            low.len(),
            high.len()
        );
    }
}
