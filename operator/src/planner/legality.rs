//! Which splits are legal at all (the rules vLLM enforces at start-up), and how layers are
//! divided among pipeline stages.

use whaleflux_crds::split::{self, Shape};

use super::{Model, PlanError};

pub use whaleflux_crds::split::split_layers;

impl Model {
    /// The parts of the shape the split rules read.
    pub fn split_shape(&self) -> Shape {
        Shape {
            layers: self.layers,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.hidden / u64::from(self.heads.max(1)),
            ffn: self.ffn,
        }
    }
}

/// True when the worker can load every rank of tensor parallelism `tp` ([`split::check_tp`]).
pub fn tp_is_legal(model: &Model, tp: u32) -> bool {
    split::check_tp(&model.split_shape(), tp).is_ok()
}

/// Every legal tensor parallelism for the model, ascending.
pub fn legal_tps(model: &Model) -> Vec<u32> {
    split::legal_tps(&model.split_shape())
}

/// Checks a fixed tensor parallelism and says which values would be legal.
pub fn check_tp(model: &Model, tp: u32) -> Result<(), PlanError> {
    split::check_tp(&model.split_shape(), tp).map_err(|reason| PlanError::TensorParallel {
        model: model.name.clone(),
        reason,
        legal: legal_tps(model)
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Checks a fixed pipeline parallelism: 1 ≤ PP ≤ layers.
pub fn check_pp(model: &Model, pp: u32) -> Result<(), PlanError> {
    split::check_pp(&model.split_shape(), pp).map_err(|reason| PlanError::PipelineParallel {
        model: model.name.clone(),
        reason,
    })
}

/// KV heads each tensor-parallel rank holds ([`split::kv_heads_per_rank`]).
pub fn kv_heads_per_rank(model: &Model, tp: u32) -> u32 {
    split::kv_heads_per_rank(model.kv_heads, tp)
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
    use whaleflux_crds::split::SplitError;

    #[test]
    fn smollm2_legal_tp_are_1_and_3() {
        let m = preset("smollm2-135m").expect("preset");
        assert_eq!(legal_tps(&m), vec![1, 3]);
        let err = check_tp(&m, 2).unwrap_err().to_string();
        assert_eq!(
            err,
            "smollm2-135m: tensor parallel 2 does not divide the 9 attention heads; legal: 1, 3"
        );
        let err = check_tp(&m, 9).unwrap_err().to_string();
        assert_eq!(
            err,
            "smollm2-135m: tensor parallel 9 leaves 170 FFN columns per rank (1536 / 9), not a multiple of the 32-wide quantization blocks; legal: 1, 3"
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
        m.hidden = 24 * 128;
        m.ffn = 24 * 32 * 16;
        let reason = |tp| match check_tp(&m, tp) {
            Err(PlanError::TensorParallel { reason, .. }) => Some(reason),
            _ => None,
        };
        assert_eq!(
            reason(12),
            Some(SplitError::KvHeads {
                tp: 12,
                kv_heads: 8
            })
        );
        assert!(check_tp(&m, 4).is_ok());
        assert!(check_tp(&m, 24).is_ok());
        assert_eq!(reason(3), Some(SplitError::KvHeads { tp: 3, kv_heads: 8 }));
        assert_eq!(reason(5), Some(SplitError::Heads { tp: 5, heads: 24 }));
        assert!(tp_is_legal(&m, 4) && !tp_is_legal(&m, 5) && !tp_is_legal(&m, 0));
    }

    #[test]
    fn heads_narrower_than_a_block_limit_tp() {
        // Four heads of 48: two ranks hold 96 attention columns (three blocks), four hold 48.
        let mut m = preset("llama-3.1-8b").expect("preset");
        (m.hidden, m.heads, m.kv_heads, m.ffn) = (192, 4, 4, 256);
        assert_eq!(m.split_shape().head_dim, 48);
        assert_eq!(legal_tps(&m), [1, 2]);
    }

    #[test]
    fn uneven_splits_are_explained() {
        let note = split_note(80, 3).expect("uneven");
        assert!(
            note.contains("stages 1-2 hold 27 layers, the others 26"),
            "{note}"
        );
        assert_eq!(split_note(80, 4), None);
        assert_eq!(
            check_pp(&preset("smollm2-135m").expect("preset"), 31)
                .unwrap_err()
                .to_string(),
            "smollm2-135m: pipeline parallel 31 is not between 1 and the 30 layers"
        );
    }
}
