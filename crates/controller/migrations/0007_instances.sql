-- Instances the scaler asked a provider for (written before it asks, so a restart never
-- creates a name twice and never forgets one), or adopted from the provider's list.
-- `state`: requested -> running -> deleting -> deleted. A drain the scaler sent is kept
-- with its reason until the instance is deleted. Times are Unix ms.
CREATE TABLE instances (
    name             TEXT PRIMARY KEY NOT NULL,
    pool_id          TEXT NOT NULL,
    provider         TEXT NOT NULL,
    state            TEXT NOT NULL,
    requested_at     INTEGER NOT NULL,
    provider_id      TEXT,
    drain_command_id TEXT,
    drain_reason     TEXT,
    delete_reason    TEXT,
    deleted_at       INTEGER,
    updated_at       INTEGER NOT NULL
);
CREATE INDEX instances_pool_state ON instances (pool_id, state);
