-- The guard of a batch planned on the writer's cache (see cache.rs): lock every row the plan read
-- and keep those that still hold the values it was planned on. The final SELECT (store.rs) fails
-- the whole statement unless every row was found unchanged, every resolution found its open
-- reservation, the producer compare-and-set succeeded and the estimated clock ($2) is close to
-- now(). Budget windows change only through the journal trigger, which fires after this guard
-- ran (AFTER ... FOR EACH STATEMENT), so the guard sees the rows as they were before the batch.
-- The final SELECT reads the guards in the load path's lock order (scopes, reservations,
-- budgets, windows; its AND runs left to right), so a cached statement and another replica's
-- load path wait for each other's rows in one order and do not deadlock.
guard_scopes AS (
    SELECT 1 FROM fencing_scopes f
      JOIN unnest($33::text[], $34::text[], $35::text[], $36::bigint[], $37::timestamptz[])
           AS g(scope_id, tenant_id, owner, epoch, expires_at) ON f.scope_id = g.scope_id
     WHERE f.tenant_id = g.tenant_id AND f.owner_workload_id = g.owner AND f.epoch = g.epoch
       AND f.expires_at = g.expires_at
     ORDER BY f.scope_id
       FOR SHARE OF f
), guard_reservations AS (
    -- The reservations the batch resolves or draws from ($52), locked before any budget or
    -- window; the final check counts those still open. Found by primary key alone: with a
    -- condition on `state` here, the session's one generic plan may read every open
    -- reservation through `reservations_open_by_expiry` and filter them, so every statement
    -- would cost as much as there are calls in flight (tests/ledger_cache.rs checks the plans).
    SELECT state FROM reservations
     WHERE reservation_id = ANY($52::uuid[])
     ORDER BY reservation_id
       FOR UPDATE
), guard_budgets AS (
    SELECT 1 FROM budgets b
      JOIN unnest($38::text[], $39::text[], $40::bigint[], $41::bigint[], $42::text[])
           AS g(tenant_id, budget_id, limit_nano_usd, soft_cap_nano_usd, window_kind)
        ON b.tenant_id = g.tenant_id AND b.budget_id = g.budget_id
     WHERE b.limit_nano_usd = g.limit_nano_usd
       AND b.soft_cap_nano_usd IS NOT DISTINCT FROM g.soft_cap_nano_usd
       AND b.window_kind = g.window_kind
     ORDER BY b.tenant_id, b.budget_id
       FOR SHARE OF b
), guard_windows AS (
    SELECT 1 FROM budget_windows w
      JOIN unnest($43::text[], $44::text[], $45::timestamptz[], $46::bigint[], $47::bigint[],
                  $48::bigint[], $49::bigint[])
           AS g(tenant_id, budget_id, window_start, limit_nano_usd, reserved_nano_usd,
                committed_nano_usd, overrun_nano_usd)
        ON w.tenant_id = g.tenant_id AND w.budget_id = g.budget_id AND w.window_start = g.window_start
     WHERE w.limit_nano_usd = g.limit_nano_usd AND w.reserved_nano_usd = g.reserved_nano_usd
       AND w.committed_nano_usd = g.committed_nano_usd AND w.overrun_nano_usd = g.overrun_nano_usd
     ORDER BY w.tenant_id, w.budget_id, w.window_start
       FOR UPDATE OF w
)
