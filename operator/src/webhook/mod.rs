//! Admission webhooks, served over HTTPS by every operator replica (they are stateless; only the
//! leader reconciles):
//!
//! - `POST /inject` (mutating, pods, CREATE): injects the sidecar into opted-in pods (`inject`).
//! - `POST /validate` (validating, SpendGuard CRs): rules CEL cannot express (`validate`).
//! - `POST /approve` (mutating, `approvalrequests/status`, UPDATE): checks that the user may
//!   approve (SubjectAccessReview) and stamps the approver identity (`approve`).
//!
//! ```text
//! startup and every minute: CA Secret (create-if-absent, shared)
//!   ─► serving cert (per replica; re-issued daily or when the Secret's CA changes)
//!   ─► caBundle of the three webhook configurations (same bytes from every replica)
//! ```
//!
//! See docs/design/admission-webhooks.md.

pub mod approve;
pub mod ca_bundle;
pub mod certs;
pub mod inject;
pub mod review;
pub mod tls;
pub mod validate;

use axum::Router;
use axum::routing::post;
use clap::Args;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// How often the CA Secret is re-read and the caBundle re-asserted (a Helm upgrade may have
/// rewritten a configuration; an operator may have replaced the CA).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Largest AdmissionReview accepted (the apiserver sends at most ~3 MiB objects).
const MAX_REVIEW_BYTES: usize = 8 << 20;

/// What can go wrong serving the webhooks. Each variant has a stable code.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// A flag is missing or inconsistent.
    #[error("webhook configuration: {0}")]
    Config(String),
    /// The CA Secret could not be read or created.
    #[error("webhook CA secret: {0}")]
    CaSecret(#[source] kube::Error),
    /// The CA Secret exists but does not hold a usable CA.
    #[error("webhook CA secret is invalid: {0}")]
    CaSecretInvalid(String),
    /// A certificate could not be made.
    #[error("webhook certificate: {0}")]
    Certificate(String),
    /// The TLS configuration was refused.
    #[error("webhook TLS: {0}")]
    Tls(String),
    /// The listen address could not be bound.
    #[error("webhook listener on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTPS server stopped.
    #[error("webhook server: {0}")]
    Serve(#[source] std::io::Error),
    /// A webhook configuration could not be read or patched.
    #[error("webhook configuration {configuration}: {detail}")]
    CaBundle {
        /// Its name.
        configuration: String,
        /// Why.
        detail: String,
    },
}

impl WebhookError {
    /// Stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Config(_) => "WEBHOOK_CONFIG",
            Self::CaSecret(_) => "WEBHOOK_CA_SECRET",
            Self::CaSecretInvalid(_) => "WEBHOOK_CA_SECRET_INVALID",
            Self::Certificate(_) => "WEBHOOK_CERTIFICATE",
            Self::Tls(_) => "WEBHOOK_TLS",
            Self::Bind { .. } => "WEBHOOK_BIND",
            Self::Serve(_) => "WEBHOOK_SERVE",
            Self::CaBundle { .. } => "WEBHOOK_CA_BUNDLE",
        }
    }
}

/// `SPENDGUARD_WEBHOOK_*` and sidecar-injection flags.
#[derive(Debug, Clone, Args)]
pub struct WebhookArgs {
    /// Serve the admission webhooks. Off unless asked: they need the Service, configurations and
    /// RBAC that the chart creates (and turns this on with); an operator run outside a cluster
    /// has no use for them.
    #[arg(
        long = "webhook-enabled",
        env = "SPENDGUARD_WEBHOOK_ENABLED",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub enabled: bool,
    /// HTTPS listen address.
    #[arg(
        long = "webhook-addr",
        env = "SPENDGUARD_WEBHOOK_ADDR",
        default_value = "0.0.0.0:8443"
    )]
    pub addr: SocketAddr,
    /// Service in front of the webhook; the serving certificate names
    /// `<service>.<namespace>.svc` (and the shorter forms).
    #[arg(
        long = "webhook-service",
        env = "SPENDGUARD_WEBHOOK_SERVICE",
        default_value = "spendguard-webhook"
    )]
    pub service: String,
    /// More DNS names or IPs for the serving certificate (comma-separated), e.g. `127.0.0.1`.
    #[arg(
        long = "webhook-extra-sans",
        env = "SPENDGUARD_WEBHOOK_EXTRA_SANS",
        value_delimiter = ','
    )]
    pub extra_sans: Vec<String>,
    /// Secret (in the operator namespace) holding the CA every replica shares.
    #[arg(
        long = "webhook-ca-secret",
        env = "SPENDGUARD_WEBHOOK_CA_SECRET",
        default_value = "spendguard-webhook-ca"
    )]
    pub ca_secret: String,
    /// MutatingWebhookConfiguration whose caBundle to keep (empty: none).
    #[arg(
        long = "mutating-webhook-configuration",
        env = "SPENDGUARD_MUTATING_WEBHOOK_CONFIGURATION",
        default_value = "spendguard-injector"
    )]
    pub mutating_configuration: String,
    /// ValidatingWebhookConfiguration whose caBundle to keep (empty: none).
    #[arg(
        long = "validating-webhook-configuration",
        env = "SPENDGUARD_VALIDATING_WEBHOOK_CONFIGURATION",
        default_value = "spendguard-validator"
    )]
    pub validating_configuration: String,
    /// MutatingWebhookConfiguration of the approvals webhook whose caBundle to keep (empty:
    /// none).
    #[arg(
        long = "approval-webhook-configuration",
        env = "SPENDGUARD_APPROVAL_WEBHOOK_CONFIGURATION",
        default_value = "spendguard-approvals"
    )]
    pub approval_configuration: String,
    /// The operator's own username, the only one that may expire ApprovalRequests (and one that
    /// never approves). Default: `system:serviceaccount:<POD_NAMESPACE>:spendguard-operator`.
    #[arg(
        long = "webhook-operator-username",
        env = "SPENDGUARD_WEBHOOK_OPERATOR_USERNAME"
    )]
    pub operator_username: Option<String>,
    /// Image of the injected sidecar (required while the webhooks are enabled).
    #[arg(long = "sidecar-image", env = "SPENDGUARD_SIDECAR_IMAGE")]
    pub sidecar_image: Option<String>,
    /// The ledger's data-path gRPC URL given to injected sidecars (required while the webhooks
    /// are enabled). Never the control address the operator itself uses: sidecars run beside
    /// the agents, which must not reach the control listener.
    #[arg(long = "sidecar-ledger-url", env = "SPENDGUARD_SIDECAR_LEDGER_URL")]
    pub sidecar_ledger_url: Option<String>,
    /// Credit size given to injected sidecars (their `SPENDGUARD_CREDIT_NANO_USD`;
    /// docs/design/credits.md). 0, the default, leaves credits off.
    #[arg(
        long = "sidecar-credit-nano-usd",
        env = "SPENDGUARD_SIDECAR_CREDIT_NANO_USD",
        default_value_t = 0,
        value_parser = clap::builder::RangedI64ValueParser::<i64>::new().range(0..=1_000_000_000_000_000_000)
    )]
    pub sidecar_credit_nano_usd: i64,
    /// Credit lifetime given to injected sidecars that use credits (their
    /// `SPENDGUARD_CREDIT_TTL_MS`).
    #[arg(
        long = "sidecar-credit-ttl-ms",
        env = "SPENDGUARD_SIDECAR_CREDIT_TTL_MS",
        default_value_t = 60_000,
        value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(8_000..=3_600_000)
    )]
    pub sidecar_credit_ttl_ms: u64,
    /// Credit sizing given to injected sidecars that use credits (their
    /// `SPENDGUARD_CREDIT_AHEAD_MS`).
    #[arg(
        long = "sidecar-credit-ahead-ms",
        env = "SPENDGUARD_SIDECAR_CREDIT_AHEAD_MS",
        default_value_t = 2_000,
        value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(0..=600_000)
    )]
    pub sidecar_credit_ahead_ms: u64,
    /// Quiet period given to injected sidecars that use credits (their
    /// `SPENDGUARD_CREDIT_QUIET_MS`; 0: their derived default).
    #[arg(
        long = "sidecar-credit-quiet-ms",
        env = "SPENDGUARD_SIDECAR_CREDIT_QUIET_MS",
        default_value_t = 0,
        value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(0..=3_600_000)
    )]
    pub sidecar_credit_quiet_ms: u64,
}

/// Everything the webhook server needs, resolved from flags.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Listen address.
    pub addr: SocketAddr,
    /// The operator's namespace (CA Secret; never injected).
    pub namespace: String,
    /// Names and IPs in the serving certificate.
    pub sans: Vec<String>,
    /// CA Secret name.
    pub ca_secret: String,
    /// Configurations to patch.
    pub configurations: ca_bundle::Configurations,
    /// Injection settings.
    pub inject: inject::InjectConfig,
    /// Approvals webhook settings.
    pub approvals: approve::ApprovalConfig,
    /// How often the CA Secret is re-read and caBundle re-asserted.
    pub upkeep_interval: Duration,
}

fn non_empty(name: &str) -> Option<String> {
    (!name.is_empty()).then(|| name.to_owned())
}

impl WebhookArgs {
    /// The configuration, or `None` when disabled.
    ///
    /// # Errors
    /// [`WebhookError::Config`] when enabled without a sidecar image or a sidecar ledger URL.
    pub fn config(&self, namespace: &str) -> Result<Option<WebhookConfig>, WebhookError> {
        if !self.enabled {
            return Ok(None);
        }
        let image = self
            .sidecar_image
            .clone()
            .filter(|i| !i.is_empty())
            .ok_or_else(|| {
                WebhookError::Config(
                    "SPENDGUARD_SIDECAR_IMAGE is required while the webhooks are enabled".into(),
                )
            })?;
        let ledger_url = self
            .sidecar_ledger_url
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| {
                WebhookError::Config(
                    "SPENDGUARD_SIDECAR_LEDGER_URL (the ledger's data-path address) is required while the webhooks are enabled".into(),
                )
            })?;
        let service = &self.service;
        let mut sans = vec![
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
            format!("{service}.{namespace}"),
            service.clone(),
        ];
        sans.extend(self.extra_sans.iter().filter(|s| !s.is_empty()).cloned());
        Ok(Some(WebhookConfig {
            addr: self.addr,
            namespace: namespace.to_owned(),
            sans,
            ca_secret: self.ca_secret.clone(),
            configurations: ca_bundle::Configurations {
                mutating: non_empty(&self.mutating_configuration),
                validating: non_empty(&self.validating_configuration),
                approvals: non_empty(&self.approval_configuration),
            },
            inject: inject::InjectConfig {
                image,
                ledger_url,
                operator_namespace: namespace.to_owned(),
                credit_nano_usd: self.sidecar_credit_nano_usd,
                credit_ttl_ms: self.sidecar_credit_ttl_ms,
                credit_ahead_ms: self.sidecar_credit_ahead_ms,
                credit_quiet_ms: self.sidecar_credit_quiet_ms,
            },
            approvals: approve::ApprovalConfig {
                operator_username: self
                    .operator_username
                    .clone()
                    .filter(|u| !u.is_empty())
                    .unwrap_or_else(|| {
                        format!("system:serviceaccount:{namespace}:spendguard-operator")
                    }),
            },
            upkeep_interval: UPKEEP_INTERVAL,
        }))
    }
}

/// The routes, for the TLS server (and for tests that drive them directly).
pub fn router(state: review::WebhookState) -> Router {
    Router::new()
        .route("/inject", post(review::inject))
        .route("/validate", post(review::validate))
        .route("/approve", post(review::approve))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REVIEW_BYTES))
        .with_state(state)
}

/// A webhook server that is listening.
pub struct RunningWebhook {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    /// The CA in PEM (what `caBundle` holds).
    pub ca_pem: String,
    /// Serves until aborted; ends with an error only if serving fails.
    pub task: JoinHandle<Result<(), WebhookError>>,
}

/// Loads (or creates) the shared CA, issues the serving certificate, binds, and starts serving
/// in the background, along with certificate renewal and caBundle upkeep.
///
/// # Errors
/// [`WebhookError`] when the CA, certificate, TLS setup or bind fails.
pub async fn start(
    config: WebhookConfig,
    kube: kube::Client,
) -> Result<RunningWebhook, WebhookError> {
    let ca = certs::load_or_create_ca(kube.clone(), &config.namespace, &config.ca_secret).await?;
    let resolver = Arc::new(certs::CertResolver::new(ca.issue_serving(&config.sans)?));
    let tcp = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|source| WebhookError::Bind {
            addr: config.addr,
            source,
        })?;
    let listener = tls::TlsListener::spawn(tcp, tls::server_config(Arc::clone(&resolver))?)
        .map_err(|source| WebhookError::Bind {
            addr: config.addr,
            source,
        })?;
    let addr =
        axum::serve::Listener::local_addr(&listener).map_err(|source| WebhookError::Bind {
            addr: config.addr,
            source,
        })?;
    let ca_pem = ca.cert_pem().to_owned();
    let app = router(review::WebhookState {
        inject: Arc::new(config.inject.clone()),
        approvals: Arc::new(config.approvals.clone()),
        kube: kube.clone(),
    });
    info!(%addr, "admission webhooks serving");
    let upkeep = Upkeep {
        kube,
        namespace: config.namespace,
        ca_secret: config.ca_secret,
        sans: config.sans,
        configurations: config.configurations,
        resolver,
        interval: config.upkeep_interval,
    };
    let task = tokio::spawn(async move {
        tokio::select! {
            () = upkeep.run(ca) => Ok(()),
            result = axum::serve(listener, app) => result.map_err(WebhookError::Serve),
        }
    });
    Ok(RunningWebhook { addr, ca_pem, task })
}

/// Keeps certificates and caBundle in step with the CA Secret.
struct Upkeep {
    kube: kube::Client,
    namespace: String,
    ca_secret: String,
    sans: Vec<String>,
    configurations: ca_bundle::Configurations,
    resolver: Arc<certs::CertResolver>,
    interval: Duration,
}

impl Upkeep {
    /// Every interval (a minute): re-read the CA Secret (if it was replaced, serve a certificate from the new
    /// CA, so all replicas converge on the Secret instead of each re-asserting its own CA),
    /// re-issue the serving certificate once a day, and make sure caBundle holds the CA.
    /// Failures are logged, not fatal: the webhooks fail closed until the apiserver trusts us.
    async fn run(self, mut ca: certs::WebhookCa) {
        let mut issued = tokio::time::Instant::now();
        loop {
            match certs::load_or_create_ca(self.kube.clone(), &self.namespace, &self.ca_secret)
                .await
            {
                Ok(current) if current.cert_pem() != ca.cert_pem() => {
                    if self.reissue(&current) {
                        info!("webhook CA changed in its Secret; serving from the new CA");
                        ca = current;
                        issued = tokio::time::Instant::now();
                    }
                }
                Ok(_) => {}
                Err(error) => warn!(code = error.code(), %error, "reading the webhook CA failed"),
            }
            if issued.elapsed() >= certs::SERVING_RENEWAL && self.reissue(&ca) {
                info!("webhook serving certificate renewed");
                issued = tokio::time::Instant::now();
            }
            match ca_bundle::patch(&self.kube, &self.configurations, ca.cert_pem()).await {
                Ok(0) => {}
                Ok(changed) => info!(changed, "webhook caBundle patched"),
                Err(error) => {
                    warn!(code = error.code(), %error, "patching the webhook caBundle failed");
                }
            }
            tokio::time::sleep(self.interval).await;
        }
    }

    /// Serves a new certificate from `ca`; on failure the current one stays (valid for weeks).
    fn reissue(&self, ca: &certs::WebhookCa) -> bool {
        match ca.issue_serving(&self.sans) {
            Ok(key) => {
                self.resolver.replace(key);
                true
            }
            Err(error) => {
                warn!(code = error.code(), %error, "issuing the webhook certificate failed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        webhook: WebhookArgs,
    }

    fn parse(args: &[&str]) -> WebhookArgs {
        Flags::try_parse_from(std::iter::once("operator").chain(args.iter().copied()))
            .unwrap()
            .webhook
    }

    #[test]
    fn off_unless_enabled_and_then_the_sidecar_image_is_required() {
        assert!(parse(&[]).config("ns").unwrap().is_none());
        let error = parse(&["--webhook-enabled", "true"])
            .config("ns")
            .unwrap_err();
        assert_eq!(error.code(), "WEBHOOK_CONFIG");
        assert!(error.to_string().contains("SPENDGUARD_SIDECAR_IMAGE"));
        let error = parse(&["--webhook-enabled", "true", "--sidecar-image", "img:1"])
            .config("ns")
            .unwrap_err();
        assert!(error.to_string().contains("SPENDGUARD_SIDECAR_LEDGER_URL"));
    }

    #[test]
    fn flags_resolve_into_the_server_configuration() {
        let config = parse(&[
            "--webhook-enabled",
            "true",
            "--sidecar-image",
            "img:1",
            "--sidecar-ledger-url",
            "http://ledger:7100",
            "--webhook-extra-sans",
            "127.0.0.1,localhost",
            "--validating-webhook-configuration",
            "",
        ])
        .config("spendguard-system")
        .unwrap()
        .unwrap();
        assert_eq!(config.addr, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(
            config.sans,
            [
                "spendguard-webhook.spendguard-system.svc",
                "spendguard-webhook.spendguard-system.svc.cluster.local",
                "spendguard-webhook.spendguard-system",
                "spendguard-webhook",
                "127.0.0.1",
                "localhost"
            ]
        );
        assert_eq!(
            config.configurations,
            ca_bundle::Configurations {
                mutating: Some("spendguard-injector".into()),
                validating: None,
                approvals: Some("spendguard-approvals".into()),
            }
        );
        assert_eq!(
            config.approvals.operator_username,
            "system:serviceaccount:spendguard-system:spendguard-operator"
        );
        assert_eq!(config.inject.image, "img:1");
        assert_eq!(config.inject.ledger_url, "http://ledger:7100");
        assert_eq!(config.inject.operator_namespace, "spendguard-system");
        assert_eq!(config.ca_secret, "spendguard-webhook-ca");
    }
}
