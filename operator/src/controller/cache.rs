//! What the operator caches of the cluster, and how: objects trimmed to what the reconciles
//! read before they are stored, and an index of each deployment's groups.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Node, Pod, PodSpec};
use kube::ResourceExt;
use kube::runtime::watcher;

/// Group numbers with a StatefulSet, per deployment (`namespace/name`), fed by the StatefulSet
/// watch: a reconcile looks its groups up by name instead of scanning every StatefulSet. It may
/// name groups that have gone (a deletion missed while a watch was down); lookups drop those.
#[derive(Debug, Default)]
pub struct GroupIndex(Mutex<HashMap<String, BTreeSet<i32>>>);

impl GroupIndex {
    fn key_of(sts: &StatefulSet) -> Option<(String, i32)> {
        let labels = sts.labels();
        let instance = labels.get("app.kubernetes.io/instance")?;
        let index = labels
            .get(crate::resources::children::GROUP_LABEL)?
            .parse()
            .ok()?;
        Some((
            format!("{}/{instance}", sts.namespace().unwrap_or_default()),
            index,
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeSet<i32>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn seen(&self, event: &watcher::Event<StatefulSet>) {
        match event {
            watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                if let Some((k, i)) = Self::key_of(s) {
                    self.lock().entry(k).or_default().insert(i);
                }
            }
            watcher::Event::Delete(s) => {
                if let Some((k, i)) = Self::key_of(s) {
                    self.forget(&k, i);
                }
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }

    /// The group numbers deployment `key` may have.
    pub fn indices(&self, key: &str) -> Vec<i32> {
        self.lock()
            .get(key)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Group `index` of deployment `key` has no StatefulSet.
    pub fn forget(&self, key: &str, index: i32) {
        let mut m = self.lock();
        if let Some(set) = m.get_mut(key) {
            set.remove(&index);
            if set.is_empty() {
                m.remove(key);
            }
        }
    }
}

/// What the operator caches of any object: not the managed fields (often the largest part of
/// a small object, and never read).
pub(super) fn trim<K: kube::Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

/// What the operator caches of a group's StatefulSet: its labels and owner, replicas, the config
/// hash on its pod template and its status; not the pod spec and selector it wrote itself.
pub(super) fn trim_statefulset(sts: &mut StatefulSet) {
    trim(sts);
    sts.metadata.annotations = None;
    if let Some(spec) = sts.spec.as_mut() {
        spec.template.spec = None;
        if let Some(m) = spec.template.metadata.as_mut() {
            m.labels = None;
        }
        spec.selector = Default::default();
        spec.volume_claim_templates = None;
        spec.update_strategy = None;
        spec.persistent_volume_claim_retention_policy = None;
    }
}

/// What the operator caches of a worker pod: what failover reads (labels, annotations, times,
/// its node, phase and container states), not its spec.
pub(super) fn trim_pod(pod: &mut Pod) {
    trim(pod);
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    pod.spec = Some(PodSpec {
        node_name: node,
        containers: Vec::new(),
        ..PodSpec::default()
    });
    if let Some(status) = pod.status.as_mut() {
        status.conditions = None;
        status.init_container_statuses = None;
    }
}

/// What the operator caches of a Node: not its image list (hundreds of entries on a busy node).
pub(super) fn trim_node(node: &mut Node) {
    trim(node);
    if let Some(status) = node.status.as_mut() {
        status.images = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sts(ns: &str, instance: &str, group: &str) -> StatefulSet {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("{instance}-g{group}"), "namespace": ns,
                "labels": {"app.kubernetes.io/instance": instance, "whaleflux.io/group": group}}
        }))
        .expect("statefulset")
    }

    /// The index follows applied and deleted StatefulSets per deployment; a lookup that finds
    /// none forgets the group.
    #[test]
    fn group_index_follows_the_statefulset_watch() {
        let idx = GroupIndex::default();
        idx.seen(&watcher::Event::InitApply(sts("ml", "a", "0")));
        idx.seen(&watcher::Event::Apply(sts("ml", "a", "2")));
        idx.seen(&watcher::Event::Apply(sts("other", "a", "1")));
        assert_eq!(idx.indices("ml/a"), vec![0, 2]);
        assert_eq!(idx.indices("other/a"), vec![1]);
        idx.seen(&watcher::Event::Delete(sts("ml", "a", "0")));
        assert_eq!(idx.indices("ml/a"), vec![2]);
        idx.forget("ml/a", 2);
        assert!(idx.indices("ml/a").is_empty());
        // Objects without the group label are not indexed.
        let mut bare = sts("ml", "b", "0");
        bare.metadata.labels = None;
        idx.seen(&watcher::Event::Apply(bare));
        assert!(idx.indices("ml/b").is_empty());
    }

    /// The cached StatefulSet keeps what group_state and the owner mapping read, nothing else.
    #[test]
    fn trimmed_statefulsets_keep_what_the_reconcile_reads() {
        let mut s: StatefulSet = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a-g0", "namespace": "ml", "labels": {"whaleflux.io/group": "0"},
                "annotations": {"x": "y"}, "ownerReferences": [{"apiVersion": "whaleflux.io/v1alpha1",
                "kind": "LlmDeployment", "name": "a", "uid": "u"}],
                "managedFields": [{"manager": "m"}]},
            "spec": {"replicas": 2, "serviceName": "a-g0", "selector": {"matchLabels": {"k": "v"}},
                "template": {"metadata": {"labels": {"k": "v"}, "annotations": {"whaleflux.io/config-hash": "h"}},
                    "spec": {"containers": [{"name": "w", "image": "i"}]}}},
            "status": {"replicas": 2, "readyReplicas": 1}
        }))
        .expect("statefulset");
        trim_statefulset(&mut s);
        let spec = s.spec.as_ref().expect("spec");
        assert!(spec.template.spec.is_none() && s.metadata.managed_fields.is_none());
        assert_eq!(spec.replicas, Some(2));
        let hash = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref());
        assert_eq!(
            hash.and_then(|a| a.get("whaleflux.io/config-hash"))
                .map(String::as_str),
            Some("h")
        );
        assert_eq!(s.metadata.owner_references.as_ref().map(Vec::len), Some(1));
        assert_eq!(s.status.as_ref().and_then(|st| st.ready_replicas), Some(1));
    }
}
