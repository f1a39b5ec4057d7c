-- The router keeps a catalog of nurture's sequences from SequenceChanged events
-- (topic `sequences`) and refuses leads for sequences it does not know. Announce
-- every sequence that exists already, once, so that a deployment upgraded in place
-- keeps routing to them. (gen_random_uuid() is volatile: the CTE is evaluated once
-- per row and not inlined.)
WITH announced AS (
    SELECT gen_random_uuid() AS event_id, tenant_id, key, id, status, current_version
    FROM sequences
)
INSERT INTO outbox (topic, kafka_key, payload, event_id, event_type)
SELECT 'sequences',
       convert_to(tenant_id || ':' || key, 'UTF8'),
       convert_to(json_build_object(
           'event_id', event_id,
           'event_type', 'SequenceChanged',
           'schema_version', 1,
           'occurred_at', clock_timestamp(),
           'tenant_id', tenant_id,
           'sequence_key', key,
           'sequence_id', id,
           'status', status,
           'current_version', current_version)::text, 'UTF8'),
       event_id,
       'SequenceChanged'
FROM announced
ORDER BY tenant_id, key;
