DROP TRIGGER fencing_scopes_change_recorded ON fencing_scopes;
DROP FUNCTION fencing_scopes_change_recorded();
DROP INDEX fencing_scope_events_by_scope;
