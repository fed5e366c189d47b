-- ehrsync schema, version 1.
-- Times are INTEGER seconds since the Unix epoch, UTC (SQL: datetime(col, 'unixepoch')).
-- Migrations are append-only: a landed file is never edited (sqlx checks its checksum).

-- One row per account: the token lifecycle's durable state. Token columns hold AEAD
-- ciphertext (never plain text); everything else is safe to show an operator.
CREATE TABLE token_state (
    account                  TEXT    NOT NULL PRIMARY KEY,
    state                    TEXT    NOT NULL CHECK (state IN
        ('no_token', 'acquiring', 'valid', 'refreshing', 'retrying', 'expired', 'needs_login')),
    access_token             BLOB,
    access_token_issued_at   INTEGER,
    access_token_expires_at  INTEGER,
    next_refresh_at          INTEGER,
    refresh_token            BLOB,
    refresh_token_issued_at  INTEGER,
    refresh_token_expires_at INTEGER,
    -- Bumped on every new access token, so a caller that saw a 401 can tell whether the
    -- token has changed since it last read it.
    generation               INTEGER NOT NULL DEFAULT 0,
    -- Operator-facing reason for retrying/needs_login; never holds a secret.
    last_error               TEXT,
    updated_at               INTEGER NOT NULL
) STRICT;

-- Who may make token requests for an account right now. `ehrsync run`, `sync` and `login` can
-- share this database; only the holder of an unexpired lease asks the token endpoint, the others
-- re-read `token_state` (DESIGN.md §2, one request at a time across processes).
CREATE TABLE token_leases (
    account    TEXT    NOT NULL PRIMARY KEY,
    -- Unique per process run: "{pid}-{random}".
    holder     TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT;

-- Per job: where the next incremental run starts.
CREATE TABLE sync_state (
    account    TEXT    NOT NULL,
    job        TEXT    NOT NULL,
    -- Largest meta.lastUpdated of the last completed run (an instant, as text), or NULL.
    watermark  TEXT,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (account, job)
) STRICT;

-- One row per run of a job.
CREATE TABLE sync_runs (
    id          INTEGER PRIMARY KEY,
    account     TEXT    NOT NULL,
    job         TEXT    NOT NULL,
    full        INTEGER NOT NULL DEFAULT 0 CHECK (full IN (0, 1)),
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    outcome     TEXT    NOT NULL CHECK (outcome IN ('running', 'success', 'failed', 'interrupted')),
    pages       INTEGER NOT NULL DEFAULT 0,
    records     INTEGER NOT NULL DEFAULT 0,
    -- Operator-facing reason for a failed run; never holds a secret or patient data.
    error       TEXT
) STRICT;

CREATE INDEX sync_runs_by_job ON sync_runs (account, job, id);

-- Pulled records, one per (account, resource_type, id); `data` is the vendor's JSON as received.
CREATE TABLE resources (
    account       TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    version_id    TEXT,
    last_updated  TEXT,
    data          TEXT    NOT NULL,
    synced_at     INTEGER NOT NULL,
    PRIMARY KEY (account, resource_type, id)
) STRICT;

-- FHIR Patients, flattened. The name shown is the one with use = 'official', else the first;
-- `given` joins its given names with spaces.
CREATE VIEW patients AS
SELECT
    p.account,
    p.id,
    json_extract(p.name, '$.family') AS family,
    (SELECT group_concat(g.value, ' ') FROM json_each(p.name, '$.given') AS g) AS given,
    json_extract(p.data, '$.birthDate') AS birth_date,
    json_extract(p.data, '$.gender') AS gender,
    p.last_updated
FROM (
    SELECT
        r.account,
        r.id,
        r.data,
        r.last_updated,
        coalesce(
            (SELECT n.value FROM json_each(r.data, '$.name') AS n
              WHERE json_extract(n.value, '$.use') = 'official' LIMIT 1),
            json_extract(r.data, '$.name[0]')
        ) AS name
    FROM resources AS r
    WHERE r.resource_type = 'Patient'
) AS p;
