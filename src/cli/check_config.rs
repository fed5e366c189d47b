//! `ehrsync check-config`: validate, then print the resolved plan with secrets redacted.

use std::fmt;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use chrono::Utc;

use crate::config::{Account, Config, Loaded, Problem};

pub fn run(path: &Path) -> ExitCode {
    match super::load_config(path) {
        Ok(loaded) => super::output::finish(super::output::print(Plan(&loaded)), ExitCode::SUCCESS),
        Err(code) => code,
    }
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The plan as text. Secrets appear only through their `Display`, which is `[redacted] (origin)`.
pub struct Plan<'a>(pub &'a Loaded);

impl fmt::Display for Plan<'_> {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Config {
            path,
            env_overrides,
            agent,
            accounts,
            views,
            broker,
        } = &self.0.config;
        writeln!(out, "config: {}", path.display())?;
        if !env_overrides.is_empty() {
            writeln!(out, "environment overrides: {}", env_overrides.join(", "))?;
        }
        writeln!(out, "\n[agent]")?;
        writeln!(out, "  database        {}", agent.database)?;
        writeln!(
            out,
            "  metrics_listen  {} (/metrics, /healthz, /readyz)",
            agent.metrics_listen
        )?;
        writeln!(out, "  token_key       {}", agent.token_key)?;
        writeln!(
            out,
            "  shutdown_grace  {}",
            humantime::format_duration(agent.shutdown_grace)
        )?;
        if let Some(ca) = &agent.ca_file {
            writeln!(
                out,
                "  ca_file         {} (trusted beside the system's CAs)",
                ca.display()
            )?;
        }
        writeln!(
            out,
            "  changes_retention {}",
            humantime::format_duration(agent.changes_retention)
        )?;
        for account in accounts {
            render_account(out, account)?;
        }
        for v in views.all() {
            let columns: Vec<&str> = v.columns.iter().map(|c| c.name.as_str()).collect();
            writeln!(
                out,
                "\n[[views]] {} → table {} ({} records; columns {})\n  file {}",
                v.name,
                v.table,
                v.resource_type,
                columns.join(", "),
                v.file.display()
            )?;
        }
        if let Some(b) = broker {
            writeln!(out, "\n[broker]")?;
            writeln!(out, "  listen          {}", b.listen)?;
            if matches!(b.listen, crate::config::BrokerListen::Unix(_)) {
                let group = b
                    .socket_group
                    .as_ref()
                    .map(|(g, _)| format!(", group {g}"))
                    .unwrap_or_default();
                writeln!(out, "  socket          mode {:04o}{group}", b.socket_mode)?;
            }
            writeln!(
                out,
                "  proxy_timeout   {}",
                humantime::format_duration(b.proxy_timeout)
            )?;
            for c in &b.clients {
                let accounts: Vec<&str> = c.accounts.iter().map(|a| a.as_str()).collect();
                let endpoints = match (c.token, c.api) {
                    (true, true) => "token, api",
                    (true, false) => "token",
                    _ => "api",
                };
                writeln!(
                    out,
                    "  client {:<12} key {}; accounts {}; endpoints {endpoints}{}",
                    c.name,
                    c.key,
                    accounts.join(", "),
                    if c.read_only { " (read-only)" } else { "" }
                )?;
            }
        }
        if !self.0.warnings.is_empty() {
            writeln!(out, "\nwarnings:")?;
            for Problem { key, message } in &self.0.warnings {
                writeln!(out, "  {key}: {message}")?;
            }
        }
        let hosts = outbound(accounts);
        if !hosts.is_empty() {
            writeln!(out, "\noutbound connections (the firewall allow-list):")?;
            let width = hosts.keys().map(String::len).max().unwrap_or(0);
            for (host, uses) in &hosts {
                let uses: Vec<&str> = uses.iter().map(String::as_str).collect();
                writeln!(out, "  {host:<width$}  {}", uses.join("; "))?;
            }
        }
        let jobs: usize = accounts.iter().map(|a| a.jobs.len()).sum();
        writeln!(
            out,
            "\nOK: {} account{}, {jobs} job{}",
            accounts.len(),
            if accounts.len() == 1 { "" } else { "s" },
            if jobs == 1 { "" } else { "s" }
        )
    }
}

/// Every `host:port` the agent (and `ehrsync login`) will connect to, with what for: the
/// firewall allow-list. A discovered provider's document may name further hosts (its token
/// endpoint, its keys); that is said at the issuer.
fn outbound(
    accounts: &[Account],
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut hosts: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        std::collections::BTreeMap::new();
    let mut add = |url: &url::Url, what: String| {
        if let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) {
            hosts
                .entry(format!("{host}:{port}"))
                .or_default()
                .insert(what);
        }
    };
    for a in accounts {
        let name = &a.name;
        match &a.token_endpoint {
            crate::config::TokenEndpoint::Url(url) => add(url, format!("{name}: token endpoint")),
            crate::config::TokenEndpoint::Discovery { issuer } => add(
                issuer,
                format!(
                    "{name}: OpenID discovery (its document may name other hosts for the token endpoint and keys)"
                ),
            ),
        }
        if let (Some(issuer), crate::config::TokenEndpoint::Url(_)) = (&a.issuer, &a.token_endpoint)
        {
            add(issuer, format!("{name}: OpenID discovery and keys"));
        }
        if let Some(device) = &a.device_authorization_endpoint {
            add(
                device,
                format!("{name}: device login (`ehrsync login --device`)"),
            );
        }
        if let Some(api) = &a.api_base {
            add(api, format!("{name}: API"));
        }
    }
    hosts
}

fn render_account(out: &mut fmt::Formatter<'_>, a: &Account) -> fmt::Result {
    writeln!(out, "\n[accounts.{}]  vendor {}", a.name, a.vendor)?;
    writeln!(out, "  token endpoint  {}", a.token_endpoint)?;
    let login = if a.grant.needs_person() {
        format!(" (once, by a person: `ehrsync login {}`)", a.name)
    } else {
        String::new()
    };
    writeln!(
        out,
        "  grant           {}{login}, then refresh_token while the server issues refresh tokens",
        a.grant
    )?;
    if a.grant.needs_person() {
        let page = match (&a.authorization_endpoint, &a.issuer) {
            (Some(url), _) => url.to_string(),
            (None, Some(issuer)) => {
                format!("discovered from {}", crate::config::discovery_url(issuer))
            }
            (None, None) => "-".to_owned(),
        };
        writeln!(out, "  login page      {page}")?;
        let port = a
            .redirect_port
            .map_or_else(|| "{a free port}".to_owned(), |p| p.to_string());
        writeln!(
            out,
            "  redirect        http://127.0.0.1:{port}/callback (PKCE S256, state{})",
            if a.issuer.is_some() {
                ", ID token checked"
            } else {
                ""
            }
        )?;
        if let Some(device) = &a.device_authorization_endpoint {
            writeln!(out, "  device login    {device}")?;
        }
    }
    let auth = match a.client_auth {
        Some(_) if a.client_secret.is_none() => "none (a public client: client_id only)".to_owned(),
        Some(auth) => auth.to_string(),
        None if a.client_secret.is_none() => "none (a public client: client_id only)".to_owned(),
        None => "from OpenID discovery (basic if it names none)".to_owned(),
    };
    writeln!(out, "  client auth     {auth}")?;
    writeln!(out, "  client_id       {}", a.client_id)?;
    if let Some(s) = &a.client_secret {
        writeln!(out, "  client_secret   {s}")?;
    }
    if let Some(u) = &a.username {
        writeln!(out, "  username        {u}")?;
    }
    if let Some(p) = &a.password {
        writeln!(out, "  password        {p}")?;
    }
    if let Some(r) = &a.resource {
        writeln!(out, "  resource        {r}")?;
    }
    if let Some(s) = &a.scope {
        writeln!(out, "  scope           {s}")?;
    }
    let l = &a.lifetimes;
    let assumed = |d: Option<Duration>| match d {
        Some(d) => format!("{} unless the server states one", human(d)),
        None => "as the server states".to_owned(),
    };
    writeln!(
        out,
        "  access token    lifetime {}",
        assumed(l.access_token)
    )?;
    writeln!(
        out,
        "  refresh         at {:.0}% of the lifetime ±5%, at least {} before expiry",
        l.refresh_ratio * 100.0,
        human(l.min_lead)
    )?;
    writeln!(
        out,
        "  refresh token   lifetime {}",
        assumed(l.refresh_token)
    )?;
    if let Some(api) = &a.api_base {
        writeln!(out, "  api_base        {api}")?;
    }
    for h in &a.headers {
        writeln!(out, "  header          {}: {}", h.name, h.value)?;
    }
    let now = Utc::now();
    for j in &a.jobs {
        let next = j.schedule.next_after(now).map_or_else(
            || "never".to_owned(),
            |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        );
        writeln!(
            out,
            "  job {:<11} {}, {} per page, schedule \"{}\" (next {next})",
            j.name,
            j.kind,
            j.page_size,
            j.schedule.as_str()
        )?;
        match &j.kind {
            crate::config::JobKind::Fhir { overlap, .. } => {
                writeln!(
                    out,
                    "      incremental on meta.lastUpdated, {} overlap",
                    humantime::format_duration(*overlap)
                )?;
                match &j.reconcile {
                    Some(r) => writeln!(
                        out,
                        "      reconcile \"{}\": sweep every id, delete at most {:.1} % at once",
                        r.as_str(),
                        j.reconcile_max_delete * 100.0
                    )?,
                    None => writeln!(
                        out,
                        "      deletions reconciled by full runs and `sync --reconcile` (no reconcile schedule)"
                    )?,
                }
            }
            crate::config::JobKind::NikohealthPatients(p) => writeln!(
                out,
                "      GET {}?{}={}..&{}={}, records at \"{}\", id field {}, updated field {}",
                p.path,
                p.page_param,
                p.first_page,
                p.page_size_param,
                j.page_size,
                p.items,
                p.id_field,
                p.updated_field.as_deref().unwrap_or("(none)")
            )
            .and_then(|()| {
                writeln!(
                    out,
                    "      each completed run reconciles deletions (at most {:.1} % at once)",
                    j.reconcile_max_delete * 100.0
                )
            })?,
        }
    }
    Ok(())
}
