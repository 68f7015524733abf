//! Reconciler branches that reach the ledger, with the exact Kubernetes requests they send:
//! the apiserver is the tower-test mock (`spendguard_operator::mock_apiserver`, asserting
//! method, path, query and body of each request), the ledger is real (TestLedger on real
//! PostgreSQL). The same branches on a real apiserver are in operator_budget.rs and
//! operator_pricing.rs; these pin down the wire shape.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use serde_json::{Value, json};
use spendguard_crds::budget::Budget;
use spendguard_crds::contract_bundle::ContractBundle;
use spendguard_operator::controller::{budget, contract_bundle};
use spendguard_operator::mock_apiserver::{self, Method, StatusCode, ready_condition};
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::TestLedger;
use spendguard_testkit::ledger::reserve_request;
use std::sync::Arc;
use std::time::Duration;

fn budget_object(limit: &str, soft_cap: &str) -> Value {
    json!({
        "apiVersion": "spendguard.io/v1alpha1",
        "kind": "Budget",
        "metadata": {"name": "b1", "namespace": "team", "uid": "u-3", "generation": 4,
            "finalizers": ["spendguard.io/ledger-cleanup"]},
        "spec": {"tenant": "acme", "limit": limit, "softCap": soft_cap, "window": "Lifetime"},
    })
}

fn deleting(mut object: Value) -> Arc<Budget> {
    object["metadata"]["finalizers"] = json!(["other.io/keep", budget::FINALIZER]);
    object["metadata"]["deletionTimestamp"] = json!("2026-11-25T00:00:00Z");
    Arc::new(serde_json::from_value(object).unwrap())
}

/// Asserts the JSON patch that removes our finalizer (at index 1, guarded by a test op) and
/// answers it.
async fn expect_finalizer_removed(api: &mut mock_apiserver::ApiServer, object: &Value) {
    let request = api
        .expect(
            Method::PATCH,
            "/apis/spendguard.io/v1alpha1/namespaces/team/budgets/b1",
        )
        .await;
    assert_eq!(
        request.body,
        json!([
            {"op": "test", "path": "/metadata/finalizers/1", "value": budget::FINALIZER},
            {"op": "remove", "path": "/metadata/finalizers/1"},
        ])
    );
    request.respond(StatusCode::OK, object);
}

// Goal: deleting a Budget closes its ledger budget (limit and soft cap 0, window kept) without
// touching committed spend, tells so in a Normal Event, and only then removes the finalizer.
#[tokio::test]
async fn budget_cleanup_closes_the_ledger_budget_then_removes_the_finalizer() {
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease("acme").await.unwrap();
    ledger
        .client
        .upsert_budget(pb::UpsertBudgetRequest {
            tenant_id: "acme".into(),
            budget_id: "team/b1".into(),
            limit_nano_usd: 5_000,
            soft_cap_nano_usd: 4_000,
            window: pb::BudgetWindow::CalendarDayUtc.into(),
        })
        .await
        .unwrap();
    let reserved = ledger
        .client
        .reserve_set(reserve_request("acme", "k1", &["team/b1"], 300, &fencing))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::reserve_set_response::Outcome::Reserved(reservation)) = reserved.outcome else {
        panic!("not reserved: {reserved:?}");
    };
    ledger
        .client
        .commit(pb::CommitRequest {
            tenant_id: "acme".into(),
            reservation_id: reservation.reservation_id,
            actual_nano_usd: 120,
            fencing: Some(fencing.clone()),
            deferrable: false,
        })
        .await
        .unwrap();

    let (ctx, mut api, _registry) = mock_apiserver::context(ledger.client.clone());
    let object = budget_object("12.50", "10");
    let task = tokio::spawn(budget::reconcile(deleting(object.clone()), ctx));
    let event = api.expect_event("team").await;
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&json!("Normal"), &json!(budget::CLOSED_REASON))
    );
    expect_finalizer_removed(&mut api, &object).await;
    task.await.unwrap().unwrap();
    api.expect_no_request().await;

    let balance = ledger
        .client
        .get_balances(pb::GetBalancesRequest {
            tenant_id: "acme".into(),
            budget_ids: vec!["team/b1".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .balances
        .remove(0);
    // Limit 0 in the definition; the current window clamps at its usage (the ledger's rule for
    // a limit lowered below usage): nothing remains, and the committed 120 is kept.
    assert_eq!(
        (
            balance.limit_nano_usd,
            balance.soft_cap_nano_usd,
            balance.committed_nano_usd,
            balance.remaining_nano_usd,
            balance.window
        ),
        (120, 0, 120, 0, pb::BudgetWindow::CalendarDayUtc as i32)
    );
}

// Goal: a Budget the ledger never had (its apply always failed, or the tenant is gone) can
// still be deleted: nothing is written to the ledger and the finalizer goes.
#[tokio::test]
async fn budget_cleanup_of_an_unknown_ledger_budget_just_removes_the_finalizer() {
    let ledger = TestLedger::start().await.unwrap();
    let (ctx, mut api, _registry) = mock_apiserver::context(ledger.client.clone());
    let object = budget_object("12.50", "10");
    let task = tokio::spawn(budget::reconcile(deleting(object.clone()), ctx));
    expect_finalizer_removed(&mut api, &object).await;
    task.await.unwrap().unwrap();
    api.expect_no_request().await;
}

const BUDGET_STATUS: &str = "/apis/spendguard.io/v1alpha1/namespaces/team/budgets/b1/status";

// Goal: a Budget becomes a ledger budget with the exact amounts, and status carries the
// ledger's balances, Ready=True Reconciled and one Normal Event; healthy budgets refresh in 30 s.
#[tokio::test]
async fn budget_apply_writes_the_ledger_then_status_then_an_event() {
    let mut ledger = TestLedger::start().await.unwrap();
    let (ctx, mut api, _registry) = mock_apiserver::context(ledger.client.clone());
    let object = budget_object("12.50", "10");
    let budget: Arc<Budget> = Arc::new(serde_json::from_value(object.clone()).unwrap());
    let task = tokio::spawn(budget::reconcile(budget, ctx));

    let body = api.expect_apply(BUDGET_STATUS, &object).await;
    assert_eq!(
        (&body["apiVersion"], &body["kind"]),
        (&json!("spendguard.io/v1alpha1"), &json!("Budget"))
    );
    let status = &body["status"];
    assert_eq!(
        (
            &status["limit"],
            &status["reserved"],
            &status["committed"],
            &status["remaining"]
        ),
        (&json!("12.5"), &json!("0"), &json!("0"), &json!("12.5"))
    );
    assert_eq!(status["observedGeneration"], 4);
    let ready = ready_condition(&body);
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&json!("True"), &json!("Reconciled"))
    );
    let event = api.expect_event("team").await;
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&json!("Normal"), &json!("Reconciled"))
    );
    assert_eq!(
        (&event["regarding"]["kind"], &event["regarding"]["uid"]),
        (&json!("Budget"), &json!("u-3"))
    );
    let action = task.await.unwrap().unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(30))
    );
    api.expect_no_request().await;

    let balance = ledger
        .client
        .get_balances(pb::GetBalancesRequest {
            tenant_id: "acme".into(),
            budget_ids: vec!["team/b1".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .balances
        .remove(0);
    assert_eq!(
        (balance.limit_nano_usd, balance.soft_cap_nano_usd),
        (12_500_000_000, 10_000_000_000)
    );
}

// Goal: a spec the ledger refuses (soft cap above limit, which CEL compares only as doubles)
// is a LedgerRefused error carrying the ledger's code, and writes no status on the way.
#[tokio::test]
async fn a_budget_the_ledger_refuses_is_ledger_refused() {
    let ledger = TestLedger::start().await.unwrap();
    let (ctx, mut api, _registry) = mock_apiserver::context(ledger.client.clone());
    let object = budget_object("1.000000001", "1.000000002");
    let budget: Arc<Budget> = Arc::new(serde_json::from_value(object).unwrap());
    let error = budget::reconcile(budget, ctx).await.unwrap_err();
    assert_eq!(error.reason(), "LedgerRefused");
    assert!(error.to_string().contains("BUDGET_INVALID"), "{error}");
    api.expect_no_request().await;
}

fn pricing_object() -> Value {
    json!({
        "apiVersion": "spendguard.io/v1alpha1",
        "kind": "PricingVersion",
        "metadata": {"name": "p1", "uid": "u-1"},
        "spec": {"entries": [{"provider": "openai", "model": "gpt-5",
            "price": {"input": 1, "cachedInput": 1, "cacheWrite": 1, "output": 2}}]},
    })
}

// Goal: a ContractBundle compiles into an owned ConfigMap (server-side apply), its pricing is
// registered with the ledger for the tenant (a reservation priced with it is then accepted),
// and status reports the hash with Ready=True Compiled and a Normal Event.
#[tokio::test]
async fn bundle_compile_registers_pricing_and_applies_the_config_map() {
    let mut ledger = TestLedger::start().await.unwrap();
    let (ctx, mut api, _registry) = mock_apiserver::context(ledger.client.clone());
    let object = json!({
        "apiVersion": "spendguard.io/v1alpha1",
        "kind": "ContractBundle",
        "metadata": {"name": "agent", "namespace": "team", "uid": "u-2", "generation": 3},
        "spec": {"tenant": "acme", "pricingVersion": "p1", "budgets": ["b1", "b2"],
            "maxOutputTokens": 4096},
    });
    let bundle: Arc<ContractBundle> = Arc::new(serde_json::from_value(object.clone()).unwrap());
    let task = tokio::spawn(contract_bundle::reconcile(bundle, ctx));

    api.expect(
        Method::GET,
        "/apis/spendguard.io/v1alpha1/pricingversions/p1",
    )
    .await
    .respond(StatusCode::OK, &pricing_object());
    let config_map = api
        .expect_apply(
            "/api/v1/namespaces/team/configmaps/spendguard-bundle-agent",
            &json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "spendguard-bundle-agent", "namespace": "team"}}),
        )
        .await;
    let owner = &config_map["metadata"]["ownerReferences"][0];
    assert_eq!(
        (&owner["kind"], &owner["uid"], &owner["controller"]),
        (&json!("ContractBundle"), &json!("u-2"), &json!(true))
    );
    let data = &config_map["data"];
    assert_eq!(
        (&data["tenant"], &data["budgets"]),
        (&json!("acme"), &json!("team/b1,team/b2"))
    );
    let sha = data["bundle.sha256"].as_str().unwrap().to_owned();
    let compiled = spendguard_core::contract::Bundle::from_json_verified(
        data["bundle.json"].as_str().unwrap().as_bytes(),
        &sha,
    )
    .unwrap();
    assert_eq!(compiled.contract.version, "team/agent@3");

    let status = api
        .expect_apply(
            "/apis/spendguard.io/v1alpha1/namespaces/team/contractbundles/agent/status",
            &object,
        )
        .await;
    assert_eq!(status["status"]["bundleSha256"], sha.as_str());
    assert_eq!(status["status"]["configMap"], "spendguard-bundle-agent");
    let ready = ready_condition(&status);
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&json!("True"), &json!("Compiled"))
    );
    let event = api.expect_event("team").await;
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&json!("Normal"), &json!("Compiled"))
    );
    assert_eq!(
        task.await.unwrap().unwrap(),
        kube::runtime::controller::Action::await_change()
    );
    api.expect_no_request().await;

    // The ledger now accepts reservations priced with this bundle's snapshot.
    let fencing = ledger.tenant_with_lease("acme").await.unwrap();
    ledger
        .budget("acme", "team/b1", 1_000_000_000)
        .await
        .unwrap();
    let mut request = reserve_request("acme", "k1", &["team/b1"], 1_000, &fencing);
    request.pricing = Some(pb::PricingRef {
        version: "p1".into(),
        sha256_hex: compiled.pricing.sha256_hex().to_owned(),
    });
    ledger.client.reserve_set(request).await.unwrap();
}
