//! The GpuPool status: matching Nodes → `status.nodes`, totals and conditions, as a pure
//! function of the pool, the nodes, the GPUs taken (by WhaleFlux plans and by other pods) and
//! the clock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Container, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use whaleflux_crds::{GpuPool, GpuPoolStatus, PoolNode};

use super::condition;
use crate::planner::catalog;

/// Node label with the GPU product (GPU feature discovery).
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
/// Extended resource of NVIDIA GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Node labels naming an NVLink domain, first found wins: GPU feature discovery's multi-node
/// NVLink clique, then WhaleFlux's own label for hand-labelled racks.
pub const NVLINK_DOMAIN_LABELS: &[&str] = &["nvidia.com/gpu.clique", "whaleflux.io/nvlink-domain"];
/// Node annotation (RFC 3339 time) keeping the node out of plans until then.
pub const QUARANTINE_ANNOTATION: &str = "whaleflux.io/quarantined-until";

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

fn allocatable_gpus(node: &Node) -> Option<i32> {
    let q = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get(GPU_RESOURCE))?;
    q.0.trim().parse::<i32>().ok()
}

/// The node a pod is bound to and the GPUs it takes there, as the scheduler counts them: the
/// larger of the sum over its containers and the largest init container (a request, or the
/// limit where only a limit is set). `None` for pods that take none: unbound, finished, or
/// without GPU requests.
pub fn pod_gpus(pod: &Pod) -> Option<(String, i32)> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let gpus = |c: &Container| -> i32 {
        let r = c.resources.as_ref();
        r.and_then(|r| r.requests.as_ref())
            .and_then(|q| q.get(GPU_RESOURCE))
            .or_else(|| {
                r.and_then(|r| r.limits.as_ref())
                    .and_then(|q| q.get(GPU_RESOURCE))
            })
            .and_then(|q| q.0.trim().parse::<i32>().ok())
            .unwrap_or(0)
            .max(0)
    };
    let main: i32 = spec.containers.iter().map(gpus).sum();
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .map(gpus)
        .max()
        .unwrap_or(0);
    let n = main.max(init);
    (n > 0).then_some((node, n))
}

/// Whether `node` carries every label of `selector` (an empty selector selects all).
pub fn selects(selector: &BTreeMap<String, String>, node: &Node) -> bool {
    let labels = node.labels();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The pool's status from the nodes matching its selector, the GPUs taken on them (`used`: by plans and other pods),
/// the previous conditions (kept unchanged when their status is the same) and the time.
pub fn pool_status(
    pool: &GpuPool,
    nodes: &[Arc<Node>],
    used: &BTreeMap<String, i32>,
    now: Timestamp,
) -> GpuPoolStatus {
    let over = pool.spec.gpu.as_ref();
    let mut out = Vec::new();
    let mut unknown: BTreeSet<String> = BTreeSet::new();
    let mut models: BTreeSet<String> = BTreeSet::new();
    let mut matched: Vec<&Arc<Node>> = nodes
        .iter()
        .filter(|n| selects(&pool.spec.node_selector, n))
        .collect();
    matched.sort_by_key(|n| n.name_any());
    for node in matched {
        let name = node.name_any();
        let labels = node.labels();
        let product = labels.get(GPU_PRODUCT_LABEL).cloned();
        let mut reasons = Vec::new();
        let model = match (product, over) {
            (_, Some(o)) => o.model.clone(),
            (Some(p), None) => p,
            (None, None) => {
                reasons.push(format!(
                    "no {GPU_PRODUCT_LABEL} label; set spec.gpu.model in the GpuPool"
                ));
                String::new()
            }
        };
        if !model.is_empty() {
            match catalog::lookup(&model) {
                Ok(spec) => {
                    models.insert(spec.short_name.to_string());
                }
                Err(_) => {
                    unknown.insert(model.clone());
                    reasons.push(format!(
                        "unknown GPU model {model:?}; set spec.gpu.model to one of {}",
                        catalog::short_names().join(", ")
                    ));
                }
            }
        }
        let gpu_count = over
            .and_then(|o| o.per_node)
            .or_else(|| allocatable_gpus(node))
            .unwrap_or(0)
            .max(0);
        if gpu_count == 0 {
            reasons.push(format!("no allocatable {GPU_RESOURCE}"));
        }
        let ready = node_ready(node);
        if !ready {
            reasons.push("node is not Ready".into());
        }
        let cordoned = node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        if cordoned {
            reasons.push("node is cordoned (spec.unschedulable)".into());
        }
        let quarantined_until = node
            .annotations()
            .get(QUARANTINE_ANNOTATION)
            .and_then(|t| t.parse::<Timestamp>().ok())
            .filter(|t| *t > now);
        if let Some(t) = quarantined_until {
            reasons.push(format!("quarantined until {t}"));
        }
        let allocatable = (gpu_count - used.get(&name).copied().unwrap_or(0)).max(0);
        let domain = NVLINK_DOMAIN_LABELS
            .iter()
            .find_map(|l| labels.get(*l).cloned());
        out.push(PoolNode {
            name,
            gpu_model: model,
            gpu_count,
            allocatable,
            nvlink_domain: domain,
            ready: ready && !cordoned,
            quarantined_until: quarantined_until.map(Time),
            reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
        });
    }
    let healthy: Vec<&PoolNode> = out
        .iter()
        .filter(|n| n.ready && n.quarantined_until.is_none() && n.reason.is_none())
        .collect();
    let healthy_gpus: i32 = healthy.iter().map(|n| n.gpu_count).sum();
    let total_gpus: i32 = out.iter().map(|n| n.gpu_count).sum();
    let generation = pool.metadata.generation;
    let previous = pool
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let ready = if healthy_gpus > 0 {
        condition(
            "Ready",
            true,
            "GpusAvailable",
            format!(
                "{healthy_gpus} GPUs on {} healthy nodes of {}",
                healthy.len(),
                out.len()
            ),
            generation,
            &previous,
            now,
        )
    } else {
        condition(
            "Ready",
            false,
            if out.is_empty() {
                "NoMatchingNodes"
            } else {
                "NoHealthyGpus"
            },
            if out.is_empty() {
                "no node carries the labels of spec.nodeSelector".to_string()
            } else {
                "no matching node is Ready, unquarantined and has GPUs".to_string()
            },
            generation,
            &previous,
            now,
        )
    };
    let unhealthy: Vec<String> = out
        .iter()
        .filter(|n| n.reason.is_some())
        .map(|n| format!("{}: {}", n.name, n.reason.clone().unwrap_or_default()))
        .collect();
    let degraded = if !unknown.is_empty() {
        condition(
            "Degraded",
            true,
            "UnknownGpuModel",
            format!(
                "GPU model(s) {} are not in the catalog; set spec.gpu.model to one of {}",
                unknown.into_iter().collect::<Vec<_>>().join(", "),
                catalog::short_names().join(", ")
            ),
            generation,
            &previous,
            now,
        )
    } else if !unhealthy.is_empty() {
        condition(
            "Degraded",
            true,
            "NodesUnavailable",
            truncate(unhealthy.join("; ")),
            generation,
            &previous,
            now,
        )
    } else {
        condition(
            "Degraded",
            false,
            "AllNodesHealthy",
            "every matching node is usable".into(),
            generation,
            &previous,
            now,
        )
    };
    GpuPoolStatus {
        observed_generation: generation,
        gpu_models: (!models.is_empty()).then(|| models.into_iter().collect::<Vec<_>>().join(",")),
        total_nodes: out.len() as i32,
        total_gpus,
        healthy_nodes: healthy.len() as i32,
        healthy_gpus,
        nodes: out,
        conditions: vec![ready, degraded],
    }
}

fn truncate(mut s: String) -> String {
    const MAX: usize = 1024;
    if s.len() > MAX {
        let mut cut = MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use whaleflux_crds::{GpuOverride, GpuPoolSpec};

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("pod")
    }

    /// GPUs a pod takes: requests, else limits; containers summed, init containers maxed;
    /// unbound, finished and GPU-less pods take none.
    #[test]
    fn pod_gpus_counts_like_the_scheduler() {
        let gpu = |req: Option<&str>, lim: Option<&str>| {
            let mut r = serde_json::Map::new();
            if let Some(q) = req {
                r.insert("requests".into(), serde_json::json!({GPU_RESOURCE: q}));
            }
            if let Some(q) = lim {
                r.insert("limits".into(), serde_json::json!({GPU_RESOURCE: q}));
            }
            serde_json::json!({"name": "c", "resources": r})
        };
        let bound =
            |containers: Vec<serde_json::Value>, init: Vec<serde_json::Value>, phase: &str| {
                pod(serde_json::json!({
                    "metadata": {"name": "p", "namespace": "ml"},
                    "spec": {"nodeName": "n1", "containers": containers, "initContainers": init},
                    "status": {"phase": phase},
                }))
            };
        assert_eq!(
            pod_gpus(&bound(
                vec![gpu(Some("2"), Some("2")), gpu(None, Some("1"))],
                vec![],
                "Running"
            )),
            Some(("n1".into(), 3))
        );
        assert_eq!(
            pod_gpus(&bound(
                vec![gpu(Some("1"), None)],
                vec![gpu(None, Some("4"))],
                "Pending"
            )),
            Some(("n1".into(), 4))
        );
        assert_eq!(
            pod_gpus(&bound(vec![gpu(Some("2"), None)], vec![], "Succeeded")),
            None
        );
        assert_eq!(
            pod_gpus(&bound(vec![gpu(Some("2"), None)], vec![], "Failed")),
            None
        );
        assert_eq!(
            pod_gpus(&bound(vec![gpu(None, None)], vec![], "Running")),
            None
        );
        let unbound = pod(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [gpu(Some("2"), None)]},
        }));
        assert_eq!(pod_gpus(&unbound), None);
    }

    /// Other pods' GPUs count as taken for planning and in the pool status; a restarted watch
    /// replaces the record.
    fn node(name: &str, product: Option<&str>, gpus: &str, ready: bool) -> Arc<Node> {
        let mut labels = serde_json::Map::new();
        labels.insert("pool".into(), "a".into());
        if let Some(p) = product {
            labels.insert(GPU_PRODUCT_LABEL.into(), p.into());
        }
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": labels},
                "status": {"allocatable": {GPU_RESOURCE: gpus},
                           "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
            }))
            .expect("node"),
        )
    }

    fn pool(over: Option<GpuOverride>) -> GpuPool {
        let mut p = GpuPool::new(
            "p",
            GpuPoolSpec {
                node_selector: [("pool".to_string(), "a".to_string())].into(),
                gpu: over,
                ..GpuPoolSpec::default()
            },
        );
        p.metadata.generation = Some(3);
        p
    }

    fn now() -> Timestamp {
        "2026-06-01T00:00:00Z".parse().expect("time")
    }

    #[test]
    fn nodes_become_capacity_with_allocations_subtracted() {
        let nodes = vec![
            node("b", Some("NVIDIA-H100-80GB-HBM3"), "8", true),
            node("a", Some("NVIDIA-H100-80GB-HBM3"), "8", true),
            node("down", Some("NVIDIA-H100-80GB-HBM3"), "8", false),
        ];
        let used = BTreeMap::from([("a".to_string(), 3)]);
        let s = pool_status(&pool(None), &nodes, &used, now());
        let names: Vec<_> = s.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "down"]);
        assert_eq!(s.nodes[0].allocatable, 5);
        assert_eq!(s.nodes[1].allocatable, 8);
        assert_eq!((s.total_gpus, s.healthy_gpus, s.healthy_nodes), (24, 16, 2));
        assert_eq!(s.gpu_models.as_deref(), Some("H100"));
        assert_eq!(s.observed_generation, Some(3));
        let degraded = &s.conditions[1];
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "NodesUnavailable")
        );
        assert!(degraded.message.contains("down: node is not Ready"));
    }

    #[test]
    fn unknown_gpu_is_degraded_and_the_override_fixes_it() {
        let nodes = vec![node("a", Some("NVIDIA-B300"), "8", true)];
        let s = pool_status(&pool(None), &nodes, &BTreeMap::new(), now());
        assert_eq!(s.conditions[1].reason, "UnknownGpuModel");
        assert_eq!(s.conditions[0].status, "False");
        let fixed = pool(Some(GpuOverride {
            model: "H100".into(),
            per_node: Some(4),
        }));
        let s = pool_status(&fixed, &nodes, &BTreeMap::new(), now());
        assert_eq!(s.conditions[1].status, "False");
        assert_eq!(s.nodes[0].gpu_count, 4);
    }

    #[test]
    fn quarantine_and_cordon_take_nodes_out() {
        let mut q = (*node("q", Some("H100"), "8", true)).clone();
        q.metadata.annotations = Some(
            [(
                QUARANTINE_ANNOTATION.to_string(),
                "2026-06-01T00:30:00Z".to_string(),
            )]
            .into(),
        );
        let mut c = (*node("c", Some("H100"), "8", true)).clone();
        c.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        let s = pool_status(
            &pool(None),
            &[Arc::new(q), Arc::new(c)],
            &BTreeMap::new(),
            now(),
        );
        assert!(s.nodes.iter().all(|n| n.reason.is_some()));
        assert!(s.nodes[1].quarantined_until.is_some());
        assert!(!s.nodes[0].ready, "cordoned");
        assert_eq!(s.healthy_gpus, 0);
        // After the quarantine the node is back.
        let later: Timestamp = "2026-06-01T01:00:00Z".parse().expect("time");
        let mut q2 = (*node("q", Some("H100"), "8", true)).clone();
        q2.metadata.annotations = s.nodes.get(1).map(|_| {
            [(
                QUARANTINE_ANNOTATION.to_string(),
                "2026-06-01T00:30:00Z".to_string(),
            )]
            .into()
        });
        let s = pool_status(&pool(None), &[Arc::new(q2)], &BTreeMap::new(), later);
        assert_eq!(s.healthy_gpus, 8);
    }

    #[test]
    fn conditions_keep_their_transition_time_while_unchanged() {
        let nodes = vec![node("a", Some("H100"), "8", true)];
        let mut p = pool(None);
        let first = pool_status(&p, &nodes, &BTreeMap::new(), now());
        p.status = Some(first.clone());
        let later: Timestamp = "2026-06-01T02:00:00Z".parse().expect("time");
        let second = pool_status(&p, &nodes, &BTreeMap::new(), later);
        assert_eq!(first, second, "same input, same status: no write");
    }

    #[test]
    fn selectors_need_every_label_and_long_reasons_are_cut_on_a_char_boundary() {
        let n = node("a", Some("H100"), "8", true);
        let sel = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(selects(&sel(&[]), &n));
        assert!(selects(&sel(&[("pool", "a")]), &n));
        assert!(!selects(&sel(&[("pool", "b")]), &n));
        assert!(!selects(&sel(&[("pool", "a"), ("zone", "x")]), &n));
        assert_eq!(truncate("x".repeat(1024)), "x".repeat(1024));
        // 1 + 600 x 2 bytes: byte 1024 falls inside an "é", so the cut is at 1023.
        let cut = truncate(format!("x{}", "é".repeat(600)));
        assert_eq!(cut, format!("x{}…", "é".repeat(511)));
    }

    #[test]
    fn a_quarantine_ending_now_is_over() {
        let mut q = (*node("q", Some("H100"), "8", true)).clone();
        q.metadata.annotations = Some(
            [(
                QUARANTINE_ANNOTATION.to_string(),
                "2026-06-01T00:00:00Z".to_string(),
            )]
            .into(),
        );
        let s = pool_status(&pool(None), &[Arc::new(q)], &BTreeMap::new(), now());
        assert_eq!(s.nodes[0].quarantined_until, None);
        assert!(
            s.nodes[0].ready && s.nodes[0].reason.is_none(),
            "{:?}",
            s.nodes[0]
        );
    }
}
