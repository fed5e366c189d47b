//! Pull runs: one run of one job, from the job lease to the `sync_runs` row's outcome.
//!
//! A run takes the job's lease (so it never overlaps itself, in this process or another),
//! records itself in `sync_runs`, and walks the pages: while page k is written (one
//! transaction, records, derived rows and counts together), the next pages are already being
//! fetched and read; pages that waited for the writer are committed together. At most five
//! pages are in memory (three waiting, one being written, one being read), whatever the run's
//! size. The watermark moves in the transaction that marks the run `success`; a run that fails or is
//! dropped halfway leaves its committed pages and the old watermark, and the next run repeats
//! the rest (upserts are idempotent).

pub mod fetch;
pub mod fhir;
pub mod limits;
pub mod list;

use std::collections::HashSet;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use url::Url;

use crate::clock::SharedClock;
use crate::config::{Account, Job, JobKind, ListPaging};
use crate::metrics::Metrics;
use crate::store::{ChangeKind, Holder, Lease, LeaseKey, PageRow, Reconciled, Store, StoreError};
use crate::token::owner::TokenHandle;
use crate::views::ViewSet;
use fetch::Fetcher;

/// How long a job lease lasts without renewal. A run whose process is gone is taken over at
/// once on its own host; elsewhere (a crash, a pause, a cut-off) it blocks its job at most
/// this long.
pub const JOB_LEASE_TTL: Duration = Duration::from_secs(60);
/// How often a running job renews its lease.
const JOB_LEASE_RENEW: Duration = Duration::from_secs(20);
/// Pages read ahead of the writer. When writing is the slower side they are committed
/// together: fewer commits, and an index page touched by several pages is written once.
const WAITING_PAGES: usize = 3;
/// A page request's deadline, per attempt.
pub const API_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a run failed. Messages name the page and URL, never a token or record content.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("page {page} (GET {url}): HTTP {status}: {detail}")]
    Http {
        url: String,
        page: u32,
        status: u16,
        detail: String,
    },
    #[error("page {page} (GET {url}): no answer after {attempts} attempts: {reason}")]
    Unreachable {
        url: String,
        page: u32,
        attempts: u32,
        reason: String,
    },
    #[error("page {page} (GET {url}): {reason}")]
    Malformed {
        url: String,
        page: u32,
        reason: String,
    },
    #[error("no access token: {0}")]
    Token(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{reason}")]
    Config { reason: String },
    #[error(
        "reconcile refused: {gone} of the {live} stored {resource_type} records ({share:.1} %) were not \
         returned by the vendor, more than reconcile_max_delete ({max:.1} %) allows; nothing was \
         deleted. If the vendor really deleted them, run `ehrsync sync {account} {job} --reconcile --force` \
         once; if not, check the account's permissions at the vendor"
    )]
    ReconcileRefused {
        account: String,
        job: String,
        resource_type: String,
        gone: u64,
        live: u64,
        share: f64,
        max: f64,
    },
}

/// How a run is asked to go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Ignore the watermark: pull everything.
    pub full: bool,
    /// After the pull, sweep every id the server holds and mark deleted what it no longer
    /// returns (`fhir` jobs; a whole-list or full run reconciles anyway).
    pub reconcile: bool,
    /// Apply a reconcile even beyond `reconcile_max_delete` (a person's decision, once).
    pub force: bool,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failed,
    /// Stopped between pages by a shutdown.
    Interrupted,
    /// Not run: the job was already running.
    Skipped,
}

impl Outcome {
    /// The `outcome` label of `ehrsync_sync_runs_total` and the `sync_runs.outcome` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failed => "failed",
            Outcome::Interrupted => "interrupted",
            Outcome::Skipped => "skipped",
        }
    }
}

/// What a run pulled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Everything: `--full`, or no completed run yet.
    Full,
    /// Records updated after `since`.
    Incremental { since: String },
    /// A list without a change filter, pulled whole every time.
    Whole,
}

/// The result of one run, printed by `ehrsync sync` as one line.
#[derive(Debug)]
pub struct RunSummary {
    pub account: String,
    pub job: String,
    pub outcome: Outcome,
    pub mode: Mode,
    pub pages: u32,
    pub records: u64,
    /// Records created, updated and (by reconciling) deleted.
    pub changes: Changes,
    /// Whether the run compared the vendor's complete list of ids with the stored records.
    pub reconciled: bool,
    pub duration: Duration,
    /// Set for failed and skipped runs.
    pub error: Option<String>,
}

/// What a run changed in the stored records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    pub created: u64,
    pub updated: u64,
    pub deleted: u64,
}

impl fmt::Display for RunSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}: {}",
            self.account,
            self.job,
            self.outcome.as_str()
        )?;
        if self.outcome == Outcome::Skipped {
            return write!(
                f,
                " ({})",
                self.error.as_deref().unwrap_or("already running")
            );
        }
        write!(
            f,
            ", {} pages, {} records in {:.1}s",
            self.pages,
            self.records,
            self.duration.as_secs_f64()
        )?;
        match &self.mode {
            Mode::Full => write!(f, " (full)")?,
            Mode::Incremental { since } => write!(f, " (changes after {since})")?,
            Mode::Whole => write!(f, " (whole list)")?,
        }
        let Changes {
            created,
            updated,
            deleted,
        } = self.changes;
        if created + updated + deleted == 0 {
            write!(f, "; no changes")?;
        } else {
            write!(
                f,
                "; {created} created, {updated} updated, {deleted} deleted"
            )?;
        }
        if self.reconciled {
            write!(f, " (reconciled)")?;
        }
        if let Some(e) = &self.error {
            write!(f, ": {e}")?;
        }
        Ok(())
    }
}

/// The HTTP client for API pages: keep-alive connections (a run sends its pages back to back).
pub fn api_client() -> Result<reqwest::Client, crate::http::ClientSetupError> {
    crate::http::build(
        crate::http::client_builder(API_REQUEST_TIMEOUT).pool_idle_timeout(Duration::from_secs(20)),
    )
}

/// What every job runner in a process shares.
#[derive(Clone)]
pub struct SyncShared {
    pub store: Store,
    pub http: reqwest::Client,
    pub clock: SharedClock,
    pub metrics: Metrics,
    /// This process as a lease holder.
    pub holder: Arc<Holder>,
    /// The materialised views, kept with each page.
    pub views: ViewSet,
    /// How long `changes` rows are kept.
    pub changes_retention: Duration,
    /// Which accounts this agent owns among agents sharing the database: the jobs of an account
    /// another agent owns are that agent's to run.
    pub ownership: Arc<crate::token::ownership::Ownership>,
}

impl SyncShared {
    /// What runs share, beside the token owners' `shared`: no views, the default retention.
    pub fn new(shared: &crate::token::owner::Shared, http: reqwest::Client) -> SyncShared {
        SyncShared {
            store: shared.store.clone(),
            http,
            clock: shared.clock.clone(),
            metrics: shared.metrics.clone(),
            holder: shared.holder.clone(),
            views: ViewSet::default(),
            changes_retention: crate::config::DEFAULT_CHANGES_RETENTION,
            ownership: shared.ownership.clone(),
        }
    }
}

/// Runs one job of one account.
pub struct JobRunner {
    pub account: Arc<Account>,
    pub job: Job,
    pub tokens: TokenHandle,
    pub shared: SyncShared,
    /// The run in progress, for whoever must cut it off (see [`JobRunner::cut_off`]).
    pub current: Arc<std::sync::Mutex<Option<CurrentRun>>>,
}

impl JobRunner {
    pub fn new(account: Arc<Account>, job: Job, tokens: TokenHandle, shared: SyncShared) -> Self {
        JobRunner {
            account,
            job,
            tokens,
            shared,
            current: Arc::default(),
        }
    }
}

/// A run in progress: its job lease and, once recorded, its `sync_runs` row.
#[derive(Debug, Clone)]
pub struct CurrentRun {
    pub lease: Lease,
    pub run_id: Option<i64>,
}

/// Pages and records committed so far in a run, and the newest record seen.
#[derive(Default)]
struct Progress {
    pages: u32,
    records: u64,
    changes: Changes,
    newest: Option<DateTime<Utc>>,
}

/// What a page holds, however the source is shaped.
struct ReadPage {
    rows: Vec<PageRow>,
    next: Option<Url>,
    newest: Option<DateTime<Utc>>,
}

/// Where the pages come from and how they are read.
enum Source<'a> {
    Fhir {
        resource: &'a str,
        origin: &'a Url,
    },
    List {
        api_base: &'a Url,
        paging: &'a ListPaging,
        page_size: u32,
        number: u32,
        /// The first and last id of the previous page, to notice paging that does not advance.
        previous: Option<(String, String)>,
    },
}

impl Source<'_> {
    fn resource_type(&self) -> &str {
        match self {
            Source::Fhir { resource, .. } => resource,
            Source::List { .. } => list::RESOURCE_TYPE,
        }
    }

    fn read(&mut self, body: &[u8], url: &Url, first: bool) -> Result<ReadPage, String> {
        match self {
            Source::Fhir { resource, origin } => {
                let page = fhir::read_page(body, url, origin, resource, first)?;
                Ok(ReadPage {
                    rows: page.rows,
                    next: page.next,
                    newest: page.newest,
                })
            }
            Source::List {
                api_base,
                paging,
                page_size,
                number,
                previous,
            } => {
                let rows = list::read_page(body, paging)?;
                let ends = rows
                    .first()
                    .zip(rows.last())
                    .map(|(a, b)| (a.id.clone(), b.id.clone()));
                if ends.is_some() && ends == *previous {
                    return Err(format!(
                        "page number {number} holds the same records as the page before: the \
                         server does not seem to page on `{}`; check the job's page_param and \
                         first_page",
                        paging.page_param
                    ));
                }
                *previous = ends;
                let full = u32::try_from(rows.len()).is_ok_and(|n| n >= *page_size);
                *number += 1;
                let next = full.then(|| list::page_url(api_base, paging, *page_size, *number));
                Ok(ReadPage {
                    rows,
                    next,
                    newest: None,
                })
            }
        }
    }
}

/// The pages a walk has requested, to refuse a `next` link that leads back to one of them.
#[derive(Default)]
struct Visited {
    hasher: RandomState,
    seen: HashSet<u64>,
}

impl Visited {
    fn first_visit(&mut self, url: &Url, page: u32) -> Result<(), SyncError> {
        if self.seen.insert(self.hasher.hash_one(url.as_str())) {
            return Ok(());
        }
        Err(SyncError::Malformed {
            url: url.to_string(),
            page,
            reason: "the next link leads back to a page already read".to_owned(),
        })
    }
}

/// What a run's page writer committed, and the error that stopped it.
#[derive(Default)]
struct Written {
    pages: u32,
    records: u64,
    changes: Changes,
    error: Option<StoreError>,
}

/// Fills in what each record of a page contributes to the derived tables, counting records a
/// view cannot evaluate.
fn derive(views: &ViewSet, metrics: &Metrics, resource_type: &str, rows: &mut [PageRow]) {
    if !views.derives(resource_type) {
        return;
    }
    for row in rows {
        row.derived = views.derive(resource_type, &row.data);
        for &i in &row.derived.view_errors {
            if let Some(view) = views.for_type(resource_type).nth(i) {
                metrics.view_errors.with_label_values(&[&view.name]).inc();
            }
        }
    }
}

/// A spawned task that is aborted when its handle is dropped (a run cut off by a stop takes its
/// page writer with it; the writer's open transaction then rolls back).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl JobRunner {
    fn labels(&self) -> [&str; 2] {
        [self.account.name.as_str(), self.job.name.as_str()]
    }

    /// Runs the job once as `options` say. Stops between pages, as `interrupted`, when `stop`
    /// turns true. Records the outcome in `sync_runs` and the metrics.
    pub async fn run_once(&self, options: RunOptions, stop: &watch::Receiver<bool>) -> RunSummary {
        let started = tokio::time::Instant::now();
        let [account, job] = self.labels();
        let mut summary = RunSummary {
            account: account.to_owned(),
            job: job.to_owned(),
            outcome: Outcome::Failed,
            mode: Mode::Full,
            pages: 0,
            records: 0,
            changes: Changes::default(),
            reconciled: false,
            duration: Duration::ZERO,
            error: None,
        };
        let store = &self.shared.store;
        let now = self.shared.clock.now().unix_seconds();
        if self.shared.ownership.owned_elsewhere(account) {
            // Another agent sharing the database owns the account and runs its jobs.
            tracing::debug!(
                account,
                job,
                "the account's owner is another agent; it runs the job"
            );
            summary.outcome = Outcome::Skipped;
            summary.error = Some("the account is owned by another agent".to_owned());
            return summary;
        }
        let lease = match store
            .acquire(
                &LeaseKey::job(account, job),
                &self.shared.holder,
                now,
                JOB_LEASE_TTL,
            )
            .await
        {
            Ok(Some(lease)) => lease,
            Ok(None) => {
                summary.outcome = Outcome::Skipped;
                summary.error = Some("already running in another process".to_owned());
                self.count(&summary);
                return summary;
            }
            Err(e) => {
                summary.error = Some(e.to_string());
                self.count(&summary);
                return summary;
            }
        };
        self.set_current(Some(CurrentRun {
            lease: lease.clone(),
            run_id: None,
        }));
        let result = tokio::select! {
            r = self.run_leased(options, stop, &mut summary, &lease) => r,
            never = self.renew_lease(&lease) => match never {},
        };
        if let Err(e) = store.release(&lease).await {
            // It expires on its own within JOB_LEASE_TTL.
            tracing::warn!(account, job, error = %e, "cannot release the job lease");
        }
        self.set_current(None);
        if let Err(e) = result {
            summary.outcome = Outcome::Failed;
            summary.error = Some(e.to_string());
        }
        summary.duration = started.elapsed();
        self.count(&summary);
        match summary.outcome {
            Outcome::Success => tracing::info!(
                account,
                job,
                pages = summary.pages,
                records = summary.records,
                created = summary.changes.created,
                updated = summary.changes.updated,
                deleted = summary.changes.deleted,
                reconciled = summary.reconciled,
                duration_s = summary.duration.as_secs_f64(),
                "sync run succeeded"
            ),
            Outcome::Interrupted => tracing::warn!(
                account,
                job,
                pages = summary.pages,
                records = summary.records,
                "sync run interrupted by shutdown; the next run repeats the rest"
            ),
            _ => tracing::error!(
                account,
                job,
                pages = summary.pages,
                records = summary.records,
                error = summary.error.as_deref().unwrap_or(""),
                "sync run failed; committed pages are kept and the next run repeats the rest"
            ),
        }
        summary
    }

    /// The run proper, once the lease is held: `sync_runs` bookkeeping around [`Self::walk`].
    async fn run_leased(
        &self,
        options: RunOptions,
        stop: &watch::Receiver<bool>,
        summary: &mut RunSummary,
        lease: &Lease,
    ) -> Result<(), SyncError> {
        let [account, job] = self.labels();
        let store = &self.shared.store;
        let full = options.full;
        let start = store
            .begin_run(
                lease,
                account,
                job,
                full,
                self.shared.clock.now().unix_seconds(),
            )
            .await?;
        self.set_current(Some(CurrentRun {
            lease: lease.clone(),
            run_id: Some(start.run_id),
        }));
        if start.interrupted > 0 {
            tracing::warn!(
                account,
                job,
                runs = start.interrupted,
                "marked runs left unfinished by a stopped process as interrupted"
            );
        }
        let watermark = start.watermark.as_deref().and_then(fhir::parse_instant);
        let mut progress = Progress::default();
        let walked = self
            .walk(
                full,
                watermark,
                stop,
                &mut progress,
                summary,
                start.run_id,
                lease,
            )
            .await;
        summary.pages = progress.pages;
        summary.records = progress.records;
        summary.changes = progress.changes;
        let walked = match walked {
            Ok(true) => {
                self.reconcile(options, stop, summary, start.run_id, lease)
                    .await
            }
            other => other,
        };
        let (outcome, error) = match &walked {
            Ok(true) => (Outcome::Success, None),
            Ok(false) => (Outcome::Interrupted, None),
            Err(e) => (Outcome::Failed, Some(e.to_string())),
        };
        summary.outcome = outcome;
        summary.error = error.clone();
        // The newest record of this run; an incremental run that found nothing keeps the old
        // watermark, and one that only saw the overlap window never moves it backwards.
        let new_watermark = match (progress.newest, watermark) {
            (Some(n), Some(w)) if !full => Some(n.max(w)),
            (n, w) => n.or(w),
        }
        .map(fhir::instant);
        store
            .finish_run(
                lease,
                start.run_id,
                account,
                job,
                outcome.as_str(),
                self.shared.clock.now().unix_seconds(),
                error,
                new_watermark,
            )
            .await?;
        if outcome == Outcome::Success {
            let now = self.shared.clock.now().unix_seconds();
            let before = now.saturating_sub(
                i64::try_from(self.shared.changes_retention.as_secs()).unwrap_or(i64::MAX),
            );
            match store.prune_changes(before).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(rows = n, "pruned the change log"),
                // The next run tries again.
                Err(e) => tracing::warn!(account, job, error = %e, "cannot prune the change log"),
            }
        }
        Ok(())
    }

    /// After a completed pull: marks deleted the records the vendor no longer has, when the
    /// run saw its complete list (a whole list, a full pull, or an id sweep made now because
    /// `options.reconcile` asks for one). `Ok(false)` when stopped during the sweep; nothing
    /// is deleted then, nor when the sweep fails or would delete too much.
    async fn reconcile(
        &self,
        options: RunOptions,
        stop: &watch::Receiver<bool>,
        summary: &mut RunSummary,
        run_id: i64,
        lease: &Lease,
    ) -> Result<bool, SyncError> {
        match (&summary.mode, &self.job.kind) {
            (Mode::Whole | Mode::Full, _) => {}
            (Mode::Incremental { .. }, JobKind::Fhir { resource, .. }) if options.reconcile => {
                if !self.sweep_ids(resource, stop, run_id, lease).await? {
                    return Ok(false);
                }
            }
            _ => return Ok(true),
        }
        let [account, job] = self.labels();
        let resource_type = match &self.job.kind {
            JobKind::Fhir { resource, .. } => resource.as_str(),
            JobKind::NikohealthPatients(_) => list::RESOURCE_TYPE,
        };
        let max = (!options.force).then_some(self.job.reconcile_max_delete);
        let result = self
            .shared
            .store
            .reconcile(
                lease,
                run_id,
                account,
                resource_type,
                max,
                self.shared.clock.now().unix_seconds(),
                &self.shared.views,
            )
            .await?;
        match result {
            Reconciled::Applied { deleted, .. } => {
                summary.reconciled = true;
                summary.changes.deleted += deleted;
                self.shared
                    .metrics
                    .sync_changes
                    .with_label_values(&[account, job, ChangeKind::Deleted.as_str()])
                    .inc_by(deleted);
                Ok(true)
            }
            Reconciled::Refused { gone, live } => Err(SyncError::ReconcileRefused {
                account: account.to_owned(),
                job: job.to_owned(),
                resource_type: resource_type.to_owned(),
                gone,
                live,
                share: gone as f64 * 100.0 / (live.max(1) as f64),
                max: self.job.reconcile_max_delete * 100.0,
            }),
        }
    }

    /// Reads every id of `resource` the server holds (`_elements=id`, or whole records from a
    /// server that refuses the parameter) and marks them seen by run `run_id`. `Ok(false)`
    /// when stopped.
    async fn sweep_ids(
        &self,
        resource: &str,
        stop: &watch::Receiver<bool>,
        run_id: i64,
        lease: &Lease,
    ) -> Result<bool, SyncError> {
        let [account, job] = self.labels();
        let api_base = self.api_base()?;
        let fetcher = self.fetcher();
        let first = |elements: bool| {
            let mut url = fhir::first_url(api_base, resource, self.job.page_size, None);
            if elements {
                url.query_pairs_mut().append_pair("_elements", "id");
            }
            url
        };
        let (mut elements, mut url, mut page_no) = (true, first(true), 0u32);
        let (mut stop, mut unknown, mut seen) = (stop.clone(), 0u64, 0u64);
        let mut visited = Visited::default();
        loop {
            if *stop.borrow() {
                return Ok(false);
            }
            page_no += 1;
            visited.first_visit(&url, page_no)?;
            let page = tokio::select! {
                r = fetcher.get(&url, page_no) => r,
                _ = stop.wait_for(|s| *s) => return Ok(false),
            };
            let page = match page {
                Err(SyncError::Http { status: 400, .. }) if elements && page_no == 1 => {
                    tracing::info!(
                        account,
                        job,
                        "the server refuses _elements=id; sweeping whole records (only their ids are read)"
                    );
                    (elements, url, page_no) = (false, first(false), 0);
                    visited = Visited::default();
                    continue;
                }
                other => other?,
            };
            let read = fhir::read_page(&page.body, &page.url, api_base, resource, page_no == 1)
                .map_err(|reason| SyncError::Malformed {
                    url: page.url.to_string(),
                    page: page_no,
                    reason,
                })?;
            let ids: Vec<String> = read.rows.into_iter().map(|r| r.id).collect();
            seen += ids.len() as u64;
            unknown += self
                .shared
                .store
                .mark_seen(lease, run_id, account, resource, ids)
                .await?;
            match read.next {
                Some(next) => url = next,
                None => break,
            }
        }
        tracing::info!(
            account,
            job,
            ids = seen,
            pages = page_no,
            "swept every id the server holds"
        );
        if unknown > 0 {
            tracing::warn!(
                account,
                job,
                records = unknown,
                "the server holds records this database lacks (updated before the watermark); `ehrsync sync --full` pulls them"
            );
        }
        Ok(true)
    }

    fn api_base(&self) -> Result<&Url, SyncError> {
        self.account
            .api_base
            .as_ref()
            .ok_or_else(|| SyncError::Config {
                reason: format!("account {} has no api_base", self.account.name),
            })
    }

    fn fetcher(&self) -> Fetcher<'_> {
        Fetcher {
            http: &self.shared.http,
            account: &self.account,
            tokens: &self.tokens,
            metrics: &self.shared.metrics,
            clock: &self.shared.clock,
            token_wait: self.job.token_wait,
        }
    }

    /// Walks every page; `Ok(false)` when stopped by `stop` between pages.
    #[allow(clippy::too_many_arguments)] // the run's state, threaded through one call
    async fn walk(
        &self,
        full: bool,
        watermark: Option<DateTime<Utc>>,
        stop: &watch::Receiver<bool>,
        progress: &mut Progress,
        summary: &mut RunSummary,
        run_id: i64,
        lease: &Lease,
    ) -> Result<bool, SyncError> {
        let api_base = self.api_base()?;
        let (mut source, first) = match &self.job.kind {
            JobKind::Fhir { resource, overlap } => {
                let since = if full {
                    None
                } else {
                    watermark.map(|w| w - chrono::Duration::from_std(*overlap).unwrap_or_default())
                };
                summary.mode = match since {
                    Some(s) => Mode::Incremental {
                        since: fhir::instant(s),
                    },
                    None => Mode::Full,
                };
                (
                    Source::Fhir {
                        resource,
                        origin: api_base,
                    },
                    fhir::first_url(api_base, resource, self.job.page_size, since),
                )
            }
            JobKind::NikohealthPatients(paging) => {
                summary.mode = Mode::Whole;
                (
                    Source::List {
                        api_base,
                        paging,
                        page_size: self.job.page_size,
                        number: paging.first_page,
                        previous: None,
                    },
                    list::page_url(api_base, paging, self.job.page_size, paging.first_page),
                )
            }
        };
        let fetcher = self.fetcher();
        let [account, job] = self.labels();
        let resource_type = source.resource_type().to_owned();
        let (views, metrics) = (&self.shared.views, &self.shared.metrics);
        let derive_type = resource_type.clone();
        // The reader fetches and reads pages; the writer commits them. Up to WAITING_PAGES
        // wait between them, so later pages are fetched and read while one is written, and at
        // most WAITING_PAGES + 2 pages are in memory whatever the run's size. When the writer
        // is the slower side, it commits the pages waiting together, in one transaction.
        let (pages, mut to_write) = tokio::sync::mpsc::channel::<Vec<PageRow>>(WAITING_PAGES);
        let newest = &mut progress.newest;
        // It owns the sender: its end closes the channel.
        let reader = async move {
            let mut visited = Visited::default();
            let mut next = Some(first);
            let mut page_no = 0u32;
            let mut stop = stop.clone();
            loop {
                // A shutdown abandons the page being fetched (nothing of it is stored yet),
                // while pages already read are written.
                if *stop.borrow() {
                    return Ok(false);
                }
                let Some(url) = next.take() else {
                    return Ok(true);
                };
                page_no += 1;
                visited.first_visit(&url, page_no)?;
                let page = tokio::select! {
                    r = fetcher.get(&url, page_no) => r?,
                    _ = stop.wait_for(|s| *s) => return Ok(false),
                    // The writer failed: its error ends the run.
                    _ = pages.closed() => return Ok(false),
                };
                let mut read =
                    source
                        .read(&page.body, &page.url, page_no == 1)
                        .map_err(|reason| SyncError::Malformed {
                            url: page.url.to_string(),
                            page: page_no,
                            reason,
                        })?;
                drop(page);
                derive(views, metrics, &derive_type, &mut read.rows);
                *newest = (*newest).max(read.newest);
                next = read.next;
                if pages.send(read.rows).await.is_err() {
                    return Ok(false);
                }
            }
        };
        // A task of its own, so that reading a page (CPU work in this task) never holds up the
        // writer's next statement. It owns the receiver: a failed write closes the channel.
        let (store, metrics, clock, views) = (
            self.shared.store.clone(),
            self.shared.metrics.clone(),
            self.shared.clock.clone(),
            self.shared.views.clone(),
        );
        let (account_owned, job_owned, lease) = (account.to_owned(), job.to_owned(), lease.clone());
        let mut writer = AbortOnDrop(tokio::spawn(async move {
            let (account, job) = (account_owned.as_str(), job_owned.as_str());
            let mut done = Written::default();
            while let Some(mut rows) = to_write.recv().await {
                let mut group = 1u32;
                while group <= WAITING_PAGES as u32 {
                    match to_write.try_recv() {
                        Ok(more) => {
                            rows.extend(more);
                            group += 1;
                        }
                        Err(_) => break,
                    }
                }
                let n = rows.len() as u64;
                let at = clock.now().unix_seconds();
                let written = store
                    .commit_pages(
                        &lease,
                        run_id,
                        account,
                        &resource_type,
                        rows,
                        group,
                        at,
                        &views,
                    )
                    .await;
                let changes = match written {
                    Ok(c) => c,
                    Err(e) => {
                        done.error = Some(e);
                        return done;
                    }
                };
                done.pages += group;
                done.records += n;
                done.changes.created += changes.created;
                done.changes.updated += changes.updated;
                metrics
                    .sync_records
                    .with_label_values(&[account, job])
                    .inc_by(n);
                for (kind, k) in [
                    (ChangeKind::Created, changes.created),
                    (ChangeKind::Updated, changes.updated),
                ] {
                    metrics
                        .sync_changes
                        .with_label_values(&[account, job, kind.as_str()])
                        .inc_by(k);
                }
            }
            done
        }));
        // When the reader ends, the writer drains what was read and stops; a writer that fails
        // closes the channel from its side, which stops the reader.
        let read = reader.await;
        let done = match (&mut writer.0).await {
            Ok(done) => done,
            Err(e) => Written {
                error: Some(StoreError::Task(e.to_string())),
                ..Written::default()
            },
        };
        progress.pages = done.pages;
        progress.records = done.records;
        progress.changes = done.changes;
        if let Some(e) = done.error {
            return Err(e.into());
        }
        read
    }

    /// Renews the job lease every [`JOB_LEASE_RENEW`] while a run lasts. Never returns.
    async fn renew_lease(&self, lease: &Lease) -> std::convert::Infallible {
        let [account, job] = self.labels();
        loop {
            tokio::time::sleep(JOB_LEASE_RENEW).await;
            let now = self.shared.clock.now().unix_seconds();
            match self.shared.store.renew(lease, now, JOB_LEASE_TTL).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!(
                    account,
                    job,
                    "another process took this job's lease (this run was stalled past its expiry); its next page will not be written"
                ),
                Err(e) => tracing::warn!(account, job, error = %e, "cannot renew the job lease"),
            }
        }
    }

    fn set_current(&self, run: Option<CurrentRun>) {
        // A panic while holding this lock leaves a plain value behind.
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = run;
    }

    /// Records the run in progress as `interrupted` with `reason` and gives up its job lease:
    /// for a run task that was aborted (a stop's grace ran out). Its open transaction rolled
    /// back when the task was dropped, and fencing keeps anything still queued from committing.
    pub async fn cut_off(&self, reason: &str) {
        let [account, job] = self.labels();
        let current = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(run) = current else {
            return;
        };
        let store = &self.shared.store;
        // Lease first: once released, no write of the aborted run can commit.
        let released = store.release(&run.lease).await;
        let recorded = match run.run_id {
            Some(id) => store
                .interrupt_run(id, self.shared.clock.now().unix_seconds(), reason)
                .await
                .map(|_| ()),
            None => Ok(()),
        };
        for e in [released.err(), recorded.err()].into_iter().flatten() {
            tracing::warn!(account, job, error = %e,
                "cannot record the cut-off run; the next run of the job marks it interrupted");
        }
        self.shared
            .metrics
            .sync_runs
            .with_label_values(&[account, job, Outcome::Interrupted.as_str()])
            .inc();
    }

    /// Counts and logs an occurrence that found this job still running in this process.
    pub fn skipped(&self, due: DateTime<Utc>) {
        let [account, job] = self.labels();
        self.shared
            .metrics
            .sync_runs
            .with_label_values(&[account, job, Outcome::Skipped.as_str()])
            .inc();
        tracing::info!(account, job, due = %due, "skipped a scheduled run: the previous run is still going");
    }

    fn count(&self, summary: &RunSummary) {
        let [account, job] = self.labels();
        let m = &self.shared.metrics;
        m.sync_runs
            .with_label_values(&[account, job, summary.outcome.as_str()])
            .inc();
        if summary.outcome == Outcome::Skipped {
            return;
        }
        m.sync_duration
            .with_label_values(&[account, job])
            .observe(summary.duration.as_secs_f64());
        if summary.outcome == Outcome::Success {
            m.sync_last_success
                .with_label_values(&[account, job])
                .set(self.shared.clock.now().unix_seconds_f64());
        }
    }
}
