//! Cron scheduling of pull jobs: one small tokio task per job that sleeps until the schedule's
//! next occurrence (UTC, computed by croner exactly as `check-config` validated it) and starts a
//! run, unless the previous run is still going — then the occurrence is skipped and counted.
//!
//! Why not tokio-cron-scheduler: see ARCHITECTURE.md ("Scheduling"). In short, it reads
//! `chrono::Utc::now()` in a 500 ms polling loop, so it cannot run under tokio's paused clock
//! (no simulated days in tests) and fires up to half a second late; it lets a job overlap
//! itself; its shutdown does not wait for running jobs; and its time-zone jobs drift after a
//! daylight-saving change. This loop has none of those properties and fits in a page.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::clock::SharedClock;
use crate::config::Schedule;
use crate::token::Timestamp;

/// The longest single sleep. Tokio's timers follow the monotonic clock; waking at least this
/// often re-reads the wall clock, so a suspended VM or a stepped clock delays a run by at most
/// this much.
const MAX_SLEEP: Duration = Duration::from_secs(300);

/// What the scheduler reports.
pub trait Hooks: Send + 'static {
    /// A due occurrence found the previous run still going.
    fn skipped(&mut self, due: DateTime<Utc>);

    /// Resolves when a run should start now, between occurrences (an agent sharing a database
    /// took the account over from one that left a run unfinished). Dropped and called again
    /// whenever an occurrence comes first. Never, by default.
    fn due_now(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
}

impl<F: FnMut(DateTime<Utc>) + Send + 'static> Hooks for F {
    fn skipped(&mut self, due: DateTime<Utc>) {
        self(due)
    }
}

/// Whether a job whose latest run started at `last_started` (Unix seconds; `None` if it never
/// ran) missed an occurrence before `now`, and so runs once at start-up.
pub fn missed(schedule: &Schedule, last_started: Option<i64>, now: Timestamp) -> bool {
    let Some(last) = last_started.and_then(|s| DateTime::from_timestamp(s, 0)) else {
        return true;
    };
    schedule
        .next_after(last)
        .is_some_and(|next| next.timestamp_millis() <= now.unix_millis())
}

/// A failed run is repeated at start-up when the job's next occurrence is further away than
/// this; a job that runs more often simply waits for its next occurrence.
pub const REPEAT_FAILED_BEYOND: Duration = Duration::from_secs(15 * 60);

/// Why a job runs once as soon as the agent starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartRun {
    /// It has never run.
    Never,
    /// An occurrence passed while no agent was running.
    Missed,
    /// Its latest run never completed: its process died (`running`) or was stopped
    /// (`interrupted`).
    Unfinished,
    /// Its latest run failed and the next occurrence is more than [`REPEAT_FAILED_BEYOND`] away.
    Failed,
}

impl StartRun {
    pub fn as_str(self) -> &'static str {
        match self {
            StartRun::Never => "never_ran",
            StartRun::Missed => "missed",
            StartRun::Unfinished => "unfinished",
            StartRun::Failed => "failed",
        }
    }

    /// For the log line.
    pub fn explain(self) -> &'static str {
        match self {
            StartRun::Never => "it never ran",
            StartRun::Missed => "it missed a run while ehrsync was down",
            StartRun::Unfinished => {
                "its last run did not complete (stopped or crashed); it is repeated from the last completed run's watermark"
            }
            StartRun::Failed => "its last run failed and the next scheduled run is a while away",
        }
    }
}

/// Whether a job runs once at start-up, and why: when it never ran, missed an occurrence,
/// did not complete its latest run, or failed it with the next occurrence far away. Each is
/// repeated once (the run at start-up is the job's latest from then on).
pub fn run_at_start(
    schedule: &Schedule,
    last_started: Option<i64>,
    last_outcome: Option<&str>,
    now: Timestamp,
) -> Option<StartRun> {
    if last_started.is_none() {
        return Some(StartRun::Never);
    }
    if missed(schedule, last_started, now) {
        return Some(StartRun::Missed);
    }
    match last_outcome {
        Some("running" | "interrupted") => Some(StartRun::Unfinished),
        Some("failed") => {
            let next = schedule.next_after(to_utc(now))?;
            let wait = Timestamp::from_unix_millis(next.timestamp_millis()).since(now);
            (wait > REPEAT_FAILED_BEYOND).then_some(StartRun::Failed)
        }
        _ => None,
    }
}

/// Runs `schedule` until `stop` turns true: at each occurrence calls `start` (and spawns the
/// future it returns) unless the previous run has not finished. With `run_now`, a first run
/// starts at once. On stop, waits for the run in progress (which sees `stop` itself) and
/// returns.
///
/// `reconcile` is a second schedule whose occurrences start a run too, with `start(true)`: a
/// reconcile due while a run is in progress is not lost but carried by the next run that
/// starts.
///
/// The run task belongs to this one: aborting (or dropping) the task driving the schedule
/// aborts the run in progress too, so a run cut off by a stop can never go on by itself.
pub async fn drive<S, Fut>(
    schedule: Schedule,
    reconcile: Option<Schedule>,
    clock: SharedClock,
    mut stop: watch::Receiver<bool>,
    run_now: bool,
    mut start: S,
    mut hooks: impl Hooks,
) where
    S: FnMut(bool) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut running: Option<AbortOnDrop> = None;
    if run_now {
        running = Some(AbortOnDrop(tokio::spawn(start(false))));
    }
    let mut last_due: Option<DateTime<Utc>> = None;
    let mut reconcile_pending = false;
    loop {
        let now = to_utc(clock.now());
        // Never fire the same occurrence twice, even if the wall clock steps back; after a
        // stall spanning several occurrences, fire once rather than in a burst.
        let after = match last_due {
            Some(d) => d.max(now - chrono::Duration::seconds(1)),
            None => now,
        };
        let sweep_due = reconcile.as_ref().and_then(|r| r.next_after(after));
        let Some(due) = schedule.next_after(after) else {
            tracing::warn!(
                schedule = schedule.as_str(),
                "the schedule has no further occurrence"
            );
            break;
        };
        let (due, sweep) = match sweep_due {
            Some(s) if s <= due => (s, true),
            _ => (due, false),
        };
        tokio::select! {
            _ = sleep_until(&clock, due) => {}
            _ = stop.wait_for(|s| *s) => break,
            _ = hooks.due_now() => {
                // Unless this process is running the job already.
                if running.as_ref().is_none_or(|run| run.0.is_finished()) {
                    running = Some(AbortOnDrop(tokio::spawn(start(reconcile_pending))));
                    reconcile_pending = false;
                }
                continue;
            }
        }
        last_due = Some(due);
        reconcile_pending |= sweep;
        match &running {
            Some(run) if !run.0.is_finished() => hooks.skipped(due),
            _ => {
                running = Some(AbortOnDrop(tokio::spawn(start(reconcile_pending))));
                reconcile_pending = false;
            }
        }
    }
    if let Some(mut run) = running {
        // A run that panicked has already been reported by the panic hook.
        let _ = (&mut run.0).await;
    }
}

/// A run task that is aborted when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn to_utc(t: Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.unix_millis()).unwrap_or_default()
}

/// Sleeps until the wall clock reaches `due`, in steps of at most [`MAX_SLEEP`].
async fn sleep_until(clock: &SharedClock, due: DateTime<Utc>) {
    let due = Timestamp::from_unix_millis(due.timestamp_millis());
    loop {
        let now = clock.now();
        if now >= due {
            return;
        }
        tokio::time::sleep(due.since(now).min(MAX_SLEEP)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        Timestamp::from_unix_millis(DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis())
    }

    #[test]
    fn a_run_missed_while_down_is_due_at_start() {
        let hourly = Schedule::parse("0 0 * * * *").unwrap();
        let started = |s: &str| Some(at(s).unix_seconds());
        let now = at("2026-11-22T10:30:00Z");
        assert!(missed(&hourly, None, now), "never ran");
        assert!(missed(&hourly, started("2026-11-22T09:00:00Z"), now));
        assert!(!missed(&hourly, started("2026-11-22T10:00:00Z"), now));
        assert!(!missed(&hourly, started("2026-11-22T10:29:00Z"), now));
    }

    #[test]
    fn an_unfinished_run_is_repeated_at_start_and_a_failed_one_when_the_next_is_far() {
        let daily = Schedule::parse("0 0 3 * * *").unwrap();
        let every_5 = Schedule::parse("0 */5 * * * *").unwrap();
        let now = at("2026-11-22T10:30:00Z");
        let today = Some(at("2026-11-22T03:00:00Z").unix_seconds());
        let recent = Some(at("2026-11-22T10:30:00Z").unix_seconds());
        let start = |s: &Schedule, last, outcome| run_at_start(s, last, outcome, now);
        assert_eq!(start(&daily, None, None), Some(StartRun::Never));
        let yesterday = Some(at("2026-11-21T03:00:00Z").unix_seconds());
        assert_eq!(
            start(&daily, yesterday, Some("success")),
            Some(StartRun::Missed)
        );
        assert_eq!(start(&daily, today, Some("success")), None);
        assert_eq!(
            start(&daily, today, Some("running")),
            Some(StartRun::Unfinished)
        );
        assert_eq!(
            start(&daily, today, Some("interrupted")),
            Some(StartRun::Unfinished)
        );
        assert_eq!(start(&daily, today, Some("failed")), Some(StartRun::Failed));
        // A job that runs every five minutes waits for its next occurrence after a failure.
        assert_eq!(start(&every_5, recent, Some("failed")), None);
        assert_eq!(
            start(&every_5, recent, Some("interrupted")),
            Some(StartRun::Unfinished)
        );
    }
}
