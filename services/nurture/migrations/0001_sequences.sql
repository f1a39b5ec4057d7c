CREATE TABLE sequences (
    id              uuid PRIMARY KEY,
    tenant_id       text        NOT NULL,
    key             text        NOT NULL,
    name            text        NOT NULL,
    description     text        NOT NULL DEFAULT '',
    status          text        NOT NULL DEFAULT 'draft'
        CHECK (status IN ('draft', 'active', 'paused', 'archived')),
    -- The version new enrollments join; NULL while the sequence is a draft.
    current_version integer,
    settings        jsonb       NOT NULL DEFAULT '{}',
    preset          boolean     NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, key)
);

-- A version is immutable once enrollments run on it; an edit makes a new one.
CREATE TABLE sequence_versions (
    id          uuid PRIMARY KEY,
    sequence_id uuid        NOT NULL REFERENCES sequences (id) ON DELETE CASCADE,
    version     integer     NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (sequence_id, version)
);

CREATE TABLE steps (
    id                  uuid PRIMARY KEY,
    sequence_version_id uuid    NOT NULL REFERENCES sequence_versions (id) ON DELETE CASCADE,
    position            integer NOT NULL,
    kind                text    NOT NULL CHECK (kind IN ('email', 'wait', 'condition', 'action')),
    config              jsonb   NOT NULL DEFAULT '{}',
    UNIQUE (sequence_version_id, position) DEFERRABLE INITIALLY DEFERRED
);

CREATE TABLE enrollments (
    id                  uuid PRIMARY KEY,
    tenant_id           text        NOT NULL,
    lead_id             uuid        NOT NULL,
    sequence_id         uuid        NOT NULL REFERENCES sequences (id),
    sequence_version_id uuid        NOT NULL REFERENCES sequence_versions (id),
    sequence_key        text        NOT NULL,
    version             integer     NOT NULL,
    lead                jsonb       NOT NULL,
    status              text        NOT NULL
        CHECK (status IN ('active', 'awaiting_send', 'paused', 'completed', 'stopped')),
    -- Index of the step to execute next.
    position            integer     NOT NULL DEFAULT 0,
    -- Counts executed email steps; part of each delivery key.
    cursor              integer     NOT NULL DEFAULT 0,
    next_action_at      timestamptz,
    awaiting_delivery_key text,
    thread_delivery_key text,
    steps_done          integer     NOT NULL DEFAULT 0,
    stop_reason         text,
    enrolled_at         timestamptz NOT NULL,
    last_activity_at    timestamptz NOT NULL,
    finished_at         timestamptz
);
-- One running enrollment per lead and sequence.
CREATE UNIQUE INDEX enrollments_running ON enrollments (tenant_id, lead_id, sequence_id)
    WHERE status IN ('active', 'awaiting_send', 'paused');
-- The scheduler's claim: due rows only.
CREATE INDEX enrollments_due ON enrollments (next_action_at) WHERE status = 'active';
CREATE INDEX enrollments_lead ON enrollments (tenant_id, lead_id);
CREATE INDEX enrollments_sequence ON enrollments (sequence_id, status);

CREATE TABLE execution_log (
    id            bigserial PRIMARY KEY,
    tenant_id     text        NOT NULL,
    enrollment_id uuid        NOT NULL,
    at            timestamptz NOT NULL,
    step_index    integer,
    decision      text        NOT NULL,
    reason        text        NOT NULL,
    detail        jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX execution_log_enrollment ON execution_log (enrollment_id, id);

-- Engagement nurture keeps for conditions (if_opened, if_clicked, ...).
CREATE TABLE engagements (
    event_id      uuid PRIMARY KEY,
    tenant_id     text        NOT NULL,
    lead_id       uuid        NOT NULL,
    enrollment_id uuid,
    step_index    integer,
    type          text        NOT NULL,
    machine       boolean     NOT NULL DEFAULT false,
    occurred_at   timestamptz NOT NULL
);
CREATE INDEX engagements_enrollment ON engagements (enrollment_id, type);
