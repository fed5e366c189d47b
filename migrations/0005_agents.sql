-- ehrsync schema, version 5: agents that say they are alive, and the credentials a stored
-- state was reached with.
-- Migrations are append-only: a landed file is never edited (sqlx checks its checksum).

-- One row per running `ehrsync run`: written at start, its heartbeat renewed every 15 s,
-- removed on a clean stop. `status` tells from it whether an agent is running (a heartbeat
-- within 45 s, and on this host a process that still exists). Several agents sharing one
-- database each have a row.
CREATE TABLE agents (
    -- The process's lease holder name, "{pid}-{random}".
    id           TEXT    NOT NULL PRIMARY KEY,
    -- The host name, for people.
    host         TEXT    NOT NULL,
    -- Host name, boot and PID namespace: where `pid` means this process (see the leases).
    host_key     TEXT    NOT NULL,
    pid          INTEGER NOT NULL,
    pid_started  INTEGER NOT NULL,
    version      TEXT    NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL
) STRICT;

-- A keyed fingerprint (HMAC-SHA256 under a key derived from the token key, never the
-- credentials themselves) of the account's credentials when the state was stored: an account
-- parked in `needs_login` whose credentials changed since (a fixed secret) tries once at once.
ALTER TABLE token_state ADD COLUMN credentials TEXT;
