//! `ehrsync status [--json]`: each configured account's token state and each job's last and next
//! run, read from the database without creating or changing it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::output;
use crate::config::{Account, Config};
use crate::store::{AgentRow, Store, StoreError, SyncRunRow, TokenStateRow};

pub async fn run(config_path: &Path, json: bool) -> ExitCode {
    // The status reads the database only: no secret is needed (nor readable, often, outside
    // the service).
    let loaded = match crate::config::load_scoped(
        config_path,
        &crate::config::Env::from_process(),
        &crate::config::Secrets::None,
    ) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(super::EXIT_CONFIG);
        }
    };
    let config = &loaded.config;
    let report = match build(config, Utc::now()).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(super::EXIT_FAILURE);
        }
    };
    let printed = if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => output::print(format_args!("{text}\n")),
            Err(e) => {
                eprintln!("error: cannot encode the status as JSON: {e}");
                return ExitCode::from(super::EXIT_FAILURE);
            }
        }
    } else {
        output::print(&report)
    };
    output::finish(printed, ExitCode::SUCCESS)
}

/// What `status` reports; its JSON form is a stable interface for scripts.
#[derive(Debug, Serialize)]
pub struct Report {
    pub database: String,
    pub database_exists: bool,
    pub schema_version: Option<i64>,
    pub generated_at: String,
    #[serde(skip)]
    now: DateTime<Utc>,
    /// Every `ehrsync run` that recorded itself in the database, running or not.
    pub agents: Vec<AgentReport>,
    pub accounts: Vec<AccountReport>,
    /// The token broker, when `[broker]` is configured.
    pub broker: Option<BrokerReport>,
}

/// The broker as configured, with each client's use as the agent last stored it.
#[derive(Debug, Serialize)]
pub struct BrokerReport {
    pub listen: String,
    pub clients: Vec<BrokerClientReport>,
}

#[derive(Debug, Serialize)]
pub struct BrokerClientReport {
    pub name: String,
    pub accounts: Vec<String>,
    /// `token`, `api`.
    pub endpoints: Vec<&'static str>,
    pub read_only: bool,
    pub last_used_at: Option<String>,
    pub last_account: Option<String>,
    pub requests: i64,
    pub refused: i64,
    #[serde(skip)]
    pub(crate) last_used: Option<DateTime<Utc>>,
}

impl BrokerClientReport {
    /// Takes a newer last use (the running agent's, not yet stored).
    pub fn used(&mut self, at: i64, account: Option<&str>) {
        let t = self::at(Some(at));
        if t > self.last_used {
            self.last_used = t;
            self.last_used_at = rfc3339(t);
            self.last_account = account.map(str::to_owned);
        }
    }
}

/// An agent's row, judged at the report's time.
#[derive(Debug, Serialize)]
pub struct AgentReport {
    pub id: String,
    pub host: String,
    pub pid: i64,
    pub version: String,
    pub started_at: Option<String>,
    pub heartbeat_at: Option<String>,
    /// A heartbeat within the last 45 s, and (on this host) a process that still exists.
    pub running: bool,
    /// The accounts it owns (its unexpired ownership leases): agents sharing a database
    /// divide the accounts.
    pub owns: usize,
    #[serde(skip)]
    times: [Option<DateTime<Utc>>; 2],
}

impl Report {
    /// Whether any agent is running: only then do planned times in the past mean "now".
    pub fn agent_running(&self) -> bool {
        self.agents.iter().any(|a| a.running)
    }
}

#[derive(Debug, Serialize)]
pub struct AccountReport {
    pub name: String,
    /// `None` for an account that has stored state but is no longer in the config.
    pub vendor: Option<String>,
    pub configured: bool,
    /// A lifecycle state (`no_token` when nothing is stored yet).
    pub state: String,
    pub stored: bool,
    pub token_expires_at: Option<String>,
    pub next_refresh_at: Option<String>,
    pub refresh_token_expires_at: Option<String>,
    pub last_error: Option<String>,
    pub updated_at: Option<String>,
    pub note: Option<String>,
    /// The command a person runs when only a login helps (the state is `needs_login`, or an
    /// account whose grant needs a person has no tokens yet).
    pub login_command: Option<String>,
    /// What to do about the account's state, when something is to be done.
    pub advice: Option<String>,
    /// The agent that owns the account (refreshes its tokens, runs its jobs): its id, while its
    /// ownership lease holds.
    pub owner: Option<String>,
    pub jobs: Vec<JobReport>,
    #[serde(skip)]
    times: [Option<DateTime<Utc>>; 3],
}

#[derive(Debug, Serialize)]
pub struct JobReport {
    pub name: String,
    pub kind: String,
    pub schedule: String,
    pub next_run: Option<String>,
    pub last_run: Option<RunReport>,
    #[serde(skip)]
    next: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
pub struct RunReport {
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub outcome: String,
    pub full: bool,
    pub pages: i64,
    pub records: i64,
    pub error: Option<String>,
    #[serde(skip)]
    started: Option<DateTime<Utc>>,
}

fn at(secs: Option<i64>) -> Option<DateTime<Utc>> {
    secs.and_then(|s| DateTime::from_timestamp(s, 0))
}

fn rfc3339(t: Option<DateTime<Utc>>) -> Option<String> {
    t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// Gathers the report for `config` at `now`, opening the database read-only (and closing it).
pub async fn build(config: &Config, now: DateTime<Utc>) -> Result<Report, StoreError> {
    let store = Store::open_read_only(&config.agent.database).await?;
    let report = build_from(store.as_ref(), config, now).await;
    if let Some(s) = store {
        s.close().await;
    }
    report
}

/// Gathers the report for `config` at `now` from an open `store` (`None`: there is no
/// database yet). The agent's status page calls this with its own store; it only reads.
pub async fn build_from(
    store: Option<&Store>,
    config: &Config,
    now: DateTime<Utc>,
) -> Result<Report, StoreError> {
    let clients = match (store, &config.broker) {
        (Some(s), Some(_)) => s.broker_clients().await?,
        _ => Vec::new(),
    };
    let (schema_version, mut tokens, mut runs, agents, owners) = match store {
        Some(s) => {
            let tokens: BTreeMap<String, TokenStateRow> = s
                .token_states()
                .await?
                .into_iter()
                .map(|t| (t.account.clone(), t))
                .collect();
            let runs: BTreeMap<(String, String), SyncRunRow> = s
                .latest_runs()
                .await?
                .into_iter()
                .map(|r| ((r.account.clone(), r.job.clone()), r))
                .collect();
            let agents = s.agents().await?;
            let owners: BTreeMap<String, String> = s
                .owners()
                .await?
                .into_iter()
                .filter(|(_, l)| !l.holder.is_empty() && l.expires_at > now.timestamp())
                .map(|(account, l)| (account, l.holder))
                .collect();
            (
                Some(s.schema_version().await?),
                tokens,
                runs,
                agents,
                owners,
            )
        }
        None => (
            None,
            BTreeMap::new(),
            BTreeMap::new(),
            Vec::new(),
            BTreeMap::new(),
        ),
    };
    let stale = i64::try_from(crate::agent::HEARTBEAT_STALE.as_secs()).unwrap_or(45);
    let agents = agents
        .into_iter()
        .map(|a: AgentRow| AgentReport {
            running: a.alive(now.timestamp(), stale),
            owns: owners.values().filter(|h| **h == a.id).count(),
            id: a.id,
            host: a.host,
            pid: a.pid,
            version: a.version,
            started_at: rfc3339(at(Some(a.started_at))),
            heartbeat_at: rfc3339(at(Some(a.heartbeat_at))),
            times: [at(Some(a.started_at)), at(Some(a.heartbeat_at))],
        })
        .collect();
    let exists = schema_version.is_some();
    let login = crate::config::login_command(&config.path);
    let mut accounts: Vec<AccountReport> = config
        .accounts
        .iter()
        .map(|a| {
            account_report(
                Some(a),
                &login,
                a.name.as_str(),
                tokens.remove(a.name.as_str()),
                &mut runs,
                exists,
                now,
            )
        })
        .collect();
    // Accounts removed from the config keep their rows; show them so nothing is silently stale.
    for (name, row) in std::mem::take(&mut tokens) {
        accounts.push(account_report(
            None,
            &login,
            &name,
            Some(row),
            &mut runs,
            exists,
            now,
        ));
    }
    let broker = config.broker.as_ref().map(|b| BrokerReport {
        listen: b.listen.to_string(),
        clients: b
            .clients
            .iter()
            .map(|c| {
                let row = clients.iter().find(|r| r.name == c.name);
                let last_used = at(row.and_then(|r| r.last_used_at));
                BrokerClientReport {
                    name: c.name.clone(),
                    accounts: c.accounts.iter().map(|a| a.to_string()).collect(),
                    endpoints: [("token", c.token), ("api", c.api)]
                        .into_iter()
                        .filter_map(|(e, on)| on.then_some(e))
                        .collect(),
                    read_only: c.read_only,
                    last_used_at: rfc3339(last_used),
                    last_account: row.and_then(|r| r.last_account.clone()),
                    requests: row.map_or(0, |r| r.requests),
                    refused: row.map_or(0, |r| r.refused),
                    last_used,
                }
            })
            .collect(),
    });
    for a in &mut accounts {
        a.owner = owners.get(&a.name).cloned();
    }
    Ok(Report {
        database: config.agent.database.to_string(),
        database_exists: exists,
        schema_version,
        generated_at: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        now,
        agents,
        accounts,
        broker,
    })
}

fn account_report(
    account: Option<&Account>,
    login: &str,
    name: &str,
    row: Option<TokenStateRow>,
    runs: &mut BTreeMap<(String, String), SyncRunRow>,
    db_exists: bool,
    now: DateTime<Utc>,
) -> AccountReport {
    let jobs = account
        .map(|a| {
            a.jobs
                .iter()
                .map(|j| {
                    let last = runs.remove(&(name.to_owned(), j.name.as_str().to_owned()));
                    let next = j.schedule.next_after(now);
                    JobReport {
                        name: j.name.to_string(),
                        kind: j.kind.to_string(),
                        schedule: j.schedule.as_str().to_owned(),
                        next_run: rfc3339(next),
                        last_run: last.map(|r| RunReport {
                            started_at: rfc3339(at(Some(r.started_at))),
                            finished_at: rfc3339(at(r.finished_at)),
                            outcome: r.outcome,
                            full: r.full,
                            pages: r.pages,
                            records: r.records,
                            error: r.error,
                            started: at(Some(r.started_at)),
                        }),
                        next,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let note = match (&row, account, db_exists) {
        (_, None, _) => Some("not in the config any more; its stored state is kept".to_owned()),
        (None, _, false) => {
            Some("no database yet: the agent has not run with this config".to_owned())
        }
        (None, _, true) => {
            Some("no token stored yet: the agent has not logged in to this account".to_owned())
        }
        (Some(_), _, _) => None,
    };
    let parked = row.as_ref().is_some_and(|r| r.state == "needs_login");
    let never_logged_in = account.is_some_and(|a| a.grant.needs_person())
        && row
            .as_ref()
            .is_none_or(|r| r.access_token_expires_at.is_none());
    let login_command =
        (account.is_some() && (parked || never_logged_in)).then(|| format!("{login} {name}"));
    let last_error = row.as_ref().and_then(|r| r.last_error.clone());
    let advice = match (account, &login_command) {
        (Some(a), Some(command)) => Some(advise(a, last_error.as_deref(), command)),
        _ => None,
    };
    let times = row.as_ref().map_or([None; 3], |r| {
        [
            at(r.access_token_expires_at),
            at(r.next_refresh_at),
            at(r.refresh_token_expires_at),
        ]
    });
    AccountReport {
        name: name.to_owned(),
        vendor: account.map(|a| a.vendor.to_string()),
        configured: account.is_some(),
        state: row
            .as_ref()
            .map_or_else(|| "no_token".to_owned(), |r| r.state.clone()),
        stored: row.is_some(),
        token_expires_at: rfc3339(times[0]),
        next_refresh_at: rfc3339(times[1]),
        refresh_token_expires_at: rfc3339(times[2]),
        last_error,
        advice,
        updated_at: rfc3339(row.as_ref().and_then(|r| at(Some(r.updated_at)))),
        note,
        login_command,
        owner: None,
        jobs,
        times,
    }
}

/// What to do for an account that waits for someone: a person's login where only a person can
/// help (an authorization-code account), else the credentials in the config, which the agent
/// tries again as soon as they change (and consent or MFA at the vendor, when it asks).
fn advise(account: &Account, last_error: Option<&str>, command: &str) -> String {
    let why = if last_error.is_some_and(|e| e.contains("a person must")) {
        " (the last error says a person must act)"
    } else {
        ""
    };
    if account.grant.needs_person() {
        return format!("needs a person to log in: run `{command}`");
    }
    let name = &account.name;
    let what = match account.grant {
        crate::vendor::Grant::Password => {
            format!("`accounts.{name}.password` (or `client_secret`)")
        }
        _ => format!("`accounts.{name}.client_secret`"),
    };
    format!(
        "its credentials were refused: fix {what} (or the file it names) and reload \
         (`systemctl reload ehrsync`); a changed secret is tried again at once. If the \
         vendor asks for consent or MFA{why}, a person completes that first. `{command}` \
         tries at once"
    )
}

impl Report {
    /// The time the report was made for.
    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }
}

impl AgentReport {
    /// When the agent started.
    pub fn started(&self) -> Option<DateTime<Utc>> {
        self.times[0]
    }
}

impl AccountReport {
    /// When the stored access token expires.
    pub fn token_expires(&self) -> Option<DateTime<Utc>> {
        self.times[0]
    }

    /// The planned refresh (in `needs_login`, the next automatic attempt).
    pub fn next_refresh(&self) -> Option<DateTime<Utc>> {
        self.times[1]
    }

    /// When the refresh token expires, where known.
    pub fn refresh_token_expires(&self) -> Option<DateTime<Utc>> {
        self.times[2]
    }
}

impl JobReport {
    /// The job's next scheduled run.
    pub fn next(&self) -> Option<DateTime<Utc>> {
        self.next
    }
}

impl RunReport {
    pub fn started(&self) -> Option<DateTime<Utc>> {
        self.started
    }
}

/// `2026-11-22 06:01:00Z (in 45m)`, or `-`.
pub(crate) fn when(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    let Some(t) = t else { return "-".to_owned() };
    format!("{} ({})", t.format("%Y-%m-%d %H:%M:%SZ"), relative(t, now))
}

/// An expiry: `2026-11-22 06:01:00Z (in 45m)`, `… (expired 3m ago)`, or `-`.
pub(crate) fn expiry(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match t {
        Some(t) if t <= now => format!(
            "{} (expired {})",
            t.format("%Y-%m-%d %H:%M:%SZ"),
            relative(t, now)
        ),
        _ => when(t, now),
    }
}

/// A time the agent plans to act at: in the past it is overdue, and without a running agent
/// nothing will happen at it.
pub(crate) fn planned(t: Option<DateTime<Utc>>, now: DateTime<Utc>, agent_running: bool) -> String {
    match t {
        Some(t) if t <= now && !agent_running => format!(
            "{} (was due {}; no agent is running)",
            t.format("%Y-%m-%d %H:%M:%SZ"),
            relative(t, now)
        ),
        Some(t) if t <= now => format!("{} (due now)", t.format("%Y-%m-%d %H:%M:%SZ")),
        _ => when(t, now),
    }
}

/// `2h 5m` since `t`.
pub(crate) fn since(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = u64::try_from((now - t).num_seconds()).unwrap_or(0);
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

/// `in 45m` or `3s ago`.
pub(crate) fn relative(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (t - now).num_seconds();
    let (n, unit) = match secs.unsigned_abs() {
        s if s < 120 => (s, "s"),
        s if s < 120 * 60 => (s / 60, "m"),
        s if s < 48 * 3600 => (s / 3600, "h"),
        s => (s / 86400, "d"),
    };
    if secs > 0 {
        format!("in {n}{unit}")
    } else {
        format!("{n}{unit} ago")
    }
}

/// Rows printed as [`table`] prints them.
pub(super) struct Table<'a>(pub &'a [Vec<String>]);

impl fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        table(f, self.0)
    }
}

/// Left-aligned columns separated by two spaces.
fn table(f: &mut fmt::Formatter<'_>, rows: &[Vec<String>]) -> fmt::Result {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        writeln!(f, "{}", line.trim_end())?;
    }
    Ok(())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.schema_version {
            Some(v) => writeln!(f, "database: {} (schema {v})", self.database)?,
            None => writeln!(f, "database: {} does not exist yet", self.database)?,
        }
        let alive = self.agent_running();
        for a in self.agents.iter().filter(|a| a.running) {
            let up = a.times[0].map_or_else(|| "-".to_owned(), |t| since(t, self.now));
            let beat = a.times[1].map_or_else(|| "-".to_owned(), |t| relative(t, self.now));
            writeln!(
                f,
                "agent: running (pid {}, host {}, up {up}, heartbeat {beat}, owns {} account{})",
                a.pid,
                a.host,
                a.owns,
                if a.owns == 1 { "" } else { "s" }
            )?;
        }
        if !alive {
            match self.agents.first() {
                Some(a) => writeln!(
                    f,
                    "agent: not running (last seen {}: pid {} on host {}; it did not stop cleanly)",
                    a.times[1].map_or_else(|| "-".to_owned(), |t| relative(t, self.now)),
                    a.pid,
                    a.host
                )?,
                None => writeln!(f, "agent: not running")?,
            }
        }
        if self.accounts.is_empty() {
            return writeln!(f, "\nno accounts are configured");
        }
        let header = [
            "ACCOUNT",
            "VENDOR",
            "STATE",
            "TOKEN EXPIRES",
            "NEXT REFRESH",
            "REFRESH TOKEN EXPIRES",
        ];
        let mut rows = vec![header.map(str::to_owned).to_vec()];
        for a in &self.accounts {
            rows.push(vec![
                a.name.clone(),
                a.vendor.clone().unwrap_or_else(|| "-".to_owned()),
                a.state.clone(),
                expiry(a.times[0], self.now),
                planned(a.times[1], self.now, alive),
                expiry(a.times[2], self.now),
            ]);
        }
        writeln!(f)?;
        table(f, &rows)?;
        for a in &self.accounts {
            if let Some(note) = &a.note {
                writeln!(f, "  {}: {note}", a.name)?;
            }
            if let Some(err) = &a.last_error {
                writeln!(f, "  {}: last error: {err}", a.name)?;
            }
            if let Some(advice) = &a.advice {
                writeln!(f, "  {}: {advice}", a.name)?;
            }
        }
        let header = [
            "JOB", "SCHEDULE", "LAST RUN", "OUTCOME", "RECORDS", "NEXT RUN",
        ];
        let mut rows = vec![header.map(str::to_owned).to_vec()];
        let mut errors = Vec::new();
        for a in &self.accounts {
            for j in &a.jobs {
                let (last, outcome, records) = match &j.last_run {
                    Some(r) => {
                        if let Some(e) = &r.error {
                            errors.push(format!("  {}/{}: last run failed: {e}", a.name, j.name));
                        }
                        (
                            when(r.started, self.now),
                            r.outcome.clone(),
                            r.records.to_string(),
                        )
                    }
                    None => ("never".to_owned(), "-".to_owned(), "-".to_owned()),
                };
                rows.push(vec![
                    format!("{}/{}", a.name, j.name),
                    j.schedule.clone(),
                    last,
                    outcome,
                    records,
                    if alive {
                        when(j.next, self.now)
                    } else {
                        "- (no agent is running)".to_owned()
                    },
                ]);
            }
        }
        if rows.len() > 1 {
            writeln!(f)?;
            table(f, &rows)?;
            for e in errors {
                writeln!(f, "{e}")?;
            }
        }
        if let Some(b) = &self.broker {
            writeln!(f, "\nbroker: {}", b.listen)?;
            let header = [
                "CLIENT",
                "ACCOUNTS",
                "ENDPOINTS",
                "LAST USE",
                "REQUESTS",
                "REFUSED",
            ];
            let mut rows = vec![header.map(str::to_owned).to_vec()];
            for c in &b.clients {
                let last = match (&c.last_used, &c.last_account) {
                    (Some(t), Some(a)) => format!("{} ({a})", when(Some(*t), self.now)),
                    (Some(t), None) => when(Some(*t), self.now),
                    (None, _) => "never".to_owned(),
                };
                rows.push(vec![
                    c.name.clone(),
                    c.accounts.join(", "),
                    format!(
                        "{}{}",
                        c.endpoints.join(", "),
                        if c.read_only { " (read-only)" } else { "" }
                    ),
                    last,
                    c.requests.to_string(),
                    c.refused.to_string(),
                ]);
            }
            table(f, &rows)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times_pick_a_readable_unit() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let plus = |s: i64| Some(now + chrono::Duration::seconds(s));
        assert!(when(plus(45 * 60), now).ends_with("(in 45m)"));
        assert!(when(plus(-3 * 3600), now).ends_with("(3h ago)"));
        assert!(when(plus(14 * 86400), now).ends_with("(in 14d)"));
        assert!(when(plus(30), now).ends_with("(in 30s)"));
        assert_eq!(when(None, now), "-");
    }
}
