-- The routing rule that fired for a lead (NULL: requested by the event, the default
-- sequence, or not routed). Not a foreign key: it records history, and a rule may
-- be deleted or replaced later; routing_reason keeps the rule's name.
ALTER TABLE leads ADD COLUMN routing_rule_id uuid;

-- Who owns the lead (set by the assign_to_user sequence action).
ALTER TABLE leads ADD COLUMN assigned_to text;

-- Tenants whose rules have been set up (seeded or edited over the API). Default
-- rules are seeded only for a tenant that is not here, so a tenant that removed
-- every rule on purpose keeps an empty list across restarts.
CREATE TABLE routing_rule_tenants (
    tenant_id     text PRIMARY KEY,
    configured_at timestamptz NOT NULL
);
INSERT INTO routing_rule_tenants (tenant_id, configured_at)
    SELECT tenant_id, min(created_at) FROM routing_rules GROUP BY tenant_id;
