-- A VM's pool is fixed by its first proven identity: enrollment binds the VM id to the pool
-- it proved membership of, before the VM's first contact creates its `vms` row. Only an
-- operator's move changes it (updating the binding and the row together).
CREATE TABLE vm_bindings (
    vm_id    TEXT PRIMARY KEY NOT NULL,
    pool_id  TEXT NOT NULL,
    bound_at INTEGER NOT NULL,
    proof    TEXT NOT NULL
);
-- VMs known before this migration are bound to the pool they are stored in.
INSERT INTO vm_bindings (vm_id, pool_id, bound_at, proof)
    SELECT vm_id, pool_id, created_at, 'existing' FROM vms;

-- One-time enrollment tokens, each for one VM id and pool; only a SHA-256 of the secret is
-- kept. `used_at` is set by the one exchange a token allows.
CREATE TABLE enrollment_tokens (
    id          TEXT PRIMARY KEY NOT NULL,
    vm_id       TEXT NOT NULL,
    pool_id     TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER
);
CREATE INDEX enrollment_tokens_exp ON enrollment_tokens (expires_at);
