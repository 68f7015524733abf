//! Decisions and their settlement.
//!
//! ```text
//! decide: contract ─► worst case ─► lease epoch ─► ledger ReserveSet ─► CONTINUE
//!            │                          │                 ├─ denied ─► STOP (BUDGET_EXHAUSTED)
//!            └─ STOP (reason)           │                 └─ soft cap crossed ─► CreateApproval ─► release
//!                                       │                                   ─► REQUIRE_APPROVAL (approval_id)
//!                                       └─ unavailable ─► 503 (fail closed) | CONTINUE fail_open (S22,
//!                                          only once its record is queued for RecordFailOpen;
//!                                          a full evidence queue is 503: see fail_open.rs)
//!                                          (a failed CreateApproval is always 503: never an id that
//!                                          does not exist, never fail-open past a soft cap)
//! settle: commit(usage priced at the decision's snapshot) | release(reason), exactly once
//! ```
//!
//! The ledger is the authority over money; this table of the sidecar's own calls exists so a
//! settlement is priced with the provider and model that were decided, and so retries of a decide,
//! commit or release get the original answer (`replayed`) instead of a second effect.

use crate::bundle::pricing_ref;
use crate::credit::{Admission, CreditDriver, CreditPolicy, DrawState, JournalError, PendingDraw};
use crate::error::SidecarError;
use crate::fail_open::{FailOpenQueue, SendFailure};
use crate::known_budgets::KnownBudgets;
use crate::lease::Lease;
use crate::metrics::DecisionLatency;
use crate::pending_commits::{PendingCommit, PendingCommits};
use crate::settling::{Settling, SettlingGuard};
use crate::stop_evidence::StopEvidence;
use crate::sync::Sharded;
use chrono::Utc;
use serde::Serialize;
use spendguard_core::contract::{
    BudgetAfterReserve, Bundle, CHOICES_MAX, Call, FailPolicy, Planned, PricingAge, ReasonCode,
    evaluate_balances, evaluate_call, pricing_age,
};
use spendguard_core::money::NanoUsd;
use spendguard_core::plan::{
    RUN_BUDGET_PREFIX, STOP_DETAIL_LEN_MAX, STOP_RECORDS_MAX, TEXT_LEN_MAX, reservation_id_for,
    resume_key,
};
use spendguard_core::pricing::{PricingError, Provider, TokenUsage};
use spendguard_proto::ledger::v1 as pb;
use spendguard_proto::ledger::{Answer, error_code};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tonic::transport::Channel;
use tracing::{error, warn};
use uuid::Uuid;

type LedgerClient = pb::ledger_client::LedgerClient<Channel>;

/// Longest call id.
pub const CALL_ID_LEN_MAX: usize = 128;

/// How long a human has to decide a REQUIRE_APPROVAL before the ledger expires it: long enough
/// for a person to notice, short enough that a stale request does not linger (the ledger allows
/// up to 7 days).
pub const APPROVAL_TTL_MS: u32 = 3_600_000;

/// Who this sidecar reserves for.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Tenant.
    pub tenant_id: String,
    /// Budgets every call reserves against (in this order).
    pub budget_ids: Vec<String>,
    /// Fencing scope (tenant + workload instance).
    pub scope_id: String,
}

/// What a decision is asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecideInput {
    /// Caller-chosen idempotency key.
    pub call_id: String,
    /// Provider.
    pub provider: Provider,
    /// Model as requested.
    pub model: String,
    /// An input token count that cannot undercount.
    pub input_tokens_upper_bound: u64,
    /// The call's output-token limit, if it set one (per choice).
    pub max_output_tokens: Option<u32>,
    /// Completions asked for (OpenAI chat `n`), 1 to [`CHOICES_MAX`].
    pub choices: u32,
    /// The run whose per-run budget applies.
    pub run_id: Option<String>,
    /// Workflow, for the audit trail.
    pub workflow_id: Option<String>,
    /// Who waits on the call's settlement. Inside a credit the settlement waits for the call's
    /// draw, so the draw is sent as urgent as the settlement will be.
    pub settles: Waiter,
}

/// The three outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    /// Go ahead within the reservation.
    Continue,
    /// Refused.
    Stop,
    /// A human must approve first.
    RequireApproval,
}

impl Verdict {
    /// The stable string form.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Continue => "CONTINUE",
            Self::Stop => "STOP",
            Self::RequireApproval => "REQUIRE_APPROVAL",
        }
    }
}

/// A decision, as the decision API and the proxy report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Outcome.
    pub decision: Verdict,
    /// Stable reason code.
    pub reason: &'static str,
    /// Human detail.
    pub detail: String,
    /// The call.
    pub call_id: String,
    /// The ledger reservation (CONTINUE, unless fail-open).
    pub reservation_id: Option<String>,
    /// Amount reserved.
    pub reserved_nano_usd: i64,
    /// Output-token limit the call must respect (CONTINUE).
    pub max_output_tokens: Option<u32>,
    /// Budget that stopped the call or crossed its soft cap.
    pub budget_id: Option<String>,
    /// The ledger approval to wait for (REQUIRE_APPROVAL: it exists in the ledger), the one a
    /// resumed call goes ahead under (CONTINUE, reason `APPROVED`), or the one that refused it
    /// (STOP `APPROVAL_DENIED` or `APPROVAL_EXPIRED`).
    pub approval_id: Option<String>,
    /// Contract version that decided.
    pub contract_version: String,
    /// Pricing snapshot version.
    pub pricing_version: String,
    /// Pricing snapshot hash.
    pub pricing_sha256: String,
    /// Bundle hash.
    pub bundle_sha256: String,
    /// CONTINUE without a reservation: ledger unreachable under an explicit fail-open policy.
    pub fail_open: bool,
    /// Priced from a snapshot older than the contract accepts, which continues then (S22); the
    /// ledger's records of the decision say so too.
    pub pricing_stale: bool,
    /// Answers a retry.
    pub replayed: bool,
    /// STOP: the id of the ledger's stop record of this decision (published in the background).
    pub evidence_id: Option<String>,
    /// The call's priced worst case, when it was priced (what its stop record says).
    #[serde(skip)]
    pub worst_case_nano_usd: i64,
}

/// The result of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Committed {
    /// Usage priced at the decision's snapshot.
    pub actual_nano_usd: i64,
    /// Part covered by the reservation.
    pub committed_nano_usd: i64,
    /// Part of the reservation returned.
    pub released_nano_usd: i64,
    /// Part above the reservation (flagged overrun).
    pub overrun_nano_usd: i64,
    /// Answers a retry.
    pub replayed: bool,
    /// The call outlived its reservation's TTL: all of its usage was booked as an overrun.
    pub late: bool,
}

/// The result of a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Released {
    /// Amount returned to the budgets.
    pub released_nano_usd: i64,
    /// Answers a retry.
    pub replayed: bool,
}

/// What a settlement spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// Provider-reported usage.
    Usage(TokenUsage),
    /// The provider may have billed but reported nothing (a stream cut short): the whole
    /// reservation is committed, since it is the only amount that cannot undercount.
    Unreported,
}

/// Whether anyone waits on a settlement's answer. The ledger may hold a settlement nobody waits
/// on for a few milliseconds to write it with others (its defer window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiter {
    /// The decision API's caller waits for its Commit or Release.
    Caller,
    /// The proxy settles in the background, after the response went out.
    Nobody,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settlement {
    Committed(Committed),
    Released(Released),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    provider: Provider,
    model: String,
    input_tokens_upper_bound: u64,
    max_output_tokens: Option<u32>,
    choices: u32,
    run_id: Option<String>,
    workflow_id: Option<String>,
}

#[derive(Debug)]
struct CallEntry {
    fingerprint: Fingerprint,
    decision: Decision,
    settlement: Option<Settlement>,
    decided_at: Instant,
}

/// A call admitted inside a credit, until it is settled.
struct CreditCall {
    /// Its draw.
    draw: watch::Receiver<DrawState>,
    decided_at: Instant,
}

/// Calls the call tables are presized for (16 shards of 1,792 slots). Entries live up to the
/// reservation TTL + 5 min + one forget interval (21 min with the default TTL), so a pod making
/// up to ~21 calls/s never grows them. Busier pods grow a shard now and then (a sixteenth of
/// the calls at a time).
const CALLS_PRESIZED: usize = 28_000;

/// The longest a refusal for lack of budget waits for this sidecar's earlier settlements to land
/// before it stands (they normally take a few milliseconds).
pub const SETTLING_WAIT_MAX: Duration = Duration::from_millis(500);

/// Decides and settles calls for one tenant and workload.
pub struct Decider {
    ledger: LedgerClient,
    lease: Lease,
    bundle: Arc<Bundle>,
    identity: Identity,
    reservation_ttl: Duration,
    /// Calls decided, kept for the reservation TTL + 5 min. Sharded, with boxed entries (a few
    /// hundred bytes each, so a growing shard moves 32 bytes per call), and presized: growing
    /// a table holds up every decision of its shard (docs/benchmarks.md, "14:30").
    calls: Sharded<Box<CallEntry>>,
    run_budgets: KnownBudgets,
    /// Background settlements in flight: a refusal for lack of budget waits for those started
    /// before it (`settling.rs`).
    settling: Arc<Settling>,
    fail_open: Arc<FailOpenQueue>,
    stops: Arc<StopEvidence>,
    latency: DecisionLatency,
    credits: Option<Arc<CreditDriver>>,
    credit_calls: Sharded<CreditCall>,
    /// Background commits the ledger has not taken, kept for the next process.
    pending_commits: PendingCommits,
}

impl Decider {
    /// Creates a decider.
    pub fn new(
        ledger: LedgerClient,
        lease: Lease,
        bundle: Arc<Bundle>,
        identity: Identity,
        reservation_ttl: Duration,
        fail_open: Arc<FailOpenQueue>,
        stops: Arc<StopEvidence>,
    ) -> Self {
        Self {
            ledger,
            lease,
            bundle,
            identity,
            reservation_ttl,
            calls: Sharded::with_capacity(CALLS_PRESIZED),
            run_budgets: KnownBudgets::default(),
            settling: Arc::default(),
            fail_open,
            stops,
            latency: DecisionLatency::default(),
            credits: None,
            // Presized only with credits (`with_credits`).
            credit_calls: Sharded::with_capacity(0),
            pending_commits: PendingCommits::in_memory(),
        }
    }

    /// Keeps background commits the ledger could not take in `pending` (the pod's spool), for
    /// a restarted sidecar to send (`pending_commits.rs`).
    pub fn with_pending_commits(mut self, pending: PendingCommits) -> Self {
        self.pending_commits = pending;
        self
    }

    /// Admits calls of the sidecar's own budgets inside credits of `policy`
    /// (docs/design/credits.md); in `spool` (the pod's spool directory) the open credits' ids and
    /// the admissions not yet drawn are kept for a restarted sidecar of the pod.
    ///
    /// # Errors
    /// The draw journal in `spool` cannot be read or written.
    pub fn with_credits(
        mut self,
        policy: CreditPolicy,
        spool: Option<&std::path::Path>,
    ) -> Result<Self, JournalError> {
        self.credits = Some(Arc::new(CreditDriver::new(
            policy,
            self.ledger.clone(),
            self.lease.clone(),
            self.bundle.clone(),
            self.identity.clone(),
            self.fail_open.clone(),
            spool,
        )?));
        self.credit_calls = Sharded::with_capacity(CALLS_PRESIZED);
        Ok(self)
    }

    /// The credits, when enabled, to hand to a task.
    pub fn credits_handle(&self) -> Option<Arc<CreditDriver>> {
        self.credits.clone()
    }

    /// The credits, when enabled.
    pub fn credits(&self) -> Option<&CreditDriver> {
        self.credits.as_deref()
    }

    /// Registers the decision latency histogram (and the credit metrics).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.latency.register(registry);
        if let Some(credits) = &self.credits {
            credits.register(registry);
        }
    }

    /// The queue of STOP records waiting for the ledger.
    pub fn stop_evidence(&self) -> &StopEvidence {
        &self.stops
    }

    /// Marks a background settlement started: a refusal for lack of budget waits for it (up to
    /// [`SETTLING_WAIT_MAX`]) before it stands. Hold the guard until the first attempt returned.
    pub fn settlement_started(&self) -> SettlingGuard {
        self.settling.start()
    }

    /// The queue of fail-open records waiting for the ledger.
    pub fn fail_open_queue(&self) -> &FailOpenQueue {
        &self.fail_open
    }

    /// The loaded bundle.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The fencing lease.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Decides `input`: STOP and REQUIRE_APPROVAL reserve nothing; CONTINUE holds a reservation
    /// (or is marked fail-open). A retry with the same call id and fields returns the original
    /// decision with `replayed`.
    ///
    /// # Errors
    /// [`SidecarError`] when the input is malformed, the call id was used with other fields, or
    /// the ledger or lease is unavailable under a fail-closed contract.
    pub async fn decide(&self, input: DecideInput) -> Result<Decision, SidecarError> {
        let started = Instant::now();
        let answer = self.decide_untimed(input).await;
        let outcome = answer.as_ref().map_or("ERROR", |d| d.decision.as_str());
        self.latency.observe(outcome, started.elapsed());
        answer
    }

    async fn decide_untimed(&self, input: DecideInput) -> Result<Decision, SidecarError> {
        check_call_id(&input.call_id)?;
        if let Some(run_id) = &input.run_id {
            spendguard_core::ids::check_name("run_id", run_id)
                .map_err(|e| SidecarError::invalid("run_id", e.to_string()))?;
            // The run's own budget is `runs/<run id>`, and must itself be a valid budget id.
            spendguard_core::ids::check_name("run_id", &run_budget_id(run_id)).map_err(|_| {
                SidecarError::invalid("run_id", format!("at most {RUN_ID_LEN_MAX} characters"))
            })?;
        }
        // The ledger refuses a context text over its limit or with a control character. Found
        // only there, a call admitted inside a credit would have a draw and a fail-open record
        // the ledger both refuse: its spend recorded nowhere. (The model needs no check: a name
        // no pricing holds is a STOP, whose record fits it.)
        if let Some(workflow_id) = &input.workflow_id {
            spendguard_core::ids::check_text("workflow_id", workflow_id, TEXT_LEN_MAX)
                .map_err(|e| SidecarError::invalid("workflow_id", e.to_string()))?;
        }
        if input.max_output_tokens == Some(0) {
            return Err(SidecarError::invalid(
                "max_output_tokens",
                "must be at least 1",
            ));
        }
        if !(1..=CHOICES_MAX).contains(&input.choices) {
            return Err(SidecarError::invalid(
                "choices",
                format!("must be from 1 to {CHOICES_MAX}"),
            ));
        }
        let fingerprint = Fingerprint {
            provider: input.provider,
            model: input.model.clone(),
            input_tokens_upper_bound: input.input_tokens_upper_bound,
            max_output_tokens: input.max_output_tokens,
            choices: input.choices,
            run_id: input.run_id.clone(),
            workflow_id: input.workflow_id.clone(),
        };
        if let Some(replay) = self.replay(&input.call_id, &fingerprint)? {
            if replay.decision == Verdict::RequireApproval {
                return self.follow_approval(&input, fingerprint, replay).await;
            }
            return Ok(replay);
        }
        let decision = match self.decide_fresh(&input, None).await {
            // The ledger found this call's reservation resolved: a concurrent decide of the same
            // call id may have finished (and settled) first; then this one is its replay.
            Err(e @ SidecarError::CallAlreadyResolved(_)) => {
                return self.replay(&input.call_id, &fingerprint)?.ok_or(e);
            }
            other => other?,
        };
        // A call the sidecar forgot, whose approval the ledger holds: where that approval stands
        // now decides (a fresh REQUIRE_APPROVAL is not replayed and needs no second look).
        if decision.decision == Verdict::RequireApproval && decision.replayed {
            return self.follow_approval(&input, fingerprint, decision).await;
        }
        let (decision, stop) = self.with_stop_record(&input, decision);
        Ok(self.record(&input.call_id, fingerprint, decision, stop))
    }

    /// A STOP gets its evidence id and the stop record that publishes it; any other answer
    /// passes as it is.
    fn with_stop_record(
        &self,
        input: &DecideInput,
        mut decision: Decision,
    ) -> (Decision, Option<pb::StopRecord>) {
        if decision.decision != Verdict::Stop {
            return (decision, None);
        }
        decision.evidence_id = Some(Uuid::new_v4().to_string());
        let stop = self.stop_record(input, &decision);
        (decision, Some(stop))
    }

    /// The evidence of a STOP, as RecordStops will send it. Caller-supplied text (the model
    /// appears in the context and in some details) is fitted to the ledger's limits, so a STOP
    /// of an odd request is still recorded.
    fn stop_record(&self, input: &DecideInput, decision: &Decision) -> pb::StopRecord {
        let decided_at = unix_ms_now();
        let mut context = pb::DecisionContext {
            // A STOP of a call waiting for approval, or resumed under one, names it.
            approval_id: decision.approval_id.clone().unwrap_or_default(),
            ..self.ledger_context(input, decision.pricing_stale)
        };
        for text in [
            &mut context.run_id,
            &mut context.workflow_id,
            &mut context.provider,
            &mut context.model,
            &mut context.contract_version,
        ] {
            *text = fit_text(text, TEXT_LEN_MAX);
        }
        pb::StopRecord {
            record_id: decision.evidence_id.clone().unwrap_or_default(),
            call_id: input.call_id.clone(),
            reason: decision.reason.to_owned(),
            detail: fit_text(&decision.detail, STOP_DETAIL_LEN_MAX),
            budget_id: decision.budget_id.clone().unwrap_or_default(),
            worst_case_nano_usd: decision.worst_case_nano_usd,
            first_decided_at_unix_ms: decided_at,
            last_decided_at_unix_ms: decided_at,
            count: 1,
            // The epoch held when it decided; a contract STOP is answered without one too.
            fencing_epoch: self.lease.epoch_for_settlement().unwrap_or(0),
            context: Some(context),
        }
    }

    /// Sends up to one batch of queued STOP records to the ledger. Returns whether the ledger
    /// could not take it (the records are queued again; the caller backs off). Cancel-safe: a
    /// send dropped mid-way (a deadline, an abort) puts its unconfirmed records back.
    pub async fn publish_stops(&self) -> bool {
        // What a previous process of the pod left under another bundle or scope goes first, as
        // it was decided; a group the ledger does not take waits its turn behind the others,
        // and this process's own records go out in the same pass either way.
        let foreign_failed = self.publish_foreign_stops().await;
        let own_failed = self.publish_own_stops().await;
        foreign_failed || own_failed
    }

    /// Sends the oldest foreign group (records a previous process left under another envelope).
    /// Returns whether the ledger could not take it. Cancel-safe: the group leaves the queue
    /// only once the ledger answered for it.
    async fn publish_foreign_stops(&self) -> bool {
        let Some(request) = self.stops.first_foreign() else {
            return false;
        };
        match self.send_stop_request(request.clone()).await {
            Ok(()) => {
                self.stops.foreign_settled(true);
                false
            }
            // One bad record fails the request: each is tried alone, so only it is set aside.
            Err(SendFailure::Refused(_) | SendFailure::Conflict(_)) if request.stops.len() > 1 => {
                self.stops.split_first_foreign();
                false
            }
            Err(SendFailure::Refused(reason) | SendFailure::Conflict(reason)) => {
                error!(record_id = ?request.stops.first().map(|r| &r.record_id), %reason,
                       "ledger refused a STOP record a previous sidecar of this pod left; dropped: that STOP decision is missing from the audit chain");
                self.stops.foreign_settled(false);
                false
            }
            Err(
                SendFailure::Unavailable(_) | SendFailure::NotTheLedger(_) | SendFailure::Retry(_),
            ) => {
                self.stops.rotate_foreign();
                true
            }
        }
    }

    /// Sends up to one batch of this process's queued STOP records. Returns whether the ledger
    /// could not take it.
    async fn publish_own_stops(&self) -> bool {
        let mut batch = self.stops.take(STOP_RECORDS_MAX);
        if batch.is_empty() {
            return false;
        }
        match self.send_stops(batch.records().cloned().collect()).await {
            Ok(()) => {
                batch.published();
                false
            }
            // Malformed, or an id bound to other fields: no retry can change the answer. The
            // request fails as a whole, so each record is tried alone and only the bad ones are
            // set aside.
            Err(SendFailure::Refused(reason) | SendFailure::Conflict(reason)) => {
                if batch.len() == 1 {
                    self.refuse_stop(batch.refused_first(), &reason);
                    return false;
                }
                while let Some(record) = batch.first() {
                    match self.send_stops(vec![record]).await {
                        Ok(()) => batch.published_first(),
                        Err(SendFailure::Refused(why) | SendFailure::Conflict(why)) => {
                            self.refuse_stop(batch.refused_first(), &why);
                        }
                        // Gone again mid-way: the rest waits for the next pass.
                        Err(
                            SendFailure::Unavailable(_)
                            | SendFailure::NotTheLedger(_)
                            | SendFailure::Retry(_),
                        ) => return true,
                    }
                }
                false
            }
            Err(
                SendFailure::Unavailable(reason)
                | SendFailure::NotTheLedger(reason)
                | SendFailure::Retry(reason),
            ) => {
                tracing::debug!(records = batch.len(), %reason, "STOP records wait for the ledger");
                true
            }
        }
    }

    async fn send_stops(&self, stops: Vec<pb::StopRecord>) -> Result<(), SendFailure> {
        let request = pb::RecordStopsRequest {
            stops,
            ..stop_envelope(&self.identity, &self.bundle)
        };
        self.send_stop_request(request).await
    }

    async fn send_stop_request(&self, request: pb::RecordStopsRequest) -> Result<(), SendFailure> {
        self.ledger
            .clone()
            .record_stops(request)
            .await
            .map(|_| ())
            .map_err(|status| evidence_send_failure(&status))
    }

    /// A record the ledger refused for good: a call's STOP is still published, as part of its
    /// reason's count; a summary refused for good (a bug) is dropped and logged.
    fn refuse_stop(&self, record: Option<pb::StopRecord>, reason: &str) {
        let Some(record) = record else {
            return;
        };
        if record.call_id.is_empty() {
            self.stops.dropped(&record);
            error!(count = record.count, stop_reason = %record.reason, %reason,
                   "ledger refused a STOP summary; dropped: these STOP decisions are missing from the audit chain");
        } else {
            warn!(call_id = %record.call_id, stop_reason = %record.reason, %reason,
                  "ledger refused a STOP record; it is published as part of its reason's count");
            self.stops.unpublish(record);
        }
    }

    fn replay(
        &self,
        call_id: &str,
        fingerprint: &Fingerprint,
    ) -> Result<Option<Decision>, SidecarError> {
        let calls = self.calls.shard(call_id);
        let Some(entry) = calls.get(call_id) else {
            return Ok(None);
        };
        if &entry.fingerprint != fingerprint {
            return Err(SidecarError::IdempotencyConflict(call_id.to_owned()));
        }
        let mut decision = entry.decision.clone();
        decision.replayed = true;
        Ok(Some(decision))
    }

    /// Stores a fresh decision; a concurrent decide of the same call id that finished first wins,
    /// and this one is answered as its replay (the ledger made both the same reservation). A
    /// STOP's `stop` record is published only when its decision is the one kept, so replays point
    /// at that record; past the queue's bound it is published only as part of a count, no record
    /// carries its id, and the answer carries none.
    fn record(
        &self,
        call_id: &str,
        fingerprint: Fingerprint,
        decision: Decision,
        stop: Option<pb::StopRecord>,
    ) -> Decision {
        self.keep(call_id, fingerprint, decision, stop, |_| false)
    }

    /// Stores the answer that follows a REQUIRE_APPROVAL once its approval was decided: it
    /// replaces that REQUIRE_APPROVAL (or is stored, for a call the sidecar had forgotten). A
    /// concurrent retry that stored its answer first wins, and this one is its replay (a resumed
    /// call's retries share one reservation, so both answers hold the same). `stop`: as for
    /// [`Self::record`].
    fn supersede(
        &self,
        call_id: &str,
        fingerprint: Fingerprint,
        decision: Decision,
        stop: Option<pb::StopRecord>,
    ) -> Decision {
        self.keep(call_id, fingerprint, decision, stop, |stored| {
            stored.decision == Verdict::RequireApproval
        })
    }

    /// Stores `decision` as the call's answer unless the call table holds one that `replaceable`
    /// refuses to give up: then that one is the answer, as a replay, and this one is discarded.
    fn keep(
        &self,
        call_id: &str,
        fingerprint: Fingerprint,
        mut decision: Decision,
        stop: Option<pb::StopRecord>,
        replaceable: impl Fn(&Decision) -> bool,
    ) -> Decision {
        let mut calls = self.calls.shard(call_id);
        if let Some(existing) = calls.get(call_id) {
            if !replaceable(&existing.decision) {
                let mut replay = existing.decision.clone();
                replay.replayed = true;
                if decision.fail_open && !replay.fail_open {
                    // This decision is discarded and nothing goes through under it.
                    self.fail_open.withdraw(call_id);
                }
                return replay;
            }
            if decision.decision == Verdict::Continue {
                // The first CONTINUE this process answers for the call (it held REQUIRE_APPROVAL):
                // the one that goes ahead, though the ledger may have answered its reservation
                // as a replay of a concurrent retry's (which then gets this answer as its replay).
                decision.replayed = false;
            }
        }
        if let Some(stop) = stop
            && !self.stops.push(stop)
        {
            decision.evidence_id = None;
        }
        calls.insert(
            call_id.to_owned(),
            Box::new(CallEntry {
                fingerprint,
                decision: decision.clone(),
                settlement: None,
                decided_at: Instant::now(),
            }),
        );
        decision
    }

    /// Decides a call the sidecar has no answer for: the contract, then the ledger. `approved`:
    /// the call resumes under that approval (S16).
    async fn decide_fresh(
        &self,
        input: &DecideInput,
        approved: Option<&Approved>,
    ) -> Result<Decision, SidecarError> {
        let contract = &self.bundle.contract;
        let call = Call {
            provider: input.provider,
            model: input.model.clone(),
            input_tokens_upper_bound: input.input_tokens_upper_bound,
            max_output_tokens: input.max_output_tokens,
            choices: input.choices,
        };
        let planned = match evaluate_call(contract, &self.bundle.pricing, &call) {
            Ok(planned) => planned,
            Err(stop) => {
                return Ok(self.decision(input, Verdict::Stop, stop.reason.as_str(), stop.detail));
            }
        };
        let pricing_stale = match pricing_age(contract, &self.bundle.pricing, chrono::Utc::now()) {
            Ok(age) => age == PricingAge::Stale,
            Err(stop) => {
                let mut decision =
                    self.decision(input, Verdict::Stop, stop.reason.as_str(), stop.detail);
                decision.worst_case_nano_usd = planned.reserve.get();
                return Ok(decision);
            }
        };
        let mut decision = self
            .decide_planned(input, planned, pricing_stale, approved)
            .await?;
        decision.pricing_stale = pricing_stale;
        Ok(decision)
    }

    /// Reserves a call the contract lets through (and whose pricing it accepts) and decides on
    /// the ledger's answer. `pricing_stale` marks every record the ledger keeps of it.
    /// `approved`: the call resumes under that approval, with a reservation of its own (keyed by
    /// the call and the approval), and no soft cap asks again; the ledger still checks every
    /// hard cap, and an unavailable ledger fails it closed whatever the fail policy.
    async fn decide_planned(
        &self,
        input: &DecideInput,
        planned: Planned,
        pricing_stale: bool,
        approved: Option<&Approved>,
    ) -> Result<Decision, SidecarError> {
        let contract = &self.bundle.contract;
        if let Some(approved) = approved
            && planned.reserve.get() > approved.amount_nano_usd
        {
            // A retry of the call prices the same; more than was approved is another call.
            return Err(SidecarError::IdempotencyConflict(input.call_id.clone()));
        }
        let epoch = match self.lease.epoch_for_decision() {
            Ok(epoch) => epoch,
            Err(e) => return Err(SidecarError::LeaseUnavailable(e.to_string())),
        };
        let mut budget_ids = self.identity.budget_ids.clone();
        let mut run_budget_limit = None;
        if let (Some(run_id), Some(limit)) = (&input.run_id, contract.per_run_limit_nano_usd) {
            let run_budget = run_budget_id(run_id);
            budget_ids.push(run_budget.clone());
            run_budget_limit = Some((run_budget, limit.get()));
        }
        // What a fail-open record of this call would carry (built only when one is needed).
        let fail_open = |budget_ids: Vec<String>| FailOpenContext {
            resumed: approved.is_some(),
            epoch,
            budget_ids,
            run_budget: run_budget_limit.clone(),
            worst_case_nano_usd: planned.reserve.get(),
            pricing_stale,
        };
        if let (Some((run_budget, _)), Some(limit)) =
            (&run_budget_limit, contract.per_run_limit_nano_usd)
            && let Err(e) = self
                .ensure_run_budget(run_budget, limit)
                .await
                .map_err(|status| ledger_error(&status))
        {
            return self
                .unavailable(input, planned.max_output_tokens, e, fail_open(budget_ids))
                .await;
        }
        // Built again only for the retry after a refusal (below).
        let reserve_request = || pb::ReserveSetRequest {
            tenant_id: self.identity.tenant_id.clone(),
            idempotency_key: approved.map_or_else(
                || input.call_id.clone(),
                |a| resume_key(&input.call_id, &a.approval_id),
            ),
            budget_ids: budget_ids.clone(),
            amount_nano_usd: planned.reserve.get(),
            fencing: Some(self.fencing(epoch)),
            ttl_ms: u32::try_from(self.reservation_ttl.as_millis()).unwrap_or(u32::MAX),
            pricing: Some(pricing_ref(&self.bundle.pricing)),
            // A resumed call names its approval: the ledger checks it and records it with the
            // reservation.
            context: Some(pb::DecisionContext {
                approval_id: approved.map(|a| a.approval_id.clone()).unwrap_or_default(),
                ..self.ledger_context(input, pricing_stale)
            }),
            ..Default::default()
        };
        let request = reserve_request();
        // A call of the sidecar's own budgets (no run budget) may be admitted inside a credit.
        if run_budget_limit.is_none()
            && approved.is_none()
            && let Some(credits) = &self.credits
        {
            let admit_while_away = contract.fail_policy == FailPolicy::Open;
            match credits
                .admit(planned.reserve.get(), epoch, admit_while_away)
                .await
            {
                Admission::Admitted {
                    credit,
                    expires,
                    held,
                } => {
                    return Ok(self.admit_from_credit(
                        input,
                        &planned,
                        request,
                        (credit, expires, held),
                        &fail_open(budget_ids),
                    ));
                }
                Admission::NotInCredit => {}
                // As a ReserveSet refused or unanswered: fail closed (or open, by contract).
                Admission::Refused(status) => {
                    return self
                        .unavailable(
                            input,
                            planned.max_output_tokens,
                            ledger_error(&status),
                            fail_open(budget_ids),
                        )
                        .await;
                }
            }
        }
        let mut sent = self.ledger.clone().reserve_set(request).await;
        if let Ok(response) = &sent
            && matches!(
                response.get_ref().outcome,
                Some(pb::reserve_set_response::Outcome::Denied(_))
            )
            && self.settling.wait_for_earlier(SETTLING_WAIT_MAX).await
            // A refusal writes nothing, so the same key reserves now if the budget has room.
            // Only an answer replaces the refusal: a retry that fails (the ledger went away, the
            // lease moved) must not turn a STOP into a 503, let alone a fail-open call.
            && let Ok(again) = self.ledger.clone().reserve_set(reserve_request()).await
        {
            sent = Ok(again);
        }
        let response = match sent {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let error = ledger_error(&status);
                return self
                    .unavailable(
                        input,
                        planned.max_output_tokens,
                        error,
                        fail_open(budget_ids),
                    )
                    .await;
            }
        };
        let replayed = response.replayed;
        let mut decision = match response.outcome {
            Some(pb::reserve_set_response::Outcome::Denied(denied)) => {
                let mut decision = self.decision(
                    input,
                    Verdict::Stop,
                    ReasonCode::BudgetExhausted.as_str(),
                    format!(
                        "budget {} has {} nano-USD left; the call's worst case is {}",
                        denied.budget_id,
                        denied.remaining_nano_usd,
                        planned.reserve.get()
                    ),
                );
                decision.budget_id = Some(denied.budget_id);
                decision.worst_case_nano_usd = planned.reserve.get();
                decision
            }
            Some(pb::reserve_set_response::Outcome::Reserved(reserved))
                if replayed && reservation_resolved(reserved.state) =>
            {
                // A retry the sidecar does not remember (forgotten, decided before a restart, or
                // whose answer was lost) of a call whose reservation is already committed,
                // released or expired: nothing may be spent under it, whatever the balances say
                // now. A REQUIRE_APPROVAL released it at once: that decision is answered again,
                // with its approval; anything else is refused.
                let released = reserved.state == pb::ReservationState::Released as i32;
                if released
                    && approved.is_none()
                    && let Some(earlier) = self.approval_opened_for(input).await?
                {
                    earlier
                } else {
                    return Err(SidecarError::CallAlreadyResolved(input.call_id.clone()));
                }
            }
            Some(pb::reserve_set_response::Outcome::Reserved(reserved)) => {
                // A replay of a call that already opened an approval, whose reservation is still
                // open (the release after the approval failed): the call is that REQUIRE_APPROVAL
                // whatever the balances say now, so an approval always means that answer.
                if replayed
                    && approved.is_none()
                    && let Some(mut earlier) = self.approval_opened_for(input).await?
                {
                    self.release_reservation(
                        &reserved.reservation_id,
                        "approval_required",
                        Waiter::Caller,
                    )
                    .await?;
                    earlier.replayed = true;
                    return Ok(earlier);
                }
                let after: Vec<BudgetAfterReserve> =
                    reserved.balances.iter().map(budget_after).collect();
                let (mut reason, mut crossed) = match approved {
                    // The approver saw the call cross a soft cap and let it go ahead.
                    Some(_) => (ReasonCode::Approved, None),
                    None => evaluate_balances(contract, &after),
                };
                // Crossed while this sidecar's own earlier settlements were in flight: judged
                // again on the balances once they landed (this reservation is still held), if
                // they can be read and are of the windows it was reserved in; else it stands.
                if reason == ReasonCode::SoftCapReached
                    && self.settling.wait_for_earlier(SETTLING_WAIT_MAX).await
                    && let Some(now) = self.balances_of_windows(&reserved.balances).await
                {
                    let after: Vec<BudgetAfterReserve> = now.iter().map(budget_after).collect();
                    (reason, crossed) = evaluate_balances(contract, &after);
                }
                if reason == ReasonCode::SoftCapReached {
                    let crossed = crossed
                        .or_else(|| budget_ids.first().cloned())
                        .unwrap_or_default();
                    // The approval is recorded before the reservation goes back: if recording
                    // fails (503, whatever the fail policy), the reservation stays held until its
                    // TTL, so a retry of the call replays the same reservation, crosses the same
                    // soft cap and opens the approval then.
                    let approval_id = self
                        .open_approval(
                            input,
                            epoch,
                            budget_ids,
                            &crossed,
                            reserved.amount_nano_usd,
                            pricing_stale,
                        )
                        .await?;
                    // Approval comes before any spend: the reservation goes back at once.
                    self.release_reservation(
                        &reserved.reservation_id,
                        "approval_required",
                        Waiter::Caller,
                    )
                    .await?;
                    self.require_approval(input, crossed, approval_id)
                } else {
                    let mut decision =
                        self.decision(input, Verdict::Continue, reason.as_str(), String::new());
                    decision.approval_id = approved.map(|a| a.approval_id.clone());
                    decision.reservation_id = Some(reserved.reservation_id);
                    decision.reserved_nano_usd = reserved.amount_nano_usd;
                    decision.max_output_tokens = Some(planned.max_output_tokens);
                    decision
                }
            }
            None => return Err(SidecarError::Internal("ledger sent no outcome".into())),
        };
        decision.replayed = replayed;
        Ok(decision)
    }

    /// CONTINUE inside `credit`: the call's reservation is drawn from it in the background, under
    /// the id the ledger will give it.
    fn admit_from_credit(
        &self,
        input: &DecideInput,
        planned: &Planned,
        request: pb::ReserveSetRequest,
        (credit, expires, held): (String, Instant, TaskTrackerToken),
        context: &FailOpenContext,
    ) -> Decision {
        let Some(credits) = &self.credits else {
            unreachable!("admitted from a credit without credits")
        };
        let reservation_id = reservation_id_for(&self.identity.tenant_id, &input.call_id);
        let draw = credits.spawn_draw(
            (credit.clone(), expires, held),
            PendingDraw {
                draw: pb::ReserveSetRequest {
                    draw_from_reservation_id: credit,
                    // The call is already admitted: only its settlement may wait on the draw.
                    deferrable: input.settles == Waiter::Nobody,
                    ..request
                },
                if_lost: self.fail_open_request(input, context),
                worst_case_nano_usd: planned.reserve.get(),
            },
        );
        // A concurrent decide of the same call may have drawn first: its draw stands (the
        // ledger answers this one as a replay of it).
        self.credit_calls
            .shard(&input.call_id)
            .entry(input.call_id.clone())
            .or_insert_with(|| CreditCall {
                draw,
                decided_at: Instant::now(),
            });
        let mut decision = self.decision(
            input,
            Verdict::Continue,
            ReasonCode::WithinBudget.as_str(),
            String::new(),
        );
        decision.reservation_id = Some(reservation_id.to_string());
        decision.reserved_nano_usd = planned.reserve.get();
        decision.max_output_tokens = Some(planned.max_output_tokens);
        decision
    }

    /// Spools the commit of a call admitted inside a credit whose draw has not landed yet (the
    /// ledger is away, typically), under the reservation id the draw will have: a process
    /// killed before the draw lands leaves both to the pod's next process, which draws the call
    /// again (the draw journal) and then sends this commit (`lib.rs`). Whether it was spooled.
    fn hold_until_drawn(&self, call_id: &str, decision: &Decision, actual: NanoUsd) -> bool {
        if self.credits.is_none() {
            return false;
        }
        let drawing = self
            .credit_calls
            .shard(call_id)
            .get(call_id)
            .is_some_and(|c| *c.draw.borrow() == DrawState::Pending);
        let Some(reservation_id) = decision.reservation_id.clone().filter(|_| drawing) else {
            return false;
        };
        self.pending_commits.hold(&PendingCommit {
            call_id: call_id.to_owned(),
            reservation_id,
            actual_nano_usd: actual.get(),
            since_unix_ms: Utc::now().timestamp_millis(),
        });
        true
    }

    /// For a call admitted inside a credit, how its draw ended (`Drawn` with the reservation id
    /// to settle, or `Lost`: the call was queued as a fail-open call and settles as one); `None`
    /// for any other call.
    async fn credit_draw(&self, call_id: &str) -> Option<DrawState> {
        // Without credits, the settlement path takes no lock for them.
        self.credits.as_ref()?;
        let mut draw = self
            .credit_calls
            .shard(call_id)
            .get(call_id)
            .map(|c| c.draw.clone())?;
        let state = draw
            .wait_for(|s| *s != DrawState::Pending)
            .await
            .map(|s| s.clone())
            .unwrap_or_else(|_| DrawState::Lost("the draw was abandoned".into()));
        Some(state)
    }

    /// The REQUIRE_APPROVAL this call was answered with, if the ledger holds an approval opened
    /// for the call (keyed by its call id, as [`Self::open_approval`] opens it), in whatever
    /// state the approval is now. Only a call that crossed a soft cap opens one, and every
    /// replay of such a call answers this, so a call with an approval has no other answer.
    ///
    /// # Errors
    /// The ledger's failure (fail closed: the retry may try again).
    async fn approval_opened_for(
        &self,
        input: &DecideInput,
    ) -> Result<Option<Decision>, SidecarError> {
        let approval_id =
            spendguard_core::plan::approval_id_for(&self.identity.tenant_id, &input.call_id);
        let approval = self.get_approval(&approval_id.to_string()).await?;
        Ok(approval.map(|a| self.require_approval(input, a.budget_id, a.approval_id)))
    }

    /// The ledger's approval `approval_id` of this tenant, in whatever state it is now.
    ///
    /// # Errors
    /// The ledger's failure (fail closed: the retry may try again).
    async fn get_approval(&self, approval_id: &str) -> Result<Option<pb::Approval>, SidecarError> {
        let request = pb::GetApprovalRequest {
            tenant_id: self.identity.tenant_id.clone(),
            approval_id: approval_id.to_owned(),
        };
        match self.ledger.clone().get_approval(request).await {
            Ok(response) => Ok(response.into_inner().approval),
            Err(status) if error_code(&status) == Some(pb::ErrorCode::ApprovalNotFound) => Ok(None),
            Err(status) => Err(ledger_error(&status)),
        }
    }

    /// A retry of a call answered REQUIRE_APPROVAL (S16): where its approval stands now decides.
    /// Pending: REQUIRE_APPROVAL again. Denied (or cancelled): STOP `APPROVAL_DENIED`. Expired:
    /// STOP `APPROVAL_EXPIRED`. Approved: the call resumes through the contract and a fresh
    /// reservation of its own ([`resume_key`]), so approving never skips a check and a resumed
    /// call reserves once however often it is retried. The answer replaces `earlier` in the call
    /// table. Every STOP publishes its stop record, as any STOP does: an auditor finds each STOP
    /// answer's `evidence_id`, and beside it the approval's own event (`approval.denied`,
    /// `approval.expired`).
    ///
    /// # Errors
    /// The ledger's failure, fail closed whatever the contract's fail policy (a call past a soft
    /// cap never goes ahead unrecorded).
    async fn follow_approval(
        &self,
        input: &DecideInput,
        fingerprint: Fingerprint,
        mut earlier: Decision,
    ) -> Result<Decision, SidecarError> {
        earlier.replayed = true;
        let Some(approval_id) = earlier.approval_id.clone() else {
            return Ok(earlier);
        };
        let approval = self.get_approval(&approval_id).await?.ok_or_else(|| {
            SidecarError::Internal(format!("approval {approval_id} is not in the ledger"))
        })?;
        let state =
            pb::ApprovalState::try_from(approval.state).unwrap_or(pb::ApprovalState::Unspecified);
        let refused = |reason: ReasonCode, detail: String| {
            let mut decision = self.decision(input, Verdict::Stop, reason.as_str(), detail);
            decision.budget_id = Some(approval.budget_id.clone());
            decision.approval_id = Some(approval_id.clone());
            decision.worst_case_nano_usd = approval.amount_nano_usd;
            decision
        };
        let decision = match state {
            // Stored too when the sidecar had forgotten the call: the next retry asks the
            // approval alone, without replaying the call's reservation.
            pb::ApprovalState::Pending => earlier,
            pb::ApprovalState::Denied | pb::ApprovalState::Cancelled => refused(
                ReasonCode::ApprovalDenied,
                format!(
                    "approval {approval_id} was denied by {}: {}",
                    approval.resolved_by, approval.resolution_reason
                ),
            ),
            pb::ApprovalState::Expired => refused(
                ReasonCode::ApprovalExpired,
                format!("approval {approval_id} expired before anyone decided it"),
            ),
            pb::ApprovalState::Approved => {
                let approved = Approved {
                    approval_id: approval_id.clone(),
                    amount_nano_usd: approval.amount_nano_usd,
                };
                // Approved, then maybe stopped by a hard cap or the contract.
                self.decide_fresh(input, Some(&approved)).await?
            }
            pb::ApprovalState::Unspecified => {
                return Err(SidecarError::Internal(format!(
                    "approval {approval_id} is in no known state"
                )));
            }
        };
        let (decision, stop) = self.with_stop_record(input, decision);
        Ok(self.supersede(&input.call_id, fingerprint, decision, stop))
    }

    /// REQUIRE_APPROVAL: the call would take `crossed` past its soft cap (the only reason an
    /// approval is opened), and approval `approval_id` decides it.
    fn require_approval(
        &self,
        input: &DecideInput,
        crossed: String,
        approval_id: String,
    ) -> Decision {
        let mut decision = self.decision(
            input,
            Verdict::RequireApproval,
            ReasonCode::SoftCapReached.as_str(),
            format!(
                "the call would take a budget past its soft cap; approval {approval_id} decides it"
            ),
        );
        decision.budget_id = Some(crossed);
        decision.approval_id = Some(approval_id);
        decision
    }

    /// Records a pending approval in the ledger (CreateApproval, keyed by the call id) and
    /// returns its id.
    ///
    /// # Errors
    /// Always fail closed, whatever the contract's fail policy: an approval the ledger did not
    /// record cannot be resolved, and a soft cap is no reason to let a call through unrecorded.
    async fn open_approval(
        &self,
        input: &DecideInput,
        epoch: u64,
        budget_ids: Vec<String>,
        crossed: &str,
        amount_nano_usd: i64,
        pricing_stale: bool,
    ) -> Result<String, SidecarError> {
        let request = pb::CreateApprovalRequest {
            tenant_id: self.identity.tenant_id.clone(),
            idempotency_key: input.call_id.clone(),
            budget_ids,
            budget_id: crossed.to_owned(),
            amount_nano_usd,
            fencing: Some(self.fencing(epoch)),
            ttl_ms: APPROVAL_TTL_MS,
            // Crossing a soft cap is the only reason an approval is opened.
            reason_code: ReasonCode::SoftCapReached.as_str().to_owned(),
            requested_by: self.identity.scope_id.clone(),
            pricing: Some(pricing_ref(&self.bundle.pricing)),
            bundle_sha256_hex: self.bundle.sha256_hex.clone(),
            context: Some(self.ledger_context(input, pricing_stale)),
        };
        let created = self
            .ledger
            .clone()
            .create_approval(request)
            .await
            .map_err(|status| ledger_error(&status))?
            .into_inner();
        created
            .approval
            .map(|a| a.approval_id)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| SidecarError::Internal("ledger sent no approval".into()))
    }

    /// The ledger could not answer: fail closed, unless the contract is explicitly fail-open and
    /// the ledger is merely unreachable (never for fencing or configuration errors), and the
    /// decision's evidence record could be queued (a full queue fails closed).
    async fn unavailable(
        &self,
        input: &DecideInput,
        max_output_tokens: u32,
        error: SidecarError,
        context: FailOpenContext,
    ) -> Result<Decision, SidecarError> {
        let open = self.bundle.contract.fail_policy == FailPolicy::Open
            && !context.resumed
            && matches!(error, SidecarError::DependencyUnavailable(_));
        if !open {
            return Err(error);
        }
        let request = self.fail_open_request(input, &context);
        // The admission flushes the spool: on the blocking pool, so the runtime's workers (one,
        // under the injected sidecar's CPU limit) keep serving streams meanwhile.
        let queue = self.fail_open.clone();
        tokio::task::spawn_blocking(move || {
            queue.admit(request, context.worst_case_nano_usd, context.run_budget)
        })
        .await
        .map_err(|e| SidecarError::Internal(format!("fail-open admission: {e}")))??;
        warn!(call_id = %input.call_id, model = %input.model, error = %error,
              "ledger unavailable; fail-open contract lets the call through (record queued for the ledger)");
        let mut decision = self.decision(
            input,
            Verdict::Continue,
            "FAIL_OPEN",
            format!("ledger unavailable ({error}); contract fail policy is open"),
        );
        decision.fail_open = true;
        decision.max_output_tokens = Some(max_output_tokens);
        Ok(decision)
    }

    /// The evidence of a fail-open decision, as RecordFailOpen will send it (the actual cost is
    /// attached at settlement).
    fn fail_open_request(
        &self,
        input: &DecideInput,
        context: &FailOpenContext,
    ) -> pb::RecordFailOpenRequest {
        let decided_at_unix_ms = unix_ms_now();
        pb::RecordFailOpenRequest {
            tenant_id: self.identity.tenant_id.clone(),
            call_id: input.call_id.clone(),
            budget_ids: context.budget_ids.clone(),
            actual_nano_usd: 0,
            fencing: Some(self.fencing(context.epoch)),
            pricing: Some(pricing_ref(&self.bundle.pricing)),
            contract_sha256_hex: self.bundle.sha256_hex.clone(),
            decided_at_unix_ms,
            context: Some(self.ledger_context(input, context.pricing_stale)),
        }
    }

    /// What the ledger records of the call's decision (with its reservation, approval or
    /// fail-open record).
    fn ledger_context(&self, input: &DecideInput, pricing_stale: bool) -> pb::DecisionContext {
        pb::DecisionContext {
            run_id: input.run_id.clone().unwrap_or_default(),
            workflow_id: input.workflow_id.clone().unwrap_or_default(),
            call_id: input.call_id.clone(),
            provider: input.provider.as_str().to_owned(),
            model: input.model.clone(),
            contract_version: self.bundle.contract.version.clone(),
            pricing_stale,
            approval_id: String::new(),
        }
    }

    /// Sends the fail-open records that are ready (settled, or past the settle deadline, or
    /// all when `force`) to the ledger, one RecordFailOpen each. Returns how many are still
    /// queued because the ledger did not answer, or something else answered in its place (the
    /// caller backs off and calls again).
    pub async fn record_fail_open_batch(&self, force: bool) -> usize {
        let ready = self.fail_open.ready(force);
        let total = ready.len();
        let mut not_the_ledger = 0;
        for (sent, ready) in ready.into_iter().enumerate() {
            let call_id = ready.request.call_id.clone();
            let settlement_lost = ready.settlement_lost;
            match self.send_fail_open(ready).await {
                Ok(()) => self.fail_open.recorded(&call_id),
                Err(SendFailure::Conflict(reason)) if settlement_lost => {
                    // Sent before the restart with its actual cost; this copy lost its
                    // settlement and carries the worst case. The ledger's record stands.
                    warn!(call_id = %call_id, %reason,
                          "fail-open record from a previous run was already recorded with another amount; keeping the ledger's");
                    self.fail_open.recorded(&call_id);
                }
                Err(SendFailure::Unavailable(reason)) => {
                    // The ledger is still away: stop this pass, so one pass costs at most one
                    // RPC timeout however many records wait (shutdown stays bounded).
                    tracing::debug!(call_id = %call_id, %reason, "fail-open records wait for the ledger");
                    return total - sent;
                }
                Err(SendFailure::NotTheLedger(reason)) => {
                    // Perhaps this record's alone (a proxy's size rule): the others go on.
                    warn!(call_id = %call_id, %reason, "something other than the ledger answered a fail-open record; will retry");
                    not_the_ledger += 1;
                }
                Err(SendFailure::Retry(reason)) => {
                    warn!(call_id = %call_id, %reason, "ledger could not record a fail-open record yet; will retry");
                }
                Err(SendFailure::Refused(reason) | SendFailure::Conflict(reason)) => {
                    if self.fail_open.refused(&call_id) {
                        error!(call_id = %call_id, %reason,
                               "ledger refused a fail-open record too often; dropped: its evidence and spend are missing from the ledger");
                    } else {
                        warn!(call_id = %call_id, %reason, "ledger refused a fail-open record; will retry");
                    }
                }
            }
        }
        not_the_ledger
    }

    async fn send_fail_open(&self, ready: crate::fail_open::Ready) -> Result<(), SendFailure> {
        if let Some((budget_id, limit)) = &ready.run_budget {
            let limit = NanoUsd::new(*limit).map_err(|e| SendFailure::Refused(e.to_string()))?;
            match self.ensure_run_budget(budget_id, limit).await {
                Ok(()) => {}
                // The run's budget exists with another limit (the contract's per-run limit
                // changed, or someone else created it): it exists, which is all the record
                // needs. Dropping the record would lose the call's spend.
                Err(status) if error_code(&status) == Some(pb::ErrorCode::PermissionDenied) => {
                    warn!(budget_id = %budget_id, "run budget exists with another limit; recording the fail-open call against it");
                }
                // One classification for both RPCs of a record: the same answer keeps or drops it.
                Err(status) => {
                    return Err(match evidence_send_failure(&status) {
                        // Only RecordFailOpen's own conflict can mean "already recorded".
                        SendFailure::Conflict(reason) => SendFailure::Refused(reason),
                        other => other,
                    });
                }
            }
        }
        let response = self
            .ledger
            .clone()
            .record_fail_open(ready.request)
            .await
            .map_err(|status| evidence_send_failure(&status))?
            .into_inner();
        if response.epoch_stale {
            warn!(record_id = %response.record_id, epoch_current = response.epoch_current,
                  "fail-open record carries an epoch the lease has since moved past");
        }
        Ok(())
    }

    fn decision(
        &self,
        input: &DecideInput,
        verdict: Verdict,
        reason: &'static str,
        detail: String,
    ) -> Decision {
        Decision {
            decision: verdict,
            reason,
            detail,
            call_id: input.call_id.clone(),
            reservation_id: None,
            reserved_nano_usd: 0,
            max_output_tokens: None,
            budget_id: None,
            approval_id: None,
            contract_version: self.bundle.contract.version.clone(),
            pricing_version: self.bundle.pricing.version().to_owned(),
            pricing_sha256: self.bundle.pricing.sha256_hex().to_owned(),
            bundle_sha256: self.bundle.sha256_hex.clone(),
            fail_open: false,
            pricing_stale: false,
            replayed: false,
            evidence_id: None,
            worst_case_nano_usd: 0,
        }
    }

    /// The current balances of the budgets of `reserved` (a reservation's balances), or `None`
    /// when they cannot be read or a window has rolled over since (another window's balance says
    /// nothing about this reservation's).
    async fn balances_of_windows(
        &self,
        reserved: &[pb::BudgetBalance],
    ) -> Option<Vec<pb::BudgetBalance>> {
        let now = self
            .ledger
            .clone()
            .get_balances(pb::GetBalancesRequest {
                tenant_id: self.identity.tenant_id.clone(),
                budget_ids: reserved.iter().map(|b| b.budget_id.clone()).collect(),
            })
            .await
            .ok()?
            .into_inner()
            .balances;
        of_same_windows(now, reserved)
    }

    async fn ensure_run_budget(
        &self,
        budget_id: &str,
        limit: NanoUsd,
    ) -> Result<(), tonic::Status> {
        if self.run_budgets.contains(budget_id) {
            return Ok(());
        }
        self.ledger
            .clone()
            .upsert_budget(pb::UpsertBudgetRequest {
                tenant_id: self.identity.tenant_id.clone(),
                budget_id: budget_id.to_owned(),
                limit_nano_usd: limit.get(),
                soft_cap_nano_usd: 0,
                window: pb::BudgetWindow::Lifetime.into(),
            })
            .await?;
        self.run_budgets.insert(budget_id);
        Ok(())
    }

    /// Commits `spend` for a CONTINUE decision, priced at the decision's frozen snapshot.
    /// A retry after success returns the original amounts with `replayed`.
    ///
    /// # Errors
    /// [`SidecarError`] when the call is unknown, holds no reservation or was released, or the
    /// ledger is unavailable (retry later; the reservation's TTL bounds the wait). A commit after
    /// the TTL is booked late ([`Committed::late`]).
    pub async fn commit(
        &self,
        call_id: &str,
        spend: Spend,
        waiter: Waiter,
    ) -> Result<Committed, SidecarError> {
        let (decision, settled, fingerprint) = self.open_call(call_id)?;
        let actual = self.price(&decision, &fingerprint, spend)?;
        match settled {
            Some(Settlement::Committed(c)) if c.actual_nano_usd == actual.get() => {
                return Ok(Committed {
                    replayed: true,
                    ..c
                });
            }
            Some(_) => return Err(SidecarError::CallAlreadyResolved(call_id.to_owned())),
            None => {}
        }
        let held_before_draw =
            waiter == Waiter::Nobody && self.hold_until_drawn(call_id, &decision, actual);
        let draw = self.credit_draw(call_id).await;
        if decision.fail_open || matches!(draw, Some(DrawState::Lost(_))) {
            warn!(
                call_id,
                actual_nano_usd = actual.get(),
                "fail-open call settled without a reservation; its cost goes to the ledger with its record"
            );
            self.fail_open.settle(call_id, actual.get());
            if held_before_draw {
                self.pending_commits.settled(call_id);
            }
            let committed = Committed {
                actual_nano_usd: actual.get(),
                committed_nano_usd: 0,
                released_nano_usd: 0,
                overrun_nano_usd: actual.get(),
                replayed: false,
                late: false,
            };
            return Ok(self.settle(call_id, Settlement::Committed(committed)));
        }
        let reservation_id = match draw {
            Some(DrawState::Drawn(id)) => id,
            _ => decision
                .reservation_id
                .clone()
                .ok_or_else(|| SidecarError::NoReservation(call_id.to_owned()))?,
        };
        // Kept since before the draw: the 24 h bound runs from then.
        let since_unix_ms = || {
            self.pending_commits
                .get(call_id)
                .filter(|_| held_before_draw)
                .map_or_else(|| Utc::now().timestamp_millis(), |p| p.since_unix_ms)
        };
        // Spooled before the draw under the call's own key, and drawn under a key of its own (a
        // reused call id): the spooled entry must name the reservation the commit goes to.
        if held_before_draw && decision.reservation_id.as_deref() != Some(reservation_id.as_str()) {
            self.pending_commits.hold(&PendingCommit {
                call_id: call_id.to_owned(),
                reservation_id: reservation_id.clone(),
                actual_nano_usd: actual.get(),
                since_unix_ms: since_unix_ms(),
            });
        }
        // A background commit the ledger cannot take now is spooled before the error goes
        // back to the retry loop: a process killed meanwhile leaves it to the next one.
        // Only the background path keeps entries: a decision-API caller got the error. A call
        // with a pending commit is retried by reservation id (`commit_left_over`), never here.
        let sent = self
            .commit_reservation(
                call_id,
                &reservation_id,
                actual.get(),
                waiter == Waiter::Nobody,
            )
            .await;
        let response = match sent {
            Ok(response) => {
                if held_before_draw {
                    self.pending_commits.settled(call_id);
                }
                response
            }
            Err(error) => {
                if waiter == Waiter::Nobody && error.settlement_may_land_later() {
                    self.pending_commits.hold(&PendingCommit {
                        call_id: call_id.to_owned(),
                        reservation_id,
                        actual_nano_usd: actual.get(),
                        since_unix_ms: since_unix_ms(),
                    });
                } else if held_before_draw {
                    self.pending_commits.settled(call_id);
                }
                return Err(error);
            }
        };
        if response.late {
            warn!(
                call_id,
                actual_nano_usd = actual.get(),
                "the call outlived its reservation's TTL; the ledger booked its usage as an overrun"
            );
        }
        let committed = Committed {
            actual_nano_usd: actual.get(),
            committed_nano_usd: response.committed_nano_usd,
            released_nano_usd: response.released_nano_usd,
            overrun_nano_usd: response.overrun_nano_usd,
            replayed: false,
            late: response.late,
        };
        Ok(self.settle(call_id, Settlement::Committed(committed)))
    }

    /// Sends a pending commit by reservation id: one a previous process of this pod left in the
    /// spool (this process never saw the call), or a retry of this process's own
    /// (`pending_commits.rs`). `Ok` once the ledger has it (or the call's fail-open record took
    /// its usage), then forgotten; a refusal that cannot pass later forgets it too.
    ///
    /// # Errors
    /// The ledger's refusal; while [`SidecarError::settlement_may_land_later`], it stays.
    pub async fn commit_left_over(
        &self,
        commit: &PendingCommit,
    ) -> Result<CommitOutcome, SidecarError> {
        // A call admitted inside a credit whose draw was lost after all (its predecessor's, or
        // at the redraw): its fail-open record is queued, unsettled, at its worst case. Its
        // usage settles that record, as if the commit had found the draw lost.
        if self.fail_open.worst_case(&commit.call_id).is_some() {
            self.fail_open
                .settle(&commit.call_id, commit.actual_nano_usd);
            self.pending_commits.settled(&commit.call_id);
            return Ok(CommitOutcome::FailOpenRecord);
        }
        let sent = self
            .commit_reservation(
                &commit.call_id,
                &commit.reservation_id,
                commit.actual_nano_usd,
                true,
            )
            .await;
        match &sent {
            Err(e) if e.settlement_may_land_later() => {
                return sent
                    .map(|response| CommitOutcome::of(response.late, response.overrun_nano_usd));
            }
            Err(_) => {}
            // A call this process still knows is settled now, as if its first attempt had landed.
            Ok(response) => {
                let _: Committed = self.settle(
                    &commit.call_id,
                    Settlement::Committed(Committed {
                        actual_nano_usd: commit.actual_nano_usd,
                        committed_nano_usd: response.committed_nano_usd,
                        released_nano_usd: response.released_nano_usd,
                        overrun_nano_usd: response.overrun_nano_usd,
                        replayed: false,
                        late: response.late,
                    }),
                );
            }
        }
        self.pending_commits.settled(&commit.call_id);
        sent.map(|response| CommitOutcome::of(response.late, response.overrun_nano_usd))
    }

    /// Commits `actual` to the reservation under this sidecar's current epoch (a reservation made
    /// under an earlier epoch of the same scope included).
    async fn commit_reservation(
        &self,
        call_id: &str,
        reservation_id: &str,
        actual_nano_usd: i64,
        deferrable: bool,
    ) -> Result<pb::CommitResponse, SidecarError> {
        let epoch = self
            .lease
            .epoch_for_settlement()
            .map_err(|e| SidecarError::LeaseUnavailable(e.to_string()))?;
        self.ledger
            .clone()
            .commit(pb::CommitRequest {
                tenant_id: self.identity.tenant_id.clone(),
                reservation_id: reservation_id.to_owned(),
                actual_nano_usd,
                fencing: Some(self.fencing(epoch)),
                deferrable,
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| settle_error(call_id, &status))
    }

    /// Keeps `commit` as the call's pending commit (in the spool, if there is one), replacing
    /// what was kept for the call.
    pub fn hold_pending_commit(&self, commit: &PendingCommit) {
        self.pending_commits.hold(commit);
    }

    /// Forgets a background commit's spooled entry: its retries have given up.
    pub fn abandon_pending_commit(&self, call_id: &str) {
        self.pending_commits.settled(call_id);
    }

    /// The call's background commit, once its first attempt failed: retries send it by
    /// reservation id, so it settles even after the call table forgot the call.
    pub fn pending_commit(&self, call_id: &str) -> Option<PendingCommit> {
        self.pending_commits.get(call_id)
    }

    /// Releases a CONTINUE decision's reservation. A retry returns the original amount with
    /// `replayed`.
    ///
    /// # Errors
    /// As [`Decider::commit`].
    pub async fn release(
        &self,
        call_id: &str,
        reason: &str,
        waiter: Waiter,
    ) -> Result<Released, SidecarError> {
        spendguard_core::ids::check_text("reason", reason, 64)
            .map_err(|e| SidecarError::invalid("reason", e.to_string()))?;
        let (decision, settled, _) = self.open_call(call_id)?;
        match settled {
            Some(Settlement::Released(r)) => {
                return Ok(Released {
                    replayed: true,
                    ..r
                });
            }
            Some(Settlement::Committed(_)) => {
                return Err(SidecarError::CallAlreadyResolved(call_id.to_owned()));
            }
            None => {}
        }
        let draw = self.credit_draw(call_id).await;
        if decision.fail_open || matches!(draw, Some(DrawState::Lost(_))) {
            // Nothing was spent (or the caller says so): the record still goes to the ledger.
            self.fail_open.settle(call_id, 0);
            let released = Released {
                released_nano_usd: 0,
                replayed: false,
            };
            return Ok(self.settle(call_id, Settlement::Released(released)));
        }
        let reservation_id = match draw {
            Some(DrawState::Drawn(id)) => id,
            _ => decision
                .reservation_id
                .ok_or_else(|| SidecarError::NoReservation(call_id.to_owned()))?,
        };
        let released_nano_usd = self
            .release_reservation(&reservation_id, reason, waiter)
            .await?;
        let released = Released {
            released_nano_usd,
            replayed: false,
        };
        Ok(self.settle(call_id, Settlement::Released(released)))
    }

    async fn release_reservation(
        &self,
        reservation_id: &str,
        reason: &str,
        waiter: Waiter,
    ) -> Result<i64, SidecarError> {
        let epoch = self
            .lease
            .epoch_for_settlement()
            .map_err(|e| SidecarError::LeaseUnavailable(e.to_string()))?;
        let response = self
            .ledger
            .clone()
            .release(pb::ReleaseRequest {
                tenant_id: self.identity.tenant_id.clone(),
                reservation_id: reservation_id.to_owned(),
                fencing: Some(self.fencing(epoch)),
                reason: reason.to_owned(),
                deferrable: waiter == Waiter::Nobody,
            })
            .await
            .map_err(|status| settle_error(reservation_id, &status))?;
        Ok(response.into_inner().released_nano_usd)
    }

    /// The call's decision, its settlement so far, and what was decided on (for pricing).
    fn open_call(
        &self,
        call_id: &str,
    ) -> Result<(Decision, Option<Settlement>, Fingerprint), SidecarError> {
        check_call_id(call_id)?;
        let calls = self.calls.shard(call_id);
        let entry = calls
            .get(call_id)
            .ok_or_else(|| SidecarError::CallNotFound(call_id.to_owned()))?;
        if entry.decision.decision != Verdict::Continue {
            return Err(SidecarError::NoReservation(call_id.to_owned()));
        }
        Ok((
            entry.decision.clone(),
            entry.settlement,
            entry.fingerprint.clone(),
        ))
    }

    fn settle<T>(&self, call_id: &str, settlement: Settlement) -> T
    where
        T: From<Settlement>,
    {
        let mut calls = self.calls.shard(call_id);
        let stored = match calls.get_mut(call_id) {
            Some(entry) => *entry.settlement.get_or_insert(settlement),
            None => settlement,
        };
        T::from(stored)
    }

    fn price(
        &self,
        decision: &Decision,
        fingerprint: &Fingerprint,
        spend: Spend,
    ) -> Result<NanoUsd, SidecarError> {
        // What cannot undercount when the usage is unknown: the reservation, or for a fail-open
        // call (which reserved nothing) the worst case it was admitted with.
        let floor = if decision.fail_open {
            self.fail_open
                .worst_case(&decision.call_id)
                .unwrap_or(decision.reserved_nano_usd)
        } else {
            decision.reserved_nano_usd
        };
        let reserved = NanoUsd::new(floor).map_err(|e| SidecarError::Internal(e.to_string()))?;
        let usage = match spend {
            Spend::Usage(usage) => usage,
            Spend::Unreported => return Ok(reserved),
        };
        match self
            .bundle
            .pricing
            .price(fingerprint.provider, &fingerprint.model)
        {
            Ok(price) => usage
                .cost(price)
                .map_err(|e| SidecarError::UsageInvalid(e.to_string())),
            // Admitted under an explicit ceiling: the ceiling is what it costs.
            Err(PricingError::UnknownModel { .. }) => Ok(reserved),
            Err(e) => Err(SidecarError::Internal(e.to_string())),
        }
    }

    fn fencing(&self, epoch: u64) -> pb::FencingToken {
        pb::FencingToken {
            scope_id: self.identity.scope_id.clone(),
            epoch,
        }
    }

    /// Forgets calls decided more than `age` ago (their reservations expired on the ledger by
    /// then). Returns how many were dropped.
    pub fn forget_older_than(&self, age: Duration) -> usize {
        let now = Instant::now();
        self.credit_calls
            .retain(|call| now.duration_since(call.decided_at) < age);
        let mut dropped = 0;
        self.calls.retain(|entry| {
            let keep = now.duration_since(entry.decided_at) < age;
            dropped += usize::from(!keep);
            keep
        });
        dropped
    }

    /// Calls holding a reservation that is not settled yet and has no pending commit (the
    /// ledger's TTL sweep releases those if the process stops now).
    pub fn open_reservations(&self) -> usize {
        self.calls.count(|e| {
            e.decision.reservation_id.is_some()
                && e.settlement.is_none()
                && !self.pending_commits.contains(&e.decision.call_id)
        })
    }

    /// Commits the ledger has not taken yet, kept for retries (and in the spool, for the pod's
    /// next process).
    pub fn pending_commits(&self) -> usize {
        self.pending_commits.len()
    }

    /// How long a reservation lives on the ledger.
    pub fn reservation_ttl(&self) -> Duration {
        self.reservation_ttl
    }
}

/// What a fail-open decision's record needs from the decision in progress.
struct FailOpenContext {
    /// The call resumes under an approval: it never goes ahead unrecorded, whatever the fail
    /// policy (its retry resumes it once the ledger is back).
    resumed: bool,
    epoch: u64,
    budget_ids: Vec<String>,
    run_budget: Option<(String, i64)>,
    worst_case_nano_usd: i64,
    pricing_stale: bool,
}

impl From<Settlement> for Committed {
    fn from(s: Settlement) -> Self {
        match s {
            Settlement::Committed(c) => c,
            Settlement::Released(r) => Self {
                actual_nano_usd: 0,
                committed_nano_usd: 0,
                released_nano_usd: r.released_nano_usd,
                overrun_nano_usd: 0,
                replayed: true,
                late: false,
            },
        }
    }
}

impl From<Settlement> for Released {
    fn from(s: Settlement) -> Self {
        match s {
            Settlement::Released(r) => r,
            Settlement::Committed(c) => Self {
                released_nano_usd: c.released_nano_usd,
                replayed: true,
            },
        }
    }
}

fn budget_after(balance: &pb::BudgetBalance) -> BudgetAfterReserve {
    let used = balance
        .committed_nano_usd
        .saturating_add(balance.reserved_nano_usd)
        .saturating_add(balance.overrun_nano_usd);
    BudgetAfterReserve {
        budget_id: balance.budget_id.clone(),
        soft_cap: (balance.soft_cap_nano_usd > 0)
            .then(|| NanoUsd::new(balance.soft_cap_nano_usd).ok())
            .flatten(),
        used_and_reserved: NanoUsd::new(used).unwrap_or(NanoUsd::ZERO),
    }
}

/// What every RecordStops request of this sidecar carries besides its records.
pub fn stop_envelope(identity: &Identity, bundle: &Bundle) -> pb::RecordStopsRequest {
    pb::RecordStopsRequest {
        tenant_id: identity.tenant_id.clone(),
        fencing_scope_id: identity.scope_id.clone(),
        pricing: Some(pricing_ref(&bundle.pricing)),
        contract_sha256_hex: bundle.sha256_hex.clone(),
        stops: Vec::new(),
    }
}

/// An approval a call resumes under (S16).
#[derive(Debug, Clone)]
struct Approved {
    approval_id: String,
    /// What the approver saw the call's worst case as: the resumed call may reserve up to it.
    amount_nano_usd: i64,
}

/// Checks a call id: 1 to 128 of `[A-Za-z0-9._:-]`.
///
/// # Errors
/// [`SidecarError::InvalidArgument`] naming `call_id`.
pub fn check_call_id(call_id: &str) -> Result<(), SidecarError> {
    let ok = !call_id.is_empty()
        && call_id.len() <= CALL_ID_LEN_MAX
        && call_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SidecarError::invalid(
            "call_id",
            "must be 1 to 128 of A-Z a-z 0-9 . _ : -",
        ))
    }
}

/// Longest run id: its budget id (`runs/<run id>`) must fit a budget id's 253 characters.
const RUN_ID_LEN_MAX: usize = 253 - RUN_BUDGET_PREFIX.len();

/// The budget a run's per-run limit is kept in.
fn run_budget_id(run_id: &str) -> String {
    format!("{RUN_BUDGET_PREFIX}{run_id}")
}

/// Whether a replayed reservation can no longer be spent under: anything but OPEN, or
/// UNSPECIFIED from a ledger older than the state field (read as open, what it meant then).
/// A value this sidecar does not know counts as resolved.
fn reservation_resolved(state: i32) -> bool {
    state != pb::ReservationState::Open as i32 && state != pb::ReservationState::Unspecified as i32
}

/// Maps a failed ledger RPC of a decision.
fn ledger_error(status: &tonic::Status) -> SidecarError {
    use pb::ErrorCode as C;
    let message = status.message().to_owned();
    let code = match Answer::of(status) {
        Answer::Code(code) => code,
        // A code this sidecar does not know (a newer ledger): the ledger answered, so it is not
        // an unreachable ledger, which a fail-open contract would let through.
        Answer::UnknownCode(code) => {
            return SidecarError::LedgerAnswerUnreadable(format!(
                "the ledger answered with error code {code}, which this sidecar does not know: \
                 {message}"
            ));
        }
        // No ErrorDetail, and the transport failed (connection refused, timeout).
        Answer::NoAnswer(grpc) => {
            return SidecarError::DependencyUnavailable(format!("{grpc:?}: {message}"));
        }
        // No ErrorDetail under another gRPC code: not the ledger's answer.
        Answer::Unreadable(grpc) => {
            return SidecarError::LedgerAnswerUnreadable(format!(
                "{grpc:?} without the ledger's error detail: {message}"
            ));
        }
    };
    match code {
        C::FencingEpochStale
        | C::FencingLeaseHeld
        | C::FencingLeaseExpired
        | C::FencingScopeNotFound
        | C::FencingEpochMissing => SidecarError::LeaseUnavailable(message),
        // A resumed call the ledger finds its approval does not cover (the sidecar checks the
        // amount first; other budgets already conflict with the call's first reservation):
        // another call.
        C::IdempotencyConflict | C::ApprovalNotApproved | C::ApprovalNotFound => {
            SidecarError::IdempotencyConflict(message)
        }
        // PERMISSION_DENIED: a run budget exists with another limit (the contract's per-run
        // limit changed under a live run), or the sidecar was pointed at a listener that refuses it.
        C::TenantNotFound | C::BudgetNotFound | C::BudgetInvalid | C::PermissionDenied => {
            SidecarError::Misconfigured(message)
        }
        C::Overloaded | C::DependencyUnavailable | C::ShuttingDown => {
            SidecarError::DependencyUnavailable(message)
        }
        C::EvidenceBacklog => SidecarError::EvidenceBacklog(message),
        C::SigningUnavailable => SidecarError::SigningUnavailable(message),
        _ => SidecarError::Internal(message),
    }
}

/// `text` without control characters (the ledger refuses them), cut to at most `max` bytes on a
/// character boundary (the ledger refuses longer), marked with `…` when cut.
fn fit_text(text: &str, max: usize) -> String {
    let clean: String = text.chars().filter(|c| !c.is_control()).collect();
    if clean.len() <= max {
        return clean;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !clean.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    format!("{}…", &clean[..end])
}

/// Now, in Unix milliseconds (at least 1: the ledger refuses 0).
fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .max(1)
}

/// Classifies a failed evidence send (RecordFailOpen, RecordStops). Only an answer that can never
/// change (a malformed record, an id bound to other fields, a request this listener refuses) is
/// a refusal; anything else keeps the record, because dropping it loses evidence (and, for a
/// fail-open call, its spend).
fn evidence_send_failure(status: &tonic::Status) -> SendFailure {
    use pb::ErrorCode as C;
    let message = status.message().to_owned();
    let answer = Answer::of(status);
    if answer.ledger_away() {
        return SendFailure::Unavailable(format!("{:?}: {message}", status.code()));
    }
    // Only the ledger's own word can refuse a record. An answer that is not the ledger's (an
    // older ledger without the method, a proxy in between) keeps it, and is offered again
    // after a backoff.
    if !answer.from_the_ledger() {
        return SendFailure::NotTheLedger(format!("{:?}: {message}", status.code()));
    }
    match answer.code() {
        Some(C::IdempotencyConflict) => SendFailure::Conflict(message),
        Some(C::PermissionDenied) => SendFailure::Refused(message),
        _ if status.code() == tonic::Code::InvalidArgument => SendFailure::Refused(message),
        _ => SendFailure::Retry(message),
    }
}

/// Whether a failed ledger RPC says only that the ledger is away for now (unreachable,
/// overloaded, shutting down, unable to sign evidence): the same request may be answered later.
/// (Never a reason to fail open: only [`SidecarError::DependencyUnavailable`] is.)
pub(crate) fn ledger_away(status: &tonic::Status) -> bool {
    Answer::of(status).ledger_away()
}

/// Maps a failed ledger RPC of a settlement.
fn settle_error(call_id: &str, status: &tonic::Status) -> SidecarError {
    use pb::ErrorCode as C;
    match error_code(status) {
        Some(C::ReservationExpired) => SidecarError::ReservationExpired(call_id.to_owned()),
        Some(C::ReservationAlreadyResolved) => {
            SidecarError::CallAlreadyResolved(call_id.to_owned())
        }
        _ => ledger_error(status),
    }
}

/// Where a commit's usage went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Committed to its reservation; usage above it, if any, booked as an overrun (the guard's
    /// worst case undercounted).
    Committed {
        /// What the usage cost above the reservation.
        overrun_nano_usd: i64,
    },
    /// Committed after its reservation's TTL: booked late, all of it overrun.
    CommittedLate,
    /// Its credit draw was lost: the call's fail-open record took its usage instead.
    FailOpenRecord,
}

impl CommitOutcome {
    /// A commit the ledger took: late, or on time with `overrun_nano_usd` above its reservation.
    pub const fn of(late: bool, overrun_nano_usd: i64) -> Self {
        if late {
            Self::CommittedLate
        } else {
            Self::Committed { overrun_nano_usd }
        }
    }

    /// The settlement metric's outcome.
    pub const fn outcome(self) -> &'static str {
        match self {
            Self::Committed { .. } => "commit",
            Self::CommittedLate => "commit_late",
            Self::FailOpenRecord => "fail_open",
        }
    }
}

/// Balances read after a reservation, if they are of the windows it reserved in (the same
/// budgets, in the same order, with the same window starts): a window that rolled over meanwhile
/// says nothing about the reservation's, so its verdict is not judged again on it.
fn of_same_windows(
    now: Vec<pb::BudgetBalance>,
    reserved: &[pb::BudgetBalance],
) -> Option<Vec<pb::BudgetBalance>> {
    let same_windows = now.len() == reserved.len()
        && now.iter().zip(reserved).all(|(now, then)| {
            now.budget_id == then.budget_id && now.window_start_unix_ms == then.window_start_unix_ms
        });
    same_windows.then_some(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use spendguard_core::LedgerError;
    use spendguard_ledger::error::Error as LedgerServiceError;
    use spendguard_ledger::grpc::status;

    fn failure(error: LedgerServiceError) -> SendFailure {
        evidence_send_failure(&status(&error))
    }

    #[test]
    fn stop_text_is_fitted_to_the_ledgers_limits() {
        assert_eq!(fit_text("gpt-4o", 256), "gpt-4o");
        assert_eq!(fit_text("a\u{0}b\nc", 256), "abc");
        let long = "é".repeat(300);
        let fitted = fit_text(&long, 256);
        assert!(fitted.len() <= 256, "{}", fitted.len());
        assert!(fitted.ends_with('…'));
        assert!(fitted.starts_with("éé"));
    }

    #[test]
    fn only_answers_that_cannot_change_drop_a_fail_open_record() {
        // Transport failures and an overloaded or unreachable database: wait for the ledger.
        assert!(matches!(
            evidence_send_failure(&tonic::Status::unavailable("connection refused")),
            SendFailure::Unavailable(_)
        ));
        assert!(matches!(
            failure(LedgerServiceError::Overloaded),
            SendFailure::Unavailable(_)
        ));
        assert!(matches!(
            failure(LedgerServiceError::Database("down".into())),
            SendFailure::Unavailable(_)
        ));
        // A ledger that cannot sign for now is away too (credit draws wait for it instead of
        // giving up), and never a reason to fail open.
        let unsigned = status(&LedgerServiceError::Signing(
            "SIGNING_KEY_UNAVAILABLE".into(),
        ));
        assert!(ledger_away(&unsigned));
        assert!(matches!(
            evidence_send_failure(&unsigned),
            SendFailure::Unavailable(_)
        ));
        assert!(matches!(
            ledger_error(&unsigned),
            SidecarError::SigningUnavailable(_)
        ));
        // A code this sidecar does not know (a newer ledger's) fails closed, never as an
        // unreachable ledger (which a fail-open contract lets through); a bare transport error
        // is the unreachable ledger.
        let mut newer = tonic::Status::with_details(
            tonic::Code::Unavailable,
            "SOMETHING_NEW: x",
            prost::Message::encode_to_vec(&pb::ErrorDetail {
                code: 999,
                message: "SOMETHING_NEW: x".into(),
                field: String::new(),
            })
            .into(),
        );
        newer.metadata_mut().insert(
            spendguard_proto::ledger::ERROR_CODE_HEADER,
            "SOMETHING_NEW".parse().unwrap(),
        );
        assert_eq!(Answer::of(&newer), Answer::UnknownCode(999));
        assert!(matches!(
            ledger_error(&newer),
            SidecarError::LedgerAnswerUnreadable(_)
        ));
        assert!(!ledger_away(&newer), "credit draws and evidence sends too");
        let refused = tonic::Status::unavailable("connection refused");
        assert!(matches!(
            ledger_error(&refused),
            SidecarError::DependencyUnavailable(_)
        ));
        assert!(ledger_away(&refused));
        // The ledger answered, but the answer can pass: keep the record, without a limit.
        assert!(matches!(
            failure(LedgerServiceError::ProducerInstanceConflict(
                "ledger-0".into()
            )),
            SendFailure::Retry(_)
        ));
        assert!(matches!(
            failure(LedgerServiceError::Invariant("x".into())),
            SendFailure::Retry(_)
        ));
        assert!(matches!(
            failure(LedgerServiceError::Refused(LedgerError::TenantNotFound(
                "t".into()
            ))),
            SendFailure::Retry(_)
        ));
        // Only a record that can never be recorded counts towards dropping it (a conflict is
        // such a record, unless it comes from a previous run: see record_fail_open_batch).
        assert!(matches!(
            failure(LedgerServiceError::Refused(
                LedgerError::IdempotencyConflict("call-1".into())
            )),
            SendFailure::Conflict(_)
        ));
        assert!(matches!(
            failure(LedgerServiceError::Refused(LedgerError::InvalidArgument {
                field: "call_id",
                reason: "empty".into(),
            })),
            SendFailure::Refused(_)
        ));
        // Without the ledger's detail nothing is refused for good, and only a transport failure
        // is the ledger away: a method a ledger does not serve, a proxy's refusal or a reset
        // stream is neither a reason to fail open nor one to drop evidence.
        for code in [
            tonic::Code::Unimplemented,
            tonic::Code::Internal,
            tonic::Code::InvalidArgument,
            tonic::Code::PermissionDenied,
        ] {
            let bare = tonic::Status::new(code, "not the ledger");
            assert!(!ledger_away(&bare), "{code:?}");
            assert!(
                matches!(evidence_send_failure(&bare), SendFailure::NotTheLedger(_)),
                "{code:?}"
            );
            let error = ledger_error(&bare);
            assert!(
                matches!(error, SidecarError::LedgerAnswerUnreadable(_)),
                "{code:?}"
            );
            assert!(error.settlement_may_land_later(), "{code:?}");
        }
    }

    #[test]
    fn a_soft_cap_is_judged_again_only_on_balances_of_the_reserved_windows() {
        let balance = |budget: &str, window_start: i64, reserved: i64| pb::BudgetBalance {
            budget_id: budget.into(),
            window_start_unix_ms: window_start,
            reserved_nano_usd: reserved,
            ..Default::default()
        };
        let day = 86_400_000;
        let reserved = [balance("team", day, 900), balance("tenant", 0, 900)];
        let later = vec![balance("team", day, 300), balance("tenant", 0, 300)];
        assert_eq!(of_same_windows(later.clone(), &reserved), Some(later));
        // The day rolled over between the reservation and the read: the new day's balance
        // (nearly empty) must not clear a soft cap the old day's reservation crossed.
        let rolled = vec![balance("team", 2 * day, 0), balance("tenant", 0, 300)];
        assert_eq!(of_same_windows(rolled, &reserved), None);
        // Another budget, or fewer balances, than were reserved.
        let other = vec![balance("other", day, 0), balance("tenant", 0, 300)];
        assert_eq!(of_same_windows(other, &reserved), None);
        assert_eq!(
            of_same_windows(vec![balance("team", day, 0)], &reserved),
            None
        );
    }
}
