//! Credits: money this sidecar reserves in the ledger once, then admits calls inside without a
//! ledger write on the request path, only a read that confirms the lease (docs/design/credits.md).
//!
//! ```text
//! admit(worst case) ─ current credit has it ─► taken locally ─► CheckFencing ─► CONTINUE
//!        │                 refused, or unanswered (fail-closed) ◄─┘ (amount given back: 503)
//!        │                                        └► draw (background): ReserveSet draw_from ─► Drawn
//!        │                                           retried while the ledger is away; refused for
//!        │                                           good, or past the credit's life ─► Lost: the
//!        │                                           call is queued as a fail-open call at once
//!        └─ no credit, or not enough ─► None: the call reserves synchronously, as without credits
//! low, ending, or absent ─► open the next credit (one at a time, in the background) ─► the old
//!                            one retires and is released once the draws taken from it landed
//! ```
//!
//! The ledger stays the authority over money: a credit is a reservation of the sidecar's
//! budgets, and every call admitted inside it is drawn from it (its own reservation, committed or
//! released like any other). The exception is a lost draw: that call's spend reaches the ledger
//! as a fail-open record, i.e. as overrun after the fact (docs/design/credits.md, failure modes).
//! With a spool directory, each admission is journaled before its CONTINUE (`journal.rs`), so a
//! sidecar restarted after a kill -9 draws what its predecessor admitted and never drew.

mod journal;
mod lease_check;
mod pool;

pub use crate::journal::JournalError;
pub use journal::{DrawJournal, JOURNAL_FILE, LeftOver, PendingDraw};
pub use lease_check::LeaseChecks;
pub use pool::{
    CALLS_PER_CREDIT_MIN, CREDIT_TTL_MS_MAX, CREDIT_TTL_MS_MIN, CreditPolicy, Credits,
    DRAWS_IN_FLIGHT_MAX, Opened, Take,
};

use crate::bundle::pricing_ref;
use crate::decider::{Identity, Waiter, ledger_away};
use crate::fail_open::FailOpenQueue;
use crate::lease::Lease;
use crate::sync::lock;
use spendguard_core::contract::Bundle;
use spendguard_core::window::BudgetWindow;
use spendguard_proto::ledger::Answer;
use spendguard_proto::ledger::v1 as pb;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tonic::transport::Channel;
use tracing::{error, info, warn};
use uuid::Uuid;

type LedgerClient = pb::ledger_client::LedgerClient<Channel>;

/// After a credit could not be opened (budget too low for one, ledger away), calls reserve one
/// by one for this long before the next try.
const QUIET_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// Longest wait between tries of a draw while the ledger does not answer.
const DRAW_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What [`CreditDriver::admit`] decided for a call.
#[derive(Debug)]
pub enum Admission {
    /// Admitted inside `credit` (its draws stop trying at `expires`): CONTINUE, and draw.
    Admitted {
        /// The credit's reservation id.
        credit: String,
        /// When its draws stop trying.
        expires: Instant,
        /// Keeps [`CreditDriver::close`] waiting until the draw is spawned.
        held: TaskTrackerToken,
    },
    /// No credit holds the call: it reserves one by one.
    NotInCredit,
    /// A credit held the call, but the ledger did not confirm the lease (refused it, or did not
    /// answer): the call is decided as a ReserveSet failing with this status would be.
    Refused(tonic::Status),
}

/// A call's amount taken from a credit while its lease check is in flight: unless it was
/// admitted, dropping it gives the amount back (and releases the credit if it retired meanwhile
/// and this was the last call taken from it).
struct Taken<'a> {
    driver: &'a Arc<CreditDriver>,
    credit: String,
    expires: Instant,
    amount: i64,
    admitted: bool,
    /// Keeps [`CreditDriver::close`] waiting for this call: until its draw is spawned, or its
    /// amount given back (and the credit's release spawned, if it was the last).
    held: Option<TaskTrackerToken>,
}

impl Taken<'_> {
    /// The call is admitted: counted, and its amount stays taken (its draw follows). Unless the
    /// credits closed (shutdown) during its check: then it is given back, and the call reserves
    /// one by one, as any call after the close does.
    fn admit(mut self) -> Admission {
        if !self.driver.pool.admitted() {
            return Admission::NotInCredit;
        }
        self.admitted = true;
        Admission::Admitted {
            credit: std::mem::take(&mut self.credit),
            expires: self.expires,
            held: self
                .held
                .take()
                .unwrap_or_else(|| self.driver.tasks.token()),
        }
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if self.admitted {
            return;
        }
        if let Some(id) = self.driver.pool.untake(&self.credit, self.amount) {
            // Dropped outside a runtime (its shutdown), the credit lapses at its TTL instead.
            if tokio::runtime::Handle::try_current().is_ok() {
                self.driver.spawn_release(id);
            }
        }
    }
}

/// Where a call's draw stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrawState {
    /// Not answered yet.
    Pending,
    /// The ledger holds the call's reservation, under this id.
    Drawn(String),
    /// The ledger will not record it as a draw (why): the call must be recorded another way.
    Lost(String),
}

/// What an answer that replays an already settled reservation means to a draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SettledReplay {
    /// A call admitted now under a call id already settled: a second call, drawn under a key
    /// of its own.
    SecondCall,
    /// A journaled draw of a previous process: its key (the one it sent) landed and was
    /// settled since. (Or a retry of the call on this process settled the call id first: then
    /// two calls went out under one reservation, as a retry of a call reserved one by one does
    /// after a restart.)
    Landed,
}

/// Opens, draws from and releases this sidecar's credits.
pub struct CreditDriver {
    pool: Credits,
    ledger: LedgerClient,
    lease: Lease,
    bundle: Arc<Bundle>,
    identity: Identity,
    tasks: TaskTracker,
    /// Records a call whose draw is lost, at once (so a call that never settles is still
    /// recorded, at its worst case, by the queue's settle deadline).
    fail_open: Arc<FailOpenQueue>,
    record: Option<OpenCredits>,
    journal: Option<DrawJournal>,
    /// What a previous process of the pod journaled and did not record.
    left_over: Mutex<LeftOver>,
    /// Confirms the epoch of each admission.
    checks: Arc<LeaseChecks>,
    /// The ledger answered the lease check UNIMPLEMENTED (an older ledger): no credits.
    no_lease_check: AtomicBool,
}

/// The ids of this sidecar's credits not yet released, kept in a file of the pod's spool
/// directory (an emptyDir, held by one process at a time): a sidecar restarted in the same pod
/// releases its predecessor's credits at once instead of leaving them held until their TTL.
struct OpenCredits {
    path: PathBuf,
    ids: Mutex<BTreeSet<String>>,
    /// What the file held when this process started.
    left_over: Vec<String>,
}

impl OpenCredits {
    fn load(path: PathBuf) -> Self {
        let left_over: Vec<String> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|id| Uuid::try_parse(id).is_ok())
            .map(str::to_owned)
            .collect();
        Self {
            path,
            ids: Mutex::new(left_over.iter().cloned().collect()),
            left_over,
        }
    }

    fn add(&self, id: &str) {
        let mut ids = lock(&self.ids);
        ids.insert(id.to_owned());
        self.write(&ids);
    }

    fn remove(&self, id: &str) {
        let mut ids = lock(&self.ids);
        if ids.remove(id) {
            self.write(&ids);
        }
    }

    /// Replaces the file (write and rename, so a crash leaves the old list or the new one).
    fn write(&self, ids: &BTreeSet<String>) {
        let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
        let temporary = self.path.with_extension("tmp");
        let written =
            std::fs::write(&temporary, text).and_then(|()| std::fs::rename(&temporary, &self.path));
        if let Err(e) = written {
            warn!(path = %self.path.display(), error = %e,
                  "could not record the open credits; after a restart they lapse at their TTL");
        }
    }
}

impl CreditDriver {
    /// A driver with no credit yet: the first admission opens one. With `spool` (the pod's
    /// spool directory, whose lock this process holds), the ids of open credits and the
    /// admissions whose draws have not landed are kept there, and what a previous process left
    /// is taken up by [`Self::recover_left_over`].
    ///
    /// # Errors
    /// The draw journal cannot be read or written.
    pub fn new(
        policy: CreditPolicy,
        ledger: LedgerClient,
        lease: Lease,
        bundle: Arc<Bundle>,
        identity: Identity,
        fail_open: Arc<FailOpenQueue>,
        spool: Option<&Path>,
    ) -> Result<Self, JournalError> {
        let (journal, left_over) = match spool {
            Some(dir) => {
                let (journal, left_over) = DrawJournal::open(dir)?;
                (Some(journal), left_over)
            }
            None => (None, LeftOver::default()),
        };
        let checks = Arc::new(LeaseChecks::new(
            ledger.clone(),
            identity.tenant_id.clone(),
            identity.scope_id.clone(),
        ));
        Ok(Self {
            pool: Credits::new(policy),
            checks,
            ledger,
            lease,
            bundle,
            identity,
            tasks: TaskTracker::new(),
            fail_open,
            record: spool.map(|dir| OpenCredits::load(dir.join("open-credits"))),
            journal,
            left_over: Mutex::new(left_over),
            no_lease_check: AtomicBool::new(false),
        })
    }

    /// Takes up what a previous process of this pod left (it was killed, or its releases
    /// failed), once this process holds the lease. First the draws it journaled and did not
    /// land, so those calls get their reservation (and evidence) from the credit that admitted
    /// them; then its credits are released, so what they did not admit goes back now instead of
    /// at their TTL. Returns the reservation each redrawn call got, by call id (a draw sent
    /// under a key of its own has another id than its call's): the predecessor's commits of
    /// those calls go there.
    pub async fn recover_left_over(self: &Arc<Self>) -> HashMap<String, String> {
        let mut drawn = HashMap::new();
        let LeftOver { to_draw, to_record } = std::mem::take(&mut *lock(&self.left_over));
        if !to_draw.is_empty() || !to_record.is_empty() {
            info!(
                draws = to_draw.len(),
                lost = to_record.len(),
                "taking up the calls a previous sidecar of this pod admitted inside its credits"
            );
        }
        // Refused for good before the restart: their fail-open records (again, if they were
        // queued: the ledger answers a record it holds as a replay).
        for pending in to_record {
            self.finish_draw(pending, &DrawState::Lost("refused before a restart".into()))
                .await;
        }
        // A draw retries while the ledger is away; the predecessor's credit lapses within a TTL.
        // At most DRAWS_IN_FLIGHT_MAX at a time, as the sidecar's own draws.
        let expires = Instant::now() + self.pool.policy().ttl;
        let mut to_draw = to_draw.into_iter();
        loop {
            let mut redraws = tokio::task::JoinSet::new();
            for mut pending in to_draw.by_ref().take(DRAWS_IN_FLIGHT_MAX as usize) {
                let this = self.clone();
                redraws.spawn(async move {
                    let outcome = this
                        .draw(&mut pending, expires, SettledReplay::Landed)
                        .await;
                    let call_id = pending.call_id().to_owned();
                    this.finish_draw(pending, &outcome).await;
                    match outcome {
                        DrawState::Drawn(id) => Some((call_id, id)),
                        DrawState::Pending | DrawState::Lost(_) => None,
                    }
                });
            }
            if redraws.is_empty() {
                break;
            }
            drawn.extend(redraws.join_all().await.into_iter().flatten());
        }
        if let Some(record) = &self.record {
            for id in &record.left_over {
                info!(credit = %id, "releasing a credit a previous sidecar of this pod left open");
                self.release(id, Waiter::Caller).await;
            }
        }
        drawn
    }

    /// The local count (metrics, tests).
    pub fn pool(&self) -> &Credits {
        &self.pool
    }

    /// Registers the credit and lease check metrics.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        self.pool.register(registry);
        self.checks.register(registry);
    }

    /// Admits a call of worst case `amount` decided under `epoch` inside the current credit, if
    /// it has the amount and the ledger confirms `epoch` is current (CheckFencing: a read, no
    /// write): so a call admitted inside a credit never goes ahead on a stale epoch, and fails
    /// closed with the ledger away, as a call reserved one by one does. With `admit_while_away`
    /// (a fail-open contract) a ledger that does not answer the check still admits the call:
    /// the credit holds its money, where a call reserved one by one would go through as a
    /// fail-open record holding none. Opens the next credit and releases retired ones in the
    /// background as needed.
    pub async fn admit(
        self: &Arc<Self>,
        amount: i64,
        epoch: u64,
        admit_while_away: bool,
    ) -> Admission {
        // The ledger does not serve the lease check: credits would only hold money.
        if self.no_lease_check.load(Ordering::Relaxed) {
            return Admission::NotInCredit;
        }
        let take = self.pool.take(amount, epoch, Instant::now());
        for id in take.release {
            self.spawn_release(id);
        }
        if let Some(amount) = take.open_next {
            let this = self.clone();
            self.tasks
                .spawn(async move { this.open(amount, epoch).await });
        }
        let Some((credit, expires)) = take.credit else {
            return Admission::NotInCredit;
        };
        // Given back unless admitted, also when this future is dropped during the check (a
        // decide API client that went away): else the credit would count it as in flight for
        // good, and never be released.
        let taken = Taken {
            driver: self,
            credit,
            expires,
            amount,
            admitted: false,
            held: Some(self.tasks.token()),
        };
        match self.checks.confirm(epoch).await {
            Ok(()) => taken.admit(),
            // A ledger older than CheckFencing (the upgrade order puts the ledger first, but a
            // rollback may not): no call is admitted inside a credit by this process any more
            // (each reserves one by one, which checks the epoch), and the current credit goes
            // back instead of holding money nothing will use.
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                if !self.no_lease_check.swap(true, Ordering::Relaxed) {
                    warn!(
                        "the ledger does not serve CheckFencing: credits are off until this sidecar restarts; calls reserve one by one"
                    );
                }
                drop(taken);
                for id in self.pool.retire() {
                    self.spawn_release(id);
                }
                Admission::NotInCredit
            }
            Err(status) if admit_while_away && ledger_away(&status) => {
                warn!(error = %status, "the ledger did not confirm the lease; a fail-open contract admits the call inside the credit that holds its money");
                taken.admit()
            }
            Err(status) => Admission::Refused(status),
        }
    }

    /// Records a call admitted from `credit` in the ledger, in the background: `pending.draw` is
    /// the call's ReserveSet drawing from it. The admission is journaled first (call this before
    /// answering CONTINUE). The returned state ends `Drawn` or `Lost`; a lost call is queued as
    /// a fail-open call (`pending.if_lost`) before its state says so.
    pub fn spawn_draw(
        self: &Arc<Self>,
        (credit, expires, held): (String, Instant, TaskTrackerToken),
        pending: PendingDraw,
    ) -> watch::Receiver<DrawState> {
        if let Some(journal) = &self.journal
            && let Err(e) = journal.admitted(&pending)
        {
            error!(call_id = %pending.call_id(), code = e.code(), error = %e,
                   "could not journal a call admitted inside a credit: a kill -9 before its draw lands would leave it unrecorded");
        }
        let (state, watched) = watch::channel(DrawState::Pending);
        let this = self.clone();
        self.tasks.spawn(async move {
            let mut pending = pending;
            let outcome = this
                .draw(&mut pending, expires, SettledReplay::SecondCall)
                .await;
            if let DrawState::Lost(reason) = &outcome {
                warn!(%credit, call_id = %pending.call_id(), %reason, "a call admitted inside a credit could not be drawn from it; it is recorded as a fail-open call");
            }
            this.finish_draw(pending, &outcome).await;
            let retired = this
                .pool
                .draw_done(&credit, matches!(outcome, DrawState::Lost(_)));
            // The settlement waiting for this answer need not wait for a release too.
            let _ = state.send(outcome);
            if let Some(id) = retired {
                this.release(&id, Waiter::Nobody).await;
            }
        });
        // The draw is tracked now: a close waits for it instead.
        drop(held);
        watched
    }

    /// Until `stop`: releases the current credit once the pod has been quiet for
    /// [`CreditPolicy::quiet`], so an idle pod does not hold money until its credit lapses.
    pub async fn release_when_quiet(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let period = (self.pool.policy().quiet() / 4).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = &mut stop => return,
            }
            for id in self.pool.retire_if_quiet(Instant::now()) {
                info!(credit = %id, "the pod went quiet: releasing its credit");
                self.spawn_release(id);
            }
        }
    }

    /// Shutdown: admits nothing more, waits (up to `deadline`) for the draws in flight, and
    /// releases every credit, so what they did not admit goes back to the budgets now instead
    /// of at their expiry.
    pub async fn close(&self, deadline: Duration) {
        for id in self.pool.close() {
            self.release(&id, Waiter::Caller).await;
        }
        self.tasks.close();
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                "shutdown deadline passed with credit draws in flight; their credits lapse at their TTL"
            );
        }
    }

    /// After a draw's outcome: a lost call is queued as a fail-open call, and the journal
    /// forgets the admission once the call is recorded either way.
    async fn finish_draw(&self, pending: PendingDraw, outcome: &DrawState) {
        let call_id = pending.call_id().to_owned();
        let key = pending.key();
        let recorded = match outcome {
            DrawState::Drawn(_) => true,
            DrawState::Pending => false,
            DrawState::Lost(_) => {
                if let Some(journal) = &self.journal
                    && let Err(e) = journal.lost(&key)
                {
                    warn!(%call_id, code = e.code(), error = %e, "could not journal a lost draw; a restart before it is recorded draws the call again");
                }
                let queue = self.fail_open.clone();
                let PendingDraw {
                    if_lost,
                    worst_case_nano_usd,
                    ..
                } = pending;
                let queued = tokio::task::spawn_blocking(move || {
                    // Queued before a restart (its spool kept it): that record stands.
                    if queue.worst_case(&if_lost.call_id).is_some() {
                        return Ok(());
                    }
                    queue.admit(if_lost, worst_case_nano_usd, None)
                })
                .await;
                let queued = matches!(queued, Ok(Ok(())));
                if !queued {
                    error!(%call_id, "a call admitted inside a credit was neither drawn nor queued as a fail-open call: its spend and evidence are missing from the ledger");
                }
                queued
            }
        };
        if recorded
            && let Some(journal) = &self.journal
            && let Err(e) = journal.done(&key)
        {
            warn!(%call_id, code = e.code(), error = %e, "could not mark a call recorded in the journal; a restart takes it up again (answered as a replay)");
        }
    }

    async fn open(&self, amount_nano_usd: i64, epoch: u64) {
        let policy = self.pool.policy();
        let sent = Instant::now();
        let sent_wall = chrono::Utc::now();
        let request = pb::ReserveSetRequest {
            tenant_id: self.identity.tenant_id.clone(),
            idempotency_key: format!("credit/{}", Uuid::new_v4()),
            budget_ids: self.identity.budget_ids.clone(),
            amount_nano_usd,
            fencing: Some(pb::FencingToken {
                scope_id: self.identity.scope_id.clone(),
                epoch,
            }),
            ttl_ms: u32::try_from(policy.ttl.as_millis()).unwrap_or(u32::MAX),
            pricing: Some(pricing_ref(&self.bundle.pricing)),
            context: Some(pb::DecisionContext {
                contract_version: self.bundle.contract.version.clone(),
                ..pb::DecisionContext::default()
            }),
            credit: true,
            ..pb::ReserveSetRequest::default()
        };
        let reserved = match self.ledger.clone().reserve_set(request).await {
            Ok(response) => match response.into_inner().outcome {
                Some(pb::reserve_set_response::Outcome::Reserved(reserved)) => reserved,
                Some(pb::reserve_set_response::Outcome::Denied(denied)) => {
                    info!(budget_id = %denied.budget_id, remaining_nano_usd = denied.remaining_nano_usd,
                          "no room for a credit; calls reserve one by one");
                    self.pool.not_opened(Instant::now(), QUIET_AFTER_FAILURE);
                    // Near the budget's end, a remainder held here would refuse calls that the
                    // budget could still take one by one.
                    for id in self.pool.retire() {
                        self.release(&id, Waiter::Nobody).await;
                    }
                    return;
                }
                None => {
                    self.pool.not_opened(Instant::now(), QUIET_AFTER_FAILURE);
                    return;
                }
            },
            Err(status) => {
                warn!(error = %status.message(), "could not open a credit; calls reserve one by one");
                self.pool.not_opened(Instant::now(), QUIET_AFTER_FAILURE);
                return;
            }
        };
        // Whether a call crosses a soft cap is known only from the ledger's answer to its own
        // reservation (and a retried call that once asked for approval must ask again, which
        // only its reservation tells): under a contract that asks for approval there, budgets
        // with a soft cap get no credit. Checked again at each credit, so a soft cap added
        // later applies to credit admissions from the next credit on.
        if self.bundle.contract.approval_above_soft_cap
            && reserved.balances.iter().any(|b| b.soft_cap_nano_usd > 0)
        {
            info!(
                "a budget has a soft cap and the contract asks for approval above it: no credits; calls reserve one by one"
            );
            self.pool.not_opened(Instant::now(), policy.ttl);
            self.release(&reserved.reservation_id, Waiter::Nobody).await;
            return;
        }
        // Admit until a margin before the credit lapses on the ledger (measured from before the
        // request, so never later than the ledger's clock makes it) and before any of its budget
        // windows ends (a draw is refused once its window has ended).
        let margin = policy.admit_margin();
        let mut admit_until = sent + policy.ttl.saturating_sub(margin);
        let mut window_left = None::<Duration>;
        for balance in &reserved.balances {
            if let Some(end) = window_end(balance) {
                let left = (end - sent_wall).to_std().unwrap_or_default();
                window_left = Some(window_left.map_or(left, |l| l.min(left)));
                admit_until = admit_until.min(sent + left.saturating_sub(margin));
            }
        }
        // Opened too close to a budget window's end to admit anything: give it back, and open
        // none until the next window (else every call would open and release one).
        if admit_until <= Instant::now() {
            let quiet = window_left.unwrap_or(QUIET_AFTER_FAILURE) + QUIET_AFTER_FAILURE;
            info!(
                ?quiet,
                "a budget window ends within the credit's margin; calls reserve one by one until the next window"
            );
            self.pool.not_opened(Instant::now(), quiet);
            self.release(&reserved.reservation_id, Waiter::Nobody).await;
            return;
        }
        let opened = Opened {
            id: reserved.reservation_id,
            amount_nano_usd: reserved.amount_nano_usd,
            epoch,
            admit_until,
            expires: sent + policy.ttl,
        };
        if let Some(record) = &self.record {
            record.add(&opened.id);
        }
        for id in self.pool.opened(opened) {
            self.release(&id, Waiter::Nobody).await;
        }
        // A lease check answered UNIMPLEMENTED while this credit was opening: nothing will be
        // admitted inside it. (That answer sets the flag before it retires the current credit,
        // so this credit is retired by one of the two.)
        if self.no_lease_check.load(Ordering::Relaxed) {
            for id in self.pool.retire() {
                self.release(&id, Waiter::Nobody).await;
            }
        }
    }

    /// Sends `pending`'s draw until it lands or is refused for good (its request may change: a
    /// newer epoch, a key of its own).
    async fn draw(
        &self,
        pending: &mut PendingDraw,
        expires: Instant,
        settled_replay: SettledReplay,
    ) -> DrawState {
        let mut backoff = Duration::from_millis(50);
        let mut drawn_again = false;
        loop {
            let status = match self.ledger.clone().reserve_set(pending.draw.clone()).await {
                Ok(response) => {
                    let response = response.into_inner();
                    match response.outcome {
                        // A retry (after a restart) of a call whose reservation was settled:
                        // this admission is a second call under its id, which went out inside
                        // the credit. It is drawn under a key of its own, so its money and
                        // evidence are those of a call like any other.
                        Some(pb::reserve_set_response::Outcome::Reserved(r))
                            if response.replayed
                                && r.state != pb::ReservationState::Open as i32
                                && settled_replay == SettledReplay::SecondCall
                                && !drawn_again =>
                        {
                            warn!(call_id = %pending.draw.idempotency_key,
                                  "a settled call id was admitted again inside a credit; it is drawn as a call of its own");
                            drawn_again = true;
                            pending.draw.idempotency_key = format!(
                                "{}/again/{}",
                                pending.draw.idempotency_key,
                                Uuid::new_v4()
                            );
                            // A restart must draw the key that is sent (the call id's own
                            // reservation was settled: drawing it would replay that one).
                            if let Some(journal) = &self.journal
                                && let Err(e) = journal.admitted(pending)
                            {
                                warn!(call_id = %pending.call_id(), code = e.code(), error = %e,
                                      "could not journal a draw sent under a key of its own");
                            }
                            continue;
                        }
                        Some(pb::reserve_set_response::Outcome::Reserved(r)) => {
                            return DrawState::Drawn(r.reservation_id);
                        }
                        other => return DrawState::Lost(format!("unexpected answer {other:?}")),
                    }
                }
                Err(status) => status,
            };
            let answer = Answer::of(&status);
            let code = answer.code();
            // The same scope under a newer epoch (this process re-acquired its lease) may draw
            // from its credit: the call was decided under a lease this process held.
            if code == Some(pb::ErrorCode::FencingEpochStale)
                && let Some(fencing) = pending.draw.fencing.as_mut()
            {
                if let Ok(current) = self.lease.epoch_for_settlement()
                    && current > fencing.epoch
                {
                    fencing.epoch = current;
                    continue;
                }
                // Fenced: the calls after this one must not go out inside a credit, unasked.
                warn!(
                    epoch = fencing.epoch,
                    "a draw was refused as stale: the scope has a newer epoch; credits stop admitting"
                );
                self.pool.fence(fencing.epoch);
            }
            // The lease lapsed on the ledger's clock: the keeper renews it, then the draw lands.
            // An answer that is not the ledger's (a reset stream) is no refusal either.
            let transient =
                !answer.ledger_refused() || code == Some(pb::ErrorCode::FencingLeaseExpired);
            if !transient || Instant::now() + backoff >= expires {
                return DrawState::Lost(format!("{:?}: {}", status.code(), status.message()));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(DRAW_BACKOFF_MAX);
        }
    }

    fn spawn_release(self: &Arc<Self>, id: String) {
        let this = self.clone();
        self.tasks
            .spawn(async move { this.release(&id, Waiter::Nobody).await });
    }

    /// Returns what `id` did not admit to the budgets. Failing that, it lapses at its TTL.
    async fn release(&self, id: &str, waiter: Waiter) {
        let Ok(epoch) = self.lease.epoch_for_settlement() else {
            warn!(credit = %id, "no lease to release a credit with; it lapses at its TTL");
            return;
        };
        let request = pb::ReleaseRequest {
            tenant_id: self.identity.tenant_id.clone(),
            reservation_id: id.to_owned(),
            fencing: Some(pb::FencingToken {
                scope_id: self.identity.scope_id.clone(),
                epoch,
            }),
            reason: "credit_retired".into(),
            // In the background the money may go back a few milliseconds later; at shutdown
            // and start-up the sidecar waits on it.
            deferrable: waiter == Waiter::Nobody,
        };
        let answered = match self.ledger.clone().release(request).await {
            Ok(_) => true,
            Err(status) => {
                warn!(credit = %id, error = %status.message(), "could not release a credit; it lapses at its TTL");
                // Refused for good (already resolved, another epoch): nothing to retry. Only
                // the ledger's own answer says so.
                Answer::of(&status).ledger_refused()
            }
        };
        if answered && let Some(record) = &self.record {
            record.remove(id);
        }
    }
}

/// When the window of `balance` ends, for a renewing budget.
fn window_end(balance: &pb::BudgetBalance) -> Option<chrono::DateTime<chrono::Utc>> {
    let window = match pb::BudgetWindow::try_from(balance.window).ok()? {
        pb::BudgetWindow::CalendarDayUtc => BudgetWindow::CalendarDayUtc,
        pb::BudgetWindow::CalendarMonthUtc => BudgetWindow::CalendarMonthUtc,
        _ => return None,
    };
    let start = chrono::DateTime::from_timestamp_millis(balance.window_start_unix_ms)?;
    window.end_of(start)
}
