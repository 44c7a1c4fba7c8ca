-- Times are Unix milliseconds (INTEGER). JSON columns hold serde_json text.

CREATE TABLE vms (
    vm_id                   TEXT PRIMARY KEY NOT NULL,
    pool_id                 TEXT NOT NULL,
    org_id                  TEXT NOT NULL DEFAULT '',
    boot_id                 TEXT NOT NULL,
    boot_seq                INTEGER NOT NULL,
    booted_at               INTEGER NOT NULL,
    state                   TEXT NOT NULL,
    health                  TEXT NOT NULL,
    connected               INTEGER NOT NULL DEFAULT 0,
    last_seen_at            INTEGER NOT NULL,
    last_heartbeat_at       INTEGER,
    runner_state            TEXT,
    current_job             TEXT,
    latest_health           TEXT,
    registration_command_id TEXT,
    runner_registered       INTEGER NOT NULL DEFAULT 0,
    acks_commands           INTEGER NOT NULL DEFAULT 0,
    agent_version           TEXT,
    created_at              INTEGER NOT NULL,
    updated_at              INTEGER NOT NULL
);
CREATE INDEX vms_pool_state ON vms (pool_id, state);
CREATE INDEX vms_health_seen ON vms (health, last_seen_at);

CREATE TABLE events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id       TEXT NOT NULL,
    event_id    TEXT,
    event_type  TEXT NOT NULL,
    boot_id     TEXT,
    transport   TEXT NOT NULL,
    occurred_at INTEGER,
    received_at INTEGER NOT NULL,
    data        TEXT NOT NULL,
    raw         TEXT NOT NULL
);
CREATE UNIQUE INDEX events_dedupe ON events (vm_id, event_id) WHERE event_id IS NOT NULL;
CREATE INDEX events_vm ON events (vm_id, seq);
CREATE INDEX events_type_time ON events (event_type, received_at);

CREATE TABLE heartbeats (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id              TEXT NOT NULL,
    transport          TEXT NOT NULL,
    occurred_at        INTEGER,
    received_at        INTEGER NOT NULL,
    miglet_state       TEXT,
    runner_state       TEXT,
    cpu_percent        REAL,
    memory_used_bytes  INTEGER,
    memory_total_bytes INTEGER,
    disk_used_bytes    INTEGER,
    disk_total_bytes   INTEGER,
    report             TEXT NOT NULL
);
CREATE INDEX heartbeats_vm ON heartbeats (vm_id, seq);

-- Registration config requests and answers; the token is always redacted.
CREATE TABLE registrations (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id        TEXT NOT NULL,
    requested_at INTEGER NOT NULL,
    request      TEXT NOT NULL,
    response     TEXT NOT NULL
);
CREATE INDEX registrations_vm ON registrations (vm_id, seq);

-- Parameters are stored redacted: secrets are filled in at delivery time.
CREATE TABLE commands (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT NOT NULL UNIQUE,
    vm_id          TEXT NOT NULL,
    boot_id        TEXT,
    command_type   TEXT NOT NULL,
    parameters     TEXT NOT NULL,
    state          TEXT NOT NULL,
    source         TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER,
    delivered_at   INTEGER,
    delivered_via  TEXT,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    finished_at    INTEGER,
    result_message TEXT,
    result         TEXT
);
CREATE INDEX commands_vm_open ON commands (vm_id, state, seq);
CREATE INDEX commands_state_expiry ON commands (state, expires_at);

CREATE TABLE command_transitions (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    command_id TEXT NOT NULL,
    at         INTEGER NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    detail     TEXT
);
CREATE INDEX command_transitions_cmd ON command_transitions (command_id, seq);

-- What the controller itself observed about a VM: boots, stream connects and disconnects,
-- health changes.
CREATE TABLE vm_log (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id  TEXT NOT NULL,
    at     INTEGER NOT NULL,
    kind   TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX vm_log_vm ON vm_log (vm_id, seq);
