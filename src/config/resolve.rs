//! From the raw config tree to a resolved [`Config`](super::Config): presets applied, secrets
//! read, every rule checked. Each check records a [`Problem`] and carries on, so one run reports
//! everything that is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::{Host, Url};

use super::problems::{Overrides, Problem, join, list, parse_section, suggest};
use super::raw::{
    HumanDuration, RawAccount, RawAgent, RawBroker, RawBrokerClient, RawJob, RawJobKind,
    RawTokenFile, RawView,
};
use super::secret::{self, Secret, SecretSpec};
use super::{
    Account, AccountName, Agent, DEFAULT_METRICS_LISTEN, DEFAULT_SHUTDOWN_GRACE, Database, Env,
    Header, HeaderValue, Job, JobKind, JobName, KeySource, Lifetimes, ListPaging,
    MAX_SHUTDOWN_GRACE, Schedule, TokenEndpoint, default_database,
};
use crate::vendor::{ClientAuth, Grant, TokenEndpointDefault, Vendor};

const DEFAULT_REFRESH_RATIO: f64 = 0.75;
const REFRESH_RATIO_RANGE: std::ops::RangeInclusive<f64> = 0.05..=0.95;
const DEFAULT_MIN_LEAD: Duration = Duration::from_secs(60);
const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;
const DEFAULT_FHIR_RESOURCE: &str = "Patient";
const DEFAULT_OVERLAP: Duration = Duration::from_secs(300);
const DEFAULT_TOKEN_WAIT: Duration = Duration::from_secs(120);
/// `reconcile_max_delete` unless configured: 10 %.
const DEFAULT_RECONCILE_MAX_DELETE: f64 = 0.10;
const MAX_TOKEN_WAIT: Duration = Duration::from_secs(3600);
const DEFAULT_LIST_PATH: &str = "/api/external/v1/patients";

/// What resolution needs and what it finds.
pub struct Ctx<'a> {
    base_dir: &'a Path,
    env: &'a Env,
    secrets: &'a super::Secrets,
    /// The `EHRSYNC__…` variables applied, by the key path each sets.
    overrides: Overrides,
    /// The accounts the file itself has; `None` when unknown.
    file_accounts: Option<BTreeSet<String>>,
    pub problems: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

impl<'a> Ctx<'a> {
    pub fn new(
        base_dir: &'a Path,
        env: &'a Env,
        secrets: &'a super::Secrets,
        overrides: Overrides,
        file_accounts: Option<BTreeSet<String>>,
    ) -> Self {
        Ctx {
            base_dir,
            env,
            secrets,
            overrides,
            file_accounts,
            problems: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// Records a problem at `key`; one at a key an `EHRSYNC__…` variable sets names it.
    fn problem(&mut self, key: &str, message: impl Into<String>) {
        let message = self.overrides.annotate(key, message.into());
        self.problems.push(Problem::new(key, message));
    }

    /// A duration key's value, or `None` (with the problem recorded at `key`) when it was
    /// refused; see [`super::raw::parse_duration`] for what is accepted.
    fn duration(&mut self, key: &str, raw: Option<HumanDuration>) -> Option<Duration> {
        match raw?.0 {
            Ok(d) => Some(d),
            Err(e) => {
                self.problem(key, e);
                None
            }
        }
    }

    /// [`parse_section`] with this load's overrides.
    fn parse<T: serde::de::DeserializeOwned>(
        &mut self,
        key: &str,
        value: config::Value,
    ) -> Option<T> {
        parse_section(key, value, &self.overrides, &mut self.problems)
    }

    /// Whether `key` already has a problem (so a follow-on one would only repeat it).
    fn has_problem(&self, key: &str) -> bool {
        self.problems.iter().any(|p| p.key == key)
    }

    fn warn(&mut self, key: &str, message: impl Into<String>) {
        self.warnings.push(Problem::new(key, message));
    }

    /// Reads a secret; on failure records the problem at `key`.
    fn secret(&mut self, key: &str, spec: SecretSpec) -> Option<Secret> {
        let wanted = match self.secrets {
            super::Secrets::All => true,
            // Every command that opens the store needs the database's password.
            _ if key == "agent.database_password" => true,
            super::Secrets::Account(name) => key.starts_with(&format!("accounts.{name}.")),
            super::Secrets::None => false,
        };
        if !wanted {
            return Some(secret::unread(spec, self.base_dir));
        }
        let env = self.env;
        match secret::resolve(spec, self.base_dir, &|name| env.get(name)) {
            Ok((secret, warnings)) => {
                for w in warnings {
                    self.warn(key, w);
                }
                Some(secret)
            }
            Err(e) => {
                self.problem(key, e.0);
                None
            }
        }
    }

    fn path(&self, p: PathBuf) -> PathBuf {
        if p.is_relative() {
            self.base_dir.join(p)
        } else {
            p
        }
    }
}

const TOP_LEVEL_KEYS: [&str; 4] = ["agent", "accounts", "views", "broker"];

/// Resolves the whole tree; `None` (with problems recorded) when it cannot be used.
pub fn root(
    tree: config::Value,
    ctx: &mut Ctx,
) -> Option<(
    Agent,
    Vec<Account>,
    crate::views::ViewSet,
    Option<super::BrokerSettings>,
)> {
    let table = match tree.into_table() {
        Ok(t) => t,
        Err(_) => {
            ctx.problem("", "the config must be a TOML table");
            return None;
        }
    };
    let mut agent = None;
    let mut accounts = Vec::new();
    let mut views = crate::views::ViewSet::default();
    let mut broker = None;
    for (key, value) in table {
        match key.as_str() {
            "agent" => {
                agent = ctx
                    .parse::<RawAgent>("agent", value)
                    .and_then(|raw| resolve_agent(raw, ctx));
            }
            "accounts" => accounts = resolve_accounts(value, ctx),
            "views" => views = resolve_views(value, ctx),
            "broker" => broker = Some(value),
            other => {
                let hint = match suggest(other, &TOP_LEVEL_KEYS) {
                    Some(s) => format!("unknown section; did you mean `{s}`?"),
                    None => format!("unknown section; the config has {}", list(&TOP_LEVEL_KEYS)),
                };
                ctx.problem(other, hint);
            }
        }
    }
    let agent = match agent {
        Some(a) => a,
        None => resolve_agent(
            RawAgent {
                database: None,
                database_password: None,
                metrics_listen: None,
                token_key: None,
                shutdown_grace: None,
                ca_file: None,
                changes_retention: None,
            },
            ctx,
        )?,
    };
    if accounts.is_empty() && ctx.problems.is_empty() {
        ctx.warn(
            "accounts",
            "no accounts are configured; the agent has nothing to do",
        );
    }
    let broker = broker.and_then(|value| resolve_broker(value, &accounts, ctx));
    Some((agent, accounts, views, broker))
}

/// `[broker]` and its clients; `accounts` are the resolved accounts the clients may name.
fn resolve_broker(
    value: config::Value,
    accounts: &[Account],
    ctx: &mut Ctx,
) -> Option<super::BrokerSettings> {
    let raw: RawBroker = ctx.parse("broker", value)?;
    let listen = match raw.listen.as_deref() {
        None => super::default_broker_listen(ctx.env),
        Some(text) => match text.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => {
                super::BrokerListen::Unix(ctx.path(PathBuf::from(path)))
            }
            Some(_) => {
                ctx.problem(
                    "broker.listen",
                    "`unix:` needs a socket path, e.g. \"unix:/run/ehrsync/broker.sock\"",
                );
                return None;
            }
            None => match text.parse::<SocketAddr>() {
                Ok(addr) => super::BrokerListen::Tcp(addr),
                Err(_) => {
                    ctx.problem(
                        "broker.listen",
                        format!("`{text}` is neither `unix:PATH` nor an IP address and port; write e.g. \"unix:/run/ehrsync/broker.sock\" or \"127.0.0.1:9871\""),
                    );
                    return None;
                }
            },
        },
    };
    if cfg!(windows) && matches!(listen, super::BrokerListen::Unix(_)) {
        ctx.problem("broker.listen", "Unix sockets are not used on Windows; write a loopback address such as \"127.0.0.1:9871\"");
    }
    if let super::BrokerListen::Tcp(addr) = &listen
        && !addr.ip().is_loopback()
    {
        if raw.allow_non_loopback == Some(true) {
            ctx.warn(
                "broker.listen",
                "is reachable from other hosts (allow_non_loopback): client keys travel in clear text over plain HTTP; limit it with a firewall",
            );
        } else {
            ctx.problem(
                "broker.listen",
                format!("`{addr}` is not a loopback address: other hosts could reach the broker; use 127.0.0.1 or a Unix socket, or set allow_non_loopback = true"),
            );
        }
    }
    let socket_mode = match raw.socket_mode.as_deref() {
        None => 0o660,
        Some(text) => match parse_mode(text) {
            Ok(m) => m,
            Err(e) => {
                ctx.problem("broker.socket_mode", e);
                0o660
            }
        },
    };
    if socket_mode & 0o002 != 0 {
        ctx.warn(
            "broker.socket_mode",
            "lets every local user connect (a client key is still needed); prefer 0660 with socket_group",
        );
    }
    let socket_group = raw
        .socket_group
        .and_then(|name| group_id("broker.socket_group", &name, ctx).map(|gid| (name, gid)));
    if socket_group.is_some() && matches!(listen, super::BrokerListen::Tcp(_)) {
        ctx.warn(
            "broker.socket_group",
            "applies to a Unix socket only; a TCP listener has no group",
        );
    }
    let proxy_timeout = ctx
        .duration("broker.proxy_timeout", raw.proxy_timeout)
        .unwrap_or(DEFAULT_PROXY_TIMEOUT);
    if proxy_timeout < Duration::from_secs(1) || proxy_timeout > Duration::from_secs(3600) {
        ctx.problem("broker.proxy_timeout", "must be between 1s and 1h");
    }
    let mut clients: Vec<super::BrokerClient> = Vec::new();
    for (name, value) in raw.clients {
        let key = format!("broker.clients.{name}");
        if let Err(e) = AccountName::parse(&name) {
            ctx.problem(
                &key,
                format!("{e} (client names follow the account name rules)"),
            );
            continue;
        }
        let Some(raw) = ctx.parse::<RawBrokerClient>(&key, value) else {
            continue;
        };
        if let Some(client) = resolve_client(&key, name, raw, accounts, ctx) {
            if let Some(other) = clients
                .iter()
                .find(|c| c.key_sha256 == client.key_sha256 && !c.key.expose().is_empty())
            {
                ctx.problem(
                    &join(&key, "key"),
                    format!(
                        "is the same key as client `{}`'s; each client needs its own key",
                        other.name
                    ),
                );
                continue;
            }
            clients.push(client);
        }
    }
    if clients.is_empty() && ctx.problems.is_empty() {
        ctx.warn(
            "broker.clients",
            "no clients are configured; nobody can use the broker",
        );
    }
    Some(super::BrokerSettings {
        listen,
        socket_mode,
        socket_group,
        proxy_timeout,
        clients,
    })
}

/// How long one proxied call may take unless `broker.proxy_timeout` says otherwise.
const DEFAULT_PROXY_TIMEOUT: Duration = Duration::from_secs(120);

fn resolve_client(
    key: &str,
    name: String,
    raw: RawBrokerClient,
    accounts: &[Account],
    ctx: &mut Ctx,
) -> Option<super::BrokerClient> {
    let before = ctx.problems.len();
    let secret = match raw.key {
        None => {
            ctx.problem(&join(key, "key"), "missing; give the client a key (a secret: { file = \"…\" }, { env = \"…\" } or { credential = \"…\" }), e.g. from `openssl rand -hex 32`");
            None
        }
        Some(spec) => ctx.secret(&join(key, "key"), spec),
    };
    if let Some(s) = &secret
        && !s.expose().is_empty()
        && s.expose().trim().chars().count() < super::MIN_CLIENT_KEY
    {
        ctx.problem(
            &join(key, "key"),
            format!(
                "is shorter than {} characters; use e.g. `openssl rand -hex 32`",
                super::MIN_CLIENT_KEY
            ),
        );
    }
    let mut allowed = Vec::new();
    match raw.accounts {
        None => ctx.problem(
            &join(key, "accounts"),
            "missing; list the accounts this client may use, e.g. [\"nextech-main\"]",
        ),
        Some(names) => {
            for n in names {
                match accounts.iter().find(|a| a.name.as_str() == n) {
                    Some(a) => allowed.push(a.name.clone()),
                    None => {
                        let known: Vec<&str> = accounts.iter().map(|a| a.name.as_str()).collect();
                        let hint = match suggest(&n, &known) {
                            Some(s) => format!(
                                "names `{n}`, which is not a configured account; did you mean `{s}`?"
                            ),
                            None => format!("names `{n}`, which is not a configured account"),
                        };
                        ctx.problem(&join(key, "accounts"), hint);
                    }
                }
            }
        }
    }
    let (mut token, mut api) = (true, true);
    if let Some(endpoints) = raw.endpoints {
        (token, api) = (false, false);
        for e in endpoints {
            match e.as_str() {
                "token" => token = true,
                "api" => api = true,
                other => ctx.problem(
                    &join(key, "endpoints"),
                    format!("`{other}` is not an endpoint; use \"token\" and/or \"api\""),
                ),
            }
        }
        if !token && !api {
            ctx.problem(
                &join(key, "endpoints"),
                "is empty; the client could do nothing (remove the client instead)",
            );
        }
    }
    if ctx.problems.len() > before {
        return None;
    }
    let secret = secret?;
    let key_sha256 = super::key_digest(secret.expose().trim());
    Some(super::BrokerClient {
        name,
        key: secret,
        key_sha256,
        accounts: allowed,
        token,
        api,
        read_only: raw.read_only.unwrap_or(false),
    })
}

/// An octal file mode (`"0660"`, `"660"`), at most 0777.
fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("`{text}` is not an octal mode such as \"0660\""))
}

/// The id of the local group `name`, or a problem at `key`.
fn group_id(key: &str, name: &str, ctx: &mut Ctx) -> Option<u32> {
    #[cfg(unix)]
    {
        match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => Some(g.gid.as_raw()),
            Ok(None) => {
                ctx.problem(key, format!("there is no group `{name}` on this system"));
                None
            }
            Err(e) => {
                ctx.problem(key, format!("cannot look up the group `{name}`: {e}"));
                None
            }
        }
    }
    #[cfg(not(unix))]
    {
        ctx.problem(key, format!("groups (`{name}`) are a Unix setting; on Windows, set the file's access with its folder's permissions"));
        None
    }
}

/// `[[accounts.NAME.token_files]]`.
fn resolve_token_files(key: &str, raw: Vec<config::Value>, ctx: &mut Ctx) -> Vec<super::TokenFile> {
    let mut files: Vec<super::TokenFile> = Vec::new();
    for (i, value) in raw.into_iter().enumerate() {
        let key = format!("{key}.token_files[{i}]");
        let Some(raw) = ctx.parse::<RawTokenFile>(&key, value) else {
            continue;
        };
        let before = ctx.problems.len();
        let path = match raw.path {
            Some(p) if !p.as_os_str().is_empty() => Some(ctx.path(p)),
            _ => {
                ctx.problem(
                    &join(&key, "path"),
                    "missing; name the file the token is written to",
                );
                None
            }
        };
        let mode = match raw.mode.as_deref() {
            None => 0o600,
            Some(text) => parse_mode(text).unwrap_or_else(|e| {
                ctx.problem(&join(&key, "mode"), e);
                0o600
            }),
        };
        if mode & 0o007 != 0 {
            ctx.problem(&join(&key, "mode"), "lets every local user read the token; give at most owner and group access (e.g. \"0640\" with group)");
        }
        if mode & 0o200 == 0 {
            ctx.problem(
                &join(&key, "mode"),
                "must let the agent (the owner) write the file, e.g. \"0600\"",
            );
        }
        let gid = raw
            .group
            .and_then(|g| group_id(&join(&key, "group"), &g, ctx));
        let format = match raw.format.as_deref() {
            None | Some("token") => super::TokenFileFormat::Token,
            Some("json") => super::TokenFileFormat::Json,
            Some(other) => {
                ctx.problem(
                    &join(&key, "format"),
                    format!("`{other}` is not a format; use \"token\" or \"json\""),
                );
                super::TokenFileFormat::Token
            }
        };
        let on_rotate = raw.on_rotate;
        if on_rotate
            .as_ref()
            .is_some_and(|c| c.first().is_none_or(|p| p.is_empty()))
        {
            ctx.problem(
                &join(&key, "on_rotate"),
                "needs a program: [\"/path/to/program\", \"arg\", …]",
            );
        }
        let on_rotate_timeout = ctx
            .duration(&join(&key, "on_rotate_timeout"), raw.on_rotate_timeout)
            .unwrap_or(Duration::from_secs(30));
        if let Some(p) = &path
            && files.iter().any(|f| f.path == *p)
        {
            ctx.problem(&join(&key, "path"), "is listed twice");
        }
        if ctx.problems.len() > before {
            continue;
        }
        if let Some(path) = path {
            files.push(super::TokenFile {
                path,
                mode,
                gid,
                format,
                on_rotate,
                on_rotate_timeout,
            });
        }
    }
    files
}

/// `[[views]]`: each file read and its ViewDefinition checked now, so a broken one is a config
/// problem (exit 2) rather than a failed run.
fn resolve_views(value: config::Value, ctx: &mut Ctx) -> crate::views::ViewSet {
    let Ok(list) = value.into_array() else {
        ctx.problem(
            "views",
            "must be a list of views: [[views]] with file = \"….json\"",
        );
        return crate::views::ViewSet::default();
    };
    let mut loaded: Vec<crate::views::Materialised> = Vec::new();
    for (i, value) in list.into_iter().enumerate() {
        let key = format!("views[{i}]");
        let Some(raw) = ctx.parse::<RawView>(&key, value) else {
            continue;
        };
        let Some(file) = raw.file else {
            ctx.problem(
                &join(&key, "file"),
                "missing; name the ViewDefinition's JSON file",
            );
            continue;
        };
        let file = ctx.path(file);
        match crate::views::Materialised::load(&file) {
            Err(e) => ctx.problem(&join(&key, "file"), e.to_string()),
            Ok(v) => match loaded.iter().position(|o| o.table == v.table) {
                Some(j) => ctx.problem(
                    &join(&key, "file"),
                    format!(
                        "its view is named `{}`, like the view of views[{j}]; view names must be unique",
                        v.name
                    ),
                ),
                None => loaded.push(v),
            },
        }
    }
    crate::views::ViewSet::new(loaded)
}

/// `agent.database` as a PostgreSQL URL: parsed as libpq reads it (`sslmode` and the rest),
/// refused when it holds a password (which belongs in `agent.database_password`).
fn postgres_database(url: String, password: Option<SecretSpec>, ctx: &mut Ctx) -> Option<Database> {
    let parsed = match Url::parse(&url) {
        Ok(u) => u,
        Err(e) => {
            ctx.problem(
                "agent.database",
                format!("is not a valid PostgreSQL URL: {e}"),
            );
            return None;
        }
    };
    if parsed.password().is_some() {
        // The URL is not repeated: it holds the password.
        ctx.problem(
            "agent.database",
            "holds a password; remove it from the URL and give it as agent.database_password = { file = \"…\" }, { credential = \"…\" } or { env = \"…\" }",
        );
        return None;
    }
    if let Err(e) = url.parse::<sqlx::postgres::PgConnectOptions>() {
        ctx.problem(
            "agent.database",
            format!("is not a PostgreSQL URL ehrsync can use: {e}"),
        );
        return None;
    }
    let password = match password {
        Some(SecretSpec::Inline(_)) => {
            ctx.problem(
                "agent.database_password",
                "must not be written in the config file; use { file = \"…\" }, { credential = \"…\" } or { env = \"…\" }",
            );
            return None;
        }
        Some(spec) => Some(ctx.secret("agent.database_password", spec)?),
        None => None,
    };
    Some(Database::Postgres { url, password })
}

fn resolve_agent(raw: RawAgent, ctx: &mut Ctx) -> Option<Agent> {
    let password_given = raw.database_password.is_some();
    let database = match raw.database {
        Some(p) if p.as_os_str().is_empty() => {
            ctx.problem(
                "agent.database",
                "is empty; give a file path, a postgres:// URL, or remove the key for the default",
            );
            return None;
        }
        Some(p) if p.to_str().is_some_and(Database::is_postgres_url) => {
            let url = p.to_string_lossy().into_owned();
            postgres_database(url, raw.database_password, ctx)?
        }
        Some(p) => Database::File(ctx.path(p)),
        None => Database::File(default_database(ctx.env)),
    };
    if password_given && !matches!(database, Database::Postgres { .. }) {
        ctx.warn(
            "agent.database_password",
            "is set but agent.database is a SQLite file, which has no password; it is ignored",
        );
    }
    let listen = raw
        .metrics_listen
        .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.to_owned());
    let metrics_listen = match listen.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            ctx.problem(
                "agent.metrics_listen",
                format!("`{listen}` is not an IP address and port; write e.g. \"127.0.0.1:9870\""),
            );
            return None;
        }
    };
    let token_key = match (raw.token_key, &database) {
        (None, Database::File(path)) => KeySource::File {
            path: path.with_file_name("ehrsync.key"),
            create: true,
        },
        (None, Database::Postgres { .. }) => {
            ctx.problem(
                "agent.token_key",
                "is required when agent.database is a PostgreSQL URL: every agent sharing the database needs the same key (see docs/operations.md, \"Several agents\"); write e.g. { file = \"/etc/ehrsync/ehrsync.key\" }",
            );
            return None;
        }
        (Some(SecretSpec::File(p)), _) => KeySource::File {
            path: ctx.path(p),
            create: true,
        },
        (Some(SecretSpec::Env(var)), _) => KeySource::Env(var),
        (Some(SecretSpec::Credential(name)), _) => match ctx.env.get(secret::CREDENTIALS_DIRECTORY)
        {
            Some(dir) if !name.contains(['/', '\\']) && !name.is_empty() => KeySource::File {
                path: Path::new(&dir).join(name),
                create: false,
            },
            _ => {
                ctx.problem(
                    "agent.token_key",
                    format!("credential `{name}` needs ${} (set by systemd LoadCredential=) and a plain file name", secret::CREDENTIALS_DIRECTORY),
                );
                return None;
            }
        },
        (Some(SecretSpec::Inline(_)), _) => {
            ctx.problem(
                "agent.token_key",
                "must not be written in the config file (it would sit beside what it protects); use { file = \"…\" }, { credential = \"…\" } or { env = \"…\" }",
            );
            return None;
        }
    };
    // A refused value is recorded (so the config is refused) and the default stands in.
    let shutdown_grace = ctx
        .duration("agent.shutdown_grace", raw.shutdown_grace)
        .unwrap_or(DEFAULT_SHUTDOWN_GRACE);
    if shutdown_grace > MAX_SHUTDOWN_GRACE {
        ctx.problem(
            "agent.shutdown_grace",
            format!(
                "is longer than the {} allowed (service managers kill a process that takes this long to stop); write e.g. \"20s\", the default",
                humantime::format_duration(MAX_SHUTDOWN_GRACE)
            ),
        );
        return None;
    }
    if !metrics_listen.ip().is_loopback() {
        ctx.warn(
            "agent.metrics_listen",
            "is reachable from other hosts and /metrics has no authentication; limit it with a firewall",
        );
    }
    let ca_file = raw.ca_file.map(|p| ctx.path(p));
    if let Some(path) = &ca_file {
        match std::fs::read(path) {
            Err(e) => ctx.problem(
                "agent.ca_file",
                format!("cannot read {}: {e}", path.display()),
            ),
            Ok(pem) if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") => {
                ctx.problem(
                    "agent.ca_file",
                    format!(
                        "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                        path.display()
                    ),
                )
            }
            Ok(_) => {}
        }
    }
    let changes_retention = ctx
        .duration("agent.changes_retention", raw.changes_retention)
        .unwrap_or(super::DEFAULT_CHANGES_RETENTION);
    if changes_retention < Duration::from_secs(3600) {
        ctx.problem(
            "agent.changes_retention",
            "is shorter than 1h; readers of `ehrsync changes` need time to catch up",
        );
    }
    Some(Agent {
        database,
        metrics_listen,
        token_key,
        shutdown_grace,
        ca_file,
        changes_retention,
    })
}

fn resolve_accounts(value: config::Value, ctx: &mut Ctx) -> Vec<Account> {
    let table = match value.into_table() {
        Ok(t) => t,
        Err(_) => {
            ctx.problem("accounts", "must be a table of accounts: [accounts.NAME]");
            return Vec::new();
        }
    };
    let mut accounts: Vec<Account> = table
        .into_iter()
        .filter_map(|(name, value)| {
            let key = format!("accounts.{name}");
            let before = ctx.problems.len();
            let account = resolve_named_account(&name, &key, value, ctx);
            if ctx.problems.len() > before {
                only_from_the_environment(&name, &key, ctx);
            }
            account
        })
        .collect();
    accounts.sort_by(|a, b| a.name.cmp(&b.name));
    accounts
}

fn resolve_named_account(
    name: &str,
    key: &str,
    value: config::Value,
    ctx: &mut Ctx,
) -> Option<Account> {
    let name = match AccountName::parse(name) {
        Ok(n) => Some(n),
        Err(e) => {
            ctx.problem(key, e);
            None
        }
    };
    let value = jobs_must_be_a_list(key, value, ctx);
    let raw = ctx.parse::<RawAccount>(key, value)?;
    resolve_account(name?, key, raw, ctx)
}

/// When an account with problems is not in the file, only `EHRSYNC__…` variables create it:
/// most likely the account's name in a variable is mistyped. Says so, with the account of that
/// name in the file and the variable to set for it.
fn only_from_the_environment(name: &str, key: &str, ctx: &mut Ctx) {
    let Some(in_file) = &ctx.file_accounts else {
        return;
    };
    if in_file.contains(name) {
        return;
    }
    let vars: Vec<&str> = ctx.overrides.under(key).map(|(_, var)| var).collect();
    let (noun, verb, names) = match vars.as_slice() {
        [] => return,
        [one] => ("variable", "sets", (*one).to_owned()),
        [rest @ .., last] => (
            "variables",
            "set",
            format!("{} and {last}", rest.join(", ")),
        ),
    };
    let mut message =
        format!("is not in the config file; only the environment {noun} {names} {verb} it.");
    let known: Vec<&str> = in_file.iter().map(String::as_str).collect();
    if let Some(close) = suggest(name, &known) {
        // The variables written for the account in the file, in the case they were written in.
        let renamed: Vec<String> = vars
            .iter()
            .map(|var| {
                let levels: Vec<String> = var
                    .split(super::ENV_SEPARATOR)
                    .enumerate()
                    .map(|(i, level)| match i {
                        2 if level.chars().any(|c| c.is_ascii_lowercase()) => close.to_owned(),
                        2 => close.to_ascii_uppercase(),
                        _ => level.to_owned(),
                    })
                    .collect();
                levels.join(super::ENV_SEPARATOR)
            })
            .collect();
        message.push_str(&format!(
            " Did you mean `{close}` ({})?",
            renamed.join(", ")
        ));
    } else {
        message
            .push_str(" Name an account of the config file, or give this one every key it needs.");
    }
    ctx.problem(key, message);
}

/// `jobs` must be a list of tables (`[[accounts.NAME.jobs]]`). Anything else is reported here,
/// in words that say what to write, and taken out, so that the account's other keys are still
/// checked. (Left to serde, `[accounts.NAME.jobs]` would be "expected a sequence, found a
/// table", and the account's other problems would stay hidden behind it.)
fn jobs_must_be_a_list(key: &str, mut value: config::Value, ctx: &mut Ctx) -> config::Value {
    use config::ValueKind;
    let ValueKind::Table(table) = &mut value.kind else {
        return value;
    };
    let Some(jobs) = table.get("jobs") else {
        return value;
    };
    // `[accounts.NAME.jobs.patients]`: jobs written as named tables.
    let mut named: Vec<&str> = match &jobs.kind {
        ValueKind::Table(jobs) if jobs.values().all(|j| matches!(j.kind, ValueKind::Table(_))) => {
            jobs.keys().map(String::as_str).collect()
        }
        _ => Vec::new(),
    };
    named.sort_unstable();
    let jkey = join(key, "jobs");
    let named_hint = named.first().map(|first| {
        format!(
            "jobs are a list: write `[[{jkey}]]` (double brackets) above each job, with \
             `name = \"{first}\"` in it, not `[{jkey}.{first}]`"
        )
    });
    let found = match &jobs.kind {
        ValueKind::Array(_) => return value,
        ValueKind::Table(_) => "a table",
        ValueKind::String(_) => "a string",
        ValueKind::Boolean(_) => "a boolean",
        ValueKind::I64(_) | ValueKind::I128(_) | ValueKind::U64(_) | ValueKind::U128(_) => {
            "an integer"
        }
        ValueKind::Float(_) => "a number",
        ValueKind::Nil => "nothing",
    };
    let message = if ctx.overrides.under(&jkey).next().is_some() {
        format!(
            "jobs are a list and cannot be set from the environment; write each job in the \
             config file under `[[{jkey}]]`"
        )
    } else if let Some(hint) = named_hint {
        hint
    } else if found == "a table" {
        format!(
            "jobs are a list: write `[[{jkey}]]` (double brackets) above each job, not `[{jkey}]`"
        )
    } else {
        format!("expected a list of jobs, found {found}; write each job under `[[{jkey}]]`")
    };
    table.remove("jobs");
    ctx.problem(&jkey, message);
    value
}

/// Checks an `http(s)` endpoint: https, or http only to loopback (tests, sandboxes); no
/// credentials or fragment in the URL (URLs are printed in plans and logs).
fn endpoint_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("`{text}` is not a valid URL ({e})"))?;
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&url) => {}
        "http" => {
            return Err(format!(
                "`{text}` uses http:// to a host that is not loopback; use https:// \
                 (plain http is allowed only to 127.0.0.1, ::1 or localhost)"
            ));
        }
        other => return Err(format!("`{text}` has scheme `{other}`; use https://")),
    }
    if url.host().is_none() {
        return Err(format!("`{text}` has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials; use client_id and client_secret".to_owned());
    }
    if url.fragment().is_some() {
        return Err(format!("`{text}` must not have a #fragment"));
    }
    Ok(url)
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// The template variables a preset URL can use, with the account's values.
struct TemplateVars<'a> {
    tenant: Option<&'a str>,
    domain: Option<&'a str>,
}

/// Fills `{tenant}`/`{domain}` in `template`; `Err(var)` names the variable that has no value.
fn fill(template: &str, vars: &TemplateVars) -> Result<String, &'static str> {
    let mut out = template.to_owned();
    for (var, value) in [("tenant", vars.tenant), ("domain", vars.domain)] {
        let placeholder = format!("{{{var}}}");
        if out.contains(&placeholder) {
            out = out.replace(&placeholder, value.ok_or(var)?);
        }
    }
    Ok(out)
}

fn uses_var(template: Option<&str>, var: &str) -> bool {
    template.is_some_and(|t| t.contains(&format!("{{{var}}}")))
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// A preset field's value: unset → the preset's, `""` → none at all, else the given one.
fn overridable(value: Option<String>, preset: Option<&str>) -> Option<String> {
    match value {
        None => preset.map(str::to_owned),
        Some(v) if v.is_empty() => None,
        Some(v) => Some(v),
    }
}

fn resolve_account(
    name: AccountName,
    key: &str,
    raw: RawAccount,
    ctx: &mut Ctx,
) -> Option<Account> {
    let k = |field: &str| join(key, field);
    let before = ctx.problems.len();

    let Some(vendor) = raw.vendor else {
        let vendors = Vendor::ALL.map(Vendor::as_str);
        ctx.problem(
            &k("vendor"),
            format!("missing; choose one of {}", list(&vendors)),
        );
        return None;
    };
    let preset = vendor.preset();

    // Template variables: the domain is a DNS label, the tenant a domain name or GUID.
    if let Some(domain) = &raw.domain {
        let label = !domain.is_empty()
            && domain.len() <= 63
            && domain
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !domain.starts_with('-')
            && !domain.ends_with('-');
        if !label {
            ctx.problem(&k("domain"), format!("`{domain}` is not a sub-domain name (a-z, 0-9, `-`): for https://acme.nikohealth.com write \"acme\""));
        }
    }
    if let Some(tenant) = &raw.tenant
        && (tenant.is_empty()
            || !tenant
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'))
    {
        ctx.problem(
            &k("tenant"),
            format!("`{tenant}` is not a tenant name or id"),
        );
    }
    // Only valid values fill templates, so a bad one is reported once, at its own key.
    let vars = TemplateVars {
        tenant: raw
            .tenant
            .as_deref()
            .filter(|_| !ctx.has_problem(&k("tenant")))
            .or(preset.tenant),
        domain: raw
            .domain
            .as_deref()
            .filter(|_| !ctx.has_problem(&k("domain"))),
    };

    // Token endpoint: token_url, then issuer (discovery), then the preset.
    let template = match preset.token_endpoint {
        TokenEndpointDefault::Template(t) => Some(t),
        _ => None,
    };
    let issuer = raw
        .issuer
        .as_deref()
        .and_then(|text| match endpoint_url(text) {
            Ok(url) => Some(url),
            Err(e) => {
                ctx.problem(&k("issuer"), e);
                None
            }
        });
    let token_endpoint = if let Some(text) = &raw.token_url {
        endpoint_url(text)
            .map(TokenEndpoint::Url)
            .map_err(|e| ctx.problem(&k("token_url"), e))
            .ok()
    } else if let Some(issuer) = &issuer {
        Some(TokenEndpoint::Discovery {
            issuer: issuer.clone(),
        })
    } else if raw.issuer.is_some() {
        None // already reported
    } else {
        match preset.token_endpoint {
            TokenEndpointDefault::Template(t) => match fill(t, &vars) {
                Ok(url) => endpoint_url(&url)
                    .map(TokenEndpoint::Url)
                    .map_err(|e| ctx.problem(&k("token_url"), e))
                    .ok(),
                Err(var) if ctx.has_problem(&k(var)) => None,
                Err(var) => {
                    ctx.problem(
                        &k(var),
                        format!("missing; the {vendor} token URL {t} needs it (or set token_url)"),
                    );
                    None
                }
            },
            TokenEndpointDefault::Discovery => {
                ctx.problem(
                    &k("issuer"),
                    format!("missing; {vendor} accounts find their token endpoint by OpenID discovery from the issuer URL (or set token_url)"),
                );
                None
            }
            TokenEndpointDefault::None => {
                ctx.problem(&k("token_url"), format!("missing; {vendor} accounts need token_url (or issuer, for OpenID discovery)"));
                None
            }
        }
    };
    let template_used = raw.token_url.is_none() && raw.issuer.is_none();
    let optional_url = |ctx: &mut Ctx, field: &str, text: &Option<String>| {
        text.as_deref()
            .and_then(|t| endpoint_url(t).map_err(|e| ctx.problem(&k(field), e)).ok())
    };
    let authorization_endpoint = match (&raw.authorization_url, preset.authorization_endpoint) {
        (Some(_), _) => optional_url(ctx, "authorization_url", &raw.authorization_url),
        // The preset's authorization page belongs with the preset's token URL only.
        (None, Some(t)) if template_used => {
            fill(t, &vars).ok().and_then(|url| endpoint_url(&url).ok())
        }
        _ => None,
    };
    let device_authorization_endpoint = optional_url(
        ctx,
        "device_authorization_url",
        &raw.device_authorization_url,
    );
    let redirect_port = match raw.redirect_port {
        Some(0) => {
            ctx.problem(
                &k("redirect_port"),
                "must be 1–65535; leave it out to let each login pick a free port",
            );
            None
        }
        other => other,
    };
    if raw.tenant.is_some() && !(template_used && uses_var(template, "tenant")) {
        ctx.warn(
            &k("tenant"),
            "is not used: the token endpoint does not come from a URL with {tenant}",
        );
    }

    // Grant and client authentication.
    let grant = raw.grant.or(preset.grant);
    let Some(grant) = grant else {
        let grants = [
            Grant::Password,
            Grant::ClientCredentials,
            Grant::AuthorizationCode,
        ]
        .map(Grant::as_str);
        ctx.problem(
            &k("grant"),
            format!("missing; {vendor} accounts choose one of {}", list(&grants)),
        );
        return None;
    };
    let client_auth = raw.client_auth.or(preset.client_auth);
    if grant == Grant::AuthorizationCode {
        let known = authorization_endpoint.is_some()
            || issuer.is_some()
            || ctx.has_problem(&k("authorization_url"))
            || ctx.has_problem(&k("issuer"));
        if !known {
            ctx.problem(
                &k("authorization_url"),
                "missing; the authorization_code grant sends a person to the provider's login page: \
                 set authorization_url, or issuer for OpenID discovery",
            );
        }
    } else {
        for (field, set) in [
            ("authorization_url", raw.authorization_url.is_some()),
            ("redirect_port", raw.redirect_port.is_some()),
        ] {
            if set {
                ctx.warn(
                    &k(field),
                    format!("is not used: `ehrsync login` needs it only for the authorization_code grant, and this account's grant is {grant}"),
                );
            }
        }
    }

    let client_id = match raw.client_id {
        Some(id) if !id.0.is_empty() => Some(id.0),
        Some(_) => {
            ctx.problem(
                &k("client_id"),
                "is empty; give the application (client) id the vendor issued",
            );
            None
        }
        None => {
            ctx.problem(
                &k("client_id"),
                "missing; give the application (client) id the vendor issued",
            );
            None
        }
    };
    let client_secret = raw
        .client_secret
        .and_then(|s| ctx.secret(&k("client_secret"), s));
    let secret_given = ctx.has_problem(&k("client_secret"));
    if client_secret.is_none() && !secret_given {
        let why = if grant == Grant::ClientCredentials {
            Some("the client_credentials grant authenticates with it".to_owned())
        } else if preset.client_secret_required {
            Some(format!(
                "{vendor} requires it (see {})",
                preset.documented_in
            ))
        } else if raw.client_auth == Some(ClientAuth::Basic) {
            // Asked for explicitly. Without a secret and without `client_auth`, the account is
            // a public client (RFC 8252 native apps): its client_id goes in the form.
            Some("basic client authentication sends client_id:client_secret".to_owned())
        } else {
            None
        };
        if let Some(why) = why {
            ctx.problem(&k("client_secret"), format!("missing; {why}"));
        }
    }

    let username = non_empty(raw.username);
    let password = raw.password.and_then(|s| ctx.secret(&k("password"), s));
    if grant == Grant::Password {
        if username.is_none() {
            ctx.problem(
                &k("username"),
                "missing; the password grant logs in with username and password",
            );
        }
        if password.is_none() && !ctx.has_problem(&k("password")) {
            ctx.problem(
                &k("password"),
                "missing; the password grant logs in with username and password",
            );
        }
    } else {
        for (field, set) in [
            ("username", username.is_some()),
            ("password", password.is_some()),
        ] {
            if set {
                ctx.warn(&k(field), format!("is not used by the {grant} grant"));
            }
        }
    }

    // Lifetimes.
    let positive =
        |ctx: &mut Ctx, field: &str, d: Option<HumanDuration>| match ctx.duration(&k(field), d) {
            Some(d) if d.is_zero() => {
                ctx.problem(
                    &k(field),
                    "must be longer than zero; write a duration such as \"1h\", or leave the key \
                     out for the vendor's default",
                );
                None
            }
            other => other,
        };
    let access_token = positive(ctx, "access_token_lifetime", raw.access_token_lifetime)
        .or(preset.access_token_lifetime);
    let refresh_token = positive(ctx, "refresh_token_lifetime", raw.refresh_token_lifetime)
        .or(preset.refresh_token_lifetime);
    let refresh_ratio = raw.refresh_ratio.unwrap_or(DEFAULT_REFRESH_RATIO);
    if !REFRESH_RATIO_RANGE.contains(&refresh_ratio) {
        ctx.problem(
            &k("refresh_ratio"),
            format!(
                "{refresh_ratio} is outside {}–{}; it is the fraction of a token's lifetime after which to refresh (default {DEFAULT_REFRESH_RATIO})",
                REFRESH_RATIO_RANGE.start(),
                REFRESH_RATIO_RANGE.end()
            ),
        );
    }
    let min_lead = ctx
        .duration(&k("min_lead"), raw.min_lead)
        .unwrap_or(DEFAULT_MIN_LEAD);

    // API base, headers and jobs.
    let api_template = preset.api_base;
    let api_base = match (&raw.api_base, api_template) {
        (Some(text), _) => endpoint_url(text)
            .map_err(|e| ctx.problem(&k("api_base"), e))
            .ok(),
        (None, Some(t)) => match fill(t, &vars) {
            Ok(url) => endpoint_url(&url)
                .map_err(|e| ctx.problem(&k("api_base"), e))
                .ok(),
            Err(_) => None, // reported below if a job needs it
        },
        (None, None) => None,
    };
    let domain_used = (template_used && uses_var(template, "domain"))
        || (raw.api_base.is_none() && uses_var(api_template, "domain"));
    if raw.domain.is_some() && !domain_used {
        ctx.warn(
            &k("domain"),
            "is not used: neither the token URL nor api_base comes from a URL with {domain}",
        );
    }

    let practice_id = raw.practice_id.map(|p| p.0);
    let headers = resolve_headers(
        key,
        preset.practice_id_header,
        practice_id,
        raw.headers,
        ctx,
    );

    let jobs = resolve_jobs(key, raw.jobs, ctx);
    let token_files = resolve_token_files(key, raw.token_files, ctx);
    let follow_on = ctx.has_problem(&k("api_base"))
        || (uses_var(api_template, "domain") && ctx.has_problem(&k("domain")));
    if !jobs.is_empty() && api_base.is_none() && !follow_on {
        let hint = if uses_var(api_template, "domain") {
            " (or domain)"
        } else {
            ""
        };
        ctx.problem(
            &k("api_base"),
            format!("missing; jobs call the vendor API below this URL — set api_base{hint}"),
        );
    }

    if ctx.problems.len() > before {
        return None;
    }
    Some(Account {
        name,
        vendor,
        token_endpoint: token_endpoint?,
        issuer,
        authorization_endpoint,
        device_authorization_endpoint,
        redirect_port,
        grant,
        client_auth,
        client_id: client_id?,
        client_secret,
        username,
        password,
        resource: overridable(raw.resource, preset.resource),
        scope: overridable(raw.scope, preset.scope),
        lifetimes: Lifetimes {
            access_token,
            refresh_token,
            refresh_ratio,
            min_lead,
        },
        api_base,
        headers,
        needs_person_codes: preset.needs_person_codes,
        jobs,
        token_files,
    })
}

/// RFC 9110 `tchar`: what a header name may contain.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn resolve_headers(
    key: &str,
    practice_header: Option<&'static str>,
    practice_id: Option<String>,
    raw: Option<BTreeMap<String, SecretSpec>>,
    ctx: &mut Ctx,
) -> Vec<Header> {
    let mut headers = Vec::new();
    for (name, spec) in raw.unwrap_or_default() {
        let hkey = format!("{key}.headers.{name}");
        if !is_token(&name) {
            ctx.problem(&hkey, format!("`{name}` is not a valid HTTP header name"));
            continue;
        }
        if name.eq_ignore_ascii_case("authorization") {
            ctx.problem(
                &hkey,
                "is set by ehrsync from the account's token; remove it",
            );
            continue;
        }
        let value = match spec {
            // A plain string in `headers` is an ordinary header value, not a secret written inline.
            SecretSpec::Inline(v) => {
                HeaderValue::Public(secrecy::ExposeSecret::expose_secret(&v).to_owned())
            }
            other => match ctx.secret(&hkey, other) {
                Some(s) => HeaderValue::Secret(s),
                None => continue,
            },
        };
        let text = match &value {
            HeaderValue::Public(v) => v.as_str(),
            HeaderValue::Secret(s) => s.expose(),
        };
        if text.chars().any(|c| c.is_control() && c != '\t') {
            ctx.problem(
                &hkey,
                "contains a control character (such as a newline); a header value is one line",
            );
            continue;
        }
        headers.push(Header { name, value });
    }
    let practice_key = join(key, "practice_id");
    match (practice_header, practice_id) {
        (Some(h), _) if headers.iter().any(|x| x.name.eq_ignore_ascii_case(h)) => {}
        (Some(h), Some(id)) => {
            if id.is_empty() || id.chars().any(char::is_control) {
                ctx.problem(&practice_key, "must be a non-empty, single-line id");
            } else {
                headers.insert(
                    0,
                    Header {
                        name: h.to_owned(),
                        value: HeaderValue::Public(id),
                    },
                );
            }
        }
        (Some(h), None) => {
            ctx.problem(
                &practice_key,
                format!("missing; every API call carries it as the {h} header"),
            );
        }
        (None, Some(_)) => {
            ctx.warn(
                &practice_key,
                "is not used by this vendor; send custom headers with `headers`",
            );
        }
        (None, None) => {}
    }
    headers
}

fn resolve_jobs(key: &str, raw_jobs: Vec<config::Value>, ctx: &mut Ctx) -> Vec<Job> {
    let mut jobs: Vec<Job> = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, value) in raw_jobs.into_iter().enumerate() {
        let jkey = format!("{key}.jobs[{i}]");
        let k = |field: &str| join(&jkey, field);
        let Some(raw) = ctx.parse::<RawJob>(&jkey, value) else {
            continue;
        };
        let before = ctx.problems.len();
        let name = match raw.name.as_deref().map(JobName::parse) {
            None => {
                ctx.problem(
                    &k("name"),
                    "missing; every job needs a name (used in metrics and `ehrsync sync`)",
                );
                None
            }
            Some(Err(e)) => {
                ctx.problem(&k("name"), e);
                None
            }
            Some(Ok(name)) => {
                if let Some(first) = seen.insert(name.as_str().to_owned(), i) {
                    ctx.problem(
                        &k("name"),
                        format!("duplicate job name `{name}` (also jobs[{first}]); job names must be unique within an account"),
                    );
                }
                Some(name)
            }
        };
        let kind = match raw.kind {
            None => {
                ctx.problem(
                    &k("kind"),
                    "missing; choose `fhir` or `nikohealth_patients`",
                );
                None
            }
            Some(RawJobKind::Fhir) => {
                let list_keys = [
                    ("path", raw.path.is_some()),
                    ("page_param", raw.page_param.is_some()),
                    ("page_size_param", raw.page_size_param.is_some()),
                    ("first_page", raw.first_page.is_some()),
                    ("items", raw.items.is_some()),
                    ("id_field", raw.id_field.is_some()),
                    ("updated_field", raw.updated_field.is_some()),
                ];
                for (field, set) in list_keys {
                    if set {
                        ctx.problem(
                            &k(field),
                            "applies only to kind = \"nikohealth_patients\"; remove it",
                        );
                    }
                }
                let resource = raw
                    .resource
                    .unwrap_or_else(|| DEFAULT_FHIR_RESOURCE.to_owned());
                let valid = resource.len() <= 64
                    && resource.starts_with(|c: char| c.is_ascii_uppercase())
                    && resource.chars().all(|c| c.is_ascii_alphabetic());
                if !valid {
                    ctx.problem(&k("resource"), format!("`{resource}` is not a FHIR resource type (such as Patient or Encounter)"));
                }
                let overlap = ctx
                    .duration(&k("overlap"), raw.overlap)
                    .unwrap_or(DEFAULT_OVERLAP);
                Some(JobKind::Fhir { resource, overlap })
            }
            Some(RawJobKind::NikohealthPatients) => {
                for (field, set) in [
                    ("resource", raw.resource.is_some()),
                    ("overlap", raw.overlap.is_some()),
                ] {
                    if set {
                        ctx.problem(&k(field), "applies only to kind = \"fhir\"; remove it");
                    }
                }
                if raw.reconcile.is_some() {
                    ctx.problem(
                        &k("reconcile"),
                        "applies only to kind = \"fhir\": a nikohealth_patients run reads the whole list, so each completed run reconciles; remove it",
                    );
                }
                list_paging(
                    &jkey,
                    raw.path,
                    raw.page_param,
                    raw.page_size_param,
                    raw.first_page,
                    raw.items,
                    raw.id_field,
                    raw.updated_field,
                    ctx,
                )
                .map(JobKind::NikohealthPatients)
            }
        };
        let schedule = match raw.schedule.as_deref().map(Schedule::parse) {
            None => {
                ctx.problem(
                    &k("schedule"),
                    "missing; give a cron schedule with seconds first, e.g. \"0 */15 * * * *\"",
                );
                None
            }
            Some(Err(e)) => {
                let text = raw.schedule.as_deref().unwrap_or_default();
                ctx.problem(&k("schedule"), schedule_problem(text, &e));
                None
            }
            Some(Ok(s)) => Some(s),
        };
        let reconcile = match raw.reconcile.as_deref().map(Schedule::parse) {
            None => None,
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                let text = raw.reconcile.as_deref().unwrap_or_default();
                ctx.problem(&k("reconcile"), schedule_problem(text, &e));
                None
            }
        };
        let reconcile_max_delete = match raw.reconcile_max_delete.as_deref() {
            None => DEFAULT_RECONCILE_MAX_DELETE,
            Some(text) => match parse_percentage(text) {
                Ok(f) => f,
                Err(e) => {
                    ctx.problem(&k("reconcile_max_delete"), e);
                    DEFAULT_RECONCILE_MAX_DELETE
                }
            },
        };
        let page_size = raw.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
        if !(1..=MAX_PAGE_SIZE).contains(&page_size) {
            ctx.problem(
                &k("page_size"),
                format!("{page_size} is outside 1–{MAX_PAGE_SIZE}"),
            );
        }
        let token_wait = ctx
            .duration(&k("token_wait"), raw.token_wait)
            .unwrap_or(DEFAULT_TOKEN_WAIT);
        if !(Duration::from_secs(1)..=MAX_TOKEN_WAIT).contains(&token_wait) {
            ctx.problem(
                &k("token_wait"),
                format!(
                    "{} is outside 1s–1h",
                    humantime::format_duration(token_wait)
                ),
            );
        }
        if ctx.problems.len() == before
            && let (Some(name), Some(kind), Some(schedule)) = (name, kind, schedule)
        {
            jobs.push(Job {
                name,
                kind,
                schedule,
                reconcile,
                reconcile_max_delete,
                page_size,
                token_wait,
            });
        }
    }
    jobs
}

/// `"10%"` as 0.1: a percentage from 0 to 100.
fn parse_percentage(text: &str) -> Result<f64, String> {
    let number = text
        .trim()
        .strip_suffix('%')
        .map(str::trim)
        .and_then(|n| n.parse::<f64>().ok())
        .filter(|n| (0.0..=100.0).contains(n));
    number.map(|n| n / 100.0).ok_or_else(|| {
        format!("`{text}` is not a percentage from 0% to 100%; write e.g. \"10%\", the default")
    })
}

/// What to say about a schedule that [`Schedule::parse`] refused with `error`. A five-field
/// (Unix) cron gets the six-field expression to write; other field counts are named, since
/// croner's own words ("Pattern must have 6 or 7 fields when seconds are required and years
/// are optional") do not say what to write.
fn schedule_problem(text: &str, error: &str) -> String {
    const SIX: &str = "ehrsync schedules have six fields, seconds first";
    const EXAMPLE: &str = "e.g. \"0 */15 * * * *\" (every 15 minutes)";
    let fields: Vec<&str> = text.split_whitespace().collect();
    match fields.len() {
        5 => {
            let fixed = format!("0 {}", fields.join(" "));
            match Schedule::parse(&fixed) {
                Ok(_) => format!("`{text}` has five fields; {SIX}: add a seconds field: `{fixed}`"),
                Err(e) => format!(
                    "`{text}` has five fields; {SIX}, and with a seconds field added (`{fixed}`) \
                     it is still not valid ({e}); write {EXAMPLE}"
                ),
            }
        }
        0 => format!("is empty; write six fields, seconds first, in UTC, {EXAMPLE}"),
        // croner also takes a seventh field, the year.
        6 | 7 => format!(
            "`{text}` is not a valid schedule ({error}); write six fields, seconds first, in UTC, {EXAMPLE}"
        ),
        n => format!(
            "`{text}` has {n} field{}; {SIX} (second minute hour day-of-month month \
             day-of-week, in UTC), {EXAMPLE}",
            if n == 1 { "" } else { "s" }
        ),
    }
}

/// The paging of a `nikohealth_patients` job, defaults filled in.
#[allow(clippy::too_many_arguments)] // one argument per config key, each named at the call
fn list_paging(
    jkey: &str,
    path: Option<String>,
    page_param: Option<String>,
    page_size_param: Option<String>,
    first_page: Option<u32>,
    items: Option<String>,
    id_field: Option<String>,
    updated_field: Option<String>,
    ctx: &mut Ctx,
) -> Option<ListPaging> {
    let before = ctx.problems.len();
    let k = |field: &str| join(jkey, field);
    let path = path.unwrap_or_else(|| DEFAULT_LIST_PATH.to_owned());
    let path_ok = path.starts_with('/')
        && !path.contains(['?', '#'])
        && path.chars().all(|c| c.is_ascii_graphic());
    if !path_ok {
        ctx.problem(
            &k("path"),
            format!("`{path}` is not a path: start it with `/`, without a query (`?`) or spaces"),
        );
    }
    let mut word = |field: &str, value: Option<String>, default: &str, may_be_empty: bool| {
        let value = value.unwrap_or_else(|| default.to_owned());
        let ok = (may_be_empty || !value.is_empty())
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.$".contains(c));
        if !ok {
            ctx.problem(
                &k(field),
                format!("`{value}` is not a field or parameter name (letters, digits, `_`, `-`, `.`, `$`)"),
            );
        }
        value
    };
    let page_param = word("page_param", page_param, "page", false);
    let page_size_param = word("page_size_param", page_size_param, "pageSize", false);
    let id_field = word("id_field", id_field, "id", false);
    let updated_field = word("updated_field", updated_field, "modifiedDate", true);
    let first_page = first_page.unwrap_or(1);
    if first_page > 1 {
        ctx.problem(
            &k("first_page"),
            format!("{first_page} is not a first page number: use 0 or 1"),
        );
    }
    let items = items.unwrap_or_else(|| "/items".to_owned());
    if !(items.is_empty() || items.starts_with('/')) {
        ctx.problem(
            &k("items"),
            format!("`{items}` is not a JSON pointer: write `/items`, `/data/patients`, or `\"\"` for a page that is itself the array"),
        );
    }
    (ctx.problems.len() == before).then(|| ListPaging {
        path,
        page_param,
        page_size_param,
        first_page,
        items,
        id_field,
        updated_field: (!updated_field.is_empty()).then_some(updated_field),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_https_unless_loopback() {
        assert!(endpoint_url("https://login.example/token").is_ok());
        for ok in [
            "http://127.0.0.1:8080/t",
            "http://localhost/t",
            "http://[::1]:1/t",
            "http://127.9.9.9/t",
        ] {
            assert!(endpoint_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://login.example/t",
            "http://10.0.0.1/t",
            "ftp://x/t",
            "not a url",
            "https://u:p@x/t",
            "https://x/t#f",
        ] {
            assert!(endpoint_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn templates_fill_and_name_the_missing_variable() {
        let vars = TemplateVars {
            tenant: Some("t.example"),
            domain: None,
        };
        assert_eq!(
            fill("https://h/{tenant}/x", &vars),
            Ok("https://h/t.example/x".to_owned())
        );
        assert_eq!(fill("https://{domain}.h/x", &vars), Err("domain"));
    }

    #[test]
    fn header_names_are_tokens() {
        assert!(is_token("nx-practice-id"));
        assert!(!is_token("bad header"));
        assert!(!is_token(""));
    }
}
