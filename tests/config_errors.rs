//! Bad configs: each must exit 2, print nothing on stdout, and name the offending key (and the
//! fix) on stderr — and a config with several problems must list all of them.

mod common;

use common::{ehrsync, write_config};

/// A valid NikoHealth account, to which cases append or in which they substitute.
const NIKO: &str = r#"
[accounts.niko]
vendor = "nikohealth"
domain = "acme"
client_id = "ehrsync"
client_secret = "inline-secret"

[[accounts.niko.jobs]]
name = "patients"
kind = "nikohealth_patients"
schedule = "0 */30 * * * *"
"#;

struct Case {
    name: &'static str,
    config: String,
    env: Vec<(&'static str, &'static str)>,
    /// Every string here must appear in stderr.
    expect: Vec<&'static str>,
    /// No string here may appear in stderr (jargon a new user cannot act on).
    absent: Vec<&'static str>,
}

fn case(name: &'static str, config: impl Into<String>, expect: &[&'static str]) -> Case {
    Case {
        name,
        config: config.into(),
        env: Vec::new(),
        expect: expect.to_vec(),
        absent: Vec::new(),
    }
}

impl Case {
    fn env(mut self, vars: &[(&'static str, &'static str)]) -> Case {
        self.env = vars.to_vec();
        self
    }

    fn absent(mut self, jargon: &[&'static str]) -> Case {
        self.absent = jargon.to_vec();
        self
    }
}

fn niko_with(from: &str, to: &str) -> String {
    assert!(NIKO.contains(from), "{from}");
    NIKO.replacen(from, to, 1)
}

fn cases() -> Vec<Case> {
    vec![
        case(
            "unknown section",
            format!("[agnet]\ndatabase = 'x.db'\n{NIKO}"),
            &["agnet: unknown section; did you mean `agent`?"],
        ),
        case(
            "unknown agent key",
            format!("[agent]\nmetrics_port = 1\n{NIKO}"),
            &["agent.metrics_port: unknown key"],
        ),
        case(
            "unknown account key",
            niko_with("client_id", "client_sercet = 'x'\nclient_id"),
            &["accounts.niko.client_sercet: unknown key; did you mean `client_secret`?"],
        ),
        case(
            "unknown job key",
            niko_with("schedule", "shedule = '1'\nschedule"),
            &["accounts.niko.jobs[0].shedule: unknown key; did you mean `schedule`?"],
        ),
        case(
            "unknown vendor",
            niko_with("\"nikohealth\"", "\"epic\""),
            &["accounts.niko.vendor:", "epic", "nikohealth"],
        ),
        // Issue 15: the right spelling, not just "unknown".
        case(
            "vendor with capitals",
            niko_with("\"nikohealth\"", "\"NexTech\""),
            &[
                "accounts.niko.vendor: `NexTech` is not one of `nextech`, `nethealth`, `carecentric`, \
                 `nikohealth` or `generic`; the value is case-sensitive: write vendor = \"nextech\"",
                ": 1 problem",
            ],
        ),
        case(
            "vendor misspelt",
            niko_with("\"nikohealth\"", "\"niko-health\""),
            &["accounts.niko.vendor: `niko-health` is not one of", "did you mean vendor = \"nikohealth\"?"],
        ),
        case(
            "grant with capitals",
            "[accounts.g]\nvendor = 'generic'\ngrant = 'Client_Credentials'\ntoken_url = 'https://x.example/t'\nclient_id = 'c'\nclient_secret = 's'\n",
            &["accounts.g.grant:", "case-sensitive: write grant = \"client_credentials\""],
        ),
        case(
            "job kind with capitals",
            niko_with("\"nikohealth_patients\"", "\"FHIR\""),
            &["accounts.niko.jobs[0].kind:", "case-sensitive: write kind = \"fhir\""],
        ),
        case(
            "missing vendor",
            niko_with("vendor = \"nikohealth\"\n", ""),
            &["accounts.niko.vendor: missing; choose one of"],
        ),
        case(
            "missing client_id",
            niko_with("client_id = \"ehrsync\"\n", ""),
            &["accounts.niko.client_id: missing"],
        ),
        case(
            "client_credentials without secret",
            niko_with("client_secret = \"inline-secret\"\n", ""),
            &[
                "accounts.niko.client_secret: missing; the client_credentials grant authenticates with it",
            ],
        ),
        case(
            "password grant without username",
            "[accounts.cc]\nvendor = 'carecentric'\nclient_id = 'c'\nclient_secret = 's'\npassword = 'p'\n",
            &[
                "accounts.cc.username: missing; the password grant logs in with username and password",
            ],
        ),
        case(
            "password grant without password",
            "[accounts.cc]\nvendor = 'carecentric'\nclient_id = 'c'\nclient_secret = 's'\nusername = 'u'\n",
            &["accounts.cc.password: missing; the password grant"],
        ),
        case(
            "nikohealth without domain",
            niko_with("domain = \"acme\"\n", ""),
            &["accounts.niko.domain: missing; the nikohealth token URL"],
        ),
        case(
            "not a URL",
            "[accounts.g]\nvendor = 'generic'\ngrant = 'client_credentials'\ntoken_url = 'login example'\nclient_id = 'c'\nclient_secret = 's'\n",
            &["accounts.g.token_url:", "is not a valid URL"],
        ),
        case(
            "http to a remote host",
            "[accounts.g]\nvendor = 'generic'\ngrant = 'client_credentials'\ntoken_url = 'http://login.example/token'\nclient_id = 'c'\nclient_secret = 's'\n",
            &["accounts.g.token_url:", "http://", "use https://"],
        ),
        case(
            "api_base over http",
            niko_with("domain", "api_base = 'http://10.1.2.3/api'\ndomain"),
            &["accounts.niko.api_base:", "use https://"],
        ),
        // Issue 15: a five-field (Unix) cron gets the six-field expression to write.
        case(
            "five-field cron",
            niko_with("0 */30 * * * *", "*/15 * * * *"),
            &[
                "accounts.niko.jobs[0].schedule: `*/15 * * * *` has five fields; \
                 ehrsync schedules have six fields, seconds first: add a seconds field: `0 */15 * * * *`",
            ],
        )
        .absent(&["Invalid pattern"]),
        case(
            "five-field cron that is wrong anyway",
            niko_with("0 */30 * * * *", "*/15 * * * MOO"),
            &[
                "accounts.niko.jobs[0].schedule: `*/15 * * * MOO` has five fields; \
                 ehrsync schedules have six fields, seconds first",
                "with a seconds field added (`0 */15 * * * MOO`) it is still not valid",
            ],
        ),
        case(
            "cron with four fields",
            niko_with("0 */30 * * * *", "0 * * *"),
            &[
                "accounts.niko.jobs[0].schedule: `0 * * *` has 4 fields; ehrsync schedules have six",
                "e.g. \"0 */15 * * * *\"",
            ],
        )
        .absent(&["Invalid pattern"]),
        case(
            "duplicate job names",
            format!(
                "{NIKO}\n[[accounts.niko.jobs]]\nname = 'patients'\nkind = 'nikohealth_patients'\nschedule = '0 0 * * * *'\n"
            ),
            &["accounts.niko.jobs[1].name: duplicate job name `patients` (also jobs[0])"],
        ),
        case(
            "unset env var",
            niko_with("\"inline-secret\"", "{ env = \"NIKO_SECRET_UNSET\" }"),
            &["accounts.niko.client_secret: environment variable NIKO_SECRET_UNSET is not set"],
        ),
        case(
            "unreadable secret file",
            niko_with(
                "\"inline-secret\"",
                "{ file = \"/nonexistent/ehrsync/secret\" }",
            ),
            &["accounts.niko.client_secret: cannot read secret file /nonexistent/ehrsync/secret"],
        ),
        case(
            "credential outside systemd",
            niko_with("\"inline-secret\"", "{ credential = \"niko\" }"),
            &["accounts.niko.client_secret: credential `niko` needs $CREDENTIALS_DIRECTORY"],
        ),
        case(
            "secret as a number",
            niko_with("\"inline-secret\"", "12345"),
            &["accounts.niko.client_secret:", "quote it"],
        ),
        case(
            "secret with two sources",
            niko_with("\"inline-secret\"", "{ env = \"A\", file = \"b\" }"),
            &[
                "accounts.niko.client_secret:",
                "exactly one of `env`, `file` or `credential`",
            ],
        ),
        case(
            "bad duration",
            niko_with(
                "client_id",
                "refresh_token_lifetime = '14 fortnights'\nclient_id",
            ),
            &[
                "accounts.niko.refresh_token_lifetime: `14 fortnights` is not a duration: \
                 `fortnights` is not a unit; use s, m, h, d or w",
            ],
        ),
        // Issue 15: plain words instead of humantime's "expected number at 0".
        case(
            "duration without a number",
            niko_with("client_id", "access_token_lifetime = 'nope'\nclient_id"),
            &[
                "accounts.niko.access_token_lifetime: `nope` is not a duration: \
                 write a number and a unit, such as \"20s\", \"5m\" or \"1h\"",
            ],
        )
        .absent(&["expected number at", "at 0"]),
        case(
            "duration as a bare integer",
            niko_with("client_id", "refresh_token_lifetime = 20\nclient_id"),
            &["accounts.niko.refresh_token_lifetime: 20 has no unit; write a unit: \"20s\""],
        ),
        case(
            "duration as a bare number",
            niko_with("client_id", "min_lead = 1.5\nclient_id"),
            &["accounts.niko.min_lead: 1.5 has no unit; write a unit: \"1.5s\""],
        ),
        case(
            "negative duration",
            niko_with("client_id", "min_lead = -5\nclient_id"),
            &["accounts.niko.min_lead: a duration cannot be negative"],
        ),
        case(
            "duration in months",
            niko_with("client_id", "refresh_token_lifetime = '3M'\nclient_id"),
            &[
                "accounts.niko.refresh_token_lifetime: `3M` is not accepted: months have no fixed length \
                 (and minutes are `m`); write days, e.g. \"90d\"",
            ],
        ),
        case(
            "duration with a capital unit",
            niko_with("client_id", "min_lead = '90S'\nclient_id"),
            &["accounts.niko.min_lead: `90S` is not a duration: units are lower-case; write \"90s\""],
        )
        .absent(&["unknown time unit"]),
        case(
            "empty duration",
            niko_with("client_id", "min_lead = ''\nclient_id"),
            &["accounts.niko.min_lead: is empty; write a duration such as \"20s\", \"5m\" or \"1h\""],
        ),
        // A refused duration does not hide the rest of its section, nor the account's jobs.
        case(
            "every refused duration at once",
            format!(
                "[agent]\nshutdown_grace = 30\n{}\n[[accounts.niko.jobs]]\nname = 'q'\nkind = 'fhir'\n\
                 schedule = '*/5 * * * *'\noverlap = 300\n",
                niko_with("client_id", "min_lead = 20\nrefresh_token_lifetime = '0s'\nclient_id")
                    .replace("schedule =", "schedule2 = 1\nschedule =")
            ),
            &[
                "agent.shutdown_grace: 30 has no unit; write a unit: \"30s\"",
                "accounts.niko.min_lead: 20 has no unit; write a unit: \"20s\"",
                "accounts.niko.refresh_token_lifetime: must be longer than zero",
                "accounts.niko.jobs[0].schedule2: unknown key; did you mean `schedule`?",
                "accounts.niko.jobs[1].overlap: 300 has no unit; write a unit: \"300s\"",
                "accounts.niko.jobs[1].schedule: `*/5 * * * *` has five fields",
                ": 6 problems",
            ],
        ),
        case(
            "jobs as named tables",
            niko_with("[[accounts.niko.jobs]]\nname = \"patients\"", "[accounts.niko.jobs.patients]"),
            &[
                "accounts.niko.jobs: jobs are a list: write `[[accounts.niko.jobs]]` (double brackets) \
                 above each job, with `name = \"patients\"` in it, not `[accounts.niko.jobs.patients]`",
            ],
        ),
        case(
            "duration override without a unit",
            NIKO,
            &[
                "agent.shutdown_grace: 20 has no unit; write a unit: \"20s\"",
                "(set by the environment variable EHRSYNC__AGENT__SHUTDOWN_GRACE)",
            ],
        )
        .env(&[("EHRSYNC__AGENT__SHUTDOWN_GRACE", "20")]),
        case(
            "refresh_ratio out of range",
            niko_with("client_id", "refresh_ratio = 1.5\nclient_id"),
            &["accounts.niko.refresh_ratio: 1.5 is outside 0.05–0.95"],
        ),
        case(
            "page_size not a number",
            niko_with("schedule", "page_size = 'lots'\nschedule"),
            &["accounts.niko.jobs[0].page_size: expected"],
        ),
        case(
            "page_size too large",
            niko_with("schedule", "page_size = 5000\nschedule"),
            &["accounts.niko.jobs[0].page_size: 5000 is outside 1–1000"],
        ),
        case(
            "bad metrics_listen",
            format!("[agent]\nmetrics_listen = 'localhost'\n{NIKO}"),
            &["agent.metrics_listen: `localhost` is not an IP address and port"],
        ),
        case(
            "shutdown_grace too long",
            format!("[agent]\nshutdown_grace = '1h'\n{NIKO}"),
            &["agent.shutdown_grace: is longer than the 10m allowed"],
        ),
        case(
            "shutdown_grace not a duration",
            format!("[agent]\nshutdown_grace = 'soon'\n{NIKO}"),
            &["agent.shutdown_grace: `soon` is not a duration"],
        ),
        case(
            "nextech without practice id",
            "[accounts.nx]\nvendor = 'nextech'\nclient_id = 'c'\nusername = 'u'\npassword = 'p'\n",
            &[
                "accounts.nx.practice_id: missing; every API call carries it as the nx-practice-id header",
            ],
        ),
        case(
            "job without api_base",
            "[accounts.g]\nvendor = 'generic'\ngrant = 'client_credentials'\ntoken_url = 'https://x.example/t'\nclient_id = 'c'\nclient_secret = 's'\n[[accounts.g.jobs]]\nname = 'p'\nkind = 'fhir'\nschedule = '0 0 * * * *'\n",
            &["accounts.g.api_base: missing; jobs call the vendor API"],
        ),
        case(
            "invalid account name",
            NIKO.replace("accounts.niko", "accounts.NikoMain"),
            &["accounts.NikoMain: `NikoMain` is not a valid name"],
        ),
        case(
            "TOML syntax",
            format!("{NIKO}\n[agent\n"),
            &["TOML syntax error at line 13"],
        ),
        case(
            "unknown client_auth",
            niko_with("client_id", "client_auth = 'jwt'\nclient_id"),
            &["accounts.niko.client_auth:", "jwt", "basic"],
        ),
        case(
            "authorization header",
            niko_with(
                "client_id",
                "headers = { Authorization = 'Bearer x' }\nclient_id",
            ),
            &["accounts.niko.headers.Authorization: is set by ehrsync from the account's token"],
        ),
        case(
            "resource on a nikohealth job",
            niko_with("schedule", "resource = 'Patient'\nschedule"),
            &["accounts.niko.jobs[0].resource: applies only to kind = \"fhir\""],
        ),
        case(
            "paging keys of a list job",
            niko_with(
                "schedule",
                "overlap = '1m'\nfirst_page = 2\nitems = 'items'\npage_param = 'page no'\npath = 'patients?all'\nschedule",
            ),
            &[
                "accounts.niko.jobs[0].overlap: applies only to kind = \"fhir\"",
                "accounts.niko.jobs[0].first_page: 2 is not a first page number: use 0 or 1",
                "accounts.niko.jobs[0].items: `items` is not a JSON pointer",
                "accounts.niko.jobs[0].page_param: `page no` is not a field or parameter name",
                "accounts.niko.jobs[0].path: `patients?all` is not a path",
            ],
        ),
        case(
            "list keys on a fhir job",
            niko_with(
                "kind = \"nikohealth_patients\"",
                "kind = 'fhir'\nitems = '/x'",
            ),
            &["accounts.niko.jobs[0].items: applies only to kind = \"nikohealth_patients\""],
        ),
        case(
            "an overlap that is not a duration",
            niko_with(
                "kind = \"nikohealth_patients\"",
                "kind = 'fhir'\noverlap = 'a while'",
            ),
            &["accounts.niko.jobs[0].overlap: `a while` is not a duration"],
        ),
        case(
            "nethealth without issuer",
            "[accounts.nh]\nvendor = 'nethealth'\nclient_id = 'c'\n",
            &[
                "accounts.nh.issuer: missing; nethealth accounts find their token endpoint by OpenID discovery",
            ],
        ),
        case(
            "authorization code with no login page",
            "[accounts.g]\nvendor = 'generic'\ngrant = 'authorization_code'\ntoken_url = 'https://x.example/t'\nclient_id = 'public-app'\n",
            &[
                "accounts.g.authorization_url: missing; the authorization_code grant sends a person to the provider's login page",
                ": 1 problem",
            ],
        ),
        case(
            "a plain-http login page and port 0",
            "[accounts.nh]\nvendor = 'nethealth'\nissuer = 'https://id.example'\nclient_id = 'c'\n\
             authorization_url = 'http://id.example/authorize'\nredirect_port = 0\n",
            &[
                "accounts.nh.authorization_url: `http://id.example/authorize` uses http:// to a host that is not loopback",
                "accounts.nh.redirect_port: must be 1–65535",
            ],
        ),
        case(
            "generic without grant",
            "[accounts.g]\nvendor = 'generic'\ntoken_url = 'https://x.example/t'\nclient_id = 'c'\n",
            &["accounts.g.grant: missing"],
        ),
        // Reported once, at its own key: no follow-on token_url/api_base problems.
        case(
            "invalid domain",
            niko_with("domain = \"acme\"", "domain = \"a/b\""),
            &[
                "accounts.niko.domain: `a/b` is not a sub-domain name",
                ": 1 problem",
            ],
        ),
        case(
            "account written as a string",
            format!("{NIKO}\n[accounts]\ncc = 'looks-like-a-secret-4e1b'\n"),
            &["accounts.cc: expected a table of keys, found a string"],
        ),
        // Issue 15: `[accounts.x.jobs]` (a table) where `[[accounts.x.jobs]]` (a list) is meant;
        // the account's other problems are still reported.
        case(
            "jobs with single brackets",
            niko_with("[[accounts.niko.jobs]]", "[accounts.niko.jobs]")
                .replacen("client_id", "client_sercet = 'x'\nclient_id", 1),
            &[
                "accounts.niko.jobs: jobs are a list: write `[[accounts.niko.jobs]]` (double brackets) \
                 above each job, not `[accounts.niko.jobs]`",
                "accounts.niko.client_sercet: unknown key; did you mean `client_secret`?",
                ": 2 problems",
            ],
        )
        .absent(&["sequence"]),
        case(
            "jobs as a string",
            niko_with("client_id", "jobs = 'patients'\nclient_id")
                .replace("[[accounts.niko.jobs]]\nname = \"patients\"\nkind = \"nikohealth_patients\"\nschedule = \"0 */30 * * * *\"\n", ""),
            &["accounts.niko.jobs: expected a list of jobs, found a string; write each job under `[[accounts.niko.jobs]]`"],
        ),
        case(
            "bad environment override",
            NIKO,
            &[
                "agent.metrics_listen: `nope` is not an IP address and port",
                "(set by the environment variable EHRSYNC__AGENT__METRICS_LISTEN)",
            ],
        )
        .env(&[("EHRSYNC__AGENT__METRICS_LISTEN", "nope")]),
        // Issue 15: a mistyped override names its variable and the variable to set instead.
        case(
            "unknown key from the environment",
            NIKO,
            &[
                "accounts.niko.domian: unknown key, set by the environment variable \
                 EHRSYNC__ACCOUNTS__NIKO__DOMIAN; did you mean `domain`? \
                 Name the variable EHRSYNC__ACCOUNTS__NIKO__DOMAIN",
            ],
        )
        .env(&[("EHRSYNC__ACCOUNTS__NIKO__DOMIAN", "acme")]),
        case(
            "account name mistyped in the environment",
            NIKO,
            &[
                "accounts.nikko: is not in the config file; only the environment variable \
                 EHRSYNC__ACCOUNTS__NIKKO__DOMAIN sets it. Did you mean `niko` \
                 (EHRSYNC__ACCOUNTS__NIKO__DOMAIN)?",
            ],
        )
        .env(&[("EHRSYNC__ACCOUNTS__NIKKO__DOMAIN", "acme")]),
        case(
            "jobs from the environment",
            NIKO,
            &[
                "accounts.niko.jobs: jobs are a list and cannot be set from the environment; \
                 write each job in the config file under `[[accounts.niko.jobs]]`",
                "(from the environment: EHRSYNC__ACCOUNTS__NIKO__JOBS__NAME sets `accounts.niko.jobs.name`)",
            ],
        )
        .env(&[("EHRSYNC__ACCOUNTS__NIKO__JOBS__NAME", "patients")]),
        case(
            "a table from the environment where a value belongs",
            NIKO,
            &[
                "accounts.niko.domain: expected a string, found a table \
                 (from the environment: EHRSYNC__ACCOUNTS__NIKO__DOMAIN__X sets `accounts.niko.domain.x`)",
            ],
        )
        .env(&[("EHRSYNC__ACCOUNTS__NIKO__DOMAIN__X", "acme")]),
    ]
}

#[test]
fn every_bad_config_exits_2_and_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases();
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for c in &cases {
        let path = write_config(dir.path(), &c.config);
        let run = ehrsync(
            &["check-config", "--config", path.to_str().unwrap()],
            &c.env,
        );
        let missing: Vec<_> = c
            .expect
            .iter()
            .filter(|e| !run.stderr.contains(*e))
            .collect();
        let present: Vec<_> = c
            .absent
            .iter()
            .filter(|e| run.stderr.contains(*e))
            .collect();
        if run.code != Some(2)
            || !run.stdout.is_empty()
            || !missing.is_empty()
            || !present.is_empty()
        {
            failures.push(format!(
                "case `{}`: exit {:?}, missing {missing:?}, present {present:?}\nstderr: {}\nstdout: {}",
                c.name, run.code, run.stderr, run.stdout
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Issue 15: the duration forms that are accepted, in the file and from the environment alike
/// (`config::raw::parse_duration` documents them).
#[test]
fn durations_accept_words_spaces_and_combined_units() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[agent]\nshutdown_grace = '20 seconds'\n{}",
        niko_with(
            "client_id",
            "access_token_lifetime = '1min'\nrefresh_token_lifetime = '14days'\nmin_lead = '1.5m'\nclient_id"
        )
        .replace(
            "kind = \"nikohealth_patients\"",
            "kind = 'fhir'\noverlap = '1h 30m'"
        )
        .replace("domain = \"acme\"", "domain = \"acme\"\napi_base = 'https://acme.example/fhir'")
    );
    let path = write_config(dir.path(), &config);
    let run = ehrsync(
        &["check-config", "--config", path.to_str().unwrap()],
        &[("EHRSYNC__ACCOUNTS__NIKO__MIN_LEAD", "45 s")],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    for shown in [
        "shutdown_grace  20s",
        "lifetime 1m unless the server states one",
        "lifetime 14days unless the server states one",
        "at least 45s before expiry",
        "1h 30m overlap",
    ] {
        assert!(run.stdout.contains(shown), "{shown} in:\n{}", run.stdout);
    }
}

/// Issue 15: a secret file others can read (as git checks out config/example-credentials/)
/// is named with the command that fixes it, and the warning goes once it is 0600.
#[cfg(unix)]
#[test]
fn a_secret_file_others_can_read_is_warned_about_until_it_is_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("niko-secret");
    std::fs::write(&secret, "placeholder-secret-9f2c\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let path = write_config(
        dir.path(),
        &niko_with("\"inline-secret\"", "{ file = \"niko-secret\" }"),
    );
    let check = || ehrsync(&["check-config", "--config", path.to_str().unwrap()], &[]);
    let run = check();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let warning = format!(
        "accounts.niko.client_secret: secret file {} is readable by other users; chmod 600 it",
        secret.display()
    );
    assert!(run.stdout.contains(&warning), "{}", run.stdout);
    run.assert_absent(&["placeholder-secret-9f2c"]);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let run = check();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!run.stdout.contains("warnings:"), "{}", run.stdout);
}

/// Issue 15: "1 accounts" no more.
#[test]
fn one_account_and_one_job_are_singular() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), NIKO);
    let run = ehrsync(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("OK: 1 account, 1 job\n"),
        "{}",
        run.stdout
    );
}

#[test]
fn all_problems_are_listed_not_just_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[agent]\nmetrics_listen = 'x'\n{}\n[accounts.cc]\nvendor = 'carecentric'\nclient_id = 'c'\nclient_secret = {{ env = 'CC_UNSET' }}\nbogus = 1\n",
        niko_with("0 */30 * * * *", "not cron")
    );
    let path = write_config(dir.path(), &config);
    let run = ehrsync(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    for key in [
        "agent.metrics_listen:",
        "accounts.niko.jobs[0].schedule:",
        "accounts.cc.client_secret:",
        "accounts.cc.bogus:",
        "accounts.cc.username:",
        "accounts.cc.password:",
    ] {
        assert!(
            run.stderr.contains(key),
            "missing {key} in:\n{}",
            run.stderr
        );
    }
    assert!(run.stderr.contains("6 problems"), "{}", run.stderr);
}

#[test]
fn a_missing_config_file_exits_2_naming_it() {
    let run = ehrsync(
        &["check-config", "--config", "/nonexistent/ehrsync.toml"],
        &[],
    );
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains("/nonexistent/ehrsync.toml"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("cannot read the config file"),
        "{}",
        run.stderr
    );
}

#[test]
fn the_config_path_comes_from_ehrsync_config_when_no_flag_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), NIKO);
    let run = ehrsync(
        &["check-config"],
        &[("EHRSYNC_CONFIG", path.to_str().unwrap())],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains(&format!("config: {}", path.display())),
        "{}",
        run.stdout
    );
}

/// `config/example.env` as (name, value) pairs, exactly what the README's run command sources.
fn example_env() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.env"))
        .unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[test]
fn the_shipped_example_passes_with_its_documented_variables() {
    // Run from the crate root, as the README does, so the relative CREDENTIALS_DIRECTORY resolves.
    let root = env!("CARGO_MANIFEST_DIR");
    let vars = example_env();
    let env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ehrsync"))
        .current_dir(root)
        .env_clear()
        .envs(env.iter().copied())
        .arg("check-config")
        .output()
        .unwrap();
    let run = common::Run::from(out);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("config: config/ehrsync.toml"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("OK: 4 accounts, 3 jobs"),
        "{}",
        run.stdout
    );
    for vendor in ["nextech", "nethealth", "carecentric", "nikohealth"] {
        assert!(run.stdout.contains(&format!("vendor {vendor}")), "{vendor}");
    }
    let credential =
        std::fs::read_to_string(format!("{root}/config/example-credentials/niko-secret")).unwrap();
    let mut secrets: Vec<&str> = vars
        .iter()
        .filter(|(k, _)| k != "CREDENTIALS_DIRECTORY")
        .map(|(_, v)| v.as_str())
        .collect();
    secrets.push(credential.trim());
    assert_eq!(secrets.len(), 5);
    run.assert_absent(&secrets);
}
