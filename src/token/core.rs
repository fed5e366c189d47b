//! The token lifecycle of one account as a pure state machine: `(state, now, event) → (state,
//! actions)`. It owns every timing and error rule of DESIGN.md §2 and performs no I/O: the shell
//! feeds it events (a timer fired, a response arrived, an API call saw 401) with the current
//! time, and performs the [`Output`] — send this token request, persist, wake me at T.
//!
//! Rules, in one place:
//! - refresh at `issued + ratio × lifetime ± jitter × lifetime`, never later than
//!   `min(min_lead, lifetime / 2)` before expiry;
//! - prefer the refresh token while it is not expired (or about to be); otherwise log in again
//!   with the primary grant, or wait in `needs_login` when that grant needs a person;
//! - transient failures back off exponentially (full jitter, capped); 429, and 503 with a
//!   `Retry-After`, wait at least what the server states (capped);
//! - errors only a person can fix park the account in `needs_login`, retried at most once per
//!   `login_retry` — bad passwords are never retried in a loop (Azure AD locks accounts); which
//!   error descriptions mean that is vendor data (`Policy::needs_person_codes`);
//! - a failing refresh never withdraws a token that has not expired;
//! - one request at a time; a 401 forces at most one refresh per token.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::Timestamp;
use super::response::{OAuthError, TokenResponse, access_expiry, refresh_lifetime};
use crate::config::Account;
use crate::http::RetryAfter;
use crate::vendor::Grant;

/// Timing policy of one account.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The grant that logs in from nothing.
    pub grant: Grant,
    /// Lifetime assumed when a response states none.
    pub access_default: Option<Duration>,
    /// Refresh-token lifetime assumed when a response states none.
    pub refresh_default: Option<Duration>,
    pub refresh_ratio: f64,
    /// ± this fraction of the lifetime, so many accounts do not refresh in one burst.
    pub jitter_ratio: f64,
    pub min_lead: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// How often an account in `needs_login` tries its primary grant again.
    pub login_retry: Duration,
    /// The longest `Retry-After` honoured.
    pub retry_after_cap: Duration,
    /// Lifetime used when neither the response nor the preset states one.
    pub fallback_lifetime: Duration,
    /// Codes in an error answer's `error_description` that mean a person must act, whatever its
    /// `error` says (the preset's `needs_person_codes`; empty for most vendors).
    pub needs_person_codes: &'static [&'static str],
}

impl Policy {
    pub const JITTER_RATIO: f64 = 0.05;
    pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
    pub const BACKOFF_CAP: Duration = Duration::from_secs(300);
    pub const LOGIN_RETRY: Duration = Duration::from_secs(3600);
    pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);
    pub const FALLBACK_LIFETIME: Duration = Duration::from_secs(300);

    /// The design's defaults for `grant`: ratio 0.75, 60 s lead, no assumed lifetimes.
    pub fn with_defaults(grant: Grant) -> Policy {
        Policy {
            grant,
            access_default: None,
            refresh_default: None,
            refresh_ratio: 0.75,
            jitter_ratio: Self::JITTER_RATIO,
            min_lead: Duration::from_secs(60),
            backoff_base: Self::BACKOFF_BASE,
            backoff_cap: Self::BACKOFF_CAP,
            login_retry: Self::LOGIN_RETRY,
            retry_after_cap: Self::RETRY_AFTER_CAP,
            fallback_lifetime: Self::FALLBACK_LIFETIME,
            needs_person_codes: &[],
        }
    }

    pub fn for_account(account: &Account) -> Policy {
        let l = &account.lifetimes;
        Policy {
            access_default: l.access_token,
            refresh_default: l.refresh_token,
            refresh_ratio: l.refresh_ratio,
            min_lead: l.min_lead,
            needs_person_codes: account.needs_person_codes,
            ..Policy::with_defaults(account.grant)
        }
    }

    /// The longest a transient failure's `attempt`-th retry waits: `base × 2^(attempt-1)`, capped.
    pub fn backoff_ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(30));
        self.backoff_base
            .saturating_mul(factor)
            .min(self.backoff_cap)
    }
}

/// The account's current tokens.
#[derive(Clone)]
pub struct Tokens {
    pub access_token: SecretString,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    pub refresh: Option<RefreshToken>,
    /// Bumped on every new access token (a 401 names the generation it saw).
    pub generation: u64,
}

#[derive(Clone)]
pub struct RefreshToken {
    pub token: SecretString,
    pub issued_at: Timestamp,
    /// `None`: unknown, assumed alive until the server says `invalid_grant`.
    pub expires_at: Option<Timestamp>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field(
                "refresh_expires_at",
                &self.refresh.as_ref().map(|r| r.expires_at),
            )
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// A token request to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Log in with the primary grant.
    Login(Grant),
    /// Use the refresh token.
    Refresh,
}

impl Request {
    /// The `grant` label of `ehrsync_token_requests_total`.
    pub fn grant_label(self) -> &'static str {
        match self {
            Request::Login(g) => g.as_str(),
            Request::Refresh => "refresh_token",
        }
    }
}

/// What came back instead of tokens.
#[derive(Debug, Clone)]
pub enum Failure {
    /// No usable answer: connection error, timeout, HTTP 5xx or 408, or a body that is not the
    /// JSON RFC 6749 promises.
    Transient {
        kind: TransientKind,
        /// For the operator (`last_error`); never holds a secret.
        reason: String,
        /// The server's `Retry-After` (RFC 9110 §10.2.3 gives it to 503): no retry before it.
        retry_after: Option<RetryAfter>,
    },
    /// HTTP 429.
    RateLimited { retry_after: Option<RetryAfter> },
    /// An error answer (4xx) with its RFC 6749 error code.
    OAuth { status: u16, error: OAuthError },
}

impl Failure {
    /// A transient failure without a stated delay.
    pub fn transient(kind: TransientKind, reason: impl Into<String>) -> Failure {
        Failure::Transient {
            kind,
            reason: reason.into(),
            retry_after: None,
        }
    }
}

/// Why a [`Failure::Transient`] happened. The shell acts on it (a discovered endpoint that
/// refuses connections may have moved), so it is a type rather than words in the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransientKind {
    /// No connection could be opened.
    Connect,
    /// No answer within the request's deadline.
    Timeout,
    /// An HTTP status that means "try again" (5xx, 408; 404 from a discovered endpoint).
    Status(u16),
    /// An answer that is not what RFC 6749 promises (not JSON, no token, too large).
    Malformed,
    /// Anything else: an answer that broke off, an endpoint not discovered yet.
    Other,
}

/// An input to the state machine.
#[derive(Debug)]
pub enum Event {
    /// The owner started (after restoring any stored state).
    Start,
    /// A wake-up the core asked for is due.
    Timer,
    /// The request in flight returned tokens; `sent_at` is when it was sent, used as the
    /// (conservative) issue time.
    Success {
        response: TokenResponse,
        sent_at: Timestamp,
    },
    /// The request in flight failed.
    Failure(Failure),
    /// An API call made with the token of `generation` was answered 401.
    Unauthorized { generation: u64 },
    /// A reader needs a token valid longer than the one of `generation` has left (the
    /// broker's `min_valid`): refresh now, once per token.
    RefreshEarly { generation: u64 },
}

/// How a finished request counts in `ehrsync_token_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    TransientError,
    Rejected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::TransientError => "transient_error",
            Outcome::Rejected => "rejected",
        }
    }
}

/// How old a token must be before a reader's `min_valid` may have it refreshed early: a tenth
/// of its lifetime, at most a minute. A younger token is nearly as good as a new one, so a
/// `min_valid` it cannot meet is refused instead (else every new token would be refreshed at
/// once, in a loop).
pub fn early_refresh_min_age(lifetime: Duration) -> Duration {
    (lifetime / 10).min(Duration::from_secs(60))
}

/// What the shell must do after a step.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// Send this request now (at most one is ever in flight).
    pub request: Option<Request>,
    /// Deliver [`Event::Timer`] at this time (replacing any earlier wake-up); `None`: no timer.
    pub wake_at: Option<Timestamp>,
    /// The state changed in a way that must be stored before the new token is used.
    pub persist: bool,
    /// The request that just finished, and how.
    pub finished: Option<(Request, Outcome)>,
}

/// The lifecycle state, as DESIGN.md §2 names it (and `status`, the database and metrics show).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    NoToken,
    Acquiring,
    Valid,
    Refreshing,
    Retrying,
    Expired,
    NeedsLogin,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::NoToken => "no_token",
            State::Acquiring => "acquiring",
            State::Valid => "valid",
            State::Refreshing => "refreshing",
            State::Retrying => "retrying",
            State::Expired => "expired",
            State::NeedsLogin => "needs_login",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Idle,
    InFlight(Request),
    Backoff {
        until: Timestamp,
    },
    /// `retry_at: None` — only a person can help (`ehrsync login`).
    NeedsLogin {
        retry_at: Option<Timestamp>,
    },
}

/// What the core persists and restores.
#[derive(Debug, Clone)]
pub struct Saved {
    pub tokens: Option<Tokens>,
    /// The generation counter, which only moves forward: it outlives tokens that were dropped
    /// (or could not be opened), so tokens obtained next are newer than any stored before.
    pub generation: u64,
    /// The planned refresh, or (in `needs_login`) the next automatic attempt.
    pub next_refresh_at: Option<Timestamp>,
    pub needs_login: bool,
    pub last_error: Option<String>,
}

enum Class {
    /// `retry_after`: the wait the server stated, if any.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    RateLimited(Option<Duration>),
    DeadRefresh(String),
    NeedsPerson(String),
}

/// One account's token lifecycle.
pub struct Core {
    policy: Policy,
    tokens: Option<Tokens>,
    phase: Phase,
    next_refresh_at: Option<Timestamp>,
    /// Consecutive transient failures (drives the backoff).
    failures: u32,
    /// The token generation a 401 already forced a refresh for.
    forced_generation: Option<u64>,
    /// The token generation a reader's `min_valid` already refreshed early (generations only
    /// grow, so this needs no reset).
    early_generation: Option<u64>,
    generation: u64,
    last_error: Option<String>,
    /// The refresh token held was presented by a request whose answer was never read (its
    /// process died mid-request): the provider may have rotated it already.
    interrupted_refresh: bool,
    /// The state and error last handed out for storing (`None`: unknown, store at the next rest).
    stored: Option<(State, Option<String>)>,
    rng: fastrand::Rng,
}

impl Core {
    /// A core with nothing stored. `seed` drives jitter (vary it per account and process).
    pub fn new(policy: Policy, seed: u64) -> Core {
        Core {
            policy,
            tokens: None,
            phase: Phase::Idle,
            next_refresh_at: None,
            failures: 0,
            forced_generation: None,
            early_generation: None,
            generation: 0,
            last_error: None,
            interrupted_refresh: false,
            // Nothing stored is what `no_token` looks like in the database.
            stored: Some((State::NoToken, None)),
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// A core resuming from stored state.
    pub fn restore(policy: Policy, seed: u64, saved: Saved) -> Core {
        let mut core = Core::new(policy, seed);
        let stored_state = match (&saved.tokens, saved.needs_login) {
            (_, true) => State::NeedsLogin,
            (Some(_), false) => State::Valid,
            (None, false) => State::NoToken,
        };
        core.stored = Some((stored_state, saved.last_error.clone()));
        core.generation = saved
            .generation
            .max(saved.tokens.as_ref().map_or(0, |t| t.generation));
        core.tokens = saved.tokens;
        core.last_error = saved.last_error;
        if saved.needs_login {
            let retry_at = if core.policy.grant.needs_person() {
                None
            } else {
                saved.next_refresh_at
            };
            core.phase = Phase::NeedsLogin { retry_at };
        } else if let (Some(t), Some(at)) = (&core.tokens, saved.next_refresh_at) {
            // Trust a stored plan only if it still honours the lead (the policy may have changed).
            if at <= t.expires_at - core.lead(t.issued_at, t.expires_at) {
                core.next_refresh_at = Some(at);
            }
        }
        if core.next_refresh_at.is_none()
            && let Some(t) = core.tokens.clone()
        {
            core.next_refresh_at = Some(core.plan(&t));
        }
        core
    }

    pub fn snapshot(&self) -> Saved {
        let (needs_login, next) = match self.phase {
            Phase::NeedsLogin { retry_at } => (true, retry_at),
            _ => (false, self.next_refresh_at),
        };
        Saved {
            tokens: self.tokens.clone(),
            generation: self.generation,
            next_refresh_at: next,
            needs_login,
            last_error: self.last_error.clone(),
        }
    }

    /// The generation of the newest tokens this core has had (0: never any).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The tokens, if the access token has not expired at `now`.
    pub fn valid_tokens(&self, now: Timestamp) -> Option<&Tokens> {
        self.tokens.as_ref().filter(|t| now < t.expires_at)
    }

    /// The tokens held, expired or not.
    pub fn tokens(&self) -> Option<&Tokens> {
        self.tokens.as_ref()
    }

    pub fn next_refresh_at(&self) -> Option<Timestamp> {
        match self.phase {
            Phase::NeedsLogin { retry_at } => retry_at,
            _ => self.next_refresh_at,
        }
    }

    /// Why the last request failed (operator-facing; never holds a secret).
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    pub fn state(&self, now: Timestamp) -> State {
        let valid = self.valid_tokens(now).is_some();
        match self.phase {
            Phase::NeedsLogin { .. } => State::NeedsLogin,
            Phase::InFlight(_) if valid => State::Refreshing,
            Phase::InFlight(_) => State::Acquiring,
            Phase::Backoff { .. } if valid => State::Retrying,
            Phase::Idle if valid => State::Valid,
            _ if self.tokens.is_some() => State::Expired,
            Phase::Backoff { .. } => State::Retrying,
            Phase::Idle => State::NoToken,
        }
    }

    /// Advances the state machine by one event at time `now`.
    pub fn step(&mut self, now: Timestamp, event: Event) -> Output {
        let mut out = Output::default();
        match event {
            Event::Start | Event::Timer => self.tick(now, &mut out),
            Event::Success { response, sent_at } => {
                self.on_success(now, response, sent_at, &mut out)
            }
            Event::Failure(failure) => self.on_failure(now, failure, &mut out),
            Event::Unauthorized { generation } => self.on_unauthorized(now, generation, &mut out),
            Event::RefreshEarly { generation } => self.on_refresh_early(now, generation, &mut out),
        }
        self.finish(now, out)
    }

    /// Takes tokens a person obtained outside the lifecycle (`ehrsync login`): they become the
    /// account's current tokens, as if the primary grant had just returned them.
    pub fn logged_in(
        &mut self,
        now: Timestamp,
        response: TokenResponse,
        sent_at: Timestamp,
    ) -> Output {
        self.phase = Phase::InFlight(Request::Login(self.policy.grant));
        self.step(now, Event::Success { response, sent_at })
    }

    /// Takes over tokens another process stored (it held the lease and got them first, or
    /// `ehrsync login` ran). Returns `None`, changing nothing, unless they are newer than ours.
    pub fn adopt(&mut self, now: Timestamp, saved: Saved) -> Option<Output> {
        let tokens = saved.tokens.filter(|t| t.generation > self.generation)?;
        self.generation = self.generation.max(tokens.generation);
        let lead = self.lead(tokens.issued_at, tokens.expires_at);
        self.next_refresh_at = match saved.next_refresh_at {
            Some(at) if at <= tokens.expires_at - lead => Some(at),
            _ => Some(self.plan(&tokens)),
        };
        self.tokens = Some(tokens);
        self.phase = Phase::Idle;
        self.failures = 0;
        self.forced_generation = None;
        self.interrupted_refresh = false;
        self.last_error = saved.last_error;
        // What we adopt is what is stored.
        self.stored = Some((self.state(now), self.last_error.clone()));
        Some(self.finish(now, Output::default()))
    }

    /// The account's credentials changed since they were refused (an operator fixed a secret):
    /// an account parked in `needs_login` that logs in without a person tries once, at once.
    /// A second refusal parks it for `login_retry` again, so this never becomes a loop of
    /// attempts with the same credentials. `None`, changing nothing, in any other state.
    pub fn credentials_changed(&mut self, now: Timestamp) -> Option<Output> {
        match self.phase {
            Phase::NeedsLogin { retry_at: Some(_) } => {
                self.phase = Phase::NeedsLogin {
                    retry_at: Some(now),
                };
                Some(self.finish(now, Output::default()))
            }
            _ => None,
        }
    }

    /// The refresh token held was sent by a request whose answer nobody read: another process
    /// died mid-request (found through the durable intent it wrote before sending). The
    /// provider may already have rotated it, and presenting a rotated refresh token revokes the
    /// whole grant at many providers. Call while a request is in flight; returns the request to
    /// make instead:
    /// - a grant that logs in without a person (password, client credentials) logs in again
    ///   rather than present a refresh token that may be dead;
    /// - a person's grant tries its refresh token once; if that is refused, the account goes to
    ///   `needs_login` saying why.
    pub fn refresh_interrupted(&mut self, now: Timestamp) -> Option<Request> {
        let Phase::InFlight(Request::Refresh) = self.phase else {
            return None;
        };
        if self.policy.grant.needs_person() {
            self.interrupted_refresh = true;
            return Some(Request::Refresh);
        }
        if let Some(t) = &mut self.tokens {
            t.refresh = None;
        }
        let mut out = Output::default();
        self.send_next(now, &mut out);
        out.request
    }

    /// The common end of every step: decide what to store and when to wake.
    fn finish(&mut self, now: Timestamp, mut out: Output) -> Output {
        // Store what an operator would see change (tokens are flagged where they change). The
        // state is compared at rest, not mid-request, so the thousandth identical retry of an
        // outage costs no disk write.
        if !matches!(self.phase, Phase::InFlight(_)) {
            let at_rest = (self.state(now), self.last_error.clone());
            out.persist |= self.stored.as_ref() != Some(&at_rest);
        }
        if out.persist {
            self.stored = Some((self.state(now), self.last_error.clone()));
        }
        out.wake_at = match self.phase {
            Phase::Idle => self.next_refresh_at,
            Phase::InFlight(_) => None,
            Phase::Backoff { until } => Some(until),
            Phase::NeedsLogin { retry_at } => retry_at,
        };
        out
    }

    fn tick(&mut self, now: Timestamp, out: &mut Output) {
        let due = match self.phase {
            Phase::InFlight(_) => false,
            Phase::NeedsLogin { retry_at } => retry_at.is_some_and(|t| now >= t),
            Phase::Backoff { until } => now >= until,
            Phase::Idle => match (&self.tokens, self.next_refresh_at) {
                (Some(_), Some(at)) => now >= at,
                _ => true,
            },
        };
        if due {
            self.send_next(now, out);
        }
    }

    /// Sends the request the situation calls for, or parks the account when none can help.
    /// Whether the refresh token held can still be used at `now`: "expired or about to" is
    /// within half the lead of its expiry, where it may die in flight. (Half, so that the
    /// refresh `plan` schedules a full lead before its death still uses it.)
    fn refresh_usable(&self, now: Timestamp) -> bool {
        let margin = self.policy.min_lead / 2;
        self.tokens
            .as_ref()
            .and_then(|t| t.refresh.as_ref())
            .is_some_and(|r| r.expires_at.is_none_or(|exp| now + margin < exp))
    }

    fn send_next(&mut self, now: Timestamp, out: &mut Output) {
        let usable_refresh = self.refresh_usable(now);
        let request = if usable_refresh {
            Request::Refresh
        } else if !self.policy.grant.needs_person() {
            Request::Login(self.policy.grant)
        } else {
            let had_refresh = self.tokens.as_ref().is_some_and(|t| t.refresh.is_some());
            self.last_error = Some(if had_refresh {
                "the refresh token has expired; a person must log in again (`ehrsync login`)"
                    .to_owned()
            } else {
                "no refresh token; a person must log in (`ehrsync login`)".to_owned()
            });
            self.phase = Phase::NeedsLogin { retry_at: None };
            out.persist = true;
            return;
        };
        self.phase = Phase::InFlight(request);
        out.request = Some(request);
    }

    fn on_success(
        &mut self,
        now: Timestamp,
        response: TokenResponse,
        sent_at: Timestamp,
        out: &mut Output,
    ) {
        let Phase::InFlight(request) = self.phase else {
            return; // no request of ours is in flight: a stray answer changes nothing
        };
        let expiry = access_expiry(
            &response,
            response.access_token.expose_secret(),
            sent_at,
            self.policy.access_default,
            self.policy.fallback_lifetime,
        );
        let refresh_life = refresh_lifetime(&response);
        let refresh = match response.refresh_token {
            Some(token) => Some(RefreshToken {
                token,
                issued_at: sent_at,
                // A lifetime we cannot believe is unknown: the token is kept all the same.
                expires_at: refresh_life
                    .as_ref()
                    .ok()
                    .copied()
                    .flatten()
                    .or(self.policy.refresh_default)
                    .map(|d| sent_at + d),
            }),
            // "A response without a new refresh token keeps the old one and its old expiry."
            None => self.tokens.take().and_then(|t| t.refresh),
        };
        // Whatever is wrong with the access token, a rotated refresh token is the only one the
        // provider will accept from now on: it is kept and stored before anything else.
        let problem = match (&expiry, &refresh_life) {
            (Err(e), _) | (Ok(_), Err(e)) => Some(e.clone()),
            (Ok((at, _)), Ok(_)) if *at <= now => Some(format!(
                "the token endpoint returned a token that expired at {at}, before it arrived; check the system clock"
            )),
            _ => None,
        };
        self.generation += 1;
        let tokens = Tokens {
            access_token: response.access_token,
            issued_at: sent_at,
            // An access token that cannot be trusted is held as already expired: never handed
            // out, while its refresh token is used next.
            expires_at: match (&problem, expiry) {
                (None, Ok((at, _))) => at,
                _ => sent_at.min(now),
            },
            refresh,
            generation: self.generation,
        };
        self.next_refresh_at = Some(self.plan(&tokens));
        self.tokens = Some(tokens);
        self.interrupted_refresh = false;
        self.forced_generation = None;
        out.persist = true;
        if let Some(reason) = problem {
            let failure = Failure::transient(TransientKind::Malformed, reason);
            return self.fail(now, request, failure, out);
        }
        self.phase = Phase::Idle;
        self.failures = 0;
        self.last_error = None;
        out.finished = Some((request, Outcome::Success));
    }

    fn on_failure(&mut self, now: Timestamp, failure: Failure, out: &mut Output) {
        let Phase::InFlight(request) = self.phase else {
            return;
        };
        self.fail(now, request, failure, out);
    }

    fn fail(&mut self, now: Timestamp, request: Request, failure: Failure, out: &mut Output) {
        match self.classify(now, request, failure) {
            Class::Transient {
                reason,
                retry_after,
            } => {
                self.failures = self.failures.saturating_add(1);
                let delay = match retry_after {
                    Some(d) => self.stated_delay(d),
                    None => self.backoff(),
                };
                // The stated wait, not the delay: repeats of one outage then read the same and
                // are not stored again.
                self.last_error = Some(match retry_after {
                    Some(d) => format!(
                        "{reason}; it asks to wait {} (Retry-After)",
                        humantime::format_duration(Duration::from_secs(d.as_secs()))
                    ),
                    None => reason,
                });
                self.phase = Phase::Backoff { until: now + delay };
                out.finished = Some((request, Outcome::TransientError));
            }
            Class::RateLimited(retry_after) => {
                self.failures = self.failures.saturating_add(1);
                let delay = match retry_after {
                    Some(d) => self.stated_delay(d),
                    None => self.backoff(),
                };
                self.last_error = Some(format!(
                    "the token endpoint is rate limiting (HTTP 429); next try in {}",
                    humantime::format_duration(Duration::from_secs(delay.as_secs()))
                ));
                self.phase = Phase::Backoff { until: now + delay };
                out.finished = Some((request, Outcome::TransientError));
            }
            Class::DeadRefresh(reason) => {
                out.finished = Some((request, Outcome::Rejected));
                if let Some(t) = &mut self.tokens {
                    t.refresh = None;
                    out.persist = true;
                }
                self.failures = 0;
                let interrupted = std::mem::take(&mut self.interrupted_refresh);
                // Straight to the primary grant (or to needs_login when it needs a person).
                self.send_next(now, out);
                self.last_error = Some(match self.phase {
                    Phase::NeedsLogin { .. } if interrupted => format!(
                        "{reason}, after an earlier refresh was cut short (its process stopped while the request was in flight, so the provider may have rotated the token without ehrsync receiving the new one); a person must log in again (`ehrsync login`)"
                    ),
                    Phase::NeedsLogin { .. } => {
                        format!("{reason}; a person must log in again (`ehrsync login`)")
                    }
                    _ => reason,
                });
            }
            Class::NeedsPerson(reason) => {
                out.finished = Some((request, Outcome::Rejected));
                self.failures = 0;
                self.last_error = Some(reason);
                let retry_at =
                    (!self.policy.grant.needs_person()).then(|| now + self.policy.login_retry);
                self.phase = Phase::NeedsLogin { retry_at };
            }
        }
    }

    fn on_unauthorized(&mut self, now: Timestamp, generation: u64, out: &mut Output) {
        let current = self
            .tokens
            .as_ref()
            .is_some_and(|t| t.generation == generation);
        let busy = matches!(self.phase, Phase::InFlight(_) | Phase::NeedsLogin { .. });
        if !current || busy || self.forced_generation == Some(generation) {
            return;
        }
        self.forced_generation = Some(generation);
        self.send_next(now, out);
    }

    /// Like [`Core::on_unauthorized`], but the token still works: one early refresh per
    /// generation, none for a token younger than [`early_refresh_min_age`] (a refresh would
    /// not give more), and none while a request is in flight, failures are being retried, or
    /// the account needs a person (readers wait for what that brings).
    fn on_refresh_early(&mut self, now: Timestamp, generation: u64, out: &mut Output) {
        let current = self.tokens.as_ref().is_some_and(|t| {
            let lifetime = t.expires_at.since(t.issued_at);
            t.generation == generation && now.since(t.issued_at) >= early_refresh_min_age(lifetime)
        });
        let busy = !matches!(self.phase, Phase::Idle) || self.failures > 0;
        // Without a usable refresh token, a person's grant could only end in `needs_login`:
        // a reader's wish for a longer token must never park an account whose token works.
        let obtainable = self.refresh_usable(now) || !self.policy.grant.needs_person();
        if !current || busy || !obtainable || self.early_generation == Some(generation) {
            return;
        }
        self.early_generation = Some(generation);
        self.send_next(now, out);
    }

    fn classify(&self, now: Timestamp, request: Request, failure: Failure) -> Class {
        match failure {
            Failure::Transient {
                reason,
                retry_after,
                kind: _,
            } => Class::Transient {
                reason,
                retry_after: retry_after.map(|r| r.wait(now)),
            },
            Failure::RateLimited { retry_after } => {
                Class::RateLimited(retry_after.map(|r| r.wait(now)))
            }
            Failure::OAuth { status, error } => {
                let described = match &error.description {
                    Some(d) => format!("{} ({d})", error.error),
                    None => error.error.clone(),
                };
                let person_code = error.description.as_deref().is_some_and(|d| {
                    self.policy
                        .needs_person_codes
                        .iter()
                        .any(|code| d.contains(code))
                });
                if status >= 500
                    || matches!(
                        error.error.as_str(),
                        "temporarily_unavailable" | "server_error"
                    )
                {
                    Class::Transient {
                        reason: format!("the token endpoint failed (HTTP {status}): {described}"),
                        retry_after: None,
                    }
                } else if person_code {
                    Class::NeedsPerson(format!(
                        "the token endpoint refused: {described}; a person must fix the account"
                    ))
                } else if error.error == "invalid_grant" && request == Request::Refresh {
                    Class::DeadRefresh(format!("the refresh token was refused: {described}"))
                } else {
                    Class::NeedsPerson(format!(
                        "the token endpoint refused the {} request (HTTP {status}): {described}",
                        request.grant_label()
                    ))
                }
            }
        }
    }

    /// A full-jitter delay for the current failure count: uniform in `[0, ceiling]`.
    fn backoff(&mut self) -> Duration {
        let ceiling = self.policy.backoff_ceiling(self.failures);
        ceiling.mul_f64(self.rng.f64())
    }

    /// The wait before retrying after a server stated `stated`: at least that (asking earlier
    /// is asking to be refused again), at most `retry_after_cap` (a misconfigured server could
    /// otherwise park the account for years), and never less than the backoff, so a server
    /// repeating `Retry-After: 0` is not asked again in a tight loop.
    fn stated_delay(&mut self, stated: Duration) -> Duration {
        stated.min(self.policy.retry_after_cap).max(self.backoff())
    }

    /// How long before expiry a refresh must happen, for a token of this lifetime.
    fn lead(&self, issued: Timestamp, expires: Timestamp) -> Duration {
        self.policy.min_lead.min(expires.since(issued) / 2)
    }

    /// When to refresh `t`: `ratio × lifetime ± jitter`, at least `lead` before expiry; for a
    /// grant that needs a person, also before the refresh token dies (so it can rotate).
    fn plan(&mut self, t: &Tokens) -> Timestamp {
        let life = t.expires_at.since(t.issued_at);
        let jitter = self
            .policy
            .jitter_ratio
            .min(self.policy.refresh_ratio / 2.0);
        let fraction = self.policy.refresh_ratio + jitter * (self.rng.f64() * 2.0 - 1.0);
        let mut at = (t.issued_at + life.mul_f64(fraction))
            .min(t.expires_at - self.lead(t.issued_at, t.expires_at));
        if self.policy.grant.needs_person()
            && let Some(rt_exp) = t.refresh.as_ref().and_then(|r| r.expires_at)
        {
            let before_death = rt_exp - self.policy.min_lead.min(rt_exp.since(t.issued_at) / 2);
            // Only while it is still ahead: a refresh token that does not rotate will die,
            // and refreshing it in a loop would not save it.
            if before_death > t.issued_at {
                at = at.min(before_death);
            }
        }
        at.max(t.issued_at)
    }
}

#[cfg(test)]
mod tests;
