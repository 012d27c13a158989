//! The planner in its corners: links between nodes and stages, NVLink domains, exact memory
//! fits, notes that appear only when they apply, and failures across GPU models.

mod common;

use common::{assert_estimate_consistent, gpus, now, request, with};
use whaleflux_crds::InterNodeNetwork::{Ethernet, InfiniBand};
use whaleflux_crds::{IntraNodeLink, Objective, Plan, PoolNode, WeightDtype};
use whaleflux_operator::planner::catalog::cpu_slot;
use whaleflux_operator::planner::models::Model;
use whaleflux_operator::planner::{
    PlanError, PlanRequest, Pool, keep_placements, plan, plan_with_devices, plan_within_capacity,
};

fn fixed(model: &str, dtype: WeightDtype, tp: u32, pp: u32, seqs: u64) -> PlanRequest {
    let mut r = request(model, dtype, 4096, seqs, 1);
    r.tensor_parallel = Some(tp);
    r.pipeline_parallel = Some(pp);
    r.objective = Objective::MinGpus;
    r
}

fn ms(p: &Plan) -> f64 {
    p.estimate.time_per_token_ms
}

#[test]
fn stages_on_other_nodes_pay_the_network_for_their_hand_offs() {
    // One sequence down two stages: the period is both stages plus the hand-off, so moving the
    // second stage to another node over Ethernet must cost more than PCIe inside one node.
    let req = fixed("llama-3.1-8b", WeightDtype::Bf16, 1, 2, 1);
    let same = plan(&req, &gpus("1x2xH100", Ethernet), now()).expect("plan");
    let apart = plan(&req, &gpus("2x1xH100", Ethernet), now()).expect("plan");
    assert_eq!(same.groups[0].nodes, ["node-0", "node-0"]);
    assert_eq!(apart.groups[0].nodes, ["node-0", "node-1"]);
    assert!(ms(&apart) > ms(&same), "{} vs {}", ms(&apart), ms(&same));
    // A single stage hands nothing on: one node or two, the same estimate.
    let one = fixed("llama-3.1-8b", WeightDtype::Bf16, 1, 1, 1);
    assert_eq!(
        ms(&plan(&one, &gpus("1x2xH100", Ethernet), now()).expect("plan")),
        ms(&plan(&one, &gpus("2x1xH100", Ethernet), now()).expect("plan"))
    );
}

fn with_domain(mut pool: Pool, domain: &str) -> Pool {
    for n in &mut pool.nodes {
        n.nvlink_domain = Some(domain.into());
    }
    pool
}

#[test]
fn tensor_parallel_across_nodes_of_one_nvlink_domain_runs_at_nvlink_speed() {
    // TP 16 for 70B must span two nodes of 8 H100. Without a shared NVLink domain its
    // all-reduces cross InfiniBand; with one (GPU feature discovery's nvidia.com/gpu.clique),
    // NVLink: faster, and the note says which.
    let req = fixed("llama-3.1-70b", WeightDtype::Bf16, 16, 1, 8);
    let ib = plan(&req, &gpus("2x8xH100", InfiniBand), now()).expect("plan");
    let clique = with_domain(gpus("2x8xH100", InfiniBand), "7b968a6d.1");
    let nv = plan(&req, &clique, now()).expect("plan");
    assert!(ib.crosses_nodes && nv.crosses_nodes);
    assert!(ms(&nv) < ms(&ib), "{} vs {}", ms(&nv), ms(&ib));
    let spans = |p: &Plan| {
        p.notes
            .iter()
            .find(|n| n.contains("spans nodes"))
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        spans(&nv).ends_with("its all-reduces run over NVLink (the nodes share an NVLink domain)"),
        "{}",
        spans(&nv)
    );
    assert!(
        spans(&ib).ends_with("over the InfiniBand network at 400 Gbit/s (slow)"),
        "{}",
        spans(&ib)
    );
    // Different domains are no domain at all.
    let mut split = gpus("2x8xH100", InfiniBand);
    split.nodes[0].nvlink_domain = Some("a.1".into());
    split.nodes[1].nvlink_domain = Some("a.2".into());
    let apart = plan(&req, &split, now()).expect("plan");
    assert_eq!(ms(&apart), ms(&ib));
    assert_eq!(spans(&apart), spans(&ib));
    // A PCIe card labelled with a domain still all-reduces over the network across nodes.
    let pcie = fixed("llama-3.1-8b", WeightDtype::Bf16, 8, 1, 8);
    let plain = plan(&pcie, &gpus("2x4xH100-PCIe", InfiniBand), now()).expect("plan");
    let labelled = plan(
        &pcie,
        &with_domain(gpus("2x4xH100-PCIe", InfiniBand), "x"),
        now(),
    )
    .expect("plan");
    assert!(plain.crosses_nodes);
    assert_eq!(ms(&labelled), ms(&plain));
}

#[test]
fn the_nvlink_note_appears_only_for_cards_without_nvlink() {
    let req = fixed("llama-3.1-8b", WeightDtype::Bf16, 2, 1, 8);
    let note = |pool: Pool| {
        plan(&req, &pool, now())
            .expect("plan")
            .notes
            .iter()
            .any(|n| n.contains("has no NVLink switch"))
    };
    let mut h100 = gpus("1x8xH100", InfiniBand);
    h100.intra_node = IntraNodeLink::NVLink;
    assert!(!note(h100), "the H100 has NVLink");
    assert!(
        !note(gpus("1x8xRTX4090", InfiniBand)),
        "nothing claimed NVLink"
    );
    let mut claimed = gpus("1x8xRTX4090", InfiniBand);
    claimed.intra_node = IntraNodeLink::NVLink;
    assert!(note(claimed));
}

fn unready(pool: &mut Pool, n: usize) {
    for node in pool.nodes.iter_mut().take(n) {
        node.ready = false;
        node.reason = Some("KubeletNotReady".into());
    }
}

#[test]
fn left_out_nodes_are_listed_up_to_ten_then_counted() {
    let req = request("llama-3.1-8b", WeightDtype::Bf16, 4096, 8, 1);
    let notes = |left: usize| {
        let mut pool = gpus("12x8xH100", InfiniBand);
        unready(&mut pool, left);
        let p = plan(&req, &pool, now()).expect("plan");
        p.notes
            .into_iter()
            .find(|n| n.contains("left out"))
            .unwrap_or_default()
    };
    let ten = notes(10);
    assert_eq!(ten.matches("left out: not Ready").count(), 10, "{ten}");
    assert!(!ten.contains("more nodes"), "{ten}");
    let eleven = notes(11);
    assert_eq!(
        eleven.matches("left out: not Ready").count(),
        10,
        "{eleven}"
    );
    assert!(eleven.ends_with("; and 1 more nodes left out"), "{eleven}");
}

/// Ten layers of a 4096-wide model with a tiny vocabulary: over four stages the layers split
/// 2, 3, 3, 2, so the two middle stages hold the most and weigh exactly the same.
fn ten_layers() -> Model {
    Model {
        name: "ten-layers".into(),
        layers: 10,
        hidden: 4096,
        heads: 32,
        kv_heads: 8,
        ffn: 14336,
        vocab: 256,
        max_context: 4096,
        tied: false,
    }
}

fn cpu_pool(slots: i32) -> Pool {
    Pool {
        nodes: vec![PoolNode {
            name: "localhost".into(),
            gpu_model: "CPU".into(),
            gpu_count: slots,
            allocatable: slots,
            nvlink_domain: None,
            ready: true,
            quarantined_until: None,
            reason: None,
        }],
        gpu_override: None,
        intra_node: IntraNodeLink::PCIe,
        network: Ethernet,
        network_gbps: 10.0,
    }
}

#[test]
fn memory_fits_to_the_byte_and_names_the_first_of_the_heaviest_stages() {
    let mut req = fixed("llama-3.1-8b", WeightDtype::Bf16, 1, 4, 4);
    req.model = ten_layers();
    req.settings.usable_fraction = 1.0;
    // Size a slot from the plan's own figure: exactly that much memory fits.
    let roomy =
        plan_with_devices(&req, &cpu_pool(4), &[cpu_slot(64 << 30, 1.0)], now()).expect("plan");
    let need = roomy.memory_per_gpu_bytes.total as u64;
    let exact = plan_with_devices(&req, &cpu_pool(4), &[cpu_slot(need, 1.0)], now());
    assert!(exact.is_ok(), "{exact:?}");
    let err = plan_with_devices(&req, &cpu_pool(4), &[cpu_slot(need - 1, 1.0)], now())
        .unwrap_err()
        .to_string();
    // Stages 1 and 2 tie for the most memory; the message names stage 1.
    assert!(err.contains("per GPU on stage 1 ("), "{err}");
}

#[test]
fn when_nothing_fits_anywhere_the_closest_is_the_least_over_its_own_gpu() {
    // 405B in bf16 fits neither 8 H100 nor 8 RTX 4090 in one group. The H100 split is the
    // least over (its usable memory is three times the 4090's), so it is named first, and
    // with two GPU models every rejected option says which it was.
    let req = request("llama-3.1-405b", WeightDtype::Bf16, 4096, 8, 1);
    let err = plan(&req, &gpus("1x8xH100,1x8xRTX4090", InfiniBand), now()).unwrap_err();
    let PlanError::NothingFits { message, rejected } = &err else {
        panic!("{err}");
    };
    assert!(
        message.contains("the closest, TP 8 x PP 1 on H100,"),
        "{message}"
    );
    assert!(
        rejected[0].reason.starts_with("H100: needs "),
        "{rejected:?}"
    );
    assert!(
        rejected
            .iter()
            .all(|r| r.reason.starts_with("H100: ") || r.reason.starts_with("RTX4090: ")),
        "{rejected:?}"
    );
    // One GPU model: no prefix.
    let err = plan(&req, &gpus("1x8xRTX4090", InfiniBand), now()).unwrap_err();
    let PlanError::NothingFits { rejected, .. } = &err else {
        panic!("{err}");
    };
    assert!(
        rejected.iter().all(|r| r.reason.starts_with("needs ")),
        "{rejected:?}"
    );
}

#[test]
fn a_lack_of_room_counts_the_stages_it_needs() {
    let req = request("llama-3.1-70b", WeightDtype::Bf16, 4096, 8, 3);
    let err = plan(&req, &gpus("2x4xH100", InfiniBand), now()).unwrap_err();
    let PlanError::NothingFits { rejected, .. } = &err else {
        panic!("{err}");
    };
    let pp3 = rejected
        .iter()
        .find(|r| (r.tensor_parallel, r.pipeline_parallel) == (1, 3))
        .expect("TP 1 x PP 3 listed");
    assert_eq!(
        pp3.reason,
        "fits in memory, but 3 replica group(s) x 3 stage(s) of 1 GPUs = 9 GPUs (9 stages) are needed and the pool has 8 H100 GPUs free"
    );
}

/// The number after `word` in a rejected reason ("estimated 1.23 ms", "against 4.56").
fn number_after(reason: &str, word: &str) -> f64 {
    reason
        .split(word)
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {word:?} in {reason:?}"))
}

#[test]
fn min_latency_explains_each_alternative_by_its_time_per_token() {
    let req = with(
        request("llama-3.1-8b", WeightDtype::Bf16, 4096, 8, 1),
        None,
        None,
        Objective::MinLatency,
    );
    let p = plan(&req, &gpus("1x4xH100", InfiniBand), now()).expect("plan");
    assert_eq!((p.tensor_parallel, p.pipeline_parallel), (4, 1));
    let chosen_ms = p.estimate.time_per_token_ms;
    assert_eq!(p.rejected.len(), 6, "{:#?}", p.rejected);
    let mut last = 0.0;
    for r in &p.rejected {
        let tail = format!(" ms per token against {chosen_ms:.2} for TP 4 x PP 1");
        assert!(r.reason.starts_with("fits, but estimated "), "{}", r.reason);
        assert!(r.reason.ends_with(&tail), "{} / {tail}", r.reason);
        let ms = number_after(&r.reason, "estimated ");
        assert!(ms > chosen_ms && ms >= last, "{:#?}", p.rejected);
        last = ms;
    }
    assert_estimate_consistent(&p);
}

#[test]
fn alternatives_that_fit_are_listed_before_options_that_do_not() {
    // Two replica groups: the one A100 cannot hold both, so its TP 1 x PP 1 lacks room (a
    // failure needing a single GPU), while the H100 node fits many splits. Every fitting
    // alternative is more relevant than any failure, whatever its GPU count.
    let req = with(
        request("llama-3.1-8b", WeightDtype::Bf16, 4096, 8, 2),
        None,
        None,
        Objective::MaxThroughput,
    );
    let p = plan(&req, &gpus("1x8xH100,1x1xA100-80GB", InfiniBand), now()).expect("plan");
    assert_eq!(p.gpu_model, "H100");
    let fits: Vec<bool> = p
        .rejected
        .iter()
        .map(|r| r.reason.contains(": fits with "))
        .collect();
    let first_failure = fits.iter().position(|f| !f).expect("some option fails");
    assert!(first_failure >= 3, "{:#?}", p.rejected);
    assert!(
        fits[first_failure..].iter().all(|f| !f),
        "{:#?}",
        p.rejected
    );
    let a100 = p
        .rejected
        .iter()
        .find(|r| {
            r.reason.starts_with("A100-80GB: ")
                && (r.tensor_parallel, r.pipeline_parallel) == (1, 1)
        })
        .expect("A100 TP 1 x PP 1 listed");
    assert!(a100.reason.contains("replica group"), "{}", a100.reason);
    assert_estimate_consistent(&p);
}

/// Fewer nodes than groups: the most groups that still fit, with why the full request did not;
/// nothing fits at all: the full request's error.
#[test]
fn lost_capacity_plans_the_most_groups_that_fit() {
    let mut req = fixed("smollm2-135m", WeightDtype::Q4_1, 3, 1, 8);
    req.replicas = 3;
    let mut pool = gpus("3x4xRTX4090", Ethernet);
    let (p, why) = plan_within_capacity(&req, &pool, now()).expect("plan");
    assert_eq!((p.replicas, why), (3, None));
    unready(&mut pool, 2);
    let (p, why) = plan_within_capacity(&req, &pool, now()).expect("plan");
    assert_eq!(p.replicas, 1);
    assert_eq!(p.groups.len(), 1);
    let full = plan(&req, &pool, now()).expect_err("three groups do not fit");
    assert_eq!(why, Some(full));
    unready(&mut pool, 3);
    assert!(plan_within_capacity(&req, &pool, now()).is_err());
}

/// A re-plan keeps each group that stays on its nodes under its number; the ones that move
/// take the numbers left, and the stages follow group 0.
#[test]
fn a_replan_keeps_the_groups_that_do_not_move() {
    let mut req = fixed("smollm2-135m", WeightDtype::Q4_1, 3, 1, 8);
    req.replicas = 2;
    let mut pool = gpus("3x4xRTX4090", Ethernet);
    let before = plan(&req, &pool, now()).expect("plan");
    let on = |p: &Plan| -> Vec<(i32, String)> {
        p.groups
            .iter()
            .map(|g| (g.index, g.nodes.join(",")))
            .collect()
    };
    assert_eq!(
        on(&before),
        [(0, "node-0".to_string()), (1, "node-1".to_string())]
    );
    unready(&mut pool, 1);
    let mut after = plan(&req, &pool, now()).expect("plan");
    keep_placements(&mut after, &before);
    assert_eq!(
        on(&after),
        [(0, "node-2".to_string()), (1, "node-1".to_string())]
    );
    assert_eq!(after.stages[0].node, "node-2");
    // An unchanged plan stays as it is.
    let mut same = before.clone();
    keep_placements(&mut same, &before);
    assert_eq!(same, before);
}
