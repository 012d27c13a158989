//! The choice between fitting options and the words for the ones not taken, on hand-built
//! candidates (the scenarios in `tests/planner_scenarios.rs` drive the same code from pools).

use std::cmp::Ordering;

use whaleflux_crds::{MemoryBreakdown, Objective};

use super::super::catalog;
use super::super::choose::{Candidate, Fit, Tier, round};
use super::{compare, fit_reason};

fn fit(
    gpu: &'static str,
    tp: u32,
    pp: u32,
    period_s: f64,
    tokens_per_s: f64,
) -> Candidate<'static> {
    Candidate {
        gpu: catalog::lookup(gpu).expect("catalog GPU"),
        tp,
        pp,
        tier: Tier::WithinNode,
        layers: Vec::new(),
        memory: MemoryBreakdown::default(),
        outcome: Ok(Fit {
            groups: Vec::new(),
            period_s,
            tokens_per_s,
        }),
    }
}

fn reason(objective: Objective, o: &Candidate<'_>, c: &Candidate<'_>) -> String {
    let (Ok(f), Ok(cf)) = (&o.outcome, &c.outcome) else {
        panic!("both fit")
    };
    fit_reason(objective, o, f, c, cf)
}

#[test]
fn each_objective_says_what_the_alternative_lacks() {
    let chosen = fit("H100", 2, 1, 0.010, 800.0);
    let bigger_slower = fit("H100", 4, 1, 0.020, 400.0);
    assert_eq!(
        reason(Objective::MinGpus, &bigger_slower, &chosen),
        "fits, but needs 4 GPUs per replica where TP 2 x PP 1 needs 2"
    );
    assert_eq!(
        reason(Objective::MinLatency, &bigger_slower, &chosen),
        "fits, but estimated 20.00 ms per token against 10.00 for TP 2 x PP 1"
    );
    assert_eq!(
        reason(Objective::MaxThroughput, &bigger_slower, &chosen),
        "fits with 4 GPUs per replica, but estimated 400 tokens/s against 800 for TP 2 x PP 1"
    );
    // The same GPU count and a lower throughput: MinGpus falls through to throughput.
    let same_gpus_slower = fit("H100", 1, 2, 0.010, 500.0);
    assert_eq!(
        reason(Objective::MinGpus, &same_gpus_slower, &chosen),
        "fits with 2 GPUs per replica, but estimated 500 tokens/s against 800 for TP 2 x PP 1"
    );
    // As fast per token but less throughput: MinLatency names the throughput.
    assert_eq!(
        reason(Objective::MinLatency, &same_gpus_slower, &chosen),
        "fits with 2 GPUs per replica, but estimated 500 tokens/s against 800 for TP 2 x PP 1"
    );
}

#[test]
fn ties_name_the_gpu_count_or_the_tie_break() {
    let chosen = fit("H100", 2, 1, 0.010, 800.0);
    let same_estimate_more_gpus = fit("H100", 4, 1, 0.010, 800.0);
    for objective in [Objective::MaxThroughput, Objective::MinLatency] {
        assert_eq!(
            reason(objective, &same_estimate_more_gpus, &chosen),
            "fits with the same estimate, but needs 4 GPUs per replica where TP 2 x PP 1 needs 2"
        );
    }
    let twin = fit("H100", 1, 2, 0.010, 800.0);
    for objective in [
        Objective::MinGpus,
        Objective::MaxThroughput,
        Objective::MinLatency,
    ] {
        assert_eq!(
            reason(objective, &twin, &chosen),
            "fits as well as TP 2 x PP 1; ties go to lower tensor parallelism, then fewer stages"
        );
    }
}

#[test]
fn compare_orders_by_objective_then_fewer_gpus() {
    let small_slow = fit("H100", 1, 1, 0.030, 300.0);
    let big_fast = fit("H100", 4, 1, 0.010, 900.0);
    let big_fast_lat = fit("H100", 2, 2, 0.012, 900.0);
    let mid_equal = fit("H100", 2, 1, 0.010, 900.0);
    use Ordering::{Greater, Less};
    assert_eq!(compare(Objective::MinGpus, &small_slow, &big_fast), Less);
    assert_eq!(compare(Objective::MinGpus, &big_fast, &small_slow), Greater);
    // Same GPU count: more throughput first.
    assert_eq!(
        compare(
            Objective::MinGpus,
            &big_fast,
            &fit("H100", 2, 2, 0.01, 100.0)
        ),
        Less
    );
    assert_eq!(
        compare(Objective::MaxThroughput, &big_fast, &small_slow),
        Less
    );
    assert_eq!(
        compare(Objective::MaxThroughput, &mid_equal, &big_fast),
        Less
    );
    assert_eq!(
        compare(Objective::MaxThroughput, &big_fast, &mid_equal),
        Greater
    );
    assert_eq!(
        compare(Objective::MinLatency, &big_fast, &big_fast_lat),
        Less
    );
    assert_eq!(
        compare(Objective::MinLatency, &big_fast_lat, &small_slow),
        Less
    );
    assert_eq!(compare(Objective::MinLatency, &mid_equal, &big_fast), Less);
    assert_eq!(
        compare(Objective::MinLatency, &big_fast, &big_fast.clone()),
        Ordering::Equal
    );
}

#[test]
fn round_keeps_the_asked_decimals() {
    assert_eq!(round(1.23456, 2), 1.23);
    assert_eq!(round(1.235_1, 2), 1.24);
    assert_eq!(round(1234.5678, 0), 1235.0);
    assert_eq!(round(-0.0049, 2), -0.0);
}

fn on_nodes(mut c: Candidate<'static>, stage_nodes: &[usize]) -> Candidate<'static> {
    if let Ok(f) = &mut c.outcome {
        f.groups = vec![stage_nodes.iter().map(|&n| vec![(n, c.tp)]).collect()];
    }
    c
}

#[test]
fn tokens_per_gpu_ranks_by_gpu_time_then_fewer_gpus_nodes_and_stages() {
    use Objective::MaxTokensPerGpu as O;
    use Ordering::{Greater, Less};
    // The example: TP 8 at 175 tokens/s per GPU beats TP 1 x PP 3 at 70.
    let tp8 = fit("H100", 8, 1, 0.010, 1400.0);
    let pp3 = fit("H100", 1, 3, 0.050, 210.0);
    assert_eq!(compare(O, &tp8, &pp3), Less);
    assert_eq!(compare(O, &pp3, &tp8), Greater);
    assert_eq!(
        reason(O, &pp3, &tp8),
        "fits with 3 GPUs per replica, but estimated 70 tokens/s per GPU against 175 for TP 8 x PP 1"
    );
    // On the same 0.2 % step of the per-GPU grid is a tie: fewer GPUs win, and say so.
    let tp4 = fit("H100", 4, 1, 0.010, 700.08);
    assert_eq!(compare(O, &tp4, &tp8), Less);
    assert_eq!(
        reason(O, &tp8, &tp4),
        "fits as well per GPU, but needs 8 GPUs per replica where TP 4 x PP 1 needs 4"
    );
    // A clear 1 % more per GPU wins over fewer GPUs.
    assert_eq!(compare(O, &fit("H100", 8, 1, 0.01, 1414.0), &tp4), Less);
    // Same GPUs and per-GPU figure: fewer nodes, then fewer stages.
    let one_node = on_nodes(fit("H100", 2, 2, 0.010, 700.0), &[0, 0]);
    let two_nodes = on_nodes(fit("H100", 2, 2, 0.010, 700.0), &[0, 1]);
    assert_eq!(compare(O, &one_node, &two_nodes), Less);
    assert_eq!(compare(O, &two_nodes, &one_node), Greater);
    assert_eq!(
        reason(O, &two_nodes, &one_node),
        "fits as well per GPU, but spreads over 2 nodes where TP 2 x PP 2 uses 1"
    );
    let shallow = on_nodes(fit("H100", 4, 1, 0.010, 700.0), &[0]);
    let deep = on_nodes(fit("H100", 1, 4, 0.010, 700.0), &[0, 0, 0, 0]);
    assert_eq!(compare(O, &shallow, &deep), Less);
    assert_eq!(compare(O, &deep, &shallow), Greater);
    assert_eq!(compare(O, &shallow, &shallow.clone()), Ordering::Equal);
}

#[test]
fn the_choice_note_names_the_objective_and_the_runner_up() {
    let tp8 = fit("H100", 8, 1, 0.010, 1400.0);
    let pp3 = fit("H100", 1, 3, 0.050, 210.0);
    assert_eq!(
        super::choice_note(Objective::MaxTokensPerGpu, &tp8, Some(&pp3)),
        "objective MaxTokensPerGpu (the most estimated tokens/s per GPU) chose TP 8 x PP 1 on H100 (8 GPUs per replica, 1400 tokens/s per group, 175 per GPU, 10.00 ms per token); the runner-up, TP 1 x PP 3 on H100 (3 GPUs per replica, 210 tokens/s per group, 70 per GPU, 50.00 ms per token)"
    );
    assert_eq!(
        super::choice_note(Objective::MinGpus, &pp3, None),
        "objective MinGpus (the fewest GPUs that fit) chose TP 1 x PP 3 on H100 (3 GPUs per replica, 210 tokens/s per group, 70 per GPU, 50.00 ms per token); no other split fits"
    );
    for (o, why) in [
        (
            Objective::MaxThroughput,
            "(the most estimated tokens/s per replica group)",
        ),
        (
            Objective::MinLatency,
            "(the least estimated time per token)",
        ),
    ] {
        assert!(super::choice_note(o, &tp8, None).contains(why), "{o:?}");
    }
}
