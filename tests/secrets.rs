//! Every kind of secret source is read correctly, and no secret value ever shows up in
//! `check-config` output or in the `Debug` form of the loaded config.

mod common;

use common::{ehrsync, write_config};
use ehrsync::config::{self, Env, HeaderValue, SecretOrigin};

const FROM_ENV: &str = "env-secret-7f3a91";
const FROM_FILE: &str = "file-secret-52bc0e";
const FROM_CREDENTIAL: &str = "credential-secret-c4d2aa";
const INLINE: &str = "inline-secret-9e61f0";
const ALL: [&str; 4] = [FROM_ENV, FROM_FILE, FROM_CREDENTIAL, INLINE];

struct Setup {
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    env: Vec<(String, String)>,
}

impl Setup {
    fn env_pairs(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("api-key"), format!("{FROM_CREDENTIAL}\n")).unwrap();
    // A relative `file` path is relative to the config file's directory.
    std::fs::write(dir.path().join("password.txt"), format!("{FROM_FILE}\n")).unwrap();
    #[cfg(unix)]
    for f in [creds.join("api-key"), dir.path().join("password.txt")] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let config = write_config(
        dir.path(),
        r#"
[agent]
database = "state/ehrsync.db"

[accounts.cc]
vendor = "carecentric"
client_id = "FHIRUser"
client_secret = { env = "CC_SECRET" }
username = "practice-user"
password = { file = "password.txt" }
api_base = "https://fhir.example/fhir"
headers = { "x-api-key" = { credential = "api-key" }, "x-team" = "front-desk" }

[accounts.niko]
vendor = "nikohealth"
domain = "acme"
client_id = "ehrsync"
client_secret = "inline-secret-9e61f0"
"#,
    );
    let env = vec![
        ("CC_SECRET".to_owned(), FROM_ENV.to_owned()),
        (
            "CREDENTIALS_DIRECTORY".to_owned(),
            creds.to_str().unwrap().to_owned(),
        ),
    ];
    Setup {
        _dir: dir,
        config,
        env,
    }
}

#[test]
fn each_source_kind_is_read_correctly() {
    let s = setup();
    let env: Env = s.env.iter().cloned().collect();
    let loaded = config::load_with_env(&s.config, &env).unwrap();
    let cc = loaded.config.account("cc").unwrap();
    let secret = cc.client_secret.as_ref().unwrap();
    assert_eq!(secret.expose(), FROM_ENV);
    assert_eq!(secret.origin(), &SecretOrigin::Env("CC_SECRET".into()));
    let password = cc.password.as_ref().unwrap();
    assert_eq!(password.expose(), FROM_FILE);
    assert_eq!(
        password.origin(),
        &SecretOrigin::File(s.config.parent().unwrap().join("password.txt"))
    );
    let header = cc.headers.iter().find(|h| h.name == "x-api-key").unwrap();
    match &header.value {
        HeaderValue::Secret(sec) => {
            assert_eq!(sec.expose(), FROM_CREDENTIAL);
            assert_eq!(sec.origin(), &SecretOrigin::Credential("api-key".into()));
        }
        HeaderValue::Public(_) => panic!("a credential header must stay secret"),
    }
    let plain = cc.headers.iter().find(|h| h.name == "x-team").unwrap();
    assert!(matches!(&plain.value, HeaderValue::Public(v) if v == "front-desk"));
    let niko = loaded.config.account("niko").unwrap();
    let inline = niko.client_secret.as_ref().unwrap();
    assert_eq!(inline.expose(), INLINE);
    assert_eq!(inline.origin(), &SecretOrigin::Inline);
    // The inline secret is allowed, with a warning naming its key.
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.key == "accounts.niko.client_secret" && w.message.contains("plain text")),
        "{:?}",
        loaded.warnings
    );
    // Relative database paths are anchored at the config's directory too.
    assert_eq!(
        loaded.config.agent.database,
        ehrsync::config::Database::File(s.config.parent().unwrap().join("state/ehrsync.db"))
    );
}

#[test]
fn no_secret_appears_in_debug_output() {
    let s = setup();
    let env: Env = s.env.iter().cloned().collect();
    let loaded = config::load_with_env(&s.config, &env).unwrap();
    for shown in [
        format!("{loaded:?}"),
        format!("{loaded:#?}"),
        format!("{env:?}"),
    ] {
        for secret in ALL {
            assert!(
                !shown.contains(secret),
                "{secret} in Debug output:\n{shown}"
            );
        }
        assert!(shown.contains("[redacted]") || shown.contains("CC_SECRET"));
    }
}

#[test]
fn no_secret_appears_in_check_config_output() {
    let s = setup();
    let env = s.env_pairs();
    let run = ehrsync(
        &["check-config", "--config", s.config.to_str().unwrap()],
        &env,
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    run.assert_absent(&ALL);
    assert_eq!(
        run.stdout.matches("[redacted]").count(),
        4,
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("client_secret   [redacted] (env CC_SECRET)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("header          x-api-key: [redacted] (credential api-key)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("header          x-team: front-desk"),
        "{}",
        run.stdout
    );
}

#[test]
fn no_secret_appears_when_the_config_is_invalid() {
    let s = setup();
    // Same config, but an extra mistake so the error path prints.
    let text =
        std::fs::read_to_string(&s.config).unwrap() + "\n[accounts.bad]\nvendor = 'nextech'\n";
    std::fs::write(&s.config, text).unwrap();
    let env = s.env_pairs();
    let run = ehrsync(
        &[
            "--log-format",
            "json",
            "check-config",
            "--config",
            s.config.to_str().unwrap(),
        ],
        &env,
    );
    assert_eq!(run.code, Some(2));
    run.assert_absent(&ALL);
}
