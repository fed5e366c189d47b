//! Dividing the accounts between agents that share a database.
//!
//! Every [`CLAIM_EVERY`] this agent renews the ownership leases it holds (`account_owners`,
//! one statement) and its heartbeat, looks at the live agents (the `agents` table: a heartbeat
//! younger than [`OWNER_TTL`], and on this host a process that exists) and takes its fair share
//! of the accounts, `ceil(accounts / live agents)`:
//!
//! - an account whose owner is gone (its lease expired, or its process provably dead on this
//!   host) is claimed at once, whatever the share: a survivor owns it before its next refresh;
//! - an account nobody owns (never owned, or given up) is claimed while this agent holds
//!   fewer than its share;
//! - beyond its share at two rounds running, this agent gives accounts up, for the agents below
//!   theirs to claim.
//!
//! Claims are leases ([`Store::acquire`]): taking one is a single conditional upsert, so of two
//! agents claiming the same account one wins, on SQLite and PostgreSQL alike; each new holder
//! raises the lease's generation. What this agent owns is published to its token owners and job
//! runners ([`Ownership`]); the metric `ehrsync_account_owned` says it per account.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::SharedClock;
use crate::metrics::Metrics;
use crate::store::{Holder, Lease, LeaseKey, Store, StoreError};
use crate::token::ownership::Ownership;

/// How long an ownership lease lasts unless renewed: an agent that dies (or is cut off) loses
/// its accounts within this.
pub const OWNER_TTL: Duration = Duration::from_secs(30);
/// How often an agent renews its leases and looks at the division.
pub const CLAIM_EVERY: Duration = Duration::from_secs(10);
/// The shortest time between two rounds when owners ask for one early (an owner is late).
const KICK_SPACING: Duration = Duration::from_secs(1);

/// This agent's side of the division.
pub struct Claimer {
    store: Store,
    holder: Arc<Holder>,
    clock: SharedClock,
    metrics: Metrics,
    ownership: Arc<Ownership>,
    /// The ownership leases held, by account.
    ours: HashMap<String, Lease>,
    /// This agent held more than its share at the last round.
    over_share: bool,
    rng: fastrand::Rng,
}

/// What one round saw and did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    pub live_agents: usize,
    pub share: usize,
    pub owned: usize,
    pub claimed: usize,
    pub taken_over: usize,
    pub released: usize,
    pub lost: usize,
}

impl Claimer {
    pub fn new(
        store: Store,
        holder: Arc<Holder>,
        clock: SharedClock,
        metrics: Metrics,
        ownership: Arc<Ownership>,
    ) -> Claimer {
        Claimer {
            store,
            holder,
            clock,
            metrics,
            ownership,
            ours: HashMap::new(),
            over_share: false,
            rng: fastrand::Rng::new(),
        }
    }

    /// Renews, looks and claims once for `accounts` (the configured ones); publishes the view.
    /// On a database error the view is set unknown (every account may be requested for, as
    /// without division) and the error returned.
    pub async fn round(&mut self, accounts: &[String]) -> Result<Round, StoreError> {
        match self.try_round(accounts).await {
            Ok(round) => Ok(round),
            Err(e) => {
                self.ownership.unknown();
                Err(e)
            }
        }
    }

    async fn try_round(&mut self, accounts: &[String]) -> Result<Round, StoreError> {
        let started = self.clock.now().unix_seconds();
        let ttl = i64::try_from(OWNER_TTL.as_secs()).unwrap_or(30);
        let mut round = Round::default();

        // What this agent still holds.
        let held: HashMap<String, i64> = self
            .store
            .renew_owned(&self.holder, started, OWNER_TTL)
            .await?
            .into_iter()
            .collect();
        let before = self.ours.len();
        self.ours
            .retain(|account, lease| held.get(account) == Some(&lease.generation));
        round.lost = before - self.ours.len();
        if round.lost > 0 {
            tracing::warn!(
                lost = round.lost,
                "this agent's ownership of some accounts lapsed and others took them over (was it paused or cut off from the database?)"
            );
        }
        let configured: HashSet<&str> = accounts.iter().map(String::as_str).collect();
        // Held but no longer configured here (a reload removed them): given up.
        let unconfigured: Vec<String> = self
            .ours
            .keys()
            .filter(|a| !configured.contains(a.as_str()))
            .cloned()
            .collect();
        for account in unconfigured {
            self.give_up(&account).await;
        }

        // The agents sharing the work: each round renews its agent's heartbeat with its leases,
        // so an agent whose heartbeat is older than a lease's lifetime has let its leases
        // lapse too (paused, cut off, dead) and no longer counts, though `status` still calls
        // it running for a while (45 s).
        self.store.heartbeat(&self.holder, started).await?;
        let agents = self.store.agents().await?;
        let live: HashSet<&str> = agents
            .iter()
            .filter(|a| a.alive(started, ttl))
            .map(|a| a.id.as_str())
            .chain(std::iter::once(self.holder.id()))
            .collect();
        round.live_agents = live.len();
        round.share = accounts.len().div_ceil(live.len().max(1));

        let rows: HashMap<String, crate::store::LeaseRow> =
            self.store.owners().await?.into_iter().collect();
        let mut others = HashSet::new();
        let mut orphaned = Vec::new();
        let mut free = Vec::new();
        for account in accounts {
            if self.ours.contains_key(account) {
                continue;
            }
            match rows.get(account) {
                None => free.push(account.clone()),
                Some(r) if r.holder.is_empty() => free.push(account.clone()),
                Some(r) if r.holder == self.holder.id() => free.push(account.clone()),
                Some(r) if !r.live(started) => orphaned.push(account.clone()),
                Some(_) => {
                    others.insert(account.clone());
                }
            }
        }

        // Beyond the share two rounds running (not for a moment, as when this agent has just
        // taken a dead owner's accounts and that owner still counts): give some up.
        let over = self.ours.len() > round.share;
        if over && self.over_share {
            let mut extra: Vec<String> = self.ours.keys().cloned().collect();
            extra.sort();
            self.rng.shuffle(&mut extra);
            for account in extra.into_iter().take(self.ours.len() - round.share) {
                self.give_up(&account).await;
                round.released += 1;
            }
        }
        self.over_share = over;
        // An owner that is gone: its accounts are taken now, whatever the share.
        for account in orphaned {
            if self.claim(&account).await? {
                round.taken_over += 1;
            } else {
                others.insert(account);
            }
        }
        // Up to the share from those nobody owns, in an order of this agent's own, so that
        // agents claiming at once mostly pick different accounts.
        self.rng.shuffle(&mut free);
        for account in free {
            if self.ours.len() >= round.share {
                break;
            }
            if self.claim(&account).await? {
                round.claimed += 1;
            } else {
                others.insert(account);
            }
        }
        round.owned = self.ours.len();
        for account in accounts {
            self.metrics
                .account_owned
                .with_label_values(&[account.as_str()])
                .set(i64::from(self.ours.contains_key(account)));
        }
        // Valid until the lease renewed at the start of this round ends.
        self.ownership.set(
            self.ours.keys().cloned().collect(),
            started.saturating_add(ttl),
            others,
            started,
        );
        if round.claimed + round.taken_over + round.released > 0 {
            tracing::info!(
                owned = round.owned,
                share = round.share,
                live_agents = round.live_agents,
                claimed = round.claimed,
                taken_over = round.taken_over,
                released = round.released,
                "accounts divided between the agents sharing the database"
            );
        }
        Ok(round)
    }

    /// Takes `account`'s ownership lease if it is free. False when another agent holds it.
    async fn claim(&mut self, account: &str) -> Result<bool, StoreError> {
        let now = self.clock.now().unix_seconds();
        let key = LeaseKey::owner(account);
        match self
            .store
            .acquire(&key, &self.holder, now, OWNER_TTL)
            .await?
        {
            Some(lease) => {
                self.ours.insert(account.to_owned(), lease);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Gives `account` up (the lease row stays, without a holder, for another to claim).
    async fn give_up(&mut self, account: &str) {
        if let Some(lease) = self.ours.remove(account)
            && let Err(e) = self.store.release(&lease).await
        {
            tracing::warn!(account, error = %e, "cannot give the account up; its lease expires on its own");
        }
    }

    /// Gives every account up: a clean stop, so the others take them over at once.
    pub async fn release_all(&mut self) {
        let accounts: Vec<String> = self.ours.keys().cloned().collect();
        for account in accounts {
            self.give_up(&account).await;
        }
        let now = self.clock.now().unix_seconds();
        self.ownership.set(HashSet::new(), 0, HashSet::new(), now);
    }

    /// Runs rounds every [`CLAIM_EVERY`] (a little jittered) for the accounts `accounts` holds
    /// at each, until `stop`; then gives every account up.
    pub async fn run(
        mut self,
        accounts: watch::Receiver<Vec<String>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let ownership = self.ownership.clone();
        loop {
            let jitter = Duration::from_millis(self.rng.u64(..1000));
            let since = tokio::time::Instant::now();
            tokio::select! {
                _ = tokio::time::sleep(CLAIM_EVERY - Duration::from_millis(500) + jitter) => {}
                // An owner late with a refresh: look now, at most every KICK_SPACING.
                _ = async {
                    ownership.kicked().await;
                    tokio::time::sleep_until(since + KICK_SPACING).await;
                } => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            let list = accounts.borrow().clone();
            if let Err(e) = self.round(&list).await {
                tracing::warn!(error = %e, "cannot renew or claim account ownership; every account may be refreshed by any agent until the database answers");
            }
        }
        self.release_all().await;
    }
}
