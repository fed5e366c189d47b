//! The config file's shape, as written: every key ehrsync reads is defined (and documented)
//! here. Fields are optional so that a missing key is reported by [`super::resolve`] with the
//! reason it is needed, rather than by serde with a bare "missing field".

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::secret::SecretSpec;
use crate::vendor::{ClientAuth, Grant, Vendor};

/// `[agent]`: process-wide settings.
#[derive(Deserialize)]
pub struct RawAgent {
    /// SQLite database file, or a `postgres://` URL (without its password) of a database
    /// several agents share. Default: `$STATE_DIRECTORY/ehrsync.db` under systemd, else
    /// `/var/lib/ehrsync/ehrsync.db` (`%ProgramData%\ehrsync\ehrsync.db` on Windows).
    pub database: Option<PathBuf>,
    /// The PostgreSQL password, as a secret: `{ file = "…" }`, `{ credential = "…" }` or
    /// `{ env = "…" }` (never in the URL). Without it, libpq's `PGPASSWORD` or `.pgpass` apply.
    pub database_password: Option<SecretSpec>,
    /// Address of the `/metrics`, `/healthz` and `/readyz` listener. Default `127.0.0.1:9870`.
    pub metrics_listen: Option<String>,
    /// The key that encrypts stored tokens: `{ file = "…" }` (created 0600 on first start if
    /// missing; default `ehrsync.key` beside the database), `{ credential = "…" }` or
    /// `{ env = "…" }` (64 hex digits, e.g. from `openssl rand -hex 32`).
    pub token_key: Option<SecretSpec>,
    /// On SIGTERM/SIGINT (or a Windows service stop), how long runs in progress get to commit
    /// the page they are writing before they are cut off and recorded `interrupted`.
    /// Default `20s`; at most `10m`.
    pub shutdown_grace: Option<HumanDuration>,
    /// A PEM file of extra certificate authorities to trust, beside the system's: a practice's
    /// TLS-inspecting firewall or proxy, or a vendor's private CA. Read at start (a reload
    /// does not change it).
    pub ca_file: Option<PathBuf>,
    /// How long rows of the `changes` log are kept (`ehrsync changes` reads them). Default
    /// `"90d"`; at least `1h`.
    pub changes_retention: Option<HumanDuration>,
}

/// `[[views]]`: a SQL-on-FHIR v2 ViewDefinition kept as the table `view_{name}`.
#[derive(Deserialize)]
pub struct RawView {
    /// The ViewDefinition's JSON file (relative to the config file's directory).
    pub file: Option<PathBuf>,
}

/// `[accounts.NAME]`: one vendor account.
#[derive(Deserialize)]
pub struct RawAccount {
    /// The preset that fills this account's defaults: `nextech`, `nethealth`, `carecentric`,
    /// `nikohealth` or `generic`.
    pub vendor: Option<Vendor>,
    /// The OAuth2 client (application) id.
    pub client_id: Option<StringOrNumber>,
    /// The client secret (a secret: `{ env }`, `{ file }`, `{ credential }` or a string).
    pub client_secret: Option<SecretSpec>,
    /// The user of the password grant.
    pub username: Option<String>,
    /// The password of the password grant (a secret).
    pub password: Option<SecretSpec>,
    /// Nextech practice id, sent as `nx-practice-id` on every API call.
    pub practice_id: Option<StringOrNumber>,
    /// Base URL of the vendor's API; jobs' requests are made below it.
    pub api_base: Option<String>,
    /// Token endpoint; overrides the preset's (and discovery).
    pub token_url: Option<String>,
    /// Azure AD tenant in the Nextech token URL. Default `nextech-api.com`.
    pub tenant: Option<String>,
    /// NikoHealth sub-domain: `acme` → `https://acme.nikohealth.com/…`.
    pub domain: Option<String>,
    /// OpenID issuer; the token endpoint is discovered at `{issuer}/.well-known/openid-configuration`.
    pub issuer: Option<String>,
    /// Authorization endpoint for `ehrsync login` (authorization_code grant); overrides the
    /// preset's and discovery's.
    pub authorization_url: Option<String>,
    /// Device authorization endpoint (RFC 8628) for `ehrsync login --device`; overrides discovery's.
    pub device_authorization_url: Option<String>,
    /// Port of `ehrsync login`'s loopback redirect `http://127.0.0.1:{port}/callback`, for
    /// providers that only accept a registered port. Default: a free port chosen per login.
    pub redirect_port: Option<u16>,
    /// `resource` form field (Azure AD v1). `""` sends none.
    pub resource: Option<String>,
    /// `scope` form field. `""` sends none.
    pub scope: Option<String>,
    /// Client authentication: `basic` (HTTP Basic) or `post` (form body).
    pub client_auth: Option<ClientAuth>,
    /// Primary grant: `password`, `client_credentials` or `authorization_code`.
    pub grant: Option<Grant>,
    /// Access-token lifetime assumed when a response states none.
    pub access_token_lifetime: Option<HumanDuration>,
    /// Refresh-token lifetime assumed when a response states none (Nextech: 14 days).
    pub refresh_token_lifetime: Option<HumanDuration>,
    /// Fraction of the access-token lifetime after which to refresh. Default 0.75.
    pub refresh_ratio: Option<f64>,
    /// Refresh at least this long before expiry (capped at half the lifetime). Default 60 s.
    pub min_lead: Option<HumanDuration>,
    /// Extra headers on every API call; values are strings or secrets.
    pub headers: Option<BTreeMap<String, SecretSpec>>,
    /// `[[accounts.NAME.jobs]]`, parsed one by one so each job's problems are reported.
    #[serde(default)]
    pub jobs: Vec<config::Value>,
    /// `[[accounts.NAME.token_files]]`: files the access token is written to.
    #[serde(default)]
    pub token_files: Vec<config::Value>,
}

/// `[[accounts.NAME.token_files]]`: a file a program reads the account's access token from.
#[derive(Deserialize)]
pub struct RawTokenFile {
    /// Where the token is written (relative to the config file's directory).
    pub path: Option<PathBuf>,
    /// The file's mode, octal (Unix). Default `"0600"`; at most `"0640"`-like group read, never
    /// readable by others.
    pub mode: Option<String>,
    /// The file's group (Unix), by name: members may read it when `mode` allows.
    pub group: Option<String>,
    /// `token` (the bare access token, the default) or `json` (with its expiry).
    pub format: Option<String>,
    /// A program and its arguments, run after each new token is written (no shell):
    /// `["/usr/local/bin/reload-reports", "--quiet"]`.
    pub on_rotate: Option<Vec<String>>,
    /// How long `on_rotate` may run before it is killed. Default `"30s"`.
    pub on_rotate_timeout: Option<HumanDuration>,
}

/// `[broker]`: the token broker for the practice's other programs.
#[derive(Deserialize)]
pub struct RawBroker {
    /// `unix:/path/broker.sock` or `127.0.0.1:PORT`. Default `unix:$RUNTIME_DIRECTORY/broker.sock`
    /// (`/run/ehrsync/broker.sock`); `127.0.0.1:9871` on Windows.
    pub listen: Option<String>,
    /// The socket's mode, octal. Default `"0660"`.
    pub socket_mode: Option<String>,
    /// The socket's group: only its members (and the agent's user) may connect.
    pub socket_group: Option<String>,
    /// Allow a TCP `listen` address that is not loopback. Default false; logged as a warning.
    pub allow_non_loopback: Option<bool>,
    /// How long one proxied API call may take, its body included. Default `"2m"`.
    pub proxy_timeout: Option<HumanDuration>,
    /// `[broker.clients.NAME]`, parsed one by one so each client's problems are reported.
    #[serde(default)]
    pub clients: BTreeMap<String, config::Value>,
}

/// `[broker.clients.NAME]`: a program allowed to use the broker.
#[derive(Deserialize)]
pub struct RawBrokerClient {
    /// The client's key (a secret), presented as `Authorization: Bearer KEY`; at least 16
    /// characters (`openssl rand -hex 32`).
    pub key: Option<SecretSpec>,
    /// The accounts it may use.
    pub accounts: Option<Vec<String>>,
    /// What it may call: `token`, `api`. Default both.
    pub endpoints: Option<Vec<String>>,
    /// Only GET and HEAD through the API proxy. Default false.
    pub read_only: Option<bool>,
}

/// `[[accounts.NAME.jobs]]`: one scheduled pull.
#[derive(Deserialize)]
pub struct RawJob {
    /// Unique within the account; used in metrics, `status` and `ehrsync sync ACCOUNT JOB`.
    pub name: Option<String>,
    /// `fhir` (FHIR R4 search) or `nikohealth_patients` (NikoHealth's paged patient list).
    pub kind: Option<RawJobKind>,
    /// FHIR resource type to search (`fhir` jobs only). Default `Patient`.
    pub resource: Option<String>,
    /// Cron schedule, six fields with seconds first (`0 */15 * * * *`), in UTC.
    pub schedule: Option<String>,
    /// Records per page requested from the API. Default 100, at most 1000.
    pub page_size: Option<u32>,
    /// How long a run waits for a valid access token (the vendor's token endpoint down or
    /// refusing) before it ends `failed` with the reason, instead of looking like work in
    /// progress. Default `"2m"`, between `1s` and `1h`.
    pub token_wait: Option<HumanDuration>,
    /// `fhir` jobs: incremental runs ask for records updated after the last run's newest
    /// `meta.lastUpdated` minus this margin (covers clock skew and late commits on the
    /// vendor's side; re-fetched records are simply upserted again). Default `"5m"`.
    pub overlap: Option<HumanDuration>,
    /// `fhir` jobs: a second cron schedule (six fields, UTC) on which a run also sweeps every
    /// id the server holds (`_elements=id`) and marks deleted what it no longer returns. Off
    /// by default (`ehrsync sync ACCOUNT JOB --reconcile` does it once). A
    /// `nikohealth_patients` run reads the whole list, so each completed run reconciles.
    pub reconcile: Option<String>,
    /// The largest share of the account's records of this type one sweep may delete, as a
    /// percentage (`"10%"`, the default). A sweep that would delete more deletes nothing and
    /// fails the run with the count (`ehrsync sync … --reconcile --force` overrides once).
    pub reconcile_max_delete: Option<String>,
    /// `nikohealth_patients` jobs: the list's path below `api_base`.
    /// Default `/api/external/v1/patients`.
    pub path: Option<String>,
    /// `nikohealth_patients`: query parameter carrying the page number. Default `page`.
    pub page_param: Option<String>,
    /// `nikohealth_patients`: query parameter carrying the page size. Default `pageSize`.
    pub page_size_param: Option<String>,
    /// `nikohealth_patients`: number of the first page (0 or 1). Default 1.
    pub first_page: Option<u32>,
    /// `nikohealth_patients`: JSON pointer (RFC 6901) to the array of records in a page, `""`
    /// when the page is the array itself. Default `/items`.
    pub items: Option<String>,
    /// `nikohealth_patients`: the record field holding its id. Default `id`.
    pub id_field: Option<String>,
    /// `nikohealth_patients`: the record field holding when it last changed, stored as
    /// `last_updated`; `""` for none. Default `modifiedDate`.
    pub updated_field: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum RawJobKind {
    Fhir,
    NikohealthPatients,
}

impl RawJobKind {
    const ALL: [RawJobKind; 2] = [RawJobKind::Fhir, RawJobKind::NikohealthPatients];

    fn as_str(self) -> &'static str {
        match self {
            RawJobKind::Fhir => "fhir",
            RawJobKind::NikohealthPatients => "nikohealth_patients",
        }
    }
}

impl TryFrom<String> for RawJobKind {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        crate::vendor::one_of("kind", &value, &RawJobKind::ALL, RawJobKind::as_str)
    }
}

/// A duration key's value: a quoted string read by [`parse_duration`]. A bare number (`20`,
/// `1.5`) is refused with the string to write instead (`"20s"`): a number does not say its unit.
///
/// A refused value still deserializes, as `Err(what to write)`, which `resolve` reports at the
/// key: so a section's other keys (and an account's jobs) are still checked, and every refused
/// duration is reported, not only the first. A value of the wrong kind altogether (a table, a
/// boolean) is a type error like any other.
pub struct HumanDuration(pub Result<Duration, String>);

/// The units a duration may use (humantime's, less months and years: they have no fixed
/// length, and `M` for months is too easily meant as `m` for minutes).
const DURATION_UNITS: [&[&str]; 8] = [
    &["ns", "nsec", "nanos"],
    &["us", "µs", "usec"],
    &["ms", "msec", "millis"],
    &["s", "sec", "secs", "second", "seconds"],
    &["m", "min", "mins", "minute", "minutes"],
    &["h", "hr", "hrs", "hour", "hours"],
    &["d", "day", "days"],
    &["w", "wk", "wks", "week", "weeks"],
];
const MONTH_UNITS: &[&str] = &["M", "month", "months"];
const YEAR_UNITS: &[&str] = &["y", "yr", "yrs", "year", "years"];

const DURATION_EXAMPLES: &str = "such as \"20s\", \"5m\" or \"1h\"";

fn is_unit(unit: &str) -> bool {
    DURATION_UNITS.iter().any(|names| names.contains(&unit))
}

/// `20`, `1.5`: digits with at most one `.` between digits.
fn is_number(text: &str) -> bool {
    let mut halves = text.splitn(2, '.');
    let whole = halves.next().unwrap_or_default();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(whole) && halves.next().is_none_or(digits)
}

/// Reads a duration the way every duration key (`shutdown_grace`, `access_token_lifetime`,
/// `refresh_token_lifetime`, `min_lead`, `overlap`) is read, in the file and from `EHRSYNC__…`
/// overrides alike. The error says what to write instead.
///
/// Accepted: one or more parts, each a number (`20`, `1.5`) and a unit, optionally with spaces
/// between the number and its unit and between parts: `"20s"`, `"20 seconds"`, `"1min"`,
/// `"14days"`, `"1h 30m"`, `"1h30m"`, `"1.5h"`, `"500ms"`. Units (lower-case only): `s`, `sec`,
/// `secs`, `second`, `seconds`; `m`, `min`, `mins`, `minute`, `minutes`; `h`, `hr`, `hrs`,
/// `hour`, `hours`; `d`, `day`, `days`; `w`, `wk`, `wks`, `week`, `weeks`; and below a second
/// `ms`/`msec`/`millis`, `us`/`µs`/`usec`, `ns`/`nsec`/`nanos` (these are humantime's units,
/// and the values are the ones humantime computes).
///
/// Refused, each with the text to write: a bare number (`"20"`, or a TOML integer `20`: write
/// `"20s"`), an empty string, a negative duration, a unit in capitals (`"90S"`: write `"90s"`),
/// months and years (`"3M"`, `"1y"`: write days), anything else that is not number-and-unit
/// (`"soon"`, `"1h,30m"`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("is empty; write a duration {DURATION_EXAMPLES}"));
    }
    if trimmed.starts_with('-') {
        return Err(format!(
            "`{text}` is not a duration: a duration cannot be negative; write one {DURATION_EXAMPLES}"
        ));
    }
    if is_number(trimmed) {
        return Err(no_unit(trimmed));
    }
    let not_a_duration = || {
        format!(
            "`{text}` is not a duration: write a number and a unit, {DURATION_EXAMPLES} \
             (parts go together with spaces: \"1h 30m\")"
        )
    };
    let mut total = Duration::ZERO;
    let mut rest = trimmed;
    let mut lower_cased = Vec::new(); // the parts again, with their units in lower case
    let mut case_wrong = false;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..number_len];
        if !is_number(number) {
            return Err(not_a_duration());
        }
        rest = rest[number_len..].trim_start();
        let unit_len = rest
            .find(|c: char| !(c.is_alphabetic() || c == 'µ'))
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = rest[unit_len..].trim_start();
        if unit.is_empty() {
            return Err(if rest.is_empty() {
                // `1h 30`: the last part has no unit.
                format!(
                    "`{text}` is not a duration: `{number}` has no unit; write e.g. \"{number}s\" or \"{number}m\""
                )
            } else {
                not_a_duration()
            });
        }
        if MONTH_UNITS.contains(&unit) {
            let minutes = if unit == "M" {
                " (and minutes are `m`)"
            } else {
                ""
            };
            return Err(format!(
                "`{text}` is not accepted: months have no fixed length{minutes}; write days, e.g. \"90d\""
            ));
        }
        if YEAR_UNITS.contains(&unit) {
            return Err(format!(
                "`{text}` is not accepted: years have no fixed length; write days, e.g. \"365d\""
            ));
        }
        let unit_lower = unit.to_lowercase();
        if !is_unit(unit) {
            if !is_unit(&unit_lower) {
                return Err(format!(
                    "`{text}` is not a duration: `{unit}` is not a unit; use s, m, h, d or w \
                     (seconds, minutes, hours, days, weeks), e.g. \"20s\", \"5m\", \"1h\""
                ));
            }
            case_wrong = true;
        }
        let part_text = format!("{number}{unit_lower}");
        // humantime computes the part (a fraction of a unit included), so a value means here
        // what it means to humantime.
        let part = humantime::parse_duration(&part_text).map_err(|_| {
            if number.contains('.') {
                // humantime takes a fraction only when it comes out exact: whole seconds for
                // hours, days and weeks, whole nanoseconds below.
                format!(
                    "`{text}` is not a duration: `{number}{unit}` does not come out exact; write \
                     the fraction in a smaller unit, e.g. \"1h 20m\" rather than \"1.33h\""
                )
            } else {
                format!("`{text}` is too large to be a duration")
            }
        })?;
        lower_cased.push(part_text);
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("`{text}` is too large to be a duration"))?;
    }
    if case_wrong {
        return Err(format!(
            "`{text}` is not a duration: units are lower-case; write \"{}\"",
            lower_cased.join(" ")
        ));
    }
    Ok(total)
}

/// The refusal of a number written without a unit.
fn no_unit(number: &str) -> String {
    format!(
        "{number} has no unit; write a unit: \"{number}s\" (or \"{number}m\", \"{number}h\", \"{number}d\")"
    )
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"20s\", \"5m\" or \"1h\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                Ok(HumanDuration(parse_duration(v)))
            }
            // A TOML number: refused, since it does not say its unit (an environment override
            // arrives as a string, and `parse_duration` refuses "20" alike).
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                Ok(HumanDuration(Err(no_unit(&v.to_string()))))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                Ok(HumanDuration(Err(if v < 0 {
                    format!("a duration cannot be negative; write one {DURATION_EXAMPLES}")
                } else {
                    no_unit(&v.to_string())
                })))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<HumanDuration, E> {
                Ok(HumanDuration(Err(if v < 0.0 {
                    format!("a duration cannot be negative; write one {DURATION_EXAMPLES}")
                } else if !v.is_finite() {
                    format!("is not a finite number; write a duration {DURATION_EXAMPLES}")
                } else {
                    no_unit(&v.to_string())
                })))
            }
        }
        d.deserialize_any(V)
    }
}

/// An identifier that TOML users naturally write either way (`practice_id = 12345`).
pub struct StringOrNumber(pub String);

impl<'de> Deserialize<'de> for StringOrNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = StringOrNumber;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringOrNumber, E> {
                Ok(StringOrNumber(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<StringOrNumber, E> {
                Ok(StringOrNumber(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<StringOrNumber, E> {
                Ok(StringOrNumber(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_number_and_a_unit_in_several_spellings() {
        let secs = Duration::from_secs;
        for (text, want) in [
            ("20s", secs(20)),
            ("20 seconds", secs(20)),
            ("  20 s ", secs(20)),
            ("1min", secs(60)),
            ("5m", secs(300)),
            ("1h 30m", secs(5400)),
            ("1h30m", secs(5400)),
            ("1.5h", secs(5400)),
            ("14days", secs(14 * 86_400)),
            ("14d", secs(14 * 86_400)),
            ("2 weeks", secs(14 * 86_400)),
            ("500ms", Duration::from_millis(500)),
            ("0s", Duration::ZERO),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn refused_durations_say_what_to_write() {
        for (text, want) in [
            ("20", "20 has no unit; write a unit: \"20s\""),
            ("0", "0 has no unit; write a unit: \"0s\""),
            ("", "is empty; write a duration such as \"20s\""),
            (
                "soon",
                "`soon` is not a duration: write a number and a unit, such as \"20s\"",
            ),
            ("1h,30m", "(parts go together with spaces: \"1h 30m\")"),
            ("1h 30", "`1h 30` is not a duration: `30` has no unit"),
            ("-5m", "a duration cannot be negative"),
            ("90S", "units are lower-case; write \"90s\""),
            ("1H 30Min", "units are lower-case; write \"1h 30min\""),
            (
                "3M",
                "months have no fixed length (and minutes are `m`); write days",
            ),
            ("2 months", "months have no fixed length; write days"),
            (
                "1y",
                "years have no fixed length; write days, e.g. \"365d\"",
            ),
            (
                "14 fortnights",
                "`fortnights` is not a unit; use s, m, h, d or w",
            ),
            ("99999999999999999999s", "is too large to be a duration"),
            (
                "1.5ns",
                "`1.5ns` does not come out exact; write the fraction in a smaller unit",
            ),
            ("1.3333h", "`1.3333h` does not come out exact"),
        ] {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
            assert!(!err.contains(" at 0"), "{text}: humantime's words: {err}");
        }
    }
}
