-- Tenants (issue 20): every request, result, batch, feed and rejected line belongs to one survey
-- team, and a key sees only its own tenant's rows (an admin's, every tenant's). Rows written
-- before tenants belong to the default tenant (a constant default: no table is rewritten).
ALTER TABLE requests ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE results ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE batches ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE feeds ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE feed_rejects ADD COLUMN tenant text NOT NULL DEFAULT 'default';

-- A tenant's GET /v1/results pages through its own results in completion order.
CREATE INDEX results_tenant_completed ON results (tenant, completed_at, request_id);

-- A feed's Idempotency-Key is now scoped to its tenant: key_scope holds the tenant's name for feeds
-- created from now on (before, a hash of the API key that sent it).
