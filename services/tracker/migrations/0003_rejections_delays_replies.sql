-- Synchronous rejections: the server refused a delivery outright (EmailFailed, permanent).
-- One per delivery key; counted as a bounce of its step. Only a hard one is emitted as
-- engagement (the lead is invalid); soft and policy rejections are kept here.
CREATE TABLE rejections (
    delivery_key    text PRIMARY KEY,
    event_id        uuid        NOT NULL,
    tenant_id       text        NOT NULL,
    lead_id         uuid        NOT NULL,
    enrollment_id   uuid        NOT NULL,
    sequence_id     uuid        NOT NULL,
    step_id         uuid        NOT NULL,
    step_index      integer     NOT NULL,
    to_email        text        NOT NULL,
    -- hard / soft / policy; NULL when the rejection named no status to classify it by.
    bounce_type     text CHECK (bounce_type IN ('hard', 'soft', 'policy')),
    enhanced_status text,
    smtp_code       integer,
    reason          text        NOT NULL,
    occurred_at     timestamptz NOT NULL
);
CREATE INDEX rejections_sequence ON rejections (tenant_id, sequence_id, step_id);

-- Replies (and provider events) matched by the address they came from, whatever the tenant.
CREATE INDEX messages_to_email ON messages (to_email, sent_at DESC);

-- Parked replies that no message ever claims expire into `unattributed`.
CREATE INDEX parked_replies_received ON parked_replies (received_at);
