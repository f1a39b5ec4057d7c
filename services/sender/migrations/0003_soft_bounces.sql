-- Soft bounces reported after the hand-off are retried a bounded number of times.
ALTER TABLE deliveries ADD COLUMN soft_bounces integer NOT NULL DEFAULT 0;
