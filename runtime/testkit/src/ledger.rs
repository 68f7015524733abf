//! An in-process ledger on a fresh database of a shared throwaway cluster, with a connected
//! client and helpers to set up tenants, budgets and leases.

use crate::postgres::{OtherReplica, PgCluster, await_ledger_lock_waits};
use anyhow::Result;
use spendguard_core::LedgerError;
use spendguard_core::plan::{Command, Outcome};
pub use spendguard_ledger::LedgerTuning;
use spendguard_ledger::RunningLedger;
use spendguard_ledger::store::{ProducerClaim, ProducerCursor, Store};
use spendguard_proto::ledger::v1 as pb;
use std::sync::OnceLock;
use tonic::transport::Channel;

/// The gRPC client type.
pub type LedgerClient = pb::ledger_client::LedgerClient<Channel>;

/// One cluster per test binary; each test gets its own database.
pub fn shared_cluster() -> &'static PgCluster {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        // fsync off: tests check logic, not durability. The crash test kills the ledger, not
        // PostgreSQL, whose writes the OS keeps; the benchmarks run with fsync on.
        PgCluster::start(&[("fsync", "off"), ("max_connections", "400")])
            .expect("start the test PostgreSQL cluster")
    })
}

/// Applies the migrations to `database_url` as its owner, as `spendguard migrate` does before a
/// ledger starts (the ledger itself logs in as a member of `spendguard_runtime`).
///
/// # Errors
/// When the database refuses.
pub async fn migrate(database_url: &str) -> Result<()> {
    let owner = Store::connect(database_url, 1).await?;
    owner.migrate().await?;
    owner.pool().close().await;
    Ok(())
}

/// A ledger serving on a loopback port.
pub struct TestLedger {
    /// The owner's URL of its database (the ledger connects as [`crate::postgres::RUNTIME_LOGIN`]
    /// instead): tests forge and inspect rows through it.
    pub database_url: String,
    /// A pool on [`Self::database_url`]: as the owner, for tests that go around the ledger to
    /// check the database's own rules, or to forge what an older version wrote. (The ledger's
    /// [`Self::store`] is the runtime role's.)
    pub owner: sqlx::PgPool,
    /// The running ledger.
    pub ledger: Option<RunningLedger>,
    /// A connected client.
    pub client: LedgerClient,
    registry: prometheus_client::registry::Registry,
}

impl TestLedger {
    /// Starts a ledger with instance id `ledger-0` on a fresh database.
    ///
    /// # Errors
    /// When the database or server cannot start.
    pub async fn start() -> Result<Self> {
        let database_url = shared_cluster().create_database().await?;
        Self::start_on(&database_url, "ledger-0").await
    }

    /// [`TestLedger::start`] with `tuning` instead of the defaults.
    ///
    /// # Errors
    /// When the database or server cannot start.
    pub async fn start_with(tuning: &LedgerTuning) -> Result<Self> {
        let database_url = shared_cluster().create_database().await?;
        Self::start_tuned(&database_url, "ledger-0", "127.0.0.1:0".parse()?, tuning).await
    }

    /// Starts a ledger on an existing database.
    ///
    /// # Errors
    /// When the server cannot start.
    pub async fn start_on(database_url: &str, instance_id: &str) -> Result<Self> {
        Self::start_at(database_url, instance_id, "127.0.0.1:0".parse()?).await
    }

    /// Starts a ledger on an existing database with its data path at `addr` (a restart on the
    /// address sidecars already use; the control listener, which `client` uses, gets a new port).
    ///
    /// # Errors
    /// When the server cannot start or bind.
    pub async fn start_at(
        database_url: &str,
        instance_id: &str,
        addr: std::net::SocketAddr,
    ) -> Result<Self> {
        Self::start_tuned(database_url, instance_id, addr, &LedgerTuning::default()).await
    }

    /// [`TestLedger::start_at`] with `tuning` instead of the defaults.
    ///
    /// # Errors
    /// When the server cannot start or bind.
    pub async fn start_tuned(
        database_url: &str,
        instance_id: &str,
        addr: std::net::SocketAddr,
        tuning: &LedgerTuning,
    ) -> Result<Self> {
        Self::start_listening(
            database_url,
            instance_id,
            (addr, "127.0.0.1:0".parse()?),
            tuning,
        )
        .await
    }

    /// Starts a ledger on an existing database with its data path at `addr` and its control
    /// listener at `control_addr`: a restart that the clients of both listeners (an operator's
    /// too) reach again.
    ///
    /// # Errors
    /// When the server cannot start or bind.
    pub async fn start_at_both(
        database_url: &str,
        instance_id: &str,
        addr: std::net::SocketAddr,
        control_addr: std::net::SocketAddr,
    ) -> Result<Self> {
        Self::start_listening(
            database_url,
            instance_id,
            (addr, control_addr),
            &LedgerTuning::default(),
        )
        .await
    }

    async fn start_listening(
        database_url: &str,
        instance_id: &str,
        (addr, control_addr): (std::net::SocketAddr, std::net::SocketAddr),
        tuning: &LedgerTuning,
    ) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let control_listener = tokio::net::TcpListener::bind(control_addr).await?;
        let mut registry = prometheus_client::registry::Registry::default();
        migrate(database_url).await?;
        let ledger = spendguard_ledger::start(
            &crate::postgres::runtime_url(database_url),
            instance_id,
            tuning,
            crate::signing::test_signing(instance_id),
            listener,
            control_listener,
            &mut registry,
        )
        .await?;
        // Tests set up tenants, budgets and pricing as the operator does: on the control
        // listener. Sidecars under test use `ledger.addr`, the data path.
        let client = connect(ledger.control_addr).await?;
        Ok(Self {
            database_url: database_url.to_owned(),
            owner: sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect_lazy(database_url)?,
            ledger: Some(ledger),
            client,
            registry,
        })
    }

    /// The store of the running ledger.
    ///
    /// # Panics
    /// After [`TestLedger::stop`].
    pub fn store(&self) -> &Store {
        &self.ledger.as_ref().expect("ledger running").store
    }

    /// A cursor on the running writer's producer claim, as the database holds it: for tests that
    /// drive the store directly beside the writer (which must then stay idle).
    ///
    /// # Errors
    /// Database failures.
    ///
    /// # Panics
    /// After [`TestLedger::stop`].
    pub async fn producer_cursor(&self) -> Result<ProducerCursor> {
        let store = self.store();
        let (producer_instance_id, claim_token): (String, uuid::Uuid) =
            sqlx::query_as("SELECT producer_instance_id, claim_token FROM audit_producers")
                .fetch_one(store.pool())
                .await?;
        let claim = ProducerClaim {
            producer_instance_id,
            claim_token,
        };
        Ok(store.producer_cursor(&claim).await?)
    }

    /// Runs one batch of `commands` on the ledger's store beside another replica's session that
    /// holds the row `held` of `table` (keyed by its column `key`). Once the batch waits for that
    /// row, the session asks for `wanted` as well, then commits. Had the batch taken `wanted`
    /// before it waited for `held`, the two would deadlock: the session gets `wanted` only if
    /// the batch did not, which is how a test shows a batch's lock order. Returns the batch's
    /// outcomes.
    ///
    /// # Panics
    /// When the session cannot lock `held` or `wanted` (the deadlock, or its lock timeout), or
    /// the batch fails as a whole.
    pub async fn batch_beside_another_replica(
        &self,
        (table, key): (&str, &str),
        (held, wanted): (uuid::Uuid, uuid::Uuid),
        commands: Vec<Command>,
    ) -> Vec<std::result::Result<Outcome, LedgerError>> {
        let store = self.store().clone();
        let mut cursor = self.producer_cursor().await.expect("the producer's cursor");
        let mut other = OtherReplica::begin(&self.owner).await;
        other
            .lock(table, key, held)
            .await
            .expect("the session holds the first row");
        let batch = tokio::spawn(async move { store.run_batch(&mut cursor, &commands).await });
        await_ledger_lock_waits(&self.owner, 1).await;
        other
            .lock(table, key, wanted)
            .await
            .expect("the second row is free: the waiting batch holds none of it");
        other.commit().await;
        batch
            .await
            .expect("the batch's task")
            .expect("the batch ran")
            .outcomes
    }

    /// The ledger's metrics in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// The writer's `spendguard_ledger_batches_total{path}` counter (0 before the first batch of
    /// that path).
    ///
    /// # Panics
    /// On a counter that is not a number.
    pub fn batches(&self, path: &str) -> u64 {
        self.counter(&format!(
            "spendguard_ledger_batches_total{{path=\"{path}\"}} "
        ))
    }

    /// The writer's `spendguard_ledger_commands_total{urgency}` counter: `now` or `deferrable`.
    ///
    /// # Panics
    /// On a counter that is not a number.
    pub fn commands(&self, urgency: &str) -> u64 {
        self.counter(&format!(
            "spendguard_ledger_commands_total{{urgency=\"{urgency}\"}} "
        ))
    }

    /// The counter whose sample line starts with `needle` (name, labels, space); 0 before it
    /// exists.
    fn counter(&self, needle: &str) -> u64 {
        self.metrics_text()
            .lines()
            .find_map(|line| line.strip_prefix(needle))
            .map_or(0, |v| v.trim().parse().expect("a counter"))
    }

    /// Graceful shutdown.
    pub async fn stop(&mut self) {
        if let Some(ledger) = self.ledger.take() {
            ledger.shutdown().await;
        }
    }

    /// See [`tenant_with_lease`].
    ///
    /// # Errors
    /// RPC failures.
    pub async fn tenant_with_lease(&mut self, tenant_id: &str) -> Result<pb::FencingToken> {
        tenant_with_lease(&mut self.client, tenant_id).await
    }

    /// The current-window balance of one budget.
    ///
    /// # Errors
    /// RPC failures (an unknown budget among them).
    pub async fn balance(&mut self, tenant_id: &str, budget_id: &str) -> Result<pb::BudgetBalance> {
        let response = self
            .client
            .get_balances(pb::GetBalancesRequest {
                tenant_id: tenant_id.into(),
                budget_ids: vec![budget_id.into()],
            })
            .await?
            .into_inner();
        response
            .balances
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no balance for {budget_id}"))
    }

    /// See [`budget`].
    ///
    /// # Errors
    /// RPC failures.
    pub async fn budget(&mut self, tenant_id: &str, budget_id: &str, limit: i64) -> Result<()> {
        budget(&mut self.client, tenant_id, budget_id, limit).await
    }
}

/// Creates tenant `tenant_id` (named after itself).
///
/// # Errors
/// RPC failures.
pub async fn tenant(client: &mut LedgerClient, tenant_id: &str) -> Result<()> {
    client
        .upsert_tenant(pb::UpsertTenantRequest {
            tenant_id: tenant_id.into(),
            display_name: tenant_id.into(),
        })
        .await?;
    Ok(())
}

/// Creates tenant `tenant_id` with [`test_pricing`] registered, a lease on scope `<tenant>-scope`
/// for `<tenant>-w`, and returns the fencing token.
///
/// # Errors
/// RPC failures.
pub async fn tenant_with_lease(
    client: &mut LedgerClient,
    tenant_id: &str,
) -> Result<pb::FencingToken> {
    tenant(client, tenant_id).await?;
    register_pricing(client, tenant_id, test_pricing()).await?;
    let scope_id = format!("{tenant_id}-scope");
    let lease = client
        .acquire_fencing_lease(pb::AcquireFencingLeaseRequest {
            scope_id: scope_id.clone(),
            tenant_id: tenant_id.into(),
            workload_instance_id: format!("{tenant_id}-w"),
            ttl_ms: 600_000,
            expected_epoch: 0,
            force: false,
            request_id: String::new(),
        })
        .await?
        .into_inner();
    Ok(pb::FencingToken {
        scope_id,
        epoch: lease.epoch,
    })
}

/// Another workload takes `fencing`'s scope of `tenant_id` over before its lease expires, as an
/// administrator's forced acquire does: the epoch rises by one, and `fencing` is stale from then
/// on. Returns the new holder's token.
///
/// # Errors
/// RPC failures, or an epoch that did not rise by exactly one.
pub async fn force_takeover(
    client: &mut LedgerClient,
    tenant_id: &str,
    fencing: &pb::FencingToken,
) -> Result<pb::FencingToken> {
    let lease = client
        .acquire_fencing_lease(pb::AcquireFencingLeaseRequest {
            scope_id: fencing.scope_id.clone(),
            tenant_id: tenant_id.into(),
            workload_instance_id: "another-workload".into(),
            ttl_ms: 600_000,
            expected_epoch: 0,
            force: true,
            request_id: String::new(),
        })
        .await?
        .into_inner();
    anyhow::ensure!(
        lease.epoch == fencing.epoch + 1,
        "a takeover of epoch {} gave epoch {}",
        fencing.epoch,
        lease.epoch
    );
    Ok(pb::FencingToken {
        scope_id: fencing.scope_id.clone(),
        epoch: lease.epoch,
    })
}

/// Creates a lifetime budget.
///
/// # Errors
/// RPC failures.
pub async fn budget(
    client: &mut LedgerClient,
    tenant_id: &str,
    budget_id: &str,
    limit: i64,
) -> Result<()> {
    client
        .upsert_budget(pb::UpsertBudgetRequest {
            tenant_id: tenant_id.into(),
            budget_id: budget_id.into(),
            limit_nano_usd: limit,
            soft_cap_nano_usd: 0,
            window: pb::BudgetWindow::Lifetime.into(),
        })
        .await?;
    Ok(())
}

/// A minimal HTTP/1.1 GET against a loopback port: status code and body (admin endpoints).
///
/// # Errors
/// When the connection fails.
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The audit outbox's events of `event_type`, parsed from their canonical bytes, in producer
/// sequence order.
///
/// # Errors
/// Database failures, or bytes that are not JSON.
pub async fn outbox_events(
    pool: &sqlx::PgPool,
    event_type: &str,
) -> Result<Vec<serde_json::Value>> {
    let rows: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT canonical_event FROM audit_outbox WHERE event_type = $1
          ORDER BY producer_instance_id, producer_sequence",
    )
    .bind(event_type)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|bytes| Ok(serde_json::from_slice(bytes)?))
        .collect()
}

/// Connects a client to `addr`.
///
/// # Errors
/// When the connection fails.
pub async fn connect(addr: std::net::SocketAddr) -> Result<LedgerClient> {
    Ok(pb::ledger_client::LedgerClient::connect(format!("http://{addr}")).await?)
}

/// The pricing snapshot [`reserve_request`] names; [`tenant_with_lease`] registers it.
pub fn test_pricing() -> pb::PricingRef {
    pb::PricingRef {
        version: "test-v1".into(),
        sha256_hex: "ab".repeat(32),
    }
}

/// Registers `pricing` for `tenant_id` (what the operator does for each ContractBundle).
///
/// # Errors
/// RPC failures.
pub async fn register_pricing(
    client: &mut LedgerClient,
    tenant_id: &str,
    pricing: pb::PricingRef,
) -> Result<()> {
    client
        .register_pricing(pb::RegisterPricingRequest {
            tenant_id: tenant_id.into(),
            pricing: Some(pricing),
        })
        .await?;
    Ok(())
}

/// A valid ReserveSet request for tests and benchmarks.
pub fn reserve_request(
    tenant_id: &str,
    key: &str,
    budget_ids: &[&str],
    amount: i64,
    fencing: &pb::FencingToken,
) -> pb::ReserveSetRequest {
    pb::ReserveSetRequest {
        tenant_id: tenant_id.into(),
        idempotency_key: key.into(),
        budget_ids: budget_ids.iter().map(|b| (*b).to_owned()).collect(),
        amount_nano_usd: amount,
        fencing: Some(fencing.clone()),
        ttl_ms: 60_000,
        pricing: Some(test_pricing()),
        context: Some(pb::DecisionContext {
            run_id: "run-1".into(),
            model: "gpt-test".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}
