-- The effects of one batch as data-modifying CTEs (no leading WITH, no final SELECT): the load
-- path runs them as `write_batch`, the cached path after the guard of `fast_guard.sql`.
-- Data-modifying CTEs all run; the outbox insert happens only if the producer compare-and-set
-- succeeded (the caller, or the fast path's final check, fails the batch when it did not).
new_reservations AS (
    INSERT INTO reservations (reservation_id, tenant_id, idempotency_key, request_sha256, budget_ids,
                              window_starts, amount_nano_usd, fencing_scope_id, fencing_epoch, created_at,
                              expires_at, state, resolved_at, resolved_epoch, actual_nano_usd,
                              committed_nano_usd, released_nano_usd, overrun_nano_usd)
    SELECT x.reservation_id, x.tenant_id, x.idempotency_key, x.request_sha256, x.budget_ids, x.window_starts,
           x.amount_nano_usd, x.fencing_scope_id, x.fencing_epoch, $2, x.expires_at, x.state,
           CASE WHEN x.state = 'reserved' THEN NULL ELSE $2 END, x.resolved_epoch, x.actual, x.committed,
           x.released, x.overrun
      FROM jsonb_to_recordset($1) AS x(reservation_id uuid, tenant_id text, idempotency_key text,
           request_sha256 text, budget_ids text[], window_starts timestamptz[], amount_nano_usd bigint,
           fencing_scope_id text, fencing_epoch bigint, expires_at timestamptz, state text,
           resolved_epoch bigint, actual bigint, committed bigint, released bigint, overrun bigint)
    RETURNING 1
), resolutions AS (
    UPDATE reservations r
       SET state = u.state, resolved_at = $2, resolved_epoch = u.epoch, actual_nano_usd = u.actual,
           committed_nano_usd = u.committed, released_nano_usd = u.released, overrun_nano_usd = u.overrun
      FROM unnest($3::uuid[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[])
           AS u(id, state, epoch, actual, committed, released, overrun)
     WHERE r.reservation_id = u.id
       AND r.reservation_id = ANY($3) -- lets the planner probe the primary key instead of scanning
    RETURNING 1
), entries AS (
    INSERT INTO ledger_entries (tenant_id, budget_id, window_start, reservation_id, kind,
                                limit_delta, reserved_delta, committed_delta, overrun_delta)
    SELECT * FROM unnest($10::text[], $11::text[], $12::timestamptz[], $13::uuid[], $14::text[],
                         $15::bigint[], $16::bigint[], $17::bigint[], $18::bigint[])
    RETURNING 1
), allocated AS (
    UPDATE audit_producers SET next_sequence = $22
     WHERE producer_instance_id = $19 AND claim_token = $20 AND next_sequence = $21
    RETURNING 1
), outbox AS (
    INSERT INTO audit_outbox (producer_instance_id, producer_sequence, tenant_id, event_type, occurred_at,
                              canonical_event, event_sha256, signing_key_id, signing_algorithm, signed_at,
                              signature)
    SELECT $19, u.s, u.t, u.e, $2, u.b, u.h, u.k, u.a, u.at, u.sig
      FROM unnest($23::bigint[], $24::text[], $25::text[], $26::bytea[], $27::bytea[], $28::text[],
                  $29::text[], $30::timestamptz[], $31::bytea[]) AS u(s, t, e, b, h, k, a, at, sig)
     WHERE EXISTS (SELECT 1 FROM allocated)
    RETURNING 1
)
