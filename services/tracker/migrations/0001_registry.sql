-- Every message the sender handed off, by Message-ID: what engagement is attributed to.
CREATE TABLE messages (
    message_id       text PRIMARY KEY,
    delivery_key     text        NOT NULL UNIQUE,
    tenant_id        text        NOT NULL,
    lead_id          uuid        NOT NULL,
    enrollment_id    uuid        NOT NULL,
    sequence_id      uuid        NOT NULL,
    sequence_key     text        NOT NULL,
    sequence_version integer     NOT NULL,
    step_id          uuid        NOT NULL,
    step_index       integer     NOT NULL,
    variant          text,
    to_email         text        NOT NULL,
    from_email       text        NOT NULL,
    subject          text        NOT NULL,
    links            jsonb       NOT NULL DEFAULT '[]',
    sent_at          timestamptz NOT NULL,
    uncertain        boolean     NOT NULL DEFAULT false
);
CREATE INDEX messages_recipient ON messages (tenant_id, to_email, sent_at DESC);

CREATE TABLE engagement_events (
    event_id     uuid PRIMARY KEY,
    dedupe_key   text        NOT NULL UNIQUE,
    tenant_id    text        NOT NULL,
    message_id   text        NOT NULL REFERENCES messages (message_id),
    lead_id      uuid        NOT NULL,
    type         text        NOT NULL,
    source       text        NOT NULL,
    machine      boolean     NOT NULL DEFAULT false,
    occurred_at  timestamptz NOT NULL,
    detail       jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX engagement_events_message ON engagement_events (message_id, type);

-- Replies that arrived before the message they answer was registered.
CREATE TABLE parked_replies (
    reply_key    text PRIMARY KEY,
    referenced   text[]      NOT NULL,
    from_email   text,
    subject      text,
    received_at  timestamptz NOT NULL,
    body         text        NOT NULL
);
CREATE INDEX parked_replies_referenced ON parked_replies USING gin (referenced);
