//! Crash drills for what the sidecar keeps in its spool across a kill -9 of the `spendguard
//! sidecar` process: fail-open evidence (S22; calls let through while the ledger is down are
//! recorded exactly once by the next process on the same spool once the ledger is back), credits
//! and their draw journal, and STOP evidence. Also the other way round: the `spendguard ledger`
//! process killed under a sidecar's calls.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use serde_json::json;
use spendguard_sidecar::pending_commits::{PendingCommit, PendingCommits};
use spendguard_testkit::free_port;
use spendguard_testkit::ledger::{TestLedger, http_get};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Child;

mod support;
use support::*;

const TENANT: &str = "tenant-spool";

struct Sidecar {
    child: Child,
    port: u16,
    admin: u16,
}

async fn spawn_sidecar(
    ledger: std::net::SocketAddr,
    bundle: &Path,
    spool: &Path,
    mock: u16,
) -> Sidecar {
    let (child, port, admin) = spawn_ready(|port, admin| {
        sidecar_command(ledger, bundle, spool, mock, ("agent-crash", port, admin))
    })
    .await;
    Sidecar { child, port, admin }
}

/// A sidecar of workload `workload` admitting calls inside credits of 0.005 USD that live
/// `credit_ttl_ms`, ready.
async fn spawn_credits_sidecar(
    (ledger, bundle, spool, mock): (std::net::SocketAddr, &Path, &Path, u16),
    workload: &str,
    credit_ttl_ms: u32,
) -> Sidecar {
    let (child, port, admin) = spawn_ready(|port, admin| {
        let mut command = sidecar_command(ledger, bundle, spool, mock, (workload, port, admin));
        command
            .env("SPENDGUARD_CREDIT_NANO_USD", "5000000")
            .env("SPENDGUARD_CREDIT_AHEAD_MS", "0")
            // The drills keep their credit however long a step takes.
            .env("SPENDGUARD_CREDIT_QUIET_MS", "3600000")
            .env("SPENDGUARD_CREDIT_TTL_MS", credit_ttl_ms.to_string())
            .env(
                "SPENDGUARD_RESERVATION_TTL_MS",
                (credit_ttl_ms + 1_000).to_string(),
            );
        command
    })
    .await;
    Sidecar { child, port, admin }
}

/// Waits up to 5 s for `done`, else fails with `what`.
async fn eventually<F: Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    for _ in 0..200 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting until {what}");
}

/// A streamed chat call whose upstream pauses 60 s between chunks: returns once its headers
/// are back, with the connection (and the call) still open.
async fn open_stream(port: u16) -> (tokio::net::TcpStream, u16) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(chat_request(true, "x-mock-chunk-delay-ms: 60000\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = vec![0; 1024];
    let n = stream.read(&mut head).await.unwrap();
    let status = status_of(&String::from_utf8_lossy(&head[..n]));
    (stream, status)
}

/// Commits the sidecar has made, from its metrics.
async fn commits(admin: u16) -> u64 {
    settlements_counted(admin, "commit").await
}

/// How many calls the mock provider received: each was forwarded, so its decision's answer had
/// reached the sidecar (a reservation in the database alone does not say so).
async fn forwarded(mock: u16) -> usize {
    let (_, requests) = http_get(mock, "/_mock/requests").await.unwrap();
    serde_json::from_str::<Vec<serde_json::Value>>(&requests).map_or(0, |r| r.len())
}

/// Settlements the sidecar has made with `outcome`, from its metrics.
async fn settlements_counted(admin: u16, outcome: &str) -> u64 {
    let (_, metrics) = http_get(admin, "/metrics").await.unwrap();
    let series = format!("spendguard_sidecar_settlements_total{{outcome=\"{outcome}\"}}");
    metrics
        .lines()
        .find(|l| l.starts_with(&series))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Each recorded call: its id, its `decision.fail_open` event count and the cost it recorded.
async fn fail_open_events(pool: &sqlx::PgPool) -> Vec<(String, i64, i64)> {
    sqlx::query_as(
        "SELECT e #>> '{data,call_id}', count(*), max((e #>> '{data,actual_nano_usd}')::bigint)
           FROM (SELECT convert_from(canonical_event, 'UTF8')::jsonb AS e FROM audit_outbox
                  WHERE event_type = 'decision.fail_open') x
          GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn kill_dash_nine_during_an_outage_keeps_fail_open_evidence() {
    let (mut ledger, bundle, mock_port) = data_path(
        TENANT,
        json!({"version": "crash", "max_output_tokens": 64, "fail_policy": "open"}),
    )
    .await;
    let addr = ledger.ledger.as_ref().unwrap().addr;
    let database_url = ledger.database_url.clone();
    let spool = tempfile::tempdir().unwrap();

    let mut first = spawn_sidecar(addr, bundle.path(), spool.path(), mock_port).await;
    // A second sidecar given the same spool directory (and, as a second container of the pod
    // would be, the same workload id) refuses to start: it would replay and rewrite the first
    // one's records. It refuses before it acquires the lease, which would fence the first.
    let epoch = || {
        let pool = ledger.store().pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT epoch FROM fencing_scopes WHERE owner_workload_id = 'agent-crash'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let epoch_before = epoch().await;
    let stderr = refused_startup(sidecar_command(
        addr,
        bundle.path(),
        spool.path(),
        mock_port,
        ("agent-crash", free_port(), free_port()),
    ))
    .await;
    assert!(stderr.contains("FAIL_OPEN_SPOOL_IN_USE"), "{stderr}");
    assert_eq!(
        epoch().await,
        epoch_before,
        "the first sidecar's lease is untouched"
    );
    ledger.stop().await;
    for _ in 0..3 {
        assert_eq!(
            chat(first.port).await,
            200,
            "fail-open lets the call through"
        );
    }
    // Their settlements are in the spool once the sidecar counts them.
    for _ in 0..200 {
        if commits(first.admin).await == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(commits(first.admin).await, 3);
    // A fourth call is still streaming when the process dies: it never settles.
    let (_open, status) = open_stream(first.port).await;
    assert_eq!(status, 200);
    first.child.kill().await.unwrap(); // SIGKILL: nothing is drained or flushed on the way out.

    let mut ledger = TestLedger::start_at(&database_url, "ledger-0", addr)
        .await
        .unwrap();
    let pool = ledger.store().pool().clone();
    assert!(
        fail_open_events(&pool).await.is_empty(),
        "nothing recorded yet"
    );
    let _second = spawn_sidecar(addr, bundle.path(), spool.path(), mock_port).await;
    let mut events = Vec::new();
    for _ in 0..200 {
        events = fail_open_events(&pool).await;
        if events.len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        events.len(),
        4,
        "every call the dead process let through is recorded"
    );
    assert!(
        events.iter().all(|(_, n, _)| *n == 1),
        "each exactly once: {events:?}"
    );
    // Settled calls at their reported usage (9 input + 16 output tokens); the one cut by the
    // kill at its worst case, which covers at least the 64 output tokens of the contract's cap.
    let mut costs: Vec<i64> = events.iter().map(|(_, _, cost)| *cost).collect();
    costs.sort_unstable();
    assert_eq!(costs[..3], [10_950; 3], "{events:?}");
    assert!(costs[3] >= 64 * 600, "worst case: {events:?}");
    let recorded: i64 = costs.iter().sum();
    let balance = ledger.balance(TENANT, BUDGET).await.unwrap();
    assert_eq!(balance.overrun_nano_usd, recorded);
    spendguard_testkit::invariants::check(&pool).await.unwrap();
    ledger.stop().await;
}

/// Reservations of the ledger by kind and state: (credits open, draws open, draws settled).
async fn credit_rows(pool: &sqlx::PgPool) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE is_credit AND state = 'reserved'),
                count(*) FILTER (WHERE drawn_from_reservation_id IS NOT NULL AND state = 'reserved'),
                count(*) FILTER (WHERE drawn_from_reservation_id IS NOT NULL AND state = 'committed')
           FROM reservations",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The id of the one open credit.
async fn open_credit_id(pool: &sqlx::PgPool) -> String {
    sqlx::query_scalar(
        "SELECT reservation_id::text FROM reservations WHERE is_credit AND state = 'reserved'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The state of reservation `id`.
async fn reservation_state(pool: &sqlx::PgPool, id: &str) -> String {
    sqlx::query_scalar("SELECT state FROM reservations WHERE reservation_id = $1::uuid")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Crash drill for credits (docs/design/credits.md): a sidecar admitting calls inside a credit is
/// killed with calls in flight. Nothing is overspent; the restarted sidecar of the pod releases
/// the credit its predecessor left and opens its own; the unsettled draws lapse at their TTL and
/// give their money back.
#[tokio::test]
async fn kill_dash_nine_with_calls_inside_a_credit_leaves_nothing_held() {
    const CREDITS_TENANT: &str = "tenant-credits";
    let (mut ledger, bundle, mock_port) = data_path(
        CREDITS_TENANT,
        json!({"version": "crash", "max_output_tokens": 64}),
    )
    .await;
    let addr = ledger.ledger.as_ref().unwrap().addr;
    let pool = ledger.store().pool().clone();
    let spool = tempfile::tempdir().unwrap();
    let stack = (addr, bundle.path(), spool.path(), mock_port);
    let Sidecar {
        child: mut first,
        port,
        admin,
    } = spawn_credits_sidecar(stack, "agent-credits", 8_000).await;
    // The first call opens the credit; the next ones are admitted inside it.
    for _ in 0..4 {
        assert_eq!(chat(port).await, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("the four calls are settled", || async {
        commits(admin).await == 4
    })
    .await;
    // Two calls still streaming when the process dies; their draws land first.
    let (_a, status_a) = open_stream(port).await;
    let (_b, status_b) = open_stream(port).await;
    assert_eq!((status_a, status_b), (200, 200));
    eventually("the streaming calls' draws landed", || async {
        credit_rows(&pool).await.1 == 2
    })
    .await;
    let (credits, open_draws, settled_draws) = credit_rows(&pool).await;
    assert_eq!(credits, 1);
    assert_eq!(open_draws, 2, "the streaming calls' draws landed");
    assert!(settled_draws >= 2, "calls were admitted inside the credit");
    let old_credit = open_credit_id(&pool).await;
    let open_draws: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(amount_nano_usd), 0)::bigint FROM reservations
          WHERE drawn_from_reservation_id IS NOT NULL AND state = 'reserved'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    first.kill().await.unwrap(); // SIGKILL: the credit is not released.
    let held = ledger.balance(CREDITS_TENANT, BUDGET).await.unwrap();
    assert!(
        held.reserved_nano_usd > open_draws,
        "the credit still holds money"
    );

    // The restarted sidecar of the pod (a new epoch, the same spool directory) releases the
    // credit its predecessor left at once, not at its TTL; the draws that landed keep theirs.
    let Sidecar {
        child: mut second,
        port,
        admin,
    } = spawn_credits_sidecar(stack, "agent-credits", 8_000).await;
    eventually("the predecessor's credit is released", || async {
        reservation_state(&pool, &old_credit).await == "released"
    })
    .await;
    let balance = ledger.balance(CREDITS_TENANT, BUDGET).await.unwrap();
    assert_eq!(balance.reserved_nano_usd, open_draws);

    // It opens a credit of its own and goes on.
    for _ in 0..3 {
        assert_eq!(chat(port).await, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("the three calls are settled", || async {
        commits(admin).await == 3
    })
    .await;
    assert_eq!(credit_rows(&pool).await.0, 1);
    second.kill().await.unwrap();

    // Past the credits' and the draws' TTLs the sweep returns everything they held.
    tokio::time::sleep(Duration::from_millis(9_500)).await;
    ledger
        .client
        .sweep_expired(spendguard_proto::ledger::v1::SweepExpiredRequest {
            max_reservations: 100,
        })
        .await
        .unwrap();
    let balance = ledger.balance(CREDITS_TENANT, BUDGET).await.unwrap();
    assert_eq!(balance.reserved_nano_usd, 0);
    assert_eq!(balance.committed_nano_usd, 7 * 10_950);
    assert_eq!(credit_rows(&pool).await.0, 0);
    spendguard_testkit::invariants::check(&pool).await.unwrap();
    ledger.stop().await;
}

/// The draws taken from credit `credit`: (how many, how many still open).
async fn draws_of(pool: &sqlx::PgPool, credit: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE state = 'reserved')
           FROM reservations WHERE drawn_from_reservation_id = $1::uuid",
    )
    .bind(credit)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until `pending-commits.journal` in `spool` holds at least `puts` put frames (those of
/// entries settled since included).
async fn commits_spooled(spool: &Path, puts: usize) {
    let journal = spool.join("pending-commits.journal");
    eventually("the commits spooled", || {
        let journal = journal.clone();
        async move {
            let bytes = std::fs::read(&journal).unwrap_or_default();
            String::from_utf8_lossy(&bytes)
                .matches("reservation_id")
                .count()
                >= puts
        }
    })
    .await;
}

/// The start of the draw-journal drills: a ledger with `tenant`'s data path, and a credits
/// sidecar of `workload` (credits living `credit_ttl_ms`) on a spool, whose first call opened a
/// credit.
struct CreditDrill {
    ledger: TestLedger,
    addr: std::net::SocketAddr,
    database_url: String,
    pool: sqlx::PgPool,
    bundle: tempfile::TempDir,
    spool: tempfile::TempDir,
    mock_port: u16,
    workload: &'static str,
    credit_ttl_ms: u32,
    first: Sidecar,
}

impl CreditDrill {
    async fn start(tenant: &str, workload: &'static str, credit_ttl_ms: u32) -> Self {
        // Fail-open: only such a contract admits calls inside a credit while the ledger is away
        // (the default refuses what the ledger cannot confirm).
        let contract = json!({"version": "crash", "max_output_tokens": 64, "fail_policy": "open"});
        let (ledger, bundle, mock_port) = data_path(tenant, contract).await;
        let addr = ledger.ledger.as_ref().unwrap().addr;
        let spool = tempfile::tempdir().unwrap();
        let first = spawn_credits_sidecar(
            (addr, bundle.path(), spool.path(), mock_port),
            workload,
            credit_ttl_ms,
        )
        .await;
        let drill = Self {
            database_url: ledger.database_url.clone(),
            pool: ledger.store().pool().clone(),
            ledger,
            addr,
            bundle,
            spool,
            mock_port,
            workload,
            credit_ttl_ms,
            first,
        };
        assert_eq!(chat(drill.first.port).await, 200);
        eventually("the credit is open", || async {
            credit_rows(&drill.pool).await.0 == 1
        })
        .await;
        drill
    }

    /// The ledger stops; `calls` more calls are admitted inside the credit and answered, their
    /// commits spooled while their draws wait (`drawn_before`: the calls drawn before, whose
    /// entries may be in the journal too); then the sidecar is killed with SIGKILL.
    async fn calls_during_an_outage_then_kill(&mut self, calls: usize, drawn_before: i64) {
        self.ledger.stop().await;
        for _ in 0..calls {
            assert_eq!(
                chat(self.first.port).await,
                200,
                "admitted inside the credit"
            );
        }
        commits_spooled(
            self.spool.path(),
            calls + usize::try_from(drawn_before).unwrap(),
        )
        .await;
        self.first.child.kill().await.unwrap();
    }

    /// The ledger again, on the same database and address.
    async fn restart_ledger(&self) -> TestLedger {
        TestLedger::start_at(&self.database_url, "ledger-0", self.addr)
            .await
            .unwrap()
    }

    /// The pod's next sidecar, on the same spool.
    async fn spawn_sidecar(&self) -> Sidecar {
        let stack = (
            self.addr,
            self.bundle.path(),
            self.spool.path(),
            self.mock_port,
        );
        spawn_credits_sidecar(stack, self.workload, self.credit_ttl_ms).await
    }
}

/// Crash drill for the draw journal (docs/design/credits.md): calls admitted inside a credit
/// while the ledger is away, whose draws cannot land, survive a kill -9 of the sidecar. Its
/// successor in the pod draws them from the credit that admitted them before releasing it, so
/// each keeps its reservation and its evidence, and none becomes a fail-open record; then it
/// commits their usage, which the killed process had spooled while their draws were pending.
#[tokio::test]
async fn kill_dash_nine_before_draws_land_keeps_the_calls_reservations_and_commits() {
    const JOURNAL_TENANT: &str = "tenant-journal";
    let mut drill = CreditDrill::start(JOURNAL_TENANT, "agent-journal", 30_000).await;
    let pool = drill.pool.clone();
    // Wait until what the first call drew has landed.
    eventually("the first call is settled", || async {
        commits(drill.first.admin).await == 1
    })
    .await;
    let credit = open_credit_id(&pool).await;
    let (drawn_before, _) = draws_of(&pool, &credit).await;
    let committed_before = drill
        .ledger
        .balance(JOURNAL_TENANT, BUDGET)
        .await
        .unwrap()
        .committed_nano_usd;

    drill
        .calls_during_an_outage_then_kill(3, drawn_before)
        .await;
    let mut ledger = drill.restart_ledger().await;
    assert_eq!(draws_of(&pool, &credit).await.0, drawn_before);
    let _second = drill.spawn_sidecar().await;
    eventually("the predecessor's credit is released", || async {
        reservation_state(&pool, &credit).await == "released"
    })
    .await;
    assert_eq!(
        draws_of(&pool, &credit).await.0,
        drawn_before + 3,
        "the three calls were drawn from their credit before its release"
    );
    eventually("the three draws committed", || async {
        draws_of(&pool, &credit).await.1 == 0
    })
    .await;
    let evidence: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_outbox
          WHERE event_type = 'reservation.reserved'
            AND convert_from(canonical_event, 'UTF8')::jsonb #>> '{data,drawn_from_reservation_id}' = $1",
    )
    .bind(&credit)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(evidence, drawn_before + 3, "each draw has its event");
    assert!(
        fail_open_events(&pool).await.is_empty(),
        "none was recorded as a fail-open call"
    );
    // Each of the three committed once, at the usage the mock reported (10,950 nano-USD), and
    // nothing is held any more: what the credit held beyond its draws went back with its release.
    let commits: Vec<i64> = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM ledger_entries e
                  WHERE e.reservation_id = r.reservation_id AND e.kind = 'commit')
           FROM reservations r WHERE r.drawn_from_reservation_id IS NOT NULL",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(commits, vec![1; usize::try_from(drawn_before + 3).unwrap()]);
    let balance = ledger.balance(JOURNAL_TENANT, BUDGET).await.unwrap();
    assert_eq!(balance.reserved_nano_usd, 0);
    assert_eq!(balance.committed_nano_usd, committed_before + 3 * 10_950);
    spendguard_testkit::invariants::check(&pool).await.unwrap();
    ledger.stop().await;
}

/// As the drill above, but the credit lapses during the outage, so the restarted sidecar's
/// redraws are refused for good: each answered call is then recorded as a fail-open call at the
/// usage its commit carried (spooled while its draw was pending), not at its worst case.
#[tokio::test]
async fn kill_dash_nine_before_draws_land_records_lost_draws_at_their_usage() {
    let mut drill = CreditDrill::start("tenant-lapse", "agent-lapse", 8_000).await;
    let opened = std::time::Instant::now();
    let pool = drill.pool.clone();
    let credit = open_credit_id(&pool).await;
    let (drawn_before, _) = draws_of(&pool, &credit).await;
    drill
        .calls_during_an_outage_then_kill(2, drawn_before)
        .await;
    // The credit (8 s) has lapsed on the ledger's clock by the time it is back.
    tokio::time::sleep(Duration::from_millis(9_000).saturating_sub(opened.elapsed())).await;
    let _ledger = drill.restart_ledger().await;
    let second = drill.spawn_sidecar().await;
    // Settled records are sent at once; unsettled ones only at the settle deadline (9 s), at
    // their worst case.
    eventually("the 2 calls recorded as fail-open calls", || async {
        fail_open_events(&pool).await.len() == 2
    })
    .await;
    let costs: Vec<i64> = fail_open_events(&pool)
        .await
        .into_iter()
        .map(|(_, count, cost)| {
            assert_eq!(count, 1);
            cost
        })
        .collect();
    assert_eq!(costs, vec![10_950; 2], "at the usage the mock reported");
    assert_eq!(
        settlements_counted(second.admin, "fail_open").await,
        2,
        "the kept commits settled the fail-open records, and are counted as such"
    );
    assert_eq!(settlements_counted(second.admin, "commit").await, 0);
    assert_eq!(
        draws_of(&pool, &credit).await.0,
        drawn_before,
        "neither draw landed"
    );
}

/// The STOP events in the outbox: (record id, call id or "", how many STOPs each stands for).
async fn stop_events(pool: &sqlx::PgPool) -> Vec<(String, String, i64)> {
    sqlx::query_as(
        "SELECT e #>> '{data,record_id}', coalesce(e #>> '{data,call_id}', ''),
                (e #>> '{data,count}')::bigint
           FROM (SELECT convert_from(canonical_event, 'UTF8')::jsonb AS e FROM audit_outbox
                  WHERE event_type IN ('decision.stopped', 'decision.stops_unpublished')
                  ORDER BY producer_instance_id, producer_sequence) x",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Crash drill for STOP evidence (S22: each decision outcome is auditable or explicitly marked
/// as not published): STOPs answered while the ledger is away survive a kill -9 of the sidecar,
/// one by one or, past the queue's bound, as their reason's count. The next process on the
/// same spool, started on a changed bundle, publishes each of them once the ledger is back,
/// under the bundle it was decided under.
#[tokio::test]
async fn kill_dash_nine_keeps_the_stops_the_ledger_has_not_taken() {
    const STOPS_TENANT: &str = "tenant-stops";
    let (mut ledger, bundle, mock_port) = data_path(
        STOPS_TENANT,
        json!({"version": "crash", "max_output_tokens": 64, "deny_models": ["gpt-4o-mini"]}),
    )
    .await;
    let addr = ledger.ledger.as_ref().unwrap().addr;
    let database_url = ledger.database_url.clone();
    let pool = ledger.store().pool().clone();
    let spool = tempfile::tempdir().unwrap();
    let spawn = async |bundle: &Path| {
        let (child, port, admin) = spawn_ready(|port, admin| {
            let mut command = sidecar_command(
                addr,
                bundle,
                spool.path(),
                mock_port,
                ("agent-stops", port, admin),
            );
            command.env("SPENDGUARD_STOP_EVIDENCE_QUEUE_RECORDS", "2");
            command
        })
        .await;
        Sidecar { child, port, admin }
    };
    let mut first = spawn(bundle.path()).await;
    ledger.stop().await;
    for _ in 0..5 {
        assert_eq!(chat(first.port).await, 402, "the contract denies the model");
    }
    let decided_under = std::fs::read_to_string(bundle.path().join("bundle.sha256")).unwrap();
    first.child.kill().await.unwrap(); // SIGKILL: nothing is drained on the way out.

    let _ledger = TestLedger::start_at(&database_url, "ledger-0", addr)
        .await
        .unwrap();
    assert!(stop_events(&pool).await.is_empty(), "nothing published yet");
    // The pod's bundle changed meanwhile: the successor decides under another contract, and
    // publishes its predecessor's STOPs under the bundle they were decided under.
    let (changed, changed_sha) = write_bundle(
        STOPS_TENANT,
        json!({"version": "crash-2", "max_output_tokens": 64, "deny_models": ["gpt-4o-mini"]}),
    );
    assert_ne!(changed_sha, decided_under.trim());
    let _second = spawn(changed.path()).await;
    // Two (or, when failed sends were in flight, more) queued one by one; the rest counted.
    eventually("the five STOPs are published", || async {
        stop_events(&pool).await.iter().map(|e| e.2).sum::<i64>() >= 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // nothing more arrives
    let events = stop_events(&pool).await;
    assert_eq!(
        events.iter().map(|e| e.2).sum::<i64>(),
        5,
        "each STOP published once: {events:?}"
    );
    let calls: Vec<&str> = events
        .iter()
        .filter(|e| !e.1.is_empty())
        .map(|e| e.1.as_str())
        .collect();
    assert!(
        calls.len() >= 2,
        "at least the queue's bound one by one: {events:?}"
    );
    let distinct: std::collections::BTreeSet<&str> = calls.iter().copied().collect();
    assert_eq!(distinct.len(), calls.len(), "no call twice: {events:?}");
    let records: std::collections::BTreeSet<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(records.len(), events.len(), "no record twice: {events:?}");
    let bundles: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT convert_from(canonical_event, 'UTF8')::jsonb #>> '{data,contract_sha256_hex}'
           FROM audit_outbox WHERE event_type IN ('decision.stopped', 'decision.stops_unpublished')",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(bundles, [decided_under.trim()], "as they were decided");
    spendguard_testkit::invariants::check(&pool).await.unwrap();
}

/// Per reservation of the tenant's calls: (state, commit entries in its journal).
async fn settlements(pool: &sqlx::PgPool) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT r.state, (SELECT count(*) FROM ledger_entries e
                           WHERE e.reservation_id = r.reservation_id AND e.kind = 'commit')
           FROM reservations r WHERE r.tenant_id = $1 ORDER BY r.created_at",
    )
    .bind(TENANT)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// [`settlements`] once no reservation is held any more, or after 20 s.
async fn settlements_once_none_held(pool: &sqlx::PgPool) -> Vec<(String, i64)> {
    let mut settled = Vec::new();
    for _ in 0..200 {
        settled = settlements(pool).await;
        if settled.iter().all(|(state, _)| state != "reserved") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    settled
}

/// What the tenant's budget has committed.
async fn committed_nano_usd(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT committed_nano_usd FROM budget_windows WHERE tenant_id = $1 AND budget_id = $2",
    )
    .bind(TENANT)
    .bind(BUDGET)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn kill_dash_nine_of_the_ledger_fails_new_calls_closed_and_settles_each_call_once() {
    // Goal: issue 3's fault "the ledger killed mid-run makes new calls fail closed while
    // in-flight ones never commit twice", with the ledger as its own process killed by SIGKILL
    // (nothing drained). Method: 8 calls reserve; 3 of them answer upstream at once and settle,
    // 5 answer 3 s later; the ledger is killed in between, so a new call is 503, the 5 are
    // answered 200 during the outage and their settlements retry; the ledger restarts on the
    // same ports, and each call settles exactly once, at its usage.
    let mut ledger =
        LedgerProcess::start(TENANT, json!({"version": "crash", "max_output_tokens": 64})).await;
    let (pool, data_addr) = (ledger.pool.clone(), ledger.data_addr);
    let spool = tempfile::tempdir().unwrap();
    let mock = spawn_mock();
    let sidecar = spawn_sidecar(data_addr, ledger.bundle.path(), spool.path(), mock).await;

    let in_flight: Vec<_> = (0..8)
        .map(|n| {
            let latency = if n < 3 { 0 } else { 3_000 };
            let headers = format!("x-mock-latency-ms: {latency}\r\n");
            tokio::spawn(async move { chat_with(sidecar.port, &headers).await })
        })
        .collect();
    let in_state =
        |rows: &[(String, i64)], state: &str| rows.iter().filter(|(s, _)| s == state).count();
    eventually("8 calls forwarded and 3 settled", || {
        let pool = pool.clone();
        async move {
            let rows = settlements(&pool).await;
            forwarded(mock).await == 8 && rows.len() == 8 && in_state(&rows, "committed") == 3
        }
    })
    .await;
    ledger.child.kill().await.unwrap(); // SIGKILL
    assert_eq!(
        in_state(&settlements(&pool).await, "reserved"),
        5,
        "in flight when the ledger died"
    );
    let refused = chat_with(sidecar.port, "").await;
    assert_eq!(status_of(&refused), 503, "{refused}");
    assert!(refused.contains("DEPENDENCY_UNAVAILABLE"), "{refused}");
    for call in in_flight {
        let response = call.await.unwrap();
        assert_eq!(status_of(&response), 200, "{response}");
    }

    ledger.restart().await;
    // Settlements retry until the ledger answers: each call is committed once, at the usage
    // the mock reported (9 input + 16 output tokens of gpt-4o-mini: 10,950 nano-USD).
    let settled = settlements_once_none_held(&pool).await;
    assert_eq!(
        settled,
        vec![("committed".to_owned(), 1); 8],
        "8 reservations, none for the refused call, each committed once"
    );
    let committed = committed_nano_usd(&pool).await;
    assert_eq!(committed, 8 * 10_950);
    spendguard_testkit::invariants::check(&pool).await.unwrap();
    drop(sidecar);
}

#[tokio::test]
async fn kill_dash_nine_while_the_ledger_is_away_keeps_the_calls_commits() {
    // Goal: usage a sidecar could not commit because the ledger was away is not lost when that
    // sidecar dies: the next process on the pod's spool commits it once the ledger is back.
    // Method: 3 calls reserve and are answered 3 s later; the ledger is killed meanwhile, so
    // their commits fail and are spooled; the sidecar is killed with SIGKILL; the ledger and a
    // new sidecar on the same spool start, and each call is committed once, at its usage.
    // (Without the spool the three reservations stay held until their TTL, then expire.)
    let mut ledger =
        LedgerProcess::start(TENANT, json!({"version": "crash", "max_output_tokens": 64})).await;
    let (pool, data_addr) = (ledger.pool.clone(), ledger.data_addr);
    let spool = tempfile::tempdir().unwrap();
    let mock = spawn_mock();
    let mut first = spawn_sidecar(data_addr, ledger.bundle.path(), spool.path(), mock).await;

    let port = first.port;
    let in_flight: Vec<_> = (0..3)
        .map(|_| tokio::spawn(async move { chat_with(port, "x-mock-latency-ms: 3000\r\n").await }))
        .collect();
    // Forwarded to the provider: each decision's answer reached the sidecar (its reservation in
    // the database alone does not say so, and a ledger killed before answering fails the call).
    eventually(
        "3 calls forwarded",
        || async move { forwarded(mock).await == 3 },
    )
    .await;
    assert_eq!(settlements(&pool).await.len(), 3, "3 calls reserved");
    ledger.child.kill().await.unwrap(); // SIGKILL
    for call in in_flight {
        let response = call.await.unwrap();
        assert_eq!(status_of(&response), 200, "{response}");
    }
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT reservation_id::text FROM reservations WHERE tenant_id = $1 AND state = 'reserved'",
    )
    .bind(TENANT)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(ids.len(), 3);
    let journal = spool.path().join("pending-commits.journal");
    eventually("the 3 failed commits spooled", || {
        let (journal, ids) = (journal.clone(), ids.clone());
        async move {
            let bytes = std::fs::read(&journal).unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes);
            ids.iter().all(|id| text.contains(id.as_str()))
        }
    })
    .await;
    first.child.kill().await.unwrap(); // SIGKILL: nothing drained.

    ledger.restart().await;
    let second = spawn_sidecar(data_addr, ledger.bundle.path(), spool.path(), mock).await;
    let settled = settlements_once_none_held(&pool).await;
    assert_eq!(
        settled,
        vec![("committed".to_owned(), 1); 3],
        "each call committed once, by the process that never saw it"
    );
    // At the usage the mock reported (9 input + 16 output tokens of gpt-4o-mini).
    let committed = committed_nano_usd(&pool).await;
    assert_eq!(committed, 3 * 10_950);
    eventually("the new process counts the 3 commits", || async {
        commits(second.admin).await == 3
    })
    .await;
    spendguard_testkit::invariants::check(&pool).await.unwrap();
}

#[tokio::test]
async fn a_commit_sent_again_after_it_landed_replays_and_a_landed_commit_spools_nothing() {
    // Goal: two claims of docs/design/sidecar-data-path.md ("Commits survive the sidecar"). A
    // commit that lands at once writes nothing to the spool. A commit whose done frame was lost
    // (a kill between the ledger's answer and the frame) is sent again by the pod's next process
    // and replays: the call is committed once, and the entry is marked done. Method: one call
    // committed; the sidecar killed; the spool then holds that commit as pending, written through
    // the sidecar's own journal type; a new sidecar on the spool resends it.
    let ledger =
        LedgerProcess::start(TENANT, json!({"version": "crash", "max_output_tokens": 64})).await;
    let (pool, data_addr) = (ledger.pool.clone(), ledger.data_addr);
    let spool = tempfile::tempdir().unwrap();
    let mock = spawn_mock();
    let mut first = spawn_sidecar(data_addr, ledger.bundle.path(), spool.path(), mock).await;
    let response = chat_with(first.port, "x-spendguard-call-id: crash-call-1\r\n").await;
    assert_eq!(status_of(&response), 200, "{response}");
    let committed_once = vec![("committed".to_owned(), 1)];
    eventually("the call committed", || {
        let (pool, committed_once) = (pool.clone(), committed_once.clone());
        async move { settlements(&pool).await == committed_once }
    })
    .await;
    first.child.kill().await.unwrap(); // SIGKILL
    let journal = spool.path().join("pending-commits.journal");
    let spooled = std::fs::metadata(&journal).map_or(0, |m| m.len());
    assert_eq!(spooled, 0, "a commit that landed at once writes nothing");

    let reservation_id: String =
        sqlx::query_scalar("SELECT reservation_id::text FROM reservations WHERE tenant_id = $1")
            .bind(TENANT)
            .fetch_one(&pool)
            .await
            .unwrap();
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let (pending, left) = PendingCommits::open(spool.path(), now_ms).unwrap();
    assert!(left.is_empty());
    pending.hold(&PendingCommit {
        call_id: "crash-call-1".into(),
        reservation_id,
        actual_nano_usd: 10_950,
        since_unix_ms: now_ms,
    });
    drop(pending);

    let mut second = spawn_sidecar(data_addr, ledger.bundle.path(), spool.path(), mock).await;
    eventually("the resent commit answered as landed", || async {
        commits(second.admin).await == 1
    })
    .await;
    second.child.kill().await.unwrap();
    assert_eq!(settlements(&pool).await, committed_once, "committed once");
    assert_eq!(committed_nano_usd(&pool).await, 10_950);
    let (_, left) = PendingCommits::open(spool.path(), now_ms).unwrap();
    assert!(left.is_empty(), "marked done: {left:?}");
    spendguard_testkit::invariants::check(&pool).await.unwrap();
}
