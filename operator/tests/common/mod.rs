//! Helpers shared by the planner tests.
#![allow(dead_code)]

use k8s_openapi::jiff::Timestamp;
use whaleflux_crds::{InterNodeNetwork, Objective, Plan, WeightDtype};
use whaleflux_operator::planner::legality::{kv_heads_per_rank, split_layers, tp_is_legal};
use whaleflux_operator::planner::models::preset;
use whaleflux_operator::planner::{PlanRequest, Pool, Settings};

/// A fixed "now" so quarantine checks do not depend on the clock.
pub fn now() -> Timestamp {
    "2026-06-01T00:00:00Z".parse().expect("timestamp")
}

/// A request for a preset with the given serving limits.
pub fn request(model: &str, dtype: WeightDtype, ctx: u64, seqs: u64, replicas: u32) -> PlanRequest {
    PlanRequest {
        model: preset(model).expect("preset"),
        dtype,
        max_context: ctx,
        max_sequences: seqs,
        replicas,
        tensor_parallel: None,
        pipeline_parallel: None,
        objective: Objective::MinGpus,
        settings: Settings::default(),
    }
}

/// A pool from a `--gpus` string.
pub fn gpus(spec: &str, net: InterNodeNetwork) -> Pool {
    Pool::from_gpus_spec(spec, net).expect("gpus spec")
}

/// Reads a fixture file.
pub fn fixture(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Checks everything a chosen plan must satisfy: legal split, contiguous even layers, memory
/// under usable, placement on usable nodes without over-committing any node's free GPUs.
pub fn assert_legal(req: &PlanRequest, pool: &Pool, plan: &Plan, now: Timestamp) {
    let m = &req.model;
    let tp = plan.tensor_parallel as u32;
    let pp = plan.pipeline_parallel as u32;
    assert!(tp_is_legal(m, tp), "illegal TP {tp}");
    assert!(pp >= 1 && pp <= m.layers, "illegal PP {pp}");
    if let Some(f) = req.tensor_parallel {
        assert_eq!(f, tp);
    }
    if let Some(f) = req.pipeline_parallel {
        assert_eq!(f, pp);
    }
    assert_eq!(
        plan.gpus_per_replica,
        plan.tensor_parallel * plan.pipeline_parallel
    );
    assert_eq!(plan.stages.len() as u32, pp);
    let ranges: Vec<[u32; 2]> = plan
        .stages
        .iter()
        .map(|s| [s.layers[0] as u32, s.layers[1] as u32])
        .collect();
    assert_eq!(ranges, split_layers(m.layers, pp));
    let sizes: Vec<u32> = ranges.iter().map(|r| r[1] - r[0]).collect();
    let (lo, hi) = (sizes.iter().min(), sizes.iter().max());
    assert!(
        hi.zip(lo).is_some_and(|(h, l)| h - l <= 1),
        "uneven {sizes:?}"
    );
    assert!(plan.stages[0].embedding && plan.stages[pp as usize - 1].head);
    let mem = &plan.memory_per_gpu_bytes;
    assert_eq!(
        mem.total,
        mem.weights + mem.kv_cache + mem.activations + mem.overhead
    );
    assert!(mem.total <= mem.usable, "{mem:?}");
    assert!(kv_heads_per_rank(m, tp) >= 1);
    assert!(plan.estimate.decode_tokens_per_second > 0.0);
    assert!(plan.estimate.time_per_token_ms > 0.0);
    // Placement: every group, every node usable and not over-committed.
    assert_eq!(plan.groups.len() as u32, req.replicas);
    let mut used: std::collections::BTreeMap<&str, i32> = Default::default();
    for g in &plan.groups {
        assert_eq!(g.nodes.len() as u32, pp);
        for stage_nodes in &g.nodes {
            let parts: Vec<&str> = stage_nodes.split('+').collect();
            // A stage spans nodes only in a plan that says it crosses nodes.
            assert!(parts.len() == 1 || plan.crosses_nodes, "{stage_nodes}");
            if !plan.crosses_nodes {
                *used.entry(parts[0]).or_default() += plan.tensor_parallel;
            }
        }
    }
    for (name, n) in used {
        let node = pool
            .nodes
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("unknown node {name}"));
        assert!(node.ready, "{name} is not ready");
        assert!(
            node.quarantined_until.as_ref().is_none_or(|t| t.0 <= now),
            "{name} is quarantined"
        );
        assert!(
            n <= node.allocatable.min(node.gpu_count),
            "{name} over-committed: {n}"
        );
    }
}
