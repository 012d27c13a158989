//! The operator's Prometheus metrics and its `/metrics`, `/healthz` and `/readyz` endpoints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label set: a list of name/value pairs.
pub type Labels = Vec<(&'static str, String)>;

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    /// Reconciles started, by controller.
    pub reconciles: Family<Labels, Counter>,
    /// Reconciles that failed, by controller and reason.
    pub errors: Family<Labels, Counter>,
    /// Reconcile duration, by controller.
    pub duration: Family<Labels, Histogram>,
    /// Planning outcomes: chosen, unchanged, impossible.
    pub plans: Family<Labels, Counter>,
    /// Replica groups whose every pod is ready, by deployment.
    pub groups_ready: Family<Labels, Gauge>,
    /// 1 while this process holds the leader Lease.
    pub leader: Gauge,
    /// Whether the API server has answered this process (readiness).
    pub ready: AtomicBool,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("whaleflux");
        let reconciles = Family::<Labels, Counter>::default();
        let errors = Family::<Labels, Counter>::default();
        let duration = Family::<Labels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let plans = Family::<Labels, Counter>::default();
        let groups_ready = Family::<Labels, Gauge>::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by reason",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            duration.clone(),
        );
        registry.register(
            "plans",
            "Planning outcomes (chosen, unchanged, impossible)",
            plans.clone(),
        );
        registry.register(
            "groups_ready",
            "Replica groups whose every pod is ready",
            groups_ready.clone(),
        );
        registry.register(
            "leader",
            "1 while this process holds the leader Lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            plans,
            groups_ready,
            leader,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The HTTP endpoints: `/metrics`, `/healthz` (the process runs), `/readyz` (the API server
/// answered).
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(metrics)
}

async fn serve_metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the API server has not answered yet",
        )
    }
}
