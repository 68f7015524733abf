//! Mode `postgres` (spec S1's non-Kubernetes fallback): the lease is a row in `leader_leases`,
//! acquired or renewed by one compare-and-set statement on the database clock. The row lock the
//! statement takes serialises candidates, so two cannot win one round.
//!
//! Local validity follows the same rule as the k8s elector: counted from before the request,
//! minus half a renew interval, so a lost lease stops new work before the database could hand it
//! to someone else (`expires_at` is set from the database's `now()`, which is later than the
//! local send time).

use crate::{ConfigError, LeaderConfig, LeaderHandle, Leadership, next_state};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

const ACQUIRE: &str = "
INSERT INTO leader_leases AS l (lease_name, holder, acquired_at, renewed_at, expires_at, transitions)
VALUES ($1, $2, now(), now(), now() + make_interval(secs => $3::double precision / 1000), 0)
ON CONFLICT (lease_name) DO UPDATE
   SET holder = EXCLUDED.holder,
       acquired_at = CASE WHEN l.holder = EXCLUDED.holder THEN l.acquired_at ELSE now() END,
       renewed_at = now(),
       expires_at = EXCLUDED.expires_at,
       transitions = l.transitions + CASE WHEN l.holder = EXCLUDED.holder THEN 0 ELSE 1 END
 WHERE l.holder = EXCLUDED.holder OR l.expires_at <= now()
RETURNING transitions";

/// A candidate for a lease kept in PostgreSQL.
pub struct PgElector {
    pool: PgPool,
    config: LeaderConfig,
    state: watch::Sender<Leadership>,
}

impl PgElector {
    /// Creates a candidate and its handle. The `leader_leases` table comes with the ledger's
    /// migrations (`spendguard migrate`).
    ///
    /// # Errors
    /// [`ConfigError::TtlNotAboveRenew`].
    pub fn new(pool: PgPool, config: LeaderConfig) -> Result<(Self, LeaderHandle), ConfigError> {
        if config.ttl <= config.renew_interval {
            return Err(ConfigError::TtlNotAboveRenew);
        }
        let (state, rx) = watch::channel(Leadership::Unknown);
        Ok((
            Self {
                pool,
                config,
                state,
            },
            LeaderHandle { state: rx },
        ))
    }

    /// One round: the new state, or `None` when the database did not answer.
    async fn round(&self) -> Option<Leadership> {
        let sent_at = Instant::now();
        let ttl_ms = i64::try_from(self.config.ttl.as_millis()).unwrap_or(i64::MAX);
        let won: Result<Option<i64>, sqlx::Error> = sqlx::query_scalar(ACQUIRE)
            .bind(&self.config.lease_name)
            .bind(&self.config.identity)
            .bind(ttl_ms)
            .fetch_optional(&self.pool)
            .await;
        match won {
            Ok(Some(_)) => Some(Leadership::Leader {
                valid_until: sent_at + self.config.ttl - self.config.renew_interval / 2,
            }),
            Ok(None) => Some(Leadership::Standby),
            Err(e) => {
                warn!(error = %e, "renewing the leader lease in PostgreSQL failed");
                None
            }
        }
    }

    /// Runs rounds forever (drop the task to stop; the lease then lapses after its TTL).
    pub async fn run(self) {
        loop {
            let next = super::bounded_round(self.config.ttl, self.round()).await;
            let current = *self.state.borrow();
            let new_state = next_state(next, current);
            if !matches!(current, Leadership::Leader { .. })
                && matches!(new_state, Leadership::Leader { .. })
            {
                info!(identity = %self.config.identity, lease = %self.config.lease_name, "became leader");
            }
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
