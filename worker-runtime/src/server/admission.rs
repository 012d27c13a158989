//! Who may use the model's API, and whether this worker still takes work: API keys, the drain
//! that a SIGTERM starts, and the count of generations in flight the drain waits for.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;

/// The API keys a worker accepts, the drain flag and the generations in flight.
#[derive(Default)]
pub struct Gate {
    /// SHA-256 of each accepted key: compared in constant time, and equal in length whatever
    /// the keys' lengths, so neither a key nor its length leaks through timing.
    keys: Vec<[u8; 32]>,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl Gate {
    /// A gate that accepts `keys` as `Authorization: Bearer KEY` (none: the API is open).
    pub fn new(keys: &[String]) -> Self {
        Self {
            keys: keys
                .iter()
                .map(|k| Sha256::digest(k.as_bytes()).into())
                .collect(),
            ..Self::default()
        }
    }

    /// Whether `/v1/*` needs a key.
    pub fn requires_key(&self) -> bool {
        !self.keys.is_empty()
    }

    fn accepts(&self, key: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        // Every key is compared, so the time does not say which one matched.
        self.keys
            .iter()
            .fold(0u8, |hit, k| hit | k.ct_eq(&d).unwrap_u8())
            == 1
    }

    /// Stop admitting generations: `/readyz` answers 503 from now on and new requests get 503
    /// with `Retry-After`; those in flight go on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether a drain has started.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Generations admitted and not yet answered in full (a stream counts until its last event).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Resolves once no generation is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Admit one generation, or answer 503 when draining. The ticket counts it in flight until
    /// dropped (with the handler, or with a stream's last event).
    pub fn admit(self: &Arc<Self>) -> Result<Ticket, ApiError> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let ticket = Ticket(self.clone());
        // Checked after counting, so a drain that starts in between waits for this one.
        if self.draining() {
            return Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "this worker is shutting down and takes no new requests; retry, another replica will answer".into(),
                kind: "server_error",
                param: None,
                code: Some("shutting_down"),
            });
        }
        Ok(ticket)
    }
}

/// One admitted generation; dropping it ends its count in flight.
pub struct Ticket(Arc<Gate>);

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The middleware in front of `/v1/*`: a valid `Authorization: Bearer KEY` when keys are set,
/// else 401 with an OpenAI-style error (as OpenAI answers a missing or wrong key).
pub async fn require_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if !st.gate.requires_key() {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        });
    let message = match presented {
        Some(key) if st.gate.accepts(key) => return next.run(req).await,
        Some(_) => {
            "Incorrect API key provided. Send one of this deployment's keys as 'Authorization: Bearer KEY'."
        }
        None => {
            "Missing API key. Send it as 'Authorization: Bearer KEY' (the OpenAI clients do so from OPENAI_API_KEY or api_key=)."
        }
    };
    let mut r = ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: message.into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key"),
    }
    .into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly() {
        let g = Gate::new(&["sk-one".into(), "sk-two".into()]);
        assert!(g.requires_key());
        assert!(g.accepts("sk-one") && g.accepts("sk-two"));
        assert!(!g.accepts("sk-on") && !g.accepts("sk-one ") && !g.accepts(""));
        assert!(!Gate::new(&[]).requires_key());
    }

    #[tokio::test]
    async fn a_drain_waits_for_tickets_and_refuses_new_ones() {
        let g = Arc::new(Gate::new(&[]));
        let t = g.admit().expect("open");
        g.start_draining();
        assert_eq!(
            g.admit().err().map(|e| e.status),
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(g.in_flight(), 1, "a refused request is not counted");
        let waiter = tokio::spawn({
            let g = g.clone();
            async move { g.idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(t);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("idle once the last ticket is dropped")
            .expect("join");
    }
}
