-- Fails a cached-path batch (runtime/ledger/src/cache.rs) whose guard found a row changed since
-- the writer last committed it. SQLSTATE SG001 tells the ledger to run the batch again on the
-- locked-load path; the statement, and so every effect of the batch, is rolled back.
CREATE FUNCTION spendguard_require_fresh(fresh boolean) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF fresh IS NOT TRUE THEN
        RAISE EXCEPTION 'cached batch is stale' USING ERRCODE = 'SG001';
    END IF;
    RETURN true;
END $$;
