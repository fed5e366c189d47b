-- ehrsync schema, version 6: the pulled data as a true mirror. Deleted records, a change log,
-- a maintained patients table, and the bookkeeping of materialised SQL-on-FHIR views.
-- Migrations are append-only: a landed file is never edited (sqlx checks its checksum).

-- When a completed sweep no longer found the record at the vendor (Unix seconds); NULL while it
-- is live. A deleted record that comes back is live again.
ALTER TABLE resources ADD COLUMN deleted_at INTEGER;
-- SHA-256 of `data`, to tell a changed record from one read again unchanged. NULL for records
-- stored before version 6 (their `data` is compared instead, once).
ALTER TABLE resources ADD COLUMN content_hash BLOB;
-- The run whose pages (or id sweep) last saw the record: a completed sweep marks deleted what
-- it did not see.
ALTER TABLE resources ADD COLUMN seen_run INTEGER;

-- Every change a run made to `resources`, written in the transaction of the page (or the
-- reconcile) that made it. `seq` only grows, also across pruning (AUTOINCREMENT), so a reader
-- can resume from the last `seq` it saw.
CREATE TABLE changes (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    account       TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    kind          TEXT    NOT NULL CHECK (kind IN ('created', 'updated', 'deleted')),
    version_id    TEXT,
    last_updated  TEXT,
    run_id        INTEGER,
    at            INTEGER NOT NULL
) STRICT;
-- No secondary index: rows are only appended (by `seq`), read from a `seq` onwards, and
-- pruned from the oldest; an index would cost every page of every pull.

-- Live patients from every source, flattened, maintained with `resources` in each page's
-- transaction (ehrsync computes the columns; version 2's view re-parsed every record on every
-- query). FHIR Patients: the name with use = 'official', else the first; `given` joins the given
-- names with spaces. NikoHealth's list: firstName/middleName, lastName, the date part of
-- dateOfBirth, gender lower-cased.
CREATE TABLE patient_rows (
    account       TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    family        TEXT,
    given         TEXT,
    birth_date    TEXT,
    gender        TEXT,
    last_updated  TEXT,
    PRIMARY KEY (account, resource_type, id)
) STRICT, WITHOUT ROWID;

-- Name lookups, case-insensitive (`WHERE family = 'smith' COLLATE NOCASE`). One index only:
-- names arrive in random order, so each page's transaction rewrites most of the index's pages
-- (docs/performance.md has what it costs).
CREATE INDEX patient_rows_by_name ON patient_rows (family COLLATE NOCASE, given COLLATE NOCASE);

INSERT INTO patient_rows (account, resource_type, id, family, given, birth_date, gender, last_updated)
SELECT
    p.account,
    'Patient',
    p.id,
    json_extract(p.name, '$.family'),
    (SELECT group_concat(g.value, ' ') FROM json_each(p.name, '$.given') AS g),
    json_extract(p.data, '$.birthDate'),
    json_extract(p.data, '$.gender'),
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
) AS p
UNION ALL
SELECT
    r.account,
    r.resource_type,
    r.id,
    json_extract(r.data, '$.lastName'),
    nullif(trim(coalesce(json_extract(r.data, '$.firstName'), '') || ' ' ||
                coalesce(json_extract(r.data, '$.middleName'), '')), ''),
    substr(json_extract(r.data, '$.dateOfBirth'), 1, 10),
    lower(json_extract(r.data, '$.gender')),
    r.last_updated
FROM resources AS r
WHERE r.resource_type = 'NikoHealthPatient';

DROP VIEW patients;
-- The contract's view: live patients of every source.
CREATE VIEW patients AS
SELECT account, id, family, given, birth_date, gender, last_updated FROM patient_rows;

-- The SQL-on-FHIR views ehrsync maintains as `view_{name}` tables: which definition built each
-- (a changed definition is rebuilt at start-up) and its columns.
CREATE TABLE materialised_views (
    name          TEXT    NOT NULL PRIMARY KEY,
    resource_type TEXT    NOT NULL,
    -- SHA-256 (hex) of the ViewDefinition's canonical JSON.
    definition    TEXT    NOT NULL,
    built_at      INTEGER NOT NULL
) STRICT;
