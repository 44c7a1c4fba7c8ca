-- Authentication: operator API tokens (only a SHA-256 of the secret is kept), the audit log
-- of admin actions, identity tokens already exchanged (replay refusal), and when a VM's
-- current boot first reported a job (its registration token is never handed out again).

ALTER TABLE vms ADD COLUMN job_started_at INTEGER;

CREATE TABLE operator_tokens (
    id           TEXT PRIMARY KEY NOT NULL,
    name         TEXT NOT NULL,
    role         TEXT NOT NULL,
    secret_hash  TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    created_by   TEXT NOT NULL,
    expires_at   INTEGER,
    revoked_at   INTEGER
);

CREATE TABLE audit_log (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT,
    remote_addr TEXT,
    outcome     TEXT NOT NULL,
    detail      TEXT
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_actor ON audit_log (actor, seq);

CREATE TABLE identity_tokens_used (
    token_hash TEXT PRIMARY KEY NOT NULL,
    vm_id      TEXT NOT NULL,
    used_at    INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX identity_tokens_used_exp ON identity_tokens_used (expires_at);
