//! A table of planning scenarios with the plan each must produce.

mod common;

use common::{assert_estimate_consistent, assert_legal, fixture, gpus, now, request, with};
use whaleflux_crds::InterNodeNetwork::{Ethernet, InfiniBand};
use whaleflux_crds::{Objective, WeightDtype};
use whaleflux_operator::plan_cmd::parse_pool;
use whaleflux_operator::planner::legality::legal_tps;
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
                "smollm2-135m: tensor parallel 2 does not divide the 9 attention heads; legal: 1, 3",
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
                "unknown GPU model \"NVIDIA-B300\"; set spec.gpu.model",
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
    let req = with(
        request("llama-3.1-405b", WeightDtype::Bf16, 8192, 16, 1),
        None,
        None,
        Objective::MinGpus,
    );
    let p = plan(&req, &gpus("4x8xH100", InfiniBand), now()).expect("plan");
    assert_eq!(p.rejected.len(), 32);
    // 63 options (TP 1, 2, 4, 8, 16, 32 with every PP up to 32 GPUs), one chosen.
    assert!(
        p.notes
            .iter()
            .any(|n| n == "30 more rejected options are not listed (the 32 most relevant are)"),
        "{:?}",
        p.notes
    );
    let mut all = req.clone();
    all.settings.max_rejected = 62;
    let p62 = plan(&all, &gpus("4x8xH100", InfiniBand), now()).expect("plan");
    assert_eq!(p62.rejected.len(), 62);
    assert!(!p62.notes.iter().any(|n| n.contains("more rejected")));
    all.settings.max_rejected = 61;
    let p61 = plan(&all, &gpus("4x8xH100", InfiniBand), now()).expect("plan");
    assert!(
        p61.notes
            .iter()
            .any(|n| n.starts_with("1 more rejected options"))
    );
    let first = &p.rejected[0];
    assert_eq!((first.tensor_parallel, first.pipeline_parallel), (1, 1));
    assert!(
        first.reason.contains("GiB is usable on each H100"),
        "{}",
        first.reason
    );
    // MinGpus answers "why not fewer GPUs?": the list runs from fewest GPUs up, and every
    // legal option with fewer GPUs than the chosen split is listed, first.
    let chosen = p.gpus_per_replica;
    let listed: Vec<(i32, i32)> = p
        .rejected
        .iter()
        .map(|r| (r.tensor_parallel, r.pipeline_parallel))
        .collect();
    let gpus: Vec<i32> = listed.iter().map(|(t, q)| t * q).collect();
    assert!(
        gpus.windows(2).all(|w| w[0] <= w[1]),
        "not by GPUs: {gpus:?}"
    );
    let m = &req.model;
    let mut fewer: Vec<(i32, i32)> = legal_tps(m)
        .into_iter()
        .flat_map(|tp| (1..=m.layers).map(move |pp| (tp as i32, pp as i32)))
        .filter(|(t, q)| t * q < chosen)
        .collect();
    assert!(!fewer.is_empty() && fewer.len() < listed.len(), "{fewer:?}");
    let mut head = listed[..fewer.len()].to_vec();
    head.sort_unstable();
    fewer.sort_unstable();
    assert_eq!(
        head, fewer,
        "the options with fewer GPUs must lead the list"
    );
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
        (4096, 8, 1, WeightDtype::Bf16, Objective::MaxTokensPerGpu)
    );
    // The model's whole context is allowed; one token more is not (below).
    let d =
        parse_deployment(&manifest("  serving: {maxContextLength: 131072}\n")).expect("manifest");
    assert_eq!(
        PlanRequest::from_spec(&d.spec)
            .expect("request")
            .max_context,
        131072
    );
    for (extra, want) in [
        (
            "  serving: {maxContextLength: 131073}\n",
            "spec.serving.maxContextLength 131073 exceeds the 131072 tokens llama-3.1-8b supports",
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

#[test]
fn nvlink_inside_a_node_beats_pcie_for_the_same_split() {
    use whaleflux_crds::IntraNodeLink;
    let req = with(
        request("llama-3.1-70b", WeightDtype::Bf16, 4096, 8, 1),
        Some(8),
        Some(1),
        Objective::MinGpus,
    );
    let tokens = |gpu: &str, link: IntraNodeLink| {
        let mut pool = gpus(&format!("1x8x{gpu}"), InfiniBand);
        pool.intra_node = link;
        plan(&req, &pool, now())
            .expect("plan")
            .estimate
            .decode_tokens_per_second
    };
    let nvlink = tokens("H100", IntraNodeLink::NVLink);
    assert_eq!(tokens("H100", IntraNodeLink::Auto), nvlink);
    let pcie = tokens("H100", IntraNodeLink::PCIe);
    assert!(nvlink > pcie, "NVLink {nvlink} tokens/s vs PCIe {pcie}");
    // A PCIe card has no NVLink to use, whatever the pool says.
    assert_eq!(
        tokens("H100-PCIe", IntraNodeLink::NVLink),
        tokens("H100-PCIe", IntraNodeLink::PCIe)
    );
}

#[test]
fn when_nothing_fits_a_lack_of_room_is_closer_than_a_lack_of_memory() {
    // Three groups of 70B in bf16 on 2 x 4 H100: TP 1 x PP 3 fits a GPU's memory but three
    // groups of it need 9 GPUs; TP 1 x PP 1 or 2 do not fit in memory at all.
    let req = request("llama-3.1-70b", WeightDtype::Bf16, 4096, 8, 3);
    let err = plan(&req, &gpus("2x4xH100", InfiniBand), now()).unwrap_err();
    let PlanError::NothingFits { message, rejected } = &err else {
        panic!("{err}");
    };
    assert!(
        message
            .contains("the closest, TP 1 x PP 3 on H100, fits in memory, but 3 replica group(s)"),
        "{message}"
    );
    let memory = |r: &whaleflux_crds::RejectedOption| r.reason.contains("GiB is usable");
    let first_memory = rejected.iter().position(memory).expect("a memory failure");
    assert!(first_memory > 0, "{rejected:?}");
    assert!(
        rejected[first_memory..].iter().all(memory),
        "room failures must all come before memory failures: {rejected:?}"
    );
}

#[test]
fn notes_say_everything_that_shaped_the_plan() {
    use whaleflux_crds::IntraNodeLink;
    let common = [
        "the estimate is a cost model (75% of HBM bandwidth, 50% of dense BF16 TFLOPS, 20 us per layer, link bandwidth and latency from the catalog; sequences half full on average), not a measurement; it lands within a factor of 2 of 18 published measurements",
    ];
    // SmolLM2 (9 heads, 3 KV heads, tied embeddings) at a fixed TP 3 x PP 2 on a pool that
    // mixes GPU models and claims NVLink for cards without it, with no replicas.
    let mut pool = gpus("2x16xRTX4090,1x2xH100", Ethernet);
    pool.intra_node = IntraNodeLink::NVLink;
    let req = with(
        request("smollm2-135m", WeightDtype::Q4_1, 2048, 8, 0),
        Some(3),
        Some(2),
        Objective::MinGpus,
    );
    let p = plan(&req, &pool, now()).expect("plan");
    assert_eq!(p.gpu_model, "RTX4090");
    assert_eq!(
        p.notes,
        [
            "tied embeddings: the last stage holds its own copy of the embedding as the output head",
            "spec.interconnect.intraNode is NVLink but the RTX4090 has no NVLink switch in the catalog; PCIe figures are used",
            "the pool mixes GPU models (H100, RTX4090); a plan uses one, here RTX4090",
            "replicas is 0: the split is sized for one replica group and nothing is placed",
            "objective MinGpus (the fewest GPUs that fit) chose TP 3 x PP 2 on RTX4090 (6 GPUs per replica, 4188 tokens/s per group, 698 per GPU, 1.91 ms per token); no other split fits",
            "KV cache reserved in fp16 for 2048 tokens x 8 sequences per replica group; usable memory is 90% of each GPU",
            common[0],
        ]
    );
    // With more than one GPU model, a rejected option names its model.
    let reasons: Vec<&str> = p.rejected.iter().map(|r| r.reason.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "H100: fits in memory, but needs 3 GPUs in one node and at most 2 H100 are free on one node; spanning nodes is only used when nothing inside one node fits"
        ]
    );
    assert_estimate_consistent(&p);

    // TP 16 for 70B on two nodes of 8: one KV head on two ranks each, and the all-reduces
    // cross the network. TP 8 x PP 1 (= KV heads) would have no replication note.
    let req = with(
        request("llama-3.1-70b", WeightDtype::Bf16, 4096, 8, 1),
        Some(16),
        None,
        Objective::MinGpus,
    );
    let p = plan(&req, &gpus("2x8xH100", InfiniBand), now()).expect("plan");
    assert_eq!(
        p.notes,
        [
            "tensor parallel 16 exceeds the 8 KV heads: each KV head is replicated on 2 ranks",
            "tensor parallel 16 spans nodes because no split inside one node fits (8 GPUs is the most free on one H100 node); its all-reduces run over the InfiniBand network at 400 Gbit/s (slow)",
            "objective MinGpus (the fewest GPUs that fit) chose TP 16 x PP 1 on H100 (16 GPUs per replica, 932 tokens/s per group, 58 per GPU, 8.58 ms per token); no other split fits",
            "KV cache reserved in fp16 for 4096 tokens x 8 sequences per replica group; usable memory is 90% of each GPU",
            common[0],
        ]
    );
    assert_estimate_consistent(&p);
    // Only a tied model split into stages has the second copy: not 70B (untied) down three
    // stages, not SmolLM2 (tied) in one.
    for (model, dtype, tp, pp) in [
        ("llama-3.1-70b", WeightDtype::Bf16, 1, 3),
        ("smollm2-135m", WeightDtype::Q4_1, 1, 1),
    ] {
        let req = with(
            request(model, dtype, 4096, 8, 1),
            Some(tp),
            Some(pp),
            Objective::MinGpus,
        );
        let p = plan(&req, &gpus("2x8xH100", InfiniBand), now()).expect("plan");
        assert!(
            !p.notes.iter().any(|n| n.contains("tied")),
            "{model}: {:?}",
            p.notes
        );
    }
    let req = with(req, Some(8), None, Objective::MinGpus);
    let p = plan(&req, &gpus("2x8xH100", InfiniBand), now()).expect("plan");
    assert!(
        !p.notes
            .iter()
            .any(|n| n.contains("replicated") || n.contains("spans")),
        "{:?}",
        p.notes
    );

    // MaxThroughput lists the fitting alternatives by estimated throughput, best first, each
    // against the chosen split.
    let req = with(
        request("llama-3.1-8b", WeightDtype::Bf16, 4096, 8, 1),
        None,
        None,
        Objective::MaxThroughput,
    );
    let p = plan(&req, &gpus("1x4xH100", InfiniBand), now()).expect("plan");
    assert_eq!((p.tensor_parallel, p.pipeline_parallel), (4, 1));
    let listed: Vec<String> = p
        .rejected
        .iter()
        .map(|r| format!("{}x{} {}", r.tensor_parallel, r.pipeline_parallel, r.reason))
        .collect();
    let tokens = p.estimate.decode_tokens_per_second.floor();
    let want: Vec<String> = [
        (2, 2, 4),
        (2, 1, 2),
        (1, 2, 2),
        (1, 1, 1),
        (1, 3, 3),
        (1, 4, 4),
    ]
    .iter()
    .map(|(t, q, g)| format!("{t}x{q} fits with {g} GPUs per replica, but estimated"))
    .collect();
    assert_eq!(listed.len(), want.len(), "{listed:#?}");
    let mut last = f64::INFINITY;
    for (got, want) in listed.iter().zip(&want) {
        assert!(got.starts_with(want.as_str()), "{got} / {want}");
        assert!(
            got.ends_with(&format!("tokens/s against {tokens} for TP 4 x PP 1")),
            "{got}"
        );
        let est: f64 = got
            .split("estimated ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .expect("estimate in the reason");
        assert!(est <= last && est < tokens, "{listed:#?}");
        last = est;
    }
    assert_estimate_consistent(&p);
}
