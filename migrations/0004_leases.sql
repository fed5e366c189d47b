-- ehrsync schema, version 4: leases that know their holder, fencing generations, and the
-- durable intent of a token request in flight.
-- Migrations are append-only: a landed file is never edited (sqlx checks its checksum).

-- A lease row now outlives its holder: releasing it empties `holder` and keeps `generation`,
-- which grows by one each time the lease is taken (renewals keep it). Every write under a lease checks
-- that its holder still has it at that generation (fencing), so a holder that lost its lease
-- (paused, cut off) can never overwrite its successor's work.
-- `host` says where the holder runs (host name, boot and PID namespace), `pid` and
-- `pid_started` which process it is (its start time, so a reused PID is told apart): a holder
-- on this host whose process is gone is taken over at once; the TTL remains for other hosts.
ALTER TABLE token_leases ADD COLUMN generation  INTEGER NOT NULL DEFAULT 0;
ALTER TABLE token_leases ADD COLUMN host        TEXT    NOT NULL DEFAULT '';
ALTER TABLE token_leases ADD COLUMN pid         INTEGER NOT NULL DEFAULT 0;
ALTER TABLE token_leases ADD COLUMN pid_started INTEGER NOT NULL DEFAULT 0;

ALTER TABLE job_leases ADD COLUMN generation  INTEGER NOT NULL DEFAULT 0;
ALTER TABLE job_leases ADD COLUMN host        TEXT    NOT NULL DEFAULT '';
ALTER TABLE job_leases ADD COLUMN pid         INTEGER NOT NULL DEFAULT 0;
ALTER TABLE job_leases ADD COLUMN pid_started INTEGER NOT NULL DEFAULT 0;

-- A refresh request about to be sent, written durably before it leaves: which holder sends
-- it, presenting the refresh token of which generation, when. Cleared when its answer is
-- stored. Found still set by the next holder of the lease, it means the sender died with the
-- answer unread, and the provider may have rotated the refresh token already.
ALTER TABLE token_state ADD COLUMN request_holder     TEXT;
ALTER TABLE token_state ADD COLUMN request_generation INTEGER;
ALTER TABLE token_state ADD COLUMN request_sent_at    INTEGER;
