//! Prometheus metrics shared by the server, the engine loop and the GPU health sampler.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::health::metrics::GpuMetrics;

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Matched route, e.g. `/v1/completions`.
    pub route: String,
    /// HTTP status code.
    pub status: u16,
}

/// Every metric the worker exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Prompt tokens processed.
    pub prompt_tokens: Counter,
    /// Tokens generated.
    pub generated_tokens: Counter,
    /// Seconds from submission to first token.
    pub ttft: Histogram,
    /// Seconds between consecutive tokens of one sequence.
    pub inter_token: Histogram,
    /// Requests waiting to join the batch.
    pub queue_depth: Gauge,
    /// Sequences in the running batch.
    pub running: Gauge,
    /// KV-cache fill as a share of capacity (slots × context), 0 to 1.
    pub kv_cache_usage: Gauge<f64, AtomicU64>,
    /// Bytes of weights this process holds: 0 until its shard has loaded, which is what the
    /// startup probe (`/startupz`) waits for.
    pub weight_bytes: Gauge,
    /// Seconds this process took to check and load its shard.
    pub load_seconds: Gauge<f64, AtomicU64>,
    /// The GPUs this process uses (`whaleflux_gpu_*`).
    pub gpu: GpuMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Create and register all metrics.
    pub fn new() -> Self {
        let mut root = Registry::default();
        let gpu = GpuMetrics::default();
        gpu.register(root.sub_registry_with_prefix("whaleflux_gpu"));
        let registry = root.sub_registry_with_prefix("whaleflux_worker");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let prompt_tokens = Counter::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            prompt_tokens.clone(),
        );
        let generated_tokens = Counter::default();
        registry.register(
            "generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        let ttft = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "time_to_first_token_seconds",
            "Time to first token",
            ttft.clone(),
        );
        let inter_token = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "inter_token_seconds",
            "Time between tokens",
            inter_token.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Requests waiting for a batch slot",
            queue_depth.clone(),
        );
        let running = Gauge::default();
        registry.register(
            "running_sequences",
            "Sequences in the running batch",
            running.clone(),
        );
        let kv_cache_usage = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "kv_cache_usage_ratio",
            "KV-cache fill as a share of slots x context (0 to 1)",
            kv_cache_usage.clone(),
        );
        let weight_bytes = Gauge::default();
        registry.register(
            "weight_bytes",
            "Bytes of weights this process holds (0 while its shard loads)",
            weight_bytes.clone(),
        );
        let load_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "load_seconds",
            "Seconds this process took to check and load its shard",
            load_seconds.clone(),
        );
        Self {
            registry: root,
            requests,
            prompt_tokens,
            generated_tokens,
            ttft,
            inter_token,
            queue_depth,
            running,
            kv_cache_usage,
            weight_bytes,
            load_seconds,
            gpu,
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        if prometheus_client::encoding::text::encode(&mut s, &self.registry).is_err() {
            s.clear();
        }
        s
    }
}
