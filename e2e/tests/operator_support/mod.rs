//! Shared by the operator_approvals*, operator_retention and webhook_approvals tests: the chart's
//! RBAC and a client acting as the chart's ServiceAccount, so the controllers and webhooks run
//! with exactly the permissions the chart grants; the approvals webhook started in-process;
//! opening and reading ledger approvals of tenant [`TENANT`].
#![allow(dead_code, reason = "each test binary uses a part of this module")]

use spendguard_operator::webhook::{self, WebhookConfig, approve, ca_bundle, inject};
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::TestLedger;
use spendguard_testkit::control_plane::{ControlPlane, User, binaries_dir};
use spendguard_testkit::ledger::test_pricing;
use std::process::Command;
use std::time::Duration;

/// Tenant of the approvals these tests open (budget `team`).
pub(crate) const TENANT: &str = "acme";

/// The checkout, as cargo names it to this run (`spendguard_testkit::paths`).
const ROOT: &spendguard_testkit::paths::RepoRoot = spendguard_testkit::paths::REPO_ROOT;

/// `helm template` of `templates` for a release in `namespace`.
fn render(namespace: &str, templates: &[&str]) -> String {
    let chart = format!("{ROOT}/charts/spendguard");
    let mut args = vec!["template", "sg", &chart, "--namespace", namespace];
    for template in templates {
        args.extend(["--show-only", template]);
    }
    let out = Command::new(binaries_dir().join("helm"))
        .args(&args)
        .output()
        .expect("run helm (make control-plane builds it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("helm prints UTF-8")
}

/// The RBAC objects (ServiceAccount, roles, bindings) of the chart's operator, webhook and
/// approvals templates; no Deployment or webhook configuration (tests run those in-process).
pub(crate) fn chart_rbac(namespace: &str) -> String {
    let rendered = render(
        namespace,
        &[
            "templates/operator.yaml",
            "templates/webhook.yaml",
            "templates/approvals.yaml",
        ],
    );
    let kinds = [
        "kind: ServiceAccount",
        "kind: Role\n",
        "kind: ClusterRole\n",
        "kind: RoleBinding",
        "kind: ClusterRoleBinding",
    ];
    rendered
        .split("\n---")
        .filter(|document| kinds.iter().any(|kind| document.contains(kind)))
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// The operator's username in `namespace`, as the chart creates it.
pub(crate) fn operator_username(namespace: &str) -> String {
    format!("system:serviceaccount:{namespace}:spendguard-operator")
}

/// A client acting as the chart's operator ServiceAccount in `namespace`.
pub(crate) async fn service_account_client(plane: &ControlPlane, namespace: &str) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(plane.kubeconfig(User::Admin))
        .expect("admin kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("kube config");
    config.auth_info.impersonate = Some(operator_username(namespace));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{namespace}"),
        "system:authenticated".into(),
    ]);
    kube::Client::try_from(config).expect("kube client")
}

/// Opens a pending approval of [`TENANT`] on budget `team`, as the sidecar does on a soft-cap
/// crossing (CreateApproval with the call id as key).
pub(crate) async fn open(
    ledger: &mut TestLedger,
    fencing: &pb::FencingToken,
    key: &str,
    amount_nano_usd: i64,
    ttl_ms: u32,
) -> pb::Approval {
    ledger
        .client
        .create_approval(pb::CreateApprovalRequest {
            tenant_id: TENANT.into(),
            idempotency_key: key.into(),
            budget_ids: vec!["team".into()],
            budget_id: "team".into(),
            amount_nano_usd,
            fencing: Some(fencing.clone()),
            ttl_ms,
            reason_code: "SOFT_CAP_REACHED".into(),
            requested_by: "acme/agent-7".into(),
            pricing: Some(test_pricing()),
            bundle_sha256_hex: String::new(),
            context: Some(pb::DecisionContext {
                call_id: key.into(),
                model: "gpt-test".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("CreateApproval")
        .into_inner()
        .approval
        .expect("approval in the answer")
}

/// The ledger's record of `approval` now (GetApproval of [`TENANT`], any state).
pub(crate) async fn ledger_record(ledger: &TestLedger, approval: &pb::Approval) -> pb::Approval {
    ledger
        .client
        .clone()
        .get_approval(pb::GetApprovalRequest {
            tenant_id: TENANT.into(),
            approval_id: approval.approval_id.clone(),
        })
        .await
        .expect("GetApproval")
        .into_inner()
        .approval
        .expect("approval in the answer")
}

/// Starts the approvals webhook on `port` as the chart's operator ServiceAccount in `namespace`,
/// and waits until it has patched its CA into the configuration (so the apiserver trusts it).
pub(crate) async fn start_approvals_webhook(
    plane: &ControlPlane,
    namespace: &str,
    port: u16,
) -> webhook::RunningWebhook {
    let config = WebhookConfig {
        addr: format!("127.0.0.1:{port}").parse().expect("address"),
        namespace: namespace.into(),
        sans: vec!["127.0.0.1".into()],
        ca_secret: "spendguard-webhook-ca".into(),
        configurations: ca_bundle::Configurations {
            mutating: None,
            validating: None,
            approvals: Some("spendguard-approvals".into()),
        },
        inject: inject::InjectConfig {
            image: "ghcr.io/spendguard/spendguard:0.1.0".into(),
            ledger_url: "http://spendguard-ledger.spendguard-system.svc:7100".into(),
            operator_namespace: namespace.into(),
            credit_nano_usd: 0,
            credit_ttl_ms: 60_000,
            credit_ahead_ms: 2_000,
            credit_quiet_ms: 0,
        },
        approvals: approve::ApprovalConfig {
            operator_username: operator_username(namespace),
        },
        upkeep_interval: Duration::from_millis(200),
    };
    let running = webhook::start(config, service_account_client(plane, namespace).await)
        .await
        .expect("approvals webhook");
    plane
        .poll(
            &[
                "get",
                "mutatingwebhookconfiguration/spendguard-approvals",
                "-o",
                "jsonpath={.webhooks[0].clientConfig.caBundle}",
            ],
            |bundle| !bundle.is_empty(),
        )
        .await;
    running
}
