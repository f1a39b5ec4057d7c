-- Sending identities, caps that hold across replicas, dry runs.

CREATE TABLE mailboxes (
    id                 uuid PRIMARY KEY,
    tenant_id          text        NOT NULL,
    email              text        NOT NULL,
    display_name       text,
    -- Ordered transports: the first that accepts wins; a transient failure fails over.
    transports         jsonb       NOT NULL DEFAULT '[]',
    daily_cap          integer CHECK (daily_cap > 0),
    hourly_cap         integer CHECK (hourly_cap > 0),
    -- Per recipient domain, per hour (e.g. at most 20 an hour to gmail.com).
    domain_hourly_cap  integer CHECK (domain_hourly_cap > 0),
    dkim_domain        text,
    dkim_selector      text,
    dkim_private_key   text,
    enabled            boolean     NOT NULL DEFAULT true,
    created_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (tenant_id, email)
);

-- A lead keeps its mailbox for the whole sequence.
CREATE TABLE enrollment_mailboxes (
    enrollment_id uuid PRIMARY KEY,
    mailbox_id    uuid        NOT NULL,
    assigned_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX enrollment_mailboxes_mailbox ON enrollment_mailboxes (mailbox_id);

-- Sends per scope and window; incremented only while under the cap.
CREATE TABLE send_counters (
    scope        text        NOT NULL,
    window_start timestamptz NOT NULL,
    count        integer     NOT NULL,
    PRIMARY KEY (scope, window_start)
);

-- Dry runs: everything up to the hand-off. sequence_key '*' means the whole tenant.
CREATE TABLE dry_runs (
    tenant_id    text        NOT NULL,
    sequence_key text        NOT NULL DEFAULT '*',
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, sequence_key)
);

ALTER TABLE deliveries
    ADD COLUMN mailbox_id          uuid,
    ADD COLUMN transport           text,
    ADD COLUMN provider_message_id text,
    ADD COLUMN deferrals           integer NOT NULL DEFAULT 0,
    ADD COLUMN dry_run             boolean NOT NULL DEFAULT false;
ALTER TABLE deliveries DROP CONSTRAINT deliveries_status_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_status_check
    CHECK (status IN ('queued', 'deferred', 'claimed', 'sending', 'sent', 'failed',
                      'uncertain', 'suppressed', 'cancelled', 'dry_run'));
