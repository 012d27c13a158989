//! Enumerating the legal (TP, PP) options per GPU model, checking memory and room in the pool,
//! estimating each, choosing by objective, and explaining the rest.

use std::cmp::Ordering;

use k8s_openapi::jiff::Timestamp;
use whaleflux_crds::{
    GroupPlacement, IntraNodeLink, MemoryBreakdown, Objective, Plan, PlanEstimate, RejectedOption,
    StagePlan,
};

use super::catalog::{self, GpuSpec};
use super::cost::{self, CostInputs, Link};
use super::legality::{check_pp, check_tp, legal_tps, split_layers, split_note};
use super::memory::{StageShape, gib, stage_memory};
use super::objective::{choice_note, compare, fit_reason};
use super::placement::{StagePlace, place_across_nodes, place_within_nodes};
use super::pool::{Pool, UsableNode, usable_nodes};
use super::{PlanError, PlanRequest};

/// Whether a stage's tensor-parallel group stays on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tier {
    WithinNode,
    AcrossNodes,
}

/// Why an option was not taken, ordered from most to least relevant when nothing fits.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Failure {
    /// Fits in memory, but the pool lacks room for every replica group.
    Room(String),
    /// Needs more GPUs in one node than any node has free (only spanning nodes would do).
    Spans(String),
    /// Needs more memory per GPU than is usable; `over` = needed / usable.
    Memory { over: f64, reason: String },
}

impl Failure {
    fn rank(&self) -> u8 {
        match self {
            Failure::Room(_) => 0,
            Failure::Spans(_) => 1,
            Failure::Memory { .. } => 2,
        }
    }

    fn reason(&self) -> &str {
        match self {
            Failure::Room(r) | Failure::Spans(r) | Failure::Memory { reason: r, .. } => r,
        }
    }
}

/// A fitting option: its placement and estimate.
#[derive(Debug, Clone)]
pub(super) struct Fit {
    pub(super) groups: Vec<Vec<StagePlace>>,
    pub(super) period_s: f64,
    pub(super) tokens_per_s: f64,
}

/// One evaluated (GPU model, TP, PP).
#[derive(Debug, Clone)]
pub(super) struct Candidate<'a> {
    pub(super) gpu: &'a GpuSpec,
    pub(super) tp: u32,
    pub(super) pp: u32,
    pub(super) tier: Tier,
    pub(super) layers: Vec<[u32; 2]>,
    pub(super) memory: MemoryBreakdown,
    pub(super) outcome: Result<Fit, Failure>,
}

impl Candidate<'_> {
    pub(super) fn gpus(&self) -> u32 {
        self.tp * self.pp
    }
}

/// The nodes of one GPU model, and the links the planner assumes for them.
struct ModelNodes<'a> {
    gpu: &'a GpuSpec,
    nodes: Vec<&'a UsableNode<'a>>,
    free: Vec<u32>,
    intra: Link,
    nvlink_in_node: bool,
    network: Link,
}

pub(crate) fn plan(
    req: &PlanRequest,
    pool: &Pool,
    devices: &[GpuSpec],
    now: Timestamp,
) -> Result<Plan, PlanError> {
    let model = &req.model;
    if let Some(tp) = req.tensor_parallel {
        check_tp(model, tp)?;
    }
    if let Some(pp) = req.pipeline_parallel {
        check_pp(model, pp)?;
    }
    let health = usable_nodes(pool, devices, now)?;
    if health.usable.is_empty() {
        let detail = if health.left_out.is_empty() {
            "it lists no nodes (status.nodes is empty)".to_string()
        } else {
            list_capped(&health.left_out, 10)
        };
        return Err(PlanError::NoUsableGpus { detail });
    }

    let mut gpus: Vec<&GpuSpec> = Vec::new();
    for n in &health.usable {
        if !gpus.iter().any(|g| g.short_name == n.gpu.short_name) {
            gpus.push(n.gpu);
        }
    }
    gpus.sort_by_key(|g| catalog::index_of(g));
    let network = Link::network(pool.network, pool.network_gbps);
    let by_model: Vec<ModelNodes<'_>> = gpus
        .iter()
        .map(|&gpu| {
            let nodes: Vec<&UsableNode> = health
                .usable
                .iter()
                .filter(|n| n.gpu.short_name == gpu.short_name)
                .collect();
            let nvlink_in_node = gpu.nvlink_gbps > 0.0 && pool.intra_node != IntraNodeLink::PCIe;
            ModelNodes {
                gpu,
                free: nodes.iter().map(|n| n.free).collect(),
                nodes,
                intra: if nvlink_in_node {
                    Link::nvlink(gpu)
                } else {
                    Link::pcie(gpu)
                },
                nvlink_in_node,
                network,
            }
        })
        .collect();

    let tps: Vec<u32> = match req.tensor_parallel {
        Some(tp) => vec![tp],
        None => legal_tps(model),
    };
    let place_groups = req.replicas.max(1);

    // In (catalog, TP, PP) order: the stable sorts below keep it for ties.
    let mut options: Vec<Candidate<'_>> = Vec::new();
    for mn in &by_model {
        let total: u64 = mn.free.iter().map(|&f| u64::from(f)).sum();
        for &tp in &tps {
            let pps: Vec<u32> = match req.pipeline_parallel {
                Some(pp) => vec![pp],
                None => (1..=model.layers)
                    .take_while(|pp| u64::from(tp) * u64::from(*pp) <= total)
                    .collect(),
            };
            for pp in pps {
                options.push(evaluate(req, mn, tp, pp, place_groups, Tier::WithinNode));
            }
        }
    }
    // Tensor parallelism across nodes only when nothing fits inside one node.
    if !options.iter().any(|o| o.outcome.is_ok()) {
        for o in options.iter_mut() {
            if matches!(o.outcome, Err(Failure::Room(_) | Failure::Spans(_))) {
                let mn = by_model
                    .iter()
                    .find(|m| m.gpu.short_name == o.gpu.short_name)
                    .expect("every option's GPU model has nodes");
                *o = evaluate(req, mn, o.tp, o.pp, place_groups, Tier::AcrossNodes);
            }
        }
    }

    let mut fits: Vec<usize> = (0..options.len())
        .filter(|&i| options[i].outcome.is_ok())
        .collect();
    fits.sort_by(|&a, &b| compare(req.objective, &options[a], &options[b]));
    let Some(&chosen_ix) = fits.first() else {
        return Err(nothing_fits(req, &by_model, &health.left_out, options));
    };

    let chosen = &options[chosen_ix];
    let fit = chosen.outcome.as_ref().expect("chosen option fits");
    let mn = by_model
        .iter()
        .find(|m| m.gpu.short_name == chosen.gpu.short_name)
        .expect("chosen GPU model has nodes");

    // Rejected: for MinGpus by GPUs per replica (why not fewer?), otherwise the fitting
    // alternatives in objective order first; then failures.
    let order: Vec<usize> = {
        let mut fit_rank = vec![0usize; options.len()];
        for (pos, &i) in fits.iter().enumerate() {
            fit_rank[i] = pos;
        }
        let mut rest: Vec<usize> = (0..options.len()).filter(|&i| i != chosen_ix).collect();
        rest.sort_by(|&a, &b| {
            let (oa, ob) = (&options[a], &options[b]);
            let rank = |o: &Candidate<'_>, i: usize| match &o.outcome {
                Ok(_) => (0u8, fit_rank[i] as f64),
                Err(f) => (1 + f.rank(), failure_key(o, f)),
            };
            let (ra, rb) = (rank(oa, a), rank(ob, b));
            let by_rank = ra.0.cmp(&rb.0).then(ra.1.total_cmp(&rb.1));
            if req.objective == Objective::MinGpus {
                oa.gpus().cmp(&ob.gpus()).then(by_rank)
            } else {
                by_rank.then(oa.gpus().cmp(&ob.gpus()))
            }
        });
        rest
    };
    let multi_model = by_model.len() > 1;
    let rejected_all: Vec<RejectedOption> = order
        .iter()
        .map(|&i| {
            let o = &options[i];
            let reason = match &o.outcome {
                Ok(f) => fit_reason(req.objective, o, f, chosen, fit),
                Err(f) => f.reason().to_string(),
            };
            rejected(o, reason, multi_model)
        })
        .collect();

    let mut notes = Vec::new();
    if let Some(n) = split_note(model.layers, chosen.pp) {
        notes.push(n);
    }
    if chosen.tp > model.kv_heads {
        notes.push(format!(
            "tensor parallel {} exceeds the {} KV heads: each KV head is replicated on {} ranks",
            chosen.tp,
            model.kv_heads,
            chosen.tp / model.kv_heads
        ));
    }
    if model.tied && chosen.pp > 1 {
        notes.push(
            "tied embeddings: the last stage holds its own copy of the embedding as the output head"
                .to_string(),
        );
    }
    if chosen.tier == Tier::AcrossNodes {
        let link = if spans_one_domain(mn, &fit.groups) {
            "NVLink (the nodes share an NVLink domain)".to_string()
        } else {
            format!(
                "the {:?} network at {} Gbit/s (slow)",
                pool.network, pool.network_gbps
            )
        };
        notes.push(format!(
            "tensor parallel {} spans nodes because no split inside one node fits ({} GPUs is the most free on one {} node); its all-reduces run over {link}",
            chosen.tp,
            mn.free.iter().max().copied().unwrap_or(0),
            mn.gpu.short_name
        ));
    }
    if pool.intra_node == IntraNodeLink::NVLink && mn.gpu.nvlink_gbps == 0.0 {
        notes.push(format!(
            "spec.interconnect.intraNode is NVLink but the {} has no NVLink switch in the catalog; PCIe figures are used",
            mn.gpu.short_name
        ));
    }
    if multi_model {
        notes.push(format!(
            "the pool mixes GPU models ({}); a plan uses one, here {}",
            by_model
                .iter()
                .map(|m| m.gpu.short_name)
                .collect::<Vec<_>>()
                .join(", "),
            mn.gpu.short_name
        ));
    }
    if !health.left_out.is_empty() {
        notes.push(list_capped(&health.left_out, 10));
    }
    if req.replicas == 0 {
        notes.push(
            "replicas is 0: the split is sized for one replica group and nothing is placed"
                .to_string(),
        );
    }
    let runner_up = fits.get(1).map(|&i| &options[i]);
    notes.push(choice_note(req.objective, chosen, runner_up));
    notes.push(format!(
        "KV cache reserved in fp16 for {} tokens x {} sequences per replica group; usable memory is {:.0}% of each GPU",
        req.max_context,
        req.max_sequences,
        req.settings.usable_fraction * 100.0
    ));
    notes.push(
        "the estimate is a cost model (75% of HBM bandwidth, 50% of dense BF16 TFLOPS, 20 us per layer, link bandwidth and latency from the catalog; sequences half full on average), not a measurement; it lands within a factor of 2 of 18 published measurements"
            .to_string(),
    );
    let mut rejected_list = rejected_all;
    if rejected_list.len() > req.settings.max_rejected {
        let more = rejected_list.len() - req.settings.max_rejected;
        rejected_list.truncate(req.settings.max_rejected);
        notes.push(format!(
            "{more} more rejected options are not listed (the {} most relevant are)",
            req.settings.max_rejected
        ));
    }

    let node_name = |place: &StagePlace| {
        place
            .iter()
            .map(|(i, _)| mn.nodes[*i].name.as_str())
            .collect::<Vec<_>>()
            .join("+")
    };
    let stages = chosen
        .layers
        .iter()
        .enumerate()
        .map(|(s, r)| StagePlan {
            index: s as i32,
            layers: [r[0] as i32, r[1] as i32],
            node: fit.groups[0].get(s).map(node_name).unwrap_or_default(),
            gpus: chosen.tp as i32,
            embedding: s == 0,
            head: s + 1 == chosen.layers.len(),
        })
        .collect();
    let groups = fit
        .groups
        .iter()
        .take(req.replicas as usize)
        .enumerate()
        .map(|(g, stages)| GroupPlacement {
            index: g as i32,
            nodes: stages.iter().map(node_name).collect(),
        })
        .collect();
    tracing::debug!(
        model = %model.name,
        tp = chosen.tp,
        pp = chosen.pp,
        gpu = chosen.gpu.short_name,
        considered = options.len(),
        "planned"
    );
    Ok(Plan {
        model: model.name.clone(),
        dtype: req.dtype,
        gpu_model: chosen.gpu.short_name.to_string(),
        objective: req.objective,
        tensor_parallel: chosen.tp as i32,
        pipeline_parallel: chosen.pp as i32,
        replicas: req.replicas as i32,
        gpus_per_replica: chosen.gpus() as i32,
        crosses_nodes: chosen.tier == Tier::AcrossNodes,
        stages,
        groups,
        memory_per_gpu_bytes: chosen.memory.clone(),
        estimate: PlanEstimate {
            time_per_token_ms: round(fit.period_s * 1e3, 3),
            decode_tokens_per_second: round(fit.tokens_per_s, 1),
            decode_tokens_per_second_per_gpu: round(fit.tokens_per_s / f64::from(chosen.gpus()), 1),
            concurrency: req.max_sequences.min(i32::MAX as u64) as i32,
        },
        notes,
        rejected: rejected_list,
    })
}

pub(super) fn round(v: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (v * f).round() / f
}

fn list_capped(items: &[String], cap: usize) -> String {
    let mut s = items
        .iter()
        .take(cap)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > cap {
        s.push_str(&format!("; and {} more nodes left out", items.len() - cap));
    }
    s
}

fn rejected(o: &Candidate<'_>, reason: String, multi_model: bool) -> RejectedOption {
    RejectedOption {
        tensor_parallel: o.tp as i32,
        pipeline_parallel: o.pp as i32,
        reason: if multi_model {
            format!("{}: {reason}", o.gpu.short_name)
        } else {
            reason
        },
    }
}

fn failure_key(o: &Candidate<'_>, f: &Failure) -> f64 {
    match f {
        Failure::Memory { over, .. } => *over,
        Failure::Room(_) | Failure::Spans(_) => f64::from(o.gpus()),
    }
}

fn spans_one_domain(mn: &ModelNodes<'_>, groups: &[Vec<StagePlace>]) -> bool {
    groups.iter().flatten().all(|place| same_domain(mn, place))
}

fn same_domain(mn: &ModelNodes<'_>, place: &StagePlace) -> bool {
    let first = mn.nodes[place[0].0].domain.as_ref();
    first.is_some()
        && place
            .iter()
            .all(|(i, _)| mn.nodes[*i].domain.as_ref() == first)
}

/// Evaluates one option: memory of every stage, room for every replica group, and the
/// estimate of the slowest group.
fn evaluate<'a>(
    req: &PlanRequest,
    mn: &ModelNodes<'a>,
    tp: u32,
    pp: u32,
    groups: u32,
    tier: Tier,
) -> Candidate<'a> {
    let model = &req.model;
    let gpu = mn.gpu;
    let layers = split_layers(model.layers, pp);
    let shapes: Vec<StageShape> = layers
        .iter()
        .enumerate()
        .map(|(s, r)| StageShape {
            tp,
            pp,
            layers: r[1] - r[0],
            first: s == 0,
            last: s + 1 == layers.len(),
        })
        .collect();
    let usable = (gpu.memory_bytes() as f64 * req.settings.usable_fraction) as u64;
    let mut memory = MemoryBreakdown::default();
    let mut worst_stage = 0;
    for (s, shape) in shapes.iter().enumerate() {
        let m = stage_memory(
            model,
            req.dtype,
            *shape,
            req.settings.kv_cache_bytes,
            req.max_context,
            req.max_sequences,
            usable,
        );
        if s == 0 || m.total > memory.total {
            memory = m;
            worst_stage = s;
        }
    }
    let mk = |outcome| Candidate {
        gpu,
        tp,
        pp,
        tier,
        layers: layers.clone(),
        memory: memory.clone(),
        outcome,
    };
    if memory.total > usable as i64 {
        let m = &memory;
        let reason = format!(
            "needs {:.1} GiB per GPU on stage {worst_stage} (weights {:.1}, KV cache {:.1}, activations {:.1}, overhead {:.1} GiB) but {:.1} GiB is usable on each {}",
            gib(m.total as f64),
            gib(m.weights as f64),
            gib(m.kv_cache as f64),
            gib(m.activations as f64),
            gib(m.overhead as f64),
            gib(usable as f64),
            gpu.short_name
        );
        return mk(Err(Failure::Memory {
            over: m.total as f64 / usable as f64,
            reason,
        }));
    }
    let max_free = mn.free.iter().max().copied().unwrap_or(0);
    let placed = match tier {
        Tier::WithinNode if tp > max_free => {
            return mk(Err(Failure::Spans(format!(
                "fits in memory, but needs {tp} GPUs in one node and at most {max_free} {} are free on one node; spanning nodes is only used when nothing inside one node fits",
                gpu.short_name
            ))));
        }
        Tier::WithinNode => place_within_nodes(&mn.free, tp, pp, groups),
        Tier::AcrossNodes => place_across_nodes(&mn.free, tp, pp, groups),
    };
    let Some(placed) = placed else {
        let need = u64::from(groups) * u64::from(pp);
        let room = match tier {
            Tier::WithinNode => format!(
                "the pool has room for {} such stages ({} GPUs free on {} {} nodes)",
                super::placement::slots(&mn.free, tp),
                mn.free.iter().map(|&f| u64::from(f)).sum::<u64>(),
                mn.nodes.len(),
                gpu.short_name
            ),
            Tier::AcrossNodes => format!(
                "the pool has {} {} GPUs free",
                mn.free.iter().map(|&f| u64::from(f)).sum::<u64>(),
                gpu.short_name
            ),
        };
        return mk(Err(Failure::Room(format!(
            "fits in memory, but {groups} replica group(s) x {pp} stage(s) of {tp} GPUs = {} GPUs ({need} stages) are needed and {room}",
            u64::from(groups) * u64::from(pp) * u64::from(tp)
        ))));
    };

    // Estimate: stage times per link kind, memoised; the slowest group sets the figure.
    let c = CostInputs {
        model,
        dtype: req.dtype,
        gpu,
        kv_bytes: req.settings.kv_cache_bytes,
        max_context: req.max_context,
        batch: req.max_sequences,
    };
    let (micro, mb) = cost::micro_batches(pp, req.max_sequences);
    let nvlink = Link::nvlink(gpu);
    let links = [mn.intra, nvlink, mn.network];
    let mut memo: Vec<[Option<f64>; 3]> = vec![[None; 3]; shapes.len()];
    let hand = cost::handoff_bytes(model, mb);
    let mut worst = 0.0f64;
    let mut stage_s = Vec::with_capacity(shapes.len());
    let mut handoff_s = Vec::with_capacity(shapes.len());
    for group in &placed {
        stage_s.clear();
        handoff_s.clear();
        for (s, place) in group.iter().enumerate() {
            let kind = if place.len() == 1 {
                0
            } else if mn.nvlink_in_node && same_domain(mn, place) {
                1
            } else {
                2
            };
            let t = *memo[s][kind]
                .get_or_insert_with(|| cost::stage_step_s(&c, shapes[s], mb, links[kind]));
            stage_s.push(t);
            if s + 1 < group.len() {
                let next = &group[s + 1];
                let same_node = place.len() == 1 && next.len() == 1 && place[0].0 == next[0].0;
                let link = if same_node { mn.intra } else { mn.network };
                handoff_s.push(link.send_s(hand));
            }
        }
        worst = worst.max(cost::pipeline_period_s(micro, &stage_s, &handoff_s));
    }
    let tokens_per_s = if worst > 0.0 {
        req.max_sequences as f64 / worst
    } else {
        0.0
    };
    mk(Ok(Fit {
        groups: placed,
        period_s: worst,
        tokens_per_s,
    }))
}

fn nothing_fits(
    req: &PlanRequest,
    by_model: &[ModelNodes<'_>],
    left_out: &[String],
    mut options: Vec<Candidate<'_>>,
) -> PlanError {
    options.sort_by(|a, b| {
        let (fa, fb) = match (&a.outcome, &b.outcome) {
            (Err(fa), Err(fb)) => (fa, fb),
            _ => return Ordering::Equal,
        };
        fa.rank()
            .cmp(&fb.rank())
            .then(failure_key(a, fa).total_cmp(&failure_key(b, fb)))
    });
    let pool = by_model
        .iter()
        .map(|m| {
            format!(
                "{} {} GPUs free on {} usable node(s)",
                m.free.iter().map(|&f| u64::from(f)).sum::<u64>(),
                m.gpu.short_name,
                m.nodes.len()
            )
        })
        .collect::<Vec<_>>()
        .join(" and ");
    let left = if left_out.is_empty() {
        String::new()
    } else {
        format!(", {} node(s) left out", left_out.len())
    };
    let closest = match options.first() {
        Some(o) => {
            let reason = o.outcome.as_ref().err().map(Failure::reason).unwrap_or("");
            format!(
                "the closest, TP {} x PP {} on {}, {reason}",
                o.tp, o.pp, o.gpu.short_name
            )
        }
        None => {
            let smallest = legal_tps(&req.model).first().copied().unwrap_or(1);
            format!(
                "every legal split needs more GPUs than the pool has (tensor parallel {})",
                req.tensor_parallel.unwrap_or(smallest)
            )
        }
    };
    let message = format!(
        "no split of {} ({}) fits the pool ({pool}{left}) for {} replica group(s) at maxContextLength {} and maxConcurrentSequences {}: {closest}",
        req.model.name,
        req.dtype.as_str(),
        req.replicas.max(1),
        req.max_context,
        req.max_sequences
    );
    let multi = by_model.len() > 1;
    let rejected = options
        .iter()
        .take(req.settings.max_rejected)
        .map(|o| {
            let reason = o.outcome.as_ref().err().map(Failure::reason).unwrap_or("");
            rejected(o, reason.to_string(), multi)
        })
        .collect();
    PlanError::NothingFits { message, rejected }
}
