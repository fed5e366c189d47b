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
}

fn case(name: &'static str, config: impl Into<String>, expect: &[&'static str]) -> Case {
    Case {
        name,
        config: config.into(),
        env: Vec::new(),
        expect: expect.to_vec(),
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
        case(
            "bad cron",
            niko_with("0 */30 * * * *", "*/30 * * * *"),
            &[
                "accounts.niko.jobs[0].schedule:",
                "six fields, seconds first",
            ],
        ),
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
            &["accounts.niko.refresh_token_lifetime:", "is not a duration"],
        ),
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
        Case {
            name: "bad environment override",
            config: NIKO.to_owned(),
            env: vec![("EHRSYNC__AGENT__METRICS_LISTEN", "nope")],
            expect: vec!["agent.metrics_listen: `nope` is not an IP address and port"],
        },
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
        if run.code != Some(2) || !run.stdout.is_empty() || !missing.is_empty() {
            failures.push(format!(
                "case `{}`: exit {:?}, missing {missing:?}\nstderr: {}\nstdout: {}",
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
