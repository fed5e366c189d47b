//! The sandbox's data APIs: FHIR R4 `Patient` search for Nextech, CareCentric and Net Health
//! (real paging through `Bundle.link[next]`, `_count`, `_lastUpdated=gt…|ge…`), and
//! NikoHealth's paged patient list. Both serve N deterministic generated patients (N up to
//! millions: a patient is computed from its index when served, never stored), demand a bearer
//! token the sandbox issued to that vendor and has not expired or revoked (and `nx-practice-id`
//! on the Nextech route), and take injected faults of their own.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, MutexGuard};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{Fault, Inner, Sandbox};
use crate::token::Timestamp;
use crate::vendor::Vendor;

/// The practice id the Nextech route expects in `nx-practice-id` (the sandbox accounts' own).
pub const NEXTECH_PRACTICE_ID: &str = "1001";
/// Patients served until a test or the demo sets another number.
pub const DEFAULT_PATIENTS: u64 = 250;
/// The largest `_count` / page size the sandbox serves, as many FHIR servers cap it.
const MAX_PAGE: usize = 1000;
/// Spacing of generated patients' `lastUpdated`.
const STEP_MS: i64 = 1000;

/// A misbehaviour of the data API, or a normal answer, in the order they are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiFault {
    /// Answer normally (used to let requests through before a fault).
    Pass,
    /// One of the token endpoint's faults: 503, 429 + Retry-After, slow, malformed JSON.
    Http(Fault),
    /// Revoke every access token the vendor holds, then handle the request (which gets 401).
    RevokeAccessTokens,
    /// A searchset Bundle (or list page) that has a `next` link but no records.
    MissingEntries,
    /// A `next` link pointing at another host.
    ForeignNextLink,
    /// `302 Found` with this `Location` instead of the search page.
    Redirect(String),
    /// The search page served in `chunks` parts, `pause` apart: a slow, streamed answer.
    Trickle {
        chunks: usize,
        pause: std::time::Duration,
    },
}

/// The patients the sandbox serves.
struct Patients {
    count: u64,
    /// `lastUpdated` of patient 0; patient i is `first + i × STEP_MS` until changed.
    first_ms: i64,
    /// Changed patients: index → (lastUpdated ms, versionId).
    changed: BTreeMap<u64, (i64, u32)>,
    /// The changed patients in `lastUpdated` order.
    changed_order: BTreeSet<(i64, u64)>,
    /// Text served verbatim instead of a patient's generated JSON (hostile records).
    planted: HashMap<u64, String>,
    /// Deleted patients: no longer served.
    deleted: BTreeSet<u64>,
}

impl Patients {
    fn new(count: u64, now: Timestamp) -> Patients {
        // Every generated patient predates the sandbox's start by at least a day, so changes
        // made later sort after all of them.
        let span = i64::try_from(count).unwrap_or(i64::MAX / STEP_MS) * STEP_MS;
        Patients {
            count,
            first_ms: now.unix_millis() - 86_400_000 - span,
            changed: BTreeMap::new(),
            changed_order: BTreeSet::new(),
            planted: HashMap::new(),
            deleted: BTreeSet::new(),
        }
    }

    /// The index of the `position`-th live patient (0-based), in index order.
    fn nth_live(&self, position: u64) -> u64 {
        let mut i = position;
        for &d in &self.deleted {
            if d <= i {
                i += 1;
            } else {
                break;
            }
        }
        i
    }

    /// Patients served.
    fn live(&self) -> u64 {
        self.count - self.deleted.len() as u64
    }

    /// (lastUpdated ms, versionId) of patient `i`.
    fn version(&self, i: u64) -> (i64, u32) {
        self.changed.get(&i).copied().unwrap_or((
            self.first_ms + i64::try_from(i).unwrap_or(i64::MAX / STEP_MS) * STEP_MS,
            1,
        ))
    }

    /// Unchanged patients updated after `after_ms` (or at it, with `inclusive`) start here.
    fn first_generated_after(&self, after_ms: i64, inclusive: bool) -> u64 {
        let delta = after_ms.saturating_sub(self.first_ms);
        if delta < 0 {
            return 0;
        }
        let i = delta / STEP_MS;
        let exact = delta % STEP_MS == 0;
        let i = u64::try_from(i).unwrap_or(u64::MAX);
        let i = if exact && inclusive { i } else { i + 1 };
        i.min(self.count)
    }

    /// Up to `n + 1` indices matching the filter from `cursor`, in (lastUpdated, index) order:
    /// unchanged generated patients first, then changed ones.
    fn select(&self, filter: Filter, cursor: Cursor, n: usize) -> Vec<(u64, Cursor)> {
        let mut out = Vec::with_capacity(n + 1);
        if let Cursor::Generated(start) = cursor {
            let mut i = start.max(self.first_generated_after(filter.after_ms, filter.inclusive));
            while i < self.count && out.len() <= n {
                if !self.changed.contains_key(&i) && !self.deleted.contains(&i) {
                    out.push((i, Cursor::Generated(i)));
                }
                i += 1;
            }
        }
        let from = match cursor {
            Cursor::Changed(ms, i) => (ms, i),
            Cursor::Generated(_) => (i64::MIN, 0),
        };
        for &(ms, i) in self.changed_order.range(from..) {
            if out.len() > n {
                break;
            }
            let matches = ms > filter.after_ms || (filter.inclusive && ms == filter.after_ms);
            if matches && !self.deleted.contains(&i) {
                out.push((i, Cursor::Changed(ms, i)));
            }
        }
        out
    }

    /// How many patients match the filter.
    fn total(&self, filter: Filter) -> u64 {
        let start = self.first_generated_after(filter.after_ms, filter.inclusive);
        let changed_generated = self.changed.range(start..).count() as u64;
        let matching =
            |ms: i64| ms > filter.after_ms || (filter.inclusive && ms == filter.after_ms);
        let changed_matching = self
            .changed_order
            .iter()
            .filter(|(ms, _)| matching(*ms))
            .count() as u64;
        let deleted_matching = self
            .deleted
            .iter()
            .filter(|i| match self.changed.get(i) {
                Some((ms, _)) => matching(*ms),
                None => **i >= start,
            })
            .count() as u64;
        ((self.count - start).saturating_sub(changed_generated) + changed_matching)
            .saturating_sub(deleted_matching)
    }
}

#[derive(Debug, Clone, Copy)]
struct Filter {
    after_ms: i64,
    inclusive: bool,
}

/// Where a page starts: at a generated index, or at a changed patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cursor {
    Generated(u64),
    Changed(i64, u64),
}

impl Cursor {
    fn encode(self) -> String {
        match self {
            Cursor::Generated(i) => format!("g{i}"),
            Cursor::Changed(ms, i) => format!("c{ms}.{i}"),
        }
    }

    fn decode(text: &str) -> Option<Cursor> {
        if let Some(i) = text.strip_prefix('g') {
            return i.parse().ok().map(Cursor::Generated);
        }
        let (ms, i) = text.strip_prefix('c')?.split_once('.')?;
        Some(Cursor::Changed(ms.parse().ok()?, i.parse().ok()?))
    }
}

/// How the FHIR search answers `_elements` (servers differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ElementsSupport {
    /// Serves only the elements asked for (and `SUBSETTED` in `meta.tag`).
    #[default]
    Honour,
    /// Ignores the parameter: whole records.
    Ignore,
    /// Refuses it: 400 with an OperationOutcome.
    Reject,
}

pub(super) struct ApiBooks {
    patients: Patients,
    elements: ElementsSupport,
    faults: HashMap<Vendor, VecDeque<ApiFault>>,
    requests: HashMap<Vendor, u64>,
    in_flight: HashMap<Vendor, u32>,
    max_in_flight: HashMap<Vendor, u32>,
}

impl ApiBooks {
    pub(super) fn new(now: Timestamp) -> ApiBooks {
        ApiBooks {
            patients: Patients::new(DEFAULT_PATIENTS, now),
            elements: ElementsSupport::default(),
            faults: HashMap::new(),
            requests: HashMap::new(),
            in_flight: HashMap::new(),
            max_in_flight: HashMap::new(),
        }
    }
}

impl Inner {
    fn api(&self) -> MutexGuard<'_, ApiBooks> {
        // A panic while holding the lock leaves plain bookkeeping behind; keep serving.
        self.api.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts a request as in flight until dropped.
struct InFlight {
    inner: Arc<Inner>,
    vendor: Vendor,
}

impl InFlight {
    fn enter(inner: &Arc<Inner>, vendor: Vendor) -> InFlight {
        let mut api = inner.api();
        *api.requests.entry(vendor).or_default() += 1;
        let n = api.in_flight.entry(vendor).or_default();
        *n += 1;
        let n = *n;
        let max = api.max_in_flight.entry(vendor).or_default();
        *max = (*max).max(n);
        InFlight {
            inner: inner.clone(),
            vendor,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(n) = self.inner.api().in_flight.get_mut(&self.vendor) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Sandbox {
    /// Serves `count` generated patients from now on, forgetting earlier changes.
    pub fn set_patients(&self, count: u64) {
        let now = self.inner.clock.now();
        self.inner.api().patients = Patients::new(count, now);
    }

    /// Changes the patients with these indices (new name, next version, `lastUpdated` now) and
    /// returns their FHIR ids.
    pub fn change_patients(&self, indices: impl IntoIterator<Item = u64>) -> Vec<String> {
        let now = self.inner.clock.now().unix_millis();
        let mut api = self.inner.api();
        let p = &mut api.patients;
        let mut ids = Vec::new();
        for i in indices.into_iter().filter(|&i| i < p.count) {
            let (old_ms, version) = p.version(i);
            p.changed_order.remove(&(old_ms, i));
            p.changed.insert(i, (now, version + 1));
            p.changed_order.insert((now, i));
            ids.push(fhir_id(i));
        }
        ids
    }

    /// Deletes the patients with these indices (they are no longer served) and returns their
    /// FHIR ids.
    pub fn delete_patients(&self, indices: impl IntoIterator<Item = u64>) -> Vec<String> {
        let mut api = self.inner.api();
        let p = &mut api.patients;
        let mut ids = Vec::new();
        for i in indices.into_iter().filter(|&i| i < p.count) {
            if p.deleted.insert(i) {
                ids.push(fhir_id(i));
            }
        }
        ids
    }

    /// Serves deleted patients again, as changed now (next version), and returns their ids.
    pub fn restore_patients(&self, indices: impl IntoIterator<Item = u64>) -> Vec<String> {
        let indices: Vec<u64> = {
            let mut api = self.inner.api();
            indices
                .into_iter()
                .filter(|i| api.patients.deleted.remove(i))
                .collect()
        };
        self.change_patients(indices)
    }

    /// Adds `n` new patients (version 1, `lastUpdated` now) and returns their FHIR ids.
    pub fn add_patients(&self, n: u64) -> Vec<String> {
        let now = self.inner.clock.now().unix_millis();
        let mut api = self.inner.api();
        let p = &mut api.patients;
        let first = p.count;
        p.count += n;
        for i in first..p.count {
            p.changed.insert(i, (now, 1));
            p.changed_order.insert((now, i));
        }
        (first..p.count).map(fhir_id).collect()
    }

    /// How the FHIR search treats `_elements` from now on.
    pub fn set_elements_support(&self, support: ElementsSupport) {
        self.inner.api().elements = support;
    }

    /// Serves `raw` verbatim, unchecked, as patient `index`'s record: its resource in FHIR
    /// searches and its item in NikoHealth's list (write it in the shape of the API the test
    /// reads). Paging and `_lastUpdated` filtering still go by the generated patient. Lasts until
    /// [`Sandbox::unplant_patients`] or [`Sandbox::set_patients`].
    pub fn plant_patient(&self, index: u64, raw: impl Into<String>) {
        self.inner.api().patients.planted.insert(index, raw.into());
    }

    /// Serves the generated JSON again for every patient given to [`Sandbox::plant_patient`].
    pub fn unplant_patients(&self) {
        self.inner.api().patients.planted.clear();
    }

    /// Queues `faults` for `vendor`'s data API, served one per request in order (use
    /// [`ApiFault::Pass`] to let requests through first).
    pub fn inject_api(&self, vendor: Vendor, faults: impl IntoIterator<Item = ApiFault>) {
        self.inner
            .api()
            .faults
            .entry(vendor)
            .or_default()
            .extend(faults);
    }

    /// Drops every data API fault still queued for `vendor`.
    pub fn clear_api_faults(&self, vendor: Vendor) {
        self.inner.api().faults.remove(&vendor);
    }

    /// Lets `pass` requests through, then serves `fault` `times` times.
    pub fn inject_api_after(&self, vendor: Vendor, pass: usize, fault: ApiFault, times: usize) {
        self.inject_api(
            vendor,
            std::iter::repeat_n(ApiFault::Pass, pass).chain(std::iter::repeat_n(fault, times)),
        );
    }

    /// Data API requests served for `vendor`.
    pub fn api_requests(&self, vendor: Vendor) -> u64 {
        self.inner.api().requests.get(&vendor).copied().unwrap_or(0)
    }

    /// The most data API requests for `vendor` that were ever in progress at once.
    pub fn max_concurrent_api_requests(&self, vendor: Vendor) -> u32 {
        self.inner
            .api()
            .max_in_flight
            .get(&vendor)
            .copied()
            .unwrap_or(0)
    }

    /// Revokes every access token issued for `vendor`: API calls with them get 401.
    pub fn revoke_access_tokens(&self, vendor: Vendor) {
        self.inner.revoke_access_tokens(vendor);
    }

    /// The FHIR Patient JSON the sandbox serves now for patient `index`.
    pub fn patient_json(&self, index: u64) -> String {
        let (ms, version) = self.inner.api().patients.version(index);
        fhir_patient(index, ms, version)
    }
}

/// The FHIR id of patient `i`.
pub fn fhir_id(i: u64) -> String {
    format!("pat-{i:07}")
}

/// A small deterministic mixer (SplitMix64): the same patient looks the same in every run.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

const FAMILY: [&str; 16] = [
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "O'Brien",
];
const GIVEN: [&str; 16] = [
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "José",
    "Zoë",
];
const CITY: [(&str, &str, &str); 8] = [
    ("Springfield", "IL", "627"),
    ("Madison", "WI", "537"),
    ("Franklin", "TN", "370"),
    ("Greenville", "SC", "296"),
    ("Salem", "OR", "973"),
    ("Fairview", "TX", "750"),
    ("Clinton", "IA", "527"),
    ("Georgetown", "KY", "403"),
];

/// Names and facts of patient `i` at `version` (a changed patient gets another family name).
struct Person {
    family: &'static str,
    given: &'static str,
    middle: &'static str,
    female: bool,
    birth: (u64, u64, u64),
    city: (&'static str, &'static str, &'static str),
    h: u64,
}

fn person(i: u64, version: u32) -> Person {
    let h = mix(i);
    let v = u64::from(version.saturating_sub(1));
    let pick = |shift: u32| ((h >> shift) & 15) as usize;
    Person {
        family: FAMILY[(pick(0) + v as usize * 7) % 16],
        given: GIVEN[pick(4)],
        middle: GIVEN[pick(8)],
        female: h & (1 << 12) != 0,
        birth: (
            1930 + (h >> 16) % 90,
            1 + (h >> 24) % 12,
            1 + (h >> 32) % 28,
        ),
        city: CITY[pick(40) % 8],
        h,
    }
}

fn iso_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// FHIR R4 Patient JSON for patient `i` (about 1.4 KB).
pub fn fhir_patient(i: u64, updated_ms: i64, version: u32) -> String {
    let p = person(i, version);
    let (y, m, d) = p.birth;
    let (city, state, zip) = p.city;
    let gender = if p.female { "female" } else { "male" };
    let family = serde_json::to_string(p.family).unwrap_or_default();
    let mut s = String::with_capacity(1600);
    // Writing to a String cannot fail.
    let _ = write!(
        s,
        r#"{{"resourceType":"Patient","id":"{id}","meta":{{"versionId":"{version}","lastUpdated":"{updated}","profile":["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]}},"#,
        id = fhir_id(i),
        updated = iso_ms(updated_ms),
    );
    let _ = write!(
        s,
        r#""text":{{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">Sandbox patient {i}</div>"}},"#
    );
    let _ = write!(
        s,
        r#""identifier":[{{"use":"usual","type":{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/v2-0203","code":"MR","display":"Medical Record Number"}}],"text":"MRN"}},"system":"urn:oid:2.16.840.1.113883.3.1001","value":"MRN{mrn:08}"}}],"#,
        mrn = p.h % 100_000_000
    );
    let _ = write!(
        s,
        r#""active":true,"name":[{{"use":"official","family":{family},"given":["{given}","{middle}"],"prefix":["{prefix}"]}},{{"use":"usual","given":["{given}"]}}],"#,
        given = p.given,
        middle = p.middle,
        prefix = if p.female { "Ms." } else { "Mr." },
    );
    let _ = write!(
        s,
        r#""telecom":[{{"system":"phone","value":"555-{a:03}-{b:04}","use":"home"}},{{"system":"email","value":"patient{i}@example.org","use":"home"}}],"#,
        a = (p.h >> 44) % 1000,
        b = (p.h >> 20) % 10000,
    );
    let _ = write!(
        s,
        r#""gender":"{gender}","birthDate":"{y:04}-{m:02}-{d:02}","address":[{{"use":"home","type":"physical","line":["{n} Main Street","Apt {apt}"],"city":"{city}","state":"{state}","postalCode":"{zip}{z2:02}","country":"US"}}],"#,
        n = 1 + (p.h >> 8) % 9000,
        apt = 1 + (p.h >> 36) % 40,
        z2 = (p.h >> 52) % 100,
    );
    let _ = write!(
        s,
        r#""maritalStatus":{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/v3-MaritalStatus","code":"M","display":"Married"}}]}},"communication":[{{"language":{{"coding":[{{"system":"urn:ietf:bcp:47","code":"en-US","display":"English (United States)"}}]}},"preferred":true}}],"generalPractitioner":[{{"reference":"Practitioner/prac-{gp}","display":"Dr. Sandbox {gp}"}}],"managingOrganization":{{"reference":"Organization/sandbox-practice"}}}}"#,
        gp = p.h % 20,
    );
    s
}

/// NikoHealth's patient shape (camelCase .NET style; the vendor's is not public).
pub fn niko_patient(i: u64, updated_ms: i64, version: u32) -> String {
    let p = person(i, version);
    let (y, m, d) = p.birth;
    let (city, state, zip) = p.city;
    serde_json::json!({
        "id": i + 1,
        "firstName": p.given,
        "middleName": p.middle,
        "lastName": p.family,
        "dateOfBirth": format!("{y:04}-{m:02}-{d:02}T00:00:00"),
        "gender": if p.female { "Female" } else { "Male" },
        "phone": format!("555-{:03}-{:04}", (p.h >> 44) % 1000, (p.h >> 20) % 10000),
        "email": format!("patient{i}@example.org"),
        "address": { "line1": format!("{} Main Street", 1 + (p.h >> 8) % 9000), "city": city, "state": state, "zip": format!("{zip}{:02}", (p.h >> 52) % 100) },
        "isActive": true,
        "version": version,
        "modifiedDate": iso_ms(updated_ms),
    })
    .to_string()
}

fn outcome(status: StatusCode, code: &str, diagnostics: &str) -> Response {
    let body = serde_json::json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": "error", "code": code, "diagnostics": diagnostics }],
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/fhir+json; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

/// Checks the bearer token (and Nextech's practice header), takes the next queued fault, and
/// serves the fault's answer if it has one.
async fn admit(
    inner: &Arc<Inner>,
    vendor: Vendor,
    headers: &HeaderMap,
) -> Result<Option<ApiFault>, Response> {
    let fault = inner
        .api()
        .faults
        .get_mut(&vendor)
        .and_then(VecDeque::pop_front);
    let fault = match fault {
        Some(ApiFault::Http(Fault::Slow(d))) => {
            tokio::time::sleep(d).await;
            None
        }
        Some(ApiFault::Http(f)) => return Err(super::fault_response(vendor, f)),
        Some(ApiFault::RevokeAccessTokens) => {
            inner.revoke_access_tokens(vendor);
            None
        }
        Some(ApiFault::Pass) | None => None,
        other => other,
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let now = inner.clock.now();
    let valid = token.is_some_and(|t| {
        inner
            .books()
            .access_tokens
            .get(t)
            .is_some_and(|(v, exp)| *v == vendor && *exp > now)
    });
    if !valid {
        let mut r = outcome(
            StatusCode::UNAUTHORIZED,
            "login",
            "The access token is missing, expired or revoked",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        return Err(r);
    }
    if vendor == Vendor::Nextech
        && headers.get("nx-practice-id").and_then(|v| v.to_str().ok()) != Some(NEXTECH_PRACTICE_ID)
    {
        return Err(outcome(
            StatusCode::FORBIDDEN,
            "forbidden",
            "The nx-practice-id header is missing or names a practice this client cannot access",
        ));
    }
    Ok(fault)
}

/// `GET /{vendor}/…/metadata`: a minimal CapabilityStatement (what `ehrsync doctor` asks
/// for). Admitted like a search: bearer token, Nextech's practice header, queued API faults.
pub(super) async fn fhir_metadata(
    State(inner): State<Arc<Inner>>,
    Path(vendor): Path<String>,
    headers: HeaderMap,
) -> Response {
    let vendor = match vendor.as_str() {
        "nextech" => Vendor::Nextech,
        "carecentric" => Vendor::CareCentric,
        "nethealth" => Vendor::NetHealth,
        _ => return outcome(StatusCode::NOT_FOUND, "not-found", "no such FHIR server"),
    };
    let _in_flight = InFlight::enter(&inner, vendor);
    if let Err(r) = admit(&inner, vendor, &headers).await {
        return r;
    }
    let body = serde_json::json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{ "mode": "server", "resource": [{ "type": "Patient" }] }],
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/fhir+json; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

/// `GET /{vendor}/…/Patient`: FHIR search.
pub(super) async fn fhir_search(
    State(inner): State<Arc<Inner>>,
    Path(vendor): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let vendor = match vendor.as_str() {
        "nextech" => Vendor::Nextech,
        "carecentric" => Vendor::CareCentric,
        "nethealth" => Vendor::NetHealth,
        _ => return outcome(StatusCode::NOT_FOUND, "not-found", "no such FHIR server"),
    };
    let _in_flight = InFlight::enter(&inner, vendor);
    let fault = match admit(&inner, vendor, &headers).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    for key in q.keys() {
        if !matches!(
            key.as_str(),
            "_count" | "_lastUpdated" | "_cursor" | "_sort" | "_elements"
        ) {
            return outcome(
                StatusCode::BAD_REQUEST,
                "not-supported",
                &format!("Unknown search parameter {key}"),
            );
        }
    }
    let elements_support = inner.api().elements;
    let subset = match q.get("_elements") {
        None => false,
        Some(_) if elements_support == ElementsSupport::Reject => {
            return outcome(
                StatusCode::BAD_REQUEST,
                "not-supported",
                "Unknown search parameter _elements",
            );
        }
        Some(e) => elements_support == ElementsSupport::Honour && e == "id",
    };
    let count = match q.get("_count").map(|c| c.parse::<usize>()) {
        None => 50,
        Some(Ok(n)) if n >= 1 => n.min(MAX_PAGE),
        Some(_) => {
            return outcome(
                StatusCode::BAD_REQUEST,
                "invalid",
                "_count must be a positive integer",
            );
        }
    };
    let filter = match q.get("_lastUpdated") {
        None => Filter {
            after_ms: i64::MIN,
            inclusive: true,
        },
        Some(v) => {
            let (inclusive, at) = match (v.strip_prefix("gt"), v.strip_prefix("ge")) {
                (Some(at), _) => (false, at),
                (_, Some(at)) => (true, at),
                _ => {
                    return outcome(
                        StatusCode::BAD_REQUEST,
                        "not-supported",
                        "_lastUpdated supports the gt and ge prefixes",
                    );
                }
            };
            match chrono::DateTime::parse_from_rfc3339(at) {
                Ok(t) => Filter {
                    after_ms: t.timestamp_millis(),
                    inclusive,
                },
                Err(_) => {
                    return outcome(
                        StatusCode::BAD_REQUEST,
                        "invalid",
                        "_lastUpdated is not an instant",
                    );
                }
            }
        }
    };
    let cursor = match q.get("_cursor").map(|c| Cursor::decode(c)) {
        None => Cursor::Generated(0),
        Some(Some(c)) => c,
        Some(None) => return outcome(StatusCode::BAD_REQUEST, "invalid", "unknown _cursor"),
    };
    let (selected, total) = {
        let api = inner.api();
        let selected: Vec<(u64, Cursor, i64, u32, Option<String>)> = api
            .patients
            .select(filter, cursor, count)
            .into_iter()
            .map(|(i, c)| {
                let (ms, v) = api.patients.version(i);
                (i, c, ms, v, api.patients.planted.get(&i).cloned())
            })
            .collect();
        (selected, api.patients.total(filter))
    };
    let base = format!("{}/{}", inner.base, fhir_path(vendor));
    let link = |cursor: Option<Cursor>| {
        let mut url = format!("{base}/Patient?_count={count}");
        for key in ["_lastUpdated", "_elements"] {
            if let Some(v) = q.get(key) {
                url.push_str(&format!("&{key}="));
                url.push_str(
                    &url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>(),
                );
            }
        }
        if let Some(c) = cursor {
            url.push_str("&_cursor=");
            url.push_str(&c.encode());
        }
        url
    };
    let mut next = selected.get(count).map(|(_, c, ..)| link(Some(*c)));
    let mut entries = &selected[..selected.len().min(count)];
    match fault {
        Some(ApiFault::MissingEntries) => {
            entries = &[];
            next = Some(next.unwrap_or_else(|| link(Some(cursor))));
        }
        Some(ApiFault::ForeignNextLink) => {
            next = Some("https://elsewhere.example/fhir/Patient?_count=1".to_owned());
        }
        _ => {}
    }
    let mut body = String::with_capacity(256 + entries.len() * 1600);
    let _ = write!(
        body,
        r#"{{"resourceType":"Bundle","id":"{}","type":"searchset","total":{total},"link":[{{"relation":"self","url":"{}"}}"#,
        super::random_hex(8),
        link((cursor != Cursor::Generated(0)).then_some(cursor)),
    );
    if let Some(n) = &next {
        let _ = write!(body, r#",{{"relation":"next","url":"{n}"}}"#);
    }
    body.push(']');
    if !entries.is_empty() {
        body.push_str(r#","entry":["#);
        for (k, (i, _, ms, v, planted)) in entries.iter().enumerate() {
            if k > 0 {
                body.push(',');
            }
            let resource: Cow<'_, str> = if subset {
                format!(
                    r#"{{"resourceType":"Patient","id":"{}","meta":{{"tag":[{{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"SUBSETTED"}}]}}}}"#,
                    fhir_id(*i)
                )
                .into()
            } else {
                planted
                    .as_deref()
                    .map_or_else(|| fhir_patient(*i, *ms, *v).into(), Cow::Borrowed)
            };
            let _ = write!(
                body,
                r#"{{"fullUrl":"{base}/Patient/{}","resource":{resource},"search":{{"mode":"match"}}}}"#,
                fhir_id(*i),
            );
        }
        body.push(']');
    }
    body.push('}');
    match fault {
        Some(ApiFault::Redirect(location)) => {
            return (StatusCode::FOUND, [(header::LOCATION, location)], "").into_response();
        }
        Some(ApiFault::Trickle { chunks, pause }) => {
            let size = body.len().div_ceil(chunks.max(1)).max(1);
            let parts: Vec<Vec<u8>> = body.as_bytes().chunks(size).map(<[u8]>::to_vec).collect();
            use futures_util::StreamExt as _;
            let stream = futures_util::stream::iter(parts.into_iter().enumerate()).then(
                move |(k, part)| async move {
                    if k > 0 {
                        tokio::time::sleep(pause).await;
                    }
                    Ok::<_, std::io::Error>(part)
                },
            );
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/fhir+json; charset=utf-8")],
                axum::body::Body::from_stream(stream),
            )
                .into_response();
        }
        _ => {}
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/fhir+json; charset=utf-8")],
        body,
    )
        .into_response()
}

/// The path of `vendor`'s FHIR base below the sandbox root.
pub(super) fn fhir_path(vendor: Vendor) -> &'static str {
    match vendor {
        Vendor::Nextech => "nextech/api",
        Vendor::CareCentric => "carecentric/fhir",
        Vendor::NetHealth => "nethealth/fhir",
        Vendor::NikoHealth => "nikohealth/sandbox",
        Vendor::Generic => "generic",
    }
}

/// `GET /nikohealth/{domain}/api/external/v1/patients?page=N&pageSize=M` (pages from 1).
pub(super) async fn niko_patients(
    State(inner): State<Arc<Inner>>,
    Path(_domain): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let vendor = Vendor::NikoHealth;
    let _in_flight = InFlight::enter(&inner, vendor);
    let fault = match admit(&inner, vendor, &headers).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let number =
        |key: &str, default: u64| q.get(key).map_or(Some(default), |v| v.parse::<u64>().ok());
    let (Some(page), Some(size)) = (number("page", 1), number("pageSize", 20)) else {
        return super::json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "message": "page and pageSize must be numbers" }),
        );
    };
    if page == 0 || size == 0 || size > MAX_PAGE as u64 {
        return super::json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "message": "page starts at 1; pageSize is 1–1000" }),
        );
    }
    let items: Vec<String> = if fault == Some(ApiFault::MissingEntries) {
        Vec::new()
    } else {
        let api = inner.api();
        let total = api.patients.live();
        let start = (page - 1).saturating_mul(size);
        (start..total.min(start.saturating_add(size)))
            .map(|position| api.patients.nth_live(position))
            .map(|i| match api.patients.planted.get(&i) {
                Some(raw) => raw.clone(),
                None => {
                    let (ms, v) = api.patients.version(i);
                    niko_patient(i, ms, v)
                }
            })
            .collect()
    };
    let total = inner.api().patients.live();
    let body = format!(
        r#"{{"items":[{}],"page":{page},"pageSize":{size},"totalCount":{total}}}"#,
        items.join(",")
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(p: &Patients, filter: Filter, mut cursor: Cursor, n: usize) -> Vec<u64> {
        let mut all = Vec::new();
        loop {
            let page = p.select(filter, cursor, n);
            all.extend(page.iter().take(n).map(|(i, _)| *i));
            match page.get(n) {
                Some((_, c)) => cursor = *c,
                None => return all,
            }
        }
    }

    #[test]
    fn paging_visits_every_patient_once_in_update_order() {
        let now = Timestamp::from_unix_millis(1_800_000_000_000);
        let mut p = Patients::new(1000, now);
        let all = Filter {
            after_ms: i64::MIN,
            inclusive: true,
        };
        assert_eq!(
            ids(&p, all, Cursor::Generated(0), 7),
            (0..1000).collect::<Vec<_>>()
        );
        assert_eq!(p.total(all), 1000);
        for (k, i) in [5u64, 500, 999].into_iter().enumerate() {
            let ms = now.unix_millis() + k as i64;
            p.changed.insert(i, (ms, 2));
            p.changed_order.insert((ms, i));
        }
        let every = ids(&p, all, Cursor::Generated(0), 10);
        assert_eq!(every.len(), 1000);
        assert_eq!(&every[997..], &[5, 500, 999]);
        // After the newest generated patient: only the changed ones.
        let since = Filter {
            after_ms: p.version(998).0,
            inclusive: false,
        };
        assert_eq!(ids(&p, since, Cursor::Generated(0), 2), vec![5, 500, 999]);
        assert_eq!(p.total(since), 3);
        let ge = Filter {
            after_ms: p.version(998).0,
            inclusive: true,
        };
        assert_eq!(ids(&p, ge, Cursor::Generated(0), 2), vec![998, 5, 500, 999]);
    }

    #[test]
    fn generated_patients_are_deterministic_json_of_realistic_size() {
        let a = fhir_patient(42, 1_800_000_000_000, 1);
        assert_eq!(a, fhir_patient(42, 1_800_000_000_000, 1));
        let v: serde_json::Value = serde_json::from_str(&a).unwrap();
        assert_eq!(v["id"], "pat-0000042");
        assert!((1200..1700).contains(&a.len()), "{}", a.len());
        assert_ne!(fhir_patient(42, 1, 2), fhir_patient(42, 1, 1));
        let n: serde_json::Value = serde_json::from_str(&niko_patient(42, 1, 1)).unwrap();
        assert_eq!(n["id"], 43);
        assert_eq!(
            Cursor::decode(&Cursor::Changed(-5, 9).encode()),
            Some(Cursor::Changed(-5, 9))
        );
    }
}
