//! The operator's Prometheus metrics and its `/metrics`, `/healthz` and `/readyz` endpoints.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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

use super::health::Health;

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
    /// Replica groups the spec asks for, by deployment.
    pub groups_desired: Family<Labels, Gauge>,
    /// 1 while a deployment's Degraded condition is True, labelled with its reason.
    pub degraded: Family<Labels, Gauge>,
    /// Whole replica groups recreated after a pod of theirs failed, by deployment.
    pub group_restarts: Family<Labels, Counter>,
    /// 1 while a pool's node is quarantined.
    pub node_quarantined: Family<Labels, Gauge>,
    /// The label sets last written per deployment / pool, so stale series can go.
    series: Mutex<HashMap<String, Vec<Labels>>>,
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
        let groups_desired = Family::<Labels, Gauge>::default();
        let degraded = Family::<Labels, Gauge>::default();
        let group_restarts = Family::<Labels, Counter>::default();
        let node_quarantined = Family::<Labels, Gauge>::default();
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
            "groups_desired",
            "Replica groups the LlmDeployment's spec asks for",
            groups_desired.clone(),
        );
        registry.register(
            "deployment_degraded",
            "1 while the LlmDeployment's Degraded condition is True (reason: the condition's)",
            degraded.clone(),
        );
        registry.register(
            "group_restarts",
            "Whole replica groups recreated after one of their pods failed",
            group_restarts.clone(),
        );
        registry.register(
            "node_quarantined",
            "1 while a GpuPool's node is quarantined (whaleflux.io/quarantined-until)",
            node_quarantined.clone(),
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
            groups_desired,
            degraded,
            group_restarts,
            node_quarantined,
            series: Mutex::new(HashMap::new()),
            leader,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Publishes one deployment's groups and Degraded condition (every series exists from the
    /// first reconcile, at 0 when healthy, so alerts and dashboards see the deployment).
    pub fn record_deployment(
        &self,
        ns: &str,
        name: &str,
        desired: i32,
        ready: i32,
        degraded: Option<(bool, &str)>,
    ) {
        let id: Labels = vec![("namespace", ns.into()), ("deployment", name.into())];
        self.groups_ready.get_or_create(&id).set(i64::from(ready));
        self.groups_desired
            .get_or_create(&id)
            .set(i64::from(desired.max(0)));
        let _ = self.group_restarts.get_or_create(&id);
        let mut degraded_labels = id.clone();
        let (is, reason) = degraded.unwrap_or((false, "AsPlanned"));
        degraded_labels.push(("reason", reason.into()));
        self.degraded
            .get_or_create(&degraded_labels)
            .set(i64::from(is));
        self.replace_series(
            format!("deployment/{ns}/{name}"),
            vec![degraded_labels],
            &self.degraded,
        );
    }

    /// Drops every series of a deleted deployment.
    pub fn forget_deployment(&self, ns: &str, name: &str) {
        let id: Labels = vec![("namespace", ns.into()), ("deployment", name.into())];
        self.groups_ready.remove(&id);
        self.groups_desired.remove(&id);
        self.group_restarts.remove(&id);
        self.replace_series(
            format!("deployment/{ns}/{name}"),
            Vec::new(),
            &self.degraded,
        );
    }

    /// Publishes which of a pool's nodes are quarantined (nodes gone from the pool drop out).
    pub fn record_pool(&self, pool: &str, nodes: &[(String, bool)]) {
        let sets: Vec<Labels> = nodes
            .iter()
            .map(|(node, q)| {
                let l: Labels = vec![("pool", pool.into()), ("node", node.clone())];
                self.node_quarantined.get_or_create(&l).set(i64::from(*q));
                l
            })
            .collect();
        self.replace_series(format!("pool/{pool}"), sets, &self.node_quarantined);
    }

    /// Remembers `now` as the series of `owner` in `family`, removing those it replaces.
    fn replace_series(&self, owner: String, now: Vec<Labels>, family: &Family<Labels, Gauge>) {
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let before = if now.is_empty() {
            series.remove(&owner).unwrap_or_default()
        } else {
            series.insert(owner, now.clone()).unwrap_or_default()
        };
        for old in before.iter().filter(|l| !now.contains(l)) {
            family.remove(old);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// What the endpoints read.
#[derive(Clone)]
struct Endpoints {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// The HTTP endpoints: `/metrics`, `/healthz` (no reconcile is stuck and a leader keeps its
/// Lease renewed: see [`super::health`]), `/readyz` (the API server answered).
pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Endpoints { metrics, health })
}

async fn serve_metrics(State(e): State<Endpoints>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        e.metrics.encode(),
    )
}

async fn healthz(State(e): State<Endpoints>) -> impl IntoResponse {
    match e.health.check(std::time::Instant::now()) {
        Ok(()) => (StatusCode::OK, "ok".to_string()),
        Err(why) => {
            tracing::error!("unhealthy: {why}");
            (StatusCode::INTERNAL_SERVER_ERROR, why)
        }
    }
}

async fn readyz(State(e): State<Endpoints>) -> impl IntoResponse {
    if e.metrics.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the API server has not answered yet",
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// GET `path` from the router served on a real socket.
    async fn get_from(router: Router, path: &'static str) -> (u16, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address").to_string();
        let server = tokio::spawn(async move { axum::serve(listener, router).await });
        let answer = tokio::task::spawn_blocking(move || whaleflux_e2e::http_get(&addr, path))
            .await
            .expect("client thread")
            .expect("an HTTP answer");
        server.abort();
        answer
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn healthz_fails_with_the_stuck_reconcile_and_recovers_when_it_ends() {
        let metrics = Arc::new(Metrics::default());
        // Reconcile timeout 1 s: stuck past 31 s.
        let health = Arc::new(Health::new(Duration::from_secs(1), Duration::from_secs(10)));
        let app = || router(metrics.clone(), health.clone());
        let fresh = health.start("gpupool", "rtx4090".into());
        assert_eq!(get_from(app(), "/healthz").await, (200, "ok".into()));
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(45))
            .expect("the clock is past 45 s");
        let stuck = health.start_at("llmdeployment", "ml/smollm2".into(), long_ago);
        let (code, body) = get_from(app(), "/healthz").await;
        assert_eq!(code, 500, "{body}");
        for part in [
            "llmdeployment",
            "ml/smollm2",
            "has run for 45s",
            "31s limit",
        ] {
            assert!(body.contains(part), "{body:?} lacks {part:?}");
        }
        assert!(!body.contains("rtx4090"), "the fresh one is fine: {body}");
        drop(stuck);
        assert_eq!(get_from(app(), "/healthz").await, (200, "ok".into()));
        drop(fresh);
        // A leader whose renewals stopped 16 s ago (renew deadline 10 s + 5 s).
        let renewed = Instant::now()
            .checked_sub(Duration::from_secs(16))
            .expect("the clock is past 16 s");
        health.leading(Some(renewed));
        let (code, body) = get_from(app(), "/healthz").await;
        assert_eq!(code, 500, "{body}");
        assert!(body.contains("leader lease 16s ago"), "{body}");
        health.leading(Some(Instant::now()));
        assert_eq!(get_from(app(), "/healthz").await, (200, "ok".into()));
        // The other endpoints still answer.
        assert_eq!(get_from(app(), "/readyz").await.0, 503);
        let (code, text) = get_from(app(), "/metrics").await;
        assert_eq!(code, 200);
        assert!(text.contains("whaleflux_leader"), "{text}");
    }
}
