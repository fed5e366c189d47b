//! `ehrsync demo --for 60s` on a fresh directory, as the README's first command runs it: it
//! exits 0, its database holds the patients of every preset that has a pull job, and its log
//! shows logins, a proactive refresh, the re-login after the refresh token is revoked, and the
//! Net Health account back in service after a person's login.

mod common;

use sqlx::Connection;

#[tokio::test(flavor = "multi_thread")]
async fn demo_for_60s_pulls_every_preset_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("demo");
    let run = common::ehrsync(
        &[
            "demo",
            "--for",
            "60s",
            "--dir",
            demo_dir.to_str().unwrap(),
            "--metrics-port",
            "0",
        ],
        &[("EHRSYNC_LOG", "info")],
    );
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("metrics   http://127.0.0.1:"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("── ehrsync demo, 0:50 ──"),
        "{}",
        run.stdout
    );

    let db = demo_dir.join("ehrsync-demo.db");
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT account, count(*) FROM patients GROUP BY account ORDER BY account")
            .fetch_all(&mut c)
            .await
            .unwrap();
    assert_eq!(
        counts,
        [
            ("demo-carecentric".to_owned(), 1000),
            ("demo-nextech".to_owned(), 1000),
            ("demo-nikohealth".to_owned(), 1000),
        ]
    );
    let failed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sync_runs WHERE outcome NOT IN ('success', 'interrupted')",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(failed, 0);

    let log = &run.stderr;
    let obtained = |account: &str, grant: &str| {
        log.lines()
            .filter(|l| {
                l.contains("obtained a new access token")
                    && l.contains(&format!("account=\"{account}\""))
                    && l.contains(&format!("grant=\"{grant}\""))
            })
            .count()
    };
    assert!(obtained("demo-nextech", "refresh_token") >= 1, "{log}");
    assert!(
        obtained("demo-nextech", "password") >= 2,
        "a re-login: {log}"
    );
    assert!(obtained("demo-carecentric", "password") >= 2, "{log}");
    assert!(
        obtained("demo-nikohealth", "client_credentials") >= 2,
        "{log}"
    );
    // Net Health waited for a person, who logged in (the demo playing the person), and the
    // agent took it from there.
    assert!(log.contains("ehrsync login demo-nethealth"), "{log}");
    assert!(
        log.contains("picked up tokens from a login; the account is back in service"),
        "{log}"
    );
    assert!(obtained("demo-nethealth", "refresh_token") >= 1, "{log}");
    for (_, secret) in ehrsync::sandbox::credentials_env() {
        run.assert_absent(&[secret]);
    }
}
