//! Configuration: the TOML file plus `EHRSYNC__…` environment overrides, validated into a
//! resolved plan ([`Config`]) in which vendor presets are applied and secrets already read.
//!
//! Loading either yields a complete, valid [`Config`] (with warnings) or a [`ConfigError`]
//! listing every problem found, each naming its key path and the fix. Nothing here performs
//! network I/O or touches the database; the only reads are the config file, the environment and
//! secret files.

mod problems;
mod raw;
mod resolve;
pub mod secret;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use url::Url;

pub use problems::{ConfigError, Problem};
/// How every duration in the config is read (and what is refused, with what to write instead).
pub use raw::parse_duration;
pub use secret::{Secret, SecretOrigin};

use crate::vendor::{ClientAuth, Grant, Vendor};

/// Prefix of environment variables that override config keys: `EHRSYNC__AGENT__DATABASE`
/// overrides `agent.database`, `EHRSYNC__ACCOUNTS__NIKO__DOMAIN` overrides `accounts.niko.domain`.
pub const ENV_PREFIX: &str = "EHRSYNC";
/// Separator between the prefix and key levels in override variable names.
pub const ENV_SEPARATOR: &str = "__";
/// Default metrics listener: loopback only, since `/metrics` has no authentication.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9870";
/// Default for `agent.shutdown_grace`; `systemd/ehrsync.service`'s `TimeoutStopSec=` is above it.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// The longest `agent.shutdown_grace` accepted.
/// `agent.changes_retention` unless configured: 90 days.
pub const DEFAULT_CHANGES_RETENTION: Duration = Duration::from_secs(90 * 86_400);
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(600);

/// A validated configuration: what the agent will do.
#[derive(Debug)]
pub struct Config {
    /// The file this was loaded from.
    pub path: PathBuf,
    /// Names of the `EHRSYNC__…` variables that overrode file keys.
    pub env_overrides: Vec<String>,
    pub agent: Agent,
    /// Sorted by name.
    pub accounts: Vec<Account>,
    /// The `[[views]]`, read and checked (a reload does not change them).
    pub views: crate::views::ViewSet,
    /// `[broker]`, when configured (a reload changes its clients, not where it listens).
    pub broker: Option<BrokerSettings>,
}

impl Config {
    pub fn account(&self, name: &str) -> Option<&Account> {
        self.accounts.iter().find(|a| a.name.as_str() == name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub database: Database,
    pub metrics_listen: SocketAddr,
    pub token_key: KeySource,
    /// How long a stop waits for runs in progress (see `agent.shutdown_grace`).
    pub shutdown_grace: Duration,
    /// Extra certificate authorities (PEM) every HTTPS request trusts (`agent.ca_file`).
    pub ca_file: Option<PathBuf>,
    /// How long `changes` rows are kept (`agent.changes_retention`).
    pub changes_retention: Duration,
}

/// Where the store lives (`agent.database`).
#[derive(Debug, Clone, PartialEq)]
pub enum Database {
    /// A SQLite file, on this machine only.
    File(PathBuf),
    /// A PostgreSQL database several agents may share.
    Postgres {
        /// The `postgres://` URL as written, which holds no password.
        url: String,
        /// `agent.database_password`; without it libpq's `PGPASSWORD` and `.pgpass` apply.
        password: Option<Secret>,
    },
}

impl Database {
    /// The SQLite file, if the store is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Database::File(p) => Some(p),
            Database::Postgres { .. } => None,
        }
    }

    /// Whether `text` names a PostgreSQL database rather than a file.
    pub fn is_postgres_url(text: &str) -> bool {
        let lower = text.trim_start().to_ascii_lowercase();
        lower.starts_with("postgres://") || lower.starts_with("postgresql://")
    }
}

/// For people: the file's path, or the URL (which never holds the password).
impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::File(p) => write!(f, "{}", p.display()),
            Database::Postgres { url, .. } => f.write_str(url),
        }
    }
}

/// Where the key that encrypts stored tokens comes from. It is read (or created) when the
/// database is opened for writing, never by `check-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A key file; `create` when it may be generated on first start.
    File { path: PathBuf, create: bool },
    /// An environment variable holding the key.
    Env(String),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::File { path, create: true } => {
                write!(f, "file {} (created on first start)", path.display())
            }
            KeySource::File {
                path,
                create: false,
            } => write!(f, "file {}", path.display()),
            KeySource::Env(var) => write!(f, "env {var}"),
        }
    }
}

/// An account name: 1–64 of `a-z 0-9 - _`, starting with a letter or digit. It is a metric
/// label, a CLI argument and part of `EHRSYNC__ACCOUNTS__NAME__…` (which the environment source
/// lower-cases), hence the strict alphabet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccountName(String);

/// A job name, with the same alphabet as [`AccountName`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobName(String);

macro_rules! name_type {
    ($t:ident) => {
        impl $t {
            pub fn parse(s: &str) -> Result<Self, String> {
                let ok = (1..=64).contains(&s.len())
                    && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && s.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'
                    })
                    && !s.contains("__");
                if ok {
                    Ok($t(s.to_owned()))
                } else {
                    Err(format!(
                        "`{s}` is not a valid name: use 1–64 characters of a-z, 0-9, `-` and `_`, \
                         starting with a letter or digit, without `__`"
                    ))
                }
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
name_type!(AccountName);
name_type!(JobName);

/// One vendor account with its preset applied.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: AccountName,
    pub vendor: Vendor,
    pub token_endpoint: TokenEndpoint,
    /// The OpenID issuer, when configured: discovery supplies what the config does not set
    /// (token, authorization and device endpoints, client authentication, PKCE support, JWKS).
    pub issuer: Option<Url>,
    /// Where `ehrsync login` sends the person (explicit or from the preset); `None`: discovery's.
    pub authorization_endpoint: Option<Url>,
    /// RFC 8628 device authorization endpoint for `ehrsync login --device`; `None`: discovery's.
    pub device_authorization_endpoint: Option<Url>,
    /// Port of `ehrsync login`'s loopback redirect; `None`: a free port per login.
    pub redirect_port: Option<u16>,
    pub grant: Grant,
    /// `None`: chosen from OpenID discovery's supported methods, else `basic`.
    pub client_auth: Option<ClientAuth>,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// `resource` form field, if any is sent.
    pub resource: Option<String>,
    /// `scope` form field, if any is sent.
    pub scope: Option<String>,
    pub lifetimes: Lifetimes,
    pub api_base: Option<Url>,
    /// Headers on every API call (besides `Authorization`), preset ones included.
    pub headers: Vec<Header>,
    /// The preset's error codes that mean a person must act (not configurable: vendor facts).
    pub needs_person_codes: &'static [&'static str],
    pub jobs: Vec<Job>,
    /// Files the access token is written to on every new token.
    pub token_files: Vec<TokenFile>,
}

impl Account {
    /// Whether tokens obtained under `self` are tokens of `other` too: the same vendor, token
    /// endpoint, grant, client, user, resource and scope. When this changes, stored tokens
    /// belong to another identity and are dropped.
    pub fn same_identity(&self, other: &Account) -> bool {
        self.vendor == other.vendor
            && self.token_endpoint == other.token_endpoint
            && self.grant == other.grant
            && self.client_id == other.client_id
            && self.username == other.username
            && self.resource == other.resource
            && self.scope == other.scope
    }

    /// Whether every setting except the jobs is equal, so the account's token owner can keep
    /// running unchanged across a reload.
    pub fn same_settings(&self, other: &Account) -> bool {
        // Destructured so that a new field cannot be forgotten here.
        let Account {
            name,
            vendor: _,
            token_endpoint: _,
            issuer,
            authorization_endpoint,
            device_authorization_endpoint,
            redirect_port,
            grant: _,
            client_auth,
            client_id: _,
            client_secret,
            username: _,
            password,
            resource: _,
            scope: _,
            lifetimes,
            api_base,
            headers,
            needs_person_codes,
            jobs: _,
            token_files,
        } = self;
        self.same_identity(other)
            && *name == other.name
            && *issuer == other.issuer
            && *authorization_endpoint == other.authorization_endpoint
            && *device_authorization_endpoint == other.device_authorization_endpoint
            && *redirect_port == other.redirect_port
            && *client_auth == other.client_auth
            && *client_secret == other.client_secret
            && *password == other.password
            && *lifetimes == other.lifetimes
            && *api_base == other.api_base
            && *headers == other.headers
            && *needs_person_codes == other.needs_person_codes
            && *token_files == other.token_files
    }
}

/// Where an account's token endpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenEndpoint {
    Url(Url),
    /// Read from `{issuer}/.well-known/openid-configuration`.
    Discovery {
        issuer: Url,
    },
}

impl fmt::Display for TokenEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenEndpoint::Url(url) => write!(f, "{url}"),
            TokenEndpoint::Discovery { issuer } => {
                write!(f, "discovered from {}", discovery_url(issuer))
            }
        }
    }
}

/// The OpenID discovery document's URL for `issuer` (OpenID Connect Discovery 1.0 §4).
pub fn discovery_url(issuer: &Url) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.as_str().trim_end_matches('/')
    )
}

/// Timing settings of one account's token lifecycle.
#[derive(Debug, Clone, PartialEq)]
pub struct Lifetimes {
    /// Assumed when a token response states no lifetime.
    pub access_token: Option<Duration>,
    /// Assumed when a refresh token arrives without `refresh_token_expires_in`.
    pub refresh_token: Option<Duration>,
    pub refresh_ratio: f64,
    pub min_lead: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub name: String,
    pub value: HeaderValue,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HeaderValue {
    Public(String),
    Secret(Secret),
}

impl fmt::Display for HeaderValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderValue::Public(v) => f.write_str(v),
            HeaderValue::Secret(s) => write!(f, "{s}"),
        }
    }
}

/// One scheduled pull.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub name: JobName,
    pub kind: JobKind,
    pub schedule: Schedule,
    /// When a run also sweeps every id and reconciles deletions (`fhir` jobs).
    pub reconcile: Option<Schedule>,
    /// The largest fraction of the records of its type a sweep may delete (0–1).
    pub reconcile_max_delete: f64,
    pub page_size: u32,
    /// How long a run waits for a valid access token before it fails.
    pub token_wait: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    /// FHIR R4 search of one resource type; incremental from `meta.lastUpdated − overlap`.
    Fhir { resource: String, overlap: Duration },
    /// NikoHealth's paged patient list (always pulled whole: it has no change filter).
    NikohealthPatients(ListPaging),
}

/// How a paged JSON list (NikoHealth's patients) is walked. The vendor does not publish its
/// paging, so every part is configurable; the defaults are in `config::raw`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPaging {
    /// Below `api_base`, starting with `/`.
    pub path: String,
    pub page_param: String,
    pub page_size_param: String,
    pub first_page: u32,
    /// RFC 6901 JSON pointer to the records array; `""` is the whole page.
    pub items: String,
    pub id_field: String,
    pub updated_field: Option<String>,
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobKind::Fhir { resource, .. } => write!(f, "fhir {resource}"),
            JobKind::NikohealthPatients(_) => f.write_str("nikohealth_patients"),
        }
    }
}

/// A validated cron schedule (six fields, seconds first, UTC), parsed exactly as
/// tokio-cron-scheduler parses it.
#[derive(Clone)]
pub struct Schedule {
    text: String,
    cron: croner::Cron,
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Self, String> {
        // croner skips empty list items, so a field of only `,` selects no value at all; with
        // no second (or minute, or hour) to match, its search below runs ~100 s before it
        // gives up.
        if text
            .split_whitespace()
            .any(|field| field.split(',').any(|item| item.trim().is_empty()))
        {
            return Err("a field has an empty item in its `,` list".to_owned());
        }
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .build()
            .parse(text)
            .map_err(|e| e.to_string())?;
        // A pattern can be well-formed yet never fire (`0 0 0 30 2 *`): that is a mistake too.
        if cron.find_next_occurrence(&Utc::now(), false).is_err() {
            return Err("never fires".to_owned());
        }
        Ok(Schedule {
            text: text.to_owned(),
            cron,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first time strictly after `after` that the schedule fires (always a whole second).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // croner carries the sub-second part of `after` into its answer (12:00:00.354 → next
        // 12:00:01.354); occurrences are whole seconds, so start from the whole second.
        let whole = after.with_nanosecond(0).unwrap_or(after);
        self.cron.find_next_occurrence(&whole, false).ok()
    }

    /// The longest gap between the schedule's next 16 occurrences after `after`: how long a
    /// healthy job may go between runs (a weekday-only schedule's gap spans the weekend).
    pub fn longest_gap(&self, after: DateTime<Utc>) -> Option<Duration> {
        let mut at = self.next_after(after)?;
        let mut longest = Duration::ZERO;
        for _ in 0..16 {
            let next = self.next_after(at)?;
            longest = longest.max((next - at).to_std().ok()?);
            at = next;
        }
        Some(longest)
    }
}

/// Schedules are equal when written the same way.
impl PartialEq for Schedule {
    fn eq(&self, other: &Schedule) -> bool {
        self.text == other.text
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.text)
    }
}

/// A loaded config and what is worth telling the operator about it.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<Problem>,
}

/// The process environment, captured once so that overrides and `{ env = … }` secrets see the
/// same values, and so tests can supply their own.
#[derive(Clone, Default)]
pub struct Env(BTreeMap<String, String>);

impl Env {
    /// The current process environment (variables that are not UTF-8 are skipped).
    pub fn from_process() -> Self {
        Env(std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect())
    }

    pub fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Env {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Env(iter
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect())
    }
}

// Variable names only: values may be secrets.
impl fmt::Debug for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Which secrets a load reads. A command that works on one account (`login`, `sync`) or on
/// none (`status`) need not read the others: under systemd those may be credentials only the
/// service can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secrets {
    /// Every secret (the agent, `check-config`).
    All,
    /// Only this account's.
    Account(String),
    /// None: each secret keeps its origin and an empty value that must never be sent.
    None,
}

/// Loads and validates the config at `path` against the process environment.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    load_with_env(path, &Env::from_process())
}

/// Loads and validates the config at `path` against `env`, reading every secret.
pub fn load_with_env(path: &Path, env: &Env) -> Result<Loaded, ConfigError> {
    load_scoped(path, env, &Secrets::All)
}

/// Loads and validates the config at `path` against `env`, reading only the `secrets` asked for.
pub fn load_scoped(path: &Path, env: &Env, secrets: &Secrets) -> Result<Loaded, ConfigError> {
    let fail = |problems| ConfigError {
        path: path.to_owned(),
        problems,
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        fail(vec![Problem::new(
            "",
            format!("cannot read the config file: {e}"),
        )])
    })?;
    load_text(path, &text, env, secrets)
}

/// Validates `text` as the config file at `path` (relative paths in it resolve against the
/// file's directory) against `env`, reading only the `secrets` asked for.
pub fn load_text(
    path: &Path,
    text: &str,
    env: &Env,
    secrets: &Secrets,
) -> Result<Loaded, ConfigError> {
    let fail = |problems| ConfigError {
        path: path.to_owned(),
        problems,
    };
    let syntax = toml_syntax_problems(text);
    if !syntax.is_empty() {
        return Err(fail(syntax));
    }
    let overrides = env_overrides(env);
    let layered = ::config::Config::builder()
        .add_source(::config::File::from_str(text, ::config::FileFormat::Toml))
        .add_source(
            ::config::Environment::with_prefix(ENV_PREFIX)
                .separator(ENV_SEPARATOR)
                .source(Some(overrides.iter().cloned().collect())),
        )
        .build()
        .map_err(|e| {
            fail(vec![Problem::new(
                "",
                format!("cannot merge environment overrides: {e}"),
            )])
        })?;

    let base_dir = path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let base_dir = if base_dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base_dir
    };
    let sets = problems::Overrides::new(
        overrides
            .iter()
            .map(|(var, _)| (override_key(var), var.clone()))
            .collect(),
    );
    let mut ctx = resolve::Ctx::new(&base_dir, env, secrets, sets, file_accounts(text));
    let resolved = resolve::root(layered.cache, &mut ctx);
    let (mut problems, mut warnings) = (ctx.problems, ctx.warnings);
    match resolved {
        Some((agent, accounts, views, broker)) if problems.is_empty() => {
            warnings.sort_by(|a, b| a.key.cmp(&b.key));
            let config = Config {
                path: path.to_owned(),
                env_overrides: overrides.into_iter().map(|(k, _)| k).collect(),
                agent,
                accounts,
                views,
                broker,
            };
            Ok(Loaded { config, warnings })
        }
        _ => {
            problems.sort_by(|a, b| a.key.cmp(&b.key));
            problems.dedup();
            Err(fail(problems))
        }
    }
}

/// The `EHRSYNC__…` variables, by the same case-insensitive prefix rule the `config` crate applies.
fn env_overrides(env: &Env) -> Vec<(String, String)> {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}").to_lowercase();
    env.0
        .iter()
        .filter(|(k, _)| k.to_lowercase().starts_with(&prefix))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The key path an override variable sets, as the `config` crate derives it: the prefix
/// removed, lower-cased, each `__` a level (`EHRSYNC__ACCOUNTS__NIKO__DOMAIN` →
/// `accounts.niko.domain`).
fn override_key(var: &str) -> String {
    let lower = var.to_lowercase();
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}").to_lowercase();
    lower
        .strip_prefix(&prefix)
        .unwrap_or(&lower)
        .replace(ENV_SEPARATOR, ".")
}

/// The account names the file itself has (`None` if it cannot be read as a table, which
/// resolving reports), to tell an account that only an override creates.
fn file_accounts(text: &str) -> Option<std::collections::BTreeSet<String>> {
    let file = ::config::Config::builder()
        .add_source(::config::File::from_str(text, ::config::FileFormat::Toml))
        .build()
        .ok()?;
    let mut root = file.cache.into_table().ok()?;
    match root.remove("accounts") {
        None => Some(Default::default()),
        Some(accounts) => Some(accounts.into_table().ok()?.into_keys().collect()),
    }
}

/// TOML syntax errors as "line L, column C: message", without the source line the parser
/// would quote (it may hold a secret).
fn toml_syntax_problems(text: &str) -> Vec<Problem> {
    let (_, errors) = toml::de::DeTable::parse_recoverable(text);
    errors
        .iter()
        .map(|e| {
            let at = e.span().map(|s| line_col(text, s.start));
            let message = e.message().trim_end_matches('\n');
            match at {
                Some((line, col)) => Problem::new(
                    "",
                    format!("TOML syntax error at line {line}, column {col}: {message}"),
                ),
                None => Problem::new("", format!("TOML syntax error: {message}")),
            }
        })
        .collect()
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The command an operator runs to log an account in again with the config at `path`, up to
/// the account name: `ehrsync --config /etc/ehrsync/ehrsync.toml login` (quoted for a POSIX
/// shell when the path needs it).
pub fn login_command(path: &Path) -> String {
    // Absolute, so the command works from wherever the operator's shell is.
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let text = path.display().to_string();
    if text.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
        format!("ehrsync --config '{}' login", text.replace('\'', r"'\''"))
    } else {
        format!("ehrsync --config {text} login")
    }
}

/// The broker's default socket: `$RUNTIME_DIRECTORY/broker.sock` under systemd's
/// `RuntimeDirectory=`, else `/run/ehrsync/broker.sock`; on Windows, loopback TCP port 9871.
pub fn default_broker_listen(env: &Env) -> BrokerListen {
    if cfg!(windows) {
        return BrokerListen::Tcp(SocketAddr::from(([127, 0, 0, 1], 9871)));
    }
    if let Some(dirs) = env.get("RUNTIME_DIRECTORY")
        && let Some(first) = dirs.split(':').find(|d| !d.is_empty())
    {
        return BrokerListen::Unix(Path::new(first).join("broker.sock"));
    }
    BrokerListen::Unix(PathBuf::from("/run/ehrsync/broker.sock"))
}

/// `[broker]`: the token broker for the practice's other programs.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerSettings {
    pub listen: BrokerListen,
    /// The socket file's mode (Unix sockets only). Default 0660.
    pub socket_mode: u32,
    /// The socket file's group, by name and id, when set.
    pub socket_group: Option<(String, u32)>,
    /// How long one proxied call may take, its body included.
    pub proxy_timeout: Duration,
    /// Sorted by name.
    pub clients: Vec<BrokerClient>,
}

impl BrokerSettings {
    /// The socket's group id, when one is configured.
    pub fn socket_gid(&self) -> Option<u32> {
        self.socket_group.as_ref().map(|(_, gid)| *gid)
    }
}

/// Where the broker listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerListen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl fmt::Display for BrokerListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerListen::Unix(p) => write!(f, "unix:{}", p.display()),
            BrokerListen::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// A program allowed to use the broker: `[broker.clients.NAME]`.
#[derive(Clone, PartialEq)]
pub struct BrokerClient {
    pub name: String,
    pub key: Secret,
    /// SHA-256 of the key: what presented keys are compared with.
    pub key_sha256: [u8; 32],
    /// The accounts it may use.
    pub accounts: Vec<AccountName>,
    /// May it fetch tokens (`GET …/token`)?
    pub token: bool,
    /// May it call the API through the proxy (`…/api/…`)?
    pub api: bool,
    /// Only GET and HEAD through the proxy.
    pub read_only: bool,
}

impl fmt::Debug for BrokerClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerClient")
            .field("name", &self.name)
            .field("key", &self.key)
            .field("accounts", &self.accounts)
            .field("token", &self.token)
            .field("api", &self.api)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// The shortest broker client key accepted (configured or presented).
pub const MIN_CLIENT_KEY: usize = 16;

/// The SHA-256 of a broker client key, as configured keys are kept and presented ones compared.
pub fn key_digest(key: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// A file the account's access token is written to: `[[accounts.NAME.token_files]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFile {
    pub path: PathBuf,
    /// Unix mode of the file. Default 0600.
    pub mode: u32,
    /// The file's group id (Unix), from `group`.
    pub gid: Option<u32>,
    pub format: TokenFileFormat,
    /// Program and arguments run after each new token is written (no shell).
    pub on_rotate: Option<Vec<String>>,
    pub on_rotate_timeout: Duration,
}

/// What a token file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFileFormat {
    /// The access token alone, no newline.
    Token,
    /// `{"account","access_token","token_type","expires_at"}`.
    Json,
}

/// Where the database lives when `agent.database` is not set.
pub fn default_database(env: &Env) -> PathBuf {
    // systemd's StateDirectory= sets this (a colon-separated list when several are declared).
    if let Some(dirs) = env.get("STATE_DIRECTORY")
        && let Some(first) = dirs.split(':').find(|d| !d.is_empty())
    {
        return Path::new(first).join("ehrsync.db");
    }
    if cfg!(windows) {
        let data = env
            .get("ProgramData")
            .unwrap_or_else(|| r"C:\ProgramData".to_owned());
        Path::new(&data).join("ehrsync").join("ehrsync.db")
    } else {
        PathBuf::from("/var/lib/ehrsync/ehrsync.db")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_commands_name_the_config_absolutely_and_quote_it() {
        assert_eq!(
            login_command(Path::new("/etc/ehrsync/ehrsync.toml")),
            "ehrsync --config /etc/ehrsync/ehrsync.toml login"
        );
        assert_eq!(
            login_command(Path::new("/srv/it's here/e.toml")),
            r"ehrsync --config '/srv/it'\''s here/e.toml' login"
        );
        let relative = login_command(Path::new("config/ehrsync.toml"));
        assert!(relative.starts_with("ehrsync --config /"), "{relative}");
    }

    #[test]
    fn syntax_errors_give_position_without_quoting_the_line() {
        let problems = toml_syntax_problems("[agent]\npassword = \"hunter2\n");
        assert_eq!(problems.len(), 1, "{problems:?}");
        let text = problems[0].to_string();
        assert!(text.contains("line 2"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn names_are_strict() {
        for ok in ["a", "nextech-main", "niko_2", "0abc"] {
            assert!(AccountName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Nextech", "-a", "a b", "a__b", "é", &"a".repeat(65)] {
            assert!(AccountName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn schedules_are_six_field_and_must_fire() {
        assert!(Schedule::parse("0 */15 * * * *").is_ok());
        assert!(
            Schedule::parse("*/15 * * * *").is_err(),
            "five fields lack seconds"
        );
        assert!(
            Schedule::parse("0 0 0 30 2 *").is_err(),
            "30 February never comes"
        );
        let s = Schedule::parse("0 0 * * * *").unwrap();
        let t = DateTime::parse_from_rfc3339("2026-11-22T05:30:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            s.next_after(t).unwrap().to_rfc3339(),
            "2026-11-22T06:00:00+00:00"
        );
        let every_second = Schedule::parse("* * * * * *").unwrap();
        let t = DateTime::parse_from_rfc3339("2026-11-22T05:30:00.354Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            every_second.next_after(t).unwrap().to_rfc3339(),
            "2026-11-22T05:30:01+00:00",
            "occurrences are whole seconds"
        );
    }

    #[test]
    fn schedules_with_an_empty_list_item_are_refused_at_once() {
        // Found by fuzz/fuzz_targets/config.rs: `schedule = ", */30 * * * *"` took croner
        // ~100 s to find never firing, so loading the config hung. The message shows the check
        // before croner answered.
        for text in [
            ", */30 * * * *",
            "0 , * * * *",
            "0 0 ,, * * *",
            "0 0 0 , * *",
            "1,,2 * * * * *",
            "0 0 0 * * 1,",
        ] {
            let err = Schedule::parse(text).unwrap_err();
            assert!(err.contains("empty item"), "{text}: {err}");
        }
        assert!(Schedule::parse("0,30 */15 * * * MON,FRI").is_ok());
    }

    #[test]
    fn override_variables_map_to_key_paths_as_the_config_crate_does() {
        assert_eq!(
            override_key("EHRSYNC__ACCOUNTS__NIKO__DOMAIN"),
            "accounts.niko.domain"
        );
        assert_eq!(
            override_key("ehrsync__agent__metrics_listen"),
            "agent.metrics_listen"
        );
    }

    #[test]
    fn state_directory_wins_for_the_default_database() {
        let env: Env = [("STATE_DIRECTORY", "/var/lib/ehrsync:/var/lib/other")]
            .into_iter()
            .collect();
        assert_eq!(
            default_database(&env),
            PathBuf::from("/var/lib/ehrsync/ehrsync.db")
        );
    }
}
