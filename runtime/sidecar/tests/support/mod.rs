//! A whole data path for tests: a real ledger on throwaway PostgreSQL, the mock provider, and
//! the sidecar in-process, plus a small HTTP client.
#![allow(dead_code, clippy::unwrap_used, unreachable_pub)]

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use spendguard_core::contract::{Bundle, Contract};
use spendguard_core::pricing::PricingSnapshot;
use spendguard_mock_provider::{MockConfig, MockProvider};
use spendguard_proto::ledger::v1 as pb;
use spendguard_sidecar::{RunningSidecar, SidecarArgs};
use spendguard_testkit::TestLedger;
use std::time::Duration;

pub mod ledger_front;

pub const TENANT: &str = "acme";
pub const BUDGET: &str = "team/llm";
pub const WORKLOAD: &str = "agent-0";

/// $0.15 / $0.60 per million tokens (gpt-4o-mini-like) and $3 / $15 (Claude Sonnet-like).
pub fn pricing() -> PricingSnapshot {
    serde_json::from_value(json!({
        "version": "test-2026-11",
        "entries": [
            {"provider": "openai", "model": "gpt-4o-mini",
             "price": {"input": 150_000_000, "cached_input": 75_000_000, "cache_write": 150_000_000, "output": 600_000_000}},
            {"provider": "anthropic", "model": "claude-sonnet-4-5",
             "price": {"input": 3_000_000_000_i64, "cached_input": 300_000_000, "cache_write": 3_750_000_000_i64,
                       "cache_write_1h": 6_000_000_000_i64, "output": 15_000_000_000_i64}}
        ]
    }))
    .unwrap()
}

/// [`pricing`], published at `published_at` (RFC 3339) when given.
pub fn pricing_published(published_at: Option<&str>) -> PricingSnapshot {
    PricingSnapshot {
        published_at: published_at.map(str::to_owned),
        ..pricing()
    }
}

pub fn contract(extra: Value) -> Contract {
    let mut base = json!({"version": "test-contract", "deny_models": ["gpt-4-denied"], "max_output_tokens": 4096});
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
    serde_json::from_value(base).unwrap()
}

/// Flags for credits of a fixed `nano_usd` each (not sized on demand: a test's few calls would
/// open none).
pub fn fixed_credits(nano_usd: i64) -> Vec<String> {
    vec![
        format!("--credit-nano-usd={nano_usd}"),
        "--credit-ahead-ms=0".into(),
    ]
}

pub struct Options {
    pub limit: i64,
    pub soft_cap: i64,
    pub contract: Value,
    pub mock: MockConfig,
    pub flags: Vec<String>,
    /// The pricing snapshot's `published_at` (RFC 3339); none by default.
    pub pricing_published_at: Option<String>,
    /// The sidecar talks to the ledger through a front that answers CheckFencing so
    /// (`ledger_front.rs`); directly when `None` and `bare_answers` is `None`.
    pub ledger_front: Option<ledger_front::CheckFencing>,
    /// The sidecar talks to the ledger through a front that answers the methods named here
    /// itself, without a SpendGuard error detail (`ledger_front.rs`).
    pub bare_answers: Option<std::sync::Arc<ledger_front::Bare>>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            limit: 100_000_000_000,
            soft_cap: 0,
            contract: json!({}),
            mock: MockConfig::default(),
            flags: Vec::new(),
            pricing_published_at: None,
            ledger_front: None,
            bare_answers: None,
        }
    }
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: SidecarArgs,
}

pub struct Stack {
    pub ledger: TestLedger,
    pub ledger_addr: std::net::SocketAddr,
    pub mock: MockProvider,
    pub mock_url: String,
    pub sidecar: Option<RunningSidecar>,
    pub base: String,
    pub dir: tempfile::TempDir,
    args: SidecarArgs,
    registry: Option<prometheus_client::registry::Registry>,
}

impl Stack {
    pub async fn start(options: Options) -> Self {
        let mut ledger = TestLedger::start().await.unwrap();
        let ledger_addr = ledger.ledger.as_ref().unwrap().addr;
        spendguard_testkit::ledger::tenant(&mut ledger.client, TENANT)
            .await
            .unwrap();
        ledger
            .client
            .upsert_budget(pb::UpsertBudgetRequest {
                tenant_id: TENANT.into(),
                budget_id: BUDGET.into(),
                limit_nano_usd: options.limit,
                soft_cap_nano_usd: options.soft_cap,
                window: pb::BudgetWindow::Lifetime.into(),
            })
            .await
            .unwrap();
        // What the operator does for each ContractBundle: register its pricing for the tenant.
        let pricing = pricing_published(options.pricing_published_at.as_deref());
        let snapshot = spendguard_core::pricing::Pricing::new(pricing.clone()).unwrap();
        spendguard_testkit::ledger::register_pricing(
            &mut ledger.client,
            TENANT,
            spendguard_sidecar::bundle::pricing_ref(&snapshot),
        )
        .await
        .unwrap();
        let mock = MockProvider::new(options.mock);
        let mock_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mock_addr = mock_listener.local_addr().unwrap();
        mock.spawn(mock_listener);

        let dir = tempfile::tempdir().unwrap();
        let (bytes, sha) = Bundle::canonical(&contract(options.contract), &pricing).unwrap();
        spendguard_sidecar::bundle::write(dir.path(), &bytes, &sha, TENANT, &[BUDGET]).unwrap();
        let sidecar_ledger = match (options.ledger_front, options.bare_answers) {
            (None, None) => ledger_addr,
            (check_fencing, bare) => {
                ledger_front::start(ledger_addr, check_fencing, bare.unwrap_or_default()).await
            }
        };
        let mut argv: Vec<String> = vec![
            "sidecar".into(),
            format!("--ledger-url=http://{sidecar_ledger}"),
            format!("--bundle-dir={}", dir.path().display()),
            format!("--workload-instance-id={WORKLOAD}"),
            format!("--openai-base-url=http://{mock_addr}"),
            format!("--anthropic-base-url=http://{mock_addr}"),
            "--lease-ttl-ms=3000".into(),
            "--lease-grace-ms=1500".into(),
            "--lease-safety-margin-ms=200".into(),
            "--upstream-timeout-ms=5000".into(),
            "--shutdown-grace-ms=5000".into(),
        ];
        // A test's flag replaces the stack's own of the same name.
        let name = |arg: &str| arg.split('=').next().unwrap_or_default().to_owned();
        argv.retain(|arg| !options.flags.iter().any(|flag| name(flag) == name(arg)));
        argv.extend(options.flags);
        let args = Cli::parse_from(argv).args;
        let mut stack = Self {
            ledger,
            ledger_addr,
            mock,
            mock_url: format!("http://{mock_addr}"),
            sidecar: None,
            base: String::new(),
            dir,
            args,
            registry: None,
        };
        stack.start_sidecar().await;
        stack
    }

    /// Starts (or restarts) the sidecar and waits until it holds its lease.
    pub async fn start_sidecar(&mut self) {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        let sidecar = spendguard_sidecar::start(&self.args, http, grpc, &mut registry)
            .await
            .unwrap();
        self.base = format!("http://{}", sidecar.http_addr);
        self.sidecar = Some(sidecar);
        self.registry = Some(registry);
        self.wait_lease_held().await;
    }

    /// Waits (up to 10 s) until the sidecar holds its lease.
    pub async fn wait_lease_held(&self) {
        let mut lease = self.sidecar().lease.clone();
        tokio::time::timeout(
            Duration::from_secs(10),
            lease.wait_for(|s| matches!(s, spendguard_sidecar::lease::LeaseState::Held { .. })),
        )
        .await
        .expect("sidecar holds its lease");
    }

    /// The running sidecar's metrics, as `/metrics` would show them.
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        if let Some(registry) = &self.registry {
            prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        }
        text
    }

    /// The value of the metric sample `name` (with its labels, if any), 0 when not exported.
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    pub async fn stop_sidecar(&mut self) {
        if let Some(sidecar) = self.sidecar.take() {
            sidecar.shutdown().await;
        }
    }

    pub fn sidecar(&self) -> &RunningSidecar {
        self.sidecar.as_ref().unwrap()
    }

    pub async fn balance(&mut self) -> pb::BudgetBalance {
        self.ledger.balance(TENANT, BUDGET).await.unwrap()
    }

    /// Starts the ledger again (after `self.ledger.stop()`) on the same database and address.
    pub async fn restart_ledger(&mut self) {
        let database_url = self.ledger.database_url.clone();
        self.ledger = TestLedger::start_at(&database_url, "ledger-0", self.ledger_addr)
            .await
            .unwrap();
    }

    /// Starts the ledger again (after `self.ledger.stop()`) with `tuning`.
    pub async fn restart_ledger_tuned(
        &mut self,
        tuning: &spendguard_testkit::ledger::LedgerTuning,
    ) {
        let database_url = self.ledger.database_url.clone();
        self.ledger = TestLedger::start_tuned(&database_url, "ledger-0", self.ledger_addr, tuning)
            .await
            .unwrap();
    }

    /// Waits (up to 20 s) for the sidecar's fail-open queue to drain; whether it did.
    pub async fn fail_open_drained(&self) -> bool {
        for _ in 0..400 {
            if self.sidecar().decider.fail_open_queue().is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.sidecar().decider.fail_open_queue().is_empty()
    }

    /// Another holder forces the sidecar's fencing scope to a newer epoch (an administrator's
    /// forced acquire), behind the sidecar's back.
    pub async fn force_epoch_forward(&mut self) {
        self.ledger
            .client
            .acquire_fencing_lease(pb::AcquireFencingLeaseRequest {
                scope_id: format!("{TENANT}/{WORKLOAD}"),
                tenant_id: TENANT.into(),
                workload_instance_id: "admin".into(),
                ttl_ms: 60_000,
                expected_epoch: 0,
                force: true,
                request_id: String::new(),
            })
            .await
            .unwrap();
    }

    /// Waits until no reservation of this sidecar is open, then returns the balance.
    pub async fn settled_balance(&mut self) -> pb::BudgetBalance {
        for _ in 0..200 {
            let balance = self.balance().await;
            if balance.reserved_nano_usd == 0 {
                return balance;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("reservations still open: {:?}", self.balance().await);
    }

    /// Waits until the sidecar holds no unsettled call (its table is updated right after the
    /// ledger answers a settlement, so it can trail the ledger's balance by a moment).
    pub async fn wait_no_open_calls(&self) {
        let open = || {
            let decider = &self.sidecar().decider;
            decider.open_reservations() + decider.pending_commits()
        };
        for _ in 0..200 {
            if open() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{} calls still open in the sidecar", open());
    }

    /// Events of `event_type` in the ledger's outbox, parsed, in sequence order.
    pub async fn events(&self, event_type: &str) -> Vec<Value> {
        spendguard_testkit::ledger::outbox_events(self.ledger.store().pool(), event_type)
            .await
            .unwrap()
    }

    /// Waits (up to 20 s) until the sidecar has no STOP record left to publish and the outbox
    /// holds at least `at_least` events of `event_type`; returns them.
    pub async fn published(&self, event_type: &str, at_least: usize) -> Vec<Value> {
        for _ in 0..400 {
            let found = self.events(event_type).await;
            if found.len() >= at_least && self.sidecar().decider.stop_evidence().is_empty() {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{event_type}: {} events, {} records still queued",
            self.events(event_type).await.len(),
            self.sidecar().decider.stop_evidence().len()
        );
    }

    pub fn upstream_requests(&self) -> Vec<Value> {
        self.mock.requests()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// An HTTP decide of `body`, answered 200 (a decision, whatever it is), as JSON.
    pub async fn decide_ok(&self, body: &Value) -> Value {
        let answer = post_json(&self.url("/v1/spendguard/decide"), &[], body).await;
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        answer.json()
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn request(url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> hyper::Request<Full<Bytes>> {
    let mut builder = hyper::Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(Full::new(Bytes::from(body))).unwrap()
}

/// POSTs and reads the whole response.
pub async fn post(url: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let response = client()
        .request(request(url, headers, body.to_vec()))
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

pub async fn post_json(url: &str, headers: &[(&str, &str)], body: &Value) -> Reply {
    post(url, headers, &serde_json::to_vec(body).unwrap()).await
}

pub const OPENAI_KEY: (&str, &str) = ("authorization", "Bearer sk-app-test");
pub const ANTHROPIC_KEY: (&str, &str) = ("x-api-key", "sk-ant-app-test");

pub fn chat_body(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "Say hello in one word."}]})
}

pub fn messages_body(stream: bool) -> Value {
    json!({"model": "claude-sonnet-4-5", "max_tokens": 256, "stream": stream,
           "messages": [{"role": "user", "content": "Say hello."}]})
}
