//! The choice between fitting options and the words for the ones not taken, on hand-built
//! candidates (the scenarios in `tests/planner_scenarios.rs` drive the same code from pools).

use super::*;

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
