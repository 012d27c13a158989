//! The allocation ledger: which GPUs on which node WhaleFlux plans hold (per pool and
//! deployment) and which other pods take. Both controllers share it, so two deployments are
//! never planned onto the same GPUs, nor onto GPUs another workload uses.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// GPUs taken on each node: those WhaleFlux plans hold, per pool and deployment, and those other
/// pods bound to the node request. It is the one record both controllers share, so two
/// deployments are never planned onto the same GPUs nor onto GPUs another workload uses. The
/// plans are rebuilt from every LlmDeployment's `status.plan` when the operator starts; the pods
/// come from a watch.
#[derive(Debug, Default)]
pub struct Ledger {
    inner: Mutex<Book>,
    /// Pods not managed by WhaleFlux that request GPUs: namespace/name → (node, GPUs).
    pods: Mutex<BTreeMap<String, (String, i32)>>,
    /// The plan last chosen per deployment and the generation it was chosen for: a reconcile
    /// that runs before our own status write reaches the watch cache reuses it instead of
    /// planning (and announcing) again.
    recent: Mutex<BTreeMap<String, (Option<i64>, whaleflux_crds::Plan)>>,
}

impl Ledger {
    /// Plans under the lock: `plan` gets the GPUs others hold on `pool` per node; what it returns
    /// is recorded for `key` before anyone else can plan. Returns the plan and whether the
    /// record changed.
    pub fn plan_and_record<E>(
        &self,
        pool: &str,
        key: &str,
        plan: impl FnOnce(&BTreeMap<String, i32>) -> Result<whaleflux_crds::Plan, E>,
    ) -> Result<(whaleflux_crds::Plan, bool), E> {
        let mut inner = self.lock();
        let mut used = used_in(&inner, pool, Some(key));
        self.add_pods(&mut used);
        let p = plan(&used)?;
        let changed = set_in(&mut inner, pool, key, &p);
        Ok((p, changed))
    }

    /// Records `plan` as what deployment `key` holds on `pool` (replacing what it held
    /// anywhere); true when that changed the record.
    pub fn set(&self, pool: &str, key: &str, plan: &whaleflux_crds::Plan) -> bool {
        set_in(&mut self.lock(), pool, key, plan)
    }

    /// Remembers `plan` as chosen for `key` at `generation`.
    pub fn remember(&self, key: &str, generation: Option<i64>, plan: &whaleflux_crds::Plan) {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), (generation, plan.clone()));
    }

    /// The plan chosen for `key` at `generation`, if this process chose one.
    pub fn recent(&self, key: &str, generation: Option<i64>) -> Option<whaleflux_crds::Plan> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .filter(|(g, _)| *g == generation)
            .map(|(_, p)| p.clone())
    }

    /// Forgets the plan remembered for `key` (the watch cache has it now).
    pub fn forget_recent(&self, key: &str) {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Forgets what deployment `key` held (it is gone).
    pub fn remove(&self, key: &str) -> bool {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        self.lock().remove(key)
    }

    /// GPUs taken on each node of `pool`: by plans other than deployment `except`'s, and by
    /// other pods.
    pub fn used(&self, pool: &str, except: Option<&str>) -> BTreeMap<String, i32> {
        let mut used = used_in(&self.lock(), pool, except);
        self.add_pods(&mut used);
        used
    }

    /// Records what pod `key` (namespace/name) takes: `Some((node, gpus))`, or `None` when it
    /// takes nothing (gone, finished, unbound, no GPUs). True when that changed the record.
    pub fn set_pod(&self, key: &str, takes: Option<(String, i32)>) -> bool {
        let mut pods = self.lock_pods();
        match takes {
            Some(t) => pods.insert(key.to_string(), t.clone()) != Some(t),
            None => pods.remove(key).is_some(),
        }
    }

    /// Replaces every pod record (a watch that started over); true when that changed it.
    pub fn replace_pods(&self, all: BTreeMap<String, (String, i32)>) -> bool {
        let mut pods = self.lock_pods();
        let changed = *pods != all;
        *pods = all;
        changed
    }

    fn add_pods(&self, used: &mut BTreeMap<String, i32>) {
        for (node, gpus) in self.lock_pods().values() {
            *used.entry(node.clone()).or_default() += gpus;
        }
    }

    fn lock_pods(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (String, i32)>> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What plans hold: per deployment (namespace/name) its pool and GPUs per node, and per pool
/// the running total per node, so what others hold costs one map of the pool's nodes to read,
/// not a walk over every deployment.
#[derive(Debug, Default)]
struct Book {
    held: BTreeMap<String, (String, BTreeMap<String, i32>)>,
    totals: BTreeMap<String, BTreeMap<String, i32>>,
}

impl Book {
    fn add(&mut self, pool: &str, held: &BTreeMap<String, i32>, sign: i32) {
        let totals = self.totals.entry(pool.to_string()).or_default();
        for (node, gpus) in held {
            let t = totals.entry(node.clone()).or_default();
            *t += sign * gpus;
            if *t == 0 {
                totals.remove(node);
            }
        }
    }

    /// Forgets what `key` held; true when it held something.
    fn remove(&mut self, key: &str) -> bool {
        match self.held.remove(key) {
            Some((pool, held)) => {
                self.add(&pool, &held, -1);
                true
            }
            None => false,
        }
    }
}

fn used_in(inner: &Book, pool: &str, except: Option<&str>) -> BTreeMap<String, i32> {
    let mut out = inner.totals.get(pool).cloned().unwrap_or_default();
    if let Some((p, held)) = except.and_then(|k| inner.held.get(k))
        && p == pool
    {
        for (node, gpus) in held {
            if let Some(t) = out.get_mut(node) {
                *t -= gpus;
                if *t <= 0 {
                    out.remove(node);
                }
            }
        }
    }
    out
}

fn set_in(inner: &mut Book, pool: &str, key: &str, plan: &whaleflux_crds::Plan) -> bool {
    let mut held: BTreeMap<String, i32> = BTreeMap::new();
    let groups: Vec<Vec<String>> = if plan.groups.is_empty() {
        vec![plan.stages.iter().map(|s| s.node.clone()).collect()]
    } else {
        plan.groups.iter().map(|g| g.nodes.clone()).collect()
    };
    for nodes in groups.iter().take(plan.replicas.max(0) as usize) {
        for n in nodes {
            *held.entry(n.clone()).or_default() += plan.tensor_parallel.max(1);
        }
    }
    if inner
        .held
        .get(key)
        .is_some_and(|(p, h)| p == pool && *h == held)
    {
        return false;
    }
    inner.remove(key);
    inner.add(pool, &held, 1);
    inner.held.insert(key.to_string(), (pool.to_string(), held));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_adds_other_pods_gpus() {
        let l = Ledger::default();
        assert!(l.set_pod("ml/a", Some(("n1".into(), 2))));
        assert!(!l.set_pod("ml/a", Some(("n1".into(), 2))));
        assert!(l.set_pod("ml/b", Some(("n2".into(), 1))));
        assert_eq!(
            l.used("pool", None),
            BTreeMap::from([("n1".into(), 2), ("n2".into(), 1)])
        );
        assert!(l.set_pod("ml/b", None));
        assert!(!l.set_pod("ml/b", None));
        assert_eq!(l.used("pool", None), BTreeMap::from([("n1".into(), 2)]));
        assert!(l.replace_pods(BTreeMap::from([("ml/c".into(), ("n3".into(), 4))])));
        assert_eq!(l.used("pool", None), BTreeMap::from([("n3".into(), 4)]));
    }

    #[test]
    fn ledger_records_plans_and_releases_them() {
        let plan: whaleflux_crds::Plan = serde_json::from_value(serde_json::json!({
            "model": "m", "dtype": "bf16", "gpuModel": "H100", "objective": "MinGpus",
            "tensorParallel": 2, "pipelineParallel": 2, "replicas": 2, "gpusPerReplica": 4,
            "crossesNodes": false,
            "stages": [{"index": 0, "layers": [0, 5], "node": "a", "gpus": 2},
                       {"index": 1, "layers": [5, 10], "node": "b", "gpus": 2}],
            "groups": [{"index": 0, "nodes": ["a", "b"]}, {"index": 1, "nodes": ["a", "a"]}],
            "memoryPerGpuBytes": {"weights": 0, "kvCache": 0, "activations": 0, "overhead": 0, "total": 0, "usable": 0},
            "estimate": {"timePerTokenMs": 1.0, "decodeTokensPerSecond": 1.0, "concurrency": 1}
        }))
        .expect("plan");
        let l = Ledger::default();
        assert!(l.set("p", "ns/x", &plan));
        assert!(!l.set("p", "ns/x", &plan), "same plan, no change");
        assert_eq!(
            l.used("p", None),
            BTreeMap::from([("a".to_string(), 6), ("b".to_string(), 2)])
        );
        assert!(l.used("p", Some("ns/x")).is_empty());
        let (_, changed) = l
            .plan_and_record("p", "ns/y", |used| {
                assert_eq!(used.get("a"), Some(&6), "y sees x's GPUs");
                Ok::<_, ()>(plan.clone())
            })
            .expect("plan");
        assert!(changed);
        assert!(l.remove("ns/x"));
        assert!(!l.remove("ns/x"));
        assert_eq!(l.used("p", None).get("a"), Some(&6));
    }
}
