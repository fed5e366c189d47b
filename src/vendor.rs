//! Vendor presets: the defaults each supported EHR vendor's token endpoint needs, as data.
//!
//! A preset only fills defaults for a generic OAuth2 account; every field can be overridden in
//! the config (`token_url` above all, so tests and sandboxes can point at loopback). A vendor
//! quirk is a field here, with the vendor's published page it comes from (Nextech's "Partner
//! Authorization" guide and "Authentication" API reference, Net Health's "Net Health API -
//! Authentication and Authorization", CareCentric's "User Authorisation", NikoHealth's "How API
//! Authentication and Authorization Works?"), never a branch elsewhere in the code. This module
//! depends on nothing else in the crate.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// The vendor an account talks to; chooses the [`Preset`] that fills the account's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum Vendor {
    Nextech,
    NetHealth,
    CareCentric,
    NikoHealth,
    Generic,
}

impl Vendor {
    pub const ALL: [Vendor; 5] = [
        Vendor::Nextech,
        Vendor::NetHealth,
        Vendor::CareCentric,
        Vendor::NikoHealth,
        Vendor::Generic,
    ];

    /// The name used in config files (`vendor = "…"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Vendor::Nextech => "nextech",
            Vendor::NetHealth => "nethealth",
            Vendor::CareCentric => "carecentric",
            Vendor::NikoHealth => "nikohealth",
            Vendor::Generic => "generic",
        }
    }

    pub fn preset(self) -> &'static Preset {
        match self {
            Vendor::Nextech => &NEXTECH,
            Vendor::NetHealth => &NETHEALTH,
            Vendor::CareCentric => &CARECENTRIC,
            Vendor::NikoHealth => &NIKOHEALTH,
            Vendor::Generic => &GENERIC,
        }
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an account first obtains tokens (the refresh_token grant follows where tokens allow it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum Grant {
    /// Resource owner password credentials (RFC 6749 §4.3): username and password every login.
    Password,
    /// Client credentials (RFC 6749 §4.4): the client's own secret, no user.
    ClientCredentials,
    /// Authorization code with PKCE, completed once by a person through `ehrsync login`.
    AuthorizationCode,
}

impl Grant {
    pub const ALL: [Grant; 3] = [
        Grant::Password,
        Grant::ClientCredentials,
        Grant::AuthorizationCode,
    ];

    /// The `grant_type` form value.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::Password => "password",
            Grant::ClientCredentials => "client_credentials",
            Grant::AuthorizationCode => "authorization_code",
        }
    }

    /// Whether a login with this grant needs a person at a browser.
    pub fn needs_person(self) -> bool {
        matches!(self, Grant::AuthorizationCode)
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the client's credentials go in a token request (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum ClientAuth {
    /// HTTP Basic with `client_id:client_secret` (`client_secret_basic`).
    Basic,
    /// `client_id` and `client_secret` as form fields (`client_secret_post`).
    Post,
}

impl ClientAuth {
    pub const ALL: [ClientAuth; 2] = [ClientAuth::Basic, ClientAuth::Post];

    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::Basic => "basic",
            ClientAuth::Post => "post",
        }
    }
}

impl fmt::Display for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Picks the member of `all` whose config name is `value`, or says which names are allowed and
/// what to write under `key` instead: the exact spelling when only the case differs (names are
/// case-sensitive), the closest name when `value` looks like a typo of it.
/// (Enums deserialize through this rather than serde's derive: the `config` crate words unknown
/// variants as "enum X does not have variant constructor y", which helps no operator.)
pub fn one_of<T: Copy>(
    key: &str,
    value: &str,
    all: &[T],
    name: fn(T) -> &'static str,
) -> Result<T, String> {
    if let Some(found) = all.iter().copied().find(|v| name(*v) == value) {
        return Ok(found);
    }
    let quoted: Vec<String> = all.iter().map(|v| format!("`{}`", name(*v))).collect();
    let names = match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.concat(),
    };
    if value.is_empty() {
        return Err(format!("is empty; choose one of {names}"));
    }
    if let Some(same) = all
        .iter()
        .map(|v| name(*v))
        .find(|n| n.eq_ignore_ascii_case(value))
    {
        return Err(format!(
            "`{value}` is not one of {names}; the value is case-sensitive: write {key} = \"{same}\""
        ));
    }
    let lower = value.to_ascii_lowercase();
    let close = all
        .iter()
        .map(|v| name(*v))
        .map(|n| (strsim::damerau_levenshtein(&lower, n), n))
        .filter(|(d, n)| *d <= 2.max(n.len() / 4))
        .min_by_key(|(d, _)| *d);
    Err(match close {
        Some((_, n)) => format!("`{value}` is not one of {names}; did you mean {key} = \"{n}\"?"),
        None => format!("`{value}` is not one of {names}"),
    })
}

macro_rules! config_enum {
    ($t:ident, $key:literal) => {
        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(value: String) -> Result<Self, String> {
                one_of($key, &value, &$t::ALL, $t::as_str)
            }
        }
    };
}
config_enum!(Vendor, "vendor");
config_enum!(Grant, "grant");
config_enum!(ClientAuth, "client_auth");

/// Where the token endpoint comes from when the config does not set `token_url`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenEndpointDefault {
    /// A URL template; `{tenant}` and `{domain}` are filled from the account's keys.
    Template(&'static str),
    /// OpenID discovery at `{issuer}/.well-known/openid-configuration`.
    Discovery,
    /// No default: the account must set `token_url` (or `issuer`).
    None,
}

/// The defaults one vendor's accounts start from. Every field is overridable per account.
#[derive(Debug)]
pub struct Preset {
    pub vendor: Vendor,
    pub token_endpoint: TokenEndpointDefault,
    /// Where a person logs in for the authorization_code grant, when the token endpoint comes
    /// from the same template (`{tenant}` filled alike); discovery supplies it otherwise.
    pub authorization_endpoint: Option<&'static str>,
    /// Default for `{tenant}` in the token URL template.
    pub tenant: Option<&'static str>,
    /// `None` where the account must choose (`generic`).
    pub grant: Option<Grant>,
    /// `None`: decided by discovery's `token_endpoint_auth_methods_supported`, else `basic`.
    pub client_auth: Option<ClientAuth>,
    /// Whether the vendor demands a client secret even for the password grant.
    pub client_secret_required: bool,
    pub resource: Option<&'static str>,
    pub scope: Option<&'static str>,
    /// Used when a token response gives no lifetime of its own (no `expires_in`, no JWT `exp`).
    pub access_token_lifetime: Option<Duration>,
    /// Used when a token response carries a refresh token but no `refresh_token_expires_in`.
    pub refresh_token_lifetime: Option<Duration>,
    /// A URL template for API calls; `{domain}` is filled from the account.
    pub api_base: Option<&'static str>,
    /// A header every API call carries, valued from the account's `practice_id`.
    pub practice_id_header: Option<&'static str>,
    /// Codes in an error answer's `error_description` that mean a person must act (bad or
    /// expired password, locked account, MFA, consent), whatever its `error` says. Such an
    /// account waits in `needs_login` instead of logging in again: retrying a bad password
    /// locks the account.
    pub needs_person_codes: &'static [&'static str],
    /// The vendor's published page(s) these values come from, named in config errors.
    pub documented_in: &'static str,
}

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

/// Nextech: Azure AD v1 (ROPC then refresh, `resource` form field, string `expires_in`).
pub static NEXTECH: Preset = Preset {
    vendor: Vendor::Nextech,
    token_endpoint: TokenEndpointDefault::Template(
        "https://login.microsoftonline.com/{tenant}/oauth2/token",
    ),
    // seeds/000 "Authorization With Postman": the Auth URL for the authorization_code grant.
    authorization_endpoint: Some("https://login.microsoftonline.com/{tenant}/oauth2/authorize"),
    tenant: Some("nextech-api.com"),
    grant: Some(Grant::Password),
    client_auth: Some(ClientAuth::Post),
    client_secret_required: false,
    resource: Some("https://select.nextech-api.com/api"),
    scope: None,
    access_token_lifetime: Some(Duration::from_secs(HOUR)),
    refresh_token_lifetime: Some(Duration::from_secs(14 * DAY)),
    api_base: Some("https://select.nextech-api.com/api"),
    practice_id_header: Some("nx-practice-id"),
    needs_person_codes: &AZURE_AD_NEEDS_PERSON,
    documented_in: "seeds/000_a0e2275484b07051.txt, seeds/001_b19ac80d246a9f50.txt",
};

/// Azure AD's `AADSTS` codes (in `error_description`) that mean a person must act, from
/// Microsoft's list of Entra ID authentication error codes. Azure AD answers most of them with
/// `invalid_grant`, which on a refresh would otherwise mean "log in again with the password".
const AZURE_AD_NEEDS_PERSON: [&str; 9] = [
    "AADSTS50126",  // invalid username or password
    "AADSTS50053",  // account locked (after repeated bad passwords)
    "AADSTS50055",  // password expired
    "AADSTS50057",  // account disabled
    "AADSTS50076",  // MFA required
    "AADSTS50079",  // MFA enrollment required
    "AADSTS50158",  // external security challenge
    "AADSTS65001",  // consent required
    "AADSTS700016", // application not found in the tenant
];

/// Net Health: an OpenID provider; a person logs in once, the agent lives on refresh tokens.
pub static NETHEALTH: Preset = Preset {
    vendor: Vendor::NetHealth,
    token_endpoint: TokenEndpointDefault::Discovery,
    authorization_endpoint: None,
    tenant: None,
    grant: Some(Grant::AuthorizationCode),
    client_auth: None,
    client_secret_required: false,
    resource: None,
    scope: Some("openid offline_access"),
    access_token_lifetime: None,
    refresh_token_lifetime: None,
    api_base: None,
    practice_id_header: None,
    needs_person_codes: &[],
    documented_in: "seeds/002_723bbb611e66b232.txt",
};

/// CareCentric (Graphnet): IdentityServer password grant, 48 h JWT, no refresh token.
pub static CARECENTRIC: Preset = Preset {
    vendor: Vendor::CareCentric,
    token_endpoint: TokenEndpointDefault::Template("https://prv-is.grhapp.com/connect/token"),
    authorization_endpoint: None,
    tenant: None,
    grant: Some(Grant::Password),
    client_auth: Some(ClientAuth::Post),
    client_secret_required: true,
    resource: None,
    scope: Some("launch user/*.read openid profile"),
    access_token_lifetime: Some(Duration::from_secs(48 * HOUR)),
    refresh_token_lifetime: None,
    api_base: None,
    practice_id_header: None,
    needs_person_codes: &[],
    documented_in: "seeds/003_2b2fb7e0c1e5c041.txt",
};

/// NikoHealth: client credentials with HTTP Basic, 20-minute tokens, scope `external`.
pub static NIKOHEALTH: Preset = Preset {
    vendor: Vendor::NikoHealth,
    token_endpoint: TokenEndpointDefault::Template(
        "https://{domain}.nikohealth.com/api/identity/connect/token",
    ),
    authorization_endpoint: None,
    tenant: None,
    grant: Some(Grant::ClientCredentials),
    client_auth: Some(ClientAuth::Basic),
    client_secret_required: true,
    resource: None,
    scope: Some("external"),
    access_token_lifetime: Some(Duration::from_secs(20 * 60)),
    refresh_token_lifetime: None,
    api_base: Some("https://{domain}.nikohealth.com"),
    practice_id_header: None,
    needs_person_codes: &[],
    documented_in: "seeds/004_9164cb579ef29772.txt",
};

/// Any other OAuth2 API: nothing assumed, everything from config and the token responses.
pub static GENERIC: Preset = Preset {
    vendor: Vendor::Generic,
    token_endpoint: TokenEndpointDefault::None,
    authorization_endpoint: None,
    tenant: None,
    grant: None,
    client_auth: Some(ClientAuth::Basic),
    client_secret_required: false,
    resource: None,
    scope: None,
    access_token_lifetime: None,
    refresh_token_lifetime: None,
    api_base: None,
    practice_id_header: None,
    needs_person_codes: &[],
    documented_in: "RFC 6749",
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_exact_and_a_near_miss_is_named() {
        assert_eq!(Vendor::try_from("nextech".to_owned()), Ok(Vendor::Nextech));
        assert_eq!(
            Vendor::try_from("NexTech".to_owned()),
            Err(
                "`NexTech` is not one of `nextech`, `nethealth`, `carecentric`, `nikohealth` or \
                 `generic`; the value is case-sensitive: write vendor = \"nextech\""
                    .to_owned()
            )
        );
        let typo = Grant::try_from("client-credentials".to_owned()).unwrap_err();
        assert!(
            typo.ends_with("did you mean grant = \"client_credentials\"?"),
            "{typo}"
        );
        let unknown = Vendor::try_from("epic".to_owned()).unwrap_err();
        assert!(
            unknown.starts_with("`epic` is not one of `nextech`") && !unknown.contains("mean"),
            "{unknown}"
        );
        let empty = ClientAuth::try_from(String::new()).unwrap_err();
        assert_eq!(empty, "is empty; choose one of `basic` or `post`");
    }

    // Each assertion names the vendor document it checks, so a change to a preset has to be
    // argued against that document.

    #[test]
    fn nextech_matches_its_partner_guide() {
        // seeds/000: POST https://login.microsoftonline.com/nextech-api.com/oauth2/token,
        // 1 h access tokens, 14-day refresh tokens, nx-practice-id on every request.
        let p = Vendor::Nextech.preset();
        assert_eq!(
            p.token_endpoint,
            TokenEndpointDefault::Template(
                "https://login.microsoftonline.com/{tenant}/oauth2/token"
            )
        );
        assert_eq!(p.tenant, Some("nextech-api.com"));
        assert_eq!(p.grant, Some(Grant::Password));
        // seeds/000 "Client Authentication: Send client credentials in body".
        assert_eq!(p.client_auth, Some(ClientAuth::Post));
        assert_eq!(p.access_token_lifetime, Some(Duration::from_secs(3600)));
        assert_eq!(
            p.refresh_token_lifetime,
            Some(Duration::from_secs(14 * 86400))
        );
        assert_eq!(p.practice_id_header, Some("nx-practice-id"));
        // seeds/000 Auth URL: resource=https%3A%2F%2Fselect.nextech-api.com%2Fapi
        assert_eq!(p.resource, Some("https://select.nextech-api.com/api"));
        // seeds/000, seeds/001: Azure AD v1 (login.microsoftonline.com), whose errors carry
        // AADSTS codes; DESIGN.md §2 names bad credentials, locked accounts, MFA and consent.
        for code in [
            "AADSTS50126",
            "AADSTS50053",
            "AADSTS50076",
            "AADSTS50079",
            "AADSTS65001",
        ] {
            assert!(p.needs_person_codes.contains(&code), "{code}");
        }
    }

    #[test]
    fn carecentric_matches_its_user_auth_page() {
        // seeds/003: password grant with client_id + client_secret in the body, SMART scopes,
        // expires_in 172800, no refresh token in the typical response.
        let p = Vendor::CareCentric.preset();
        assert_eq!(
            p.token_endpoint,
            TokenEndpointDefault::Template("https://prv-is.grhapp.com/connect/token")
        );
        assert_eq!(p.grant, Some(Grant::Password));
        assert_eq!(p.client_auth, Some(ClientAuth::Post));
        assert!(p.client_secret_required);
        assert_eq!(p.scope, Some("launch user/*.read openid profile"));
        assert_eq!(p.access_token_lifetime, Some(Duration::from_secs(172_800)));
        assert_eq!(p.refresh_token_lifetime, None);
    }

    #[test]
    fn nikohealth_matches_its_help_article() {
        // seeds/004: client_credentials, "Authorization: Basic", 1200 s, scope external,
        // patients at https://{domain}.nikohealth.com/api/external/v1/patients.
        let p = Vendor::NikoHealth.preset();
        assert_eq!(
            p.token_endpoint,
            TokenEndpointDefault::Template(
                "https://{domain}.nikohealth.com/api/identity/connect/token"
            )
        );
        assert_eq!(p.grant, Some(Grant::ClientCredentials));
        assert_eq!(p.client_auth, Some(ClientAuth::Basic));
        assert_eq!(p.scope, Some("external"));
        assert_eq!(p.access_token_lifetime, Some(Duration::from_secs(1200)));
        assert_eq!(p.api_base, Some("https://{domain}.nikohealth.com"));
    }

    #[test]
    fn nethealth_is_an_openid_provider_with_person_login() {
        // seeds/002: OpenID Connect, the user logs in and consents, refresh tokens.
        let p = Vendor::NetHealth.preset();
        assert_eq!(p.token_endpoint, TokenEndpointDefault::Discovery);
        assert_eq!(p.grant, Some(Grant::AuthorizationCode));
        assert!(p.grant.is_some_and(Grant::needs_person));
        assert!(
            p.scope
                .is_some_and(|s| s.split(' ').any(|s| s == "offline_access"))
        );
    }

    #[test]
    fn every_vendor_has_its_own_preset() {
        for v in Vendor::ALL {
            assert_eq!(v.preset().vendor, v);
        }
    }

    #[test]
    fn only_azure_ad_vendors_read_aadsts_codes() {
        // The other vendors' documents (seeds/002-004) and RFC 6749 give `error` codes only;
        // an `error_description` is free text there, not a code to act on.
        for v in [
            Vendor::NetHealth,
            Vendor::CareCentric,
            Vendor::NikoHealth,
            Vendor::Generic,
        ] {
            assert!(v.preset().needs_person_codes.is_empty(), "{v}");
        }
    }
}
