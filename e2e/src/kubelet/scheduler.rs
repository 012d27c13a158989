//! The scheduler: binds pending pods to Ready nodes that fit.

use super::*;

/// The scheduler: bind each pending pod to the first Ready node whose labels satisfy its node
/// selector and required node affinity and that has the GPUs it asks for.
pub(super) fn schedule(st: &AppState, inner: &Mutex<Inner>) {
    let not_ready = inner
        .lock()
        .map(|g| g.not_ready.clone())
        .unwrap_or_default();
    let (nodes, _) = st.store.list("", "nodes", None);
    let (pods, _) = st.store.list("", "pods", None);
    let mut used: HashMap<String, u32> = HashMap::new();
    for (_, p) in &pods {
        if let Some(n) = p["spec"]["nodeName"].as_str().filter(|_| !terminal(p)) {
            *used.entry(n.to_string()).or_default() += gpu_request(p);
        }
    }
    for (k, pod) in pods {
        if pod["spec"]["nodeName"]
            .as_str()
            .is_some_and(|n| !n.is_empty())
            || !pod["metadata"]["deletionTimestamp"].is_null()
        {
            continue;
        }
        let want = gpu_request(&pod);
        let selector = pod["spec"]["nodeSelector"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let fit = nodes.iter().find(|(_, n)| {
            let name = n["metadata"]["name"].as_str().unwrap_or_default();
            let labels = &n["metadata"]["labels"];
            let free = quantity(&n["status"]["allocatable"]["nvidia.com/gpu"])
                .saturating_sub(used.get(name).copied().unwrap_or(0));
            condition_true(n, "Ready")
                && !not_ready.iter().any(|x| x == name)
                && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                && affinity_ok(&pod, n)
                && free >= want
        });
        match fit {
            Some((_, n)) => {
                let node = n["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                *used.entry(node.clone()).or_default() += want;
                modify(st, &k, |p| {
                    p["spec"]["nodeName"] = json!(node);
                    set_condition(p, "PodScheduled", true, "", "");
                });
            }
            None => {
                let msg = format!(
                    "0/{} nodes are available: no node matches the pod's node selector, affinity and nvidia.com/gpu request ({want}).",
                    nodes.len()
                );
                modify(st, &k, |p| {
                    set_condition(p, "PodScheduled", false, "Unschedulable", &msg)
                });
            }
        }
    }
}
