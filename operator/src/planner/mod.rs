//! The planner: a pure function from a model, serving limits and a GPU pool to a [`Plan`] — the
//! tensor-parallel (TP), pipeline-parallel (PP) and replica split, where each stage runs, the
//! memory it needs per GPU and an estimate of its decode speed — plus the options it rejected
//! and why. No IO and no clock: the caller passes the current time for quarantine checks.

pub mod catalog;
mod choose;
pub mod cost;
pub mod legality;
pub mod memory;
pub mod models;
mod objective;
mod placement;
pub mod pool;

use k8s_openapi::jiff::Timestamp;
use whaleflux_crds::{LlmDeploymentSpec, Objective, Plan, RejectedOption, WeightDtype};

pub use catalog::GpuSpec;
pub use models::Model;
pub use pool::Pool;

/// Tunables of the memory check; the defaults are what the operator uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Fraction of each GPU's memory a plan may use (the rest is headroom for fragmentation and
    /// the driver).
    pub usable_fraction: f64,
    /// Bytes per KV-cache element: 2 (fp16 keys and values), whatever the weight format.
    pub kv_cache_bytes: u64,
    /// Rejected options kept in the plan, most relevant first; the rest are counted in a note.
    pub max_rejected: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            usable_fraction: 0.9,
            kv_cache_bytes: 2,
            max_rejected: 32,
        }
    }
}

/// Everything about the deployment the planner needs, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRequest {
    /// Model shape.
    pub model: Model,
    /// Weight storage type.
    pub dtype: WeightDtype,
    /// Longest sequence a request may use (tokens).
    pub max_context: u64,
    /// Sequences decoded together per replica group.
    pub max_sequences: u64,
    /// Replica groups to place.
    pub replicas: u32,
    /// Fixed tensor parallelism, if the user set one.
    pub tensor_parallel: Option<u32>,
    /// Fixed pipeline parallelism, if the user set one.
    pub pipeline_parallel: Option<u32>,
    /// What to optimise.
    pub objective: Objective,
    /// Memory-check tunables.
    pub settings: Settings,
}

impl PlanRequest {
    /// Builds a request from an LlmDeployment spec, checking what the API server would have
    /// checked (the CLI reads files no server validated).
    pub fn from_spec(spec: &LlmDeploymentSpec) -> Result<Self, PlanError> {
        let model = models::resolve(&spec.model)?;
        let serving = &spec.serving;
        let max_context = u64::try_from(serving.max_context_length)
            .ok()
            .filter(|&c| c >= 1)
            .ok_or_else(|| {
                PlanError::InvalidRequest(format!(
                    "spec.serving.maxContextLength is {}; it must be at least 1 token",
                    serving.max_context_length
                ))
            })?;
        if max_context > model.max_context {
            return Err(PlanError::InvalidRequest(format!(
                "spec.serving.maxContextLength {max_context} exceeds the {} tokens {} supports",
                model.max_context, model.name
            )));
        }
        let max_sequences = u64::try_from(serving.max_concurrent_sequences)
            .ok()
            .filter(|&c| c >= 1)
            .ok_or_else(|| {
                PlanError::InvalidRequest(format!(
                    "spec.serving.maxConcurrentSequences is {}; it must be at least 1",
                    serving.max_concurrent_sequences
                ))
            })?;
        let replicas = u32::try_from(spec.replicas).map_err(|_| {
            PlanError::InvalidRequest(format!(
                "spec.replicas is {}; it must be 0 or more",
                spec.replicas
            ))
        })?;
        let par = spec.parallelism.clone().unwrap_or_default();
        let fixed = |name: &str, v: Option<i32>| -> Result<Option<u32>, PlanError> {
            v.map(|v| {
                u32::try_from(v).ok().filter(|&v| v >= 1).ok_or_else(|| {
                    PlanError::InvalidRequest(format!(
                        "spec.parallelism.{name} is {v}; it must be at least 1 (remove it to let the planner choose)"
                    ))
                })
            })
            .transpose()
        };
        Ok(Self {
            tensor_parallel: fixed("tensorParallel", par.tensor_parallel)?,
            pipeline_parallel: fixed("pipelineParallel", par.pipeline_parallel)?,
            objective: par.objective,
            model,
            dtype: spec.model.weights.dtype,
            max_context,
            max_sequences,
            replicas,
            settings: Settings::default(),
        })
    }
}

/// Why no plan was produced. Each message is one sentence with the numbers the user needs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// A node's GPU product label (or the pool's override) is not in the catalog.
    #[error(
        "unknown GPU model {label:?}; set spec.gpu.model in the GpuPool to one of the catalog's models ({known}) or its nvidia.com/gpu.product label"
    )]
    UnknownGpu {
        /// The label as found.
        label: String,
        /// Catalog short names.
        known: String,
    },
    /// `spec.model.preset` names no preset.
    #[error("unknown model preset {name:?}; presets: {known}")]
    UnknownPreset {
        /// The name as given.
        name: String,
        /// Known preset names.
        known: String,
    },
    /// The explicit model shape is inconsistent.
    #[error("{0}")]
    InvalidModel(String),
    /// Serving limits, replicas or fixed parallelism are out of range.
    #[error("{0}")]
    InvalidRequest(String),
    /// A `--gpus` specification could not be read.
    #[error("{0}")]
    InvalidGpus(String),
    /// A fixed tensor parallelism the worker cannot load ([`whaleflux_crds::split`]).
    #[error("{model}: {reason}; legal: {legal}")]
    TensorParallel {
        /// Model name.
        model: String,
        /// The rule it breaks.
        reason: whaleflux_crds::split::SplitError,
        /// Legal TP values, comma-separated.
        legal: String,
    },
    /// A fixed pipeline parallelism is not in 1..=layers.
    #[error("{model}: {reason}")]
    PipelineParallel {
        /// Model name.
        model: String,
        /// The rule it breaks.
        reason: whaleflux_crds::split::SplitError,
    },
    /// Every node is unhealthy, quarantined, or has no free GPU.
    #[error("the pool has no usable GPU: {detail}")]
    NoUsableGpus {
        /// Which nodes were left out and why.
        detail: String,
    },
    /// No legal split fits the pool; the message names the closest option and what it lacks.
    #[error("{message}")]
    NothingFits {
        /// One sentence naming the constraint and the numbers.
        message: String,
        /// Every option considered, most relevant first (capped like a plan's list).
        rejected: Vec<RejectedOption>,
    },
}

impl PlanError {
    /// True when the input was well-formed but no plan is possible (the CLI exits 2): nothing
    /// fits, or a fixed TP/PP is illegal for the model.
    pub fn is_infeasible(&self) -> bool {
        matches!(
            self,
            PlanError::TensorParallel { .. }
                | PlanError::PipelineParallel { .. }
                | PlanError::NoUsableGpus { .. }
                | PlanError::NothingFits { .. }
        )
    }
}

/// Plans `request` on `pool`. Nodes that are not Ready, or quarantined past `now`, are left
/// out. The same inputs always give the same plan.
pub fn plan(request: &PlanRequest, pool: &Pool, now: Timestamp) -> Result<Plan, PlanError> {
    choose::plan(request, pool, &[], now)
}

/// Plans `request`; when the pool cannot hold all of its replica groups, plans the most groups
/// it can hold (fewer groups first, each with the best split that fits) and also returns why the
/// full request did not fit. Failover runs this, so a deployment keeps serving what the pool
/// still has rather than nothing.
pub fn plan_within_capacity(
    request: &PlanRequest,
    pool: &Pool,
    now: Timestamp,
) -> Result<(Plan, Option<PlanError>), PlanError> {
    let full = match plan(request, pool, now) {
        Ok(p) => return Ok((p, None)),
        Err(e) => e,
    };
    // Fitting is monotone in the group count: search for the most groups that fit.
    let (mut lo, mut hi) = (1u32, request.replicas.saturating_sub(1));
    let mut best = None;
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        let mut fewer = request.clone();
        fewer.replicas = mid;
        match plan(&fewer, pool, now) {
            Ok(p) => {
                best = Some(p);
                lo = mid + 1;
            }
            Err(_) => hi = mid - 1,
        }
    }
    match best {
        Some(p) => Ok((p, Some(full))),
        None => Err(full),
    }
}

/// Renumbers `plan`'s groups so each group placed on the same nodes as a group of `previous`
/// keeps that group's number: a re-plan after a node is lost moves the groups that must move and
/// leaves the others where they run. Groups on new nodes take the numbers left, in order.
pub fn keep_placements(plan: &mut Plan, previous: &Plan) {
    let n = plan.groups.len() as i32;
    let mut taken = vec![false; plan.groups.len()];
    let mut index: Vec<Option<i32>> = vec![None; plan.groups.len()];
    for old in previous.groups.iter().filter(|g| g.index < n) {
        if let Some(i) = (0..plan.groups.len())
            .find(|&i| index[i].is_none() && plan.groups[i].nodes == old.nodes)
        {
            index[i] = Some(old.index);
            taken[old.index as usize] = true;
        }
    }
    let mut free = (0..n).filter(|i| !taken[*i as usize]);
    for (i, g) in plan.groups.iter_mut().enumerate() {
        g.index = index[i].or_else(|| free.next()).unwrap_or(g.index);
    }
    plan.groups.sort_by_key(|g| g.index);
    if let Some(first) = plan.groups.first() {
        for s in &mut plan.stages {
            if let Some(node) = first.nodes.get(s.index as usize) {
                s.node.clone_from(node);
            }
        }
    }
}

/// Plans like [`plan`], where the pool's nodes may also name `devices` that are not in the
/// catalog (matched by [`GpuSpec::matches`] before the catalog): `whaleflux run` describes this
/// machine's CPU slots ([`catalog::cpu_slot`]) this way, since their size depends on the host.
pub fn plan_with_devices(
    request: &PlanRequest,
    pool: &Pool,
    devices: &[GpuSpec],
    now: Timestamp,
) -> Result<Plan, PlanError> {
    choose::plan(request, pool, devices, now)
}
