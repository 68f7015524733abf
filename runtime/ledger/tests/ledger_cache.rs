//! The writer's cache (src/cache.rs): hot batches skip the load, and any row changed behind the
//! writer's back — by a second replica, a lease takeover, a replayed key — fails the guard, so
//! the answer is the one the load path would give.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::ledger::{force_takeover, reserve_request};
use spendguard_testkit::{TestLedger, invariants};

const T: &str = "tenant-a";

async fn reserve(
    ledger: &mut TestLedger,
    key: &str,
    amount: i64,
    fencing: &pb::FencingToken,
) -> pb::reserve_set_response::Outcome {
    ledger
        .client
        .reserve_set(reserve_request(T, key, &["hot"], amount, fencing))
        .await
        .unwrap()
        .into_inner()
        .outcome
        .unwrap()
}

fn reserved_id(outcome: pb::reserve_set_response::Outcome) -> String {
    match outcome {
        pb::reserve_set_response::Outcome::Reserved(r) => r.reservation_id,
        other => panic!("expected a reservation, got {other:?}"),
    }
}

/// Reserves 10 on `hot` under `key` and commits 7 of it.
async fn reserve_and_commit(ledger: &mut TestLedger, key: &str, fencing: &pb::FencingToken) {
    let id = reserved_id(reserve(ledger, key, 10, fencing).await);
    ledger
        .client
        .commit(pb::CommitRequest {
            tenant_id: T.into(),
            reservation_id: id,
            actual_nano_usd: 7,
            fencing: Some(fencing.clone()),
            deferrable: false,
        })
        .await
        .unwrap();
}

/// The core command of [`reserve_request`] (store-level tests drive the writer's store directly).
fn reserve_command(
    key: &str,
    budget: &str,
    amount: i64,
    fencing: &pb::FencingToken,
) -> spendguard_core::plan::Command {
    reserve_set(&reserve_request(T, key, &[budget], amount, fencing))
}

/// The core command of a ReserveSet request.
fn reserve_set(request: &pb::ReserveSetRequest) -> spendguard_core::plan::Command {
    spendguard_core::plan::Command::ReserveSet(
        spendguard_ledger::convert::reserve_set(request).unwrap(),
    )
}

/// A writer after its first batch: a ledger with a `hot` budget of 1,000, and a cache that
/// holds as open the reservation a request made (run on the load path, then remembered).
struct CachedOpen {
    /// Keeps the ledger (and its database) up.
    _ledger: TestLedger,
    token: pb::FencingToken,
    store: spendguard_ledger::store::Store,
    cursor: spendguard_ledger::store::ProducerCursor,
    cache: spendguard_ledger::cache::HotCache,
    /// The open reservation's id.
    id: uuid::Uuid,
}

impl CachedOpen {
    async fn start(request: impl FnOnce(&pb::FencingToken) -> pb::ReserveSetRequest) -> Self {
        use spendguard_core::plan::Command;
        let mut ledger = TestLedger::start().await.unwrap();
        let token = ledger.tenant_with_lease(T).await.unwrap();
        ledger.budget(T, "hot", 1_000).await.unwrap();
        let store = ledger.store().clone();
        let mut cursor = ledger.producer_cursor().await.unwrap();
        let command = reserve_set(&request(&token));
        let Command::ReserveSet(ref set) = command else {
            unreachable!()
        };
        let id = set.reservation_id();
        let committed = store
            .run_batch(&mut cursor, std::slice::from_ref(&command))
            .await
            .unwrap();
        let mut cache = spendguard_ledger::cache::HotCache::default();
        remember(&mut cache, committed);
        Self {
            _ledger: ledger,
            token,
            store,
            cursor,
            cache,
            id,
        }
    }

    /// The lease's fencing, as a planned command carries it.
    fn fencing(&self) -> spendguard_core::plan::Fencing {
        spendguard_core::plan::Fencing {
            scope_id: self.token.scope_id.clone(),
            epoch: self.token.epoch,
        }
    }

    /// A release of the open reservation, as another replica would send it behind the cache.
    fn release(&self) -> spendguard_core::plan::Command {
        spendguard_core::plan::Command::Release(spendguard_core::plan::Release {
            tenant_id: T.into(),
            reservation_id: self.id,
            fencing: self.fencing(),
            reason: "behind the cache".into(),
        })
    }
}

/// One cached batch prepared, sent alone and awaited, as the writer does with nothing in flight.
async fn run_cached(
    store: &spendguard_ledger::store::Store,
    cursor: &mut spendguard_ledger::store::ProducerCursor,
    snapshot: spendguard_core::plan::Snapshot,
    expected: &spendguard_ledger::cache::Expected,
    commands: &[spendguard_core::plan::Command],
) -> Result<(), spendguard_ledger::error::Error> {
    let batch = store
        .prepare_cached(cursor, snapshot, expected, commands)
        .await?;
    store.send_cached(batch.statement).await?.await?;
    cursor.next_sequence = batch.next_sequence;
    Ok(())
}

/// Fills `cache` from a load-path batch, as the writer does.
fn remember(
    cache: &mut spendguard_ledger::cache::HotCache,
    committed: spendguard_ledger::store::Committed,
) {
    let (db_now, local_before) = committed.clock.unwrap();
    cache.observe_clock(db_now, local_before);
    cache.absorb(committed.state);
}

/// The `hot` budget's balance.
async fn balance(ledger: &mut TestLedger) -> pb::BudgetBalance {
    ledger.balance(T, "hot").await.unwrap()
}

/// Replica A reserves `a_amounts` on a `hot` budget of `limit` (so its cache holds the window),
/// then replica B, on the same database, reserves `b_amount` behind A's back.
async fn spent_behind_the_cache(
    limit: i64,
    a_amounts: &[i64],
    b_amount: i64,
) -> (TestLedger, TestLedger, pb::FencingToken) {
    let mut a = TestLedger::start().await.unwrap();
    let fencing = a.tenant_with_lease(T).await.unwrap();
    a.budget(T, "hot", limit).await.unwrap();
    for (i, amount) in a_amounts.iter().enumerate() {
        reserved_id(reserve(&mut a, &format!("a-{}", i + 1), *amount, &fencing).await);
    }
    let mut b = TestLedger::start_on(&a.database_url, "ledger-1")
        .await
        .unwrap();
    reserved_id(reserve(&mut b, "b-1", b_amount, &fencing).await);
    (a, b, fencing)
}

#[tokio::test]
async fn hot_reserves_and_commits_take_the_cached_path_and_stay_exact() {
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "hot", 1_000).await.unwrap();
    for i in 0..20 {
        reserve_and_commit(&mut ledger, &format!("k{i}"), &fencing).await;
    }
    // The first reserve loads the rows; every later command is planned on the cache.
    assert!(ledger.batches("cached") >= 35, "{}", ledger.metrics_text());
    assert_eq!(ledger.batches("cached_stale"), 0);
    let balance = balance(&mut ledger).await;
    assert_eq!(
        (balance.committed_nano_usd, balance.reserved_nano_usd),
        (140, 0)
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

/// A cached statement finds reservations by a probe of their primary key and reads no partial
/// index. The session keeps one generic plan per statement until a table's statistics change,
/// and a partial index's share of its table can grow many times over between two ANALYZEs (open
/// reservations come and go by the thousand): a plan that read one whole would make every
/// statement cost as much as there are calls in flight. Until 2026-11-27 (session 8) the guard
/// read `reservations_open_by_expiry` so: with 20,000 open a cached statement took ~4 ms instead
/// of ~0.4 ms. Checked on an empty database (the statistics under which that plan was chosen)
/// and again on analysed statistics of many settled reservations and a few open ones. (Other
/// tables may be read whole while they hold a row or two, which is the planner's right choice
/// then; as they grow, ANALYZE replans. The triggers' queries are not in these plans.)
#[tokio::test]
async fn the_cached_statements_probe_reservations_by_key_and_read_no_partial_index() {
    let mut ledger = TestLedger::start().await.unwrap();
    ledger.tenant_with_lease(T).await.unwrap();
    let partial = partial_indexes(&ledger).await;
    for statistics in ["empty", "analysed"] {
        if statistics == "analysed" {
            settled_and_open_reservations(&ledger, 20_000, 200).await;
        }
        let plans = spendguard_ledger::store::cached_path_plans(&ledger.database_url)
            .await
            .unwrap();
        assert_eq!(plans.len(), 4, "one plan per statement shape");
        for (shape, plan) in plans.iter().enumerate() {
            let mut reads = Vec::new();
            table_reads(&plan[0]["Plan"], &mut reads);
            let of_reservations: Vec<_> = reads
                .iter()
                .filter(|read| read.starts_with("reservations "))
                .collect();
            assert!(
                !of_reservations.is_empty(),
                "{statistics}, shape {shape}: no reservation read: {reads:?}"
            );
            for read in of_reservations {
                assert!(
                    read.ends_with("\"reservations_pkey\") with an index condition"),
                    "{statistics}, shape {shape}: {read}\n{plan:#}"
                );
            }
            for read in &reads {
                assert!(
                    !partial
                        .iter()
                        .any(|index| read.contains(&format!("\"{index}\""))),
                    "{statistics}, shape {shape}: {read} reads a partial index\n{plan:#}"
                );
            }
        }
    }
}

/// The same for everything else the ledger runs: the triggers' queries (inside the cached
/// path's session, on generic plans, and inside the load path's, on custom plans) and the load
/// path's statements. On a custom plan an empty array makes `x = ANY('{}')` false, and a false
/// condition lets the planner read any index whole, the partial one of every open reservation
/// included: the journal trigger's lookup did so for every window opening and limit, the load
/// path's resolutions for every batch without one. Every session of a database set to log
/// each plan (`auto_explain`, nested statements included) serves reserves, commits, a denial,
/// a credit and its draws, and a budget's upsert; no plan may read a partial index without an
/// index condition (but the gauge that counts open reservations, which means to), and every
/// trigger query finds reservations by primary key.
#[tokio::test]
async fn no_query_of_the_ledger_reads_a_partial_index_whole() {
    let cluster = spendguard_testkit::ledger::shared_cluster();
    let url = cluster.create_database().await.unwrap();
    let database = url.rsplit('/').next().unwrap().to_owned();
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    for setting in [
        "session_preload_libraries = 'auto_explain'",
        "auto_explain.log_min_duration = 0",
        "auto_explain.log_nested_statements = on",
        "auto_explain.log_format = json",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {database} SET {setting}"
        )))
        .execute(&admin)
        .await
        .unwrap();
    }
    admin.close().await;
    let mut ledger = TestLedger::start_on(&url, "ledger-0").await.unwrap();
    // Plans from here on: not the migrations' (run once, on an empty database).
    let logged_before = cluster.log().len();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "hot", 1_000).await.unwrap();
    for i in 0..6 {
        reserve_and_commit(&mut ledger, &format!("k{i}"), &fencing).await;
    }
    let credit = ledger
        .client
        .reserve_set(pb::ReserveSetRequest {
            credit: true,
            ..reserve_request(T, "credit", &["hot"], 500, &fencing)
        })
        .await
        .unwrap()
        .into_inner()
        .outcome
        .map(reserved_id)
        .unwrap();
    for i in 0..3 {
        ledger
            .client
            .reserve_set(pb::ReserveSetRequest {
                draw_from_reservation_id: credit.clone(),
                ..reserve_request(T, &format!("draw-{i}"), &["hot"], 10, &fencing)
            })
            .await
            .unwrap();
    }
    // Denied (the credit holds most of the budget), and a second budget opens its window.
    let denied = reserve(&mut ledger, "too-much", 900, &fencing).await;
    assert!(
        !matches!(denied, pb::reserve_set_response::Outcome::Reserved(_)),
        "{denied:?}"
    );
    ledger.budget(T, "other", 1_000).await.unwrap();
    assert!(ledger.batches("cached") > 0, "{}", ledger.metrics_text());

    let partial = partial_indexes(&ledger).await;
    let log = cluster.log();
    let plans = logged_plans(log.get(logged_before..).unwrap_or_default());
    let text =
        |plan: &serde_json::Value| plan["Query Text"].as_str().unwrap_or_default().to_owned();
    let triggers = plans
        .iter()
        .filter(|plan| text(plan).contains("inserted"))
        .count();
    assert!(
        triggers >= 3,
        "the statement triggers' queries were not logged: {} plans",
        plans.len()
    );
    // The load path ran with empty arrays, and its plans were read: its load statement for a
    // batch that names no reservation, and its write statement for one that resolves none,
    // each with the reservations part folded away.
    for statement in [
        "Locks and reads everything a batch decides on",
        "The reservations a batch creates",
    ] {
        assert!(
            plans.iter().any(|plan| text(plan).contains(statement)
                && serde_json::to_string(plan)
                    .unwrap()
                    .contains("\"One-Time Filter\":\"false\"")),
            "no plan of \"{statement}\" with an empty array folded away among {} plans",
            plans.len()
        );
    }
    for plan in &plans {
        if text(plan).contains("count(*) FROM reservations WHERE state = 'reserved'") {
            continue; // The open reservations gauge: it reads the partial index to count it.
        }
        let mut reads = Vec::new();
        table_reads(&plan["Plan"], &mut reads);
        for read in &reads {
            assert!(
                !(read.ends_with("without an index condition")
                    && partial
                        .iter()
                        .any(|index| read.contains(&format!("\"{index}\"")))),
                "{read}: a partial index read whole\n{plan:#}"
            );
            assert!(
                !text(plan).contains("inserted")
                    || !read.starts_with("reservations ")
                    || read.ends_with("\"reservations_pkey\") with an index condition"),
                "{read}\n{plan:#}"
            );
        }
    }
}

/// The partial indexes of the ledger's schema, by name.
async fn partial_indexes(ledger: &TestLedger) -> Vec<String> {
    let partial: Vec<String> = sqlx::query_scalar(
        "SELECT indexrelid::regclass::text FROM pg_index WHERE indpred IS NOT NULL",
    )
    .fetch_all(ledger.store().pool())
    .await
    .unwrap();
    assert!(
        partial.contains(&"reservations_open_by_expiry".to_owned()),
        "{partial:?}"
    );
    partial
}

/// The plans `auto_explain` logged (JSON) in the server `log` (of the shared cluster, where
/// only the database this test set up logs plans).
fn logged_plans(log: &str) -> Vec<serde_json::Value> {
    let mut plans = Vec::new();
    let mut entry: Option<String> = None;
    let flush = |entry: &mut Option<String>, plans: &mut Vec<serde_json::Value>| {
        if let Some(text) = entry.take()
            && let Ok(plan) = serde_json::from_str::<serde_json::Value>(&text)
        {
            plans.push(plan);
        }
    };
    for line in log.lines() {
        if line.starts_with('\t') || line.starts_with(' ') {
            if let Some(text) = entry.as_mut() {
                text.push_str(line.trim_start());
                text.push('\n');
            }
            continue;
        }
        flush(&mut entry, &mut plans);
        if line.contains("plan:") {
            entry = Some(String::new());
        }
    }
    flush(&mut entry, &mut plans);
    plans
}

/// Each read of a table or an index in `node` and below it, as
/// `table (node type, "index") with(out) an index condition` (a bitmap index scan names no
/// table: `- (Bitmap Index Scan, "index") ...`).
fn table_reads(node: &serde_json::Value, reads: &mut Vec<String>) {
    let kind = node["Node Type"].as_str().unwrap_or_default();
    let table = node["Relation Name"]
        .as_str()
        .or(node["Index Name"].as_str().map(|_| "-"));
    if let Some(table) = table
        && kind != "ModifyTable"
    {
        let condition = if node.get("Index Cond").is_some() {
            "with an index condition"
        } else {
            "without an index condition"
        };
        reads.push(format!(
            "{table} ({kind}, {}) {condition}",
            node["Index Name"]
        ));
    }
    for child in node["Plans"].as_array().into_iter().flatten() {
        table_reads(child, reads);
    }
}

/// Writes `settled` committed and `open` open reservations of tenant T directly, under its
/// fencing scope's current epoch (which the database requires), then analyses the database, so
/// plans are made on the statistics of a ledger in use.
async fn settled_and_open_reservations(ledger: &TestLedger, settled: i32, open: i32) {
    let seeded = sqlx::query(
        "INSERT INTO reservations (reservation_id, tenant_id, idempotency_key, request_sha256,
                budget_ids, window_starts, amount_nano_usd, fencing_scope_id, fencing_epoch,
                created_at, expires_at, state, resolved_at, resolved_epoch, actual_nano_usd,
                committed_nano_usd, released_nano_usd, overrun_nano_usd)
         SELECT gen_random_uuid(), $1, 'seed-' || n, 'seed', ARRAY['seed'],
                ARRAY['1970-01-01T00:00:00Z'::timestamptz], 10, f.scope_id, f.epoch, now(),
                now() + interval '1 hour',
                CASE WHEN n <= $3 THEN 'reserved' ELSE 'committed' END,
                CASE WHEN n <= $3 THEN NULL ELSE now() END,
                CASE WHEN n <= $3 THEN NULL ELSE f.epoch END,
                CASE WHEN n <= $3 THEN NULL ELSE 7 END,
                CASE WHEN n <= $3 THEN NULL ELSE 7 END,
                CASE WHEN n <= $3 THEN NULL ELSE 3 END,
                CASE WHEN n <= $3 THEN NULL ELSE 0 END
           FROM generate_series(1, $2 + $3) AS n,
                (SELECT scope_id, epoch FROM fencing_scopes WHERE tenant_id = $1
                  ORDER BY scope_id LIMIT 1) AS f",
    )
    .bind(T)
    .bind(settled)
    .bind(open)
    .execute(ledger.store().pool())
    .await
    .unwrap();
    assert_eq!(
        seeded.rows_affected(),
        u64::try_from(settled + open).unwrap(),
        "the tenant has a fencing scope to seed under"
    );
    sqlx::query("ANALYZE")
        .execute(ledger.store().pool())
        .await
        .unwrap();
}

/// The draws' UPDATE checks no state of its own (a condition on state would let the generic
/// plan read every open reservation): a credit settled behind the cache must be refused by the
/// guard's count of open reservations, which the final check reads before the draws, as stale
/// (SQLSTATE SG001), not by the resolve-once trigger's integrity error from an UPDATE of a
/// released credit. (A-B-A, as in `a_reservation_settled_behind_the_cache_…`: nothing else the
/// guard reads has changed.)
#[tokio::test]
async fn a_credit_released_behind_the_cache_is_refused_as_stale_before_it_is_drawn_from() {
    use spendguard_ledger::error::Error;

    let mut credit = CachedOpen::start(|token| pb::ReserveSetRequest {
        credit: true,
        ..reserve_request(T, "credit", &["hot"], 500, token)
    })
    .await;
    // Behind the cache: the credit is released and as much reserved again under another key,
    // so the window holds the remembered values and only the credit's state has changed.
    let behind = [
        credit.release(),
        reserve_command("other", "hot", 500, &credit.token),
    ];
    credit
        .store
        .run_batch(&mut credit.cursor, &behind)
        .await
        .unwrap();

    let draw = [reserve_set(&pb::ReserveSetRequest {
        draw_from_reservation_id: credit.id.to_string(),
        ..reserve_request(T, "call", &["hot"], 100, &credit.token)
    })];
    let (snapshot, expected) = credit
        .cache
        .snapshot_for(&draw)
        .expect("every row is cached");
    let result = run_cached(
        &credit.store,
        &mut credit.cursor,
        snapshot,
        &expected,
        &draw,
    )
    .await;
    assert!(matches!(result, Err(Error::Stale)), "{result:?}");
    invariants::check(credit.store.pool()).await.unwrap();
}

#[tokio::test]
async fn spend_by_another_replica_fails_the_guard_and_the_answer_is_exact() {
    // Replica A caches the budget with room for 59; replica B takes 50 of it. A's cache still
    // says 59 fit, so a reserve of 40 planned on it would be granted: the guard must refuse the
    // cached plan and the load path must deny.
    let (mut a, _b, fencing) = spent_behind_the_cache(100, &[40, 1], 50).await;
    match reserve(&mut a, "a-3", 40, &fencing).await {
        pb::reserve_set_response::Outcome::Denied(d) => assert_eq!(d.remaining_nano_usd, 9),
        other => panic!("A granted from a stale cache: {other:?}"),
    }
    // A reserve that fits is then cached again and exact.
    reserved_id(reserve(&mut a, "a-4", 9, &fencing).await);
    match reserve(&mut a, "a-5", 1, &fencing).await {
        pb::reserve_set_response::Outcome::Denied(d) => assert_eq!(d.remaining_nano_usd, 0),
        other => panic!("A granted past the limit: {other:?}"),
    }
    invariants::check(a.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_cached_plan_on_changed_rows_is_refused_and_run_again_on_locked_rows() {
    // B spends behind A's back; A's next reserve is planned on its cache, refused by the guard
    // (the window's money changed) and granted by the load path, exactly once.
    let (mut a, _b, fencing) = spent_behind_the_cache(100, &[10, 10], 5).await;
    // 75 fits A's cached view (80 left) and the truth (75 left): granted, exactly once, by the
    // load path after the guard saw the changed window.
    let stale_before = a.batches("cached_stale");
    reserved_id(reserve(&mut a, "a-3", 75, &fencing).await);
    assert_eq!(a.batches("cached_stale"), stale_before + 1);
    let balance = balance(&mut a).await;
    assert_eq!(balance.reserved_nano_usd, 100);
    invariants::check(a.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_lease_taken_over_through_another_replica_fences_the_cached_epoch() {
    // A caches the scope at epoch e. B hands the scope to a new workload (epoch e+1). A reserve
    // presented with epoch e to A must be refused as stale, although A's cache still says e.
    let (mut a, mut b, fencing) = a_cached_and_b().await;
    force_takeover(&mut b.client, T, &fencing).await.unwrap();
    a_reserve_is_refused(&mut a, &fencing, "FENCING_EPOCH_STALE").await;
    invariants::check(a.store().pool()).await.unwrap();
}

/// Upserts `hot` through `ledger` with `limit` and `window`.
async fn upsert_hot(ledger: &mut TestLedger, limit: i64, window: pb::BudgetWindow) {
    ledger
        .client
        .upsert_budget(pb::UpsertBudgetRequest {
            tenant_id: T.into(),
            budget_id: "hot".into(),
            limit_nano_usd: limit,
            soft_cap_nano_usd: 0,
            window: window.into(),
        })
        .await
        .unwrap();
}

/// Replica A, with a `hot` budget of 100 whose window and lease it has cached (two reserves
/// of 10 went through it), and replica B on the same database.
async fn a_cached_and_b() -> (TestLedger, TestLedger, pb::FencingToken) {
    let mut a = TestLedger::start().await.unwrap();
    let fencing = a.tenant_with_lease(T).await.unwrap();
    a.budget(T, "hot", 100).await.unwrap();
    for key in ["a-1", "a-2"] {
        reserved_id(reserve(&mut a, key, 10, &fencing).await);
    }
    let b = TestLedger::start_on(&a.database_url, "ledger-1")
        .await
        .unwrap();
    (a, b, fencing)
}

/// The `hot` window's limit as stored (GetBalances shows it under the budget's limit).
async fn stored_window_limit(ledger: &TestLedger) -> i64 {
    sqlx::query_scalar("SELECT limit_nano_usd FROM budget_windows WHERE budget_id = 'hot'")
        .fetch_one(ledger.store().pool())
        .await
        .unwrap()
}

/// A reserve of 1 through `a` under `fencing` is refused with `code`.
async fn a_reserve_is_refused(a: &mut TestLedger, fencing: &pb::FencingToken, code: &str) {
    let status = a
        .client
        .reserve_set(reserve_request(T, "a-refused", &["hot"], 1, fencing))
        .await
        .unwrap_err();
    assert!(status.message().contains(code), "{status:?}");
}

fn denied_remaining(outcome: pb::reserve_set_response::Outcome) -> i64 {
    match outcome {
        pb::reserve_set_response::Outcome::Denied(d) => d.remaining_nano_usd,
        other => panic!("expected a denial, got {other:?}"),
    }
}

// The next four tests each change, through replica B, one value that A's cached plan relies on
// and that the database's own rules do not hold (`committed + reserved <= limit` ignores
// overrun, a budget's lowered limit, its window kind and the lease's expiry). Only the guard's
// compare of that value stops A's cached batch; without it each test fails.

#[tokio::test]
async fn an_overrun_recorded_through_another_replica_shrinks_what_the_cached_replica_grants() {
    // A's cache: limit 100, reserved 20, overrun 0, so 80 fit. B records a fail-open call of 30:
    // only the window's overrun changes, and 50 fit.
    let (mut a, mut b, fencing) = a_cached_and_b().await;
    b.client
        .record_fail_open(pb::RecordFailOpenRequest {
            tenant_id: T.into(),
            call_id: "call-behind-the-cache".into(),
            budget_ids: vec!["hot".into()],
            actual_nano_usd: 30,
            fencing: Some(fencing.clone()),
            pricing: Some(spendguard_testkit::ledger::test_pricing()),
            contract_sha256_hex: "cd".repeat(32),
            decided_at_unix_ms: 1_764_000_000_000,
            context: Some(pb::DecisionContext {
                run_id: "run-1".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    assert_eq!(
        denied_remaining(reserve(&mut a, "a-3", 60, &fencing).await),
        50
    );
    reserved_id(reserve(&mut a, "a-4", 50, &fencing).await);
    invariants::check(a.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_limit_lowered_through_another_replica_binds_the_cached_replica_though_the_window_is_unchanged()
 {
    // A reserves 60 more (80 held) and lowers the limit to 40 itself: the window is clamped at
    // 80, and A's cache holds a budget of 40. B lowers it to 20: the window, still at its floor
    // of 80, is not written. Once A releases the 60, its cache would let 20 more in (40 less the
    // 20 held); the budget's 20 is all held. B's change reaches A only through the budget's guard.
    let (mut a, mut b, fencing) = a_cached_and_b().await;
    let held = reserved_id(reserve(&mut a, "a-3", 60, &fencing).await);
    upsert_hot(&mut a, 40, pb::BudgetWindow::Lifetime).await;
    assert_eq!(stored_window_limit(&a).await, 80);
    upsert_hot(&mut b, 20, pb::BudgetWindow::Lifetime).await;
    assert_eq!(stored_window_limit(&a).await, 80, "B wrote no window");
    let stale_before = a.batches("cached_stale");
    a.client
        .release(pb::ReleaseRequest {
            tenant_id: T.into(),
            reservation_id: held,
            fencing: Some(fencing.clone()),
            reason: "done".into(),
            deferrable: false,
        })
        .await
        .unwrap();
    assert_eq!(
        denied_remaining(reserve(&mut a, "a-4", 15, &fencing).await),
        0
    );
    assert_eq!(
        a.batches("cached_stale"),
        stale_before + 1,
        "a cached plan (the release's or the reserve's) was refused by its guard"
    );
    invariants::check(a.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_window_kind_changed_through_another_replica_is_charged_in_the_new_window() {
    // A caches `hot` as a lifetime budget (20 of 100 reserved). B makes it daily: A's next
    // reservation (which fits either view) belongs to today's window, which starts empty.
    let (mut a, mut b, fencing) = a_cached_and_b().await;
    upsert_hot(&mut b, 100, pb::BudgetWindow::CalendarDayUtc).await;
    reserved_id(reserve(&mut a, "a-3", 50, &fencing).await);
    let today = balance(&mut a).await;
    assert_eq!(
        (today.reserved_nano_usd, today.remaining_nano_usd),
        (50, 50),
        "{today:?}"
    );
    invariants::check(a.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_lease_shortened_through_another_replica_is_expired_for_the_cached_replica() {
    // A caches the lease with ten minutes left. Its owner renews it through B for one second;
    // once that has passed, A must refuse the epoch as expired.
    let (mut a, mut b, fencing) = a_cached_and_b().await;
    b.client
        .acquire_fencing_lease(pb::AcquireFencingLeaseRequest {
            scope_id: fencing.scope_id.clone(),
            tenant_id: T.into(),
            workload_instance_id: format!("{T}-w"),
            ttl_ms: 1_000,
            expected_epoch: fencing.epoch,
            force: false,
            request_id: String::new(),
        })
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    a_reserve_is_refused(&mut a, &fencing, "FENCING_LEASE_EXPIRED").await;
    invariants::check(a.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_cached_session_that_stops_answering_is_ended_before_its_batch_runs_again() {
    // A reserve planned on the cache is sent, and its statement waits on a row lock another
    // session holds, past the cached path's answer deadline (500 ms here). The session counts
    // as broken, but its backend still waits for the lock and would reserve once it is free.
    // The writer ends that backend before it runs the batch again on the load path, so the
    // answer is one fresh reservation. Before 2026-11-28 the load path ran at once, behind the
    // old statement in the lock's queue: the old one reserved, and the rerun found the
    // reservation there (a replay, or a refusal on the producer sequence that moved under it).
    let tuning = spendguard_testkit::ledger::LedgerTuning {
        cached_answer_deadline_ms: 500,
        ..Default::default()
    };
    let mut ledger = TestLedger::start_with(&tuning).await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "hot", 1_000).await.unwrap();
    for key in ["warm-1", "warm-2"] {
        reserved_id(reserve(&mut ledger, key, 1, &fencing).await);
    }
    let mut locker = ledger.owner.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM budget_windows WHERE budget_id = 'hot' FOR UPDATE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let (mut client, token) = (ledger.client.clone(), fencing.clone());
    let call = tokio::spawn(async move {
        client
            .reserve_set(reserve_request(T, "stuck", &["hot"], 10, &token))
            .await
    });
    let mut waiting = None;
    for _ in 0..250 {
        waiting = sqlx::query_scalar::<_, i32>(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
               AND query LIKE '%The guard of a batch planned on the writer''s cache%'",
        )
        .fetch_optional(&ledger.owner)
        .await
        .unwrap();
        if waiting.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let old_backend = waiting.expect("the cached statement waits on the lock");
    // Past the deadline the writer ends that backend. The lock is freed once it is gone (or
    // after 1.5 s, inside the 2 s lock timeouts, if it never goes): the rerun waits for it.
    // While it runs, no other session may wait for the lock: the rerun comes after it is gone.
    let mut alive = true;
    for _ in 0..75 {
        let (old, others): (bool, i64) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1), \
                    (SELECT count(*) FROM pg_stat_activity \
                      WHERE wait_event_type = 'Lock' AND pid <> $1)",
        )
        .bind(old_backend)
        .fetch_one(&ledger.owner)
        .await
        .unwrap();
        alive = old;
        if !alive {
            break;
        }
        assert_eq!(
            others, 0,
            "a batch ran again while the old backend still ran"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    locker.commit().await.unwrap();
    assert!(!alive, "the broken session's backend was ended");
    let answer = call.await.unwrap().unwrap().into_inner();
    assert!(!answer.replayed, "{answer:?}");
    reserved_id(answer.outcome.unwrap());
    assert_eq!(balance(&mut ledger).await.reserved_nano_usd, 12);
    // The next reserve takes the cached path again, on a new session.
    let cached_before = ledger.batches("cached");
    reserved_id(reserve(&mut ledger, "after", 1, &fencing).await);
    reserved_id(reserve(&mut ledger, "after-2", 1, &fencing).await);
    assert!(ledger.batches("cached") > cached_before);
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn replaying_a_settled_reservation_is_answered_as_a_replay() {
    // A settled reservation leaves the cache; its key replayed must not be planned as new (a
    // denial writes nothing, so only the guard's absence check can tell).
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "hot", 100).await.unwrap();
    let id = reserved_id(reserve(&mut ledger, "k-1", 60, &fencing).await);
    ledger
        .client
        .release(pb::ReleaseRequest {
            tenant_id: T.into(),
            reservation_id: id.clone(),
            fencing: Some(fencing.clone()),
            reason: "done".into(),
            deferrable: false,
        })
        .await
        .unwrap();
    reserved_id(reserve(&mut ledger, "k-2", 60, &fencing).await);
    // Replaying k-1 alongside a new reserve in one batch is not possible to force from outside,
    // so replay it alone (load path) and together with traffic (cached path with the absence
    // check): both must be replays of the original reservation.
    let replay = ledger
        .client
        .reserve_set(reserve_request(T, "k-1", &["hot"], 60, &fencing))
        .await
        .unwrap()
        .into_inner();
    assert!(replay.replayed, "{replay:?}");
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut client = ledger.client.clone();
        let request = if i % 2 == 0 {
            reserve_request(T, "k-1", &["hot"], 60, &fencing)
        } else {
            reserve_request(T, &format!("n-{i}"), &["hot"], 1, &fencing)
        };
        tasks.push(tokio::spawn(async move {
            client.reserve_set(request).await.unwrap().into_inner()
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let response = task.await.unwrap();
        if i % 2 == 0 {
            assert!(response.replayed, "{response:?}");
            assert_eq!(reserved_id(response.outcome.unwrap()), id);
        }
    }
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_reservation_settled_behind_the_cache_fails_the_guard_though_the_window_looks_unchanged()
{
    // A-B-A: R is cached open. Behind the cache (as another replica would), R is released and the
    // same amount reserved under another key, so the window holds exactly the remembered values.
    // A cached batch that reads R as open — a commit with a stale epoch, which writes nothing for
    // R — next to a write must be refused: the load path would answer that R is settled.
    use spendguard_core::NanoUsd;
    use spendguard_core::plan::{Command, Commit, Fencing};
    use spendguard_ledger::error::Error;

    let mut r = CachedOpen::start(|token| reserve_request(T, "r", &["hot"], 10, token)).await;
    let token = r.token.clone();
    let reserve = |key: &str, amount: i64| reserve_command(key, "hot", amount, &token);

    // Behind the cache: release R, reserve 10 again. The window is back to reserved = 10.
    let behind = [r.release(), reserve("r2", 10)];
    r.store.run_batch(&mut r.cursor, &behind).await.unwrap();

    let stale = Fencing {
        epoch: token.epoch + 1,
        ..r.fencing()
    };
    let commands = [
        Command::Commit(Commit {
            tenant_id: T.into(),
            reservation_id: r.id,
            actual: NanoUsd::new(5).unwrap(),
            fencing: stale,
        }),
        reserve("r3", 1),
    ];
    let (snapshot, expected) = r
        .cache
        .snapshot_for(&commands)
        .expect("every row is cached");
    let result = run_cached(&r.store, &mut r.cursor, snapshot, &expected, &commands).await;
    assert!(matches!(result, Err(Error::Stale)), "{result:?}");
    invariants::check(r.store.pool()).await.unwrap();
}

#[tokio::test]
async fn a_batch_sent_behind_a_refused_batch_is_refused_even_if_its_own_rows_are_fresh() {
    // The writer sends batch N+1 (planned on N's effects) before N is answered. If N's guard
    // fails, N+1 must not commit: its producer sequences follow N's, so the compare-and-set
    // refuses it even when every row N+1 read is unchanged.
    use spendguard_ledger::cache::HotCache;
    use spendguard_ledger::error::Error;

    let mut ledger = TestLedger::start().await.unwrap();
    let token = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "a", 1_000).await.unwrap();
    ledger.budget(T, "b", 1_000).await.unwrap();
    let reserve = |key: &str, budget: &str| reserve_command(key, budget, 10, &token);
    let store = ledger.store().clone();
    let mut cursor = ledger.producer_cursor().await.unwrap();
    let mut cache = HotCache::default();
    let warm = store
        .run_batch(
            &mut cursor,
            &[reserve("warm-a", "a"), reserve("warm-b", "b")],
        )
        .await
        .unwrap();
    remember(&mut cache, warm);
    // Behind the cache: budget a moves; b does not.
    store
        .run_batch(&mut cursor, &[reserve("behind", "a")])
        .await
        .unwrap();

    // N on a (stale), then N+1 on b planned on N's effects, both sent before either is answered.
    let n = [reserve("n", "a")];
    let (snapshot, expected) = cache.snapshot_for(&n).unwrap();
    let first = store
        .prepare_cached(&cursor, snapshot, &expected, &n)
        .await
        .unwrap();
    let mut speculative = cursor.clone();
    speculative.next_sequence = first.next_sequence;
    cache.absorb(first.state);
    let next = [reserve("next", "b")];
    let (snapshot, expected) = cache.snapshot_for(&next).unwrap();
    let second = store
        .prepare_cached(&speculative, snapshot, &expected, &next)
        .await
        .unwrap();
    let first_answer = store.send_cached(first.statement).await.unwrap();
    let second_answer = store.send_cached(second.statement).await.unwrap();
    assert!(matches!(first_answer.await, Err(Error::Stale)));
    assert!(matches!(second_answer.await, Err(Error::Stale)));
    let written: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reservations WHERE idempotency_key IN ('n', 'next')",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(written, 0);

    // The same N+1, sequenced on what was really committed, passes its guard: only its place
    // behind N refused it.
    let mut cache = HotCache::default();
    let reload = store
        .run_batch(&mut cursor, &[reserve("reload-b", "b")])
        .await
        .unwrap();
    remember(&mut cache, reload);
    let (snapshot, expected) = cache.snapshot_for(&next).unwrap();
    run_cached(&store, &mut cursor, snapshot, &expected, &next)
        .await
        .unwrap();
    invariants::check(store.pool()).await.unwrap();
}

#[tokio::test]
async fn a_cached_path_session_killed_by_the_server_is_reopened_and_no_call_fails() {
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "hot", 1_000_000).await.unwrap();
    for i in 0..5 {
        reserved_id(reserve(&mut ledger, &format!("before-{i}"), 1, &fencing).await);
    }
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE query LIKE 'WITH -- The guard%' AND datname = current_database()
            AND pid <> pg_backend_pid()) AS t",
    )
    .fetch_one(ledger.store().pool())
    .await
    .unwrap();
    assert_eq!(killed, 1, "the cached path has one session");
    let cached_before = ledger.batches("cached");
    for i in 0..5 {
        reserved_id(reserve(&mut ledger, &format!("after-{i}"), 1, &fencing).await);
    }
    assert!(
        ledger.batches("cached") > cached_before,
        "hot batches take the cached path again on a new session"
    );
    assert_eq!(balance(&mut ledger).await.reserved_nano_usd, 10);
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn each_batch_takes_the_statement_for_its_effects_and_no_statement_drops_effects() {
    // A reserve-only batch and a commit-only batch each go by a statement without the other's
    // part; a batch with both takes the full one. A batch sent under a statement that lacks a
    // part it needs is refused whole, so a wrong choice can never drop a resolution or a
    // reservation.
    use spendguard_core::plan::Command;
    use spendguard_ledger::cache::HotCache;
    use spendguard_ledger::error::Error;
    use spendguard_ledger::store::CachedShape;

    let mut ledger = TestLedger::start().await.unwrap();
    let token = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "hot", 1_000).await.unwrap();
    let store = ledger.store().clone();
    let mut cursor = ledger.producer_cursor().await.unwrap();
    let mut cache = HotCache::default();
    let reserve = |key: &str| reserve_command(key, "hot", 10, &token);
    let commit = |key: &str| {
        let Command::ReserveSet(r) = reserve(key) else {
            unreachable!()
        };
        Command::Commit(
            spendguard_ledger::convert::commit(&pb::CommitRequest {
                tenant_id: T.into(),
                reservation_id: r.reservation_id().to_string(),
                actual_nano_usd: 4,
                fencing: Some(token.clone()),
                deferrable: false,
            })
            .unwrap(),
        )
    };
    let warm = store
        .run_batch(&mut cursor, &[reserve("one"), reserve("two")])
        .await
        .unwrap();
    remember(&mut cache, warm);

    let shape_of = async |commands: &[Command]| {
        prepared(&store, &cursor, &cache, commands)
            .await
            .statement
            .shape()
    };
    assert_eq!(shape_of(&[reserve("three")]).await, CachedShape::Reserves);
    assert_eq!(shape_of(&[commit("one")]).await, CachedShape::Resolutions);
    assert_eq!(
        shape_of(&[commit("one"), reserve("three")]).await,
        CachedShape::Mixed
    );

    // Under a statement without a part the batch needs: refused, nothing written.
    for (commands, wrong) in [
        (vec![commit("one")], CachedShape::Reserves),
        (vec![reserve("three")], CachedShape::Resolutions),
        (vec![commit("one"), reserve("three")], CachedShape::Reserves),
        (
            vec![commit("one"), reserve("three")],
            CachedShape::Resolutions,
        ),
    ] {
        let batch = prepared(&store, &cursor, &cache, &commands).await;
        let sent = store
            .send_cached(batch.statement.with_shape(wrong))
            .await
            .unwrap();
        assert!(matches!(sent.await, Err(Error::Stale)), "{wrong:?}");
    }
    let hot = balance(&mut ledger).await;
    assert_eq!((hot.reserved_nano_usd, hot.committed_nano_usd), (20, 0));

    // Under their own statements, each commits.
    for commands in [
        vec![commit("one")],
        vec![reserve("three")],
        vec![commit("two"), reserve("four")],
    ] {
        let batch = prepared(&store, &cursor, &cache, &commands).await;
        store
            .send_cached(batch.statement)
            .await
            .unwrap()
            .await
            .unwrap();
        cursor.next_sequence = batch.next_sequence;
        cache.absorb(batch.state);
    }
    let hot = balance(&mut ledger).await;
    assert_eq!((hot.reserved_nano_usd, hot.committed_nano_usd), (20, 8));
    invariants::check(store.pool()).await.unwrap();
}

/// `commands` planned on `cache` and signed after `cursor`, not sent.
async fn prepared(
    store: &spendguard_ledger::store::Store,
    cursor: &spendguard_ledger::store::ProducerCursor,
    cache: &spendguard_ledger::cache::HotCache,
    commands: &[spendguard_core::plan::Command],
) -> spendguard_ledger::store::PreparedBatch {
    let (snapshot, expected) = cache.snapshot_for(commands).unwrap();
    store
        .prepare_cached(cursor, snapshot, &expected, commands)
        .await
        .unwrap()
}
