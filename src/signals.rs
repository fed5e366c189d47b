//! Operating-system requests to a running agent, as [`Control`] messages.
//!
//! Unix (signal-hook, on a thread of its own): SIGTERM or SIGINT → [`Control::Stop`]; a second
//! one while stopping exits at once (status 128 + the signal, as a shell reports it); SIGHUP →
//! [`Control::Reload`]. Windows: Ctrl-C → stop, a second Ctrl-C exits at once; a service stop
//! arrives through `crate::service` on the same channel.

use tokio::sync::mpsc;

/// What the process asks of a running agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop scheduling, give runs in progress the shutdown grace, then exit.
    Stop,
    /// Re-read the config and apply what changed.
    Reload,
}

/// Starts listening for stop and reload requests.
#[cfg(unix)]
pub fn listen() -> std::io::Result<mpsc::UnboundedReceiver<Control>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    use signal_hook::iterator::Signals;

    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("ehrsync-signals".to_owned())
        .spawn(move || {
            let mut stopping = false;
            for signal in signals.forever() {
                let name = signal_hook::low_level::signal_name(signal).unwrap_or("signal");
                if signal == SIGHUP {
                    if stopping {
                        tracing::info!("SIGHUP ignored: ehrsync is stopping");
                    } else {
                        tracing::info!("SIGHUP: reloading the config");
                        // The agent has returned if this fails; the process is about to exit.
                        let _ = tx.send(Control::Reload);
                    }
                } else if stopping {
                    tracing::warn!("second {name}: exiting at once");
                    eprintln!("ehrsync: second {name}, exiting at once");
                    std::process::exit(128 + signal);
                } else {
                    stopping = true;
                    tracing::info!("{name}: stopping (send it again to exit at once)");
                    let _ = tx.send(Control::Stop);
                }
            }
        })?;
    Ok(rx)
}

/// Starts listening for stop requests (Ctrl-C). Call from within the tokio runtime.
#[cfg(not(unix))]
pub fn listen() -> std::io::Result<mpsc::UnboundedReceiver<Control>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_err() {
            return;
        }
        tracing::info!("Ctrl-C: stopping (press it again to exit at once)");
        let _ = tx.send(Control::Stop);
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("ehrsync: second Ctrl-C, exiting at once");
            std::process::exit(130);
        }
    });
    Ok(rx)
}
