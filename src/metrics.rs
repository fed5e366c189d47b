//! Prometheus metrics, with the names and labels DESIGN.md §4 fixes. Labels are account and job
//! names (and fixed words such as grant or outcome) only: never secrets or patient data.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the agent exports, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub token_expiry: GaugeVec,
    pub refresh_token_expiry: GaugeVec,
    pub token_valid: IntGaugeVec,
    pub needs_login: IntGaugeVec,
    /// 1 when this agent owns the account (refreshes its tokens and runs its jobs).
    pub account_owned: IntGaugeVec,
    pub token_requests: IntCounterVec,
    pub token_request_duration: HistogramVec,
    /// How long after its planned moment a proactive refresh set out (all accounts together).
    pub token_refresh_lateness: Histogram,
    pub sync_runs: IntCounterVec,
    pub sync_records: IntCounterVec,
    /// Records created, updated and deleted by pull runs (`changes` rows written).
    pub sync_changes: IntCounterVec,
    /// Records a materialised view could not evaluate (they have no rows in it).
    pub view_errors: IntCounterVec,
    pub sync_duration: HistogramVec,
    pub sync_last_success: GaugeVec,
    pub api_requests: IntCounterVec,
    pub build_info: IntGaugeVec,
    /// Seconds between a job's schedule occurrences (for "no success in 3 intervals" alerts).
    pub sync_interval: GaugeVec,
    pub config_reloads: IntCounterVec,
    pub config_last_reload_successful: IntGauge,
    pub config_last_reload_success: Gauge,
    /// Broker requests by client, account, endpoint (`token`, `api`, `health`) and outcome.
    pub broker_requests: IntCounterVec,
    /// Token files written (outcome `written`, `write_failed`) and `on_rotate` commands run
    /// (`command_ok`, `command_failed`), by account.
    pub token_files: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &["account"]);
        let int_gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        let m = Metrics {
            token_expiry: gauge(
                "ehrsync_token_expiry_timestamp_seconds",
                "When the account's current access token expires (Unix seconds).",
            )?,
            refresh_token_expiry: gauge(
                "ehrsync_refresh_token_expiry_timestamp_seconds",
                "When the account's refresh token expires (Unix seconds), where known.",
            )?,
            token_valid: int_gauge(
                "ehrsync_token_valid",
                "1 when the account holds an unexpired access token.",
                &["account"],
            )?,
            needs_login: int_gauge(
                "ehrsync_account_needs_login",
                "1 when only a person can restore the account's access.",
                &["account"],
            )?,
            account_owned: int_gauge(
                "ehrsync_account_owned",
                "1 when this agent owns the account: it refreshes the account's tokens and runs its jobs; agents sharing a database divide the accounts.",
                &["account"],
            )?,
            token_requests: IntCounterVec::new(
                Opts::new(
                    "ehrsync_token_requests_total",
                    "Token requests by grant and outcome (success, transient_error, rejected).",
                ),
                &["account", "grant", "outcome"],
            )?,
            token_request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "ehrsync_token_request_duration_seconds",
                    "Duration of token requests.",
                )
                .buckets(vec![
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
                &["account", "grant"],
            )?,
            token_refresh_lateness: Histogram::with_opts(
                HistogramOpts::new(
                    "ehrsync_token_refresh_lateness_seconds",
                    "How long after its planned moment a proactive token refresh started.",
                )
                .buckets(vec![0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0]),
            )?,
            sync_runs: IntCounterVec::new(
                Opts::new(
                    "ehrsync_sync_runs_total",
                    "Pull runs by outcome (success, failed, skipped, interrupted).",
                ),
                &["account", "job", "outcome"],
            )?,
            sync_records: IntCounterVec::new(
                Opts::new(
                    "ehrsync_sync_records_total",
                    "Records stored by pull runs (committed pages only).",
                ),
                &["account", "job"],
            )?,
            sync_changes: IntCounterVec::new(
                Opts::new(
                    "ehrsync_sync_changes_total",
                    "Records created, updated or deleted by pull runs (kind: created, updated, deleted).",
                ),
                &["account", "job", "kind"],
            )?,
            view_errors: IntCounterVec::new(
                Opts::new(
                    "ehrsync_view_errors_total",
                    "Records a materialised SQL-on-FHIR view could not evaluate (they have no rows in it).",
                ),
                &["view"],
            )?,
            sync_duration: HistogramVec::new(
                HistogramOpts::new(
                    "ehrsync_sync_duration_seconds",
                    "Duration of pull runs that started (skipped ones excluded).",
                )
                .buckets(vec![
                    0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0,
                ]),
                &["account", "job"],
            )?,
            sync_last_success: GaugeVec::new(
                Opts::new(
                    "ehrsync_sync_last_success_timestamp_seconds",
                    "When the job's last successful run finished (Unix seconds).",
                ),
                &["account", "job"],
            )?,
            api_requests: IntCounterVec::new(
                Opts::new(
                    "ehrsync_api_requests_total",
                    "Vendor API requests by answer (2xx, 4xx, 401, 429, 5xx, error).",
                ),
                &["account", "status"],
            )?,
            build_info: int_gauge(
                "ehrsync_build_info",
                "Always 1; the version label names the running build.",
                &["version"],
            )?,
            sync_interval: GaugeVec::new(
                Opts::new(
                    "ehrsync_sync_interval_seconds",
                    "Seconds between the job's scheduled runs (the next two occurrences).",
                ),
                &["account", "job"],
            )?,
            config_reloads: IntCounterVec::new(
                Opts::new(
                    "ehrsync_config_reloads_total",
                    "Config reloads (SIGHUP) by outcome (success, failure).",
                ),
                &["outcome"],
            )?,
            config_last_reload_successful: IntGauge::new(
                "ehrsync_config_last_reload_successful",
                "1 when the config in use is the last one read (at start or on SIGHUP); 0 after a rejected reload.",
            )?,
            config_last_reload_success: Gauge::new(
                "ehrsync_config_last_reload_success_timestamp_seconds",
                "When the config in use was read (Unix seconds).",
            )?,
            broker_requests: IntCounterVec::new(
                Opts::new(
                    "ehrsync_broker_requests_total",
                    "Requests to the token broker by client, account, endpoint (token, api, health) and outcome (granted, proxied, ok, unauthorized, forbidden, bad_request, unavailable, upstream_error, too_large). Unknown clients and accounts are labelled \"\".",
                ),
                &["client", "account", "endpoint", "outcome"],
            )?,
            token_files: IntCounterVec::new(
                Opts::new(
                    "ehrsync_token_files_total",
                    "Token files written and on_rotate commands run, by account and outcome (written, write_failed, command_ok, command_failed).",
                ),
                &["account", "outcome"],
            )?,
            registry,
        };
        for c in [
            Box::new(m.token_expiry.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.refresh_token_expiry.clone()),
            Box::new(m.token_valid.clone()),
            Box::new(m.needs_login.clone()),
            Box::new(m.account_owned.clone()),
            Box::new(m.token_requests.clone()),
            Box::new(m.token_request_duration.clone()),
            Box::new(m.token_refresh_lateness.clone()),
            Box::new(m.sync_runs.clone()),
            Box::new(m.sync_records.clone()),
            Box::new(m.sync_changes.clone()),
            Box::new(m.view_errors.clone()),
            Box::new(m.sync_duration.clone()),
            Box::new(m.sync_last_success.clone()),
            Box::new(m.api_requests.clone()),
            Box::new(m.build_info.clone()),
            Box::new(m.sync_interval.clone()),
            Box::new(m.config_reloads.clone()),
            Box::new(m.config_last_reload_successful.clone()),
            Box::new(m.config_last_reload_success.clone()),
            Box::new(m.broker_requests.clone()),
            Box::new(m.token_files.clone()),
        ] {
            m.registry.register(c)?;
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Ok(m)
    }

    /// The registry in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec fails only for invalid metric names, which are fixed above.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// `ehrsync_sync_runs_total` for one outcome (for tests and the demo's status table).
    pub fn sync_runs(&self, account: &str, job: &str, outcome: &str) -> u64 {
        self.sync_runs
            .get_metric_with_label_values(&[account, job, outcome])
            .map_or(0, |c| c.get())
    }

    /// `ehrsync_sync_changes_total` for one kind.
    pub fn sync_changes(&self, account: &str, job: &str, kind: &str) -> u64 {
        self.sync_changes
            .get_metric_with_label_values(&[account, job, kind])
            .map_or(0, |c| c.get())
    }

    /// `ehrsync_api_requests_total` for one status class.
    pub fn api_requests(&self, account: &str, status: &str) -> u64 {
        self.api_requests
            .get_metric_with_label_values(&[account, status])
            .map_or(0, |c| c.get())
    }

    /// A counter's current value (for tests and the demo's status table).
    pub fn token_requests(&self, account: &str, grant: &str, outcome: &str) -> u64 {
        self.token_requests
            .get_metric_with_label_values(&[account, grant, outcome])
            .map_or(0, |c| c.get())
    }

    /// Records the outcome of reading the config at `now` (Unix seconds): at start and on reload.
    pub fn config_loaded(&self, ok: bool, now: f64, reload: bool) {
        if reload {
            self.config_reloads
                .with_label_values(&[if ok { "success" } else { "failure" }])
                .inc();
        }
        self.config_last_reload_successful.set(i64::from(ok));
        if ok {
            self.config_last_reload_success.set(now);
        }
    }

    /// Drops the gauges of an account that left the config, so that alerts on them resolve
    /// instead of firing on a value nobody updates. Counters stay: they only ever rise.
    pub fn forget_account(&self, account: &str) {
        for g in [&self.token_expiry, &self.refresh_token_expiry] {
            let _ = g.remove_label_values(&[account]);
        }
        for g in [&self.token_valid, &self.needs_login, &self.account_owned] {
            let _ = g.remove_label_values(&[account]);
        }
    }

    /// Drops the gauges of a job that left the config (see [`Metrics::forget_account`]).
    pub fn forget_job(&self, account: &str, job: &str) {
        for g in [&self.sync_last_success, &self.sync_interval] {
            let _ = g.remove_label_values(&[account, job]);
        }
    }
}
