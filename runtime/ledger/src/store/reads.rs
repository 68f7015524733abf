//! The data path's reads on the request path (the fencing check a sidecar makes before it admits
//! a call inside a credit): one PostgreSQL session of their own.
//!
//! Why not sqlx's pool: it pings a connection when it is released, a second round trip (and a
//! second wake-up of the backend) for every one-row read. Why not the writer's session: a read
//! would queue behind the batches in flight. tokio-postgres pipelines the reads of concurrent
//! callers on the one session, each its own implicit transaction, so a read sees what was
//! committed before it started.

use crate::error::Error;
use chrono::{DateTime, Utc};
use spendguard_core::lease::LeaseState;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::{Client, Config, NoTls, Row, Statement};
use tracing::warn;

/// The scope's lease, if the scope exists, and the database clock, in one row.
const FENCING_LEASE: &str =
    "SELECT now() AS now, s.tenant_id, s.owner_workload_id, s.epoch, s.expires_at
                               FROM (SELECT 1) AS one
                               LEFT JOIN fencing_scopes AS s ON s.scope_id = $1";

/// An open session and its prepared statements.
struct Session {
    client: Client,
    fencing_lease: Statement,
}

/// The read session, opened on first use and again after it broke.
pub(super) struct Reads {
    config: Config,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    /// A read not answered within this counts as a broken session (a half-open connection).
    answer_deadline: Duration,
}

impl Reads {
    /// Reads that connect with `config` when first needed.
    pub(super) fn new(config: Config, answer_deadline: Duration) -> Self {
        Self {
            config,
            session: tokio::sync::Mutex::new(None),
            answer_deadline,
        }
    }

    /// The fencing lease of `scope_id` as committed now (`None` for an unknown scope), and the
    /// database clock's now. A read that fails for a reason other than the database's own
    /// refusal (a session broken since its last use, as after a database restart, or one that
    /// does not answer) is tried once more on a new session.
    ///
    /// # Errors
    /// [`Error::Database`] when the session cannot be opened or both reads fail.
    pub(super) async fn fencing_lease(
        &self,
        scope_id: &str,
    ) -> Result<(Option<LeaseState>, DateTime<Utc>), Error> {
        let mut tried_again = false;
        loop {
            let session = self.session().await?;
            let read = tokio::time::timeout(
                self.answer_deadline,
                session
                    .client
                    .query_one(&session.fencing_lease, &[&scope_id]),
            )
            .await;
            let failure = match read {
                Ok(Ok(row)) => return lease_of(&row),
                Ok(Err(e)) if e.as_db_error().is_some() => return Err(Error::from(e)),
                Ok(Err(e)) => Error::from(e),
                Err(_) => Error::Database(format!(
                    "no answer from the read session within {:?}",
                    self.answer_deadline
                )),
            };
            self.forget(&session).await;
            if tried_again {
                return Err(failure);
            }
            tried_again = true;
        }
    }

    async fn session(&self) -> Result<Arc<Session>, Error> {
        let mut slot = self.session.lock().await;
        if let Some(session) = slot.as_ref().filter(|s| !s.client.is_closed()) {
            return Ok(Arc::clone(session));
        }
        let (client, connection) = self.config.connect(NoTls).await.map_err(Error::from)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                warn!(error = %e, "read session closed");
            }
        });
        let fencing_lease = client.prepare(FENCING_LEASE).await.map_err(Error::from)?;
        let session = Arc::new(Session {
            client,
            fencing_lease,
        });
        *slot = Some(Arc::clone(&session));
        Ok(session)
    }

    /// Drops `session` if it is still the current one, so the next read opens another (dropping
    /// the client closes a half-open connection too).
    async fn forget(&self, session: &Arc<Session>) {
        let mut slot = self.session.lock().await;
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, session)) {
            *slot = None;
        }
    }
}

fn lease_of(row: &Row) -> Result<(Option<LeaseState>, DateTime<Utc>), Error> {
    let now: DateTime<Utc> = row.try_get("now").map_err(Error::from)?;
    let Some(epoch) = row
        .try_get::<_, Option<i64>>("epoch")
        .map_err(Error::from)?
    else {
        return Ok((None, now));
    };
    let lease = LeaseState {
        tenant_id: row.try_get("tenant_id").map_err(Error::from)?,
        owner: row.try_get("owner_workload_id").map_err(Error::from)?,
        epoch: u64::try_from(epoch)
            .map_err(|_| Error::Invariant(format!("stored epoch {epoch} is negative")))?,
        expires_at: row.try_get("expires_at").map_err(Error::from)?,
    };
    Ok((Some(lease), now))
}
