//! Checks every ledger invariant on the database itself, after a test has done its worst.

use anyhow::{Result, ensure};
use sqlx::{PgPool, Row};

/// Asserts: journal sums equal window balances; window reserved equals the open reservations'
/// amounts (a credit's less what calls drew from it); a credit's drawn total is the sum of its
/// draws; no window overspent; every resolved reservation has exactly one resolution entry per
/// budget, and overrun entries adding up to its overrun; every fail-open record has one overrun
/// entry of its cost per budget; every scope's epoch is the newest in its history; producer
/// sequences are contiguous from 1 with the counter just past the last.
///
/// # Errors
/// A description of the first broken invariant.
pub async fn check(pool: &PgPool) -> Result<()> {
    let mismatched: Vec<String> = sqlx::query_scalar(
        "SELECT w.tenant_id || '/' || w.budget_id || '@' || w.window_start
           FROM budget_windows w
           LEFT JOIN (SELECT tenant_id, budget_id, window_start,
                             sum(limit_delta) l, sum(reserved_delta) r, sum(committed_delta) c, sum(overrun_delta) o
                        FROM ledger_entries GROUP BY 1, 2, 3) e
                  USING (tenant_id, budget_id, window_start)
          WHERE (w.limit_nano_usd, w.reserved_nano_usd, w.committed_nano_usd, w.overrun_nano_usd)
                IS DISTINCT FROM (coalesce(e.l, 0), coalesce(e.r, 0), coalesce(e.c, 0), coalesce(e.o, 0))",
    )
    .fetch_all(pool)
    .await?;
    ensure!(
        mismatched.is_empty(),
        "journal does not sum to balances for {mismatched:?}"
    );

    let reserved_mismatch: Vec<String> = sqlx::query_scalar(
        "SELECT w.budget_id FROM budget_windows w
           LEFT JOIN (SELECT r.tenant_id, b.budget_id, b.window_start,
                             sum(r.amount_nano_usd - r.drawn_nano_usd) open
                        FROM reservations r, unnest(r.budget_ids, r.window_starts) AS b(budget_id, window_start)
                       WHERE r.state = 'reserved' GROUP BY 1, 2, 3) o
                  USING (tenant_id, budget_id, window_start)
          WHERE w.reserved_nano_usd <> coalesce(o.open, 0)",
    )
    .fetch_all(pool)
    .await?;
    ensure!(
        reserved_mismatch.is_empty(),
        "reserved differs from open reservations for {reserved_mismatch:?}"
    );

    // A credit's drawn total is the sum of the reservations drawn from it, each of the credit's
    // tenant, scope and budgets.
    let credit_mismatch: Vec<String> = sqlx::query_scalar(
        "SELECT c.reservation_id::text FROM reservations c
          WHERE c.is_credit
            AND (c.drawn_nano_usd <> coalesce((SELECT sum(d.amount_nano_usd) FROM reservations d
                                                WHERE d.drawn_from_reservation_id = c.reservation_id), 0)
                 OR EXISTS (SELECT 1 FROM reservations d
                             WHERE d.drawn_from_reservation_id = c.reservation_id
                               AND (d.tenant_id, d.fencing_scope_id, d.budget_ids, d.window_starts)
                                   IS DISTINCT FROM (c.tenant_id, c.fencing_scope_id, c.budget_ids, c.window_starts)))
         UNION ALL
         SELECT d.reservation_id::text FROM reservations d
          WHERE d.drawn_from_reservation_id IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM reservations c
                             WHERE c.reservation_id = d.drawn_from_reservation_id AND c.is_credit)",
    )
    .fetch_all(pool)
    .await?;
    ensure!(
        credit_mismatch.is_empty(),
        "credits whose draws do not add up: {credit_mismatch:?}"
    );

    let overspent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM budget_windows WHERE committed_nano_usd + reserved_nano_usd > limit_nano_usd
            OR reserved_nano_usd < 0",
    )
    .fetch_one(pool)
    .await?;
    ensure!(overspent == 0, "{overspent} windows overspent");

    let resolution_counts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reservations r
          WHERE (SELECT count(*) FROM ledger_entries e
                  WHERE e.reservation_id = r.reservation_id AND e.kind IN ('commit', 'release', 'expire'))
                <> CASE WHEN r.state = 'reserved' THEN 0 ELSE cardinality(r.budget_ids) END
             OR (SELECT count(*) FROM ledger_entries e
                  WHERE e.reservation_id = r.reservation_id AND e.kind = 'reserve') <> cardinality(r.budget_ids)",
    )
    .fetch_one(pool)
    .await?;
    ensure!(
        resolution_counts == 0,
        "{resolution_counts} reservations with wrong reserve/resolution entries"
    );

    // Every scope's epoch is the newest epoch its history records (S3: every acquire writes one).
    let unrecorded_epochs: Vec<String> = sqlx::query_scalar(
        "SELECT f.scope_id FROM fencing_scopes f
          WHERE f.epoch IS DISTINCT FROM (SELECT max(e.epoch) FROM fencing_scope_events e
                                           WHERE e.scope_id = f.scope_id)",
    )
    .fetch_all(pool)
    .await?;
    ensure!(
        unrecorded_epochs.is_empty(),
        "scopes whose epoch their history does not record: {unrecorded_epochs:?}"
    );

    // A reservation's overrun (above its amount, or all of a commit after its TTL) is its
    // overrun entries, per budget.
    let overrun_mismatch: Vec<String> = sqlx::query_scalar(
        "SELECT r.reservation_id::text FROM reservations r,
                unnest(r.budget_ids, r.window_starts) AS b(budget_id, window_start)
          WHERE coalesce(r.overrun_nano_usd, 0) <>
                coalesce((SELECT sum(e.overrun_delta) FROM ledger_entries e
                           WHERE e.reservation_id = r.reservation_id AND e.kind = 'overrun'
                             AND e.budget_id = b.budget_id AND e.window_start = b.window_start), 0)",
    )
    .fetch_all(pool)
    .await?;
    ensure!(
        overrun_mismatch.is_empty(),
        "reservations whose overrun is not their overrun entries: {overrun_mismatch:?}"
    );

    // A fail-open record (S22) carries its cost as exactly one overrun entry per budget (none
    // when the cost is 0), each of the recorded amount, and nothing else.
    let fail_open_mismatch: Vec<String> = sqlx::query_scalar(
        "SELECT f.call_id FROM fail_open_records f
          WHERE (SELECT count(*) FROM ledger_entries e WHERE e.reservation_id = f.record_id)
                <> CASE WHEN f.actual_nano_usd = 0 THEN 0 ELSE cardinality(f.budget_ids) END
             OR EXISTS (SELECT 1 FROM ledger_entries e
                         WHERE e.reservation_id = f.record_id
                           AND (e.kind <> 'overrun' OR e.overrun_delta <> f.actual_nano_usd
                                OR e.budget_id <> ALL (f.budget_ids)))",
    )
    .fetch_all(pool)
    .await?;
    ensure!(
        fail_open_mismatch.is_empty(),
        "fail-open records with wrong journal entries: {fail_open_mismatch:?}"
    );

    let rows = sqlx::query(
        "SELECT p.producer_instance_id, p.next_sequence, count(o.producer_sequence) n,
                coalesce(max(o.producer_sequence), 0) mx
           FROM audit_producers p LEFT JOIN audit_outbox o USING (producer_instance_id)
          GROUP BY 1, 2",
    )
    .fetch_all(pool)
    .await?;
    for row in rows {
        let (id, next, n, max): (String, i64, i64, i64) = (
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
        );
        ensure!(
            n == max && next == max + 1,
            "producer {id}: {n} events, max sequence {max}, next {next}: not contiguous"
        );
    }
    Ok(())
}
