-- The reservations a batch creates (a data-modifying CTE; see effects_journal.sql).
new_reservations AS (
    INSERT INTO reservations (reservation_id, tenant_id, idempotency_key, request_sha256, budget_ids,
                              window_starts, amount_nano_usd, fencing_scope_id, fencing_epoch, created_at,
                              expires_at, state, resolved_at, resolved_epoch, actual_nano_usd,
                              committed_nano_usd, released_nano_usd, overrun_nano_usd, is_credit,
                              drawn_nano_usd, drawn_from_reservation_id)
    SELECT x.reservation_id, x.tenant_id, x.idempotency_key, x.request_sha256, x.budget_ids, x.window_starts,
           x.amount_nano_usd, x.fencing_scope_id, x.fencing_epoch, $2, x.expires_at, x.state,
           CASE WHEN x.state = 'reserved' THEN NULL ELSE $2 END, x.resolved_epoch, x.actual, x.committed,
           x.released, x.overrun, coalesce(x.is_credit, false), coalesce(x.drawn, 0), x.drawn_from
      FROM jsonb_to_recordset($1) AS x(reservation_id uuid, tenant_id text, idempotency_key text,
           request_sha256 text, budget_ids text[], window_starts timestamptz[], amount_nano_usd bigint,
           fencing_scope_id text, fencing_epoch bigint, expires_at timestamptz, state text,
           resolved_epoch bigint, actual bigint, committed bigint, released bigint, overrun bigint,
           -- Credit members, present only for credits and their draws.
           is_credit boolean, drawn bigint, drawn_from uuid)
    RETURNING 1
)
