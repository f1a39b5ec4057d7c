-- The full step model: stable step keys, engagement facts for conditions, sent
-- emails per step, send windows, a local view of leads, outbound notifications.

ALTER TABLE steps ADD COLUMN key text;
UPDATE steps SET key = 's' || (position + 1);
ALTER TABLE steps ALTER COLUMN key SET NOT NULL;
ALTER TABLE steps ADD CONSTRAINT steps_key_unique UNIQUE (sequence_version_id, key);

ALTER TABLE sequence_versions ADD COLUMN frozen boolean NOT NULL DEFAULT false;
UPDATE sequence_versions SET frozen = true;

ALTER TABLE enrollments
    ADD COLUMN due_since      timestamptz,
    ADD COLUMN waiting_on     text,
    ADD COLUMN thread_subject text,
    ADD COLUMN paused_until   timestamptz,
    ADD COLUMN company_domain text;
CREATE INDEX enrollments_company ON enrollments (tenant_id, company_domain)
    WHERE status IN ('active', 'awaiting_send', 'paused');
CREATE INDEX enrollments_paused_until ON enrollments (paused_until) WHERE status = 'paused';

ALTER TABLE engagements ADD COLUMN step_id uuid;

-- Emails an enrollment has sent, per step: what conditions measure time from.
CREATE TABLE enrollment_emails (
    delivery_key  text PRIMARY KEY,
    enrollment_id uuid        NOT NULL,
    step_id       uuid        NOT NULL,
    variant       text,
    message_id    text,
    sent_at       timestamptz NOT NULL,
    uncertain     boolean     NOT NULL DEFAULT false
);
CREATE INDEX enrollment_emails_enrollment ON enrollment_emails (enrollment_id);

-- The leads nurture has heard of (from LeadRouted), so they can be enrolled by id or
-- email, and their suppression (from engagement).
CREATE TABLE leads (
    tenant_id         text        NOT NULL,
    lead_id           uuid        NOT NULL,
    email             text        NOT NULL,
    snapshot          jsonb       NOT NULL,
    suppressed_reason text,
    updated_at        timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, lead_id)
);
CREATE INDEX leads_email ON leads (tenant_id, email);

-- Signed outbound webhooks from `notify` actions, delivered with retries.
CREATE TABLE notifications (
    id              uuid PRIMARY KEY,
    tenant_id       text        NOT NULL,
    enrollment_id   uuid        NOT NULL,
    url             text        NOT NULL,
    payload         jsonb       NOT NULL,
    status          text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_error      text,
    response_status integer,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    delivered_at    timestamptz
);
CREATE INDEX notifications_pending ON notifications (next_attempt_at) WHERE status = 'pending';
