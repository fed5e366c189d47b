-- ehrsync schema, version 8: which agent owns each account.
-- Migrations are append-only: a landed file is never edited (sqlx checks its checksum).

-- Ownership leases: the `ehrsync run` agent (its lease holder name) that refreshes the
-- account's tokens and runs its jobs, until `expires_at` (Unix seconds) unless it renews.
-- Agents sharing the database divide the accounts between them by taking these (see
-- `agent::share`); the others follow the tokens the owner stores. `generation` grows with
-- every new holder. Same columns as `token_leases`.
CREATE TABLE account_owners (
    account     TEXT    NOT NULL PRIMARY KEY,
    holder      TEXT    NOT NULL,
    expires_at  INTEGER NOT NULL,
    generation  INTEGER NOT NULL DEFAULT 0,
    host        TEXT    NOT NULL DEFAULT '',
    pid         INTEGER NOT NULL DEFAULT 0,
    pid_started INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX account_owners_by_holder ON account_owners (holder);
