//! Leases: who may act for an account (its token requests) or a job (its runs) right now,
//! across every process that shares the database.
//!
//! The API is what a shared PostgreSQL store will offer too, so it names nothing SQLite-only:
//! [`Store::acquire`] takes a lease for a [`Holder`] until a time and returns the [`Lease`]
//! with its **generation**, which grows by one each time the lease is taken;
//! [`Store::renew`] extends it and [`Store::release`] gives it up.
//! Every write made under a lease checks, in its own transaction, that the lease still belongs
//! to that holder at that generation (fencing): a holder that lost its lease — paused past the
//! TTL, or cut off by a stop — can never overwrite what its successor wrote.
//!
//! A lease ends three ways: its holder releases it (the row stays, with no holder, keeping the
//! generation); it expires (the TTL, for holders on other hosts); or its holder is provably
//! dead — on this host, its process is gone or its PID now belongs to another process — and
//! the next process to ask takes it over at once.

use std::time::Duration;

// Audited: the only SQL built at run time here is made of `&'static str` fragments chosen by
// `LeaseKey` (table and key columns); every value is a bound parameter.
use sqlx::AssertSqlSafe;
use sqlx::query::Query;
use sqlx::{Database, Encode, Type};

use super::backend::on;
use super::{Store, StoreError};

/// Who holds leases: one running process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Unique per process run: `{pid}-{random}`.
    id: String,
    /// Where the process runs: host name, boot and PID namespace (see [`this_host`]).
    host: String,
    pid: u32,
    /// The process's start time in clock ticks since boot, telling a reused PID apart.
    pid_started: u64,
}

impl Holder {
    /// This process.
    pub fn this_process() -> Holder {
        let pid = std::process::id();
        Holder {
            id: format!("{pid}-{:016x}", getrandom::u64().unwrap_or_default()),
            host: this_host(),
            pid,
            pid_started: process_started(pid).unwrap_or(0),
        }
    }

    /// A holder that is never judged dead by its process (tests: another host's process).
    pub fn elsewhere(id: &str) -> Holder {
        Holder {
            id: id.to_owned(),
            host: String::new(),
            pid: 0,
            pid_started: 0,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn pid_started(&self) -> u64 {
        self.pid_started
    }

    /// The host's name, for people (the first part of [`this_host`], or the computer name).
    pub fn host_name(&self) -> String {
        host_name()
    }
}

/// This machine's name: the kernel's host name on Linux, `COMPUTERNAME` on Windows,
/// `HOSTNAME` elsewhere; empty when none is known.
pub fn host_name() -> String {
    let read = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned());
    read.filter(|s| !s.is_empty())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default()
}

/// What a lease is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseKey {
    /// Making token requests for an account (`token_leases`).
    Token { account: String },
    /// Running a job (`job_leases`).
    Job { account: String, job: String },
    /// Owning an account: refreshing its tokens and running its jobs while several agents
    /// share the database (`account_owners`, see `agent::share`).
    Owner { account: String },
}

impl LeaseKey {
    pub fn token(account: &str) -> LeaseKey {
        LeaseKey::Token {
            account: account.to_owned(),
        }
    }

    pub fn owner(account: &str) -> LeaseKey {
        LeaseKey::Owner {
            account: account.to_owned(),
        }
    }

    pub fn job(account: &str, job: &str) -> LeaseKey {
        LeaseKey::Job {
            account: account.to_owned(),
            job: job.to_owned(),
        }
    }

    fn table(&self) -> &'static str {
        match self {
            LeaseKey::Token { .. } => "token_leases",
            LeaseKey::Job { .. } => "job_leases",
            LeaseKey::Owner { .. } => "account_owners",
        }
    }

    fn columns(&self) -> &'static str {
        match self {
            LeaseKey::Token { .. } | LeaseKey::Owner { .. } => "account",
            LeaseKey::Job { .. } => "account, job",
        }
    }

    /// As many `?` as [`LeaseKey::columns`] names.
    fn placeholders(&self) -> &'static str {
        match self {
            LeaseKey::Token { .. } | LeaseKey::Owner { .. } => "?",
            LeaseKey::Job { .. } => "?, ?",
        }
    }

    fn matches(&self) -> &'static str {
        match self {
            LeaseKey::Token { .. } | LeaseKey::Owner { .. } => "account = ?",
            LeaseKey::Job { .. } => "account = ? AND job = ?",
        }
    }

    fn bind<'q, DB: Database>(
        &self,
        q: Query<'q, DB, DB::Arguments>,
    ) -> Query<'q, DB, DB::Arguments>
    where
        for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    {
        match self {
            LeaseKey::Token { account } | LeaseKey::Owner { account } => q.bind(account.as_str()),
            LeaseKey::Job { account, job } => q.bind(account.as_str()).bind(job.as_str()),
        }
    }

    /// `EXISTS (…)`: SQL true while `lease` still holds (binds with [`Lease::bind_fence`]).
    /// `lock` is the backend's `LOCK_SHARED`, which on PostgreSQL keeps the lease row from
    /// changing hands until the writing transaction ends.
    pub(super) fn fence(&self, lock: &str) -> String {
        format!(
            "EXISTS (SELECT 1 FROM {} WHERE {} AND holder = ? AND generation = ?{lock})",
            self.table(),
            self.matches()
        )
    }
}

impl Lease {
    /// Binds what [`LeaseKey::fence`] asks for.
    pub(super) fn bind_fence<'q, DB: Database>(
        &self,
        q: Query<'q, DB, DB::Arguments>,
    ) -> Query<'q, DB, DB::Arguments>
    where
        for<'a> &'a str: Encode<'a, DB> + Type<DB>,
        i64: for<'a> Encode<'a, DB> + Type<DB>,
    {
        self.key
            .bind(q)
            .bind(self.holder.as_str())
            .bind(self.generation)
    }
}

/// A lease held: its key, holder and fencing generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: LeaseKey,
    pub holder: String,
    pub generation: i64,
}

/// A lease as stored, for diagnostics, tests and judging a holder.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LeaseRow {
    /// Empty when released.
    pub holder: String,
    pub expires_at: i64,
    pub generation: i64,
    pub host: String,
    pub pid: i64,
    pub pid_started: i64,
}

impl LeaseRow {
    /// Whether someone holds this lease at `now` (Unix seconds): not released, not expired,
    /// and its holder not provably dead. Such a lease is not `acquire`d by anyone else.
    pub fn live(&self, now: i64) -> bool {
        !self.holder.is_empty() && self.expires_at > now && !self.holder_is_dead()
    }

    /// Whether this row's holder is provably dead: it ran on this host (same boot and PID
    /// namespace) and its process is gone, or its PID now belongs to a process that started at
    /// another time. Holders elsewhere, and hosts without `/proc`, are never judged: their
    /// leases end by the TTL.
    pub fn holder_is_dead(&self) -> bool {
        if self.holder.is_empty() || self.host.is_empty() || self.host != this_host() {
            return false;
        }
        let Ok(pid) = u32::try_from(self.pid) else {
            return false;
        };
        if pid == 0 || !cfg!(target_os = "linux") {
            return false;
        }
        match process_started(pid) {
            None => true,
            Some(started) => i64::try_from(started).is_ok_and(|s| s != self.pid_started),
        }
    }
}

impl Store {
    /// Takes `key`'s lease for `holder` until `now + ttl` (Unix seconds), at a generation
    /// higher than any before (also when `holder` had it: a new run in the same process must
    /// not share a generation with one that was cut off). `None` while another live holder has
    /// it. A holder this host can prove dead is taken over at once (and logged).
    pub async fn acquire(
        &self,
        key: &LeaseKey,
        holder: &Holder,
        now: i64,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        if let Some(lease) = self.try_acquire(key, holder, now, ttl, None).await? {
            return Ok(Some(lease));
        }
        let Some(row) = self.lease_row(key).await? else {
            return Ok(None);
        };
        if !row.holder_is_dead() {
            return Ok(None);
        }
        let taken = self
            .try_acquire(key, holder, now, ttl, Some(row.holder.clone()))
            .await?;
        if taken.is_some() {
            tracing::info!(lease = ?key, dead_holder = %row.holder, pid = row.pid,
                "took over a lease whose holder's process is gone");
        }
        Ok(taken)
    }

    async fn try_acquire(
        &self,
        key: &LeaseKey,
        holder: &Holder,
        now: i64,
        ttl: Duration,
        dead: Option<String>,
    ) -> Result<Option<Lease>, StoreError> {
        let (key_owned, holder_owned) = (key.clone(), holder.clone());
        let until = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
        let generation = self
            .shield(|s| async move {
                let (key, holder) = (&key_owned, &holder_owned);
                let t = key.table();
                let sql = format!(
                    "INSERT INTO {t} ({cols}, holder, expires_at, generation, host, pid, pid_started) \
                     VALUES ({ph}, ?, ?, 1, ?, ?, ?) \
                     ON CONFLICT ({cols}) DO UPDATE SET \
                         generation = {t}.generation + 1, \
                         holder = excluded.holder, expires_at = excluded.expires_at, \
                         host = excluded.host, pid = excluded.pid, pid_started = excluded.pid_started \
                     WHERE {t}.holder = excluded.holder OR {t}.holder = '' \
                        OR {t}.expires_at <= ? OR {t}.holder = ? \
                     RETURNING generation",
                    cols = key.columns(),
                    ph = key.placeholders(),
                );
                let generation: Option<i64> = on!(&s.lease_db, pool, d => key
                    .bind(d::query(AssertSqlSafe(sql)))
                    .bind(&holder.id)
                    .bind(until)
                    .bind(&holder.host)
                    .bind(i64::from(holder.pid))
                    .bind(i64::try_from(holder.pid_started).unwrap_or(0))
                    .bind(now)
                    .bind(dead.as_deref())
                    .fetch_optional(pool)
                    .await?
                    .map(|r| sqlx::Row::get::<i64, _>(&r, 0)));
                Ok(generation)
            })
            .await?;
        Ok(generation.map(|generation| Lease {
            key: key.clone(),
            holder: holder.id.clone(),
            generation,
        }))
    }

    /// Extends `lease` until `now + ttl` if it still holds. False when it was lost (expired
    /// and taken, or released).
    pub async fn renew(&self, lease: &Lease, now: i64, ttl: Duration) -> Result<bool, StoreError> {
        let lease = lease.clone();
        let until = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
        self.shield(|s| async move {
            let sql = format!(
                "UPDATE {} SET expires_at = ? WHERE {} AND holder = ? AND generation = ?",
                lease.key.table(),
                lease.key.matches()
            );
            let done = on!(&s.lease_db, pool, d => lease
                .bind_fence(d::query(AssertSqlSafe(sql)).bind(until))
                .execute(pool)
                .await?
                .rows_affected());
            Ok(done == 1)
        })
        .await
    }

    /// Gives `lease` up, if it still holds. The row stays, without a holder, so the next
    /// holder's generation is higher.
    pub async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let lease = lease.clone();
        self.shield(|s| async move {
            let sql = format!(
                "UPDATE {} SET holder = '', expires_at = 0 \
                 WHERE {} AND holder = ? AND generation = ?",
                lease.key.table(),
                lease.key.matches()
            );
            on!(&s.lease_db, pool, d => lease
                .bind_fence(d::query(AssertSqlSafe(sql)))
                .execute(pool)
                .await
                .map(|_| ()))?;
            Ok(())
        })
        .await
    }

    /// `key`'s lease row, if one was ever taken.
    pub async fn lease_row(&self, key: &LeaseKey) -> Result<Option<LeaseRow>, StoreError> {
        let key = key.clone();
        self.shield(|s| async move {
            let sql = format!(
                "SELECT holder, expires_at, generation, host, pid, pid_started FROM {} WHERE {}",
                key.table(),
                key.matches()
            );
            Ok(on!(&s.db, pool, d => key
            .bind(d::query(AssertSqlSafe(sql)))
            .fetch_optional(pool)
            .await?
            .map(|r| {
                use sqlx::Row;
                LeaseRow {
                    holder: r.get(0),
                    expires_at: r.get(1),
                    generation: r.get(2),
                    host: r.get(3),
                    pid: r.get(4),
                    pid_started: r.get(5),
                }
            })))
        })
        .await
    }
}

impl Store {
    /// Every account's ownership lease as stored (`account_owners`), by account.
    pub async fn owners(&self) -> Result<Vec<(String, LeaseRow)>, StoreError> {
        self.shield(|s| async move {
            let rows: Vec<(String, String, i64, i64, String, i64, i64)> =
                on!(&s.db, pool, d => d::query_as(
                    "SELECT account, holder, expires_at, generation, host, pid, pid_started \
                     FROM account_owners ORDER BY account",
                )
                .fetch_all(pool)
                .await)?;
            Ok(rows
                .into_iter()
                .map(|(account, holder, expires_at, generation, host, pid, pid_started)| {
                    let row = LeaseRow {
                        holder,
                        expires_at,
                        generation,
                        host,
                        pid,
                        pid_started,
                    };
                    (account, row)
                })
                .collect())
        })
        .await
    }

    /// Extends every ownership lease `holder` still holds until `now + ttl`, in one
    /// statement; returns those accounts with their generations. An account missing from the
    /// answer was lost (taken over after this holder let it expire).
    pub async fn renew_owned(
        &self,
        holder: &Holder,
        now: i64,
        ttl: Duration,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let id = holder.id.clone();
        let until = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
        self.shield(|s| async move {
            Ok(on!(&s.lease_db, pool, d => d::query_as(
                "UPDATE account_owners SET expires_at = ? WHERE holder = ? \
                 RETURNING account, generation",
            )
            .bind(until)
            .bind(&id)
            .fetch_all(pool)
            .await)?)
        })
        .await
    }
}

/// This host as a lease holder records it: its name, this boot and this PID namespace, so a
/// PID is only ever judged where it means the same process (`/proc` on Linux). Elsewhere
/// empty: holders there are never judged dead, and their leases end by the TTL.
pub fn this_host() -> String {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        if !cfg!(target_os = "linux") {
            return String::new();
        }
        let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_owned());
        let namespace =
            std::fs::read_link("/proc/self/ns/pid").map(|p| p.to_string_lossy().into_owned());
        match (
            read("/proc/sys/kernel/hostname"),
            read("/proc/sys/kernel/random/boot_id"),
            namespace,
        ) {
            (Ok(name), Ok(boot), Ok(ns)) => format!("{name}/{boot}/{ns}"),
            _ => String::new(),
        }
    })
    .clone()
}

/// When process `pid` started, in clock ticks since boot (`/proc/PID/stat` field 22); `None`
/// when there is no such process (or no `/proc`).
pub fn process_started(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after it, so field 22 is the 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_missing_one_is_dead() {
        let me = Holder::this_process();
        let row = |pid: u32, started: u64| LeaseRow {
            holder: "someone".to_owned(),
            expires_at: i64::MAX,
            generation: 1,
            host: this_host(),
            pid: i64::from(pid),
            pid_started: i64::try_from(started).unwrap(),
        };
        if !cfg!(target_os = "linux") {
            return;
        }
        assert!(!row(me.pid, me.pid_started).holder_is_dead());
        // The same PID with another start time: a reused PID.
        assert!(row(me.pid, me.pid_started + 1).holder_is_dead());
        // PIDs above the kernel's maximum (4194304) never exist.
        assert!(row(4_194_305 + 17, 5).holder_is_dead());
        // Another host's holder is never judged.
        let mut other = row(4_194_305 + 17, 5);
        other.host = "elsewhere/boot/pid:[1]".to_owned();
        assert!(!other.holder_is_dead());
    }
}
