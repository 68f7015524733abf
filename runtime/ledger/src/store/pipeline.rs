//! The cached path's own PostgreSQL session, whose statements are pipelined.
//!
//! Why a session of its own, outside sqlx's pool:
//! - the pool pings a connection when it is acquired and again when it is released, so a
//!   one-statement batch paid three round trips instead of one;
//! - sqlx cannot send a statement before the previous one is answered. Here the writer sends
//!   batch N+1 while batch N is still running: PostgreSQL executes a session's statements in the
//!   order they were sent, so N+1 (planned on N's effects) starts the moment N commits, instead
//!   of a round trip and a planning step later. If N fails, N+1's guard fails too (its producer
//!   compare-and-set expects N's sequences), so nothing is written out of order.
//!
//! Each statement is sent with its own Sync, so it is its own implicit transaction.
//!
//! A session that broke, or whose answer did not come within the deadline (a half-open
//! connection), is replaced only once its backend is confirmed gone: what it was sent may still
//! be running there, since the backend does not know the client gave up
//! ([`Pipeline::broken_backend`]; `Store::end_broken_cached_session` ends it, before the next
//! send and before the writer runs those batches again). Until then sends fail and batches take
//! the load path. A failed open is retried at most once per [`REOPEN_AFTER`].

use super::tls::SessionConfig;
use crate::error::Error;
use futures_util::StreamExt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};
use tracing::warn;

/// The answer to one sent statement: `Ok` once it committed.
pub type Sent = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// Parameters that can be lent to one execution of the statement.
pub(super) trait Params: Send + Sync + 'static {
    /// The statement's parameters, in order.
    fn refs(&self) -> Vec<&(dyn ToSql + Sync)>;
}

/// How long after a failed open the next batch tries again.
const REOPEN_AFTER: Duration = Duration::from_secs(1);

/// Statements (all with the same parameter types), prepared once per session and executed by
/// [`Pipeline::send`] on that one session, each behind the ones sent before it.
pub(super) struct Pipeline {
    config: SessionConfig,
    /// The statements, prepared on every session opened; [`Pipeline::send`] names one by index.
    sqls: &'static [String],
    types: &'static [Type],
    answer_deadline: Duration,
    open: Option<Open>,
    failed_open_at: Option<Instant>,
}

struct Open {
    client: Arc<Client>,
    statements: Vec<Statement>,
    /// Set by an answer that found the connection broken or never came.
    broken: Arc<AtomicBool>,
    backend: Backend,
}

/// The server process of a session: its pid, and its start time, since a pid may be reused by a
/// later backend once this one is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Backend {
    pub(super) pid: i32,
    /// `backend_start` in microseconds since the Unix epoch.
    pub(super) started_micros: i64,
}

/// The session's own backend, as `pg_stat_activity` names it.
const OWN_BACKEND: &str = "SELECT pid, (extract(epoch FROM backend_start) * 1000000)::int8 \
                           FROM pg_stat_activity WHERE pid = pg_backend_pid()";

impl Pipeline {
    /// A pipeline that connects with `config` on first use and prepares `sqls` with `types`; an
    /// answer that takes longer than `answer_deadline` counts as a broken connection.
    pub(super) fn new(
        config: SessionConfig,
        sqls: &'static [String],
        types: &'static [Type],
        answer_deadline: Duration,
    ) -> Self {
        Self {
            config,
            sqls,
            types,
            answer_deadline,
            open: None,
            failed_open_at: None,
        }
    }

    /// Sets how long an answer may take before the session counts as broken.
    pub(super) fn set_answer_deadline(&mut self, answer_deadline: Duration) {
        self.answer_deadline = answer_deadline;
    }

    /// The backend of the session if it broke and has not been replaced yet: statements sent to
    /// it may still be running there.
    pub(super) fn broken_backend(&self) -> Option<Backend> {
        self.open
            .as_ref()
            .filter(|o| o.client.is_closed() || o.broken.load(Ordering::Relaxed))
            .map(|o| o.backend)
    }

    /// Drops a broken session, once its backend is gone; the next send opens a new one. (Dropping
    /// the client closes a half-open connection too.)
    pub(super) fn forget_broken(&mut self) {
        if self.broken_backend().is_some() {
            self.open = None;
        }
    }

    /// Sends one execution behind any still in flight and returns its answer, to be awaited
    /// (in sending order) later.
    ///
    /// # Errors
    /// [`Error::Database`] when the session cannot be opened.
    pub(super) async fn send<P: Params>(
        &mut self,
        statement: usize,
        params: P,
    ) -> Result<Sent, Error> {
        let deadline = self.answer_deadline;
        let open = self.open().await?;
        let client = Arc::clone(&open.client);
        let statement = open
            .statements
            .get(statement)
            .ok_or_else(|| Error::Invariant(format!("no cached statement {statement}")))?
            .clone();
        let broken = Arc::clone(&open.broken);
        let mut sent: Sent = Box::pin(async move {
            let answer = tokio::time::timeout(deadline, async {
                let refs = params.refs();
                let rows = client.query_raw(&statement, refs).await?;
                let mut rows = std::pin::pin!(rows);
                while let Some(row) = rows.next().await {
                    row?;
                }
                Ok::<(), tokio_postgres::Error>(())
            })
            .await;
            match answer {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    if e.as_db_error().is_none() {
                        broken.store(true, Ordering::Relaxed);
                    }
                    Err(Error::from(e))
                }
                Err(_) => {
                    broken.store(true, Ordering::Relaxed);
                    Err(Error::Database(format!(
                        "no answer from the cached-path session within {deadline:?}"
                    )))
                }
            }
        });
        // The first poll encodes the statement and queues it on the connection; it then waits for
        // the server. Polling here keeps sending order equal to call order.
        let first = std::future::poll_fn(|cx| Poll::Ready(sent.as_mut().poll(cx))).await;
        if let Poll::Ready(result) = first {
            return Ok(Box::pin(std::future::ready(result)));
        }
        Ok(sent)
    }

    async fn open(&mut self) -> Result<&Open, Error> {
        if self.broken_backend().is_some() {
            // Not replaced here: what it was sent may still run on its backend, which
            // `Store::end_broken_cached_session` ends first, then calls `forget_broken`.
            return Err(Error::Database(
                "cached-path session broken; it is ended before a new one opens".into(),
            ));
        }
        if self.open.is_none() {
            if self
                .failed_open_at
                .is_some_and(|at| at.elapsed() < REOPEN_AFTER)
            {
                return Err(Error::Database(
                    "cached-path session unavailable; retrying shortly".into(),
                ));
            }
            match self.connect().await {
                Ok(open) => {
                    self.open = Some(open);
                    self.failed_open_at = None;
                }
                Err(e) => {
                    warn!(error = %e, "cannot open the cached-path session; batches take the load path");
                    self.failed_open_at = Some(Instant::now());
                    return Err(e);
                }
            }
        }
        self.open
            .as_ref()
            .ok_or_else(|| Error::Invariant("cached-path session not open".into()))
    }

    async fn connect(&self) -> Result<Open, Error> {
        let (client, connection) = self.config.connect().await.map_err(Error::from)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                warn!(error = %e, "cached-path session closed");
            }
        });
        let mut statements = Vec::with_capacity(self.sqls.len());
        for sql in self.sqls {
            statements.push(
                client
                    .prepare_typed(sql, self.types)
                    .await
                    .map_err(Error::from)?,
            );
        }
        let own = client
            .query_one(OWN_BACKEND, &[])
            .await
            .map_err(Error::from)?;
        Ok(Open {
            client: Arc::new(client),
            statements,
            broken: Arc::new(AtomicBool::new(false)),
            backend: Backend {
                pid: own.try_get(0).map_err(Error::from)?,
                started_micros: own.try_get(1).map_err(Error::from)?,
            },
        })
    }
}
