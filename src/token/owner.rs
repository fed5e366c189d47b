//! The I/O shell around one account's lifecycle [`Core`]: a tokio task that performs the core's
//! [`Output`] — sends the token request, stores the new state (sealed) before anyone can use
//! it, publishes it to readers, sleeps until the next wake-up — and feeds results back in.
//!
//! Readers hold a [`TokenHandle`]: they get the current token without waiting unless none is
//! valid, and report a 401 with the token generation they used. Only the owner ever sends a
//! token request, one at a time, so concurrent readers never cause two.

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{mpsc, watch};

use super::Timestamp;
use super::client::{GrantForm, TokenTarget, request_token};
use super::core::{Core, Event, Failure, Output, Policy, State};
use super::persist::{credentials_fingerprint, from_record, to_record};
use crate::clock::SharedClock;
use crate::config::{Account, TokenEndpoint};
use crate::crypto::TokenCipher;
use crate::metrics::Metrics;
use crate::oidc::Discovery;
use crate::store::{Holder, Lease, LeaseKey, Store, TokenRecord};

/// How long a token lease lasts: longer than any token request (30 s timeout) plus storing it.
/// A holder on this host whose process is gone is taken over at once; one elsewhere (paused,
/// cut off, powered off) delays others by at most this.
pub const LEASE_TTL: Duration = Duration::from_secs(45);
/// How often a process waiting for another's lease looks for the tokens it stores.
const LEASE_POLL: Duration = Duration::from_millis(500);
/// How often an account in `needs_login` looks for tokens stored by `ehrsync login` (or by another
/// process), so it recovers without a restart.
pub const NEEDS_LOGIN_POLL: Duration = Duration::from_secs(5);

/// What every account's owner in this process shares.
#[derive(Clone)]
pub struct Shared {
    pub store: Store,
    pub cipher: Arc<TokenCipher>,
    pub http: reqwest::Client,
    pub clock: SharedClock,
    pub metrics: Metrics,
    /// This process as a lease holder (`token_leases`, `job_leases`): unique per process run.
    pub holder: Arc<Holder>,
    /// OpenID provider metadata, shared by the accounts of one provider.
    pub discovery: Arc<Discovery>,
    /// The command line an operator runs to log in again, up to the account name
    /// (`ehrsync --config /etc/ehrsync/ehrsync.toml login`): logged when an account needs it.
    pub login_command: Arc<str>,
    /// Which accounts this process owns among agents sharing the database (off unless an
    /// agent divides the work: see [`super::ownership`]).
    pub ownership: Arc<super::ownership::Ownership>,
}

impl Shared {
    pub fn new(
        store: Store,
        cipher: TokenCipher,
        http: reqwest::Client,
        clock: SharedClock,
        metrics: Metrics,
    ) -> Shared {
        let discovery = Discovery::new(http.clone(), Some(store.clone()), clock.clone());
        Shared {
            store,
            cipher: Arc::new(cipher),
            http,
            clock,
            metrics,
            holder: Arc::new(Holder::this_process()),
            discovery: Arc::new(discovery),
            login_command: "ehrsync login".into(),
            ownership: Arc::default(),
        }
    }

    /// Names the config file in the login command logged for accounts that need a person.
    pub fn with_config_path(mut self, path: &std::path::Path) -> Shared {
        self.login_command = crate::config::login_command(path).into();
        self
    }
}

/// What came of waiting for the account's token lease.
enum Taken {
    /// This process holds the lease: send the request. `interrupted`: the stored state says a
    /// refresh presenting our refresh token was sent by a process that died before storing
    /// its answer.
    Proceed { interrupted: bool },
    /// Another process stored newer tokens meanwhile: no request is needed.
    Adopted(super::core::Saved),
}

/// An access token as readers receive it.
#[derive(Clone)]
pub struct CurrentToken {
    pub access_token: SecretString,
    /// Report this with [`TokenHandle::unauthorized`] when the API answers 401.
    pub generation: u64,
    /// When the token was obtained (its request was sent): with `expires_at`, its lifetime.
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
}

impl std::fmt::Debug for CurrentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CurrentToken([redacted], generation {}, expires {})",
            self.generation, self.expires_at
        )
    }
}

/// The account's state as last published by its owner.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub state: State,
    pub token: Option<CurrentToken>,
    pub next_refresh_at: Option<Timestamp>,
    pub refresh_expires_at: Option<Timestamp>,
    pub last_error: Option<String>,
}

/// Why no token can be handed out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("the account needs a person: {0}")]
    NeedsLogin(String),
    #[error("the account's token owner has stopped")]
    Stopped,
}

/// Why no token valid long enough can be handed out ([`TokenHandle::token_valid_for`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    Unavailable(Unavailable),
    /// The current token is too young to be refreshed early and has less left than was asked
    /// for, or the account's tokens live less than that at all: no refresh can help now.
    LongerThanLifetime {
        lifetime: Duration,
    },
}

/// What a reader asks of the owner.
#[derive(Debug, Clone, Copy)]
enum Ask {
    /// The API answered 401 to the token of this generation.
    Unauthorized(u64),
    /// A reader needs a token valid longer than this generation's has left.
    RefreshEarly(u64),
}

/// A reader's handle on one account's tokens. Cheap to clone.
#[derive(Clone)]
pub struct TokenHandle {
    account: String,
    clock: SharedClock,
    snapshot: watch::Receiver<Snapshot>,
    asks: mpsc::UnboundedSender<Ask>,
}

impl TokenHandle {
    pub fn account(&self) -> &str {
        &self.account
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.borrow().clone()
    }

    /// The owner's published state, to follow every change (token files do).
    pub fn watch(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.clone()
    }

    /// A token valid for at least `min_valid` more: the current one when it is, else the next
    /// after asking the owner to refresh early — once per token, however many readers ask, so
    /// readers never cause more than one extra request per token. A `min_valid` longer than
    /// the tokens' whole lifetime, or more than a token too young to be refreshed early has
    /// left ([`super::core::early_refresh_min_age`]), cannot be met and is refused at once. Waits for as long as
    /// the owner needs, so callers bound it with a timeout.
    pub async fn token_valid_for(&self, min_valid: Duration) -> Result<CurrentToken, Wanted> {
        let mut rx = self.snapshot.clone();
        loop {
            {
                let s = rx.borrow_and_update();
                let now = self.clock.now();
                if let Some(t) = s.token.as_ref().filter(|t| now < t.expires_at) {
                    if t.expires_at.since(now) >= min_valid {
                        return Ok(t.clone());
                    }
                    let lifetime = t.expires_at.since(t.issued_at);
                    let young =
                        now.since(t.issued_at) < super::core::early_refresh_min_age(lifetime);
                    if lifetime < min_valid || young {
                        return Err(Wanted::LongerThanLifetime { lifetime });
                    }
                    // The owner has stopped if this fails; `changed` below says so.
                    let _ = self.asks.send(Ask::RefreshEarly(t.generation));
                } else if s.state == State::NeedsLogin {
                    return Err(Wanted::Unavailable(Unavailable::NeedsLogin(
                        s.last_error.clone().unwrap_or_default(),
                    )));
                }
            }
            rx.changed()
                .await
                .map_err(|_| Wanted::Unavailable(Unavailable::Stopped))?;
        }
    }

    /// A valid access token: at once when one is held, else after the owner obtains one.
    pub async fn token(&self) -> Result<CurrentToken, Unavailable> {
        let mut rx = self.snapshot.clone();
        loop {
            {
                let s = rx.borrow_and_update();
                if let Some(t) = s.token.as_ref().filter(|t| self.clock.now() < t.expires_at) {
                    return Ok(t.clone());
                }
                if s.state == State::NeedsLogin {
                    return Err(Unavailable::NeedsLogin(
                        s.last_error.clone().unwrap_or_default(),
                    ));
                }
            }
            rx.changed().await.map_err(|_| Unavailable::Stopped)?;
        }
    }

    /// A valid access token of another generation than `generation`: what an API caller waits
    /// for after reporting a 401 with [`TokenHandle::unauthorized`]. Waits for as long as the
    /// owner needs, so callers bound it with a timeout.
    pub async fn token_after(&self, generation: u64) -> Result<CurrentToken, Unavailable> {
        let mut rx = self.snapshot.clone();
        loop {
            {
                let s = rx.borrow_and_update();
                let fresh = s
                    .token
                    .as_ref()
                    .filter(|t| t.generation != generation && self.clock.now() < t.expires_at);
                if let Some(t) = fresh {
                    return Ok(t.clone());
                }
                if s.state == State::NeedsLogin {
                    return Err(Unavailable::NeedsLogin(
                        s.last_error.clone().unwrap_or_default(),
                    ));
                }
            }
            rx.changed().await.map_err(|_| Unavailable::Stopped)?;
        }
    }

    /// Reports that the API refused the token of `generation` (HTTP 401). The owner refreshes
    /// once per token; reports about an older token are ignored.
    pub fn unauthorized(&self, generation: u64) {
        // The owner has stopped if this fails; there is nobody left to tell.
        let _ = self.asks.send(Ask::Unauthorized(generation));
    }
}

/// Starts the owner of `account`'s tokens. It runs until `shutdown` turns true.
pub async fn spawn(
    account: Arc<Account>,
    shared: Shared,
    shutdown: watch::Receiver<bool>,
) -> Result<(TokenHandle, tokio::task::JoinHandle<()>), crate::store::StoreError> {
    let name = account.name.to_string();
    let (mut core, stored_credentials) = stored_core(&shared, &account).await?;
    let fingerprint = credentials_fingerprint(&account, &shared.cipher);
    let now = shared.clock.now();
    if stored_credentials.is_some_and(|f| f != fingerprint)
        && core.credentials_changed(now).is_some()
    {
        tracing::info!(account = %name,
            "the account's credentials changed since they were refused; trying them once, now");
    }
    let (snap_tx, snap_rx) = watch::channel(snapshot(&core, now));
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let handle = TokenHandle {
        account: name,
        clock: shared.clock.clone(),
        snapshot: snap_rx,
        asks: cmd_tx,
    };
    let owner = Owner {
        account,
        shared,
        core,
        target: None,
        rediscover: false,
        published: snap_tx,
        asks: cmd_rx,
        lease: None,
        unopenable_warned: None,
        fingerprint,
    };
    let task = tokio::spawn(owner.run(shutdown));
    Ok((handle, task))
}

/// `account`'s lifecycle core as stored (or a fresh one when nothing is), and the fingerprint of
/// the credentials it was stored with.
async fn stored_core(
    shared: &Shared,
    account: &Account,
) -> Result<(Core, Option<String>), crate::store::StoreError> {
    let name = account.name.as_str();
    let (policy, seed) = (Policy::for_account(account), seed_for(name));
    Ok(match shared.store.load_token(name).await? {
        Some(mut record) => {
            let credentials = record.credentials.take();
            let (saved, problem) = from_record(record, &shared.cipher);
            if let Some(e) = problem {
                tracing::warn!(account = name, error = %e, "stored tokens are unusable; logging in again");
            }
            (Core::restore(policy, seed, saved), credentials)
        }
        None => (Core::new(policy, seed), None),
    })
}

/// Jitter must differ between accounts and between processes: hash the name, add OS randomness.
fn seed_for(name: &str) -> u64 {
    let mut seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    if let Ok(r) = getrandom::u64() {
        seed ^= r;
    }
    seed
}

fn snapshot(core: &Core, now: Timestamp) -> Snapshot {
    let tokens = core.tokens();
    Snapshot {
        state: core.state(now),
        token: tokens.map(|t| CurrentToken {
            access_token: t.access_token.clone(),
            generation: t.generation,
            issued_at: t.issued_at,
            expires_at: t.expires_at,
        }),
        next_refresh_at: core.next_refresh_at(),
        refresh_expires_at: tokens
            .and_then(|t| t.refresh.as_ref())
            .and_then(|r| r.expires_at),
        last_error: core.last_error().map(str::to_owned),
    }
}

struct Owner {
    account: Arc<Account>,
    shared: Shared,
    core: Core,
    /// Where token requests go, once resolved (discovery may be needed).
    target: Option<TokenTarget>,
    /// The last request to a discovered endpoint failed as if it had moved: discover again.
    rediscover: bool,
    published: watch::Sender<Snapshot>,
    asks: mpsc::UnboundedReceiver<Ask>,
    /// The account's token lease while this owner holds it (from taking it until the answer
    /// to its request is stored).
    lease: Option<Lease>,
    /// The stored generation whose tokens could not be opened, once said (not every poll).
    unopenable_warned: Option<i64>,
    /// [`credentials_fingerprint`] of the account's credentials in use, stored with its state.
    fingerprint: String,
}

impl Owner {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let name = self.account.name.to_string();
        let mut out = self.core.step(self.shared.clock.now(), Event::Start);
        // How late the proactive refresh in flight set out (for its log line).
        let mut late: Option<Duration> = None;
        loop {
            self.apply(&out, late).await;
            if out.finished.is_some() {
                late = None;
            }
            if self.lease.is_some() {
                self.release_lease().await;
            }
            if *shutdown.borrow() {
                return;
            }
            if let Some(request) = out.request {
                // Waiting for the lease is abandoned on a stop; a request once sent is not.
                let taken = tokio::select! {
                    taken = self.take_lease() => taken,
                    _ = shutdown.changed() => {
                        if self.lease.is_some() {
                            self.release_lease().await;
                        }
                        return;
                    }
                };
                out = match taken {
                    Taken::Adopted(saved) => {
                        late = None;
                        tracing::debug!(account = %name, "adopted tokens another process stored");
                        self.core
                            .adopt(self.shared.clock.now(), saved)
                            .unwrap_or_default()
                    }
                    Taken::Proceed { interrupted } => self.request(request, interrupted).await,
                };
                continue;
            }
            let now = self.shared.clock.now();
            let sleep = out.wake_at.map(|t| t.since(now));
            let parked = self.core.state(now) == State::NeedsLogin;
            tokio::select! {
                _ = sleep_or_forever(sleep) => {
                    let now = self.shared.clock.now();
                    let planned = self.core.next_refresh_at().filter(|_| self.core.state(now) == State::Valid);
                    out = self.core.step(now, Event::Timer);
                    late = planned.filter(|_| out.request.is_some()).map(|at| now.since(at));
                    if let Some(late) = late {
                        self.shared.metrics.token_refresh_lateness.observe(late.as_secs_f64());
                    }
                }
                _ = sleep_or_forever(parked.then_some(NEEDS_LOGIN_POLL)) => {
                    let adopted = match self.newer_stored().await {
                        Some(saved) => self.core.adopt(self.shared.clock.now(), saved),
                        None => None,
                    };
                    out = match adopted {
                        Some(o) => {
                            tracing::info!(account = %name, "picked up tokens from a login; the account is back in service");
                            o
                        }
                        None => match self.secret_files_changed() {
                            Some(o) => {
                                tracing::info!(account = %name,
                                    "a secret file of the account changed since its credentials were refused; trying them once, now");
                                o
                            }
                            // Nothing new: keep the planned wake-up, report nothing twice.
                            None => Output { wake_at: out.wake_at, ..Output::default() },
                        },
                    };
                }
                ask = self.asks.recv() => match ask {
                    Some(Ask::Unauthorized(generation)) => {
                        out = self.core.step(self.shared.clock.now(), Event::Unauthorized { generation });
                    }
                    Some(Ask::RefreshEarly(generation)) => {
                        out = self.core.step(self.shared.clock.now(), Event::RefreshEarly { generation });
                    }
                    // Every handle is gone: nobody needs this account's tokens any more.
                    None => return,
                },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Records, stores and publishes what a step produced.
    async fn apply(&mut self, out: &Output, late: Option<Duration>) {
        let name = self.account.name.as_str();
        let now = self.shared.clock.now();
        if let Some((request, outcome)) = out.finished {
            self.shared
                .metrics
                .token_requests
                .with_label_values(&[name, request.grant_label(), outcome.as_str()])
                .inc();
            match outcome {
                super::core::Outcome::Success => {
                    let expires = self
                        .core
                        .tokens()
                        .map(|t| t.expires_at.to_string())
                        .unwrap_or_default();
                    let late_ms = late.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                    tracing::info!(account = name, grant = request.grant_label(), expires = %expires, late_ms, "obtained a new access token");
                }
                _ => tracing::warn!(
                    account = name,
                    grant = request.grant_label(),
                    outcome = outcome.as_str(),
                    error = self.core.last_error().unwrap_or(""),
                    "token request failed"
                ),
            }
        }
        if out.persist {
            match to_record(name, &self.core, now, &self.shared.cipher) {
                Ok(mut record) => {
                    record.credentials = Some(self.fingerprint.clone());
                    let store = self.shared.store.clone();
                    let lease = self.lease.clone();
                    match crate::store::shielded(async move {
                        store.save_token(&record, lease.as_ref()).await
                    })
                    .await
                    {
                        Ok(true) => {}
                        Ok(false) => tracing::warn!(
                            account = name,
                            "did not store the token state: another process stored newer tokens, or took the token lease over"
                        ),
                        Err(e) => tracing::error!(account = name, error = %e,
                            "cannot store the token state; it is kept in memory"),
                    }
                }
                Err(e) => {
                    tracing::error!(account = name, error = %e, "cannot seal the token state")
                }
            }
        }
        let snap = snapshot(&self.core, now);
        if snap.state == State::NeedsLogin && self.published.borrow().state != State::NeedsLogin {
            let command = format!("{} {name}", self.shared.login_command);
            let reason = snap.last_error.as_deref().unwrap_or("");
            if self.account.grant.needs_person() {
                tracing::error!(
                    account = name,
                    reason,
                    command = %command,
                    "the account needs a person to log in: run `{command}`"
                );
            } else {
                tracing::error!(
                    account = name,
                    reason,
                    command = %command,
                    "the account's credentials were refused; fix them in the config or their secret file: changed credentials are tried at once (at a reload, a restart, or when the secret file changes); the same ones again in an hour. `{command}` tries at once"
                );
            }
        }
        self.update_gauges(&snap, now);
        self.published.send_replace(snap);
    }

    fn update_gauges(&self, snap: &Snapshot, now: Timestamp) {
        let name = self.account.name.as_str();
        let m = &self.shared.metrics;
        let secs = Timestamp::unix_seconds_f64;
        if let Some(t) = &snap.token {
            m.token_expiry
                .with_label_values(&[name])
                .set(secs(t.expires_at));
        }
        if let Some(r) = snap.refresh_expires_at {
            m.refresh_token_expiry
                .with_label_values(&[name])
                .set(secs(r));
        }
        let valid = snap.token.as_ref().is_some_and(|t| now < t.expires_at);
        m.token_valid
            .with_label_values(&[name])
            .set(i64::from(valid));
        m.needs_login
            .with_label_values(&[name])
            .set(i64::from(snap.state == State::NeedsLogin));
    }

    /// Waits until this process holds the account's token lease, unless another process
    /// stores newer tokens first (then those are adopted and no request is made). While
    /// another agent owns the account, this one only follows what that owner stores.
    async fn take_lease(&mut self) -> Taken {
        let name = self.account.name.to_string();
        let key = LeaseKey::token(&name);
        let mut ownership = self.shared.ownership.subscribe();
        loop {
            let now = self.shared.clock.now().unix_seconds();
            if !self.shared.ownership.may_request(&name, now) {
                // Another agent owns the account (or this one's ownership lapsed, say while
                // it was paused, and is being looked at again): it refreshes and stores.
                let record = self.stored_record().await;
                let plan = record.as_ref().and_then(|r| r.next_refresh_at);
                if let Some(saved) = record.and_then(|r| self.newer(r)) {
                    return Taken::Adopted(saved);
                }
                // Until the owner's plan, then as often as while waiting for a lease. An owner
                // late with its refresh may be gone: the claimer looks now, not at its round.
                let wait = match plan {
                    Some(at) if at > now => {
                        Duration::from_secs(u64::try_from(at - now).unwrap_or(0) + 1)
                    }
                    _ => {
                        self.shared.ownership.kick();
                        LEASE_POLL
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = ownership.changed() => {}
                }
                continue;
            }
            match self
                .shared
                .store
                .acquire(&key, &self.shared.holder, now, LEASE_TTL)
                .await
            {
                Ok(Some(lease)) => {
                    self.lease = Some(lease);
                    let record = self.stored_record().await;
                    let ours = self.core.generation();
                    let interrupted = record.as_ref().is_some_and(|r| {
                        r.request_holder
                            .as_deref()
                            .is_some_and(|h| h != self.shared.holder.id())
                            && r.request_generation.and_then(|g| u64::try_from(g).ok())
                                == Some(ours)
                    });
                    if let Some(saved) = record.and_then(|r| self.newer(r)) {
                        self.release_lease().await;
                        return Taken::Adopted(saved);
                    }
                    return Taken::Proceed { interrupted };
                }
                Ok(None) => {
                    tokio::time::sleep(LEASE_POLL).await;
                    if let Some(saved) = self.newer_stored().await {
                        return Taken::Adopted(saved);
                    }
                }
                Err(e) => {
                    // Better a rare duplicate request than an account whose token lapses
                    // because the database is unwell.
                    tracing::warn!(account = %name, error = %e, "cannot take the token lease; requesting anyway");
                    return Taken::Proceed { interrupted: false };
                }
            }
        }
    }

    /// Sends `request` (the lease held) and feeds its answer to the core. Nothing cancels
    /// this: a token request that has left the process is finished (bounded by the HTTP
    /// client's timeout) and its answer stored, whatever happens to whoever asked, because the
    /// provider may have rotated the refresh token it presented.
    async fn request(&mut self, mut request: super::core::Request, interrupted: bool) -> Output {
        let name = self.account.name.to_string();
        if interrupted && let Some(instead) = self.core.refresh_interrupted(self.shared.clock.now())
        {
            if instead == request {
                tracing::warn!(account = %name,
                    "a refresh sent by a process that stopped mid-request was never answered to ehrsync; trying the refresh token once (the provider may have rotated it)");
            } else {
                tracing::warn!(account = %name, grant = instead.grant_label(),
                    "a refresh sent by a process that stopped mid-request was never answered to ehrsync; logging in again rather than presenting a refresh token the provider may have rotated");
            }
            request = instead;
        }
        // The issue time of whatever comes back: now, with the lease held, not when the
        // request was first wanted.
        let sent_at = self.shared.clock.now();
        let marked = self.mark_request(request, sent_at).await;
        let started = tokio::time::Instant::now();
        let result = self.send(request).await;
        self.shared
            .metrics
            .token_request_duration
            .with_label_values(&[name.as_str(), request.grant_label()])
            .observe(started.elapsed().as_secs_f64());
        let event = match result {
            Ok(response) => Event::Success { response, sent_at },
            Err(failure) => Event::Failure(failure),
        };
        let mut out = self.core.step(self.shared.clock.now(), event);
        // Storing the state clears the request's durable intent.
        out.persist |= marked;
        out
    }

    /// Writes the durable intent of a refresh about to be sent (migration 0004). True when
    /// written, so that storing the answer clears it.
    async fn mark_request(&self, request: super::core::Request, sent_at: Timestamp) -> bool {
        let Some(lease) = self.lease.as_ref() else {
            return false;
        };
        if request != super::core::Request::Refresh {
            return false;
        }
        let generation = i64::try_from(self.core.generation()).unwrap_or(i64::MAX);
        match self
            .shared
            .store
            .mark_request(lease, generation, sent_at.unix_seconds())
            .await
        {
            Ok(written) => written,
            Err(e) => {
                tracing::warn!(account = %self.account.name, error = %e,
                    "cannot record the refresh about to be sent; sending it anyway");
                false
            }
        }
    }

    /// While parked: the account's secrets read again from their files. When one changed (an
    /// operator fixed it without a reload), the account uses the new value and, if the
    /// credentials as a whole now differ from those refused, tries them once at once.
    fn secret_files_changed(&mut self) -> Option<Output> {
        let secret = self.account.client_secret.as_ref().and_then(|s| s.reread());
        let password = self.account.password.as_ref().and_then(|s| s.reread());
        if secret.is_none() && password.is_none() {
            return None;
        }
        let mut account = (*self.account).clone();
        if secret.is_some() {
            account.client_secret = secret;
        }
        if password.is_some() {
            account.password = password;
        }
        let fingerprint = credentials_fingerprint(&account, &self.shared.cipher);
        self.account = Arc::new(account);
        if fingerprint == self.fingerprint {
            return None;
        }
        self.fingerprint = fingerprint;
        self.core.credentials_changed(self.shared.clock.now())
    }

    async fn stored_record(&self) -> Option<TokenRecord> {
        match self
            .shared
            .store
            .load_token(self.account.name.as_str())
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(account = %self.account.name, error = %e, "cannot read the stored token state");
                None
            }
        }
    }

    /// Tokens another process stored that are newer than ours, if any.
    async fn newer_stored(&mut self) -> Option<super::core::Saved> {
        let record = self.stored_record().await?;
        self.newer(record)
    }

    /// The tokens in `record`, if newer than ours and usable.
    fn newer(&mut self, record: TokenRecord) -> Option<super::core::Saved> {
        let theirs = u64::try_from(record.generation).unwrap_or(0);
        if theirs <= self.core.generation() {
            return None;
        }
        let generation = record.generation;
        let (saved, problem) = from_record(record, &self.shared.cipher);
        if let Some(e) = problem
            && self.unopenable_warned != Some(generation)
        {
            self.unopenable_warned = Some(generation);
            tracing::warn!(account = %self.account.name, error = %e,
                "tokens another process stored cannot be opened with this process's token key; is agent.token_key the same for every ehrsync sharing this database?");
        }
        saved.tokens.is_some().then_some(saved)
    }

    async fn release_lease(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        if let Err(e) = self.shared.store.release(&lease).await {
            // It expires on its own within LEASE_TTL.
            tracing::warn!(account = %self.account.name, error = %e, "cannot release the token lease");
        }
    }

    async fn send(
        &mut self,
        request: super::core::Request,
    ) -> Result<super::response::TokenResponse, Failure> {
        let target = match &self.target {
            Some(t) if !self.rediscover => t.clone(),
            _ => {
                let t = self.resolve_target().await?;
                self.rediscover = false;
                self.target = Some(t.clone());
                t
            }
        };
        let refresh = self
            .core
            .tokens()
            .and_then(|t| t.refresh.as_ref())
            .map(|r| r.token.clone());
        let Some(form) = GrantForm::for_request(request, refresh.as_ref()) else {
            // The core asks for a refresh only while it holds a refresh token.
            return Err(Failure::transient(
                super::core::TransientKind::Other,
                "no refresh token to refresh with",
            ));
        };
        let mut result = request_token(&self.shared.http, &self.account, &target, form).await;
        // A discovered endpoint that cannot be reached or is gone may have moved: the next
        // attempt reads the discovery document again (at most once a minute). A missing
        // endpoint is then a transient failure, not a refusal that parks the account.
        if matches!(self.account.token_endpoint, TokenEndpoint::Discovery { .. }) {
            self.rediscover = match &result {
                Err(failure) if super::client::is_connect_failure(failure) => true,
                Err(Failure::OAuth { status, .. }) if matches!(status, 404 | 405 | 410) => {
                    result = Err(Failure::transient(
                        super::core::TransientKind::Status(*status),
                        format!(
                            "the discovered token endpoint {} answered HTTP {status}; reading the provider's configuration again",
                            target.url
                        ),
                    ));
                    true
                }
                _ => false,
            };
        }
        result
    }

    /// The token endpoint and client authentication, from the config and, where it leaves them
    /// open, the provider's discovery document.
    async fn resolve_target(&self) -> Result<TokenTarget, Failure> {
        let provider = match (
            &self.account.issuer,
            TokenTarget::needs_discovery(&self.account),
        ) {
            (Some(issuer), true) => {
                let found = if self.rediscover {
                    self.shared.discovery.refetch(issuer).await
                } else {
                    self.shared.discovery.get(issuer).await
                };
                Some(found.map_err(|e| {
                    Failure::transient(super::core::TransientKind::Other, e.to_string())
                })?)
            }
            _ => None,
        };
        TokenTarget::resolve(&self.account, provider.as_deref())
    }
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// The access token's text, for the `Authorization` header (the only place it is exposed).
pub fn bearer(token: &CurrentToken) -> String {
    format!("Bearer {}", token.access_token.expose_secret())
}

/// What [`store_login`] stored.
#[derive(Debug, Clone)]
pub struct StoredLogin {
    pub expires_at: Timestamp,
    /// `None` when no refresh token came; `Some(None)` for one of unknown lifetime.
    pub refresh_expires_at: Option<Option<Timestamp>>,
}

/// Stores tokens a person obtained with `ehrsync login` as `account`'s current tokens, through
/// the same lease and sealed row as the owner: a running agent adopts them (an account parked
/// in `needs_login` within [`NEEDS_LOGIN_POLL`], any other at its next refresh).
pub async fn store_login(
    shared: &Shared,
    account: &Account,
    response: super::response::TokenResponse,
    sent_at: Timestamp,
) -> Result<StoredLogin, String> {
    let name = account.name.as_str();
    let key = LeaseKey::token(name);
    // Wait out another process's token request, so the generations stay in order.
    let deadline = tokio::time::Instant::now() + LEASE_TTL + LEASE_POLL;
    let lease = loop {
        let now = shared.clock.now().unix_seconds();
        match shared
            .store
            .acquire(&key, &shared.holder, now, LEASE_TTL)
            .await
        {
            Ok(Some(lease)) => break lease,
            Ok(None) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(LEASE_POLL).await;
            }
            Ok(None) => {
                return Err(
                    "another ehrsync process held the account's token lease longer than the lease lasts"
                        .to_owned(),
                );
            }
            Err(e) => return Err(format!("cannot take the account's token lease: {e}")),
        }
    };
    let result = async {
        let (mut core, _) = stored_core(shared, account)
            .await
            .map_err(|e| e.to_string())?;
        let now = shared.clock.now();
        core.logged_in(now, response, sent_at);
        let mut record = to_record(name, &core, now, &shared.cipher).map_err(|e| e.to_string())?;
        // The login just proved these credentials.
        record.credentials = Some(credentials_fingerprint(account, &shared.cipher));
        let stored = shared
            .store
            .save_token(&record, Some(&lease))
            .await
            .map_err(|e| format!("cannot store the tokens: {e}"))?;
        if !stored {
            return Err(
                "another ehrsync process took the account's token lease over; log in again"
                    .to_owned(),
            );
        }
        let tokens = core
            .tokens()
            .ok_or_else(|| "the login produced no tokens".to_owned())?;
        Ok(StoredLogin {
            expires_at: tokens.expires_at,
            refresh_expires_at: tokens.refresh.as_ref().map(|r| r.expires_at),
        })
    }
    .await;
    if let Err(e) = shared.store.release(&lease).await {
        tracing::warn!(account = name, error = %e, "cannot release the token lease; it expires on its own");
    }
    result
}
