//! OpenID discovery as the agent uses it (`oidc::Discovery`), against the sandbox's provider
//! on paused time: fetched once and shared, kept in the database across restarts, fetched
//! again after a day or (at most once a minute) when an endpoint failed, a changed document
//! taken up, and a stale copy used while the provider cannot be reached.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ehrsync::clock::{SharedClock, TokioClock};
use ehrsync::oidc::{Discovery, MAX_AGE};
use ehrsync::sandbox::{Lifetimes, Sandbox};
use ehrsync::token::Timestamp;
use ehrsync::vendor::Vendor;

#[tokio::test(start_paused = true)]
async fn discovery_is_cached_shared_kept_across_restarts_and_refreshed_when_stale_or_failing() {
    let clock: SharedClock = Arc::new(TokioClock::new(Timestamp::from_unix_millis(
        1_800_000_000_000,
    )));
    let sandbox = Sandbox::start(clock.clone(), Lifetimes::documented(), 0)
        .await
        .unwrap();
    let issuer = sandbox.issuer();
    let fetches = || sandbox.requests(Vendor::NetHealth, "discovery");
    let dir = tempfile::tempdir().unwrap();
    let store = ehrsync::store::Store::open(common::fresh_database(dir.path()))
        .await
        .unwrap();
    let http = ehrsync::token::client::http_client(Duration::from_secs(5)).unwrap();
    let discovery = Arc::new(Discovery::new(
        http.clone(),
        Some(store.clone()),
        clock.clone(),
    ));

    // A hundred accounts of one provider asking at once: one fetch.
    let asks: Vec<_> = (0..100)
        .map(|_| {
            let (d, i) = (discovery.clone(), issuer.clone());
            tokio::spawn(async move { d.get(&i).await })
        })
        .collect();
    for ask in asks {
        let metadata = ask.await.unwrap().unwrap();
        assert!(metadata.supports_s256());
        assert_eq!(
            metadata.token_endpoint,
            sandbox.token_url(Vendor::NetHealth)
        );
    }
    assert_eq!(fetches(), 1);

    // A failed endpoint asks for a fresh copy, but not more than once a minute.
    discovery.refetch(&issuer).await.unwrap();
    assert_eq!(fetches(), 1, "fetched seconds ago");
    tokio::time::sleep(Duration::from_secs(61)).await;
    discovery.refetch(&issuer).await.unwrap();
    assert_eq!(fetches(), 2);

    // A restarted process reads the stored copy instead of asking.
    let restarted = Discovery::new(http.clone(), Some(store.clone()), clock.clone());
    restarted.get(&issuer).await.unwrap();
    assert_eq!(fetches(), 2);

    // A day later it asks again, and takes up what changed.
    sandbox.advertise_pkce(false);
    tokio::time::sleep(MAX_AGE).await;
    let changed = restarted.get(&issuer).await.unwrap();
    assert_eq!(fetches(), 3);
    assert!(!changed.supports_s256(), "the new document is used");

    // The provider is unreachable: the copy fetched earlier keeps the account going.
    drop(sandbox);
    tokio::time::sleep(MAX_AGE + Duration::from_secs(1)).await;
    let stale = restarted.get(&issuer).await.unwrap();
    assert!(!stale.supports_s256());

    // With no copy anywhere, the failure is reported.
    let fresh = Discovery::new(http, None, clock);
    let e = fresh.get(&issuer).await.unwrap_err();
    assert!(e.to_string().contains("openid-configuration"), "{e}");
    store.close().await;
}
