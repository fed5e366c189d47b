-- ehrsync schema on PostgreSQL, version 8: which agent owns each account (as
-- migrations/0008_owners.sql).
-- Migrations are append-only: a landed file is never edited (sqlx checks its checksum).

CREATE TABLE account_owners (
    account     TEXT   NOT NULL PRIMARY KEY,
    holder      TEXT   NOT NULL,
    expires_at  BIGINT NOT NULL,
    generation  BIGINT NOT NULL DEFAULT 0,
    host        TEXT   NOT NULL DEFAULT '',
    pid         BIGINT NOT NULL DEFAULT 0,
    pid_started BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX account_owners_by_holder ON account_owners (holder);
