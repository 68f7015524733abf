-- Locks and reads everything a batch decides on, in one round trip and in the fixed lock order
-- (scopes, reservations, then budgets; windows follow in a second query because their keys
-- depend on the budgets). Target-list subqueries run left to right. `cardinality(..) > 0`: on
-- these custom plans an empty array makes `ANY('{}')` false, and a false condition lets the
-- planner read any index whole (the partial one of open reservations); the check folds to
-- false first, so nothing is read.
SELECT now() AS now,
       (SELECT coalesce(json_agg(s), '[]'::json) FROM (
            SELECT scope_id, tenant_id, owner_workload_id, epoch, expires_at
              FROM fencing_scopes WHERE scope_id = ANY($1) ORDER BY scope_id FOR UPDATE) s) AS scopes,
       (SELECT coalesce(json_agg(r), '[]'::json) FROM (
            SELECT reservation_id, tenant_id, idempotency_key, request_sha256, budget_ids, window_starts,
                   amount_nano_usd, fencing_scope_id, fencing_epoch, expires_at, state, resolved_epoch,
                   actual_nano_usd, committed_nano_usd, released_nano_usd, overrun_nano_usd,
                   is_credit, drawn_nano_usd, drawn_from_reservation_id
              FROM reservations WHERE reservation_id = ANY($2) AND cardinality($2) > 0
             ORDER BY reservation_id FOR UPDATE) r) AS reservations,
       (SELECT coalesce(json_agg(t), '[]'::json) FROM (
            SELECT tenant_id, display_name FROM tenants WHERE tenant_id = ANY($3)) t) AS tenants,
       (SELECT coalesce(json_agg(b), '[]'::json) FROM (
            SELECT tenant_id, budget_id, limit_nano_usd, soft_cap_nano_usd, window_kind
              FROM budgets WHERE tenant_id = ANY($4) AND budget_id = ANY($5)
             ORDER BY tenant_id, budget_id {budget_lock}) b) AS budgets,
       (SELECT coalesce(json_agg(p), '[]'::json) FROM (
            SELECT tenant_id, version, sha256_hex FROM pricing_registrations
             WHERE tenant_id = ANY($6) AND version = ANY($7)) p) AS pricing,
       (SELECT coalesce(json_agg(k), '[]'::json) FROM (
            SELECT key_id, algorithm, encode(public_key, 'hex') AS public_key_hex, valid_from, valid_until,
                   revoked_at
              FROM signing_keys WHERE key_id = ANY($8) ORDER BY key_id FOR UPDATE) k) AS signing_keys
