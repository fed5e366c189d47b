//! The job scheduler on its own: hundreds of jobs over simulated days fire at every occurrence
//! and only then (none stops firing), UTC schedules are untouched by daylight-saving changes, a
//! stop waits for the run in progress, and a load test in real time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ehrsync::clock::{SharedClock, SystemClock, TokioClock};
use ehrsync::config::Schedule;
use ehrsync::scheduler::drive;
use ehrsync::token::Timestamp;
use tokio::sync::watch;

type Fires = Arc<Mutex<Vec<i64>>>;

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// Starts `schedule` on `clock`; each run records the wall time (ms) it started at.
fn start_job(
    schedule: &str,
    clock: &SharedClock,
    stop: &watch::Receiver<bool>,
    skipped: Arc<Mutex<u64>>,
) -> (Fires, tokio::task::JoinHandle<()>) {
    let fires: Fires = Arc::default();
    let (record, run_clock) = (fires.clone(), clock.clone());
    let start = move |_reconcile: bool| {
        let (record, clock) = (record.clone(), run_clock.clone());
        async move {
            record.lock().unwrap().push(clock.now().unix_millis());
        }
    };
    let task = tokio::spawn(drive(
        Schedule::parse(schedule).unwrap(),
        None,
        clock.clone(),
        stop.clone(),
        false,
        start,
        move |_| *skipped.lock().unwrap() += 1,
    ));
    (fires, task)
}

/// Every occurrence of `schedule` in `(from, to]`, in ms.
fn occurrences(schedule: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<i64> {
    let s = Schedule::parse(schedule).unwrap();
    let mut out = Vec::new();
    let mut t = from;
    while let Some(next) = s.next_after(t).filter(|n| *n <= to) {
        out.push(next.timestamp_millis());
        t = next;
    }
    out
}

#[tokio::test(start_paused = true)]
async fn hundreds_of_jobs_fire_at_every_occurrence_for_two_simulated_days() {
    let start = utc("2026-11-20T23:59:58.250Z");
    let clock: SharedClock = Arc::new(TokioClock::new(Timestamp::from_unix_millis(
        start.timestamp_millis(),
    )));
    let schedules = [
        "*/15 * * * * *",
        "0 * * * * *",
        "0 */5 * * * *",
        "17 3/10 * * * *",
        "0 0 * * * *",
        "0 30 2 * * *",
        "59 59 23 * * *",
        "0 0 0 * * MON-FRI",
    ];
    let (stop_tx, stop) = watch::channel(false);
    let skipped = Arc::new(Mutex::new(0u64));
    let jobs: Vec<(&str, Fires, tokio::task::JoinHandle<()>)> = (0..240)
        .map(|i| {
            let schedule = schedules[i % schedules.len()];
            let (fires, task) = start_job(schedule, &clock, &stop, skipped.clone());
            (schedule, fires, task)
        })
        .collect();
    let span = Duration::from_secs(2 * 86_400);
    tokio::time::sleep(span).await;
    let end = start + chrono::Duration::from_std(span).unwrap();
    let _ = stop_tx.send(true);
    let mut total = 0;
    for (schedule, fires, task) in jobs {
        task.await.unwrap();
        let fires = fires.lock().unwrap().clone();
        let expected = occurrences(schedule, start, end);
        assert_eq!(
            fires, expected,
            "{schedule}: every occurrence, on time, nothing else"
        );
        assert!(
            fires.iter().all(|ms| ms % 1000 == 0),
            "{schedule}: whole seconds"
        );
        total += fires.len();
    }
    assert_eq!(
        *skipped.lock().unwrap(),
        0,
        "instant runs are never skipped"
    );
    assert!(total > 400_000, "{total} runs");
}

#[tokio::test(start_paused = true)]
async fn utc_schedules_ignore_daylight_saving_changes() {
    // US spring forward, EU spring forward, US fall back (all 2026).
    for change in [
        "2026-03-08T00:00:00Z",
        "2026-03-29T00:00:00Z",
        "2026-11-01T00:00:00Z",
    ] {
        let start = utc(change) - chrono::Duration::days(1);
        let clock: SharedClock = Arc::new(TokioClock::new(Timestamp::from_unix_millis(
            start.timestamp_millis(),
        )));
        let (stop_tx, stop) = watch::channel(false);
        let skipped = Arc::new(Mutex::new(0));
        let (daily, d_task) = start_job("0 30 1 * * *", &clock, &stop, skipped.clone());
        let (hourly, h_task) = start_job("0 0 * * * *", &clock, &stop, skipped.clone());
        // Half an hour past the last occurrence, so the last one is not racing the stop.
        tokio::time::sleep(Duration::from_secs(3 * 86_400 + 1_800)).await;
        let _ = stop_tx.send(true);
        d_task.await.unwrap();
        h_task.await.unwrap();
        let daily = daily.lock().unwrap().clone();
        let hourly = hourly.lock().unwrap().clone();
        assert_eq!(daily.len(), 3, "{change}");
        assert!(
            daily.windows(2).all(|w| w[1] - w[0] == 86_400_000),
            "{change}: {daily:?}"
        );
        let first = DateTime::from_timestamp_millis(daily[0]).unwrap();
        assert_eq!(first.format("%H:%M:%S").to_string(), "01:30:00");
        assert_eq!(hourly.len(), 72, "{change}");
        assert!(
            hourly.iter().all(|ms| ms % 3_600_000 == 0),
            "{change}: on the hour"
        );
        assert!(
            hourly.windows(2).all(|w| w[1] - w[0] == 3_600_000),
            "{change}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn stopping_waits_for_the_run_in_progress() {
    let clock: SharedClock = Arc::new(TokioClock::new(Timestamp::from_unix_millis(
        1_800_000_000_000,
    )));
    let (stop_tx, stop) = watch::channel(false);
    let finished = Arc::new(Mutex::new(false));
    let flag = finished.clone();
    let start = move |_reconcile: bool| {
        let flag = flag.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            *flag.lock().unwrap() = true;
        }
    };
    let task = tokio::spawn(drive(
        Schedule::parse("0 0 0 1 1 *").unwrap(),
        None,
        clock,
        stop,
        true,
        start,
        |_| {},
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop_tx.send(true);
    task.await.unwrap();
    assert!(
        *finished.lock().unwrap(),
        "drive returned before its run ended"
    );
}

/// Real time on the multi-threaded runtime: 500 jobs every second for ~4 s. Counts are checked;
/// lateness is printed (timings are measured, not asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_jobs_every_second_in_real_time() {
    let clock: SharedClock = Arc::new(SystemClock);
    let (stop_tx, stop) = watch::channel(false);
    let skipped = Arc::new(Mutex::new(0));
    let jobs: Vec<_> = (0..500)
        .map(|_| start_job("* * * * * *", &clock, &stop, skipped.clone()))
        .collect();
    tokio::time::sleep(Duration::from_millis(4_200)).await;
    let _ = stop_tx.send(true);
    let mut late = Vec::new();
    for (fires, task) in jobs {
        task.await.unwrap();
        let fires = fires.lock().unwrap().clone();
        assert!((3..=5).contains(&fires.len()), "{} fires", fires.len());
        late.extend(fires.iter().map(|ms| ms.rem_euclid(1000)));
    }
    late.sort_unstable();
    println!(
        "lateness after the second (ms): p50 {} p99 {} max {}",
        late[late.len() / 2],
        late[late.len() * 99 / 100],
        late[late.len() - 1]
    );
}
