//! The agent's HTTP listener: `/metrics`, `/healthz` (the process is alive) and `/readyz` (200
//! only when every account holds a valid token).

use std::sync::Arc;

use axum::Router;
use axum::extract::State as AxumState;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use crate::clock::SharedClock;
use crate::metrics::Metrics;
use crate::token::owner::TokenHandle;

/// The running accounts' token handles; replaced as a whole when a reload changes them.
pub type Handles = watch::Receiver<Arc<Vec<TokenHandle>>>;

#[derive(Clone)]
struct Web {
    handles: Handles,
    metrics: Metrics,
    clock: SharedClock,
}

pub fn router(handles: Handles, metrics: Metrics, clock: SharedClock) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Web {
            handles,
            metrics,
            clock,
        })
}

async fn metrics_page(AxumState(web): AxumState<Web>) -> impl IntoResponse {
    // Validity changes at expiry without any event: recompute it for every scrape.
    let now = web.clock.now();
    let handles = web.handles.borrow().clone();
    for h in handles.iter() {
        let valid = h.snapshot().token.is_some_and(|t| now < t.expires_at);
        web.metrics
            .token_valid
            .with_label_values(&[h.account()])
            .set(i64::from(valid));
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        web.metrics.render(),
    )
}

async fn readyz(AxumState(web): AxumState<Web>) -> impl IntoResponse {
    let now = web.clock.now();
    let handles = web.handles.borrow().clone();
    let not_ready: Vec<String> = handles
        .iter()
        .filter_map(|h| {
            let snap = h.snapshot();
            let valid = snap.token.as_ref().is_some_and(|t| now < t.expires_at);
            (!valid).then(|| format!("{}: {}", h.account(), snap.state.as_str()))
        })
        .collect();
    if not_ready.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", not_ready.join("\n")),
        )
    }
}
