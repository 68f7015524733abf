-- The credits a cached batch draws from (a data-modifying CTE; see effects_journal.sql): each
-- one's drawn total rises by what the batch drew ($54). It must still hold the total the plan
-- read ($55), since another replica may have drawn from it; the final check fails the
-- statement unless every credit was found so. The rise is relative, so even a wrong expectation
-- could not write a total below what is drawn: the `drawn <= amount` check stays exact.
-- That it is still open is the guard's check (fast_guard.sql: it locks every reservation the
-- plan read, and the final check counts them open before it reads this CTE). A condition on
-- `state` here would let the session's generic plan read every open reservation through
-- `reservations_open_by_expiry` instead of probing the primary key.
credit_draws AS (
    UPDATE reservations r SET drawn_nano_usd = r.drawn_nano_usd + u.delta
      FROM unnest($53::uuid[], $54::bigint[], $55::bigint[]) AS u(id, delta, drawn_before)
     WHERE r.reservation_id = u.id
       AND r.reservation_id = ANY($53) -- lets the planner probe the primary key instead of scanning
       AND r.is_credit AND r.drawn_nano_usd = u.drawn_before
    RETURNING 1
)
