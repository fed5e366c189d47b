//! Which accounts this process owns, as its token owners and job runners consult it.
//!
//! When several `ehrsync run` agents share a database they divide the accounts: each account
//! has one owner (its `account_owners` lease, claimed and renewed by `agent::share`), which
//! alone refreshes the account's tokens proactively and runs its jobs. The other agents keep
//! the account's token owner too, serving the token the owner stores to their readers, and
//! take over when the owner's lease lapses. This is the view of that division those tasks
//! read; only `agent::share` writes it.
//!
//! A process that does not divide work (`ehrsync sync`, `login`, `token`, tests) leaves the
//! view off: then every process may request tokens, taking turns through the per-request
//! token lease as before.

use std::collections::HashSet;
use std::sync::Mutex;

use tokio::sync::watch;

/// The division of accounts as last seen by this process.
#[derive(Debug)]
pub struct Ownership {
    view: Mutex<View>,
    /// Bumped at every change of the view, so that waiting owners look again.
    changed: watch::Sender<u64>,
    /// Asks the claimer to look at the division now: an owner is late with a refresh (it may
    /// be gone), so this agent should not wait for the next round to find out.
    kick: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct View {
    /// Off: every account may be requested for (no division, or it is unknown just now).
    on: bool,
    /// The accounts this process owns, valid until `valid_until` (Unix seconds) unless renewed.
    ours: HashSet<String>,
    valid_until: i64,
    /// The accounts another live agent owns.
    others: HashSet<String>,
}

impl Default for Ownership {
    fn default() -> Ownership {
        Ownership {
            view: Mutex::new(View::default()),
            changed: watch::Sender::new(0),
            kick: tokio::sync::Notify::new(),
        }
    }
}

impl Ownership {
    /// Whether this process may send token requests for `account` at `now` (Unix seconds):
    /// it owns the account (and its lease has not lapsed since the last renewal: a process
    /// that was paused waits until it has looked again), or nobody else does.
    pub fn may_request(&self, account: &str, now: i64) -> bool {
        let view = self.lock();
        if !view.on {
            return true;
        }
        if view.ours.contains(account) {
            return now < view.valid_until;
        }
        !view.others.contains(account)
    }

    /// Whether this process owns `account` at `now` (with the view off: every account).
    pub fn owns(&self, account: &str, now: i64) -> bool {
        let view = self.lock();
        !view.on || (view.ours.contains(account) && now < view.valid_until)
    }

    /// Whether another live agent owns `account` (so this one leaves the account's jobs and
    /// proactive refreshes to it).
    pub fn owned_elsewhere(&self, account: &str) -> bool {
        let view = self.lock();
        view.on && view.others.contains(account)
    }

    /// How many accounts this process owns.
    pub fn owned(&self) -> usize {
        self.lock().ours.len()
    }

    /// Asks for a look at the division before the next round is due.
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// Resolves once [`Ownership::kick`] was called (since the last time this resolved).
    pub async fn kicked(&self) {
        self.kick.notified().await;
    }

    /// Wakes when the view changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A new view at `now`: `ours` held until `valid_until`, `others` owned by live agents.
    /// Waiters wake only when it means something new to them: a different division, or this
    /// process's ownership renewed after it had lapsed (a woken agent may request again). A
    /// round that only renews the leases wakes nobody.
    pub fn set(&self, ours: HashSet<String>, valid_until: i64, others: HashSet<String>, now: i64) {
        let news = {
            let mut view = self.lock();
            let news = !view.on
                || view.ours != ours
                || view.others != others
                || (view.valid_until <= now && valid_until > now);
            *view = View {
                on: true,
                ours,
                valid_until,
                others,
            };
            news
        };
        if news {
            self.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Whether this process holds `account`'s ownership lease as last seen (however long ago
    /// it was renewed); false with the view off.
    pub fn holds(&self, account: &str) -> bool {
        let view = self.lock();
        view.on && view.ours.contains(account)
    }

    /// The division cannot be read (the database is unwell): every account may be requested
    /// for again, taking turns through the token lease, rather than letting tokens lapse.
    pub fn unknown(&self) {
        {
            let mut view = self.lock();
            *view = View::default();
        }
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, View> {
        // A panic while holding this lock leaves a whole view behind (it is replaced in one
        // assignment), so a poisoned lock is still good to read.
        self.view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> HashSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn off_allows_everything_and_a_lapsed_lease_waits() {
        let o = Ownership::default();
        assert!(o.may_request("a", 0) && o.owns("a", 0) && !o.owned_elsewhere("a"));
        let mut changes = o.subscribe();
        o.set(set(&["a"]), 100, set(&["b"]), 50);
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        // A renewal that changes nothing wakes nobody; one after a lapse does.
        o.set(set(&["a"]), 110, set(&["b"]), 60);
        assert!(!changes.has_changed().unwrap());
        o.set(set(&["a"]), 100, set(&["b"]), 60);
        assert!(!changes.has_changed().unwrap());
        o.set(set(&["a"]), 150, set(&["b"]), 120);
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        o.set(set(&["a"]), 100, set(&["b"]), 50);
        assert!(!changes.has_changed().unwrap());
        assert!(o.holds("a") && !o.holds("b"));
        assert!(o.may_request("a", 99) && o.owns("a", 99));
        // Past the lease: not until the claimer has renewed it.
        assert!(!o.may_request("a", 100) && !o.owns("a", 100));
        assert!(!o.may_request("b", 0) && o.owned_elsewhere("b"));
        // Nobody's: whoever gets the token lease.
        assert!(o.may_request("c", 0) && !o.owns("c", 0));
        o.unknown();
        assert!(changes.has_changed().unwrap());
        assert!(o.may_request("b", 0));
        assert_eq!(o.owned(), 0);
    }
}
