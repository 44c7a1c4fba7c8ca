-- The pool view's queue times (jobs of a pool that started in the last hour) and the backstop
-- poll's repositories (a pool's jobs updated in the last week) read a pool's jobs by time.
CREATE INDEX jobs_pool_started ON jobs (pool_id, started_at);
CREATE INDEX jobs_pool_updated ON jobs (pool_id, updated_at);
-- Retention drops deleted instances by when they were deleted.
CREATE INDEX instances_deleted_at ON instances (deleted_at) WHERE state = 'deleted';
