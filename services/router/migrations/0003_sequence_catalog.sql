-- The sequences nurture has, per tenant, from SequenceChanged events (topic
-- `sequences`): the router refuses leads routed to a sequence that does not exist or
-- takes no new leads, and routing rules that name an unknown sequence. A deleted
-- sequence stays as a 'deleted' row, so that an older event replayed later cannot
-- bring it back (changed_at is the occurred_at of the event applied last).
CREATE TABLE sequences (
    tenant_id       text        NOT NULL,
    key             text        NOT NULL,
    sequence_id     uuid        NOT NULL,
    status          text        NOT NULL
        CHECK (status IN ('draft', 'active', 'paused', 'archived', 'deleted')),
    current_version integer,
    changed_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, key)
);
