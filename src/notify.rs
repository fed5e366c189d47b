//! systemd's notification protocol (`Type=notify`, sd_notify(3)): READY=1 once the agent
//! serves, RELOADING=1/READY=1 around a config reload, STOPPING=1 on shutdown, STATUS= lines
//! for `systemctl status`, and WATCHDOG=1 pings from a task on the async runtime, so a runtime
//! that hangs stops pinging and `WatchdogSec=` restarts the service.
//!
//! Outside systemd (no `$NOTIFY_SOCKET`) every call does nothing. On Windows the service
//! control manager has its own protocol (`crate::service`), and these are no-ops.

use std::time::Duration;

/// Tells the service manager the agent is serving, with a one-line status.
pub fn ready(status: &str) {
    #[cfg(unix)]
    send(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
    #[cfg(not(unix))]
    let _ = status;
}

/// Tells the service manager a reload has begun (answered by [`ready`] when it is done).
pub fn reloading() {
    #[cfg(unix)]
    {
        // systemd ≥ 253 (`Type=notify-reload`) wants the monotonic time with RELOADING=1.
        let mut states = vec![sd_notify::NotifyState::Reloading];
        if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        send(&states);
    }
}

/// Tells the service manager the agent is stopping, with a one-line status.
pub fn stopping(status: &str) {
    #[cfg(unix)]
    send(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status(status),
    ]);
    #[cfg(not(unix))]
    let _ = status;
}

/// The watchdog interval systemd asks for (`WatchdogSec=`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    #[cfg(unix)]
    return sd_notify::watchdog_enabled();
    #[cfg(not(unix))]
    None
}

/// Starts pinging the watchdog at half its interval, when systemd enabled one. The pings come
/// from a task on the current tokio runtime: if the runtime stops polling tasks, they stop.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let interval = watchdog_interval()?;
    let period = (interval / 2).max(Duration::from_millis(100));
    tracing::debug!(interval = ?interval, "pinging the systemd watchdog");
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            #[cfg(unix)]
            send(&[sd_notify::NotifyState::Watchdog]);
        }
    }))
}

#[cfg(unix)]
fn send(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        // The service manager went away or the socket is unreachable; the agent keeps working,
        // and systemd acts on the silence (a start timeout, or the watchdog).
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
