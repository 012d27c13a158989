//! Building the ranks of a replica group: load each rank's shard, join the TP ranks of a stage
//! (threads sharing memory, or processes over TCP) and link the stages. The worker binary builds
//! its own stage this way; tests and the benchmark can build a whole group in one process.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::thread::JoinHandle;
use std::time::Duration;

use whaleflux_crds::Plan;

use super::forward::LlamaModel;
use super::pipeline::{Leader, Rank};
use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::bringup::StartError;
use crate::comm::local::{ThreadGroup, pair};
use crate::comm::{Collective, CommError, Link, RankId, Timed};
use crate::model::config::LlamaConfig;
use crate::model::gguf::Gguf;
use crate::shard::{LoadOptions, ShardSpec};

/// Load the shard of (`stage`, `tp_rank`) of `plan`.
pub fn load_rank(
    g: &Gguf,
    plan: &Plan,
    stage: usize,
    tp_rank: usize,
) -> Result<LlamaModel, StartError> {
    load_rank_with(g, plan, stage, tp_rank, LoadOptions::default())
}

/// [`load_rank`] in the weight format `opts` asks for.
pub fn load_rank_with(
    g: &Gguf,
    plan: &Plan,
    stage: usize,
    tp_rank: usize,
    opts: LoadOptions,
) -> Result<LlamaModel, StartError> {
    let cfg = LlamaConfig::from_gguf(g)?;
    let spec = ShardSpec::from_plan(plan, stage, tp_rank, &cfg)?;
    Ok(LlamaModel::load_with(g, spec, opts)?)
}

/// The TP ranks of one stage as threads of this process: rank 0 first, the others already
/// joined to it (shared-memory all-reduce, channels for the steps). The caller links rank 0 to
/// the neighbouring stages and runs the others with [`Rank::follow`]. `reduce_nanos` counts rank
/// 0's time in all-reduce (for the benchmark).
pub fn stage_threads(
    g: &Gguf,
    plan: &Plan,
    stage: usize,
    threads_per_rank: usize,
    timeout: Duration,
    reduce_nanos: Option<Arc<AtomicU64>>,
) -> Result<Vec<Rank>, StartError> {
    stage_threads_with(
        g,
        plan,
        stage,
        threads_per_rank,
        timeout,
        reduce_nanos,
        LoadOptions::default(),
    )
}

/// [`stage_threads`] with the ranks' weights in the format `opts` asks for.
pub fn stage_threads_with(
    g: &Gguf,
    plan: &Plan,
    stage: usize,
    threads_per_rank: usize,
    timeout: Duration,
    reduce_nanos: Option<Arc<AtomicU64>>,
    opts: LoadOptions,
) -> Result<Vec<Rank>, StartError> {
    let tp = usize::try_from(plan.tensor_parallel).unwrap_or(1).max(1);
    let mut ranks = Vec::with_capacity(tp);
    for r in 0..tp {
        let model = Arc::new(load_rank_with(g, plan, stage, r, opts)?);
        let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new(threads_per_rank.max(1))?);
        ranks.push(Rank::new(RankId { stage, tp_rank: r }, model, backend));
    }
    if tp > 1 {
        for (r, group) in ThreadGroup::new(stage, tp, timeout).into_iter().enumerate() {
            let c: Box<dyn Collective> = match (&reduce_nanos, r) {
                (Some(n), 0) => Box::new(Timed {
                    inner: group,
                    nanos: n.clone(),
                }),
                _ => Box::new(group),
            };
            ranks[r].tp = Some(c);
        }
        for r in 1..tp {
            let (to_r, to_0) = pair(ranks[0].id, ranks[r].id);
            ranks[0].tp_links.push(Arc::new(to_r));
            ranks[r].tp_links.push(Arc::new(to_0));
        }
    }
    Ok(ranks)
}

/// A follower rank's thread: `Ok` on a clean shutdown, else the peer failure that stopped it.
pub type Follower = JoinHandle<Result<(), CommError>>;

/// Start `rank.follow()` on its own thread.
pub fn spawn_follower(rank: Rank) -> std::io::Result<Follower> {
    std::thread::Builder::new()
        .name(format!("wf-rank-{}-{}", rank.id.stage, rank.id.tp_rank))
        .spawn(move || {
            let id = rank.id;
            let r = rank.follow();
            if let Err(e) = &r {
                tracing::error!(rank = %id, error = %e, "rank stopped");
            }
            r
        })
}

/// A whole group of `plan` in this process: every stage and TP rank a thread, linked by
/// channels. Returns the leader, ready to drive the scheduler, and the follower threads (they
/// end when the leader shuts down). Each rank computes on `threads_per_rank` CPU threads.
pub fn local_group(
    g: &Gguf,
    plan: &Plan,
    threads_per_rank: usize,
    reduce_nanos: Option<Arc<AtomicU64>>,
) -> Result<(Leader, Vec<Follower>), StartError> {
    local_group_with(
        g,
        plan,
        threads_per_rank,
        reduce_nanos,
        LoadOptions::default(),
    )
}

/// [`local_group`] with every rank's weights in the format `opts` asks for (f32 for the
/// equivalence tests' reference path).
pub fn local_group_with(
    g: &Gguf,
    plan: &Plan,
    threads_per_rank: usize,
    reduce_nanos: Option<Arc<AtomicU64>>,
    opts: LoadOptions,
) -> Result<(Leader, Vec<Follower>), StartError> {
    let timeout = Duration::from_secs(60);
    let pp = plan.stages.len().max(1);
    let mut stages: Vec<Vec<Rank>> = Vec::with_capacity(pp);
    for s in 0..pp {
        let nanos = if s == 0 { reduce_nanos.clone() } else { None };
        stages.push(stage_threads_with(
            g,
            plan,
            s,
            threads_per_rank,
            timeout,
            nanos,
            opts,
        )?);
    }
    if pp > 1 {
        for s in 0..pp {
            let n = (s + 1) % pp;
            let (a, b) = pair(stages[s][0].id, stages[n][0].id);
            stages[s][0].next = Some(Arc::new(a) as Arc<dyn Link>);
            stages[n][0].prev = Some(Arc::new(b) as Arc<dyn Link>);
        }
    }
    let mut handles = Vec::new();
    let mut leader = None;
    for (s, ranks) in stages.into_iter().enumerate() {
        for rank in ranks {
            if s == 0 && rank.id.tp_rank == 0 {
                leader = Some(rank);
            } else {
                handles.push(spawn_follower(rank)?);
            }
        }
    }
    let Some(rank) = leader else {
        unreachable!("stage 0 always has TP rank 0")
    };
    let leader = Leader::new(rank, pp);
    leader.await_ready()?;
    Ok((leader, handles))
}
