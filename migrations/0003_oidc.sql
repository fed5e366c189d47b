-- ehrsync schema, version 3: the OpenID providers' discovery documents, cached.
-- Migrations are append-only: a landed file is never edited (sqlx checks its checksum).

-- One row per issuer: its `/.well-known/openid-configuration` as last fetched. Public metadata
-- (endpoints, supported methods), kept so that a restart while the provider's discovery is down
-- still knows where to refresh, and so a changed document can be noticed and logged.
CREATE TABLE oidc_providers (
    issuer     TEXT    NOT NULL PRIMARY KEY,
    document   TEXT    NOT NULL,
    fetched_at INTEGER NOT NULL
) STRICT;
