//! Budget controller: a `Budget` becomes a ledger tenant + budget, and its status shows the
//! current window's limit, reserved, committed and remaining amounts and a `Ready` condition.
//!
//! The ledger budget id is `<namespace>/<name>`, so two namespaces never share a budget.
//! Reconcile is idempotent (the ledger's upserts write nothing when unchanged) and requeues
//! periodically to refresh the balances shown in status.

use crate::Context;
use crate::error::Error;
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use spendguard_crds::budget::{Budget, BudgetStatus, BudgetWindow};
use spendguard_crds::condition::Condition;
use spendguard_crds::money::Usd;
use spendguard_proto::ledger::v1 as pb;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, instrument, warn};

/// How often balances in status are refreshed.
const REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Retry delay after a failed reconcile.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);

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

fn ready(budget: &Budget, status: &str, reason: &str, message: String) -> Condition {
    let previous = budget
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    super::ready(budget, previous, status, reason, message)
}

async fn write_status(ctx: &Context, budget: &Budget, status: BudgetStatus) -> Result<(), Error> {
    let api: Api<Budget> =
        Api::namespaced(ctx.kube.clone(), &budget.namespace().unwrap_or_default());
    super::patch_status(&api, budget, &status).await
}

/// Applies one Budget to the ledger and reports its balances.
///
/// # Errors
/// When the ledger refuses or is unreachable, or status cannot be written; the error policy
/// records it as a `Ready=False` condition and retries.
#[instrument(skip_all, fields(object = %budget.name_any(), namespace = ?budget.namespace()))]
pub async fn reconcile(budget: Arc<Budget>, ctx: Arc<Context>) -> Result<Action, Error> {
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
            budget_id: ledger_budget_id(&budget),
            limit_nano_usd: limit,
            soft_cap_nano_usd: soft_cap.unwrap_or(0),
            window: window(spec.window).into(),
        })
        .await
        .map_err(|s| Error::ledger(&s))?
        .into_inner();
    let balance = response.balance.unwrap_or_default();
    if response.created {
        info!(budget_id = %ledger_budget_id(&budget), "ledger budget created");
    }
    let usd = |n: i64| Usd::from_nano_usd(n).0;
    let status = BudgetStatus {
        limit: usd(balance.limit_nano_usd),
        reserved: usd(balance.reserved_nano_usd),
        committed: usd(balance
            .committed_nano_usd
            .saturating_add(balance.overrun_nano_usd)),
        remaining: usd(balance.remaining_nano_usd),
        observed_generation: budget.meta().generation.unwrap_or(0),
        conditions: vec![ready(
            &budget,
            "True",
            "Reconciled",
            "ledger budget is in sync".into(),
        )],
    };
    write_status(&ctx, &budget, status).await?;
    Ok(Action::requeue(REFRESH_INTERVAL))
}

/// Records the failure as `Ready=False` with a stable reason and retries.
pub fn error_policy(budget: Arc<Budget>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(object = %budget.name_any(), %error, "budget reconcile failed");
    let condition = ready(&budget, "False", error.reason(), error.to_string());
    let mut status = budget.status.clone().unwrap_or_default();
    status.conditions = vec![condition];
    // Best effort, off the controller's path: the next reconcile retries anyway.
    tokio::spawn(async move {
        if let Err(e) = write_status(&ctx, &budget, status).await {
            warn!(error = %e, "writing failure condition failed");
        }
    });
    Action::requeue(RETRY_INTERVAL)
}

/// Runs the Budget controller until its watch ends.
pub async fn run(ctx: Context) {
    let api: Api<Budget> = Api::all(ctx.kube.clone());
    Controller::new(api, watcher::Config::default())
        .run(reconcile, error_policy, Arc::new(ctx))
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "budget controller event failed");
            }
        })
        .await;
}
