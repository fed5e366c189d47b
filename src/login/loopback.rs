//! The loopback redirect listener of a browser login (RFC 8252 §7.3, §8.3): bound to
//! `127.0.0.1` (not `localhost`, which may resolve elsewhere), it answers
//! `GET /callback?...` once, checks `state` (and `iss`, RFC 9207), and shows the person a
//! short page saying whether to go back to the terminal. Other paths get 404.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use secrecy::SecretString;
use tokio::sync::oneshot;

use super::LoginError;

/// How long the page answering the redirect gets to reach the browser before the listener closes.
const DRAIN: Duration = Duration::from_secs(2);

/// What the redirect brought.
pub struct Callback {
    pub code: SecretString,
}

pub struct Listener {
    listener: tokio::net::TcpListener,
    port: u16,
}

struct Expect {
    state: String,
    issuer: Option<String>,
    outcome: Mutex<Option<oneshot::Sender<Result<Callback, LoginError>>>>,
}

impl Listener {
    /// Listens on `127.0.0.1:port` (a free port when 0).
    pub async fn bind(port: u16) -> Result<Listener, String> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        Ok(Listener { listener, port })
    }

    /// The `redirect_uri` to send: exactly what the provider must redirect to.
    pub fn redirect_uri(&self) -> String {
        format!("http://127.0.0.1:{}/callback", self.port)
    }

    /// Serves until the first redirect to `/callback` arrives, and returns what it brought.
    pub async fn wait(self, state: &str, issuer: Option<&str>) -> Result<Callback, LoginError> {
        let (tx, rx) = oneshot::channel();
        let expect = Arc::new(Expect {
            state: state.to_owned(),
            issuer: issuer.map(|i| i.trim_end_matches('/').to_owned()),
            outcome: Mutex::new(Some(tx)),
        });
        let app = Router::new()
            .route("/callback", get(callback))
            .with_state(expect);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = axum::serve(self.listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        // The sender lives in `expect`, which the server holds until it stops.
        let result = rx.await.unwrap_or_else(|_| {
            Err(LoginError::Internal(
                "the redirect listener stopped".to_owned(),
            ))
        });
        let _ = stop_tx.send(());
        if tokio::time::timeout(DRAIN, server).await.is_err() {
            tracing::debug!("the browser kept its connection open; closing the listener");
        }
        result
    }
}

async fn callback(
    State(expect): State<Arc<Expect>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let outcome = judge(&expect, &q);
    let (status, title, text) = match &outcome {
        Ok(_) => (
            StatusCode::OK,
            "ehrsync: login received",
            "ehrsync received the authorization. You can close this tab and return to the terminal.".to_owned(),
        ),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            "ehrsync: login failed",
            format!("The login did not complete: {e}"),
        ),
    };
    let sender = expect
        .outcome
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    match sender {
        Some(tx) => {
            let _ = tx.send(outcome);
        }
        // A second redirect (a reload of the page): the first one decided.
        None => {
            return page(
                StatusCode::GONE,
                "ehrsync",
                "This login has already finished; return to the terminal.",
            );
        }
    }
    page(status, title, &text)
}

fn judge(expect: &Expect, q: &HashMap<String, String>) -> Result<Callback, LoginError> {
    // The state comes first: without it, nothing else in the redirect can be trusted.
    if q.get("state").map(String::as_str) != Some(expect.state.as_str()) {
        return Err(LoginError::StateMismatch);
    }
    if let (Some(iss), Some(expected)) = (q.get("iss"), &expect.issuer)
        && iss.trim_end_matches('/') != expected
    {
        return Err(LoginError::IssuerMismatch(trim(iss)));
    }
    if let Some(error) = q.get("error") {
        return Err(LoginError::Denied {
            error: trim(error),
            description: q.get("error_description").map(|d| trim(d)),
        });
    }
    match q.get("code").filter(|c| !c.is_empty()) {
        Some(code) => Ok(Callback {
            code: SecretString::from(code.clone()),
        }),
        None => Err(LoginError::NoCode),
    }
}

/// Provider texts are shown and logged: one line, bounded.
fn trim(text: &str) -> String {
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    line.trim().to_owned()
}

fn page(status: StatusCode, title: &str, text: &str) -> Response {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
         <body style=\"font-family:sans-serif;margin:3em\"><h1>{t}</h1><p>{x}</p></body></html>",
        t = escape(title),
        x = escape(text)
    );
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect() -> Expect {
        Expect {
            state: "s-1".to_owned(),
            issuer: Some("https://id.example.com".to_owned()),
            outcome: Mutex::new(None),
        }
    }

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn state_then_issuer_then_error_then_code() {
        let e = expect();
        assert!(judge(&e, &q(&[("state", "s-1"), ("code", "c")])).is_ok());
        assert!(matches!(
            judge(&e, &q(&[("state", "s-2"), ("code", "c")])),
            Err(LoginError::StateMismatch)
        ));
        assert!(matches!(
            judge(&e, &q(&[("code", "c")])),
            Err(LoginError::StateMismatch)
        ));
        assert!(matches!(
            judge(&e, &q(&[("state", "s-2"), ("error", "access_denied")])),
            Err(LoginError::StateMismatch)
        ));
        assert!(matches!(
            judge(
                &e,
                &q(&[
                    ("state", "s-1"),
                    ("iss", "https://evil.example.com"),
                    ("code", "c")
                ])
            ),
            Err(LoginError::IssuerMismatch(_))
        ));
        assert!(
            judge(
                &e,
                &q(&[
                    ("state", "s-1"),
                    ("iss", "https://id.example.com/"),
                    ("code", "c")
                ])
            )
            .is_ok()
        );
        match judge(
            &e,
            &q(&[
                ("state", "s-1"),
                ("error", "access_denied"),
                ("error_description", "no\nway"),
            ]),
        ) {
            Err(LoginError::Denied { error, description }) => {
                assert_eq!(error, "access_denied");
                assert_eq!(description.as_deref(), Some("no way"));
            }
            _ => panic!("expected a refusal"),
        }
        assert!(matches!(
            judge(&e, &q(&[("state", "s-1")])),
            Err(LoginError::NoCode)
        ));
    }

    #[test]
    fn pages_escape_provider_text() {
        assert_eq!(escape("<script>&\"'"), "&lt;script&gt;&amp;&quot;&#39;");
    }
}
