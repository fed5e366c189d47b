//! What a config reload changes: a pure comparison of the running accounts and jobs with a
//! newly read config, so the agent touches only what differs. Unchanged accounts keep their
//! token owner (and so their tokens); an account whose jobs alone changed keeps it too.

use crate::config::{Account, Job};

/// One step of applying a reload, in the order [`plan`] lists them: removals and restarts
/// first, then additions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The account left the config: its jobs stop, then its token owner.
    RemoveAccount(String),
    /// Settings other than jobs changed: the owner and the account's jobs restart. When
    /// `identity_changed`, stored tokens belong to another login and are dropped first.
    RestartAccount {
        account: String,
        identity_changed: bool,
    },
    /// A job of an unchanged account left the config, or its settings changed (`restart`).
    StopJob {
        account: String,
        job: String,
        restart: bool,
    },
    AddAccount(String),
    /// A job that is new, or restarted with new settings, on an account that keeps running.
    StartJob {
        account: String,
        job: String,
    },
}

impl Change {
    /// The account the change is about.
    pub fn account(&self) -> &str {
        match self {
            Change::RemoveAccount(a) | Change::AddAccount(a) => a,
            Change::RestartAccount { account, .. }
            | Change::StopJob { account, .. }
            | Change::StartJob { account, .. } => account,
        }
    }
}

/// The changes that turn the running `old` accounts (with their running jobs) into `new`.
pub fn plan<'a>(
    old: impl IntoIterator<Item = (&'a Account, Vec<&'a Job>)>,
    new: &[Account],
) -> Vec<Change> {
    let mut stops = Vec::new();
    let mut starts = Vec::new();
    let old: Vec<(&Account, Vec<&Job>)> = old.into_iter().collect();
    for (account, jobs) in &old {
        let name = account.name.to_string();
        let Some(next) = new.iter().find(|a| a.name == account.name) else {
            stops.push(Change::RemoveAccount(name));
            continue;
        };
        if !account.same_settings(next) {
            stops.push(Change::RestartAccount {
                account: name,
                identity_changed: !account.same_identity(next),
            });
            continue;
        }
        for job in jobs {
            match next.jobs.iter().find(|j| j.name == job.name) {
                Some(same) if same == *job => {}
                found => {
                    stops.push(Change::StopJob {
                        account: name.clone(),
                        job: job.name.to_string(),
                        restart: found.is_some(),
                    });
                }
            }
        }
        for job in &next.jobs {
            if !jobs.contains(&job) {
                starts.push(Change::StartJob {
                    account: name.clone(),
                    job: job.name.to_string(),
                });
            }
        }
    }
    for account in new {
        if !old.iter().any(|(a, _)| a.name == account.name) {
            starts.push(Change::AddAccount(account.name.to_string()));
        }
    }
    stops.extend(starts);
    stops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Env, load_with_env};

    fn accounts(toml: &str) -> Vec<Account> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ehrsync.toml");
        std::fs::write(&path, format!("[agent]\ndatabase = 'x.db'\n{toml}")).unwrap();
        let env: Env = [("SECRET", "s1"), ("SECRET2", "s2")].into_iter().collect();
        load_with_env(&path, &env).unwrap().config.accounts
    }

    const NIKO: &str = "[accounts.niko]\nvendor = 'nikohealth'\ndomain = 'acme'\nclient_id = 'c'\nclient_secret = { env = 'SECRET' }\n";
    const JOB: &str = "[[accounts.niko.jobs]]\nname = 'patients'\nkind = 'nikohealth_patients'\nschedule = '0 */15 * * * *'\n";
    const CC: &str = "[accounts.cc]\nvendor = 'carecentric'\ntoken_url = 'https://cc.example/connect/token'\nclient_id = 'FHIRUser'\nclient_secret = { env = 'SECRET' }\nusername = 'u'\npassword = { env = 'SECRET' }\napi_base = 'https://cc.example/fhir'\n";

    fn running(accounts: &[Account]) -> Vec<(&Account, Vec<&Job>)> {
        accounts
            .iter()
            .map(|a| (a, a.jobs.iter().collect()))
            .collect()
    }

    #[test]
    fn an_identical_config_changes_nothing() {
        let old = accounts(&format!("{NIKO}{JOB}{CC}"));
        let new = accounts(&format!("{NIKO}{JOB}{CC}"));
        assert_eq!(plan(running(&old), &new), vec![]);
    }

    #[test]
    fn added_and_removed_accounts_leave_the_others_alone() {
        let old = accounts(&format!("{NIKO}{JOB}"));
        let new = accounts(CC);
        assert_eq!(
            plan(running(&old), &new),
            vec![
                Change::RemoveAccount("niko".into()),
                Change::AddAccount("cc".into())
            ]
        );
        let new = accounts(&format!("{NIKO}{JOB}{CC}"));
        assert_eq!(
            plan(running(&old), &new),
            vec![Change::AddAccount("cc".into())]
        );
    }

    #[test]
    fn a_rotated_secret_restarts_the_owner_but_keeps_the_identity() {
        let old = accounts(&format!("{NIKO}{JOB}"));
        let new = accounts(&format!("{}{JOB}", NIKO.replace("'SECRET'", "'SECRET2'")));
        assert_eq!(
            plan(running(&old), &new),
            vec![Change::RestartAccount {
                account: "niko".into(),
                identity_changed: false
            }]
        );
    }

    #[test]
    fn a_new_client_id_is_a_new_identity() {
        let old = accounts(NIKO);
        let new = accounts(&NIKO.replace("client_id = 'c'", "client_id = 'other'"));
        assert_eq!(
            plan(running(&old), &new),
            vec![Change::RestartAccount {
                account: "niko".into(),
                identity_changed: true
            }]
        );
    }

    #[test]
    fn job_changes_touch_only_that_job() {
        let old = accounts(&format!("{NIKO}{JOB}"));
        let new = accounts(&format!(
            "{NIKO}{}",
            JOB.replace("0 */15 * * * *", "0 */5 * * * *")
        ));
        assert_eq!(
            plan(running(&old), &new),
            vec![
                Change::StopJob {
                    account: "niko".into(),
                    job: "patients".into(),
                    restart: true
                },
                Change::StartJob {
                    account: "niko".into(),
                    job: "patients".into()
                }
            ]
        );
        let new = accounts(NIKO);
        assert_eq!(
            plan(running(&old), &new),
            vec![Change::StopJob {
                account: "niko".into(),
                job: "patients".into(),
                restart: false
            }]
        );
        let old = accounts(NIKO);
        let new = accounts(&format!("{NIKO}{JOB}"));
        assert_eq!(
            plan(running(&old), &new),
            vec![Change::StartJob {
                account: "niko".into(),
                job: "patients".into()
            }]
        );
    }
}
