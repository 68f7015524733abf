//! Group commit: one task owns the write path and runs queued commands in shared transactions.
//!
//! Why: a hot budget row can be locked by one transaction at a time, and each commit waits for a
//! WAL flush. Running up to [`BATCH_COMMANDS_MAX`] commands per transaction amortises the flush and
//! the lock over the whole batch, while the planner still decides them one by one in arrival order,
//! so no batch can overspend. A batch that fails on a database invariant is retried command by
//! command, so one bad command cannot fail its neighbours.
//!
//! Hot batches go out on the cached path (`cache.rs`) and are pipelined: while one runs in
//! PostgreSQL, the next gathers until it is as large, then is planned on its effects and sent
//! behind it on the same session, so the database can start it the moment the running one
//! commits; a next batch that stays smaller goes once nothing is in flight, so moderate rates
//! make fewer, fuller statements (docs/design/ledger-cached-path.md).
//!
//! Commands nobody waits on ([`Urgency::Deferrable`]: settlements and credit draws a sidecar
//! sends in the background) may be held up to the defer window so that fewer, larger
//! transactions carry them; the first urgent command sends whatever is held with it
//! (docs/design/deferrable-commands.md).

use crate::cache::HotCache;
use crate::error::{Error, Result};
use crate::metrics::BatchPath;
use crate::metrics::Metrics;
use crate::store::{BatchTimings, Committed, ProducerClaim, ProducerCursor, Sent, Store};
use spendguard_core::plan::{Command, Outcome};
use std::collections::VecDeque;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info_span, warn};

/// Most commands in one transaction: large enough to amortise a WAL flush, small enough that one
/// batch stays well under a millisecond of planning and a few of SQL.
pub const BATCH_COMMANDS_MAX: usize = 256;

/// Most commands a held batch of deferrable commands waits for: past it the batch goes out even
/// inside its window, so one statement stays a few milliseconds of SQL at most.
pub const HELD_COMMANDS_MAX: usize = 32;

type Reply = oneshot::Sender<Result<Outcome>>;

/// How soon a command's caller needs its answer. Never changes the outcome, only when the
/// command's transaction starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// Someone waits on the answer: it goes out with the next batch.
    Now,
    /// Nobody waits on it for anything user-visible (a settlement or credit draw sent in the
    /// background): it may wait up to the defer window for others to share its transaction.
    Deferrable,
}

/// One command waiting for the writer.
struct Queued {
    command: Command,
    reply: Reply,
    urgency: Urgency,
    /// When it was submitted: a held batch leaves at most the defer window after its first.
    submitted: Instant,
}

/// Handle to submit commands to the writer.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Queued>,
}

/// How the writer forms batches.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Longest a batch waits for stragglers when the previous batch was larger.
    pub linger_for: std::time::Duration,
    /// Longest a batch of deferrable commands only is held for more (zero: never held).
    pub defer_for: std::time::Duration,
    /// Cached batches in flight at once (at least one).
    pub pipeline_depth: usize,
}

impl Writer {
    /// Starts the writer task. It stops when every handle is dropped, after draining the queue.
    /// Once `stopping` turns true (the ledger is shutting down), nothing is held any more: the
    /// RPCs waiting on held commands must end for the servers to stop, and the queue closes only
    /// after that.
    pub fn spawn(
        store: Store,
        claim: watch::Receiver<Option<ProducerClaim>>,
        queue_capacity: usize,
        (batching, stopping): (Batching, watch::Receiver<bool>),
        metrics: Metrics,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, receiver) = mpsc::channel(queue_capacity);
        let batching = Batching {
            pipeline_depth: batching.pipeline_depth.max(1),
            ..batching
        };
        let task = tokio::spawn(run(store, claim, receiver, (batching, stopping), metrics));
        (Self { queue }, task)
    }

    /// Submits one command and waits for its outcome.
    ///
    /// # Errors
    /// [`Error::Overloaded`] when the queue is full, [`Error::ShuttingDown`] when the writer is
    /// gone, or the command's own error.
    pub async fn submit(&self, command: Command, urgency: Urgency) -> Result<Outcome> {
        let (reply, outcome) = oneshot::channel();
        let queued = Queued {
            command,
            reply,
            urgency,
            submitted: Instant::now(),
        };
        self.queue.try_send(queued).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Overloaded,
            mpsc::error::TrySendError::Closed(_) => Error::ShuttingDown,
        })?;
        outcome.await.map_err(|_| Error::ShuttingDown)?
    }
}

/// A cached batch sent on the pipeline and not yet answered.
struct InFlight {
    commands: Vec<Command>,
    replies: Vec<Reply>,
    outcomes: Vec<std::result::Result<Outcome, spendguard_core::LedgerError>>,
    answer: Sent,
    started: Instant,
    sent: Instant,
    plan: std::time::Duration,
}

/// The writer's state between batches.
struct State {
    store: Store,
    claim: watch::Receiver<Option<ProducerClaim>>,
    cursor: Option<ProducerCursor>,
    cache: HotCache,
    metrics: Metrics,
    in_flight: VecDeque<InFlight>,
}

async fn run(
    store: Store,
    claim: watch::Receiver<Option<ProducerClaim>>,
    mut receiver: mpsc::Receiver<Queued>,
    (batching, mut stopping): (Batching, watch::Receiver<bool>),
    metrics: Metrics,
) {
    let depth = batching.pipeline_depth;
    let mut state = State {
        store,
        claim,
        cursor: None,
        cache: HotCache::default(),
        metrics,
        in_flight: VecDeque::with_capacity(depth),
    };
    let mut batch = Vec::with_capacity(BATCH_COMMANDS_MAX);
    let mut previous_size = 1;
    let mut closed = false;
    loop {
        if state.in_flight.len() >= depth {
            state.answer_oldest().await;
            continue;
        }
        let was_empty = batch.is_empty();
        if !closed {
            if state.in_flight.is_empty() {
                if batch.is_empty() && receiver.recv_many(&mut batch, BATCH_COMMANDS_MAX).await == 0
                {
                    closed = true;
                } else if was_empty {
                    // (Not again for a held batch: its hold already waits, up to its deadline.)
                    linger(
                        &mut receiver,
                        &mut batch,
                        previous_size,
                        batching.linger_for,
                    )
                    .await;
                }
            } else if waits_behind_in_flight(
                &batch,
                state.newest_in_flight_len(),
                shutting_down(&stopping),
            ) {
                match state
                    .answer_or_receive(&mut receiver, &mut batch, None)
                    .await
                {
                    Event::Answered | Event::Received => {}
                    Event::Closed => closed = true,
                    Event::HoldOver | Event::Stopping => unreachable!("no hold was given"),
                }
                continue;
            }
        }
        if batch.is_empty() {
            if closed {
                break;
            }
            continue;
        }
        if !closed
            && !shutting_down(&stopping)
            && let Some(deadline) = hold_until(&batch, batching.defer_for)
        {
            let hold = Hold {
                deadline,
                stopping: &mut stopping,
            };
            match state
                .answer_or_receive(&mut receiver, &mut batch, Some(hold))
                .await
            {
                // (A stop is seen by the loop: nothing is held any more.)
                Event::Answered | Event::Received | Event::Stopping => continue,
                Event::Closed => closed = true,
                Event::HoldOver => {}
            }
        }
        let deferrable = batch
            .iter()
            .filter(|q| q.urgency == Urgency::Deferrable)
            .count();
        // The linger waits for a burst of urgent commands to come back as large; held
        // deferrable ones are not coming back, and nobody should wait for them.
        previous_size = (batch.len() - deferrable).max(1);
        state.metrics.observe_commands("deferrable", deferrable);
        state
            .metrics
            .observe_commands("now", batch.len() - deferrable);
        let (commands, replies): (Vec<Command>, Vec<Reply>) =
            batch.drain(..).map(|q| (q.command, q.reply)).unzip();
        state.start(commands, replies).await;
    }
    while !state.in_flight.is_empty() {
        state.answer_oldest().await;
    }
    debug!("ledger writer stopped");
}

/// Whether `batch`, waiting while batches are in flight, keeps waiting (for an answer or for
/// more commands) instead of going behind them. It goes once it is as large as the newest in
/// flight, so PostgreSQL starts it the moment that one commits; until then it grows, or goes
/// once nothing is in flight. An empty batch always waits. Deferrable commands alone wait only
/// under their own window (`hold_until`), and a stopping ledger sends what it has.
fn waits_behind_in_flight(batch: &[Queued], newest_in_flight: usize, stopping: bool) -> bool {
    batch.is_empty()
        || (batch.len() < newest_in_flight
            && !stopping
            && batch.iter().any(|q| q.urgency == Urgency::Now))
}

/// Whether the ledger is shutting down (a stop asked, or its handle gone).
fn shutting_down(stopping: &watch::Receiver<bool>) -> bool {
    *stopping.borrow() || stopping.has_changed().is_err()
}

/// What ended a wait of the writer.
enum Event {
    /// The oldest batch in flight was answered.
    Answered,
    /// Commands arrived.
    Received,
    /// Every handle is gone.
    Closed,
    /// The held batch's window ended.
    HoldOver,
    /// The ledger is shutting down: a held batch leaves now.
    Stopping,
}

/// A held batch's wait: until its window ends or the ledger starts shutting down.
struct Hold<'a> {
    deadline: Instant,
    stopping: &'a mut watch::Receiver<bool>,
}

/// Until when `batch` may be held for more commands: only while every command in it is
/// deferrable, it is smaller than [`HELD_COMMANDS_MAX`], and its first command was submitted
/// less than `defer_for` ago. `None` sends it now.
fn hold_until(batch: &[Queued], defer_for: std::time::Duration) -> Option<Instant> {
    let deadline = batch.first()?.submitted + defer_for;
    let holdable = !defer_for.is_zero()
        && batch.len() < HELD_COMMANDS_MAX
        && batch.iter().all(|q| q.urgency == Urgency::Deferrable);
    (holdable && Instant::now() < deadline).then_some(deadline)
}

impl State {
    /// Waits for the first of: the oldest batch in flight answered (handled here), commands
    /// arriving (added to `batch`), or the end of `hold` (its deadline, or a stop).
    async fn answer_or_receive(
        &mut self,
        receiver: &mut mpsc::Receiver<Queued>,
        batch: &mut Vec<Queued>,
        hold: Option<Hold<'_>>,
    ) -> Event {
        let room = BATCH_COMMANDS_MAX - batch.len();
        let oldest = async {
            match self.in_flight.front_mut() {
                Some(oldest) => (&mut oldest.answer).await,
                None => std::future::pending().await,
            }
        };
        let hold_over = async {
            match hold {
                Some(Hold { deadline, stopping }) => tokio::select! {
                    () = tokio::time::sleep_until(deadline) => Event::HoldOver,
                    _ = stopping.wait_for(|stop| *stop) => Event::Stopping,
                },
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            biased;
            answer = oldest => Err(answer),
            received = receiver.recv_many(batch, room) => Ok(Ok(received)),
            over = hold_over => Ok(Err(over)),
        };
        match event {
            Err(answer) => {
                self.answered(answer).await;
                Event::Answered
            }
            Ok(Ok(0)) => Event::Closed,
            Ok(Ok(_)) => Event::Received,
            Ok(Err(over)) => over,
        }
    }

    /// Starts one batch: sent on the cached path if the cache can plan it (its answer is
    /// collected later), otherwise run on the load path once nothing is in flight.
    async fn start(&mut self, commands: Vec<Command>, replies: Vec<Reply>) {
        let started = Instant::now();
        match self.send_cached(&commands).await {
            Some((prepared_outcomes, plan, answer)) => {
                self.in_flight.push_back(InFlight {
                    commands,
                    replies,
                    outcomes: prepared_outcomes,
                    answer,
                    started,
                    sent: Instant::now(),
                    plan,
                });
            }
            None => {
                while !self.in_flight.is_empty() {
                    self.answer_oldest().await;
                }
                self.run_loaded(commands, replies, started).await;
            }
        }
    }

    /// Plans `commands` on the cache (which already holds the effects of every batch in
    /// flight) and sends them. `None` when the batch needs the load path.
    async fn send_cached(
        &mut self,
        commands: &[Command],
    ) -> Option<(
        Vec<std::result::Result<Outcome, spendguard_core::LedgerError>>,
        std::time::Duration,
        Sent,
    )> {
        let claim = self.claim.borrow().clone()?;
        let cursor = self.cursor.as_mut().filter(|c| c.claim == claim)?;
        let (snapshot, expected) = self.cache.snapshot_for(commands)?;
        let prepared = match self
            .store
            .prepare_cached(cursor, snapshot, &expected, commands)
            .await
        {
            Ok(prepared) => prepared,
            Err(Error::Stale) => return None,
            Err(e) => {
                debug!(error = %e, "cached batch not prepared; loading");
                return None;
            }
        };
        let answer = match self.store.send_cached(prepared.statement).await {
            Ok(answer) => answer,
            Err(e) => {
                debug!(error = %e, "cached batch not sent; loading");
                return None;
            }
        };
        // Taken as committed until the answer says otherwise: the next batch is planned on it.
        cursor.next_sequence = prepared.next_sequence;
        self.cache.absorb(prepared.state);
        Some((prepared.outcomes, prepared.plan, answer))
    }

    /// Commands in the batch sent last and not yet answered (0 when none is in flight).
    fn newest_in_flight_len(&self) -> usize {
        self.in_flight.back().map_or(0, |b| b.commands.len())
    }

    async fn answer_oldest(&mut self) {
        if let Some(oldest) = self.in_flight.front_mut() {
            let answer = (&mut oldest.answer).await;
            self.answered(answer).await;
        }
    }

    /// Handles the answer of the oldest batch in flight.
    async fn answered(&mut self, answer: Result<()>) {
        let Some(batch) = self.in_flight.pop_front() else {
            return;
        };
        if answer.is_ok() {
            self.committed(batch);
            return;
        }
        if let Err(e) = &answer {
            debug!(error = %e, "cached batch refused; loading");
        }
        // Nothing of it was written (or, if the connection broke, nobody knows), and every later
        // batch in flight was planned on it: forget the cache and the sequence, collect the later
        // answers (they fail on the sequence, or stand if they committed), then run every failed
        // batch again, in order, on the load path.
        self.cache.clear();
        self.cursor = None;
        let mut failed = vec![batch];
        while let Some(mut later) = self.in_flight.pop_front() {
            match (&mut later.answer).await {
                Ok(()) => self.committed(later),
                Err(_) => failed.push(later),
            }
        }
        // A session that broke may still be running what it was sent: it is ended first, so the
        // load path sees whatever those statements did. If it cannot be confirmed gone, what
        // they committed is unknown: their callers get that (an away code; they retry with
        // their keys, which replay) and nothing runs again.
        if let Err(e) = self.store.end_broken_cached_session().await {
            warn!(error = %e, "cached-path batches answered as unknown");
            for batch in failed {
                let refusals = batch.commands.iter().map(|_| Err(e.clone()));
                reply(batch.replies, refusals);
            }
            return;
        }
        for batch in failed {
            self.metrics.observe_path(BatchPath::CachedStale);
            self.run_loaded(batch.commands, batch.replies, batch.started)
                .await;
        }
    }

    /// Answers a cached batch that committed.
    fn committed(&self, batch: InFlight) {
        self.metrics.observe_path(BatchPath::Cached);
        self.metrics.observe_batch(
            batch.commands.len(),
            batch.started.elapsed(),
            Some(BatchTimings {
                load: std::time::Duration::ZERO,
                plan: batch.plan,
                write: batch.sent.elapsed(),
                commit: std::time::Duration::ZERO,
            }),
        );
        reply(
            batch.replies,
            batch.outcomes.into_iter().map(|o| o.map_err(Error::from)),
        );
    }

    /// Runs `commands` on the load path (nothing may be in flight).
    async fn run_loaded(&mut self, commands: Vec<Command>, replies: Vec<Reply>, started: Instant) {
        let current = self.claim.borrow().clone();
        let size = commands.len();
        let span = info_span!("ledger_batch", commands = size);
        let (results, timings) = execute_loaded(
            &self.store,
            current.as_ref(),
            &mut self.cursor,
            &mut self.cache,
            &commands,
            &self.metrics,
        )
        .instrument(span)
        .await;
        self.metrics.observe_batch(size, started.elapsed(), timings);
        reply(replies, results.into_iter());
    }
}

fn reply(replies: Vec<Reply>, results: impl Iterator<Item = Result<Outcome>>) {
    for (reply, result) in replies.into_iter().zip(results) {
        // The caller may have gone away (deadline); its command is durable either way.
        let _ = reply.send(result);
    }
}

/// Under load, callers that were answered by the previous batch send their next command a moment
/// later; starting a transaction for the first few arrivals would split one large batch into many
/// small ones, each paying the fixed cost of a transaction. So when the previous batch was larger
/// than what is queued, wait up to `linger_for` for as many commands to arrive. An idle or lightly
/// loaded ledger (previous batch of one) never waits. Tokio timers tick in milliseconds, so the
/// wait is rounded up to the next millisecond.
async fn linger(
    receiver: &mut mpsc::Receiver<Queued>,
    batch: &mut Vec<Queued>,
    previous_size: usize,
    linger_for: std::time::Duration,
) {
    let target = previous_size.min(BATCH_COMMANDS_MAX);
    if batch.len() >= target || linger_for.is_zero() {
        return;
    }
    let deadline = Instant::now() + linger_for;
    while batch.len() < target {
        let room = BATCH_COMMANDS_MAX - batch.len();
        match tokio::time::timeout_at(deadline, receiver.recv_many(batch, room)).await {
            Ok(received) if received > 0 => {}
            _ => return,
        }
    }
}

/// Runs `commands` on the load path: locked reads, plan, write, commit.
async fn execute_loaded(
    store: &Store,
    claim: Option<&ProducerClaim>,
    cursor: &mut Option<ProducerCursor>,
    cache: &mut HotCache,
    commands: &[Command],
    metrics: &Metrics,
) -> (Vec<Result<Outcome>>, Option<BatchTimings>) {
    let refuse_all = |e: Error| (commands.iter().map(|_| Err(e.clone())).collect(), None);
    let Some(claim) = claim else {
        cache.clear();
        return refuse_all(Error::ProducerClaimLost);
    };
    let current = match current_cursor(store, claim, cursor, cache).await {
        Ok(current) => current,
        Err(e) => return refuse_all(e),
    };
    metrics.observe_path(BatchPath::Loaded);
    match store.run_batch(current, commands).await {
        Ok(committed) => finish(committed, cache),
        // A rule broke: one command is bad, or the batch lost a race with another replica to
        // create a row (a window, a scope nobody held, a retry's reservation). Each command runs
        // again alone, on a fresh load: a bad one is refused without its neighbours, and a lost
        // race is answered as if it had come second (the lease held, the replay). A batch of
        // one runs again too, once.
        Err(e) if e.is_isolatable() => {
            debug!(error = %e, commands = commands.len(), "batch failed; running its commands singly");
            cache.clear();
            (
                run_singly(store, claim, cursor, cache, commands).await,
                None,
            )
        }
        Err(e) => {
            if let Error::Invariant(reason) = &e {
                error!(%reason, "ledger invariant violated; batch refused");
            }
            // The commit may or may not have happened: read the sequence again before writing.
            *cursor = None;
            cache.clear();
            refuse_all(e)
        }
    }
}

/// The producer cursor of `claim`, read again after a (re)claim or after a batch whose outcome
/// left it uncertain (`None`); the cache, planned on the old sequence, is cleared then.
async fn current_cursor<'c>(
    store: &Store,
    claim: &ProducerClaim,
    cursor: &'c mut Option<ProducerCursor>,
    cache: &mut HotCache,
) -> Result<&'c mut ProducerCursor> {
    if cursor.as_ref().is_none_or(|c| c.claim != *claim) {
        cache.clear();
        *cursor = Some(store.producer_cursor(claim).await?);
    }
    cursor
        .as_mut()
        .ok_or_else(|| Error::Invariant("no producer cursor".into()))
}

/// Runs each of `commands` as a batch of its own, on the load path.
async fn run_singly(
    store: &Store,
    claim: &ProducerClaim,
    cursor: &mut Option<ProducerCursor>,
    cache: &mut HotCache,
    commands: &[Command],
) -> Vec<Result<Outcome>> {
    let mut results = Vec::with_capacity(commands.len());
    for command in commands {
        let ran = match current_cursor(store, claim, cursor, cache).await {
            Ok(current) => {
                store
                    .run_batch(current, std::slice::from_ref(command))
                    .await
            }
            Err(e) => Err(e),
        };
        let result = match ran {
            Ok(committed) => committed.outcomes.into_iter().next().map_or_else(
                || Err(Error::Invariant("no outcome".into())),
                |o| o.map_err(Error::from),
            ),
            Err(e) => {
                // Unless a rule refused it (rolled back), the commit may or may not have
                // happened: read the sequence again before the next.
                if !matches!(e, Error::Invariant(_)) {
                    *cursor = None;
                }
                Err(e)
            }
        };
        if let Err(Error::Invariant(reason)) = &result {
            error!(%reason, "ledger invariant violated; command refused");
        }
        results.push(result);
    }
    results
}

/// Remembers a committed batch's rows and answers its commands.
fn finish(
    committed: Committed,
    cache: &mut HotCache,
) -> (Vec<Result<Outcome>>, Option<BatchTimings>) {
    if let Some((db_now, local_before)) = committed.clock {
        cache.observe_clock(db_now, local_before);
    }
    cache.absorb(committed.state);
    let outcomes = committed
        .outcomes
        .into_iter()
        .map(|o| o.map_err(Error::from))
        .collect();
    (outcomes, Some(committed.timings))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn command() -> Queued {
        queued(Urgency::Now)
    }

    fn queued(urgency: Urgency) -> Queued {
        Queued {
            command: Command::SweepExpired(1),
            reply: oneshot::channel().0,
            urgency,
            submitted: Instant::now(),
        }
    }

    #[tokio::test]
    async fn a_full_queue_is_overloaded_and_a_gone_writer_is_shutting_down() {
        // A full queue answers at once, without waiting: OVERLOADED, gRPC UNAVAILABLE.
        let (queue, mut receiver) = mpsc::channel(1);
        let writer = Writer { queue };
        queue_one(&writer);
        let full = writer.submit(Command::SweepExpired(1), Urgency::Now).await;
        let full = full.expect_err("the queue is full");
        assert!(matches!(full, Error::Overloaded), "{full:?}");
        let status = crate::grpc::status(&full);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            status.metadata().get("spendguard-error-code").unwrap(),
            "OVERLOADED"
        );

        // A writer that took the command and ended without answering: SHUTTING_DOWN.
        assert!(
            receiver.recv().await.is_some(),
            "the writer takes the queued one"
        );
        let taker = tokio::spawn(async move {
            drop(receiver.recv().await); // the next, dropped unanswered
            receiver
        });
        let dropped = writer.submit(Command::SweepExpired(1), Urgency::Now).await;
        assert!(matches!(dropped, Err(Error::ShuttingDown)), "{dropped:?}");
        // A writer that is gone: SHUTTING_DOWN at once.
        drop(taker.await.unwrap());
        let gone = writer
            .submit(Command::SweepExpired(1), Urgency::Now)
            .await
            .expect_err("the writer is gone");
        assert!(matches!(gone, Error::ShuttingDown), "{gone:?}");
        let status = crate::grpc::status(&gone);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            status.metadata().get("spendguard-error-code").unwrap(),
            "SHUTTING_DOWN"
        );
    }

    /// Fills one slot of `writer`'s queue without waiting for an answer.
    fn queue_one(writer: &Writer) {
        writer
            .queue
            .try_send(command())
            .unwrap_or_else(|_| panic!("a free slot"));
    }

    #[test]
    fn what_arrives_behind_a_batch_in_flight_goes_once_it_is_as_large() {
        let now = |n: usize| (0..n).map(|_| command()).collect::<Vec<_>>();
        // Nothing waiting: wait for an answer or for commands, stopping or not.
        assert!(waits_behind_in_flight(&[], 3, false));
        assert!(waits_behind_in_flight(&[], 3, true));
        // Smaller than the newest batch in flight: it grows first.
        assert!(waits_behind_in_flight(&now(1), 3, false));
        assert!(waits_behind_in_flight(&now(2), 3, false));
        // As large, or larger: it goes behind.
        assert!(!waits_behind_in_flight(&now(3), 3, false));
        assert!(!waits_behind_in_flight(&now(4), 3, false));
        // A stopping ledger sends what it has.
        assert!(!waits_behind_in_flight(&now(1), 3, true));
        // Deferrable commands alone wait under their own window, not for a full batch; one
        // urgent command among them makes the batch wait to grow.
        let mut deferrable = vec![queued(Urgency::Deferrable)];
        assert!(!waits_behind_in_flight(&deferrable, 3, false));
        deferrable.push(command());
        assert!(waits_behind_in_flight(&deferrable, 3, false));
    }

    #[tokio::test(start_paused = true)]
    async fn linger_waits_for_stragglers_only_after_a_larger_batch() {
        let (sender, mut receiver) = mpsc::channel(16);
        let mut batch = vec![command()];
        // Previous batch of one: never waits.
        let started = Instant::now();
        linger(&mut receiver, &mut batch, 1, Duration::from_millis(1)).await;
        assert_eq!((batch.len(), started.elapsed()), (1, Duration::ZERO));

        // Previous batch of four: collects stragglers that arrive within the window…
        let feeder = sender.clone();
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(2)).await;
                feeder.send(command()).await.unwrap();
            }
        });
        linger(&mut receiver, &mut batch, 4, Duration::from_millis(10)).await;
        assert_eq!(batch.len(), 4);

        // …and gives up at the deadline when they do not come.
        batch.truncate(1);
        let started = Instant::now();
        linger(&mut receiver, &mut batch, 8, Duration::from_millis(10)).await;
        assert_eq!(
            (batch.len(), started.elapsed()),
            (1, Duration::from_millis(10))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn only_small_batches_of_deferrable_commands_are_held_and_only_inside_their_window() {
        let window = Duration::from_millis(5);
        let submitted = Instant::now();
        let deferrable: Vec<Queued> = (0..3).map(|_| queued(Urgency::Deferrable)).collect();
        assert_eq!(hold_until(&deferrable, window), Some(submitted + window));
        assert_eq!(hold_until(&[], window), None);
        // A zero window never holds.
        assert_eq!(hold_until(&deferrable, Duration::ZERO), None);
        // One urgent command sends everything held with it.
        let mut mixed = deferrable;
        mixed.push(queued(Urgency::Now));
        assert_eq!(hold_until(&mixed, window), None);
        // A full batch goes out inside its window.
        let mut full: Vec<Queued> = (0..HELD_COMMANDS_MAX)
            .map(|_| queued(Urgency::Deferrable))
            .collect();
        assert_eq!(hold_until(&full, window), None);
        assert!(hold_until(&full[1..], window).is_some());
        // The window counts from the first command's submission, not from the latest.
        tokio::time::advance(window / 2).await;
        full.push(queued(Urgency::Deferrable));
        assert_eq!(hold_until(&full[2..], window), Some(submitted + window));
        tokio::time::advance(window / 2).await;
        assert_eq!(hold_until(&full[2..], window), None);
    }
}
