CREATE TABLE deliveries (
    delivery_key        text PRIMARY KEY,
    tenant_id           text        NOT NULL,
    lead_id             uuid        NOT NULL,
    enrollment_id       uuid        NOT NULL,
    sequence_id         uuid        NOT NULL,
    sequence_key        text        NOT NULL,
    sequence_version    integer     NOT NULL,
    step_id             uuid        NOT NULL,
    step_index          integer     NOT NULL,
    variant             text,
    thread_delivery_key text,
    to_email            text        NOT NULL,
    to_name             text,
    subject             text        NOT NULL,
    body_text           text        NOT NULL,
    body_html           text,
    tracking            boolean     NOT NULL DEFAULT true,
    from_email          text,
    from_name           text,
    message_id          text,
    links               jsonb       NOT NULL DEFAULT '[]',
    status              text        NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'deferred', 'claimed', 'sending', 'sent', 'failed',
                          'uncertain', 'suppressed', 'cancelled')),
    status_reason       text,
    attempts            integer     NOT NULL DEFAULT 0,
    -- Product time at which the delivery may be attempted (caps, throttles, retries).
    next_attempt_at     timestamptz NOT NULL,
    -- Wall time until which the claiming sender owns the row.
    lease_until         timestamptz,
    claimed_by          text,
    smtp_code           integer,
    smtp_response       text,
    due_at              timestamptz NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    sent_at             timestamptz
);
CREATE INDEX deliveries_ready ON deliveries (next_attempt_at)
    WHERE status IN ('queued', 'deferred');
CREATE INDEX deliveries_leased ON deliveries (lease_until)
    WHERE status IN ('claimed', 'sending');
CREATE INDEX deliveries_lead ON deliveries (tenant_id, lead_id);

CREATE TABLE suppressions (
    tenant_id  text        NOT NULL,
    email      text        NOT NULL,
    reason     text        NOT NULL,
    source     text        NOT NULL,
    event_id   uuid,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, email)
);
