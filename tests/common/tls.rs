//! TLS servers on loopback for tests, made with Debian's `openssl` (which `.ci/test` installs):
//! `openssl s_server` presenting a certificate nobody issued, or one a private CA issued for
//! 127.0.0.1 (as a practice's TLS-inspecting firewall would).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `openssl s_server`; stopped on drop.
pub struct TlsServer {
    child: Child,
    pub port: u16,
    /// The CA that issued its certificate (`private_ca` only).
    pub ca: Option<PathBuf>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `openssl ARGS` in `dir`, panicking with its stderr when it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (Debian package `openssl`, which .ci/test installs)");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh self-signed certificate for `subject` in `DIR/cert`, its key in `DIR/key`.
fn self_signed_cert(dir: &Path, subject: &str, key: &str, cert: &str) {
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", subject,
            "-keyout", key, "-out", cert,
        ],
    );
}

/// A fresh self-signed CA certificate (PEM), made in `dir`.
pub fn ca_pem(dir: &Path) -> String {
    self_signed_cert(dir, "/CN=Some Practice CA", "some-ca.key", "some-ca.pem");
    std::fs::read_to_string(dir.join("some-ca.pem")).unwrap()
}

/// A server whose certificate is self-signed: no client trusts it.
pub fn self_signed(dir: &Path) -> TlsServer {
    self_signed_cert(dir, "/CN=127.0.0.1", "server.key", "server.pem");
    serve(dir, None)
}

/// A private CA (`DIR/ca.pem`, in [`TlsServer::ca`]) and a server presenting a certificate it
/// issued for 127.0.0.1, valid for one day.
pub fn private_ca(dir: &Path) -> TlsServer {
    private_ca_for(dir, 1)
}

/// [`private_ca`] with a server certificate valid for `days` days from now.
pub fn private_ca_for(dir: &Path, days: u32) -> TlsServer {
    let days = days.to_string();
    self_signed_cert(dir, "/CN=Practice Firewall CA", "ca.key", "ca.pem");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            &days,
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ],
    );
    serve(dir, Some(dir.join("ca.pem")))
}

/// `openssl s_server` with `DIR/server.pem` and `DIR/server.key` on a free port, once it
/// accepts connections.
fn serve(dir: &Path, ca: Option<PathBuf>) -> TlsServer {
    let port = super::free_port();
    let child = Command::new("openssl")
        .current_dir(dir)
        .args(["s_server", "-quiet", "-www", "-accept", &port.to_string()])
        .args(["-cert", "server.pem", "-key", "server.key"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let since = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "s_server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    TlsServer { child, port, ca }
}
