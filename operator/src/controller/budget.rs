//! Budget controller: a `Budget` becomes a ledger tenant + budget, and its status shows the
//! current window's limit, reserved, committed and remaining amounts and a `Ready` condition.
//!
//! The ledger budget id is `<namespace>/<name>`, so two namespaces never share a budget.
//! Reconcile is idempotent (the ledger's upserts write nothing when unchanged) and requeues
//! periodically to refresh the balances shown in status.
//!
//! Deleting a Budget runs the finalizer [`FINALIZER`]: the ledger budget's limit becomes 0, so
//! no new reservation can use it, while its journal, audit history and open reservations stay
//! (they still commit or release). The ledger has no archive RPC yet; a limit of 0 is the
//! closest the existing UpsertBudget can say.

use crate::Context;
use crate::error::Error;
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector;
use kube::runtime::utils::{Predicate as _, PredicateConfig, WatchStreamExt as _, predicates};
use kube::runtime::watcher::{self, watcher};
use kube::{Resource, ResourceExt};
use spendguard_crds::budget::{Budget, BudgetStatus, BudgetWindow};
use spendguard_crds::condition::Condition;
use spendguard_crds::money::Usd;
use spendguard_proto::ledger::v1 as pb;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, instrument, warn};

/// Finalizer that closes the ledger budget before the object goes.
pub const FINALIZER: &str = "spendguard.io/ledger-cleanup";
/// Reason of the Event published when the ledger budget is closed.
pub const CLOSED_REASON: &str = "LedgerBudgetClosed";
/// How often balances in status are refreshed.
const REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// The ledger id of a Budget object.
pub fn ledger_budget_id(budget: &Budget) -> String {
    format!(
        "{}/{}",
        budget.namespace().unwrap_or_default(),
        budget.name_any()
    )
}

fn window(window: BudgetWindow) -> pb::BudgetWindow {
    match window {
        BudgetWindow::Lifetime => pb::BudgetWindow::Lifetime,
        BudgetWindow::CalendarDayUTC => pb::BudgetWindow::CalendarDayUtc,
        BudgetWindow::CalendarMonthUTC => pb::BudgetWindow::CalendarMonthUtc,
    }
}

fn conditions(budget: &Budget) -> &[Condition] {
    budget
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

fn ready(budget: &Budget, status: &str, reason: &str, message: String) -> Condition {
    super::ready(budget, conditions(budget), status, reason, message)
}

async fn write_status(ctx: &Context, budget: &Budget, status: BudgetStatus) -> Result<(), Error> {
    let api: Api<Budget> =
        Api::namespaced(ctx.kube.clone(), &budget.namespace().unwrap_or_default());
    super::patch_status(&api, budget, &status).await
}

/// Applies one Budget to the ledger and reports its balances, or, when it is being deleted,
/// closes its ledger budget and removes the finalizer (added first, before any ledger write).
///
/// # Errors
/// When the ledger refuses or is unreachable, or the Kubernetes API fails; the error policy
/// records it as a `Ready=False` condition and retries. A failed cleanup keeps the finalizer,
/// so the object stays until the ledger budget is closed.
#[instrument(skip_all, fields(object = %budget.name_any(), namespace = ?budget.namespace()))]
pub async fn reconcile(budget: Arc<Budget>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<Budget> =
        Api::namespaced(ctx.kube.clone(), &budget.namespace().unwrap_or_default());
    let work = async {
        finalizer(&api, FINALIZER, budget.clone(), |event| async {
            match event {
                finalizer::Event::Apply(budget) => apply(&budget, &ctx).await,
                finalizer::Event::Cleanup(budget) => cleanup(&budget, &ctx).await,
            }
        })
        .await
        .map_err(Error::from)
    };
    super::observed(&ctx, budget.as_ref(), work).await
}

/// Closes the ledger budget of a deleted Budget: limit and soft cap 0, window unchanged.
/// Idempotent; a budget (or tenant) the ledger never had needs nothing.
///
/// # Errors
/// When the ledger refuses or is unreachable.
pub async fn cleanup(budget: &Budget, ctx: &Context) -> Result<Action, Error> {
    let tenant_id = budget.spec.tenant.clone();
    let budget_id = ledger_budget_id(budget);
    let mut ledger = ctx.ledger.clone();
    let balances = ledger
        .get_balances(pb::GetBalancesRequest {
            tenant_id: tenant_id.clone(),
            budget_ids: vec![budget_id.clone()],
        })
        .await
        .map_err(|s| Error::ledger(&s));
    let balance = match balances {
        Ok(response) => response.into_inner().balances.into_iter().next(),
        Err(Error::Ledger { code, .. })
            if code == "TENANT_NOT_FOUND" || code == "BUDGET_NOT_FOUND" =>
        {
            None
        }
        Err(error) => return Err(error),
    };
    let Some(balance) = balance else {
        info!(%budget_id, "no ledger budget to close");
        return Ok(Action::await_change());
    };
    ledger
        .upsert_budget(pb::UpsertBudgetRequest {
            tenant_id,
            budget_id: budget_id.clone(),
            limit_nano_usd: 0,
            soft_cap_nano_usd: 0,
            window: balance.window,
        })
        .await
        .map_err(|s| Error::ledger(&s))?;
    info!(%budget_id, "ledger budget closed");
    // The object is going, so status is not written; the Event tells why spending stopped.
    let note = format!("ledger budget {budget_id} closed (limit 0); its history is kept");
    ctx.events.normal(budget, CLOSED_REASON, &note).await;
    Ok(Action::await_change())
}

async fn apply(budget: &Budget, ctx: &Context) -> Result<Action, Error> {
    let spec = &budget.spec;
    let limit = spec.limit.nano_usd().map_err(Error::InvalidSpec)?;
    let soft_cap = spec
        .soft_cap
        .as_ref()
        .map(Usd::nano_usd)
        .transpose()
        .map_err(Error::InvalidSpec)?;
    let mut ledger = ctx.ledger.clone();
    ledger
        .upsert_tenant(pb::UpsertTenantRequest {
            tenant_id: spec.tenant.clone(),
            display_name: spec.tenant.clone(),
        })
        .await
        .map_err(|s| Error::ledger(&s))?;
    let response = ledger
        .upsert_budget(pb::UpsertBudgetRequest {
            tenant_id: spec.tenant.clone(),
            budget_id: ledger_budget_id(budget),
            limit_nano_usd: limit,
            soft_cap_nano_usd: soft_cap.unwrap_or(0),
            window: window(spec.window).into(),
        })
        .await
        .map_err(|s| Error::ledger(&s))?
        .into_inner();
    let balance = response.balance.unwrap_or_default();
    if response.created {
        info!(budget_id = %ledger_budget_id(budget), "ledger budget created");
    }
    let usd = |n: i64| Usd::from_nano_usd(n).0;
    let condition = ready(
        budget,
        "True",
        "Reconciled",
        "ledger budget is in sync".into(),
    );
    let status = BudgetStatus {
        limit: usd(balance.limit_nano_usd),
        reserved: usd(balance.reserved_nano_usd),
        committed: usd(balance
            .committed_nano_usd
            .saturating_add(balance.overrun_nano_usd)),
        remaining: usd(balance.remaining_nano_usd),
        observed_generation: budget.meta().generation.unwrap_or(0),
        conditions: vec![condition.clone()],
    };
    write_status(ctx, budget, status).await?;
    ctx.events
        .on_transition(budget, conditions(budget), &condition)
        .await;
    Ok(Action::requeue(REFRESH_INTERVAL))
}

/// Records the failure as `Ready=False` with a stable reason (and a Warning Event when that
/// changes the condition) and retries with a per-object backoff.
pub fn error_policy(budget: Arc<Budget>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(object = %budget.name_any(), %error, "budget reconcile failed");
    let condition = ready(&budget, "False", error.reason(), error.to_string());
    let previous = conditions(&budget).to_vec();
    let mut status = budget.status.clone().unwrap_or_default();
    status.conditions = vec![condition.clone()];
    let delay = ctx.backoff.failed(&super::object_key(budget.as_ref()));
    let api = Api::namespaced(ctx.kube.clone(), &budget.namespace().unwrap_or_default());
    super::report_failure(&ctx, api, budget, previous, condition, status);
    Action::requeue(delay)
}

/// What triggers a reconcile besides the timed refresh: a new spec (generation), a finalizer
/// change, a deletion request, an annotation change (`kubectl annotate` refreshes the balances
/// now). Not the controller's own status writes: a Budget being spent from shows new balances
/// at every read, so a status write per pass would trigger the next pass at
/// once, calling the ledger and writing the apiserver at round-trip speed. The balances are
/// refreshed every [`REFRESH_INTERVAL`] instead.
fn reconcile_trigger(budget: &Budget) -> Option<u64> {
    let deletion_requested = |b: &Budget| b.meta().deletion_timestamp.as_ref().map(|_| 1);
    predicates::generation
        .combine(predicates::finalizers)
        .combine(predicates::annotations)
        .combine(deletion_requested)
        .hash_property(budget)
}

/// Runs the Budget controller until its watch ends.
pub async fn run(ctx: Context) {
    let api: Api<Budget> = Api::all(ctx.kube.clone());
    let (reader, writer) = reflector::store();
    let triggers = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(reconcile_trigger, PredicateConfig::default());
    Controller::for_stream(triggers, reader)
        .run(reconcile, error_policy, Arc::new(ctx))
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "budget controller event failed");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_apiserver::{self, ready_condition};
    use serde_json::{Value, json};
    use std::time::Duration;

    const STATUS_PATH: &str = "/apis/spendguard.io/v1alpha1/namespaces/team/budgets/b1/status";
    const OBJECT_PATH: &str = "/apis/spendguard.io/v1alpha1/namespaces/team/budgets/b1";

    // Goal: the finalizer is on the object before the ledger is written, so a Budget deleted
    // right after creation cannot leave an open ledger budget behind. Method: a new Budget;
    // the only request is the JSON patch adding the finalizer (the ledger is unreachable, so a
    // ledger call would fail the reconcile).
    #[tokio::test]
    async fn a_new_budget_gets_the_finalizer_before_any_ledger_write() {
        let (ctx, mut api, _registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let new = new_object("100");
        let task = tokio::spawn(reconcile(parse(&new), ctx));
        let request = api.expect(mock_apiserver::Method::PATCH, OBJECT_PATH).await;
        assert_eq!(
            request.content_type.as_deref(),
            Some("application/json-patch+json")
        );
        assert_eq!(
            request.body,
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
            ])
        );
        let mut answer = new.clone();
        answer["metadata"]["finalizers"] = json!([FINALIZER]);
        request.respond(mock_apiserver::StatusCode::OK, &answer);
        assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
        api.expect_no_request().await;
    }

    // Goal: a failure's status write, spawned by the error policy, lands before anything the
    // object's next reconcile writes: a slow one would otherwise overwrite a newer outcome.
    #[tokio::test]
    async fn the_next_reconcile_waits_for_the_last_failures_status_write() {
        let (ctx, mut api, _registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let new = new_object("100");
        let error = Error::Ledger {
            code: "BUDGET_INVALID".into(),
            message: "soft cap above limit".into(),
        };
        let _ = error_policy(parse(&new), &error, ctx.clone());
        let failure = api.expect(mock_apiserver::Method::PATCH, STATUS_PATH).await;
        // The retry starts while the failure is still being written: it sends nothing yet.
        let task = tokio::spawn(reconcile(parse(&new), ctx));
        api.expect_no_request().await;
        failure.respond(mock_apiserver::StatusCode::OK, &new);
        let _ = api.expect_event("team").await;
        let request = api.expect(mock_apiserver::Method::PATCH, OBJECT_PATH).await;
        let mut answer = new.clone();
        answer["metadata"]["finalizers"] = json!([FINALIZER]);
        request.respond(mock_apiserver::StatusCode::OK, &answer);
        assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    }

    // Goal: a Budget deleted after its finalizer is gone needs nothing (no ledger, no API).
    #[tokio::test]
    async fn a_deleted_budget_without_the_finalizer_is_left_alone() {
        let (ctx, mut api, _registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let mut deleted = object("100", None);
        deleted["metadata"]["finalizers"] = json!(["someone.else/keep"]);
        deleted["metadata"]["deletionTimestamp"] = json!("2026-11-25T00:00:00Z");
        let action = reconcile(parse(&deleted), ctx).await.unwrap();
        assert_eq!(action, Action::await_change());
        api.expect_no_request().await;
    }

    /// A Budget just created: no finalizer yet, no status.
    fn new_object(limit: &str) -> Value {
        let mut new = object(limit, None);
        new["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("finalizers");
        new
    }

    fn object(limit: &str, status: Option<Value>) -> Value {
        let mut object = json!({
            "apiVersion": "spendguard.io/v1alpha1",
            "kind": "Budget",
            "metadata": {"name": "b1", "namespace": "team", "uid": "u-3", "generation": 2,
                "finalizers": [FINALIZER]},
            "spec": {"tenant": "acme", "limit": limit, "window": "Lifetime"},
        });
        if let Some(status) = status {
            object["status"] = status;
        }
        object
    }

    fn parse(object: &Value) -> Arc<Budget> {
        Arc::new(serde_json::from_value(object.clone()).unwrap())
    }

    // Goal: an amount the operator cannot convert fails before any ledger or API call.
    // Method: a limit the CRD pattern would refuse, built directly.
    #[tokio::test]
    async fn an_unconvertible_limit_is_invalid_spec_without_side_effects() {
        let (ctx, mut api, registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let error = reconcile(parse(&object("ten dollars", None)), ctx)
            .await
            .unwrap_err();
        assert_eq!(error.reason(), "InvalidSpec");
        api.expect_no_request().await;
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("reconcile_errors_total{kind=\"Budget\",reason=\"InvalidSpec\"} 1"),
            "{text}"
        );
    }

    // Goal: a failure becomes Ready=False with the stable reason, keeps the last balances
    // shown, and publishes one Warning Event; the retry backs off. Method: error policy on a
    // Ready budget, then again on the failed one.
    #[tokio::test]
    async fn a_failure_is_a_condition_an_event_and_a_backoff() {
        let (ctx, mut api, _registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let status = json!({"limit": "100", "reserved": "1", "committed": "2", "remaining": "97",
            "observedGeneration": 2, "conditions": [{"type": "Ready", "status": "True",
            "reason": "Reconciled", "message": "ok", "lastTransitionTime": "2026-01-01T00:00:00Z",
            "observedGeneration": 2}]});
        let ready = object("100", Some(status));
        let error = Error::Ledger {
            code: "BUDGET_INVALID".into(),
            message: "soft cap above limit".into(),
        };
        let action = error_policy(parse(&ready), &error, ctx.clone());
        assert_eq!(action, Action::requeue(Duration::from_secs(1)));
        let body = api.expect_apply(STATUS_PATH, &ready).await;
        assert_eq!(body["kind"], "Budget");
        assert_eq!(
            (&body["status"]["limit"], &body["status"]["remaining"]),
            (&json!("100"), &json!("97"))
        );
        let condition = ready_condition(&body).clone();
        assert_eq!(
            (&condition["status"], &condition["reason"]),
            (&json!("False"), &json!("LedgerRefused"))
        );
        assert_ne!(condition["lastTransitionTime"], "2026-01-01T00:00:00Z");
        let event = api.expect_event("team").await;
        assert_eq!(
            (&event["type"], &event["reason"]),
            (&json!("Warning"), &json!("LedgerRefused"))
        );
        assert_eq!(event["note"], error.to_string());

        // Still failing the same way: status again (cheap, idempotent), no new Event.
        let mut failed = ready.clone();
        failed["status"] = body["status"].clone();
        let action = error_policy(parse(&failed), &error, ctx);
        assert_eq!(action, Action::requeue(Duration::from_secs(2)));
        let again = api.expect_apply(STATUS_PATH, &failed).await;
        assert_eq!(
            ready_condition(&again)["lastTransitionTime"],
            condition["lastTransitionTime"]
        );
        api.expect_no_request().await;
    }

    // Goal: a replica whose leadership term has ended writes no failure status or Event, even
    // from a reconcile that failed just before: its successor may be reconciling already.
    #[tokio::test]
    async fn a_failure_reported_after_the_term_ended_writes_nothing() {
        let (ctx, mut api, _registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let error = Error::Ledger {
            code: "BUDGET_INVALID".into(),
            message: "soft cap above limit".into(),
        };
        let term = ctx.next_term();
        // A new term keeps the per-object backoff, as a restart's crash-loop delay would.
        assert!(Arc::ptr_eq(&ctx.backoff, &term.backoff));
        term.end_term();
        let _ = error_policy(parse(&object("100", None)), &error, Arc::new(term));
        api.expect_no_request().await;
        // The same failure in a term still running is written.
        let ready = object("100", None);
        let _ = error_policy(parse(&ready), &error, Arc::new(ctx.next_term()));
        let _ = api.expect_apply(STATUS_PATH, &ready).await;
    }

    // Goal: the controller's own status writes (new balances at every read) do not trigger a
    // reconcile; a new spec, a finalizer change, an annotation or a deletion request does.
    #[test]
    fn only_spec_finalizer_and_deletion_changes_trigger_a_reconcile() {
        let before = reconcile_trigger(&parse(&object("100", None))).unwrap();
        let balances = |reserved: &str| {
            json!({"limit": "100", "reserved": reserved, "committed": "2", "remaining": "97",
                   "observedGeneration": 2})
        };
        let spent = parse(&object("100", Some(balances("1"))));
        let spent_more = parse(&object("100", Some(balances("5"))));
        assert_eq!(reconcile_trigger(&spent), Some(before));
        assert_eq!(reconcile_trigger(&spent_more), Some(before));
        let mut edited = object("200", None);
        edited["metadata"]["generation"] = json!(3);
        assert_ne!(reconcile_trigger(&parse(&edited)), Some(before));
        let mut unfinalized = object("100", None);
        unfinalized["metadata"]["finalizers"] = json!([]);
        assert_ne!(reconcile_trigger(&parse(&unfinalized)), Some(before));
        let mut touched = object("100", None);
        touched["metadata"]["annotations"] = json!({"touch": "1"});
        assert_ne!(reconcile_trigger(&parse(&touched)), Some(before));
        let mut deleting = object("100", None);
        deleting["metadata"]["deletionTimestamp"] = json!("2026-11-25T00:00:00Z");
        assert_ne!(reconcile_trigger(&parse(&deleting)), Some(before));
    }
}
