-- What a delivery went through, shown by /deliveries: how a server's rejection reads
-- (RFC 3463 enhanced status code; hard, soft or policy: only hard suppresses), the
-- last transient failure (kept after a later success), and the wall-clock moment of
-- the hand-off (the point of no return, which the global rate is counted against).
ALTER TABLE deliveries
    ADD COLUMN enhanced_status text,
    ADD COLUMN bounce_type     text CHECK (bounce_type IN ('hard', 'soft', 'policy')),
    ADD COLUMN last_error      text,
    ADD COLUMN handed_off_at   timestamptz;

-- An enrollment stopped by nurture cancels what it still has queued here.
CREATE INDEX deliveries_enrollment ON deliveries (enrollment_id);
