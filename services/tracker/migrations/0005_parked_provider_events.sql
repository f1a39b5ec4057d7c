-- A provider's event (delivered, open, bounce, ...) can arrive before the EmailSent of
-- its message is registered: it names our delivery key, Message-ID or the provider's
-- id, so it waits here and is applied when the message is registered, or expires into
-- `unattributed`.
CREATE TABLE parked_events (
    id                  bigserial PRIMARY KEY,
    delivery_key        text,
    message_id          text,
    provider_message_id text,
    received_at         timestamptz NOT NULL,
    event               jsonb       NOT NULL
);
CREATE INDEX parked_events_delivery_key ON parked_events (delivery_key)
    WHERE delivery_key IS NOT NULL;
CREATE INDEX parked_events_message_id ON parked_events (message_id) WHERE message_id IS NOT NULL;
CREATE INDEX parked_events_provider_id ON parked_events (provider_message_id)
    WHERE provider_message_id IS NOT NULL;
CREATE INDEX parked_events_received ON parked_events (received_at);
