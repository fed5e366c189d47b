-- ehrsync schema, version 9: `resources` keeps no index on `last_updated`.
-- Migrations are append-only: a landed file is never edited (sqlx checks its checksum).

-- Nothing ehrsync runs reads records by `last_updated` (a job's watermark is kept in
-- `sync_state`; what changed since a moment is `changes`), yet every page paid to keep this
-- index. On PostgreSQL it also misled the planner: for an account it has no statistics of
-- yet (a new account's first pull), it judged the account to hold about one record and
-- looked a page's records up by scanning all of that account's rows through this index
-- (with a filter on `id`) instead of probing the primary key, so the pull slowed as it grew.
DROP INDEX IF EXISTS resources_by_update;
