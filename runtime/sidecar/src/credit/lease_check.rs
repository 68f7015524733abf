//! The lease check of calls admitted inside a credit, several calls per ledger read.
//!
//! Every admission must see the ledger confirm its epoch (CheckFencing) by a read that started
//! after the call asked: then an epoch forced forward, or a ledger stopped, before a call asks
//! is what that call's check sees. Calls asking while a check is in flight cannot join it (it
//! may have read already); they gather in the next round, which is sent as soon as the check in
//! flight is answered, and all of them take its answer. One check in flight at a time, so at a
//! high call rate the ledger reads about once per round trip instead of once per call, and an
//! idle sidecar's call is checked at once.
//!
//! ```text
//! confirm(epoch) ─► joins the gathering round of its epoch (or opens one, which a task sends)
//!                   round: waits for the check in flight ─► leaves `gathering` ─► CheckFencing
//!                   ─► every call of the round gets the answer
//! ```

use crate::sync::lock;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use spendguard_proto::ledger::v1 as pb;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};

type LedgerClient = pb::ledger_client::LedgerClient<tonic::transport::Channel>;

/// Checks in flight at once. One: a round sent while another is in flight would only read
/// again what that one is reading, and under load the next round gathers the calls meanwhile.
const IN_FLIGHT: usize = 1;
/// The longest a call waits for its round's answer (the channel's own deadline bounds one
/// check; a round may first wait for the one in flight).
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// A round's answer: the epoch is current (`Ok`), or the ledger's status.
type Answer = Result<(), tonic::Status>;

/// Confirms fencing epochs for one scope, coalescing concurrent calls.
pub struct LeaseChecks {
    ledger: LedgerClient,
    tenant_id: String,
    scope_id: String,
    /// Rounds not sent yet, by epoch (calls decided under different epochs are not one read).
    gathering: Mutex<HashMap<u64, watch::Sender<Option<Answer>>>>,
    in_flight: Semaphore,
    sent: Counter,
}

impl LeaseChecks {
    /// Checks for `scope_id` of `tenant_id` on `ledger`.
    pub fn new(ledger: LedgerClient, tenant_id: String, scope_id: String) -> Self {
        Self {
            ledger,
            tenant_id,
            scope_id,
            gathering: Mutex::new(HashMap::new()),
            in_flight: Semaphore::new(IN_FLIGHT),
            sent: Counter::default(),
        }
    }

    /// Registers the check metric.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "spendguard_sidecar_lease_checks",
            "Lease checks (CheckFencing reads) sent for calls admitted inside a credit; concurrent calls share one",
            self.sent.clone(),
        );
    }

    /// Whether `epoch` is current, by a ledger read sent after this call. A round not answered
    /// within [`ANSWER_WAIT`] is `DEADLINE_EXCEEDED` (the ledger is away).
    pub async fn confirm(self: &Arc<Self>, epoch: u64) -> Answer {
        let mut answer = {
            let mut gathering = lock(&self.gathering);
            if let Some(round) = gathering.get(&epoch) {
                round.subscribe()
            } else {
                let (round, answer) = watch::channel(None);
                gathering.insert(epoch, round);
                // A task of its own sends the round: the calls in it may go away meanwhile.
                let unsent = Unsent {
                    checks: self.clone(),
                    epoch,
                    armed: true,
                };
                tokio::spawn(unsent.send());
                answer
            }
        };
        let waited = tokio::time::timeout(ANSWER_WAIT, answer.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(answer)) => (*answer).clone().unwrap_or_else(|| Err(abandoned())),
            // The round's task was dropped after it was sent (the runtime is shutting down).
            Ok(Err(_)) => Err(abandoned()),
            Err(_) => Err(tonic::Status::deadline_exceeded(
                "the lease check was not answered in time",
            )),
        }
    }
}

impl Unsent {
    /// Sends the round once no other check is in flight, and answers its calls.
    async fn send(self) {
        let checks = self.checks.clone();
        let epoch = self.epoch;
        let permit = checks.in_flight.acquire().await;
        // From here on, calls asking start the next round: this one's read may begin any time.
        let Some(round) = self.leave() else {
            return;
        };
        checks.sent.inc();
        let check = pb::CheckFencingRequest {
            tenant_id: checks.tenant_id.clone(),
            fencing: Some(pb::FencingToken {
                scope_id: checks.scope_id.clone(),
                epoch,
            }),
        };
        let answer = checks.ledger.clone().check_fencing(check).await.map(|_| ());
        drop(permit);
        round.send_replace(Some(answer));
    }
}

/// A round waiting to be sent, made before its task is spawned. Should the task be dropped
/// first (the runtime shutting down, even before its first poll), the round leaves the gathering
/// set anyway: later calls open a round of their own instead of joining one nobody sends.
struct Unsent {
    checks: Arc<LeaseChecks>,
    epoch: u64,
    armed: bool,
}

impl Unsent {
    /// The round leaves the gathering set, to be sent.
    fn leave(mut self) -> Option<watch::Sender<Option<Answer>>> {
        self.armed = false;
        lock(&self.checks.gathering).remove(&self.epoch)
    }
}

impl Drop for Unsent {
    fn drop(&mut self) {
        if self.armed {
            lock(&self.checks.gathering).remove(&self.epoch);
        }
    }
}

fn abandoned() -> tonic::Status {
    tonic::Status::unavailable("the lease check was abandoned")
}
