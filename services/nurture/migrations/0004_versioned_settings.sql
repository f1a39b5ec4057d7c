-- Sequence settings (send window, company_stop, tracking) belong to a version, like
-- its steps: editing a running sequence's settings makes a new version, and every
-- enrollment keeps the settings of the version it runs on. The settings of a
-- sequence are those of its current version.
ALTER TABLE sequence_versions ADD COLUMN settings jsonb NOT NULL DEFAULT '{}';
UPDATE sequence_versions v SET settings = s.settings FROM sequences s WHERE s.id = v.sequence_id;
ALTER TABLE sequences DROP COLUMN settings;
