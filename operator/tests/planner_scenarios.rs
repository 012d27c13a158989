//! A table of planning scenarios with the plan each must produce.

mod common;

use common::{assert_legal, fixture, gpus, now, request};
use whaleflux_crds::InterNodeNetwork::{Ethernet, InfiniBand};
use whaleflux_crds::{Objective, WeightDtype};
use whaleflux_operator::plan_cmd::parse_pool;
use whaleflux_operator::planner::{PlanError, PlanRequest, Pool, plan};

/// What a scenario must produce.
enum Expect {
    /// GPU model, TP, PP, crosses nodes, nodes of group 0's stages.
    Plan(&'static str, i32, i32, bool, &'static [&'static str]),
    /// An error whose message contains this text, and whether it is infeasible (exit 2).
    Error(&'static str, bool),
}

struct Case {
    name: &'static str,
    request: PlanRequest,
    pool: Pool,
    expect: Expect,
}

fn with(mut r: PlanRequest, tp: Option<u32>, pp: Option<u32>, obj: Objective) -> PlanRequest {
    r.tensor_parallel = tp;
    r.pipeline_parallel = pp;
    r.objective = obj;
    r
}

fn fixture_pool(name: &str) -> Pool {
    Pool::from_gpu_pool(&parse_pool(&fixture(name)).expect("fixture pool"))
}

fn cases() -> Vec<Case> {
    use Expect::{Error, Plan};
    use Objective::{MaxThroughput, MinGpus, MinLatency};
    use WeightDtype::{Bf16, Fp8, Q4_1};
    let smol = || request("smollm2-135m", Q4_1, 2048, 8, 1);
    vec![
        Case {
            name: "small model on one RTX 4090 takes one GPU",
            request: smol(),
            pool: gpus("1x4xRTX4090", Ethernet),
            expect: Plan("RTX4090", 1, 1, false, &["node-0"]),
        },
        Case {
            name: "fixed TP 3 is honoured for SmolLM2",
            request: with(smol(), Some(3), None, MinGpus),
            pool: gpus("1x4xRTX4090", Ethernet),
            expect: Plan("RTX4090", 3, 1, false, &["node-0"]),
        },
        Case {
            name: "fixed TP 2 does not divide 9 heads",
            request: with(smol(), Some(2), None, MinGpus),
            pool: gpus("1x4xRTX4090", Ethernet),
            expect: Error(
                "tensor parallel 2 does not divide the 9 attention heads of smollm2-135m; legal: 1, 3, 9",
                true,
            ),
        },
        Case {
            name: "fixed PP beyond the layers",
            request: with(smol(), None, Some(31), MinGpus),
            pool: gpus("1x4xRTX4090", Ethernet),
            expect: Error(
                "pipeline parallel 31 is not between 1 and the 30 layers",
                true,
            ),
        },
        Case {
            name: "fixed TP 1 x PP 4 spreads stages over a node",
            request: with(smol(), Some(1), Some(4), MinGpus),
            pool: gpus("1x4xRTX4090", Ethernet),
            expect: Plan(
                "RTX4090",
                1,
                4,
                false,
                &["node-0", "node-0", "node-0", "node-0"],
            ),
        },
        Case {
            name: "8B on one H100",
            request: request("llama-3.1-8b", Bf16, 8192, 16, 1),
            pool: gpus("1x1xH100", Ethernet),
            expect: Plan("H100", 1, 1, false, &["node-0"]),
        },
        Case {
            name: "8B needs two RTX 4090s; TP over PCIe beats two pipeline stages",
            request: request("llama-3.1-8b", Bf16, 8192, 8, 1),
            pool: gpus("1x2xRTX4090", Ethernet),
            expect: Plan("RTX4090", 2, 1, false, &["node-0"]),
        },
        Case {
            name: "70B, two replicas on two H100 nodes: fewest GPUs is three stages",
            request: request("llama-3.1-70b", Bf16, 8192, 16, 2),
            pool: gpus("2x8xH100", InfiniBand),
            expect: Plan("H100", 1, 3, false, &["node-0", "node-0", "node-0"]),
        },
        Case {
            name: "70B for throughput uses a whole NVLink node",
            request: with(
                request("llama-3.1-70b", Bf16, 8192, 16, 1),
                None,
                None,
                MaxThroughput,
            ),
            pool: gpus("1x8xH100", InfiniBand),
            expect: Plan("H100", 8, 1, false, &["node-0"]),
        },
        Case {
            name: "70B for latency uses a whole NVLink node too",
            request: with(
                request("llama-3.1-70b", Bf16, 8192, 16, 1),
                None,
                None,
                MinLatency,
            ),
            pool: gpus("1x8xH100", InfiniBand),
            expect: Plan("H100", 8, 1, false, &["node-0"]),
        },
        Case {
            name: "70B on A100 40GB needs five GPUs",
            request: request("llama-3.1-70b", Bf16, 4096, 8, 1),
            pool: gpus("4x8xA100-40GB", InfiniBand),
            expect: Plan("A100-40GB", 1, 5, false, &["node-0"; 5]),
        },
        Case {
            name: "405B over two H100 nodes: twelve GPUs, stages on both nodes",
            request: request("llama-3.1-405b", Bf16, 8192, 16, 1),
            pool: gpus("2x8xH100", InfiniBand),
            expect: Plan("H100", 4, 3, false, &["node-0", "node-0", "node-1"]),
        },
        Case {
            name: "405B in fp8 fits one H200 node",
            request: request("llama-3.1-405b", Fp8, 8192, 16, 1),
            pool: gpus("1x8xH200", InfiniBand),
            expect: Plan("H200", 4, 1, false, &["node-0"]),
        },
        Case {
            name: "fixed TP 16 crosses nodes and says so",
            request: with(
                request("llama-3.1-405b", Bf16, 8192, 16, 1),
                Some(16),
                Some(1),
                MinGpus,
            ),
            pool: gpus("2x8xH100", InfiniBand),
            expect: Plan("H100", 16, 1, true, &["node-0+node-1"]),
        },
        Case {
            name: "405B does not fit one H100 node",
            request: request("llama-3.1-405b", Bf16, 8192, 16, 1),
            pool: gpus("1x8xH100", InfiniBand),
            expect: Error("the closest, TP 8 x PP 1 on H100, needs", true),
        },
        Case {
            name: "replicas that do not fit name the numbers",
            request: request("llama-3.1-70b", Bf16, 8192, 16, 6),
            pool: fixture_pool("gpupool-h100-status.yaml"),
            expect: Error(
                "16 H100 GPUs free on 2 usable node(s), 2 node(s) left out",
                true,
            ),
        },
        Case {
            name: "not-ready and quarantined nodes are left out",
            request: request("llama-3.1-70b", Bf16, 8192, 16, 5),
            pool: fixture_pool("gpupool-h100-status.yaml"),
            expect: Plan("H100", 1, 3, false, &["gpu-a", "gpu-a", "gpu-a"]),
        },
        Case {
            name: "mixed pool: SmolLM2 goes to the faster GPU",
            request: smol(),
            pool: gpus("1x4xRTX4090,1x8xH100", Ethernet),
            expect: Plan("H100", 1, 1, false, &["node-1"]),
        },
        Case {
            name: "qwen2.5-72b on L40S",
            request: request("qwen2.5-72b", Bf16, 4096, 8, 1),
            pool: gpus("2x4xL40S", Ethernet),
            expect: Plan("L40S", 4, 1, false, &["node-0"]),
        },
        Case {
            name: "mistral-7b on an A100 80GB",
            request: request("mistral-7b", Bf16, 32768, 8, 1),
            pool: gpus("1x8xA100-80GB", InfiniBand),
            expect: Plan("A100-80GB", 1, 1, false, &["node-0"]),
        },
        Case {
            name: "unknown GPU label names it and the override",
            request: smol(),
            pool: fixture_pool("gpupool-unknown-gpu.yaml"),
            expect: Error(
                "unknown GPU model \"NVIDIA-B200\"; set spec.gpu.model",
                false,
            ),
        },
        Case {
            name: "a GpuPool List with the override and partly allocated nodes",
            request: request("llama-3.1-8b", Bf16, 8192, 8, 3),
            pool: fixture_pool("gpupool-rtx4090-list.yaml"),
            expect: Plan("RTX4090", 2, 1, false, &["ws-2"]),
        },
    ]
}

#[test]
fn scenarios_produce_the_expected_plans() {
    let mut failures = Vec::new();
    for case in cases() {
        let got = plan(&case.request, &case.pool, now());
        let ok = match (&case.expect, &got) {
            (Expect::Plan(gpu, tp, pp, crosses, nodes), Ok(p)) => {
                assert_legal(&case.request, &case.pool, p, now());
                let group0: Vec<&str> = p.stages.iter().map(|s| s.node.as_str()).collect();
                p.gpu_model == *gpu
                    && p.tensor_parallel == *tp
                    && p.pipeline_parallel == *pp
                    && p.crosses_nodes == *crosses
                    && group0 == *nodes
                    && (!crosses || p.notes.iter().any(|n| n.contains("spans nodes")))
            }
            (Expect::Error(text, infeasible), Err(e)) => {
                e.to_string().contains(text) && e.is_infeasible() == *infeasible
            }
            _ => false,
        };
        if !ok {
            let got = match got {
                Ok(p) => format!(
                    "{} TP {} x PP {} crosses={} nodes={:?}",
                    p.gpu_model,
                    p.tensor_parallel,
                    p.pipeline_parallel,
                    p.crosses_nodes,
                    p.stages.iter().map(|s| s.node.clone()).collect::<Vec<_>>()
                ),
                Err(e) => format!("error: {e}"),
            };
            failures.push(format!("{}: got {got}", case.name));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn excluded_nodes_are_explained_and_expired_quarantine_counts() {
    let pool = fixture_pool("gpupool-h100-status.yaml");
    let req = request("llama-3.1-70b", WeightDtype::Bf16, 8192, 16, 5);
    let p = plan(&req, &pool, now()).expect("plan");
    let notes = p.notes.join("\n");
    assert!(
        notes.contains("gpu-b left out: not Ready (KubeletNotReady)"),
        "{notes}"
    );
    assert!(
        notes.contains("gpu-c left out: quarantined until 2099"),
        "{notes}"
    );
    assert!(!notes.contains("gpu-d"), "{notes}");
    let used: Vec<&str> = p
        .groups
        .iter()
        .flat_map(|g| g.nodes.iter().map(String::as_str))
        .collect();
    assert!(used.contains(&"gpu-d"), "{used:?}");
    // Before gpu-d's quarantine ended, it is left out too, and five groups no longer fit.
    let early = "2019-06-01T00:00:00Z".parse().expect("timestamp");
    let err = plan(&req, &pool, early).unwrap_err();
    assert!(matches!(err, PlanError::NothingFits { .. }), "{err}");
    assert!(err.to_string().contains("3 node(s) left out"), "{err}");
}

#[test]
fn rejected_options_are_capped_with_a_count_and_explain_fewer_gpus_first() {
    let req = request("llama-3.1-405b", WeightDtype::Bf16, 8192, 16, 1);
    let p = plan(&req, &gpus("4x8xH100", InfiniBand), now()).expect("plan");
    assert_eq!(p.rejected.len(), 32);
    assert!(
        p.notes
            .iter()
            .any(|n| n.contains("more rejected options are not listed"))
    );
    let first = &p.rejected[0];
    assert_eq!((first.tensor_parallel, first.pipeline_parallel), (1, 1));
    assert!(
        first.reason.contains("GiB is usable on each H100"),
        "{}",
        first.reason
    );
    // Everything with fewer GPUs than the chosen split comes before anything with more.
    let chosen = p.gpus_per_replica;
    let gpus: Vec<i32> = p
        .rejected
        .iter()
        .map(|r| r.tensor_parallel * r.pipeline_parallel)
        .collect();
    let first_more = gpus.iter().position(|&g| g > chosen).unwrap_or(gpus.len());
    assert!(gpus[..first_more].iter().all(|&g| g <= chosen), "{gpus:?}");
}

#[test]
fn memory_parts_add_up_and_kv_cache_follows_the_limits() {
    let base = request("llama-3.1-8b", WeightDtype::Bf16, 4096, 8, 1);
    let pool = gpus("1x8xH100", InfiniBand);
    let a = plan(&base, &pool, now()).expect("plan");
    let mut doubled = base.clone();
    doubled.max_sequences = 16;
    let b = plan(&doubled, &pool, now()).expect("plan");
    assert_eq!(a.tensor_parallel, b.tensor_parallel);
    assert_eq!(
        b.memory_per_gpu_bytes.kv_cache,
        2 * a.memory_per_gpu_bytes.kv_cache
    );
    // 2 · 32 layers · 8 KV heads · 128 · 2 bytes · 4096 · 8 sequences.
    assert_eq!(
        a.memory_per_gpu_bytes.kv_cache,
        2 * 32 * 8 * 128 * 2 * 4096 * 8
    );
    assert_eq!(
        a.memory_per_gpu_bytes.usable,
        (80.0 * 1073741824.0 * 0.9) as i64
    );
}

#[test]
fn replicas_zero_plans_one_group_and_places_none() {
    let req = request("smollm2-135m", WeightDtype::Q4_1, 2048, 8, 0);
    let p = plan(&req, &gpus("1x1xL40S", Ethernet), now()).expect("plan");
    assert_eq!(p.replicas, 0);
    assert!(p.groups.is_empty());
    assert!(p.notes.iter().any(|n| n.contains("replicas is 0")));
}

#[test]
fn absurd_serving_limits_are_rejected_not_overflowed() {
    let req = request(
        "llama-3.1-405b",
        WeightDtype::F32,
        131072,
        i32::MAX as u64,
        1,
    );
    let err = plan(&req, &gpus("1000x8xH200", InfiniBand), now()).unwrap_err();
    assert!(matches!(err, PlanError::NothingFits { .. }), "{err}");
    assert!(
        err.to_string().contains("GiB is usable on each H200"),
        "{err}"
    );
}

#[test]
fn requests_from_manifests_apply_defaults_and_check_limits() {
    use whaleflux_operator::plan_cmd::parse_deployment;
    let manifest = |extra: &str| {
        format!(
            "apiVersion: whaleflux.io/v1alpha1\nkind: LlmDeployment\nmetadata: {{name: x}}\nspec:\n  model:\n    preset: llama-3.1-8b\n    weights: {{source: {{path: /m.gguf}}}}\n  gpuPool: p\n{extra}"
        )
    };
    let d = parse_deployment(&manifest("")).expect("manifest");
    let r = PlanRequest::from_spec(&d.spec).expect("request");
    assert_eq!(
        (
            r.max_context,
            r.max_sequences,
            r.replicas,
            r.dtype,
            r.objective
        ),
        (4096, 8, 1, WeightDtype::Bf16, Objective::MinGpus)
    );
    for (extra, want) in [
        (
            "  serving: {maxContextLength: 200000}\n",
            "spec.serving.maxContextLength 200000 exceeds the 131072 tokens llama-3.1-8b supports",
        ),
        ("  replicas: -1\n", "spec.replicas is -1"),
        (
            "  parallelism: {tensorParallel: 0}\n",
            "spec.parallelism.tensorParallel is 0",
        ),
    ] {
        let d = parse_deployment(&manifest(extra)).expect("manifest");
        let err = PlanRequest::from_spec(&d.spec).unwrap_err();
        assert!(err.to_string().contains(want), "{extra}: {err}");
        assert!(!err.is_infeasible());
    }
}
