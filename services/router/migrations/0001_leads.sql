CREATE TABLE leads (
    id             uuid PRIMARY KEY,
    tenant_id      text        NOT NULL,
    email          text        NOT NULL,
    external_id    text,
    first_name     text,
    last_name      text,
    company        text,
    title          text,
    timezone       text,
    country        text,
    grade          text,
    score          double precision,
    source         text,
    tags           text[]      NOT NULL DEFAULT '{}',
    custom_fields  jsonb       NOT NULL DEFAULT '{}',
    status         text        NOT NULL DEFAULT 'new'
        CHECK (status IN ('new', 'contacted', 'qualified', 'lost', 'invalid')),
    sequence       text,
    routing_reason text,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    UNIQUE (tenant_id, email)
);
CREATE UNIQUE INDEX leads_external_id ON leads (tenant_id, external_id)
    WHERE external_id IS NOT NULL;

CREATE TABLE lead_status_history (
    id          bigserial PRIMARY KEY,
    tenant_id   text        NOT NULL,
    lead_id     uuid        NOT NULL REFERENCES leads (id) ON DELETE CASCADE,
    from_status text,
    to_status   text        NOT NULL,
    reason      text        NOT NULL,
    changed_by  text        NOT NULL,
    event_id    uuid,
    changed_at  timestamptz NOT NULL
);
CREATE INDEX lead_status_history_lead ON lead_status_history (lead_id, id);

-- Routing rules as data: first match (lowest position) wins.
CREATE TABLE routing_rules (
    id         uuid PRIMARY KEY,
    tenant_id  text        NOT NULL,
    position   integer     NOT NULL,
    name       text        NOT NULL,
    match      jsonb       NOT NULL DEFAULT '{}',
    sequence   text        NOT NULL,
    enabled    boolean     NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, position)
);
