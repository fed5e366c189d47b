//! Access tokens: the lifecycle rules (a sans-IO core) and the token endpoint's wire format.
//!
//! [`core`] decides *what* to do and *when* — a pure function of state, time and events — and
//! [`response`] reads what token endpoints answer. Neither touches a socket, a clock or the
//! database; the I/O shell that performs their decisions is built on top.

pub mod client;
pub mod core;
pub mod owner;
pub mod ownership;
pub mod persist;
pub mod pkce;
pub mod response;

use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

/// A wall-clock instant as milliseconds since the Unix epoch (UTC). Token expiries are
/// wall-clock facts (JWT `exp`, `expires_on`), so the core reasons in this one time type;
/// the shell maps it to timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_unix_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    pub const fn unix_millis(self) -> i64 {
        self.0
    }

    /// Whole seconds, rounded down (the database stores seconds).
    pub const fn unix_seconds(self) -> i64 {
        self.0.div_euclid(1000)
    }

    /// Seconds with their fraction, as Prometheus timestamps are written.
    pub fn unix_seconds_f64(self) -> f64 {
        self.0 as f64 / 1000.0
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0))
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }
}

impl Sub<Duration> for Timestamp {
    type Output = Timestamp;
    fn sub(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match chrono::DateTime::from_timestamp_millis(self.0) {
            Some(t) => write!(
                f,
                "{}",
                t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ),
            None => write!(f, "{}ms", self.0),
        }
    }
}
