-- ehrsync schema, version 2: scheduled pulls.

-- Who is running a job right now. `ehrsync run` and `ehrsync sync` may share this database; a run
-- starts only for the holder of the job's lease, so a job never overlaps itself across processes
-- either. The holder renews it while the run lasts; a crashed holder's lease simply expires.
CREATE TABLE job_leases (
    account    TEXT    NOT NULL,
    job        TEXT    NOT NULL,
    holder     TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (account, job)
) STRICT;

-- Incremental FHIR runs look records up by their lastUpdated.
CREATE INDEX resources_by_update ON resources (account, resource_type, last_updated);

-- Patients from every source, flattened. FHIR Patients as in version 1: the name with
-- use = 'official', else the first; `given` joins the given names with spaces. NikoHealth's
-- patient list (resource_type 'NikoHealthPatient') maps firstName/middleName, lastName,
-- dateOfBirth (date part) and gender (lower-cased, as FHIR writes it).
DROP VIEW patients;
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
) AS p
UNION ALL
SELECT
    r.account,
    r.id,
    json_extract(r.data, '$.lastName') AS family,
    nullif(trim(coalesce(json_extract(r.data, '$.firstName'), '') || ' ' ||
                coalesce(json_extract(r.data, '$.middleName'), '')), '') AS given,
    substr(json_extract(r.data, '$.dateOfBirth'), 1, 10) AS birth_date,
    lower(json_extract(r.data, '$.gender')) AS gender,
    r.last_updated
FROM resources AS r
WHERE r.resource_type = 'NikoHealthPatient';
