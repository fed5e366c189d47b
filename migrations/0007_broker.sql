-- ehrsync schema, version 7: the token broker's clients as `ehrsync status` shows them.
-- Migrations are append-only: a landed file is never edited (sqlx checks its checksum).

-- One row per broker client that has used the broker (by its name in [broker.clients.NAME]).
-- The running agent adds its counts every 15 s and at stop; nothing here is a secret.
CREATE TABLE broker_clients (
    name          TEXT    NOT NULL PRIMARY KEY,
    -- Unix seconds of the client's last request that presented its key.
    last_used_at  INTEGER,
    -- The account of that request (NULL for a health check).
    last_account  TEXT,
    -- Requests answered since the row was created, and how many of them were refused.
    requests      INTEGER NOT NULL DEFAULT 0,
    refused       INTEGER NOT NULL DEFAULT 0
) STRICT;
