//! The data path's reads on the request path (the fencing check a sidecar makes before it admits
//! a call inside a credit): one PostgreSQL session of their own.
//!
//! Why not sqlx's pool: it pings a connection when it is released, a second round trip (and a
//! second wake-up of the backend) for every one-row read. Why not the writer's session: a read
//! would queue behind the batches in flight. tokio-postgres pipelines the reads of concurrent
//! callers on the one session, each its own implicit transaction, so a read sees what was
//! committed before it started.

use super::tls::SessionConfig;
use crate::error::Error;
use chrono::{DateTime, Utc};
use spendguard_core::lease::LeaseState;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, Row, Statement};
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

/// After a failed open, reads fail at once for this long instead of each trying to connect
/// (a database that is down or unreachable would otherwise queue every check behind a connect).
const REOPEN_AFTER: Duration = Duration::from_secs(1);

/// The session slot: the open session, or when opening last failed.
#[derive(Default)]
struct Slot {
    session: Option<Arc<Session>>,
    failed_open_at: Option<Instant>,
}

/// The read session, opened on first use and again after it broke.
pub(super) struct Reads {
    config: SessionConfig,
    slot: tokio::sync::Mutex<Slot>,
    /// A read not answered within this counts as a broken session (a half-open connection).
    answer_deadline: Duration,
}

impl Reads {
    /// Reads that connect with `config` when first needed.
    pub(super) fn new(config: SessionConfig, answer_deadline: Duration) -> Self {
        Self {
            config,
            slot: tokio::sync::Mutex::new(Slot::default()),
            answer_deadline,
        }
    }

    /// The fencing lease of `scope_id` as committed now (`None` for an unknown scope), and the
    /// database clock's now. Any failure drops the session (the next read opens another, which
    /// also prepares the statement again after a migration). A read that failed because the
    /// session broke (since its last use, as after a database restart, or not answering) is
    /// tried once more on a new session.
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
            let (failure, session_broke) = match read {
                Ok(Ok(row)) => return lease_of(&row),
                Ok(Err(e)) => {
                    let broke = e.as_db_error().is_none_or(|db| session_ended(db.code()));
                    (Error::from(e), broke)
                }
                Err(_) => (
                    Error::Database(format!(
                        "no answer from the read session within {:?}",
                        self.answer_deadline
                    )),
                    true,
                ),
            };
            self.forget(&session).await;
            if tried_again || !session_broke {
                return Err(failure);
            }
            tried_again = true;
        }
    }

    async fn session(&self) -> Result<Arc<Session>, Error> {
        let mut slot = self.slot.lock().await;
        if let Some(session) = slot.session.as_ref().filter(|s| !s.client.is_closed()) {
            return Ok(Arc::clone(session));
        }
        slot.session = None;
        if slot
            .failed_open_at
            .is_some_and(|at| at.elapsed() < REOPEN_AFTER)
        {
            return Err(Error::Database(
                "read session unavailable; retrying shortly".into(),
            ));
        }
        // Connecting and preparing are bounded like a read, so a database that does not answer
        // holds the slot (and the reads queued on it) for one deadline at most.
        let opened = tokio::time::timeout(self.answer_deadline, self.open()).await;
        match opened {
            Ok(Ok(session)) => {
                let session = Arc::new(session);
                slot.session = Some(Arc::clone(&session));
                slot.failed_open_at = None;
                Ok(session)
            }
            Ok(Err(e)) => {
                warn!(error = %e, "cannot open the read session");
                slot.failed_open_at = Some(Instant::now());
                Err(e)
            }
            Err(_) => {
                slot.failed_open_at = Some(Instant::now());
                Err(Error::Database(format!(
                    "the read session did not open within {:?}",
                    self.answer_deadline
                )))
            }
        }
    }

    async fn open(&self) -> Result<Session, Error> {
        let (client, connection) = self.config.connect().await.map_err(Error::from)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                warn!(error = %e, "read session closed");
            }
        });
        let fencing_lease = client.prepare(FENCING_LEASE).await.map_err(Error::from)?;
        Ok(Session {
            client,
            fencing_lease,
        })
    }

    /// Drops `session` if it is still the current one, so the next read opens another (dropping
    /// the client closes a half-open connection too).
    async fn forget(&self, session: &Arc<Session>) {
        let mut slot = self.slot.lock().await;
        if slot
            .session
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            slot.session = None;
        }
    }
}

/// Whether a database error says the session itself ended (connection exceptions, class 08;
/// operator intervention such as an administrator's shutdown, class 57), so another session
/// may answer: unlike a refusal of the statement.
fn session_ended(code: &tokio_postgres::error::SqlState) -> bool {
    let code = code.code();
    code.starts_with("08") || code.starts_with("57")
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
