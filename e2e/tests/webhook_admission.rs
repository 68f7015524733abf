//! Admission webhooks on the real apiserver: the operator's webhook server runs in-process on
//! 127.0.0.1 with its own certificates, the operator's caBundle code makes the apiserver trust
//! it, and then the apiserver calls it for every pod and SpendGuard object. Pods never run (no
//! kubelet); only admission matters.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;
use spendguard_operator::webhook::{
    self, RunningWebhook, WebhookConfig, approve, ca_bundle, certs, inject,
};
use spendguard_testkit::control_plane::{ControlPlane, User};
use spendguard_testkit::free_port;
use std::path::Path;
use std::time::Duration;

/// The checkout, as cargo names it to this run (`spendguard_testkit::paths`).
const ROOT: &spendguard_testkit::paths::RepoRoot = spendguard_testkit::paths::REPO_ROOT;
const OPERATOR_NAMESPACE: &str = "spendguard-system";
const IMAGE: &str = "ghcr.io/spendguard/spendguard:0.1.0";
const LEDGER_URL: &str = "http://spendguard-ledger.spendguard-system.svc:7100";

fn config() -> WebhookConfig {
    WebhookConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        namespace: OPERATOR_NAMESPACE.into(),
        sans: vec!["127.0.0.1".into()],
        ca_secret: "spendguard-webhook-ca".into(),
        configurations: ca_bundle::Configurations {
            mutating: Some("spendguard-injector".into()),
            validating: Some("spendguard-validator".into()),
            approvals: None,
        },
        inject: inject::InjectConfig {
            image: IMAGE.into(),
            ledger_url: LEDGER_URL.into(),
            operator_namespace: OPERATOR_NAMESPACE.into(),
            credit_nano_usd: 0,
            credit_ttl_ms: 60_000,
            credit_ahead_ms: 2_000,
            credit_quiet_ms: 0,
        },
        approvals: approve::ApprovalConfig {
            operator_username: format!(
                "system:serviceaccount:{OPERATOR_NAMESPACE}:spendguard-operator"
            ),
        },
        // Fast, so that a replaced CA is picked up within the test.
        upkeep_interval: Duration::from_millis(200),
    }
}

/// The two configurations as the chart writes them, except that clientConfig is a URL (the
/// server runs in this process) and caBundle is left for the operator to fill.
fn configurations(inject_port: u16, validate_port: u16) -> String {
    format!(
        r#"
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{name: spendguard-injector}}
webhooks:
  - name: inject.spendguard.io
    clientConfig: {{url: "https://127.0.0.1:{inject_port}/inject"}}
    rules:
      - {{apiGroups: [""], apiVersions: ["v1"], operations: ["CREATE"], resources: ["pods"], scope: Namespaced}}
    objectSelector: {{matchLabels: {{spendguard.io/inject: "true"}}}}
    namespaceSelector:
      matchExpressions:
        - {{key: kubernetes.io/metadata.name, operator: NotIn, values: ["{OPERATOR_NAMESPACE}"]}}
    failurePolicy: Fail
    sideEffects: None
    admissionReviewVersions: ["v1"]
    timeoutSeconds: 10
    reinvocationPolicy: Never
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {{name: spendguard-validator}}
webhooks:
  - name: validate.spendguard.io
    clientConfig: {{url: "https://127.0.0.1:{validate_port}/validate"}}
    rules:
      - apiGroups: ["spendguard.io"]
        apiVersions: ["v1alpha1"]
        operations: ["CREATE", "UPDATE"]
        resources: ["budgets", "contractbundles", "pricingversions"]
    failurePolicy: Fail
    sideEffects: None
    admissionReviewVersions: ["v1"]
    timeoutSeconds: 10
"#
    )
}

/// A control plane with the CRDs, the namespaces and the webhook configurations (no caBundle
/// yet). Injection calls go to one replica's port, validation to the other's.
async fn setup() -> (ControlPlane, kube::Client, [u16; 2]) {
    let plane = ControlPlane::start().expect("control plane");
    plane.install_crds(&Path::new(ROOT).join("crds/generated/spendguard.io.yaml"));
    for namespace in [OPERATOR_NAMESPACE, "team"] {
        plane.admin(&["create", "namespace", namespace], None);
    }
    let client = plane.client(User::Admin).await.unwrap();
    let ports = [free_port(), free_port()];
    plane.admin(
        &["apply", "-f", "-"],
        Some(&configurations(ports[0], ports[1])),
    );
    (plane, client, ports)
}

/// Starts two replicas at once (they race to create the CA Secret and must end up with one
/// CA), then waits until their own caBundle upkeep has made the apiserver trust them.
async fn start_replicas(
    plane: &ControlPlane,
    client: &kube::Client,
    ports: [u16; 2],
) -> [RunningWebhook; 2] {
    let on = |port: u16| WebhookConfig {
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        ..config()
    };
    let (a, b) = tokio::join!(
        webhook::start(on(ports[0]), client.clone()),
        webhook::start(on(ports[1]), client.clone())
    );
    let replicas = [a.unwrap(), b.unwrap()];
    assert_eq!(
        replicas[0].ca_pem, replicas[1].ca_pem,
        "replicas share one CA"
    );
    for kind in CONFIGURATIONS {
        plane
            .poll(&["get", kind, "-o", CA_BUNDLE], |b| !b.is_empty())
            .await;
    }
    // Re-running the upkeep with the shared CA changes nothing: replicas never fight.
    for replica in &replicas {
        let changed = ca_bundle::patch(client, &config().configurations, &replica.ca_pem)
            .await
            .unwrap();
        assert_eq!(changed, 0);
    }
    // A configuration that is missing does not keep the others on a stale CA: they are patched,
    // and the failure is reported after. On a spare configuration the running replicas do not
    // look after (their upkeep would put their CA back at any moment).
    let spare = r#"{"apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration", "metadata": {"name": "spendguard-spare"},
        "webhooks": [{"name": "spare.spendguard.io", "rules": [], "failurePolicy": "Ignore",
            "clientConfig": {"url": "https://127.0.0.1:1/never"},
            "sideEffects": "None", "admissionReviewVersions": ["v1"]}]}"#;
    plane.admin(&["apply", "-f", "-"], Some(spare));
    let with_missing = ca_bundle::Configurations {
        mutating: Some("spendguard-missing".into()),
        validating: Some("spendguard-spare".into()),
        approvals: None,
    };
    let other_ca = "-----BEGIN CERTIFICATE-----\nb3RoZXI=\n-----END CERTIFICATE-----\n";
    let failed = ca_bundle::patch(client, &with_missing, other_ca).await;
    assert!(failed.is_err(), "the missing configuration is reported");
    let patched = plane.admin(
        &[
            "get",
            "validatingwebhookconfiguration/spendguard-spare",
            "-o",
            CA_BUNDLE,
        ],
        None,
    );
    assert_eq!(
        base64_decode(patched.trim()),
        other_ca.as_bytes(),
        "the spare configuration was patched though the first name was missing"
    );
    plane.admin(
        &["delete", "validatingwebhookconfiguration/spendguard-spare"],
        None,
    );
    replicas
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

fn pod(name: &str, namespace: &str, labels: &str, annotations: &str, env: &str) -> String {
    format!(
        r#"{{"apiVersion": "v1", "kind": "Pod",
  "metadata": {{"name": "{name}", "namespace": "{namespace}", "labels": {{{labels}}}, "annotations": {{{annotations}}}}},
  "spec": {{"containers": [
    {{"name": "app", "image": "app:1"}},
    {{"name": "worker", "image": "app:1", "env": [{env}]}}
  ]}}}}"#
    )
}

const CONFIGURATIONS: [&str; 2] = [
    "mutatingwebhookconfiguration/spendguard-injector",
    "validatingwebhookconfiguration/spendguard-validator",
];
const CA_BUNDLE: &str = "jsonpath={.webhooks[0].clientConfig.caBundle}";
const OPT_IN: &str = r#""spendguard.io/inject": "true""#;
const BUNDLE: &str = r#""spendguard.io/bundle": "research-agent""#;

fn get_pod(plane: &ControlPlane, name: &str, namespace: &str) -> Value {
    serde_json::from_str(&plane.admin(&["get", "pod", name, "-n", namespace, "-o", "json"], None))
        .unwrap()
}

fn sidecars(pod: &Value) -> Vec<&Value> {
    let spec = &pod["spec"];
    spec["initContainers"]
        .as_array()
        .into_iter()
        .chain(spec["containers"].as_array())
        .flatten()
        .filter(|c| c["name"] == inject::SIDECAR_NAME)
        .collect()
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

// Multi-threaded: kubectl calls block their thread while the webhook server answers on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opted_in_pods_get_the_sidecar_exactly_once() {
    let (plane, client, ports) = setup().await;

    // While the webhook is down, an opted-in pod is refused, not run unguarded.
    let guarded = pod("agent", "team", OPT_IN, BUNDLE, "");
    let (ok, text) = plane.run_kubectl(User::Admin, &["create", "-f", "-"], Some(&guarded));
    assert!(
        !ok && text.contains("failed calling webhook"),
        "a webhook that is down must fail closed: {text}"
    );
    let replicas = start_replicas(&plane, &client, ports).await;

    // A replica started later loads the same CA from the Secret.
    let second =
        certs::load_or_create_ca(client.clone(), OPERATOR_NAMESPACE, "spendguard-webhook-ca")
            .await
            .unwrap();
    assert_eq!(second.cert_pem(), replicas[0].ca_pem);

    plane.admin(&["create", "-f", "-"], Some(&guarded));
    let injected = get_pod(&plane, "agent", "team");
    let found = sidecars(&injected);
    assert_eq!(found.len(), 1, "{injected:#}");
    let sidecar = found[0];
    assert_eq!(
        injected["spec"]["initContainers"][0]["name"],
        inject::SIDECAR_NAME
    );
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["image"], IMAGE);
    assert_eq!(sidecar["args"], serde_json::json!(["sidecar"]));
    assert_eq!(
        env_value(sidecar, "SPENDGUARD_LEDGER_URL").unwrap()["value"],
        LEDGER_URL
    );
    assert_eq!(
        env_value(sidecar, "SPENDGUARD_BUNDLE_DIR").unwrap()["value"],
        "/etc/spendguard/bundle"
    );
    assert_eq!(
        env_value(sidecar, "SPENDGUARD_WORKLOAD_INSTANCE_ID").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env_value(sidecar, "SPENDGUARD_SIDECAR_LISTEN").unwrap()["value"],
        "127.0.0.1:8787"
    );
    assert_eq!(
        env_value(sidecar, "SPENDGUARD_ADMIN_ADDR").unwrap()["value"],
        "0.0.0.0:9464"
    );
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["port"], 9464);
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(sidecar["securityContext"]["runAsNonRoot"], true);
    assert_eq!(sidecar["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        sidecar["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert_eq!(
        sidecar["volumeMounts"][0]["mountPath"],
        "/etc/spendguard/bundle"
    );
    assert_eq!(sidecar["volumeMounts"][0]["readOnly"], true);
    let volume = injected["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == inject::BUNDLE_VOLUME)
        .unwrap();
    assert_eq!(
        volume["configMap"]["name"],
        "spendguard-bundle-research-agent"
    );
    // The fail-open spool: an emptyDir the apiserver accepted, mounted writable in the sidecar.
    let spool = injected["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == inject::SPOOL_VOLUME)
        .unwrap();
    assert_eq!(spool["emptyDir"]["sizeLimit"], "64Mi");
    assert_eq!(sidecar["volumeMounts"][1]["mountPath"], inject::SPOOL_DIR);
    assert!(sidecar["volumeMounts"][1]["readOnly"].is_null());
    assert_eq!(
        injected["metadata"]["annotations"][inject::INJECTED_ANNOTATION],
        IMAGE
    );
    // Without spendguard.io/set-base-urls, app env is untouched.
    assert!(env_value(&injected["spec"]["containers"][0], "OPENAI_BASE_URL").is_none());

    // A second pass changes nothing: the mutation run on the stored pod yields an empty patch…
    let stored: Pod = serde_json::from_value(injected.clone()).unwrap();
    assert!(
        inject::patch(&stored, "team", &config().inject)
            .unwrap()
            .is_empty()
    );
    // …and the apiserver, sent the injected pod again, keeps exactly one sidecar.
    let mut again = injected.clone();
    let metadata = again["metadata"].as_object_mut().unwrap();
    for field in [
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "managedFields",
    ] {
        metadata.remove(field);
    }
    metadata.insert("name".into(), "agent-again".into());
    again.as_object_mut().unwrap().remove("status");
    plane.admin(&["create", "-f", "-"], Some(&again.to_string()));
    let twice = get_pod(&plane, "agent-again", "team");
    assert_eq!(sidecars(&twice).len(), 1, "{twice:#}");
    assert_eq!(
        twice["spec"]["initContainers"],
        injected["spec"]["initContainers"]
    );

    // Base URLs on request, never overriding the user's own.
    let mine = r#"{"name": "OPENAI_BASE_URL", "value": "http://mine/v1"}"#;
    let with_urls = pod(
        "agent-urls",
        "team",
        OPT_IN,
        &format!(r#"{BUNDLE}, "spendguard.io/set-base-urls": "true""#),
        mine,
    );
    plane.admin(&["create", "-f", "-"], Some(&with_urls));
    let urls = get_pod(&plane, "agent-urls", "team");
    let (app, worker) = (
        &urls["spec"]["containers"][0],
        &urls["spec"]["containers"][1],
    );
    assert_eq!(
        env_value(app, "OPENAI_BASE_URL").unwrap()["value"],
        "http://127.0.0.1:8787/v1"
    );
    assert_eq!(
        env_value(app, "ANTHROPIC_BASE_URL").unwrap()["value"],
        "http://127.0.0.1:8787"
    );
    assert_eq!(
        env_value(worker, "OPENAI_BASE_URL").unwrap()["value"],
        "http://mine/v1"
    );
    assert_eq!(
        env_value(worker, "ANTHROPIC_BASE_URL").unwrap()["value"],
        "http://127.0.0.1:8787"
    );

    // Pods that did not opt in are untouched.
    plane.admin(
        &["create", "-f", "-"],
        Some(&pod("plain", "team", r#""app": "x""#, BUNDLE, "")),
    );
    let plain = get_pod(&plane, "plain", "team");
    assert!(sidecars(&plain).is_empty(), "{plain:#}");
    assert!(plain["metadata"]["annotations"][inject::INJECTED_ANNOTATION].is_null());

    // The operator's own namespace is never injected.
    plane.admin(
        &["create", "-f", "-"],
        Some(&pod("own", OPERATOR_NAMESPACE, OPT_IN, BUNDLE, "")),
    );
    assert!(sidecars(&get_pod(&plane, "own", OPERATOR_NAMESPACE)).is_empty());

    // Replacing the CA (deleting its Secret) moves every replica to the new one: the Secret is
    // recreated once, caBundle follows it, and injection works again with the new CA.
    let old_bundle = plane.admin(&["get", CONFIGURATIONS[0], "-o", CA_BUNDLE], None);
    plane.admin(
        &[
            "delete",
            "secret",
            "spendguard-webhook-ca",
            "-n",
            OPERATOR_NAMESPACE,
        ],
        None,
    );
    let new_ca = plane
        .poll(
            &[
                "get",
                "secret",
                "spendguard-webhook-ca",
                "-n",
                OPERATOR_NAMESPACE,
                "-o",
                "jsonpath={.data.tls\\.crt}",
            ],
            |c| !c.is_empty() && c != old_bundle,
        )
        .await;
    for kind in CONFIGURATIONS {
        plane
            .poll(&["get", kind, "-o", CA_BUNDLE], |b| b == new_ca)
            .await;
    }
    let rotated = pod("agent-rotated", "team", OPT_IN, BUNDLE, "");
    let mut last = String::new();
    let created = (0..100).any(|_| {
        let (ok, text) = plane.run_kubectl(User::Admin, &["create", "-f", "-"], Some(&rotated));
        last = text;
        ok || {
            std::thread::sleep(Duration::from_millis(100));
            false
        }
    });
    assert!(created, "injection never worked with the new CA: {last}");
    assert_eq!(sidecars(&get_pod(&plane, "agent-rotated", "team")).len(), 1);

    // An opted-in pod that names no bundle must not run unguarded.
    let (ok, text) = plane.run_kubectl(
        User::Admin,
        &["create", "-f", "-"],
        Some(&pod("unguarded", "team", OPT_IN, "", "")),
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("denied the request: SPENDGUARD_BUNDLE_MISSING")
            && text.contains("refusing to run it unguarded"),
        "{text}"
    );
    for replica in replicas {
        replica.task.abort();
    }
}

// Multi-threaded: kubectl calls block their thread while the webhook server answers on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_validating_webhook_refuses_what_cel_cannot_see() {
    let (plane, client, ports) = setup().await;
    let replicas = start_replicas(&plane, &client, ports).await;
    let apply = |yaml: &str| plane.run_kubectl(User::Admin, &["apply", "-f", "-"], Some(yaml));

    // Equal as doubles (CEL lets it through), one nano-USD above the limit exactly.
    let (ok, text) = apply(
        r#"{"apiVersion": "spendguard.io/v1alpha1", "kind": "Budget",
            "metadata": {"name": "tight", "namespace": "team"},
            "spec": {"tenant": "acme", "limit": "999999999.000000001", "softCap": "999999999.000000002", "window": "Lifetime"}}"#,
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("denied the request: SPENDGUARD_SOFT_CAP_ABOVE_LIMIT: softCap 999999999.000000002 exceeds limit 999999999.000000001"),
        "{text}"
    );
    let (ok, text) = apply(
        &std::fs::read_to_string(format!("{ROOT}/config/examples/budget.yaml"))
            .unwrap()
            .replace("namespace: default", "namespace: team"),
    );
    assert!(ok, "{text}");

    // A price list the sidecar's pricing code refuses can never be fixed (immutable spec).
    let pricing =
        std::fs::read_to_string(format!("{ROOT}/config/examples/pricing-version.yaml")).unwrap();
    let broken = pricing
        .replace("name: pricing-2026-11-01", "name: pricing-broken")
        .replace("aliases: [\"gpt-5-2025-08-07\"]", "aliases: [\"gpt-5\"]");
    let (ok, text) = apply(&broken);
    assert!(!ok, "{text}");
    assert!(
        text.contains("SPENDGUARD_PRICING_INVALID: PricingVersion pricing-broken is invalid"),
        "{text}"
    );

    // A bundle whose pricing is not there yet is admitted with a warning (apply order).
    let bundle = std::fs::read_to_string(format!("{ROOT}/config/examples/contract-bundle.yaml"))
        .unwrap()
        .replace("namespace: default", "namespace: team");
    let (ok, text) = apply(&bundle);
    assert!(ok, "{text}");
    assert!(
        text.contains("Warning: SPENDGUARD_PRICING_VERSION_NOT_FOUND: PricingVersion pricing-2026-11-01 does not exist"),
        "{text}"
    );
    let (ok, text) = apply(&pricing);
    assert!(ok, "{text}");
    let (ok, text) = apply(&bundle.replace("maxOutputTokens: 4096", "maxOutputTokens: 2048"));
    assert!(ok && !text.contains("Warning"), "{text}");

    // A bundle that names another tenant's Budget could never reserve against it.
    let (ok, text) = apply(
        r#"{"apiVersion": "spendguard.io/v1alpha1", "kind": "Budget",
            "metadata": {"name": "globex-budget", "namespace": "team"},
            "spec": {"tenant": "globex", "limit": "10", "window": "Lifetime"}}"#,
    );
    assert!(ok, "{text}");
    let (ok, text) = apply(
        &bundle
            .replace("name: research-agent", "name: borrowed")
            .replace(
                "budgets: [\"team-research\"]",
                "budgets: [\"globex-budget\"]",
            ),
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains(
            "SPENDGUARD_TENANT_MISMATCH: Budget team/globex-budget belongs to tenant \"globex\""
        ),
        "{text}"
    );

    // A bundle admitted while its Budget did not exist, whose Budget then came with another
    // tenant: its spec cannot change, but it can still be labelled, and a finalizer (another
    // controller's, or the garbage collector's `foregroundDeletion`) can still be taken off to
    // finish its deletion.
    let late = bundle
        .replace("name: research-agent", "name: late")
        .replace("budgets: [\"team-research\"]", "budgets: [\"later\"]");
    let (ok, text) = apply(&late);
    assert!(ok && text.contains("SPENDGUARD_BUDGET_NOT_FOUND"), "{text}");
    let (ok, text) = apply(
        r#"{"apiVersion": "spendguard.io/v1alpha1", "kind": "Budget",
            "metadata": {"name": "later", "namespace": "team"},
            "spec": {"tenant": "globex", "limit": "10", "window": "Lifetime"}}"#,
    );
    assert!(ok, "{text}");
    let (ok, text) = apply(&late.replace("maxOutputTokens: 4096", "maxOutputTokens: 2048"));
    assert!(!ok && text.contains("SPENDGUARD_TENANT_MISMATCH"), "{text}");
    let kubectl = |args: &[&str]| plane.run_kubectl(User::Admin, args, None);
    let (ok, text) = kubectl(&[
        "label",
        "-n",
        "team",
        "contractbundle",
        "late",
        "owner=research",
    ]);
    assert!(ok, "a label is not judged again: {text}");
    let finalizers = |value: &str| {
        let patch = format!(r#"{{"metadata": {{"finalizers": {value}}}}}"#);
        kubectl(&[
            "patch",
            "-n",
            "team",
            "contractbundle",
            "late",
            "--type=merge",
            "-p",
            &patch,
        ])
    };
    let (ok, text) = finalizers(r#"["example.com/hold"]"#);
    assert!(ok, "{text}");
    let (ok, text) = kubectl(&[
        "delete",
        "-n",
        "team",
        "contractbundle",
        "late",
        "--wait=false",
    ]);
    assert!(ok, "{text}");
    let (ok, text) = finalizers("null");
    assert!(ok, "a finalizer can be taken off: {text}");
    let (ok, text) = kubectl(&["get", "-n", "team", "contractbundle", "late"]);
    assert!(!ok && text.contains("NotFound"), "{text}");
    for replica in replicas {
        replica.task.abort();
    }
}
