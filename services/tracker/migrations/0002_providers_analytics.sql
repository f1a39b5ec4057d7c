-- Provider webhooks, attribution by provider id, machine flags, analytics.

ALTER TABLE messages
    ADD COLUMN provider_message_id text,
    ADD COLUMN transport           text,
    ADD COLUMN dry_run             boolean NOT NULL DEFAULT false;
CREATE INDEX messages_provider_id ON messages (provider_message_id)
    WHERE provider_message_id IS NOT NULL;
CREATE INDEX messages_sequence ON messages (tenant_id, sequence_id, step_index);

ALTER TABLE engagement_events
    ADD COLUMN provider          text,
    ADD COLUMN provider_event_id text;
CREATE INDEX engagement_events_time ON engagement_events (tenant_id, occurred_at);

-- Mailgun webhook tokens already seen: a replayed token is refused on any replica.
CREATE TABLE webhook_tokens (
    provider text        NOT NULL,
    token    text        NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (provider, token)
);

-- Inbound mail and provider events that could not be attributed to a message.
CREATE TABLE unattributed (
    id          bigserial PRIMARY KEY,
    provider    text        NOT NULL,
    kind        text        NOT NULL,
    email       text,
    received_at timestamptz NOT NULL,
    detail      jsonb       NOT NULL DEFAULT '{}'
);
