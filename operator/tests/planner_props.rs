//! Property tests: every chosen plan is legal and fits, and planning is deterministic.

mod common;

use common::{assert_legal, now, request};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use proptest::prelude::*;
use whaleflux_crds::{InterNodeNetwork, IntraNodeLink, Objective, PoolNode, WeightDtype};
use whaleflux_operator::planner::legality::legal_tps;
use whaleflux_operator::planner::models::preset;
use whaleflux_operator::planner::{PlanError, Pool, plan};

const MODELS: &[&str] = &[
    "smollm2-135m",
    "llama-3.1-8b",
    "llama-3.1-70b",
    "llama-3.1-405b",
    "qwen2.5-72b",
    "mistral-7b",
];
const GPUS: &[&str] = &[
    "NVIDIA-H100-80GB-HBM3",
    "H100-PCIe",
    "NVIDIA-H200",
    "A100-80GB",
    "NVIDIA-A100-PCIE-40GB",
    "RTX4090",
    "NVIDIA-L40S",
];
const DTYPES: &[WeightDtype] = &[
    WeightDtype::Bf16,
    WeightDtype::Fp8,
    WeightDtype::Q8_0,
    WeightDtype::Q4_1,
    WeightDtype::F32,
];

fn node() -> impl Strategy<Value = PoolNode> {
    (
        0..GPUS.len(),
        prop::sample::select(vec![1i32, 2, 4, 8]),
        0..=8i32,
        any::<bool>(),
        prop::option::of(prop::bool::ANY),
        prop::option::of(0..3u8),
    )
        .prop_map(|(g, count, alloc, ready, quarantine, domain)| PoolNode {
            name: String::new(),
            gpu_model: GPUS[g].to_string(),
            gpu_count: count,
            allocatable: alloc.min(count),
            nvlink_domain: domain.map(|d| format!("rack-{d}")),
            // Mostly ready, so plans happen.
            ready: ready || g % 2 == 0,
            quarantined_until: quarantine.map(|future| {
                let t = if future {
                    "2099-01-01T00:00:00Z"
                } else {
                    "2020-01-01T00:00:00Z"
                };
                Time(t.parse().expect("timestamp"))
            }),
            reason: None,
        })
}

fn pool() -> impl Strategy<Value = Pool> {
    (
        prop::collection::vec(node(), 1..12),
        prop::sample::select(vec![
            InterNodeNetwork::InfiniBand,
            InterNodeNetwork::RoCE,
            InterNodeNetwork::Ethernet,
        ]),
        prop::sample::select(vec![
            IntraNodeLink::Auto,
            IntraNodeLink::NVLink,
            IntraNodeLink::PCIe,
        ]),
    )
        .prop_map(|(mut nodes, network, intra_node)| {
            for (i, n) in nodes.iter_mut().enumerate() {
                n.name = format!("n{i:02}");
            }
            Pool {
                nodes,
                gpu_override: None,
                intra_node,
                network,
                network_gbps: f64::from(network.default_gbps()),
            }
        })
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 192,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn chosen_plans_are_legal_fit_and_deterministic(
        pool in pool(),
        model in 0..MODELS.len(),
        dtype in prop::sample::select(DTYPES.to_vec()),
        ctx in prop::sample::select(vec![512u64, 2048, 8192]),
        seqs in 1..32u64,
        replicas in 0..4u32,
        fixed_tp in prop::option::of(0..8usize),
        fixed_pp in prop::option::of(1..6u32),
        objective in prop::sample::select(vec![Objective::MinGpus, Objective::MaxThroughput, Objective::MinLatency]),
    ) {
        let mut req = request(MODELS[model], dtype, ctx, seqs, replicas);
        let legal = legal_tps(&preset(MODELS[model]).expect("preset"));
        req.tensor_parallel = fixed_tp.map(|i| legal[i % legal.len()]);
        req.pipeline_parallel = fixed_pp;
        req.objective = objective;
        let first = plan(&req, &pool, now());
        let again = plan(&req, &pool, now());
        prop_assert_eq!(&first, &again);
        // Node order in the pool does not matter.
        let mut reversed = pool.clone();
        reversed.nodes.reverse();
        prop_assert_eq!(&first, &plan(&req, &reversed, now()));
        match first {
            Ok(p) => assert_legal(&req, &pool, &p, now()),
            // An error must be deserved: no usable GPU at all, or options that were each
            // rejected with a reason.
            Err(PlanError::NoUsableGpus { .. }) => prop_assert!(
                pool.nodes.iter().all(|n| !n.ready
                    || n.quarantined_until.as_ref().is_some_and(|t| t.0 > now())
                    || n.allocatable.min(n.gpu_count) <= 0),
                "NoUsableGpus while usable nodes exist: {:?}", pool.nodes
            ),
            Err(PlanError::NothingFits { rejected, .. }) => prop_assert!(
                !rejected.is_empty() || fixed_tp.is_some() || fixed_pp.is_some(),
                "NothingFits with no option rejected"
            ),
            Err(e) => prop_assert!(false, "unexpected error: {}", e),
        }
    }

    #[test]
    fn a_chosen_split_fixed_by_hand_plans_the_same(
        pool in pool(),
        model in 0..MODELS.len(),
        seqs in 1..16u64,
    ) {
        let req = request(MODELS[model], WeightDtype::Bf16, 2048, seqs, 1);
        let planned = plan(&req, &pool, now());
        // A pool with no plan is a rejected case, not a pass: proptest must find its count of
        // cases that planned, or fail ("too many global rejects").
        prop_assume!(planned.is_ok(), "no plan for this pool");
        let p = planned.expect("assumed");
        let mut fixed = req.clone();
        fixed.tensor_parallel = Some(p.tensor_parallel as u32);
        fixed.pipeline_parallel = Some(p.pipeline_parallel as u32);
        let q = plan(&fixed, &pool, now()).expect("the same split plans again");
        prop_assert_eq!(
            (q.tensor_parallel, q.pipeline_parallel, &q.stages, &q.memory_per_gpu_bytes),
            (p.tensor_parallel, p.pipeline_parallel, &p.stages, &p.memory_per_gpu_bytes)
        );
    }
}
