//! Which splits are legal at all (the rules vLLM enforces at start-up), and how layers are
//! divided among pipeline stages.

use super::{Model, PlanError};

/// True when `tp` divides the attention heads and divides, or is divided by, the KV heads.
pub fn tp_is_legal(model: &Model, tp: u32) -> bool {
    tp >= 1
        && model.heads.is_multiple_of(tp)
        && (model.kv_heads.is_multiple_of(tp) || tp.is_multiple_of(model.kv_heads))
}

/// Every legal tensor parallelism for the model, ascending.
pub fn legal_tps(model: &Model) -> Vec<u32> {
    (1..=model.heads)
        .filter(|&tp| tp_is_legal(model, tp))
        .collect()
}

/// Checks a fixed tensor parallelism and says which values would be legal.
pub fn check_tp(model: &Model, tp: u32) -> Result<(), PlanError> {
    let legal = || {
        legal_tps(model)
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if tp == 0 || !model.heads.is_multiple_of(tp) {
        return Err(PlanError::TensorParallelHeads {
            tp,
            heads: model.heads,
            model: model.name.clone(),
            legal: legal(),
        });
    }
    if !tp_is_legal(model, tp) {
        return Err(PlanError::TensorParallelKvHeads {
            tp,
            kv_heads: model.kv_heads,
            model: model.name.clone(),
            legal: legal(),
        });
    }
    Ok(())
}

/// Checks a fixed pipeline parallelism: 1 ≤ PP ≤ layers.
pub fn check_pp(model: &Model, pp: u32) -> Result<(), PlanError> {
    if pp == 0 || pp > model.layers {
        return Err(PlanError::PipelineParallel {
            pp,
            layers: model.layers,
            model: model.name.clone(),
        });
    }
    Ok(())
}

/// KV heads each tensor-parallel rank holds: KV/TP, or 1 when TP exceeds the KV heads (each KV
/// head is then replicated on TP/KV ranks).
pub fn kv_heads_per_rank(model: &Model, tp: u32) -> u32 {
    (model.kv_heads / tp).max(1)
}

/// Splits `layers` over `pp` stages as evenly as possible, as half-open `[start, end)` ranges.
/// The `layers % pp` extra layers go to stages 1, 2, ... — not stage 0, which also holds the
/// embedding.
pub fn split_layers(layers: u32, pp: u32) -> Vec<[u32; 2]> {
    let base = layers / pp;
    let extra = layers % pp;
    let mut start = 0;
    (0..pp)
        .map(|s| {
            let n = base + u32::from(s >= 1 && s <= extra);
            let range = [start, start + n];
            start += n;
            range
        })
        .collect()
}

/// A sentence describing an uneven split, or `None` when every stage has the same layers.
pub fn split_note(layers: u32, pp: u32) -> Option<String> {
    let extra = layers % pp;
    if extra == 0 {
        return None;
    }
    let base = layers / pp;
    let which = if extra == 1 {
        "stage 1 holds".to_string()
    } else {
        format!("stages 1-{extra} hold")
    };
    Some(format!(
        "{layers} layers do not split evenly over {pp} stages: {which} {} layers, the others {base} (extra layers go to the stages after the first, which also holds the embedding)",
        base + 1
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::models::preset;

    #[test]
    fn smollm2_legal_tp_are_1_3_9() {
        let m = preset("smollm2-135m").expect("preset");
        assert_eq!(legal_tps(&m), vec![1, 3, 9]);
        let err = check_tp(&m, 2).unwrap_err().to_string();
        assert_eq!(
            err,
            "tensor parallel 2 does not divide the 9 attention heads of smollm2-135m; legal: 1, 3, 9"
        );
        assert_eq!(kv_heads_per_rank(&m, 9), 1);
        assert_eq!(kv_heads_per_rank(&m, 3), 1);
    }

    #[test]
    fn llama_70b_tp_replicates_kv_above_8() {
        let m = preset("llama-3.1-70b").expect("preset");
        assert_eq!(legal_tps(&m), vec![1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(kv_heads_per_rank(&m, 16), 1);
        assert_eq!(kv_heads_per_rank(&m, 4), 2);
    }

    #[test]
    fn kv_rule_rejects_tp_that_neither_divides() {
        let mut m = preset("llama-3.1-8b").expect("preset");
        m.heads = 24;
        m.kv_heads = 8;
        assert!(matches!(
            check_tp(&m, 12),
            Err(PlanError::TensorParallelKvHeads { tp: 12, .. })
        ));
        assert!(check_tp(&m, 4).is_ok());
        assert!(check_tp(&m, 24).is_ok());
        assert!(matches!(
            check_tp(&m, 3),
            Err(PlanError::TensorParallelKvHeads { tp: 3, .. })
        ));
        assert!(matches!(
            check_tp(&m, 5),
            Err(PlanError::TensorParallelHeads { tp: 5, .. })
        ));
    }

    #[test]
    fn layers_split_evenly_with_extras_after_stage_0() {
        assert_eq!(split_layers(30, 1), vec![[0, 30]]);
        assert_eq!(split_layers(80, 3), vec![[0, 26], [26, 53], [53, 80]]);
        assert_eq!(split_layers(10, 4), vec![[0, 2], [2, 5], [5, 8], [8, 10]]);
        let note = split_note(80, 3).expect("uneven");
        assert!(
            note.contains("stages 1-2 hold 27 layers, the others 26"),
            "{note}"
        );
        assert_eq!(split_note(80, 4), None);
        assert!(check_pp(&preset("smollm2-135m").expect("preset"), 31).is_err());
    }
}
