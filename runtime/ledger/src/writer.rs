//! Group commit: one task owns the write path and runs queued commands in shared transactions.
//!
//! Why: a hot budget row can be locked by one transaction at a time, and each commit waits for a
//! WAL flush. Running up to [`BATCH_COMMANDS_MAX`] commands per transaction amortises the flush and
//! the lock over the whole batch, while the planner still decides them one by one in arrival order,
//! so no batch can overspend. A batch that fails on a database invariant is retried command by
//! command, so one bad command cannot fail its neighbours.

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::store::{BatchTimings, ProducerClaim, Store};
use spendguard_core::plan::{Command, Outcome};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info_span};

/// Most commands in one transaction: large enough to amortise a WAL flush, small enough that one
/// batch stays well under a millisecond of planning and a few of SQL.
pub const BATCH_COMMANDS_MAX: usize = 256;

type Reply = oneshot::Sender<Result<Outcome>>;

/// Handle to submit commands to the writer.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<(Command, Reply)>,
}

impl Writer {
    /// Starts the writer task. It stops when every handle is dropped, after draining the queue.
    pub fn spawn(
        store: Store,
        claim: watch::Receiver<Option<ProducerClaim>>,
        queue_capacity: usize,
        metrics: Metrics,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, receiver) = mpsc::channel(queue_capacity);
        let task = tokio::spawn(run(store, claim, receiver, metrics));
        (Self { queue }, task)
    }

    /// Submits one command and waits for its outcome.
    ///
    /// # Errors
    /// [`Error::Overloaded`] when the queue is full, [`Error::ShuttingDown`] when the writer is
    /// gone, or the command's own error.
    pub async fn submit(&self, command: Command) -> Result<Outcome> {
        let (reply, outcome) = oneshot::channel();
        self.queue.try_send((command, reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Overloaded,
            mpsc::error::TrySendError::Closed(_) => Error::ShuttingDown,
        })?;
        outcome.await.map_err(|_| Error::ShuttingDown)?
    }
}

async fn run(
    store: Store,
    claim: watch::Receiver<Option<ProducerClaim>>,
    mut receiver: mpsc::Receiver<(Command, Reply)>,
    metrics: Metrics,
) {
    let mut batch = Vec::with_capacity(BATCH_COMMANDS_MAX);
    while receiver.recv_many(&mut batch, BATCH_COMMANDS_MAX).await > 0 {
        let (commands, replies): (Vec<Command>, Vec<Reply>) = batch.drain(..).unzip();
        let current = claim.borrow().clone();
        let size = commands.len();
        let started = Instant::now();
        let span = info_span!("ledger_batch", commands = size);
        let (results, timings) = execute(&store, current.as_ref(), &commands)
            .instrument(span)
            .await;
        metrics.observe_batch(size, started.elapsed(), timings);
        for (reply, result) in replies.into_iter().zip(results) {
            // The caller may have gone away (deadline); its command is durable either way.
            let _ = reply.send(result);
        }
    }
    debug!("ledger writer stopped");
}

async fn execute(
    store: &Store,
    claim: Option<&ProducerClaim>,
    commands: &[Command],
) -> (Vec<Result<Outcome>>, Option<BatchTimings>) {
    let Some(claim) = claim else {
        let refused = commands
            .iter()
            .map(|_| Err(Error::ProducerInstanceConflict("unclaimed".into())));
        return (refused.collect(), None);
    };
    match store.run_batch(claim, commands).await {
        Ok((outcomes, timings)) => (
            outcomes
                .into_iter()
                .map(|o| o.map_err(Error::from))
                .collect(),
            Some(timings),
        ),
        Err(e) if e.is_isolatable() && commands.len() > 1 => {
            debug!(error = %e, commands = commands.len(), "batch failed; retrying commands singly");
            let mut results = Vec::with_capacity(commands.len());
            for command in commands {
                let result = match store.run_batch(claim, std::slice::from_ref(command)).await {
                    Ok((mut outcomes, _)) => outcomes.pop().map_or_else(
                        || Err(Error::Invariant("no outcome".into())),
                        |o| o.map_err(Error::from),
                    ),
                    Err(e) => Err(e),
                };
                if let Err(Error::Invariant(reason)) = &result {
                    error!(%reason, "ledger invariant violated; command refused");
                }
                results.push(result);
            }
            (results, None)
        }
        Err(e) => {
            if let Error::Invariant(reason) = &e {
                error!(%reason, "ledger invariant violated; batch refused");
            }
            (commands.iter().map(|_| Err(e.clone())).collect(), None)
        }
    }
}
