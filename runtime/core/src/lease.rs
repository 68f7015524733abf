//! The fencing lease state machine (spec S3), driven by an explicit `now` from the database clock.
//!
//! The ledger alone mints epochs: callers present either 0 (acquire afresh) or the epoch they
//! were given (renew). Every transition that hands the scope to a new holder — a new owner, or the
//! same workload instance starting afresh — increments the epoch by exactly one, so writes carrying
//! the previous epoch are refused from then on.

use crate::error::LedgerError;
use chrono::{DateTime, Duration, Utc};

/// Shortest lease a caller may ask for.
pub const LEASE_TTL_MS_MIN: u32 = 1_000;
/// Longest lease a caller may ask for: a crashed holder blocks its scope at most this long.
pub const LEASE_TTL_MS_MAX: u32 = 600_000;

/// A scope's lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    /// Tenant that owns the scope.
    pub tenant_id: String,
    /// Current holder.
    pub owner: String,
    /// Current epoch, >= 1.
    pub epoch: u64,
    /// When the lease lapses (database clock).
    pub expires_at: DateTime<Utc>,
}

/// What a caller asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireLease {
    /// Scope.
    pub scope_id: String,
    /// Tenant of the scope.
    pub tenant_id: String,
    /// Who asks.
    pub workload_instance_id: String,
    /// Requested lease length.
    pub ttl_ms: u32,
    /// 0 to acquire afresh, else the epoch held.
    pub expected_epoch: u64,
    /// Administrative takeover of an unexpired lease.
    pub force: bool,
    /// The caller's key for retries of this one acquire, unique per scope: a retry with the same
    /// fields gets the first answer and changes nothing (see [`AcquireLease::fingerprint`]).
    /// `None`: every acquire is a new one, so a retried acquire afresh raises the epoch again.
    pub request_id: Option<String>,
}

/// An acquire recorded with its request id, as a retry of it finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedAcquire {
    /// [`AcquireLease::fingerprint`] of the request that made it.
    pub request_sha256: String,
    /// What it was granted.
    pub grant: LeaseGrant,
}

/// Which transition happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// No lease existed: epoch 1.
    Acquired,
    /// Current owner renewed: epoch unchanged.
    Renewed,
    /// Same workload instance started afresh: epoch + 1.
    Restarted,
    /// Another owner's lease had expired: epoch + 1.
    TakenOver,
    /// Forced before expiry: epoch + 1.
    Forced,
}

impl LeaseOutcome {
    /// The outcome named `name` by [`LeaseOutcome::as_str`].
    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::Acquired,
            Self::Renewed,
            Self::Restarted,
            Self::TakenOver,
            Self::Forced,
        ]
        .into_iter()
        .find(|o| o.as_str() == name)
    }

    /// Name used in events.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Acquired => "acquired",
            Self::Renewed => "renewed",
            Self::Restarted => "restarted",
            Self::TakenOver => "taken_over",
            Self::Forced => "forced",
        }
    }
}

/// The granted lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseGrant {
    /// Transition taken.
    pub outcome: LeaseOutcome,
    /// The resulting state.
    pub state: LeaseState,
    /// Epoch before the transition (0 when there was no lease).
    pub previous_epoch: u64,
}

impl AcquireLease {
    /// sha256 over the canonical JSON of the fields a retry must repeat: all but the scope and the
    /// request id, which name the recorded acquire.
    pub fn fingerprint(&self) -> String {
        #[derive(serde::Serialize)]
        struct Fields<'a> {
            tenant_id: &'a str,
            workload_instance_id: &'a str,
            ttl_ms: u32,
            expected_epoch: u64,
            force: bool,
        }
        let fields = Fields {
            tenant_id: &self.tenant_id,
            workload_instance_id: &self.workload_instance_id,
            ttl_ms: self.ttl_ms,
            expected_epoch: self.expected_epoch,
            force: self.force,
        };
        crate::audit::canonical_sha256(&fields)
    }

    /// Decides the transition from `current` at `now`.
    ///
    /// # Errors
    /// - [`LedgerError::FencingScopeNotFound`] when the scope belongs to another tenant.
    /// - [`LedgerError::FencingEpochStale`] when `expected_epoch` is neither 0 nor current, or a
    ///   renewal is presented for a scope that has no lease.
    /// - [`LedgerError::FencingLeaseHeld`] when another owner's lease is unexpired and `force` is
    ///   not set.
    pub fn decide(
        &self,
        current: Option<&LeaseState>,
        now: DateTime<Utc>,
    ) -> Result<LeaseGrant, LedgerError> {
        let expires_at = now
            .checked_add_signed(Duration::milliseconds(i64::from(self.ttl_ms)))
            .unwrap_or(now);
        let grant = |outcome, epoch, previous_epoch| LeaseGrant {
            outcome,
            previous_epoch,
            state: LeaseState {
                tenant_id: self.tenant_id.clone(),
                owner: self.workload_instance_id.clone(),
                epoch,
                expires_at,
            },
        };
        let Some(current) = current else {
            if self.expected_epoch != 0 {
                return Err(self.stale(0));
            }
            return Ok(grant(LeaseOutcome::Acquired, 1, 0));
        };
        if current.tenant_id != self.tenant_id {
            return Err(LedgerError::FencingScopeNotFound(self.scope_id.clone()));
        }
        let next = current.epoch.saturating_add(1);
        let same_owner = current.owner == self.workload_instance_id;
        match self.expected_epoch {
            // Renewal keeps the epoch, even just after expiry: nobody else has held the scope.
            e if e == current.epoch && same_owner => {
                Ok(grant(LeaseOutcome::Renewed, current.epoch, current.epoch))
            }
            0 if same_owner => Ok(grant(LeaseOutcome::Restarted, next, current.epoch)),
            0 if current.expires_at <= now => {
                Ok(grant(LeaseOutcome::TakenOver, next, current.epoch))
            }
            0 if self.force => Ok(grant(LeaseOutcome::Forced, next, current.epoch)),
            0 => Err(LedgerError::FencingLeaseHeld {
                scope_id: self.scope_id.clone(),
                owner: current.owner.clone(),
            }),
            _ => Err(self.stale(current.epoch)),
        }
    }

    fn stale(&self, current: u64) -> LedgerError {
        LedgerError::FencingEpochStale {
            scope_id: self.scope_id.clone(),
            presented: self.expected_epoch,
            current,
        }
    }
}

/// Checks that a mutation's fencing token is current (spec S3: no stale writer after takeover).
/// New exposure (a reservation) also needs an unexpired lease; settling existing exposure
/// (commit, release) only needs the current epoch, so a holder whose renewal is late can still
/// return money rather than leak it.
///
/// Returns the lease that accepted the token.
///
/// # Errors
/// [`LedgerError::FencingScopeNotFound`], [`LedgerError::FencingEpochStale`] or
/// [`LedgerError::FencingLeaseExpired`].
pub fn check_fencing<'a>(
    scope_id: &str,
    tenant_id: &str,
    presented_epoch: u64,
    current: Option<&'a LeaseState>,
    require_unexpired_at: Option<DateTime<Utc>>,
) -> Result<&'a LeaseState, LedgerError> {
    let scope = current
        .filter(|s| s.tenant_id == tenant_id)
        .ok_or_else(|| LedgerError::FencingScopeNotFound(scope_id.to_owned()))?;
    if presented_epoch != scope.epoch {
        return Err(LedgerError::FencingEpochStale {
            scope_id: scope_id.to_owned(),
            presented: presented_epoch,
            current: scope.epoch,
        });
    }
    if let Some(now) = require_unexpired_at
        && scope.expires_at <= now
    {
        return Err(LedgerError::FencingLeaseExpired(scope_id.to_owned()));
    }
    Ok(scope)
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    fn now() -> DateTime<Utc> {
        DateTime::UNIX_EPOCH + Duration::days(20_000)
    }

    fn req(owner: &str, expected_epoch: u64, force: bool) -> AcquireLease {
        AcquireLease {
            scope_id: "s".into(),
            tenant_id: "t".into(),
            workload_instance_id: owner.into(),
            ttl_ms: 10_000,
            expected_epoch,
            force,
            request_id: None,
        }
    }

    #[test]
    fn a_retry_is_known_by_every_field_but_the_scope_and_request_id() {
        let first = AcquireLease {
            request_id: Some("r1".into()),
            ..req("w", 0, false)
        };
        let retry = AcquireLease {
            scope_id: "other".into(),
            request_id: Some("r2".into()),
            ..first.clone()
        };
        assert_eq!(first.fingerprint(), retry.fingerprint());
        for changed in [
            AcquireLease {
                tenant_id: "t2".into(),
                ..first.clone()
            },
            AcquireLease {
                workload_instance_id: "w2".into(),
                ..first.clone()
            },
            AcquireLease {
                ttl_ms: 10_001,
                ..first.clone()
            },
            req("w", 1, false),
            req("w", 0, true),
        ] {
            assert_ne!(first.fingerprint(), changed.fingerprint(), "{changed:?}");
        }
        assert_eq!(
            LeaseOutcome::parse(LeaseOutcome::TakenOver.as_str()),
            Some(LeaseOutcome::TakenOver)
        );
        assert_eq!(LeaseOutcome::parse("stolen"), None);
    }

    fn held(owner: &str, epoch: u64, expires_in_ms: i64) -> LeaseState {
        LeaseState {
            tenant_id: "t".into(),
            owner: owner.into(),
            epoch,
            expires_at: now() + Duration::milliseconds(expires_in_ms),
        }
    }

    #[test]
    fn first_acquire_is_epoch_one() {
        let g = req("a", 0, false).decide(None, now()).unwrap();
        assert_eq!(
            (g.outcome, g.state.epoch, g.previous_epoch),
            (LeaseOutcome::Acquired, 1, 0)
        );
        assert_eq!(g.state.expires_at, now() + Duration::seconds(10));
    }

    #[test]
    fn renew_keeps_epoch_even_just_after_expiry() {
        for expires_in in [5_000, -1] {
            let g = req("a", 3, false)
                .decide(Some(&held("a", 3, expires_in)), now())
                .unwrap();
            assert_eq!((g.outcome, g.state.epoch), (LeaseOutcome::Renewed, 3));
        }
    }

    #[test]
    fn restart_of_same_owner_bumps_epoch_once() {
        let g = req("a", 0, false)
            .decide(Some(&held("a", 3, 5_000)), now())
            .unwrap();
        assert_eq!((g.outcome, g.state.epoch), (LeaseOutcome::Restarted, 4));
    }

    #[test]
    fn takeover_only_after_expiry() {
        let live = held("a", 3, 1);
        let err = req("b", 0, false).decide(Some(&live), now()).unwrap_err();
        assert_eq!(err.code(), ErrorCode::FencingLeaseHeld);
        let expired = held("a", 3, 0);
        let g = req("b", 0, false).decide(Some(&expired), now()).unwrap();
        assert_eq!(
            (g.outcome, g.state.epoch, g.state.owner.as_str()),
            (LeaseOutcome::TakenOver, 4, "b")
        );
    }

    #[test]
    fn force_takes_over_before_expiry() {
        let g = req("b", 0, true)
            .decide(Some(&held("a", 3, 5_000)), now())
            .unwrap();
        assert_eq!((g.outcome, g.state.epoch), (LeaseOutcome::Forced, 4));
    }

    #[test]
    fn callers_cannot_mint_epochs() {
        // Presenting a future epoch, an old epoch, or another owner's epoch is refused.
        for (owner, presented) in [("a", 9), ("a", 2), ("b", 3)] {
            let err = req(owner, presented, true)
                .decide(Some(&held("a", 3, 5_000)), now())
                .unwrap_err();
            assert_eq!(
                err.code(),
                ErrorCode::FencingEpochStale,
                "{owner} {presented}"
            );
        }
        let err = req("a", 7, false).decide(None, now()).unwrap_err();
        assert_eq!(err.code(), ErrorCode::FencingEpochStale);
    }

    #[test]
    fn other_tenant_cannot_see_scope() {
        let mut r = req("a", 0, true);
        r.tenant_id = "other".into();
        let err = r.decide(Some(&held("a", 3, 5_000)), now()).unwrap_err();
        assert_eq!(err.code(), ErrorCode::FencingScopeNotFound);
    }

    #[test]
    fn fencing_check() {
        let s = held("a", 3, 1_000);
        assert_eq!(
            check_fencing("s", "t", 3, Some(&s), Some(now())),
            Ok(&s),
            "the lease that accepted it"
        );
        let code = |r: Result<&LeaseState, LedgerError>| r.unwrap_err().code();
        assert_eq!(
            code(check_fencing("s", "t", 2, Some(&s), None)),
            ErrorCode::FencingEpochStale
        );
        assert_eq!(
            code(check_fencing("s", "t", 4, Some(&s), None)),
            ErrorCode::FencingEpochStale
        );
        assert_eq!(
            code(check_fencing("s", "x", 3, Some(&s), None)),
            ErrorCode::FencingScopeNotFound
        );
        assert_eq!(
            code(check_fencing("s", "t", 3, None, None)),
            ErrorCode::FencingScopeNotFound
        );
        let later = now() + Duration::seconds(2);
        assert_eq!(
            code(check_fencing("s", "t", 3, Some(&s), Some(later))),
            ErrorCode::FencingLeaseExpired
        );
        // Settling needs only the current epoch.
        assert!(check_fencing("s", "t", 3, Some(&s), None).is_ok());
    }
}
