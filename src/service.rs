//! `ehrsync service install|uninstall|run`: ehrsync as a Windows service, the counterpart of
//! `systemd/ehrsync.service` on Linux.
//!
//! - **install** registers the service `ehrsync`: started at boot (`AutoStart`), in its own
//!   process, as `ehrsync.exe service run --config <absolute path>`, and restarted by the
//!   Service Control Manager (SCM) 10 s after it fails (crash, or a stop with a non-zero exit
//!   code), like systemd's `Restart=on-failure`.
//! - **uninstall** stops it when it runs (a graceful stop, see below) and deletes it.
//! - **run** is what the SCM starts. It hands the main thread to the SCM's dispatcher, which
//!   calls the service main on a thread of its own; that logs to [`log_file`] (a service has no
//!   stderr), builds the tokio runtime, loads the config and runs [`crate::agent::run`] until
//!   the SCM asks it to stop. It reports `StartPending`, then `Running` once the agent serves,
//!   `StopPending` (with a wait hint of `agent.shutdown_grace` + 10 s) on Stop or Shutdown, and
//!   `Stopped` with exit code 0, or a service-specific code of 1 (failure) or 2 (invalid
//!   config) — the codes of the command line; the log file says why. When the log file itself
//!   cannot be written, the exit code is that Windows error, which the System event log words.
//!
//! There is no reload on Windows (no SIGHUP): a config change takes `Restart-Service ehrsync`.
//!
//! On other systems the three functions fail with [`ServiceError::NotWindows`], which points to
//! the systemd unit.

use std::path::{Path, PathBuf};

use crate::config::{ConfigError, Env};
#[cfg(not(windows))]
use crate::logging::LogFormat;

/// The service's name (`sc.exe start ehrsync`, `Restart-Service ehrsync`).
pub const SERVICE_NAME: &str = "ehrsync";
/// What the Services console shows.
pub const DISPLAY_NAME: &str = "ehrsync — EHR token and sync agent";
/// The service's description in the Services console.
pub const DESCRIPTION: &str = "Keeps EHR vendor OAuth2 tokens alive, pulls patient data into \
     SQLite on a schedule, and serves Prometheus metrics on 127.0.0.1:9870.";

/// The account the service runs as: its own *virtual account*, `NT SERVICE\ehrsync`.
///
/// Why not the alternatives:
/// - `LocalSystem` (the default) would work without any set-up, but it is the most powerful
///   account on the machine: a bug in the agent, or a hostile vendor response that found one,
///   would own the machine. ehrsync needs nothing of that.
/// - `NT AUTHORITY\LocalService` is unprivileged, but it is one account shared by many system
///   services. It cannot read files admins created in `C:\ProgramData\ehrsync` once their ACLs
///   are tightened (and they must be: the ACLs `C:\ProgramData` passes down let every local
///   user read what is put there, secrets included). Granting it access would grant
///   `LOCAL SERVICE`, and so every other service running as LocalService.
/// - A virtual account is as unprivileged as LocalService (on the network it acts as the
///   computer account, which vendor APIs over HTTPS never see), needs no password, exists as
///   long as the service does, and has a SID of its own: ACLs can grant exactly this service.
///
/// The price is one set-up step after `install` (the account exists from then on): grant it
/// read access to the config and secret files and modify access to the data directory, e.g.
/// ```text
/// icacls C:\ProgramData\ehrsync /inheritance:r /grant:r SYSTEM:(OI)(CI)F Administrators:(OI)(CI)F "NT SERVICE\ehrsync:(OI)(CI)M"
/// icacls C:\ProgramData\ehrsync\ehrsync.toml /inheritance:r /grant:r SYSTEM:F Administrators:F "NT SERVICE\ehrsync:R"
/// ```
/// docs/operations.md ("Install on Windows") has the whole procedure, secrets included. Without it the
/// service stops during start-up and the log file says which file it could not open (when it
/// cannot write the log file itself, the System event log shows "Access is denied.").
pub const ACCOUNT: &str = r"NT SERVICE\ehrsync";

/// How long the SCM waits before restarting the service after its first and second failure
/// (systemd's `RestartSec=`).
pub const RESTART_DELAY: std::time::Duration = std::time::Duration::from_secs(10);
/// The restart delay from the third failure in a row on (the count resets after a day without
/// one), so a config that cannot load is not retried every 10 s.
pub const RESTART_DELAY_LATER: std::time::Duration = std::time::Duration::from_secs(60);

/// A log file larger than this is renamed to `ehrsync.log.1` (replacing the previous one) when
/// the service starts.
pub const LOG_ROTATE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(
        "`ehrsync service` installs and runs ehrsync as a Windows service, and this is not \
         Windows. On Linux, run ehrsync under systemd with the unit systemd/ehrsync.service \
         (docs/operations.md, \"Install on Linux\")"
    )]
    NotWindows,
    #[error(
        "`ehrsync service run` is started by the Windows Service Control Manager and is not for \
         interactive use; to run ehrsync in the foreground, use `ehrsync run`"
    )]
    NotFromScm,
    #[error(
        "access denied: run `ehrsync service {0}` from an elevated prompt (Run as administrator)"
    )]
    AccessDenied(&'static str),
    #[error(
        "the service `{SERVICE_NAME}` is already installed; to change it, run \
         `ehrsync service uninstall` first (upgrading the executable needs no reinstall)"
    )]
    AlreadyInstalled,
    #[error("the service `{SERVICE_NAME}` is not installed")]
    NotInstalled,
    #[error(
        "the service `{SERVICE_NAME}` is being removed: it is still stopping, or a program such \
         as the Services console holds it open; close that and try again"
    )]
    PendingDeletion,
    #[error("cannot {action}: {source}")]
    Windows {
        action: &'static str,
        source: std::io::Error,
    },
    #[error("cannot {action}: {source}")]
    Io {
        action: &'static str,
        source: std::io::Error,
    },
    #[error("cannot write the log file {}: {source}", path.display())]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
}

impl ServiceError {
    /// The exit code (and, for the service, the service-specific exit code): 2 for an invalid
    /// config or a command that cannot apply here, 1 for every other failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            ServiceError::NotWindows | ServiceError::NotFromScm | ServiceError::Config(_) => {
                crate::cli::EXIT_CONFIG
            }
            _ => crate::cli::EXIT_FAILURE,
        }
    }
}

/// What `uninstall` achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uninstalled {
    /// The service was stopped (if it ran) and is gone.
    Removed,
    /// The service is deleted once it stops and nothing holds it open (the Services console
    /// does while it is open), or at the next reboot.
    MarkedForDeletion,
}

/// Where the service logs: `%ProgramData%\ehrsync\logs\ehrsync.log`.
pub fn log_file(env: &Env) -> PathBuf {
    let data = env
        .get("ProgramData")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| r"C:\ProgramData".to_owned());
    Path::new(&data)
        .join("ehrsync")
        .join("logs")
        .join("ehrsync.log")
}

/// Fails with [`ServiceError::NotWindows`] where there are no Windows services.
pub fn supported() -> Result<(), ServiceError> {
    if cfg!(windows) {
        Ok(())
    } else {
        Err(ServiceError::NotWindows)
    }
}

/// Renames `path` to `<path>.1` when it is larger than `limit` bytes.
#[cfg(any(windows, test))]
fn rotate(path: &Path, limit: u64) -> std::io::Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.len() > limit => {
            let mut old = path.as_os_str().to_owned();
            old.push(".1");
            std::fs::rename(path, old)
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(windows)]
pub use windows::{install, run, uninstall};

/// Registers the service (see the module documentation); `config` must be absolute. Windows only.
#[cfg(not(windows))]
pub fn install(_config: &Path, _log_format: LogFormat) -> Result<(), ServiceError> {
    Err(ServiceError::NotWindows)
}

/// Stops the service if it runs and deletes it. Windows only.
#[cfg(not(windows))]
pub fn uninstall() -> Result<Uninstalled, ServiceError> {
    Err(ServiceError::NotWindows)
}

/// Runs as the service, for the SCM. Windows only.
#[cfg(not(windows))]
pub fn run(_config: &Path, _log_format: LogFormat) -> Result<(), ServiceError> {
    Err(ServiceError::NotWindows)
}

#[cfg(windows)]
mod windows {
    use std::ffi::OsString;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use tokio::sync::mpsc;
    use windows_service::service::{
        ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
        ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod,
        ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
    };
    use windows_service::service_control_handler::{
        self, ServiceControlHandlerResult, ServiceStatusHandle,
    };
    use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
    use windows_service::{define_windows_service, service_dispatcher};

    use super::{
        ACCOUNT, DESCRIPTION, DISPLAY_NAME, LOG_ROTATE_BYTES, RESTART_DELAY, RESTART_DELAY_LATER,
        SERVICE_NAME, ServiceError, Uninstalled, log_file, rotate,
    };
    use crate::config::{self, DEFAULT_SHUTDOWN_GRACE, Env};
    use crate::logging::{self, LogFormat};
    use crate::signals::Control;

    // Win32 error codes (winerror.h) the commands turn into plain advice.
    const ERROR_ACCESS_DENIED: i32 = 5;
    const ERROR_SERVICE_DOES_NOT_EXIST: i32 = 1060;
    const ERROR_SERVICE_CANNOT_ACCEPT_CTRL: i32 = 1061;
    const ERROR_SERVICE_NOT_ACTIVE: i32 = 1062;
    const ERROR_FAILED_SERVICE_CONTROLLER_CONNECT: i32 = 1063;
    const ERROR_SERVICE_MARKED_FOR_DELETE: i32 = 1072;
    const ERROR_SERVICE_EXISTS: i32 = 1073;

    const SERVICE_TYPE: ServiceType = ServiceType::OWN_PROCESS;
    /// How long `Start-Service` may wait for `Running`: start-up includes database migrations
    /// after an upgrade (systemd's `TimeoutStartSec=5min`).
    const START_WAIT_HINT: Duration = Duration::from_secs(300);
    /// Added to the shutdown grace for the stop's wait hint: a token request already sent is
    /// finished and stored (at most its 30 s timeout), then the database and listener close.
    const STOP_MARGIN: Duration = Duration::from_secs(40);
    /// How long `uninstall` waits for a running service to stop.
    const UNINSTALL_STOP_WAIT: Duration = Duration::from_secs(60);

    /// The SCM's error as an `io::Error` (whose message Windows words, e.g. "Access is denied.").
    fn os_error(e: windows_service::Error) -> std::io::Error {
        match e {
            windows_service::Error::Winapi(io) => io,
            other => std::io::Error::other(other.to_string()),
        }
    }

    fn code(e: &std::io::Error) -> Option<i32> {
        e.raw_os_error()
    }

    /// Maps a failure of `action` during `ehrsync service <command>`, turning the common causes
    /// into advice.
    fn classify(
        command: &'static str,
        action: &'static str,
        source: std::io::Error,
    ) -> ServiceError {
        match code(&source) {
            Some(ERROR_ACCESS_DENIED) => ServiceError::AccessDenied(command),
            Some(ERROR_SERVICE_MARKED_FOR_DELETE) => ServiceError::PendingDeletion,
            _ => ServiceError::Windows { action, source },
        }
    }

    fn scm_error(
        command: &'static str,
        action: &'static str,
    ) -> impl Fn(windows_service::Error) -> ServiceError {
        move |e| classify(command, action, os_error(e))
    }

    /// Registers the service to run `<this executable> service run --config <config>` (and
    /// `--log-format json` when asked) as [`ACCOUNT`], started at boot and restarted on failure.
    /// `config` should be absolute: a service starts in `C:\Windows\System32`.
    pub fn install(config: &Path, log_format: LogFormat) -> Result<(), ServiceError> {
        let executable = std::env::current_exe().map_err(|source| ServiceError::Io {
            action: "find the path of ehrsync.exe",
            source,
        })?;
        let manager = ServiceManager::local_computer(
            None::<&str>,
            ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE,
        )
        .map_err(scm_error(
            "install",
            "connect to the Service Control Manager",
        ))?;

        let mut launch_arguments: Vec<OsString> = vec![
            "service".into(),
            "run".into(),
            "--config".into(),
            config.as_os_str().to_owned(),
        ];
        if log_format == LogFormat::Json {
            launch_arguments.extend(["--log-format".into(), "json".into()]);
        }
        let info = ServiceInfo {
            name: SERVICE_NAME.into(),
            display_name: DISPLAY_NAME.into(),
            service_type: SERVICE_TYPE,
            start_type: ServiceStartType::AutoStart,
            error_control: ServiceErrorControl::Normal,
            executable_path: executable,
            launch_arguments,
            dependencies: Vec::new(),
            account_name: Some(ACCOUNT.into()),
            account_password: None,
        };
        // START: failure actions that restart the service need it (ChangeServiceConfig2).
        let access = ServiceAccess::CHANGE_CONFIG | ServiceAccess::START | ServiceAccess::DELETE;
        let service = manager.create_service(&info, access).map_err(|e| {
            let source = os_error(e);
            match code(&source) {
                Some(ERROR_SERVICE_EXISTS) => ServiceError::AlreadyInstalled,
                _ => classify("install", "create the service", source),
            }
        })?;

        let configure = || -> Result<(), ServiceError> {
            service
                .set_description(DESCRIPTION)
                .map_err(scm_error("install", "set the service's description"))?;
            let restart = |delay| ServiceAction {
                action_type: ServiceActionType::Restart,
                delay,
            };
            service
                .update_failure_actions(ServiceFailureActions {
                    reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(86_400)),
                    reboot_msg: None,
                    command: None,
                    // The last action repeats for every further failure.
                    actions: Some(vec![
                        restart(RESTART_DELAY),
                        restart(RESTART_DELAY),
                        restart(RESTART_DELAY_LATER),
                    ]),
                })
                .map_err(scm_error("install", "set the service's restart on failure"))?;
            // Also restart when the service stops itself with a non-zero exit code, not only
            // when the process dies.
            service
                .set_failure_actions_on_non_crash_failures(true)
                .map_err(scm_error("install", "set the service's restart on failure"))
        };
        if let Err(e) = configure() {
            // Leave nothing half-configured behind.
            let _ = service.delete();
            return Err(e);
        }
        Ok(())
    }

    /// Stops the service if it runs (waiting up to a minute for its graceful stop), then
    /// deletes it.
    pub fn uninstall() -> Result<Uninstalled, ServiceError> {
        let manager =
            ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT).map_err(
                scm_error("uninstall", "connect to the Service Control Manager"),
            )?;
        let access = ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE;
        let service = manager.open_service(SERVICE_NAME, access).map_err(|e| {
            let source = os_error(e);
            match code(&source) {
                Some(ERROR_SERVICE_DOES_NOT_EXIST) => ServiceError::NotInstalled,
                _ => classify("uninstall", "open the service", source),
            }
        })?;
        let query = || {
            service
                .query_status()
                .map_err(scm_error("uninstall", "query the service"))
        };
        if query()?.current_state != ServiceState::Stopped {
            if let Err(e) = service.stop() {
                let source = os_error(e);
                match code(&source) {
                    // Already stopping, or stopped meanwhile: wait below.
                    Some(ERROR_SERVICE_CANNOT_ACCEPT_CTRL) | Some(ERROR_SERVICE_NOT_ACTIVE) => {}
                    _ => return Err(classify("uninstall", "stop the service", source)),
                }
            }
            let deadline = Instant::now() + UNINSTALL_STOP_WAIT;
            while query()?.current_state != ServiceState::Stopped && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        if let Err(e) = service.delete() {
            let source = os_error(e);
            // Deleted by someone else meanwhile: the outcome is the same.
            if code(&source) != Some(ERROR_SERVICE_MARKED_FOR_DELETE) {
                return Err(classify("uninstall", "delete the service", source));
            }
        }
        // The SCM removes the service once it has stopped and every handle to it is closed
        // (the Services console holds one while it is open).
        drop(service);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match manager.open_service(SERVICE_NAME, ServiceAccess::QUERY_STATUS) {
                Err(windows_service::Error::Winapi(e))
                    if code(&e) == Some(ERROR_SERVICE_DOES_NOT_EXIST) =>
                {
                    return Ok(Uninstalled::Removed);
                }
                _ if Instant::now() >= deadline => return Ok(Uninstalled::MarkedForDeletion),
                _ => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// What the service main needs from the command line; set before the dispatcher starts.
    struct Launch {
        config: PathBuf,
        log_format: LogFormat,
    }

    static LAUNCH: OnceLock<Launch> = OnceLock::new();
    /// How the service ended, for the process's exit code once the dispatcher returns.
    static OUTCOME: Mutex<Option<ServiceError>> = Mutex::new(None);

    define_windows_service!(ffi_service_main, service_main);

    /// Hands this thread to the SCM's dispatcher, which runs the service on another thread and
    /// returns once it has stopped. Call it before any tokio runtime exists.
    pub fn run(config: &Path, log_format: LogFormat) -> Result<(), ServiceError> {
        let config = std::path::absolute(config).map_err(|source| ServiceError::Io {
            action: "resolve the config path",
            source,
        })?;
        let _ = LAUNCH.set(Launch { config, log_format });
        service_dispatcher::start(SERVICE_NAME, ffi_service_main).map_err(|e| {
            let source = os_error(e);
            if code(&source) == Some(ERROR_FAILED_SERVICE_CONTROLLER_CONNECT) {
                ServiceError::NotFromScm
            } else {
                ServiceError::Windows {
                    action: "start the service dispatcher",
                    source,
                }
            }
        })?;
        match OUTCOME.lock().ok().and_then(|mut o| o.take()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Reports states to the SCM; pending states carry an increasing checkpoint.
    #[derive(Clone)]
    struct Reporter {
        handle: ServiceStatusHandle,
        checkpoint: Arc<AtomicU32>,
    }

    impl Reporter {
        fn report(&self, state: ServiceState, wait_hint: Duration, exit_code: ServiceExitCode) {
            let pending = matches!(
                state,
                ServiceState::StartPending | ServiceState::StopPending
            );
            let status = ServiceStatus {
                service_type: SERVICE_TYPE,
                current_state: state,
                controls_accepted: if state == ServiceState::Running {
                    ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
                } else {
                    ServiceControlAccept::empty()
                },
                exit_code,
                checkpoint: if pending {
                    self.checkpoint.fetch_add(1, Ordering::Relaxed) + 1
                } else {
                    0
                },
                wait_hint: if pending { wait_hint } else { Duration::ZERO },
                process_id: None,
            };
            if let Err(e) = self.handle.set_service_status(status) {
                tracing::warn!(state = ?state, error = %os_error(e), "cannot report the service state");
            }
        }
    }

    /// The service main, on a thread the dispatcher started.
    fn service_main(_arguments: Vec<OsString>) {
        let outcome = serve();
        if let Ok(mut slot) = OUTCOME.lock() {
            *slot = outcome.err();
        }
    }

    fn serve() -> Result<(), ServiceError> {
        let (controls, agent_controls) = mpsc::unbounded_channel();
        // Set once registration returns the handle; the handler reports StopPending with it.
        let reporter: Arc<OnceLock<Reporter>> = Arc::default();
        let stop_wait = Arc::new(Mutex::new(DEFAULT_SHUTDOWN_GRACE + STOP_MARGIN));
        let handler = {
            let reporter = reporter.clone();
            let stop_wait = stop_wait.clone();
            move |control| match control {
                ServiceControl::Stop | ServiceControl::Shutdown => {
                    if let Some(r) = reporter.get() {
                        let wait = stop_wait.lock().map_or(STOP_MARGIN, |w| *w);
                        r.report(ServiceState::StopPending, wait, ServiceExitCode::NO_ERROR);
                    }
                    tracing::info!(?control, "the Service Control Manager asks ehrsync to stop");
                    // Fails only once the agent has returned, when there is nothing to stop.
                    let _ = controls.send(Control::Stop);
                    ServiceControlHandlerResult::NoError
                }
                ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
                _ => ServiceControlHandlerResult::NotImplemented,
            }
        };
        let handle = service_control_handler::register(SERVICE_NAME, handler).map_err(|e| {
            ServiceError::Windows {
                action: "register the service control handler",
                source: os_error(e),
            }
        })?;
        let status = Reporter {
            handle,
            checkpoint: Arc::default(),
        };
        let _ = reporter.set(status.clone());
        status.report(
            ServiceState::StartPending,
            START_WAIT_HINT,
            ServiceExitCode::NO_ERROR,
        );

        let result = run_agent(&status, agent_controls, &stop_wait);
        let exit_code = match &result {
            Ok(()) => ServiceExitCode::NO_ERROR,
            // The log file cannot say why: let the SCM's event (System log, event 7024) word
            // the Windows error ("Access is denied.").
            Err(ServiceError::Log { source, .. }) => match source.raw_os_error() {
                Some(code) => ServiceExitCode::Win32(code as u32),
                None => ServiceExitCode::ServiceSpecific(u32::from(crate::cli::EXIT_FAILURE)),
            },
            Err(e) => {
                tracing::error!(error = %e, "the ehrsync service stops with an error");
                ServiceExitCode::ServiceSpecific(u32::from(e.exit_code()))
            }
        };
        // Nothing may follow Stopped: the SCM may end the process at once.
        status.report(ServiceState::Stopped, Duration::ZERO, exit_code);
        result
    }

    /// Sets up logging and the runtime, loads the config, and runs the agent until stopped.
    fn run_agent(
        status: &Reporter,
        controls: mpsc::UnboundedReceiver<Control>,
        stop_wait: &Mutex<Duration>,
    ) -> Result<(), ServiceError> {
        let launch = LAUNCH.get().ok_or(ServiceError::NotFromScm)?;
        let env = Env::from_process();
        let log = log_file(&env);
        let log_error = |source| ServiceError::Log {
            path: log.clone(),
            source,
        };
        rotate(&log, LOG_ROTATE_BYTES).map_err(log_error)?;
        logging::init_file(&log, launch.log_format).map_err(log_error)?;
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            tracing::error!("panic: {info}");
            previous(info);
        }));
        tracing::info!(config = %launch.config.display(), "the ehrsync service is starting");

        let loaded = config::load_with_env(&launch.config, &env)?;
        for w in &loaded.warnings {
            tracing::warn!(key = %w.key, "{}", w.message);
        }
        if let Ok(mut wait) = stop_wait.lock() {
            *wait = loaded.config.agent.shutdown_grace + STOP_MARGIN;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|source| ServiceError::Io {
                action: "start the async runtime",
                source,
            })?;
        let result = runtime.block_on(crate::agent::run(loaded.config, env, controls, |_| {
            status.report(
                ServiceState::Running,
                Duration::ZERO,
                ServiceExitCode::NO_ERROR,
            );
        }));
        // As in `main`: work left on the blocking pool is a database call the stop gave up on.
        runtime.shutdown_timeout(Duration::from_millis(500));
        result.map_err(ServiceError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_go_under_program_data() {
        let env: Env = [("ProgramData", r"D:\Data")].into_iter().collect();
        let path = log_file(&env).to_string_lossy().replace('/', "\\");
        assert_eq!(path, r"D:\Data\ehrsync\logs\ehrsync.log");
        let path = log_file(&Env::default())
            .to_string_lossy()
            .replace('/', "\\");
        assert_eq!(path, r"C:\ProgramData\ehrsync\logs\ehrsync.log");
    }

    #[test]
    fn large_logs_are_rotated_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("ehrsync.log");
        rotate(&log, 4).unwrap(); // nothing there yet
        std::fs::write(&log, "0123").unwrap();
        rotate(&log, 4).unwrap();
        assert!(log.exists());
        std::fs::write(&log, "01234").unwrap();
        rotate(&log, 4).unwrap();
        assert!(!log.exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ehrsync.log.1")).unwrap(),
            "01234"
        );
    }

    #[test]
    #[cfg(not(windows))]
    fn every_command_points_to_systemd_elsewhere() {
        let e = install(Path::new("/etc/ehrsync/ehrsync.toml"), LogFormat::Text).unwrap_err();
        assert!(matches!(e, ServiceError::NotWindows));
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("systemd/ehrsync.service"));
        assert!(matches!(uninstall(), Err(ServiceError::NotWindows)));
        assert!(matches!(
            run(Path::new("x.toml"), LogFormat::Text),
            Err(ServiceError::NotWindows)
        ));
    }
}
