-- The per-minute scale-up limit counts a pool's instances asked for in the last minute
-- (deleted ones included).
CREATE INDEX instances_pool_requested ON instances (pool_id, requested_at);
