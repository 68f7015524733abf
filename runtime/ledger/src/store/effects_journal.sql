-- The journal, the producer compare-and-set and the outbox of one batch, as data-modifying CTEs
-- (no leading WITH, no final SELECT). With effects_new_reservations.sql and
-- effects_resolutions.sql they are a batch's effects: the load path runs all three
-- (`WRITE_BATCH`), the cached path after the guard of `fast_guard.sql`, leaving out a part the
-- batch has nothing for (`CachedShape`).
-- Data-modifying CTEs all run; the outbox insert happens only if the producer compare-and-set
-- succeeded (the caller, or the fast path's final check, fails the batch when it did not).
entries AS (
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
                              signature, signature_inclusion)
    SELECT $19, u.s, u.t, u.e, $2, u.b, u.h, u.k, u.a, u.at, u.sig, u.inc
      FROM unnest($23::bigint[], $24::text[], $25::text[], $26::bytea[], $27::bytea[], $28::text[],
                  $29::text[], $30::timestamptz[], $31::bytea[], $32::bytea[])
           AS u(s, t, e, b, h, k, a, at, sig, inc)
     WHERE EXISTS (SELECT 1 FROM allocated)
    RETURNING 1
)
