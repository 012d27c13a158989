//! How each objective ranks the options that fit, and the words for those it did not take.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use whaleflux_crds::Objective;

use super::choose::{Candidate, Fit};

/// Estimated decode tokens/s per GPU of a fitting option: with every GPU priced alike, the
/// inverse of the GPU time each token costs.
pub(super) fn per_gpu(o: &Candidate<'_>, f: &Fit) -> f64 {
    f.tokens_per_s / f64::from(o.gpus().max(1))
}

/// Per-GPU throughput on a 0.2 % grid: estimates closer than that are a tie, so the tie-breaks
/// (fewer GPUs, fewer nodes, fewer stages) decide rather than noise of the cost model. A grid
/// keeps the order total, which a tolerance would not.
fn per_gpu_grid(o: &Candidate<'_>, f: &Fit) -> i64 {
    (per_gpu(o, f).max(1e-9).ln() * 500.0).round() as i64
}

/// Distinct nodes the option's replica groups use.
pub(super) fn nodes(f: &Fit) -> usize {
    f.groups
        .iter()
        .flatten()
        .flatten()
        .map(|&(node, _)| node)
        .collect::<BTreeSet<_>>()
        .len()
}

/// Orders fitting options, best first, by the objective; ties go to fewer GPUs. Options are
/// generated in (catalog, TP, PP) order and every sort here is stable, so remaining ties keep
/// that order and the choice is deterministic.
pub(super) fn compare(objective: Objective, a: &Candidate<'_>, b: &Candidate<'_>) -> Ordering {
    let (fa, fb) = match (&a.outcome, &b.outcome) {
        (Ok(fa), Ok(fb)) => (fa, fb),
        _ => return Ordering::Equal,
    };
    let gpus = a.gpus().cmp(&b.gpus());
    let tput = fb.tokens_per_s.total_cmp(&fa.tokens_per_s);
    let latency = fa.period_s.total_cmp(&fb.period_s);
    match objective {
        Objective::MaxTokensPerGpu => per_gpu_grid(b, fb)
            .cmp(&per_gpu_grid(a, fa))
            .then(gpus)
            .then(nodes(fa).cmp(&nodes(fb)))
            .then(a.pp.cmp(&b.pp)),
        Objective::MinGpus => gpus.then(tput),
        Objective::MaxThroughput => tput.then(gpus),
        Objective::MinLatency => latency.then(gpus),
    }
}

/// Why fitting option `o` lost to the chosen `c`, in the objective's terms.
pub(super) fn fit_reason(
    objective: Objective,
    o: &Candidate<'_>,
    f: &Fit,
    c: &Candidate<'_>,
    cf: &Fit,
) -> String {
    let name = format!("TP {} x PP {}", c.tp, c.pp);
    match objective {
        Objective::MaxTokensPerGpu if per_gpu_grid(o, f) < per_gpu_grid(c, cf) => format!(
            "fits with {} GPUs per replica, but estimated {:.0} tokens/s per GPU against {:.0} for {name}",
            o.gpus(),
            per_gpu(o, f),
            per_gpu(c, cf)
        ),
        Objective::MinGpus if o.gpus() > c.gpus() => format!(
            "fits, but needs {} GPUs per replica where {name} needs {}",
            o.gpus(),
            c.gpus()
        ),
        Objective::MinLatency if f.period_s > cf.period_s => format!(
            "fits, but estimated {:.2} ms per token against {:.2} for {name}",
            f.period_s * 1e3,
            cf.period_s * 1e3
        ),
        Objective::MaxTokensPerGpu if o.gpus() > c.gpus() => format!(
            "fits as well per GPU, but needs {} GPUs per replica where {name} needs {}",
            o.gpus(),
            c.gpus()
        ),
        Objective::MaxTokensPerGpu if nodes(f) > nodes(cf) => format!(
            "fits as well per GPU, but spreads over {} nodes where {name} uses {}",
            nodes(f),
            nodes(cf)
        ),
        _ if f.tokens_per_s < cf.tokens_per_s => format!(
            "fits with {} GPUs per replica, but estimated {:.0} tokens/s against {:.0} for {name}",
            o.gpus(),
            f.tokens_per_s,
            cf.tokens_per_s
        ),
        _ if o.gpus() > c.gpus() => format!(
            "fits with the same estimate, but needs {} GPUs per replica where {name} needs {}",
            o.gpus(),
            c.gpus()
        ),
        _ => format!(
            "fits as well as {name}; ties go to lower tensor parallelism, then fewer stages"
        ),
    }
}

/// One sentence: which objective chose the plan, its figures, and what the runner-up (the next
/// fitting option in the objective's order) would have given.
pub(super) fn choice_note(
    objective: Objective,
    chosen: &Candidate<'_>,
    runner_up: Option<&Candidate<'_>>,
) -> String {
    let figures = |o: &Candidate<'_>| match &o.outcome {
        Ok(f) => format!(
            "TP {} x PP {} on {} ({} GPUs per replica, {:.0} tokens/s per group, {:.0} per GPU, {:.2} ms per token)",
            o.tp,
            o.pp,
            o.gpu.short_name,
            o.gpus(),
            f.tokens_per_s,
            per_gpu(o, f),
            f.period_s * 1e3
        ),
        Err(_) => format!("TP {} x PP {}", o.tp, o.pp),
    };
    let why = match objective {
        Objective::MaxTokensPerGpu => "the most estimated tokens/s per GPU",
        Objective::MinGpus => "the fewest GPUs that fit",
        Objective::MaxThroughput => "the most estimated tokens/s per replica group",
        Objective::MinLatency => "the least estimated time per token",
    };
    let rest = match runner_up {
        Some(r) => format!("; the runner-up, {}", figures(r)),
        None => "; no other split fits".to_string(),
    };
    format!(
        "objective {objective:?} ({why}) chose {}{rest}",
        figures(chosen)
    )
}

#[cfg(test)]
#[path = "objective_tests.rs"]
mod tests;
