//! Wall-clock time for the token engine and the vendor sandbox, behind one trait so tests can
//! run days of token lifetimes in milliseconds under tokio's paused time.

use std::sync::Arc;

use crate::token::Timestamp;

/// A source of the current wall-clock time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The system clock (production).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_unix_millis(chrono::Utc::now().timestamp_millis())
    }
}

/// Wall time derived from tokio's clock: `base` plus the tokio time elapsed since creation.
/// Under `tokio::time::pause()` it jumps with the paused clock, so the engine's timers and the
/// wall-clock expiries it reasons about move together.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    base: Timestamp,
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn new(base: Timestamp) -> Self {
        TokioClock {
            base,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        self.base + self.start.elapsed()
    }
}

pub type SharedClock = Arc<dyn Clock>;
