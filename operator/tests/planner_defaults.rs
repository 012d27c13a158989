//! The default objective, `MaxTokensPerGpu`, on the model x pool combinations people deploy:
//! each case names the split an engineer who runs vLLM would choose, and why.

mod common;

use common::{assert_legal, gpus, now, request};
use whaleflux_crds::InterNodeNetwork::InfiniBand;
use whaleflux_crds::{Objective, WeightDtype};
use whaleflux_operator::planner::plan;

struct Case {
    model: &'static str,
    dtype: WeightDtype,
    context: u64,
    sequences: u64,
    replicas: u32,
    pool: &'static str,
    /// TP, PP the plan must have.
    want: (i32, i32),
    /// Why an expert picks that split.
    why: &'static str,
}

fn cases() -> Vec<Case> {
    use WeightDtype::{Bf16, Fp8, Q4_0, Q4_1};
    let case = |model, dtype, context, sequences, replicas, pool, want, why| Case {
        model,
        dtype,
        context,
        sequences,
        replicas,
        pool,
        want,
        why,
    };
    vec![
        case(
            "llama-3.1-70b",
            Bf16,
            8192,
            16,
            1,
            "1x8xA100-80GB",
            (4, 1),
            "the issue's example: 140 GB of weights need at least two 80 GB cards; TP 4 over NVLink reads each weight once per step on four cards, where MinGpus' TP 1 x PP 3 reads them once per micro-batch",
        ),
        case(
            "llama-3.1-70b",
            Bf16,
            8192,
            16,
            2,
            "2x8xH100",
            (4, 1),
            "two replicas of TP 4 fill one node each half; TP 8 is faster per group but not per GPU",
        ),
        case(
            "llama-3.1-70b",
            Bf16,
            8192,
            32,
            1,
            "1x8xH200",
            (2, 1),
            "141 GB cards hold 70B in two; the KV cache still fits, so more TP only buys latency",
        ),
        case(
            "llama-3.1-70b",
            Fp8,
            8192,
            32,
            1,
            "1x8xH100",
            (4, 1),
            "fp8 halves the weights, but 32 sequences of 8192 tokens do not fit beside them on two cards",
        ),
        case(
            "llama-3.1-405b",
            Bf16,
            8192,
            16,
            1,
            "2x8xH100",
            (8, 2),
            "810 GB needs two nodes: TP 8 inside each node over NVLink, the two stages across InfiniBand (what vLLM recommends: TP = GPUs per node, PP = nodes)",
        ),
        case(
            "llama-3.1-405b",
            Fp8,
            8192,
            16,
            1,
            "1x8xH200",
            (4, 1),
            "fp8 405B is 405 GB: four 141 GB cards hold it with its KV cache",
        ),
        case(
            "llama-3.1-8b",
            Bf16,
            8192,
            32,
            1,
            "1x8xH100",
            (1, 1),
            "an 8B model and its cache fit one card; splitting only adds all-reduces",
        ),
        case(
            "llama-3.1-8b",
            Bf16,
            8192,
            32,
            1,
            "1x8xRTX4090",
            (4, 1),
            "24 GB cards cannot hold 16 GB of weights plus 32 x 8192 tokens of cache on one or two; TP 4 over PCIe beats a four-stage pipeline that reads the weights once per micro-batch",
        ),
        case(
            "llama-3.1-70b",
            Q4_0,
            4096,
            8,
            1,
            "2x4xRTX4090",
            (4, 1),
            "a 4-bit 70B fits four 24 GB cards of one box; spanning the second box would cross the network",
        ),
        case(
            "qwen2.5-72b",
            Bf16,
            8192,
            16,
            1,
            "1x8xH100-PCIe",
            (4, 1),
            "PCIe-only cards still split tensors when the model needs several of them: a pipeline of four stages idles more than TP 4 pays in PCIe all-reduces",
        ),
        case(
            "mistral-7b",
            Bf16,
            8192,
            64,
            1,
            "1x4xL40S",
            (2, 1),
            "64 sequences of 8192 tokens need more cache than one 48 GB card holds next to the weights",
        ),
        case(
            "smollm2-135m",
            Q4_1,
            2048,
            8,
            1,
            "1x4xRTX4090",
            (1, 1),
            "a 135M model is one card's work; any split is overhead",
        ),
        case(
            "llama-3.1-8b",
            Bf16,
            4096,
            8,
            4,
            "1x8xA10G",
            (1, 1),
            "four replicas of an 8B model on 24 GB cards: one card each, no all-reduce over PCIe",
        ),
    ]
}

#[test]
fn the_default_objective_picks_what_an_expert_would() {
    let cases = cases();
    assert!(cases.len() >= 10);
    let mut wrong = Vec::new();
    for c in &cases {
        let req = request(c.model, c.dtype, c.context, c.sequences, c.replicas);
        let mut req = req;
        req.objective = Objective::MaxTokensPerGpu;
        let pool = gpus(c.pool, InfiniBand);
        let p =
            plan(&req, &pool, now()).unwrap_or_else(|e| panic!("{} on {}: {e}", c.model, c.pool));
        assert_legal(&req, &pool, &p, now());
        let got = (p.tensor_parallel, p.pipeline_parallel);
        if got != c.want {
            wrong.push(format!(
                "{} {} on {}: TP {} x PP {}, expected TP {} x PP {} because {}\n  {:?}",
                c.model,
                c.dtype.as_str(),
                c.pool,
                got.0,
                got.1,
                c.want.0,
                c.want.1,
                c.why,
                p.notes
            ));
        }
        // The note says which objective chose and what the runner-up would have given.
        let note = p
            .notes
            .iter()
            .find(|n| n.starts_with("objective MaxTokensPerGpu"))
            .unwrap_or_else(|| panic!("no objective note: {:?}", p.notes));
        assert!(note.contains("; the runner-up, TP "), "{note}");
        // The runner-up is the first rejected option, and no fitting option does better.
        let per_gpu = p.estimate.decode_tokens_per_second_per_gpu;
        assert!(
            (per_gpu - p.estimate.decode_tokens_per_second / f64::from(p.gpus_per_replica)).abs()
                < 0.1
        );
        assert!(p.rejected[0].reason.contains("fits"), "{:?}", p.rejected[0]);
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn a_pipeline_only_when_one_node_cannot_hold_the_split() {
    // TP never spans nodes while something fits inside one: 405B over two nodes splits into
    // stages, not a TP 16 across InfiniBand.
    let req = request("llama-3.1-405b", WeightDtype::Bf16, 8192, 16, 1);
    let p = plan(&req, &gpus("2x8xH100", InfiniBand), now()).expect("plan");
    assert!(!p.crosses_nodes, "{:?}", p.notes);
    let tp16 = p
        .rejected
        .iter()
        .find(|r| (r.tensor_parallel, r.pipeline_parallel) == (16, 1));
    assert!(
        tp16.is_none_or(|r| !r.reason.starts_with("fits with")),
        "{tp16:?}"
    );
}
