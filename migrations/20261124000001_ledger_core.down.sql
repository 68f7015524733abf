DROP TABLE IF EXISTS audit_outbox, audit_producers, fencing_scope_events, fencing_scopes,
    ledger_entries, reservations, budget_windows, budgets, tenants CASCADE;
DROP FUNCTION IF EXISTS append_only, reservations_tenant_exists, audit_outbox_sequence_allocated, fencing_scopes_epoch_monotonic,
    budget_windows_money_via_journal, ledger_entries_apply, reservations_resolve_once;
