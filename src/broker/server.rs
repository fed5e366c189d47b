//! Where the broker listens: a Unix socket (mode and group set before it is announced), or a
//! TCP address that must be loopback unless `allow_non_loopback` says otherwise.

use std::path::PathBuf;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{BrokerListen, BrokerSettings};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("broker.listen: cannot listen on {addr}: {source}")]
    Tcp {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("broker.listen: cannot create the socket {}: {source}", path.display())]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("broker.listen: {} is in use by another running process (is another agent running?)", path.display())]
    InUse { path: PathBuf },
    #[error("broker.listen: {} exists and is not a socket; remove it or choose another path", path.display())]
    NotASocket { path: PathBuf },
    #[error("broker.socket_{what}: cannot set it on {}: {source}", path.display())]
    Permissions {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "broker.listen: Unix sockets are not available on this system; use a loopback address such as 127.0.0.1:9871"
    )]
    NoUnixSockets,
}

/// A running listener: stop it with [`Listening::stop`], which also removes its socket file.
pub struct Listening {
    pub task: JoinHandle<()>,
    stop: watch::Sender<bool>,
    socket: Option<PathBuf>,
    /// What it listens on, as logged (`unix:/run/ehrsync/broker.sock`, `127.0.0.1:9871`).
    pub address: String,
}

impl Listening {
    /// Stops accepting, lets requests in progress end (proxied streams are bounded by the
    /// broker's timeout), and removes the socket file.
    pub async fn stop(self, wait: std::time::Duration) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(wait, &mut task).await.is_err() {
            task.abort();
            tracing::warn!("broker requests still in progress were cut off at stop");
        }
        if let Some(path) = self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds `settings.listen` and serves `router` on it until stopped.
pub async fn listen(
    settings: &BrokerSettings,
    router: axum::Router,
) -> Result<Listening, ListenError> {
    let (stop, mut stopped) = watch::channel(false);
    let shutdown = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    match &settings.listen {
        BrokerListen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ListenError::Tcp {
                    addr: *addr,
                    source,
                })?;
            Ok(Listening {
                task: serve(listener, router, shutdown),
                stop,
                socket: None,
                address: addr.to_string(),
            })
        }
        BrokerListen::Unix(path) => {
            #[cfg(unix)]
            {
                let listener = bind_unix(path, settings)?;
                Ok(Listening {
                    task: serve(listener, router, shutdown),
                    stop,
                    socket: Some(path.clone()),
                    address: format!("unix:{}", path.display()),
                })
            }
            #[cfg(not(unix))]
            {
                let _ = (path, router, stop, shutdown);
                Err(ListenError::NoUnixSockets)
            }
        }
    }
}

/// Serves `router` on `listener` in a task of its own until `shutdown` completes.
fn serve<L>(
    listener: L,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> JoinHandle<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    tokio::spawn(async move {
        let serve = axum::serve(listener, router).with_graceful_shutdown(shutdown);
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "the broker's listener stopped");
        }
    })
}

/// Binds the socket at `path`: a stale socket (nothing answers on it) is removed first, a live
/// one or another kind of file is an error. The socket is created inside a fresh private
/// directory beside `path`, given its mode and group there, and only then renamed into place,
/// so no process can connect before the permissions hold.
#[cfg(unix)]
fn bind_unix(
    path: &std::path::Path,
    settings: &BrokerSettings,
) -> Result<tokio::net::UnixListener, ListenError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    let socket_err = |source| ListenError::Socket {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenError::InUse {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(socket_err)?;
        }
        Ok(_) => {
            return Err(ListenError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_err(e)),
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let staging = tempfile_dir(parent).map_err(socket_err)?;
    let staged = staging.join("broker.sock");
    let result = (|| {
        let listener = tokio::net::UnixListener::bind(&staged).map_err(socket_err)?;
        if let Some(gid) = settings.socket_gid() {
            std::os::unix::fs::chown(&staged, None, Some(gid)).map_err(|source| {
                ListenError::Permissions {
                    what: "group",
                    path: path.to_owned(),
                    source,
                }
            })?;
        }
        std::fs::set_permissions(
            &staged,
            std::fs::Permissions::from_mode(settings.socket_mode),
        )
        .map_err(|source| ListenError::Permissions {
            what: "mode",
            path: path.to_owned(),
            source,
        })?;
        std::fs::rename(&staged, path).map_err(socket_err)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&staging);
    result
}

/// A new directory only this user can enter, inside `parent`.
#[cfg(unix)]
fn tempfile_dir(parent: &std::path::Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    for attempt in 0..16u32 {
        let nonce = getrandom::u64().unwrap_or(u64::from(attempt));
        let dir = parent.join(format!(".ehrsync-broker-{nonce:016x}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(
        "cannot create a private directory beside the socket",
    ))
}
