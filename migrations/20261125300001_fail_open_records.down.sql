-- Restores the journal check of 20261124000001 (entries name reservations only). Overrun entries
-- already written for fail-open records stay in the journal (it is append-only) and keep counting
-- in the balances; only their record rows go.
CREATE OR REPLACE FUNCTION ledger_entries_apply() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    wanted integer;
    updated integer;
    ids uuid[];
    found integer;
BEGIN
    -- `= ANY(array)` keeps these lookups on the primary key: a join against the transition table
    -- (which has no statistics) can be planned as a scan of the whole table.
    ids := ARRAY(SELECT DISTINCT reservation_id FROM inserted WHERE reservation_id IS NOT NULL);
    SELECT count(*) INTO found FROM reservations r
     WHERE r.reservation_id = ANY(ids)
       AND r.tenant_id = ALL (SELECT i.tenant_id FROM inserted i WHERE i.reservation_id = r.reservation_id);
    IF found <> cardinality(ids) THEN
        RAISE EXCEPTION 'journal entry for an unknown reservation' USING ERRCODE = 'foreign_key_violation';
    END IF;
    SELECT count(DISTINCT (tenant_id, budget_id, window_start)) INTO wanted FROM inserted;
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
       AND w.tenant_id = ANY(ARRAY(SELECT DISTINCT tenant_id FROM inserted))
       AND w.budget_id = ANY(ARRAY(SELECT DISTINCT budget_id FROM inserted));
    GET DIAGNOSTICS updated = ROW_COUNT;
    IF updated <> wanted THEN
        RAISE EXCEPTION 'journal entry for an unknown budget window' USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
DROP TABLE fail_open_records;
DROP FUNCTION fail_open_records_immutable();
