//! What the benchmarks share: the release binary as a child process, measured from outside
//! through `/proc` and `wait4` (Linux), a systemd notify socket for the moment it is ready,
//! and summary statistics.

#![allow(dead_code)] // each benchmark uses a different subset

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

/// The release `ehrsync` binary `cargo bench` built.
pub const EHRSYNC: &str = env!("CARGO_BIN_EXE_ehrsync");

/// CPU time, memory and threads of a running process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// User plus system CPU time so far.
    pub cpu: Duration,
    pub rss_kb: u64,
    /// Peak RSS so far (`VmHWM`).
    pub peak_rss_kb: u64,
    pub threads: u64,
}

/// Reads `/proc/PID/stat` and `/proc/PID/status`; `None` once the process is gone.
pub fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(Usage {
        cpu: Duration::from_secs_f64(ticks as f64 / clock_ticks()),
        rss_kb: field("VmRSS:"),
        peak_rss_kb: field("VmHWM:"),
        threads: field("Threads:"),
    })
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant of the running system; it has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Writes every dirty page of every file system back to disk (`sync`), so that one
/// measurement does not pay for the writes of the one before.
pub fn flush_disks() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Waits for `child` and returns its exit code and peak RSS in kB (from `wait4`'s rusage, so
/// the figure covers the whole life of the process).
pub fn wait_with_peak_rss(child: Child) -> (Option<i32>, u64) {
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own unreaped child; the pointers are to live locals.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
    assert_eq!(
        reaped,
        pid,
        "wait4 failed: {}",
        std::io::Error::last_os_error()
    );
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    (code, u64::try_from(rusage.ru_maxrss).unwrap_or(0))
}

/// A systemd notify socket (`NOTIFY_SOCKET`) the child reports `READY=1` on.
pub struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Notify {
    pub fn new() -> Notify {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        Notify {
            socket,
            path,
            _dir: dir,
        }
    }

    pub fn path(&self) -> &str {
        self.path.to_str().expect("a UTF-8 temporary path")
    }

    /// Waits up to `limit` for a message holding the line `want`; returns when it arrived.
    pub fn wait_for(&self, want: &str, limit: Duration) -> Option<Instant> {
        let until = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        loop {
            let left = until.checked_duration_since(Instant::now())?;
            self.socket
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .ok()?;
            let n = self.socket.recv(&mut buf).ok()?;
            let at = Instant::now();
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == want)
            {
                return Some(at);
            }
        }
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One HTTP/1.0 GET on loopback: the status code, or `None` when nothing answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// One HTTP/1.0 GET on loopback: the body of a 200 answer, or `None`.
pub fn http_body(port: u16, path: &str) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1)? == "200").then(|| body.to_owned())
}

/// A new, empty database `name` on the PostgreSQL server `server` (the URL of a role that may
/// create databases), dropped first if a run before left it; returns its URL.
pub fn new_postgres_database(
    runtime: &tokio::runtime::Runtime,
    server: &str,
    name: &str,
) -> String {
    use sqlx::Connection;
    runtime.block_on(async {
        let mut admin = sqlx::PgConnection::connect(server)
            .await
            .expect("connect to --postgres");
        for sql in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut admin)
                .await
                .expect("create the bench database");
        }
        let mut url = url::Url::parse(server).expect("--postgres is a URL");
        url.set_path(name);
        url.to_string()
    })
}

/// The value at quantile `q` (0–1) of `sorted` (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorts `values` (NaNs last) for [`quantile`].
pub fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

/// "median (min–max)" of several runs' figures.
pub fn spread(values: &[f64], digits: usize) -> String {
    let s = sorted(values.to_vec());
    if s.len() == 1 {
        return format!("{:.digits$}", s[0]);
    }
    format!(
        "{:.digits$} (range {:.digits$}–{:.digits$}, {} runs)",
        quantile(&s, 0.5),
        s[0],
        s[s.len() - 1],
        s.len()
    )
}

/// `--name VALUE` from the benchmark's arguments (after cargo's `--`).
pub fn arg<T: std::str::FromStr>(name: &str) -> Option<T> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok().or_else(|| v.replace('_', "").parse().ok()))
}

/// The arguments that are neither flags nor the values of `valued` flags, parsed.
pub fn positional<T: std::str::FromStr>(valued: &[&str]) -> Vec<T> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if valued.contains(&a.as_str()) {
            args.next();
        } else if !a.starts_with("--")
            && let Ok(v) = a.replace('_', "").parse()
        {
            out.push(v);
        }
    }
    out
}
