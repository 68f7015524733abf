-- Pricing snapshots a tenant's reservations may name (version and sha256 of the canonical
-- snapshot). The operator registers each ContractBundle's PricingVersion; ReserveSet refuses any
-- other (PRICING_UNKNOWN). Registrations are immutable: a version keeps its hash forever.
CREATE TABLE pricing_registrations (
    tenant_id      text NOT NULL REFERENCES tenants (tenant_id),
    version        text NOT NULL CHECK (length(version) BETWEEN 1 AND 256),
    sha256_hex     text NOT NULL CHECK (sha256_hex ~ '^[0-9a-f]{64}$'),
    registered_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, version)
);

CREATE FUNCTION pricing_registrations_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pricing registrations are immutable' USING ERRCODE = 'integrity_constraint_violation';
END $$;

CREATE TRIGGER pricing_registrations_immutable BEFORE UPDATE OR DELETE ON pricing_registrations
    FOR EACH ROW EXECUTE FUNCTION pricing_registrations_immutable();
