//! GpuPool controller: reads the nodes and the ledger, computes the status
//! ([`crate::status::pool`]) and writes it when it changed, coalescing bursts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use whaleflux_crds::GpuPool;

use super::{Context, Error};
use crate::status::pool::pool_status;

/// Shortest time between two status writes of one pool.
pub const POOL_WRITE_INTERVAL: Duration = Duration::from_secs(2);

/// How long to wait before pool `name`'s status may be written again, if at all.
fn write_wait(ctx: &Context, name: &str) -> Option<Duration> {
    let writes = ctx.pool_writes.lock().unwrap_or_else(|e| e.into_inner());
    let since = writes.get(name)?.elapsed();
    POOL_WRITE_INTERVAL
        .checked_sub(since)
        .filter(|d| !d.is_zero())
}

/// Reconciles one GpuPool: recompute its status and write it when it changed.
pub async fn reconcile(pool: Arc<GpuPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let labels = vec![("controller", "gpupool".to_string())];
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    let name = pool.name_any();
    let nodes = ctx.nodes.state();
    let used = ctx.ledger.used(&name, None);
    let now = Timestamp::now();
    let status = pool_status(&pool, &nodes, &used, now);
    let quarantined: Vec<(String, bool)> = status
        .nodes
        .iter()
        .map(|n| {
            let q = n.quarantined_until.as_ref().is_some_and(|t| t.0 > now);
            (n.name.clone(), q)
        })
        .collect();
    ctx.metrics.record_pool(&name, &quarantined);
    let result = async {
        if pool.status.as_ref() != Some(&status) {
            // A busy pool changes with every plan; its status (one entry per node) is written
            // at most once per interval, carrying every change since. Plans read the ledger,
            // not this status, so coalescing never hands out GPUs twice.
            if let Some(wait) = write_wait(ctx.as_ref(), &name) {
                return Ok(Action::requeue(wait));
            }
            let api: Api<GpuPool> = Api::all(ctx.client.clone());
            super::apply_status(&api, &name, &status).await?;
            ctx.pool_writes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone(), Instant::now());
            tracing::info!(pool = %name, nodes = status.total_nodes, gpus = status.total_gpus, healthy = status.healthy_gpus, "pool status updated");
        }
        ctx.backoff
            .reset(&super::Backoff::key("gpupool", &pool.metadata));
        // Re-check when a quarantine ends.
        let next = status
            .nodes
            .iter()
            .filter_map(|n| n.quarantined_until.as_ref())
            .filter_map(|t| t.0.duration_since(now).try_into().ok())
            .min()
            .map_or(Duration::from_secs(300), |d: Duration| {
                d + Duration::from_secs(1)
            });
        Ok(Action::requeue(next))
    }
    .await;
    ctx.metrics
        .duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    result
}
