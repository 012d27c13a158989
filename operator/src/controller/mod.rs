//! `whaleflux operator`: the GpuPool and LlmDeployment controllers (kube-runtime), behind a
//! leader Lease, with metrics and health endpoints. This is the IO shell around the pure
//! planner and resource builders.

mod backoff;
pub mod cache;
pub mod deployment;
pub mod events;
pub mod failover;
pub mod health;
pub mod lease;
pub mod ledger;
pub mod metrics;
pub mod pool;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt, future, stream};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::SignedDuration;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::utils::Predicate;
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use whaleflux_crds::{GpuPool, LlmDeployment};

use crate::resources::children::{BuildError, FIELD_MANAGER, MANAGED_BY};
use crate::resources::settings::ClusterSettings;
pub use backoff::Backoff;
use cache::{GroupIndex, trim, trim_node, trim_pod, trim_statefulset};
use health::Health;
pub use lease::LeaseConfig;
use ledger::Ledger;
pub use metrics::Metrics;

/// Asks the GpuPool controller to recompute every pool (what it watches is a counter).
fn recompute_pools(trigger: &watch::Sender<u64>) {
    trigger.send_modify(|g| *g = g.wrapping_add(1));
}

/// `namespace/name` of a pod, the key of its record in the ledger.
fn pod_key(p: &Pod) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

/// Server-side applies `status` to the status subresource of `name`, as the operator's field
/// manager, so both controllers own their status fields the same way.
async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    status: &impl serde::Serialize,
) -> Result<(), Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &kube::api::PatchParams::apply(FIELD_MANAGER).force(),
        &kube::api::Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Why a reconcile failed. The reason label of the error metric comes from [`Error::reason`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The children could not be built.
    #[error("building the deployment's objects: {0}")]
    Build(#[from] BuildError),
    /// Deletion waits for the children to go.
    #[error("{0} worker pod(s) of the deployment still exist; waiting for them to go")]
    ChildrenRemain(usize),
    /// The finalizer helper failed in a way that is not an API error.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// The object lacks a field the API server always sets.
    #[error("the object has no {0}")]
    Missing(&'static str),
    /// The reconcile ran past `--reconcile-timeout-seconds` and was cancelled (it is retried
    /// after the object's backoff, like any failure).
    #[error("the reconcile did not finish within {0:?} and was cancelled")]
    Timeout(Duration),
}

/// Whether an API call failed because the API server did not answer within the client's
/// timeouts (`--api-timeout-seconds`, or connecting): an I/O `TimedOut` somewhere in the causes.
fn timed_out(e: &kube::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

impl Error {
    /// A short, bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 404 => "not_found",
            Error::Kube(kube::Error::Api(s)) if s.code == 429 => "throttled",
            Error::Kube(kube::Error::Api(s)) if s.code >= 500 => "server_error",
            Error::Kube(kube::Error::Api(_)) => "api_error",
            Error::Kube(e) if timed_out(e) => "api_timeout",
            Error::Kube(_) => "transport",
            Error::Build(_) => "build",
            Error::ChildrenRemain(_) => "children_remain",
            Error::Finalizer(_) => "finalizer",
            Error::Missing(_) => "invalid_object",
            Error::Timeout(_) => "timeout",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    /// API client for single calls (bounded by `--api-timeout-seconds`; never for watches).
    pub client: Client,
    /// Events (events.k8s.io).
    pub events: events::Publisher,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// GPUs WhaleFlux plans and other pods take.
    pub ledger: Arc<Ledger>,
    /// Every Node (reflector).
    pub nodes: Store<Node>,
    /// Every GpuPool (the GpuPool controller's reflector).
    pub pools: Store<GpuPool>,
    /// The StatefulSets of every replica group (trimmed: no pod spec, no managed fields).
    pub statefulsets: Store<StatefulSet>,
    /// Which group numbers each deployment's StatefulSets have (to look them up by name).
    pub groups: Arc<GroupIndex>,
    /// Every worker pod of every deployment (trimmed to what failover reads).
    pub pods: Store<Pod>,
    /// How long a node may be NotReady before its worker pods are force-deleted.
    pub node_grace: SignedDuration,
    /// What failover decided per deployment, until its status shows it.
    pub failover: Mutex<HashMap<String, failover::Memory>>,
    /// When each pool's status was last written, so allocation changes are coalesced.
    pub pool_writes: Mutex<HashMap<String, Instant>>,
    /// Deployments whose group secret this process has created (or found already there).
    pub secrets_made: Mutex<std::collections::HashSet<String>>,
    /// Per-object backoff.
    pub backoff: Backoff,
    /// Bumped when nodes or allocations change: the pool controller recomputes every pool.
    pool_trigger: watch::Sender<u64>,
    /// What the cluster's admin set for every worker pod.
    pub settings: ClusterSettings,
    /// Reconciles in flight, for `/healthz`.
    pub health: Arc<Health>,
    /// How long one reconcile may run before it is cancelled.
    pub reconcile_timeout: Duration,
}

impl Context {
    /// Asks the GpuPool controller to recompute every pool (allocations changed).
    pub fn pool_changed(&self) {
        recompute_pools(&self.pool_trigger);
    }
}

/// How the operator runs.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
    /// Leader election.
    pub lease: LeaseConfig,
    /// Reconciles run at once per controller (0 = unbounded).
    pub concurrency: u16,
    /// What the cluster's admin set for every worker pod.
    pub settings: ClusterSettings,
    /// How long a node may be NotReady before the worker pods on it are force-deleted (a real
    /// cluster leaves them Terminating forever, and their StatefulSet never replaces them).
    pub node_grace: Duration,
    /// Read and write timeout of every API call but watches (a silent API server fails the
    /// call, and its reconcile retries, instead of hanging it).
    pub api_timeout: Duration,
    /// How long one reconcile may run before it is cancelled and retried.
    pub reconcile_timeout: Duration,
}

/// Connect timeout of both API clients.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Two clients from one inferred configuration: one for single calls, whose reads and writes
/// time out after `api_timeout`, and one for watches, which keeps no read timeout because a
/// watch response stays open for minutes with nothing to read (kube's watcher has its own idle
/// timeout).
async fn clients(api_timeout: Duration) -> Result<(Client, Client), kube::Error> {
    let mut config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    let watches = Client::try_from(config.clone())?;
    config.read_timeout = Some(api_timeout);
    config.write_timeout = Some(api_timeout);
    // The timeout counts from the request, not from when a pooled connection went idle.
    config.reset_reader_on_write = true;
    Ok((Client::try_from(config)?, watches))
}

/// How logs, health reports and backoff keys name an object: `namespace/name`, or `name` for
/// a cluster-scoped one.
fn object_label(meta: &kube::api::ObjectMeta) -> String {
    let name = meta.name.as_deref().unwrap_or_default();
    match meta.namespace.as_deref() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

/// Runs one reconcile under the reconcile timeout, registered as in flight for `/healthz`
/// meanwhile: one the timeout cannot end (a blocked thread) shows there as stuck.
async fn bounded_reconcile<K, F, Fut>(
    controller: &'static str,
    obj: Arc<K>,
    ctx: Arc<Context>,
    reconcile: F,
) -> Result<Action, Error>
where
    K: kube::Resource,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: std::future::Future<Output = Result<Action, Error>>,
{
    let _in_flight = ctx.health.start(controller, object_label(obj.meta()));
    let limit = ctx.reconcile_timeout;
    match tokio::time::timeout(limit, reconcile(obj, ctx.clone())).await {
        Ok(result) => result,
        Err(_) => {
            // The reconcile's own duration sample was cancelled with it.
            ctx.metrics
                .duration
                .get_or_create(&vec![("controller", controller.to_string())])
                .observe(limit.as_secs_f64());
            Err(Error::Timeout(limit))
        }
    }
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No API client could be configured (kubeconfig / in-cluster).
    #[error("configuring the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// The metrics port could not be bound.
    #[error("binding {addr} for /metrics and health: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Leadership was lost; the process exits so it restarts as a candidate.
    #[error("lost leadership: {0}")]
    LostLease(String),
}

fn error_policy<K: kube::Resource<DynamicType = ()>>(
    obj: Arc<K>,
    err: &Error,
    ctx: Arc<Context>,
    controller: &'static str,
) -> Action {
    let key = Backoff::key(controller, obj.meta());
    ctx.metrics
        .errors
        .get_or_create(&vec![
            ("controller", controller.to_string()),
            ("reason", err.reason().to_string()),
        ])
        .inc();
    let wait = ctx.backoff.failure(&key);
    if matches!(err, Error::ChildrenRemain(_)) {
        tracing::info!(object = %key, "{err}");
    } else {
        tracing::warn!(object = %key, retry_in = ?wait, "reconcile failed: {err}");
    }
    Action::requeue(wait)
}

/// A future that resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown requested");
    }
}

/// Runs the operator until SIGTERM (Ok) or until leadership is lost (Err): when no renewal
/// succeeded within the renew deadline the controllers are dropped, cancelling every reconcile
/// in flight, before a standby may take the Lease.
pub async fn run(cfg: OperatorConfig) -> Result<(), RunError> {
    let (client, watch_client) = clients(cfg.api_timeout).await.map_err(RunError::Client)?;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::new(cfg.reconcile_timeout, cfg.lease.renew_deadline));
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: cfg.listen,
            source,
        })?;
    tracing::info!(addr = %cfg.listen, "serving /metrics, /healthz and /readyz");
    let router = metrics::router(metrics.clone(), health.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!("metrics server stopped: {e}");
        }
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = {
        let rx = stop_rx.clone();
        move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        }
    };

    let leases: Api<Lease> = Api::namespaced(client.clone(), &cfg.lease.namespace);
    let m = metrics.clone();
    let held = tokio::select! {
        held = lease::acquire(&leases, &cfg.lease, move || m.ready.store(true, Ordering::Relaxed)) => held,
        _ = stopped() => return Ok(()),
    };
    metrics.leader.set(1);
    health.leading(Some(held.renewed().into_std()));

    let h = health.clone();
    let outcome = tokio::select! {
        why = lease::hold(&leases, &cfg.lease, held, move |at| h.leading(Some(at.into_std()))) => {
            tracing::error!("stopping the controllers: {why}");
            Err(RunError::LostLease(why))
        }
        () = controllers(client, watch_client, metrics.clone(), health.clone(), &cfg, stopped()) => Ok(()),
    };
    metrics.leader.set(0);
    health.leading(None);
    if outcome.is_ok() {
        lease::release(&leases, &cfg.lease).await;
    }
    outcome
}

/// Keeps the ledger's record of the GPUs that pods WhaleFlux does not manage request (they are
/// not free for plans), bumping `trigger` when it changes and setting `listed` once the first
/// complete list is in.
fn foreign_pods(
    client: &Client,
    ledger: Arc<Ledger>,
    trigger: watch::Sender<u64>,
    listed: watch::Sender<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let cfg = watcher::Config::default()
        .labels(&format!("app.kubernetes.io/managed-by!={MANAGED_BY}"))
        .fields("status.phase!=Succeeded,status.phase!=Failed");
    let mut buffer = BTreeMap::new();
    watcher(Api::<Pod>::all(client.clone()), cfg)
        .default_backoff()
        .for_each(move |e| {
            let changed = match e {
                Ok(watcher::Event::Apply(p)) => {
                    ledger.set_pod(&pod_key(&p), crate::status::pool::pod_gpus(&p))
                }
                Ok(watcher::Event::Delete(p)) => ledger.set_pod(&pod_key(&p), None),
                Ok(watcher::Event::Init) => {
                    buffer.clear();
                    false
                }
                Ok(watcher::Event::InitApply(p)) => {
                    if let Some(t) = crate::status::pool::pod_gpus(&p) {
                        buffer.insert(pod_key(&p), t);
                    }
                    false
                }
                Ok(watcher::Event::InitDone) => {
                    listed.send_replace(true);
                    ledger.replace_pods(std::mem::take(&mut buffer))
                }
                Err(e) => {
                    tracing::warn!("watching pods: {e}");
                    false
                }
            };
            if changed {
                recompute_pools(&trigger);
            }
            future::ready(())
        })
}

/// Records every LlmDeployment's plan in the ledger; returns how many deployments there are.
async fn rebuild_ledger(client: &Client, ledger: &Ledger) -> Result<usize, kube::Error> {
    let all: Api<LlmDeployment> = Api::all(client.clone());
    let mut params = kube::api::ListParams::default().limit(500);
    let mut count = 0;
    loop {
        let page = all.list(&params).await?;
        count += page.items.len();
        for d in &page.items {
            if let Some(plan) = d.status.as_ref().and_then(|s| s.plan.as_ref()) {
                ledger.set(&d.spec.gpu_pool, &deployment::key(d), plan);
            }
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(count),
        }
    }
}

/// Both controllers, until `stop` resolves (then they finish the reconciles in flight). `client`
/// makes single calls, `watch_client` holds the watches.
async fn controllers(
    client: Client,
    watch_client: Client,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    cfg: &OperatorConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let concurrency = cfg.concurrency;
    let stop = stop.shared();
    // Nodes: one reflector; every change asks the pool controller to recompute the pools.
    let (node_reader, node_writer) = reflector::store::<Node>();
    let (trigger_tx, trigger_rx) = watch::channel(0u64);
    let node_events = {
        let tx = trigger_tx.clone();
        watcher(
            Api::<Node>::all(watch_client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(trim_node)
        .reflect(node_writer)
        .touched_objects()
        .for_each(move |r| {
            if let Err(e) = r {
                tracing::warn!("watching nodes: {e}");
            } else {
                recompute_pools(&tx);
            }
            future::ready(())
        })
    };
    let node_task = tokio::spawn(node_events);

    let ledger = Arc::new(Ledger::default());
    let (pods_listed_tx, mut pods_listed) = watch::channel(false);
    let pod_events = foreign_pods(
        &watch_client,
        ledger.clone(),
        trigger_tx.clone(),
        pods_listed_tx,
    );
    let pod_task = tokio::spawn(pod_events);
    let abort = || {
        node_task.abort();
        pod_task.abort();
    };

    let pool_ctrl = Controller::new(
        Api::<GpuPool>::all(watch_client.clone()),
        watcher::Config::default(),
    )
    .with_config(
        controller::Config::default()
            .debounce(Duration::from_millis(200))
            .concurrency(concurrency),
    );
    let pools = pool_ctrl.store();
    let instance = std::env::var("POD_NAME").unwrap_or_else(|_| "whaleflux-operator".into());
    let events = events::Publisher::new(client.clone(), "whaleflux-operator", &instance);
    // The groups' StatefulSets: one trimmed cache that both triggers reconciles (a group's
    // pods became ready, a StatefulSet was deleted) and answers what groups exist.
    let (sts_reader, sts_writer) = reflector::store::<StatefulSet>();
    let groups = Arc::new(GroupIndex::default());
    let index = groups.clone();
    let sts_stream = watcher(
        Api::<StatefulSet>::all(watch_client.clone()),
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}")),
    )
    .default_backoff()
    .modify(trim_statefulset)
    .reflect(sts_writer)
    .inspect(move |e| {
        if let Ok(e) = e {
            index.seen(e);
        }
    })
    .touched_objects();
    // The worker pods: a restart, exit or deletion wakes their deployment (failover).
    let (pod_reader, pod_writer) = reflector::store::<Pod>();
    let pod_stream = watcher(
        Api::<Pod>::all(watch_client.clone()),
        watcher::Config::default().labels(&format!(
            "app.kubernetes.io/managed-by={MANAGED_BY},app.kubernetes.io/component=worker"
        )),
    )
    .default_backoff()
    .modify(trim_pod)
    .reflect(pod_writer)
    .touched_objects();
    let ctx = Arc::new(Context {
        client: client.clone(),
        events,
        metrics,
        ledger,
        nodes: node_reader.clone(),
        pools: pools.clone(),
        statefulsets: sts_reader,
        groups,
        pods: pod_reader,
        node_grace: SignedDuration::try_from(cfg.node_grace)
            .unwrap_or(SignedDuration::from_secs(60)),
        failover: Mutex::new(HashMap::new()),
        pool_writes: Mutex::new(HashMap::new()),
        secrets_made: Mutex::new(std::collections::HashSet::new()),
        backoff: Backoff::default(),
        pool_trigger: trigger_tx,
        settings: cfg.settings.clone(),
        health,
        reconcile_timeout: cfg.reconcile_timeout,
    });

    // Rebuild the ledger from the plans the API server holds before planning anything new
    // (in pages, so a large cluster is never held in memory at once).
    loop {
        match rebuild_ledger(&client, &ctx.ledger).await {
            Ok(n) => {
                tracing::info!(deployments = n, "allocation ledger rebuilt");
                break;
            }
            Err(e) => {
                tracing::warn!("listing LlmDeployments to rebuild the ledger: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.clone() => { abort(); return; }
                }
            }
        }
    }
    // Pools are computed from complete node and pod lists, not half-filled ones.
    tokio::select! {
        r = node_reader.wait_until_ready() => if r.is_err() { abort(); return; },
        _ = stop.clone() => { abort(); return; }
    }
    tokio::select! {
        r = pods_listed.wait_for(|l| *l) => if r.is_err() { abort(); return; },
        _ = stop.clone() => { abort(); return; }
    }

    let pool_triggers = stream::unfold(trigger_rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    });
    let pool_run = pool_ctrl
        .reconcile_all_on(pool_triggers)
        .graceful_shutdown_on(stop.clone())
        .run(
            |o, c| bounded_reconcile("gpupool", o, c, pool::reconcile),
            |o, e, c| error_policy(o, e, c, "gpupool"),
            ctx.clone(),
        )
        .for_each(|_| future::ready(()));

    let (llmd_reader, llmd_writer) = reflector::store::<LlmDeployment>();
    let llmd_stream = watcher(
        Api::<LlmDeployment>::all(watch_client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(trim)
    .reflect(llmd_writer)
    .applied_objects()
    // The plan this process chose is remembered until the watch shows it in the status.
    .inspect({
        let ledger = ctx.ledger.clone();
        move |d| {
            if let Ok(d) = d
                && deployment::planned_at_generation(d)
            {
                ledger.forget_recent(&deployment::key(d));
            }
        }
    })
    // Reconcile on what the user changed (spec: generation; deletion and finalizers), not on
    // the operator's own status writes; groups and pools wake it through their own watches.
    .predicate_filter(
        predicates::generation.combine(predicates::finalizers),
        Default::default(),
    );
    let llmds = llmd_reader.clone();
    let llmd_run = Controller::for_stream(llmd_stream, llmd_reader)
        .with_config(controller::Config::default().concurrency(concurrency))
        .owns_stream(sts_stream)
        .watches_stream(pod_stream, |pod: Pod| {
            let name = pod.labels().get("app.kubernetes.io/instance")?.clone();
            Some(ObjectRef::<LlmDeployment>::new(&name).within(&pod.namespace()?))
        })
        .watches(
            Api::<GpuPool>::all(watch_client.clone()),
            watcher::Config::default(),
            move |pool: GpuPool| {
                llmds
                    .state()
                    .into_iter()
                    .filter(|d| deployment::pool_change_matters(d, &pool))
                    .map(|d| ObjectRef::from_obj(d.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(stop.clone())
        .run(
            |o, c| bounded_reconcile("llmdeployment", o, c, deployment::reconcile),
            |o, e, c| error_policy(o, e, c, "llmdeployment"),
            ctx.clone(),
        )
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!("controller: {e}");
            }
            future::ready(())
        });
    tracing::info!("controllers running");
    future::join(pool_run, llmd_run).await;
    abort();
    drop(pools);
    tracing::info!("controllers stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_have_their_own_error_reasons() {
        assert_eq!(Error::Timeout(Duration::from_secs(120)).reason(), "timeout");
        let io = |kind| {
            Error::Kube(kube::Error::Service(Box::new(std::io::Error::new(
                kind, "read",
            ))))
        };
        assert_eq!(io(std::io::ErrorKind::TimedOut).reason(), "api_timeout");
        assert_eq!(
            io(std::io::ErrorKind::ConnectionReset).reason(),
            "transport"
        );
    }
}
