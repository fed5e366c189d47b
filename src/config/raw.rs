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
    /// SQLite database file. Default: `$STATE_DIRECTORY/ehrsync.db` under systemd, else
    /// `/var/lib/ehrsync/ehrsync.db` (`%ProgramData%\ehrsync\ehrsync.db` on Windows).
    pub database: Option<PathBuf>,
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
        crate::vendor::one_of(&value, &RawJobKind::ALL, RawJobKind::as_str)
    }
}

/// A duration written as a humantime string (`"90s"`, `"20m"`, `"14d"`) or whole seconds.
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"90s\", \"20m\", \"48h\" or \"14d\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                // An environment override arrives as a string even when it is a plain number.
                if let Ok(secs) = v.trim().parse::<u64>() {
                    return Ok(HumanDuration(Duration::from_secs(secs)));
                }
                humantime::parse_duration(v).map(HumanDuration).map_err(|e| {
                    E::custom(format!(
                        "`{v}` is not a duration ({e}); write e.g. \"90s\", \"20m\", \"48h\" or \"14d\""
                    ))
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                Ok(HumanDuration(Duration::from_secs(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                u64::try_from(v)
                    .map(|s| HumanDuration(Duration::from_secs(s)))
                    .map_err(|_| E::custom("a duration cannot be negative"))
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
