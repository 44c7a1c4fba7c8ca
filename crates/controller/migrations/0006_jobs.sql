-- Jobs GitHub has told us of (`workflow_job` webhooks, or the backstop poll): what the
-- scaler sizes pools by. `status` only moves forward (queued/waiting -> in_progress ->
-- completed); `pool_id` is the pool whose labels the job's `runs-on` labels match (NULL: no
-- pool of ours can run it). Times are Unix ms.
CREATE TABLE jobs (
    job_id        INTEGER PRIMARY KEY NOT NULL,
    run_id        INTEGER NOT NULL,
    run_attempt   INTEGER NOT NULL,
    repository    TEXT NOT NULL,
    name          TEXT NOT NULL,
    workflow_name TEXT,
    labels        TEXT NOT NULL,
    status        TEXT NOT NULL,
    conclusion    TEXT,
    pool_id       TEXT,
    runner_name   TEXT,
    vm_id         TEXT,
    queued_at     INTEGER NOT NULL,
    started_at    INTEGER,
    completed_at  INTEGER,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX jobs_pool_status ON jobs (pool_id, status);
CREATE INDEX jobs_updated ON jobs (updated_at);

-- Webhook deliveries already applied (`X-GitHub-Delivery`), so a redelivery changes nothing.
CREATE TABLE webhook_deliveries (
    delivery_id TEXT PRIMARY KEY NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE INDEX webhook_deliveries_received ON webhook_deliveries (received_at);
