-- The reservations a batch resolves (a data-modifying CTE; see effects_journal.sql).
resolutions AS (
    UPDATE reservations r
       SET state = u.state, resolved_at = $2, resolved_epoch = u.epoch, actual_nano_usd = u.actual,
           committed_nano_usd = u.committed, released_nano_usd = u.released, overrun_nano_usd = u.overrun
      FROM unnest($3::uuid[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[])
           AS u(id, state, epoch, actual, committed, released, overrun)
     WHERE r.reservation_id = u.id
       AND r.reservation_id = ANY($3) -- lets the planner probe the primary key instead of scanning
       -- With no resolution, a custom plan (the load path's) reads `ANY('{}')` as false, and a
       -- false condition lets it pick any index, such as the partial one of every open
       -- reservation, and read it whole; this folds to false first, so nothing is read.
       AND cardinality($3::uuid[]) > 0
    RETURNING 1
)
