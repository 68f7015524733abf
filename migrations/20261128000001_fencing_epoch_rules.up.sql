-- The database holds fencing (spec S3) as it holds money, even if the planner were wrong: a
-- reservation is created, and resolved by a caller, only under its fencing scope's current epoch,
-- as the money statement sees it (a batch's lease changes and late usage are written earlier in
-- the same transaction). The planner refuses a stale epoch first (FENCING_EPOCH_STALE) and the
-- cached path's guard locks the scope at the epoch it planned on, so a single command breaks
-- these rules only through a bug. A batch that writes under epoch N and then restarts its scope
-- to N+1 is refused whole (its lease change is already written) and runs again one command at a
-- time, where each passes, as for any rule.
-- Not checked: a sweep's expiry (no caller, no epoch); a fail-open record (no reservation; it
-- keeps the epoch it was decided under, by design); a late commit of 0 on a reservation already
-- swept (it writes no journal entry: docs/ledger.md).

-- Replaces reservations_tenant_exists (migration 20261124000001), which checked the tenant only.
DROP TRIGGER reservations_tenant_exists ON reservations;
DROP FUNCTION reservations_tenant_exists();
CREATE FUNCTION reservations_tenant_and_epoch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- One anti-join, as the tenant check alone was: a scope of the row's tenant at the row's
    -- epoch implies the tenant (fencing_scopes.tenant_id references tenants). Which rule broke
    -- is worked out only when one did.
    IF EXISTS (SELECT 1 FROM inserted i
                WHERE NOT EXISTS (SELECT 1 FROM fencing_scopes f
                                   WHERE f.scope_id = i.fencing_scope_id AND f.tenant_id = i.tenant_id
                                     AND f.epoch = i.fencing_epoch)) THEN
        IF EXISTS (SELECT 1 FROM inserted i
                    WHERE NOT EXISTS (SELECT 1 FROM tenants t WHERE t.tenant_id = i.tenant_id)) THEN
            RAISE EXCEPTION 'reservation for an unknown tenant' USING ERRCODE = 'foreign_key_violation';
        END IF;
        RAISE EXCEPTION 'reservation created under an epoch that is not the current one of a fencing scope of its tenant'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER reservations_tenant_and_epoch AFTER INSERT ON reservations
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION reservations_tenant_and_epoch();

-- The journal's statement trigger also checks the resolving epoch of the reservations its
-- entries name. The rest is unchanged from 20261127500001_journal_lookup_only_with_ids.
CREATE OR REPLACE FUNCTION ledger_entries_apply() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    broken text;
    found_records integer;
    wanted integer;
    updated integer;
    ids uuid[];
    tenants text[];
    budgets text[];
    found integer;
    stale integer;
BEGIN
    SELECT min(CASE
               WHEN NOT (i.kind IN ('window_open', 'limit_set', 'reserve', 'commit', 'overrun',
                                    'release', 'expire'))
                   THEN 'ledger_entries_kind_check'
               WHEN NOT ((i.reservation_id IS NULL) = (i.kind IN ('window_open', 'limit_set')))
                   THEN 'ledger_entries_reservation_matches_kind'
           END),
           coalesce(array_agg(DISTINCT i.reservation_id) FILTER (WHERE i.reservation_id IS NOT NULL),
                    '{}'),
           array_agg(DISTINCT i.tenant_id),
           array_agg(DISTINCT i.budget_id),
           count(DISTINCT (i.tenant_id, i.budget_id, i.window_start))
      INTO broken, ids, tenants, budgets, wanted
      FROM inserted i;
    IF broken IS NOT NULL THEN
        PERFORM spendguard_row_rule_broken(TG_TABLE_SCHEMA, TG_TABLE_NAME, broken);
    END IF;
    -- `= ANY(array)` keeps these lookups on the primary key: a join against the transition table
    -- (which has no statistics) can be planned as a scan of the whole table.
    -- Only when some entry names a reservation (a window's opening or limit names none): with
    -- no id, a custom plan reads `ids = ANY('{}')` as false, and a false condition lets the
    -- planner pick any index, such as the partial one of every open reservation, whole.
    -- An entry names a reservation only in the transaction that creates or resolves it (a late
    -- commit's usage on a swept row is written just before this statement), so a resolving epoch
    -- found here is this batch's: it must be the scope's current one (spec S3). A sweep's expiry
    -- has none, and a reservation without one needs no scope row.
    found := 0;
    stale := 0;
    IF cardinality(ids) > 0 THEN
        SELECT count(*), count(*) FILTER (WHERE r.resolved_epoch IS DISTINCT FROM f.epoch
                                            AND r.resolved_epoch IS NOT NULL)
          INTO found, stale
          FROM reservations r
          LEFT JOIN fencing_scopes f ON f.scope_id = r.fencing_scope_id AND f.tenant_id = r.tenant_id
                                    AND r.resolved_epoch IS NOT NULL
         WHERE r.reservation_id = ANY(ids)
           AND r.tenant_id = ALL (SELECT i.tenant_id FROM inserted i WHERE i.reservation_id = r.reservation_id);
    END IF;
    IF stale > 0 THEN
        RAISE EXCEPTION 'reservation resolved under an epoch that is not its fencing scope''s current one'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    -- A fail-open record stands in for a reservation of 0: only overrun entries may name it.
    -- Looked up only when some id is not a reservation, so reserve/commit batches (the hot path)
    -- pay nothing for it.
    found_records := 0;
    IF found <> cardinality(ids) THEN
        SELECT count(*) INTO found_records FROM fail_open_records f
         WHERE f.record_id = ANY(ids)
           AND f.tenant_id = ALL (SELECT i.tenant_id FROM inserted i WHERE i.reservation_id = f.record_id)
           AND 'overrun' = ALL (SELECT i.kind FROM inserted i WHERE i.reservation_id = f.record_id);
    END IF;
    IF found + found_records <> cardinality(ids) THEN
        RAISE EXCEPTION 'journal entry for an unknown reservation' USING ERRCODE = 'foreign_key_violation';
    END IF;
    UPDATE budget_windows w
       SET limit_nano_usd     = w.limit_nano_usd + d.limit_delta,
           reserved_nano_usd  = w.reserved_nano_usd + d.reserved_delta,
           committed_nano_usd = w.committed_nano_usd + d.committed_delta,
           overrun_nano_usd   = w.overrun_nano_usd + d.overrun_delta
      FROM (SELECT tenant_id, budget_id, window_start,
                   sum(limit_delta)::bigint AS limit_delta,
                   sum(reserved_delta)::bigint AS reserved_delta,
                   sum(committed_delta)::bigint AS committed_delta,
                   sum(overrun_delta)::bigint AS overrun_delta
              FROM inserted GROUP BY tenant_id, budget_id, window_start) d
     WHERE w.tenant_id = d.tenant_id AND w.budget_id = d.budget_id AND w.window_start = d.window_start
       AND w.tenant_id = ANY(tenants)
       AND w.budget_id = ANY(budgets);
    GET DIAGNOSTICS updated = ROW_COUNT;
    IF updated <> wanted THEN
        RAISE EXCEPTION 'journal entry for an unknown budget window' USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;

