-- A bounce can arrive before the EmailSent of the message it reports is registered
-- (a fast DSN, or the tracker catching up): it is parked like a reply and applied
-- when the message is registered, or expires into `unattributed` with its kind.
ALTER TABLE parked_replies ADD COLUMN kind text NOT NULL DEFAULT 'reply'
    CHECK (kind IN ('reply', 'bounce'));
