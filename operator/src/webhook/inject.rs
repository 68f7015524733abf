//! Sidecar injection: the JSON patch that turns an opted-in pod into a guarded one. Pure (no IO),
//! so the whole decision is unit-tested and the webhook never depends on the apiserver answering.
//!
//! A pod opts in with the label `spendguard.io/inject: "true"` and names its ContractBundle with
//! the annotation `spendguard.io/bundle`. It gets the sidecar as a native sidecar (an
//! initContainer with `restartPolicy: Always`, first, so it starts before everything else) that
//! mounts the bundle's ConfigMap. An opted-in pod that cannot be guarded is refused: it must not
//! run unguarded (fail closed).

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, Pod, Probe, ResourceRequirements, SeccompProfile,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;
use std::collections::BTreeMap;

/// Label a pod sets to opt in.
pub const INJECT_LABEL: &str = "spendguard.io/inject";
/// Annotation naming the pod's ContractBundle (same namespace).
pub const BUNDLE_ANNOTATION: &str = "spendguard.io/bundle";
/// Annotation asking for OPENAI_BASE_URL / ANTHROPIC_BASE_URL in every app container.
pub const SET_BASE_URLS_ANNOTATION: &str = "spendguard.io/set-base-urls";
/// Annotation setting this pod's credit size in nano-USD (docs/design/credits.md), over the
/// operator's default; `"0"` turns credits off for the pod.
pub const CREDIT_ANNOTATION: &str = "spendguard.io/credit-nano-usd";
/// Largest credit (the ledger's largest amount).
const CREDIT_NANO_USD_MAX: i64 = 1_000_000_000_000_000_000;
/// Annotation recording the injected sidecar image.
pub const INJECTED_ANNOTATION: &str = "spendguard.io/injected";
/// Name of the injected container; its presence makes injection a no-op.
pub const SIDECAR_NAME: &str = "spendguard-sidecar";
/// Name of the bundle volume.
pub const BUNDLE_VOLUME: &str = "spendguard-bundle";
/// Where the sidecar reads its bundle.
pub const BUNDLE_DIR: &str = "/etc/spendguard/bundle";
/// The sidecar's fail-open spool (an emptyDir: it survives restarts of the sidecar container).
pub const SPOOL_VOLUME: &str = "spendguard-fail-open";
/// Where the spool is mounted in the sidecar.
pub const SPOOL_DIR: &str = "/var/lib/spendguard/fail-open";
/// Bound of the spool volume: ~1 KiB per record, 10,000 records by default.
const SPOOL_SIZE_LIMIT: &str = "64Mi";
/// The proxy and HTTP decision API, loopback only: only the pod's own containers may spend.
pub const SIDECAR_LISTEN: &str = "127.0.0.1:8787";
/// The gRPC decision API, loopback only.
pub const SIDECAR_GRPC_LISTEN: &str = "127.0.0.1:8788";
/// Admin port (`/healthz`, `/readyz`, `/metrics`). Kubelet probes the pod IP, so the admin
/// server listens on every interface; it serves no decisions.
pub const ADMIN_PORT: u16 = 9464;
/// Prefix of the ConfigMap the ContractBundle controller writes.
const BUNDLE_CONFIG_MAP_PREFIX: &str = "spendguard-bundle-";
/// Base URLs of the sidecar's OpenAI- and Anthropic-compatible proxy.
const BASE_URLS: [(&str, &str); 2] = [
    ("OPENAI_BASE_URL", "http://127.0.0.1:8787/v1"),
    ("ANTHROPIC_BASE_URL", "http://127.0.0.1:8787"),
];
/// The distroless `nonroot` user: `runAsNonRoot` needs a numeric user to be checkable.
const SIDECAR_UID: i64 = 65_532;

/// What injection needs to know from the operator's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// Sidecar image (the one `spendguard` image).
    pub image: String,
    /// Ledger gRPC URL as seen from workload pods.
    pub ledger_url: String,
    /// The operator's namespace: never injected (its pods must start even when the webhook is
    /// down).
    pub operator_namespace: String,
    /// The sidecars' credit size (`SPENDGUARD_CREDIT_NANO_USD`; docs/design/credits.md); 0 sets
    /// nothing, so every call reserves before it is forwarded.
    pub credit_nano_usd: i64,
    /// Their credits' lifetime (`SPENDGUARD_CREDIT_TTL_MS`), set only with credits on.
    pub credit_ttl_ms: u64,
    /// Their credits' sizing (`SPENDGUARD_CREDIT_AHEAD_MS`), set only with credits on.
    pub credit_ahead_ms: u64,
    /// Their quiet period (`SPENDGUARD_CREDIT_QUIET_MS`), set only with credits on.
    pub credit_quiet_ms: u64,
}

/// Why an opted-in pod is refused. Each has a stable code that starts the denial message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    /// Opted in without naming a bundle.
    #[error(
        "pod opts in to SpendGuard (label {INJECT_LABEL}=true) but has no {BUNDLE_ANNOTATION} annotation naming its ContractBundle; refusing to run it unguarded"
    )]
    BundleMissing,
    /// The bundle name cannot name a ConfigMap.
    #[error(
        "annotation {BUNDLE_ANNOTATION}={0:?} is not a valid ContractBundle name (lowercase letters, digits, '-' and '.', at most {max} characters)", max = MAX_BUNDLE_NAME
    )]
    BundleNameInvalid(String),
    /// The pod already uses a name injection needs.
    #[error("pod already has a volume named {0}, which SpendGuard injection reserves")]
    ReservedName(&'static str),
    /// The credit annotation is not a whole number of nano-USD in range.
    #[error(
        "annotation {CREDIT_ANNOTATION}={0:?} is not a whole number of nano-USD from 0 to {CREDIT_NANO_USD_MAX}"
    )]
    CreditInvalid(String),
}

impl InjectError {
    /// Stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BundleMissing => "SPENDGUARD_BUNDLE_MISSING",
            Self::BundleNameInvalid(_) => "SPENDGUARD_BUNDLE_NAME_INVALID",
            Self::ReservedName(_) => "SPENDGUARD_RESERVED_NAME",
            Self::CreditInvalid(_) => "SPENDGUARD_CREDIT_INVALID",
        }
    }
}

/// Longest bundle name whose ConfigMap name still fits 253 characters.
const MAX_BUNDLE_NAME: usize = 253 - BUNDLE_CONFIG_MAP_PREFIX.len();

/// A DNS subdomain (RFC 1123), as Kubernetes requires for object names.
fn valid_bundle_name(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= MAX_BUNDLE_NAME
        && name.starts_with(alnum)
        && name.ends_with(alnum)
        && name.chars().all(|c| alnum(c) || c == '-' || c == '.')
}

/// Whether the pod asked for injection.
pub fn opted_in(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECT_LABEL))
        .is_some_and(|v| v == "true")
}

/// Whether the sidecar is already there (injected before, or added by hand).
pub fn already_injected(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|spec| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == SIDECAR_NAME)
    })
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn probe(path: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn quantities(cpu: &str, memory: &str) -> BTreeMap<String, Quantity> {
    BTreeMap::from([
        ("cpu".to_owned(), Quantity(cpu.into())),
        ("memory".to_owned(), Quantity(memory.into())),
    ])
}

/// The sidecar container.
pub fn sidecar(config: &InjectConfig) -> Container {
    let mut environment = vec![
        env("SPENDGUARD_LEDGER_URL", &config.ledger_url),
        env("SPENDGUARD_BUNDLE_DIR", BUNDLE_DIR),
        env("SPENDGUARD_FAIL_OPEN_SPOOL_DIR", SPOOL_DIR),
        EnvVar {
            name: "SPENDGUARD_WORKLOAD_INSTANCE_ID".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
        env("SPENDGUARD_SIDECAR_LISTEN", SIDECAR_LISTEN),
        env("SPENDGUARD_SIDECAR_GRPC_LISTEN", SIDECAR_GRPC_LISTEN),
        env("SPENDGUARD_ADMIN_ADDR", &format!("0.0.0.0:{ADMIN_PORT}")),
        env("SPENDGUARD_LOG_FORMAT", "json"),
    ];
    if config.credit_nano_usd > 0 {
        let credits = [
            (
                "SPENDGUARD_CREDIT_NANO_USD",
                config.credit_nano_usd.to_string(),
            ),
            ("SPENDGUARD_CREDIT_TTL_MS", config.credit_ttl_ms.to_string()),
            (
                "SPENDGUARD_CREDIT_AHEAD_MS",
                config.credit_ahead_ms.to_string(),
            ),
            (
                "SPENDGUARD_CREDIT_QUIET_MS",
                config.credit_quiet_ms.to_string(),
            ),
        ];
        environment.extend(credits.iter().map(|(name, value)| env(name, value)));
    }
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(config.image.clone()),
        args: Some(vec!["sidecar".into()]),
        // Native sidecar: starts before the app, runs beside it, stops after it.
        restart_policy: Some("Always".into()),
        env: Some(environment),
        // Ready only while the fencing lease is held, so the pod is not Ready without a guard.
        readiness_probe: Some(probe("/readyz", 5, 2)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        // The app's containers start once this passes (a native sidecar's startup probe holds
        // them back): the admin port answers only after the proxy's listeners are bound, so the
        // app's first call finds the sidecar listening. Not /readyz: a ledger that is down at
        // start must not keep the app from starting (its calls get the sidecar's 503s).
        startup_probe: Some(probe("/healthz", 1, 120)),
        resources: Some(ResourceRequirements {
            requests: Some(quantities("50m", "64Mi")),
            limits: Some(quantities("1", "256Mi")),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(SIDECAR_UID),
            run_as_group: Some(SIDECAR_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: BUNDLE_VOLUME.into(),
                mount_path: BUNDLE_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: SPOOL_VOLUME.into(),
                mount_path: SPOOL_DIR.into(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    }
}

/// The fail-open spool volume: node-local, kept across restarts of the sidecar container, gone
/// with the pod (docs/design/fail-open-evidence.md).
pub fn spool_volume() -> Volume {
    Volume {
        name: SPOOL_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity(SPOOL_SIZE_LIMIT.into())),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// The bundle volume. Not optional: without its ConfigMap the pod does not start.
pub fn bundle_volume(bundle: &str) -> Volume {
    Volume {
        name: BUNDLE_VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: format!("{BUNDLE_CONFIG_MAP_PREFIX}{bundle}"),
            optional: Some(false),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn add(path: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        // from_tokens escapes '/' and '~' (annotation keys contain '/').
        path: PointerBuf::from_tokens(path.iter().copied()),
        value,
    })
}

fn to_value<T: serde::Serialize>(value: &T) -> Value {
    // Serializing k8s-openapi types into a Value cannot fail (no maps with non-string keys).
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Appends `item` to the array at `path`, creating the array when absent.
fn push(ops: &mut Vec<PatchOperation>, exists: bool, path: &[&str], item: Value) {
    if exists {
        let mut at_end = path.to_vec();
        at_end.push("-");
        ops.push(add(&at_end, item));
    } else {
        ops.push(add(path, Value::Array(vec![item])));
    }
}

/// The pod's credit size: its annotation's, else `default`.
fn credit_nano_usd(pod: &Pod, default: i64) -> Result<i64, InjectError> {
    let Some(value) = annotation(pod, CREDIT_ANNOTATION) else {
        return Ok(default);
    };
    value
        .parse::<i64>()
        .ok()
        .filter(|n| {
            (0..=CREDIT_NANO_USD_MAX).contains(n) && value.bytes().all(|b| b.is_ascii_digit())
        })
        .ok_or_else(|| InjectError::CreditInvalid(value.to_owned()))
}

/// The JSON patch injecting the sidecar into `pod` in `namespace`: empty when the pod is not
/// ours to change (not opted in, already injected, or in the operator's namespace).
///
/// # Errors
/// [`InjectError`] for an opted-in pod that cannot be guarded.
pub fn patch(
    pod: &Pod,
    namespace: &str,
    config: &InjectConfig,
) -> Result<Vec<PatchOperation>, InjectError> {
    if !opted_in(pod) || already_injected(pod) || namespace == config.operator_namespace {
        return Ok(Vec::new());
    }
    let bundle = annotation(pod, BUNDLE_ANNOTATION).ok_or(InjectError::BundleMissing)?;
    if !valid_bundle_name(bundle) {
        return Err(InjectError::BundleNameInvalid(bundle.to_owned()));
    }
    let Some(spec) = pod.spec.as_ref() else {
        // A pod without a spec is refused by the apiserver anyway.
        return Ok(Vec::new());
    };
    let volumes = spec.volumes.as_deref().unwrap_or_default();
    for reserved in [BUNDLE_VOLUME, SPOOL_VOLUME] {
        if volumes.iter().any(|v| v.name == reserved) {
            return Err(InjectError::ReservedName(reserved));
        }
    }
    let config = &InjectConfig {
        credit_nano_usd: credit_nano_usd(pod, config.credit_nano_usd)?,
        ..config.clone()
    };

    let mut ops = Vec::new();
    // First init container, so that it runs before any other init container that may call an LLM.
    match spec.init_containers.as_deref() {
        Some([_, ..]) => ops.push(add(
            &["spec", "initContainers", "0"],
            to_value(&sidecar(config)),
        )),
        _ => ops.push(add(
            &["spec", "initContainers"],
            Value::Array(vec![to_value(&sidecar(config))]),
        )),
    }
    push(
        &mut ops,
        spec.volumes.is_some(),
        &["spec", "volumes"],
        to_value(&bundle_volume(bundle)),
    );
    push(
        &mut ops,
        true,
        &["spec", "volumes"],
        to_value(&spool_volume()),
    );
    if annotation(pod, SET_BASE_URLS_ANNOTATION) == Some("true") {
        for (index, container) in spec.containers.iter().enumerate() {
            let index = index.to_string();
            let path = ["spec", "containers", index.as_str(), "env"];
            let mut has_env = container.env.is_some();
            for (name, value) in BASE_URLS {
                let set = container.env.iter().flatten().any(|e| e.name == name);
                if !set {
                    push(&mut ops, has_env, &path, to_value(&env(name, value)));
                    has_env = true;
                }
            }
        }
    }
    // The bundle annotation exists, so annotations do too.
    ops.push(add(
        &["metadata", "annotations", INJECTED_ANNOTATION],
        Value::String(config.image.clone()),
    ));
    Ok(ops)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use serde_json::json;

    fn config() -> InjectConfig {
        InjectConfig {
            image: "ghcr.io/spendguard/spendguard:0.1.0".into(),
            ledger_url: "http://spendguard-ledger.spendguard-system.svc:7100".into(),
            operator_namespace: "spendguard-system".into(),
            credit_nano_usd: 0,
            credit_ttl_ms: 60_000,
            credit_ahead_ms: 2_000,
            credit_quiet_ms: 0,
        }
    }

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    fn opted_in_pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "agent", "namespace": "team",
                "labels": {"spendguard.io/inject": "true"},
                "annotations": {"spendguard.io/bundle": "research-agent", "spendguard.io/set-base-urls": "true"}
            },
            "spec": {"containers": [
                {"name": "app", "image": "app:1"},
                {"name": "worker", "image": "app:1", "env": [{"name": "OPENAI_BASE_URL", "value": "http://mine/v1"}]}
            ]}
        })
    }

    /// Applies the patch to the pod, as the apiserver does.
    fn apply(value: &Value, ops: Vec<PatchOperation>) -> Value {
        let mut doc = value.clone();
        json_patch::patch(&mut doc, &json_patch::Patch(ops)).unwrap();
        doc
    }

    #[test]
    fn injects_a_native_sidecar_with_bundle_env_probes_and_hardening() {
        let original = opted_in_pod();
        let ops = patch(&pod(original.clone()), "team", &config()).unwrap();
        let patched = apply(&original, ops);
        let init = patched["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(init.len(), 1);
        let sidecar = &init[0];
        assert_eq!(sidecar["name"], SIDECAR_NAME);
        assert_eq!(sidecar["restartPolicy"], "Always");
        assert_eq!(sidecar["image"], "ghcr.io/spendguard/spendguard:0.1.0");
        assert_eq!(sidecar["args"], json!(["sidecar"]));
        let env = sidecar["env"].as_array().unwrap();
        let value = |name: &str| {
            env.iter()
                .find(|e| e["name"] == name)
                .unwrap_or_else(|| panic!("{name} missing"))
                .clone()
        };
        assert_eq!(
            value("SPENDGUARD_LEDGER_URL")["value"],
            "http://spendguard-ledger.spendguard-system.svc:7100"
        );
        assert_eq!(value("SPENDGUARD_BUNDLE_DIR")["value"], BUNDLE_DIR);
        assert_eq!(
            value("SPENDGUARD_WORKLOAD_INSTANCE_ID")["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.name"
        );
        assert_eq!(
            value("SPENDGUARD_SIDECAR_LISTEN")["value"],
            "127.0.0.1:8787"
        );
        assert_eq!(value("SPENDGUARD_ADMIN_ADDR")["value"], "0.0.0.0:9464");
        assert!(
            env.iter()
                .all(|e| e["name"] != "SPENDGUARD_CREDIT_NANO_USD"),
            "no credits unless configured"
        );
        let with_credits = serde_json::to_value(super::sidecar(&InjectConfig {
            credit_nano_usd: 5_000_000_000,
            credit_ahead_ms: 1_500,
            credit_quiet_ms: 30_000,
            ..config()
        }))
        .unwrap();
        assert!(
            with_credits["env"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "SPENDGUARD_CREDIT_NANO_USD" && e["value"] == "5000000000")
        );
        assert!(
            with_credits["env"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "SPENDGUARD_CREDIT_TTL_MS" && e["value"] == "60000")
        );
        for (name, value) in [
            ("SPENDGUARD_CREDIT_AHEAD_MS", "1500"),
            ("SPENDGUARD_CREDIT_QUIET_MS", "30000"),
        ] {
            assert!(
                with_credits["env"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["name"] == name && e["value"] == value),
                "{name}"
            );
        }
        assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(sidecar["readinessProbe"]["httpGet"]["port"], 9464);
        assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(sidecar["startupProbe"]["httpGet"]["port"], 9464);
        let security = &sidecar["securityContext"];
        assert_eq!(security["runAsNonRoot"], true);
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
        assert!(sidecar["resources"]["limits"]["memory"].is_string());
        assert_eq!(value("SPENDGUARD_FAIL_OPEN_SPOOL_DIR")["value"], SPOOL_DIR);
        assert_eq!(
            sidecar["volumeMounts"],
            json!([
                {"name": BUNDLE_VOLUME, "mountPath": BUNDLE_DIR, "readOnly": true},
                {"name": SPOOL_VOLUME, "mountPath": SPOOL_DIR}
            ])
        );
        assert_eq!(
            patched["spec"]["volumes"],
            json!([
                {"name": BUNDLE_VOLUME, "configMap": {"name": "spendguard-bundle-research-agent", "optional": false}},
                {"name": SPOOL_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}}
            ])
        );
        assert_eq!(
            patched["metadata"]["annotations"][INJECTED_ANNOTATION],
            "ghcr.io/spendguard/spendguard:0.1.0"
        );
        // Base URLs: set where absent, never overriding the user's own value.
        assert_eq!(
            patched["spec"]["containers"][0]["env"],
            json!([
                {"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:8787/v1"},
                {"name": "ANTHROPIC_BASE_URL", "value": "http://127.0.0.1:8787"}
            ])
        );
        assert_eq!(
            patched["spec"]["containers"][1]["env"],
            json!([
                {"name": "OPENAI_BASE_URL", "value": "http://mine/v1"},
                {"name": "ANTHROPIC_BASE_URL", "value": "http://127.0.0.1:8787"}
            ])
        );
    }

    #[test]
    fn a_second_pass_changes_nothing() {
        let original = opted_in_pod();
        let once = apply(
            &original,
            patch(&pod(original.clone()), "team", &config()).unwrap(),
        );
        assert_eq!(patch(&pod(once), "team", &config()).unwrap(), vec![]);
    }

    #[test]
    fn goes_first_among_existing_init_containers_and_keeps_existing_volumes() {
        let mut original = opted_in_pod();
        original["spec"]["initContainers"] = json!([{"name": "migrate", "image": "app:1"}]);
        original["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
        original["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove(SET_BASE_URLS_ANNOTATION);
        let patched = apply(
            &original,
            patch(&pod(original.clone()), "team", &config()).unwrap(),
        );
        let names: Vec<&str> = patched["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [SIDECAR_NAME, "migrate"]);
        assert_eq!(patched["spec"]["volumes"][0]["name"], "data");
        assert_eq!(patched["spec"]["volumes"][1]["name"], BUNDLE_VOLUME);
        // Without the annotation, app env stays as it was.
        assert!(patched["spec"]["containers"][0].get("env").is_none());
    }

    #[test]
    fn pods_that_are_not_ours_are_left_alone() {
        let mut plain = opted_in_pod();
        plain["metadata"]["labels"] = json!({"app": "x"});
        assert_eq!(patch(&pod(plain), "team", &config()).unwrap(), vec![]);
        let mut off = opted_in_pod();
        off["metadata"]["labels"] = json!({"spendguard.io/inject": "false"});
        assert_eq!(patch(&pod(off), "team", &config()).unwrap(), vec![]);
        assert_eq!(
            patch(&pod(opted_in_pod()), "spendguard-system", &config()).unwrap(),
            vec![]
        );
    }

    #[test]
    fn opted_in_pods_that_cannot_be_guarded_are_refused() {
        let mut missing = opted_in_pod();
        missing["metadata"]["annotations"] = json!({});
        let error = patch(&pod(missing), "team", &config()).unwrap_err();
        assert_eq!(error, InjectError::BundleMissing);
        assert_eq!(error.code(), "SPENDGUARD_BUNDLE_MISSING");
        assert!(error.to_string().contains("refusing to run it unguarded"));

        for bad in ["", "Research", "a/b", "-x", &"a".repeat(236)] {
            let mut invalid = opted_in_pod();
            invalid["metadata"]["annotations"][BUNDLE_ANNOTATION] = json!(bad);
            assert_eq!(
                patch(&pod(invalid), "team", &config()).unwrap_err(),
                InjectError::BundleNameInvalid(bad.to_owned()),
                "{bad:?}"
            );
        }
        let mut longest = opted_in_pod();
        longest["metadata"]["annotations"][BUNDLE_ANNOTATION] = json!("a".repeat(235));
        assert!(patch(&pod(longest), "team", &config()).is_ok());

        for reserved in [BUNDLE_VOLUME, SPOOL_VOLUME] {
            let mut clash = opted_in_pod();
            clash["spec"]["volumes"] = json!([{"name": reserved, "emptyDir": {}}]);
            assert_eq!(
                patch(&pod(clash), "team", &config()).unwrap_err(),
                InjectError::ReservedName(reserved)
            );
        }

        for bad in ["", "abc", "-1", "+5", "1e9", "5.0", "1000000000000000001"] {
            let mut invalid = opted_in_pod();
            invalid["metadata"]["annotations"][CREDIT_ANNOTATION] = json!(bad);
            let error = patch(&pod(invalid), "team", &config()).unwrap_err();
            assert_eq!(error, InjectError::CreditInvalid(bad.to_owned()), "{bad:?}");
            assert_eq!(error.code(), "SPENDGUARD_CREDIT_INVALID");
        }
    }

    #[test]
    fn a_pod_annotation_sets_or_turns_off_its_credit() {
        let credit_env = |annotation: Option<&str>, default: i64| {
            let mut value = opted_in_pod();
            if let Some(credit) = annotation {
                value["metadata"]["annotations"][CREDIT_ANNOTATION] = json!(credit);
            }
            let config = InjectConfig {
                credit_nano_usd: default,
                ..config()
            };
            let ops = serde_json::to_value(patch(&pod(value), "team", &config).unwrap()).unwrap();
            ops.as_array()
                .unwrap()
                .iter()
                .flat_map(|op| {
                    let sidecar = &op["value"];
                    sidecar
                        .as_array()
                        .cloned()
                        .unwrap_or_else(|| vec![sidecar.clone()])
                })
                .filter(|c| c["name"] == SIDECAR_NAME)
                .flat_map(|c| c["env"].as_array().cloned().unwrap_or_default())
                .find(|e| e["name"] == "SPENDGUARD_CREDIT_NANO_USD")
                .map(|e| e["value"].as_str().unwrap().to_owned())
        };
        assert_eq!(credit_env(None, 0), None);
        assert_eq!(credit_env(None, 9_000), Some("9000".to_owned()));
        assert_eq!(credit_env(Some("7000"), 0), Some("7000".to_owned()));
        assert_eq!(credit_env(Some("0"), 9_000), None, "0 turns credits off");
    }
}
