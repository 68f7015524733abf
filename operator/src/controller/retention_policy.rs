//! RetentionPolicy controller: a tenant's RetentionPolicy becomes the ledger's retention
//! policy for that tenant (UpsertRetentionPolicy, audited as `retention_policy.upserted`), and
//! its status shows `Ready` with the generation it reflects.
//!
//! The policy is recorded and audited only: nothing deletes or redacts evidence yet (the
//! retention sweeper, S19, is not built).
//!
//! One tenant has one ledger policy. When several RetentionPolicies name the same tenant, the
//! oldest (creation time, then namespace/name) is applied and the others report
//! `Ready=False TenantPolicyConflict`, so two objects never overwrite each other in the ledger.
//!
//! Deleting a RetentionPolicy leaves the ledger's policy as it is (no finalizer): retention of
//! evidence must not silently disappear or shorten because an object went away. A policy
//! changes only when a RetentionPolicy says so (docs/design/approval-and-retention-controllers.md).

use super::ready;
use crate::Context;
use crate::error::Error;
use futures::StreamExt;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use spendguard_crds::condition::Condition;
use spendguard_crds::retention_policy::{
    RetentionPolicy, RetentionPolicySpec, RetentionPolicyStatus,
};
use spendguard_proto::ledger::v1 as pb;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, instrument, warn};

/// How often an applied policy is re-sent (an identical repeat writes nothing), so a ledger
/// database restored from an older backup regains it.
const REFRESH_INTERVAL: Duration = Duration::from_secs(600);
/// How often a policy that lost a tenant conflict looks again (the winner may be deleted).
const CONFLICT_RECHECK: Duration = Duration::from_secs(60);
/// The CRD's (and the ledger's) bound on `auditRetentionDays`.
const RETENTION_DAYS_MAX: u32 = 3650;
/// Reason of the Event published when the tenant's first ledger policy is written.
pub const CREATED_REASON: &str = "LedgerPolicyCreated";
/// Reason of the Event published when the ledger's policy changes. (The Event recorder counts
/// repeats of a reason into a series and keeps the first note; the condition has the current
/// values.)
pub const CHANGED_REASON: &str = "LedgerPolicyChanged";
/// Reason of `Ready=False` for a policy that another one of the same tenant overrides.
pub const CONFLICT_REASON: &str = "TenantPolicyConflict";

fn conditions(policy: &RetentionPolicy) -> &[Condition] {
    policy
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

/// The ledger request for `spec`, validated as the CRD does (the schema and CEL rule should
/// have refused anything else).
///
/// # Errors
/// [`Error::InvalidSpec`] with the first invalid field.
pub fn request(spec: &RetentionPolicySpec) -> Result<pb::UpsertRetentionPolicyRequest, Error> {
    if spec.tenant.is_empty() {
        return Err(Error::InvalidSpec("tenant is empty".into()));
    }
    let audit = u32::try_from(spec.audit_retention_days)
        .ok()
        .filter(|d| (1..=RETENTION_DAYS_MAX).contains(d))
        .ok_or_else(|| {
            Error::InvalidSpec(format!(
                "auditRetentionDays {} is outside 1 to {RETENTION_DAYS_MAX}",
                spec.audit_retention_days
            ))
        })?;
    let redact = spec
        .redact_payloads_after_days
        .map(|days| {
            u32::try_from(days)
                .ok()
                .filter(|d| *d <= audit)
                .ok_or_else(|| {
                    Error::InvalidSpec(format!(
                        "redactPayloadsAfterDays {days} is outside 0 to auditRetentionDays \
                         ({audit}): payloads cannot outlive their audit records"
                    ))
                })
        })
        .transpose()?;
    Ok(pb::UpsertRetentionPolicyRequest {
        tenant_id: spec.tenant.clone(),
        audit_retention_days: audit,
        redact_payloads_after_days: redact,
    })
}

/// "audit evidence kept 365 days, payloads redacted after 30 days".
fn describe(audit_days: u32, redact_days: Option<u32>) -> String {
    match redact_days {
        Some(days) => {
            format!("audit evidence kept {audit_days} days, payloads redacted after {days} days")
        }
        None => format!("audit evidence kept {audit_days} days, payloads never redacted earlier"),
    }
}

/// The sort key that decides which of several policies of one tenant applies: the oldest.
fn seniority(policy: &RetentionPolicy) -> (Option<String>, String, String) {
    (
        policy
            .meta()
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string()),
        policy.namespace().unwrap_or_default(),
        policy.name_any(),
    )
}

/// The policy that applies to `policy`'s tenant, when it is another object.
async fn overriding(ctx: &Context, policy: &RetentionPolicy) -> Result<Option<String>, Error> {
    let api: Api<RetentionPolicy> = Api::all(ctx.kube.clone());
    let all = api
        .list(&ListParams::default())
        .await
        .map_err(Error::Kube)?;
    let winner = all
        .items
        .iter()
        .filter(|p| p.spec.tenant == policy.spec.tenant && p.meta().deletion_timestamp.is_none())
        .min_by_key(|p| seniority(p));
    Ok(winner
        .filter(|w| w.meta().uid != policy.meta().uid)
        .map(|w| format!("{}/{}", w.namespace().unwrap_or_default(), w.name_any())))
}

/// Applies one RetentionPolicy to the ledger and reports `Ready`.
///
/// # Errors
/// An unusable spec, a ledger refusal or failure, or a failed Kubernetes call; the error
/// policy reports it as `Ready=False` with the stable reason (the ledger's code in the message).
#[instrument(skip_all, fields(object = %policy.name_any(), namespace = ?policy.namespace()))]
pub async fn reconcile(policy: Arc<RetentionPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    super::observed(&ctx, policy.as_ref(), apply(&policy, &ctx)).await
}

async fn apply(policy: &RetentionPolicy, ctx: &Context) -> Result<Action, Error> {
    let request = request(&policy.spec)?;
    let api: Api<RetentionPolicy> =
        Api::namespaced(ctx.kube.clone(), &policy.namespace().unwrap_or_default());
    if let Some(winner) = overriding(ctx, policy).await? {
        let message = format!(
            "tenant {} already has its retention policy from {winner} (the oldest applies); \
             this one is not sent to the ledger",
            policy.spec.tenant
        );
        let condition = ready(
            policy,
            conditions(policy),
            "False",
            CONFLICT_REASON,
            message,
        );
        write(ctx, &api, policy, condition).await?;
        return Ok(Action::requeue(CONFLICT_RECHECK));
    }
    let mut ledger = ctx.ledger.clone();
    // The ledger keeps policies per tenant; a RetentionPolicy may arrive before any Budget.
    ledger
        .upsert_tenant(pb::UpsertTenantRequest {
            tenant_id: request.tenant_id.clone(),
            display_name: request.tenant_id.clone(),
        })
        .await
        .map_err(|s| Error::ledger(&s))?;
    let response = ledger
        .upsert_retention_policy(request.clone())
        .await
        .map_err(|s| Error::ledger(&s))?
        .into_inner();
    let recorded = response.policy.unwrap_or_default();
    let summary = describe(
        recorded.audit_retention_days,
        recorded.redact_payloads_after_days,
    );
    if response.changed {
        info!(tenant_id = %request.tenant_id, created = response.created, "retention policy recorded");
        let (reason, verb) = if response.created {
            (CREATED_REASON, "created")
        } else {
            (CHANGED_REASON, "changed")
        };
        let note = format!(
            "ledger retention policy of tenant {} {verb}: {summary}",
            request.tenant_id
        );
        ctx.events.normal(policy, reason, &note).await;
    }
    let message = format!(
        "recorded in the ledger for tenant {}: {summary} (recorded and audited; not enforced \
         until the retention sweeper, S19, exists)",
        request.tenant_id
    );
    let condition = ready(policy, conditions(policy), "True", "Recorded", message);
    write(ctx, &api, policy, condition).await?;
    Ok(Action::requeue(REFRESH_INTERVAL))
}

/// Writes `condition` as the status and publishes its Event on a transition.
async fn write(
    ctx: &Context,
    api: &Api<RetentionPolicy>,
    policy: &RetentionPolicy,
    condition: Condition,
) -> Result<(), Error> {
    let status = RetentionPolicyStatus {
        conditions: vec![condition.clone()],
    };
    super::patch_status(api, policy, &status).await?;
    ctx.events
        .on_transition(policy, conditions(policy), &condition)
        .await;
    Ok(())
}

/// Reports the failure as `Ready=False` with the stable reason (and a Warning Event when that
/// changes the condition) and retries with a per-object backoff.
pub fn error_policy(policy: Arc<RetentionPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(object = %policy.name_any(), %error, "retention policy reconcile failed");
    let condition = ready(
        policy.as_ref(),
        conditions(&policy),
        "False",
        error.reason(),
        error.to_string(),
    );
    let previous = conditions(&policy).to_vec();
    let status = RetentionPolicyStatus {
        conditions: vec![condition.clone()],
    };
    let delay = ctx.backoff.failed(&super::object_key(policy.as_ref()));
    let api = Api::namespaced(ctx.kube.clone(), &policy.namespace().unwrap_or_default());
    super::report_failure(&ctx, api, policy, previous, condition, status);
    Action::requeue(delay)
}

/// Runs the RetentionPolicy controller until its watch ends.
pub async fn run(ctx: Context) {
    let api: Api<RetentionPolicy> = Api::all(ctx.kube.clone());
    Controller::new(api, watcher::Config::default())
        .run(reconcile, error_policy, Arc::new(ctx))
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "retention policy controller event failed");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_apiserver::{self, Method, StatusCode, ready_condition};
    use serde_json::{Value, json};

    const STATUS_PATH: &str =
        "/apis/spendguard.io/v1alpha1/namespaces/team/retentionpolicies/acme/status";

    fn object(name: &str, created: &str, audit: i64, redact: Option<i64>) -> Value {
        let mut spec = json!({"tenant": "acme", "auditRetentionDays": audit});
        if let Some(days) = redact {
            spec["redactPayloadsAfterDays"] = json!(days);
        }
        json!({
            "apiVersion": "spendguard.io/v1alpha1",
            "kind": "RetentionPolicy",
            "metadata": {"name": name, "namespace": "team", "uid": format!("u-{name}"),
                "generation": 3, "creationTimestamp": created},
            "spec": spec,
        })
    }

    fn parse(object: &Value) -> Arc<RetentionPolicy> {
        Arc::new(serde_json::from_value(object.clone()).unwrap())
    }

    // Goal: the spec maps onto the RPC, and whatever the CRD should have refused is
    // InvalidSpec (never clamped). Method: the bounds on either side.
    #[test]
    fn the_spec_maps_onto_the_request_within_bounds() {
        let ok =
            request(&parse(&object("acme", "2026-11-25T00:00:00Z", 365, Some(30))).spec).unwrap();
        assert_eq!(
            (
                ok.tenant_id.as_str(),
                ok.audit_retention_days,
                ok.redact_payloads_after_days
            ),
            ("acme", 365, Some(30))
        );
        let never = request(&parse(&object("acme", "2026-11-25T00:00:00Z", 1, None)).spec);
        assert_eq!(never.unwrap().redact_payloads_after_days, None);
        let edge = request(&parse(&object("a", "2026-11-25T00:00:00Z", 3650, Some(3650))).spec);
        assert!(edge.is_ok());
        for (audit, redact) in [
            (0, None),
            (3651, None),
            (-1, None),
            (30, Some(31)),
            (30, Some(-1)),
        ] {
            let spec = parse(&object("acme", "2026-11-25T00:00:00Z", audit, redact));
            let error = request(&spec.spec).unwrap_err();
            assert_eq!(error.reason(), "InvalidSpec", "{audit} {redact:?}");
        }
    }

    // Goal: an invalid spec fails before any API or ledger call.
    #[tokio::test]
    async fn an_invalid_spec_writes_nothing() {
        let (ctx, mut api, _registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let policy = parse(&object("acme", "2026-11-25T00:00:00Z", 10, Some(11)));
        let error = reconcile(policy, ctx).await.unwrap_err();
        assert_eq!(error.reason(), "InvalidSpec");
        api.expect_no_request().await;
    }

    // Goal: of two policies for one tenant only the oldest reaches the ledger; the newer one
    // reports Ready=False TenantPolicyConflict with a Warning Event and looks again later.
    // Method: the list answers an older policy of the same tenant; the ledger is unreachable,
    // so a ledger call would fail the reconcile.
    #[tokio::test]
    async fn a_second_policy_for_a_tenant_is_a_conflict_not_a_ledger_write() {
        let (ctx, mut api, _registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let newer = object("acme", "2026-11-25T10:00:00Z", 30, None);
        let mut older = object("first", "2026-11-20T10:00:00Z", 90, None);
        older["metadata"]["namespace"] = json!("platform");
        let task = tokio::spawn(reconcile(parse(&newer), ctx));
        let list = api
            .expect(
                Method::GET,
                "/apis/spendguard.io/v1alpha1/retentionpolicies",
            )
            .await;
        list.respond(
            StatusCode::OK,
            &json!({"apiVersion": "spendguard.io/v1alpha1", "kind": "RetentionPolicyList",
                "metadata": {"resourceVersion": "7"}, "items": [newer.clone(), older]}),
        );
        let body = api.expect_apply(STATUS_PATH, &newer).await;
        let ready = ready_condition(&body);
        assert_eq!(
            (&ready["status"], &ready["reason"]),
            (&json!("False"), &json!(CONFLICT_REASON))
        );
        assert!(
            ready["message"]
                .as_str()
                .unwrap()
                .contains("platform/first")
        );
        assert_eq!(ready["observedGeneration"], 3);
        let event = api.expect_event("team").await;
        assert_eq!(
            (&event["type"], &event["reason"]),
            (&json!("Warning"), &json!(CONFLICT_REASON))
        );
        assert_eq!(
            task.await.unwrap().unwrap(),
            Action::requeue(CONFLICT_RECHECK)
        );
        api.expect_no_request().await;
    }

    // Goal: a failure is Ready=False with the stable reason and the ledger's code in the
    // message, one Warning Event, and a backoff.
    #[tokio::test]
    async fn a_ledger_refusal_is_ready_false_with_its_code() {
        let (ctx, mut api, _registry) =
            mock_apiserver::context(mock_apiserver::unreachable_ledger());
        let policy = object("acme", "2026-11-25T00:00:00Z", 30, None);
        let error = Error::Ledger {
            code: "INVALID_ARGUMENT".into(),
            message: "audit_retention_days: must be 1 to 3650".into(),
        };
        let action = error_policy(parse(&policy), &error, ctx);
        assert_eq!(action, Action::requeue(Duration::from_secs(1)));
        let body = api.expect_apply(STATUS_PATH, &policy).await;
        let ready = ready_condition(&body);
        assert_eq!(
            (&ready["status"], &ready["reason"]),
            (&json!("False"), &json!("LedgerRefused"))
        );
        assert!(
            ready["message"]
                .as_str()
                .unwrap()
                .contains("INVALID_ARGUMENT")
        );
        let event = api.expect_event("team").await;
        assert_eq!(event["type"], "Warning");
    }
}
