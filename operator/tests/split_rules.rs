//! One rule book: every split the planner calls legal loads in the worker, shape by shape and
//! rank by rank, and every split it rejects the worker rejects for the same reason.

use whaleflux_crds::split::SplitError;
use whaleflux_operator::planner::PlanError;
use whaleflux_operator::planner::legality::{check_pp, check_tp};
use whaleflux_operator::planner::models::{Model, preset, preset_names};
use whaleflux_worker::model::config::LlamaConfig;
use whaleflux_worker::model::gguf::GgmlType;
use whaleflux_worker::shard::{ShardError, check_shapes, fixed_plan};

fn worker_config(m: &Model) -> LlamaConfig {
    LlamaConfig {
        n_layers: m.layers as usize,
        hidden: m.hidden as usize,
        n_heads: m.heads as usize,
        n_kv_heads: m.kv_heads as usize,
        ffn: m.ffn as usize,
        vocab: m.vocab as usize,
        context: m.max_context as usize,
        rope_base: 500_000.0,
        rope_scale: 1.0,
        rope_neox: false,
        rms_eps: 1e-5,
        sliding_window: None,
    }
}

/// What the worker says about every rank of a TP x PP plan: `Ok` when all load.
fn worker_verdict(m: &Model, tp: u32, pp: u32, ty: GgmlType) -> Result<(), ShardError> {
    let cfg = worker_config(m);
    let plan = fixed_plan(&m.name, m.layers as usize, tp as usize, pp as usize);
    for stage in 0..plan.stages.len() {
        for rank in 0..tp.max(1) as usize {
            check_shapes(&plan, stage, rank, &cfg, ty)?;
        }
    }
    Ok(())
}

#[test]
fn every_split_the_planner_allows_loads_and_every_one_it_rejects_fails_alike() {
    let mut checked = (0, 0);
    for name in preset_names() {
        let m = preset(name).expect("preset");
        // Every TP up to twice the heads, at one stage, two stages and one layer per stage.
        for tp in 1..=2 * m.heads {
            for pp in [1, 2, m.layers] {
                let planner = check_tp(&m, tp).and_then(|()| check_pp(&m, pp));
                for ty in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::F16] {
                    let worker = worker_verdict(&m, tp, pp, ty);
                    match (&planner, &worker) {
                        (Ok(()), Ok(())) => checked.0 += 1,
                        (
                            Err(PlanError::TensorParallel { reason, .. }),
                            Err(ShardError::Split(w)),
                        ) => {
                            assert_eq!(reason, w, "{name} TP {tp} x PP {pp}");
                            checked.1 += 1;
                        }
                        _ => panic!(
                            "{name} TP {tp} x PP {pp} ({ty:?}): the planner says {planner:?}, the worker {worker:?}"
                        ),
                    }
                }
            }
        }
    }
    // Both sides of the rule are exercised, for every preset.
    assert!(checked.0 > 50 && checked.1 > 500, "{checked:?}");
}

#[test]
fn the_rule_that_rejected_tp_9_for_smollm2_is_the_ffn_block_rule() {
    let m = preset("smollm2-135m").expect("preset");
    let want = SplitError::FfnBlocks {
        tp: 9,
        ffn: 1536,
        per_rank: 170,
    };
    assert!(
        matches!(check_tp(&m, 9), Err(PlanError::TensorParallel { reason, .. }) if reason == want)
    );
    assert_eq!(
        worker_verdict(&m, 9, 1, GgmlType::Q4_0).unwrap_err(),
        ShardError::Split(want)
    );
    // Too many stages: the planner's PP rule, and the worker refuses the same plan.
    let too_deep = m.layers + 1;
    assert!(matches!(
        check_pp(&m, too_deep),
        Err(PlanError::PipelineParallel { reason: SplitError::Pipeline { pp, layers: 30 }, .. }) if pp == too_deep
    ));
    let mut plan = fixed_plan(&m.name, 30, 1, 30);
    let mut extra = plan.stages[29].clone();
    extra.index = 30;
    extra.layers = [30, 30];
    plan.stages.push(extra);
    let cfg = worker_config(&m);
    assert_eq!(
        check_shapes(&plan, 0, 0, &cfg, GgmlType::Q4_0).unwrap_err(),
        ShardError::Split(SplitError::Pipeline {
            pp: too_deep,
            layers: 30
        })
    );
}
