//! Leader election for singleton work (spec S1): the operator, and later the outbox forwarder,
//! TTL sweeper and pollers, do work only while they hold a lease.
//!
//! ```text
//! Standby ──lease free or expired (observed unchanged for a TTL)──► Leader ──renew every interval──► Leader
//!    ▲                                                                 │ renew failing past TTL − margin
//!    └──────────────── another holder renews ◄─────────────────────────┴──► Unknown (stop new work)
//! ```
//!
//! # Guarantees
//! - `is_leader()` is true only within a TTL (minus a margin) of a renewal the apiserver accepted,
//!   measured on this process's monotonic clock from before the request: a lost lease stops new
//!   work before the next poll.
//! - Takeover needs the previous holder's record to stay unchanged for a whole TTL as *observed
//!   locally* (client-go's rule), so clock skew between holders cannot shorten a lease.
//! - Writes use the Lease's resourceVersion, so two candidates cannot both win one round.

mod postgres;

pub use postgres::PgElector;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// `SPENDGUARD_LEADER_ELECTION_MODE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A coordination.k8s.io Lease.
    K8s,
    /// A row in PostgreSQL's `leader_leases` (outside Kubernetes).
    Postgres,
    /// No election: allowed only with exactly one replica (the chart enforces it).
    Disabled,
}

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Unknown mode name.
    #[error("unknown leader election mode {0:?} (k8s | postgres | disabled)")]
    UnknownMode(String),
    /// TTL not above the renew interval.
    #[error("leader ttl must exceed the renew interval")]
    TtlNotAboveRenew,
}

impl Mode {
    /// Parses `k8s`, `postgres` or `disabled`.
    ///
    /// # Errors
    /// [`ConfigError::UnknownMode`], never a silent default.
    pub fn parse(name: &str) -> Result<Self, ConfigError> {
        match name {
            "k8s" => Ok(Self::K8s),
            "postgres" => Ok(Self::Postgres),
            "disabled" => Ok(Self::Disabled),
            other => Err(ConfigError::UnknownMode(other.to_owned())),
        }
    }
}

/// Lease settings (`SPENDGUARD_LEADER_*`).
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Lease name (`SPENDGUARD_LEADER_LEASE_NAME`).
    pub lease_name: String,
    /// This candidate's identity (pod name).
    pub identity: String,
    /// `SPENDGUARD_LEADER_RENEW_INTERVAL_MS`.
    pub renew_interval: Duration,
    /// `SPENDGUARD_LEADER_TTL_MS`.
    pub ttl: Duration,
}

/// Leadership as work sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leadership {
    /// May do work until `valid_until`.
    Leader {
        /// Local monotonic deadline.
        valid_until: Instant,
    },
    /// Another candidate leads.
    Standby,
    /// Not known (startup, or the apiserver is unreachable): no work.
    Unknown,
}

/// A cheap view of leadership.
#[derive(Clone)]
pub struct LeaderHandle {
    state: watch::Receiver<Leadership>,
}

impl LeaderHandle {
    /// A handle that always leads (mode `disabled`, one replica).
    pub fn always() -> Self {
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        // A receiver keeps the last value after its sender is gone.
        let (_, state) = watch::channel(Leadership::Leader { valid_until: far });
        Self { state }
    }

    /// Whether work may start now.
    pub fn is_leader(&self) -> bool {
        matches!(*self.state.borrow(), Leadership::Leader { valid_until } if Instant::now() < valid_until)
    }

    /// The current state.
    pub fn state(&self) -> Leadership {
        *self.state.borrow()
    }

    /// Resolves once this candidate leads (at once if it does).
    ///
    /// # Errors
    /// [`ElectorGone`] when the elector task has ended (it panicked) and this candidate does not
    /// lead: nothing will ever make it lead, so the caller should stop rather than stand by for
    /// good.
    pub async fn led(&self) -> Result<(), ElectorGone> {
        let mut state = self.state.clone();
        loop {
            if self.is_leader() {
                return Ok(());
            }
            if state.changed().await.is_err() {
                return if self.is_leader() {
                    Ok(())
                } else {
                    Err(ElectorGone)
                };
            }
        }
    }

    /// Resolves once work may no longer start: at the moment the state leaves `Leader`, or
    /// its deadline passes on the monotonic clock, whichever comes first (not at the next
    /// poll, which could come after a successor took over).
    pub async fn lost(&self) {
        let mut state = self.state.clone();
        loop {
            let Leadership::Leader { valid_until } = *state.borrow_and_update() else {
                return;
            };
            if Instant::now() >= valid_until {
                return;
            }
            tokio::select! {
                // An elector gone (an error) disables this branch: the deadline still ends it.
                Ok(()) = state.changed() => {}
                () = tokio::time::sleep_until(valid_until) => return,
            }
        }
    }
}

/// What the candidate last saw of the Lease, and when.
struct Observation {
    record: (Option<String>, Option<MicroTime>),
    at: Instant,
}

/// Runs one candidate until the task is dropped.
pub struct Elector {
    api: Api<Lease>,
    config: LeaderConfig,
    state: watch::Sender<Leadership>,
    observed: Option<Observation>,
}

impl Elector {
    /// Creates a candidate and its handle.
    ///
    /// # Errors
    /// [`ConfigError::TtlNotAboveRenew`].
    pub fn new(
        client: kube::Client,
        config: LeaderConfig,
    ) -> Result<(Self, LeaderHandle), ConfigError> {
        if config.ttl <= config.renew_interval {
            return Err(ConfigError::TtlNotAboveRenew);
        }
        let api = Api::namespaced(client, &config.namespace);
        let (state, rx) = watch::channel(Leadership::Unknown);
        Ok((
            Self {
                api,
                config,
                state,
                observed: None,
            },
            LeaderHandle { state: rx },
        ))
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.config.ttl.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// One round: returns the new state, or `None` when the apiserver did not answer.
    async fn round(&mut self) -> Option<Leadership> {
        let sent_at = Instant::now();
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let me = self.config.identity.clone();
        let leader = |sent_at: Instant| Leadership::Leader {
            valid_until: sent_at + self.config.ttl - self.config.renew_interval / 2,
        };
        let existing = match self.api.get_opt(&self.config.lease_name).await {
            Ok(lease) => lease,
            Err(e) => {
                warn!(error = %e, "reading the leader lease failed");
                return None;
            }
        };
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.lease_name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(self.lease_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Some(leader(sent_at)),
                Err(kube::Error::Api(e)) if e.code == 409 => Some(Leadership::Standby),
                Err(e) => {
                    warn!(error = %e, "creating the leader lease failed");
                    None
                }
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let record = (spec.holder_identity.clone(), spec.renew_time.clone());
        let observed_at = match &self.observed {
            Some(o) if o.record == record => o.at,
            _ => Instant::now(),
        };
        self.observed = Some(Observation {
            record,
            at: observed_at,
        });
        let mine = spec.holder_identity.as_deref() == Some(me.as_str());
        let expired = observed_at.elapsed() >= self.config.ttl || spec.holder_identity.is_none();
        if !mine && !expired {
            return Some(Leadership::Standby);
        }
        let mut new_spec = spec.clone();
        new_spec.holder_identity = Some(me);
        new_spec.lease_duration_seconds = Some(self.lease_seconds());
        new_spec.renew_time = Some(now.clone());
        if !mine {
            new_spec.acquire_time = Some(now);
            new_spec.lease_transitions =
                Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        lease.spec = Some(new_spec);
        // replace() carries the resourceVersion we read: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.config.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                if !mine {
                    info!(identity = %self.config.identity, lease = %self.config.lease_name, "became leader");
                }
                Some(leader(sent_at))
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Some(Leadership::Standby),
            Err(e) => {
                warn!(error = %e, "renewing the leader lease failed");
                None
            }
        }
    }

    /// Runs rounds forever (drop the task to stop; the lease then lapses after its TTL).
    pub async fn run(mut self) {
        loop {
            let ttl = self.config.ttl;
            let next = bounded_round(ttl, self.round()).await;
            let current = *self.state.borrow();
            let new_state = next_state(next, current);
            if matches!(current, Leadership::Leader { .. })
                && !matches!(new_state, Leadership::Leader { .. })
            {
                warn!(identity = %self.config.identity, "lost leadership; new work stops");
            }
            self.state.send_replace(new_state);
            tokio::time::sleep(self.config.renew_interval).await;
        }
    }
}

/// The elector task ended: its candidate can never lead again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the leader elector stopped")]
pub struct ElectorGone;

/// Runs one round, bounded by `ttl`: a request the apiserver or database never answers (the
/// clients have no read timeout) would otherwise freeze the state, and the candidate could not
/// lead again until the connection broke.
async fn bounded_round(
    ttl: Duration,
    round: impl std::future::Future<Output = Option<Leadership>>,
) -> Option<Leadership> {
    match tokio::time::timeout(ttl, round).await {
        Ok(next) => next,
        Err(_) => {
            warn!(
                timeout_ms = ttl.as_millis(),
                "a leader election round did not finish in time"
            );
            None
        }
    }
}

/// Why an elector could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad timings.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Mode `k8s` without a Kubernetes client.
    #[error("leader election mode k8s needs a Kubernetes client")]
    KubeMissing,
    /// Mode `postgres` without a database.
    #[error("leader election mode postgres needs a database URL (SPENDGUARD_LEADER_DATABASE_URL)")]
    DatabaseMissing,
}

/// Starts the elector `mode` names (in the background) and returns its handle; `disabled`
/// always leads. Every singleton (operator, workers) starts its lease here.
///
/// # Errors
/// [`StartError`] for bad timings or the missing client of the mode.
pub fn start(
    mode: Mode,
    config: LeaderConfig,
    kube: Option<kube::Client>,
    pool: Option<sqlx::PgPool>,
) -> Result<LeaderHandle, StartError> {
    Ok(match mode {
        Mode::Disabled => LeaderHandle::always(),
        Mode::K8s => {
            let (elector, handle) = Elector::new(kube.ok_or(StartError::KubeMissing)?, config)?;
            tokio::spawn(elector.run());
            handle
        }
        Mode::Postgres => {
            let pool = pool.ok_or(StartError::DatabaseMissing)?;
            let (elector, handle) = PgElector::new(pool, config)?;
            tokio::spawn(elector.run());
            handle
        }
    })
}

/// The state after a round: its answer, or with no answer, a leader keeps its local deadline and
/// then stops; others stay unknown.
fn next_state(next: Option<Leadership>, current: Leadership) -> Leadership {
    match (next, current) {
        (Some(state), _) => state,
        (None, Leadership::Leader { valid_until }) if Instant::now() < valid_until => current,
        (None, _) => Leadership::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::{LeaderHandle, Leadership};
    use std::time::Duration;
    use tokio::sync::watch;
    use tokio::time::{Instant, timeout};

    fn handle(state: Leadership) -> (watch::Sender<Leadership>, LeaderHandle) {
        let (sender, state) = watch::channel(state);
        (sender, LeaderHandle { state })
    }

    fn leader_for(millis: u64) -> Leadership {
        Leadership::Leader {
            valid_until: Instant::now() + Duration::from_millis(millis),
        }
    }

    #[tokio::test]
    async fn leadership_is_lost_when_another_leads_not_at_a_later_poll() {
        let (sender, handle) = handle(leader_for(60_000));
        let lost = tokio::spawn({
            let handle = handle.clone();
            async move { handle.lost().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!lost.is_finished(), "lost while the lease is valid");
        sender.send_replace(Leadership::Standby);
        timeout(Duration::from_secs(5), lost)
            .await
            .expect("noticed the change")
            .unwrap();
    }

    #[tokio::test]
    async fn leadership_is_lost_at_its_deadline_unless_renewed() {
        // Deadlines of 1.5 s renewed every 0.2 s: a loaded machine's late wake-ups stay far
        // inside them.
        let (sender, handle) = handle(leader_for(1_500));
        let started = Instant::now();
        let lost = tokio::spawn({
            let handle = handle.clone();
            async move { handle.lost().await }
        });
        // Renewals move the deadline: still leading past the first one.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            sender.send_replace(leader_for(1_500));
        }
        assert!(!lost.is_finished(), "lost although renewed");
        let last_renewal = Instant::now();
        timeout(Duration::from_secs(10), lost)
            .await
            .expect("lost at the deadline, with nothing sent")
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(2_000));
        assert!(last_renewal.elapsed() >= Duration::from_millis(1_400));
        assert!(!handle.is_leader());
    }

    #[tokio::test]
    async fn a_candidate_leads_once_the_state_says_so() {
        let (sender, handle) = handle(Leadership::Unknown);
        let led = tokio::spawn({
            let handle = handle.clone();
            async move { handle.led().await }
        });
        sender.send_replace(Leadership::Standby);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!led.is_finished(), "led as a standby");
        sender.send_replace(leader_for(60_000));
        timeout(Duration::from_secs(5), led)
            .await
            .expect("noticed the lead")
            .unwrap()
            .unwrap();
        // A handle that leads already resolves at once, and so does one that lost already.
        timeout(Duration::from_millis(100), handle.led())
            .await
            .unwrap()
            .unwrap();
        sender.send_replace(Leadership::Unknown);
        timeout(Duration::from_millis(100), handle.lost())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_candidate_whose_elector_stopped_is_told_so() {
        let (sender, handle) = handle(Leadership::Standby);
        drop(sender);
        let gone = timeout(Duration::from_secs(5), handle.led())
            .await
            .expect("not left waiting for good");
        assert_eq!(gone, Err(super::ElectorGone));
        // One that never needs an elector leads.
        assert_eq!(LeaderHandle::always().led().await, Ok(()));
    }

    #[tokio::test]
    async fn a_round_that_never_finishes_counts_as_no_answer() {
        let next = timeout(
            Duration::from_secs(5),
            super::bounded_round(
                Duration::from_millis(100),
                std::future::pending::<Option<Leadership>>(),
            ),
        )
        .await
        .expect("the round is bounded");
        assert_eq!(next, None);
        let answered =
            super::bounded_round(Duration::from_secs(5), async { Some(Leadership::Standby) }).await;
        assert_eq!(answered, Some(Leadership::Standby));
    }
}
