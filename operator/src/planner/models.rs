//! Model shapes: the presets (from each model's published `config.json`) and explicit shapes from
//! an LlmDeployment, checked once so the rest of the planner can trust them.

use whaleflux_crds::{ModelShape, ModelSpec};

use super::PlanError;

/// A checked decoder-only transformer shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    /// Preset name, or `custom` for an explicit shape.
    pub name: String,
    /// Transformer layers.
    pub layers: u32,
    /// Residual width.
    pub hidden: u64,
    /// Query heads.
    pub heads: u32,
    /// Key/value heads.
    pub kv_heads: u32,
    /// Feed-forward width.
    pub ffn: u64,
    /// Vocabulary size.
    pub vocab: u64,
    /// Longest context the model supports.
    pub max_context: u64,
    /// Output head shares the embedding matrix.
    pub tied: bool,
}

/// Preset names with (layers, hidden, heads, KV heads, FFN, vocab, context, tied).
type PresetRow = (&'static str, u32, u64, u32, u32, u64, u64, u64, bool);

/// Values from each model's config.json on Hugging Face:
/// HuggingFaceTB/SmolLM2-135M-Instruct, meta-llama/Llama-3.1-{8B,70B,405B}-Instruct,
/// Qwen/Qwen2.5-72B-Instruct, mistralai/Mistral-7B-Instruct-v0.3.
const PRESETS: &[PresetRow] = &[
    ("smollm2-135m", 30, 576, 9, 3, 1536, 49152, 8192, true),
    (
        "llama-3.1-8b",
        32,
        4096,
        32,
        8,
        14336,
        128256,
        131072,
        false,
    ),
    (
        "llama-3.1-70b",
        80,
        8192,
        64,
        8,
        28672,
        128256,
        131072,
        false,
    ),
    (
        "llama-3.1-405b",
        126,
        16384,
        128,
        8,
        53248,
        128256,
        131072,
        false,
    ),
    ("qwen2.5-72b", 80, 8192, 64, 8, 29568, 152064, 32768, false),
    ("mistral-7b", 32, 4096, 32, 8, 14336, 32768, 32768, false),
];

/// The preset names, for help and error messages.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.0).collect()
}

/// Looks up a preset by name (ignoring ASCII case).
pub fn preset(name: &str) -> Result<Model, PlanError> {
    PRESETS
        .iter()
        .find(|p| p.0.eq_ignore_ascii_case(name.trim()))
        .map(
            |&(name, layers, hidden, heads, kv, ffn, vocab, ctx, tied)| Model {
                name: name.to_string(),
                layers,
                hidden,
                heads,
                kv_heads: kv,
                ffn,
                vocab,
                max_context: ctx,
                tied,
            },
        )
        .ok_or_else(|| PlanError::UnknownPreset {
            name: name.to_string(),
            known: preset_names().join(", "),
        })
}

/// Resolves `spec.model` to a checked shape: the preset, or the explicit shape named `custom`.
pub fn resolve(spec: &ModelSpec) -> Result<Model, PlanError> {
    match (&spec.preset, &spec.shape) {
        (Some(name), None) => preset(name),
        (None, Some(shape)) => from_shape("custom", shape),
        _ => Err(PlanError::InvalidModel(
            "spec.model must set exactly one of preset or shape".to_string(),
        )),
    }
}

fn positive(field: &str, v: i32) -> Result<u64, PlanError> {
    u64::try_from(v).ok().filter(|&v| v >= 1).ok_or_else(|| {
        PlanError::InvalidModel(format!(
            "spec.model.shape.{field} is {v}; it must be at least 1"
        ))
    })
}

/// Checks an explicit shape the way the CRD's validation rules do, since `whaleflux plan`
/// reads files no API server has validated.
pub fn from_shape(name: &str, s: &ModelShape) -> Result<Model, PlanError> {
    let layers = positive("layers", s.layers)?;
    let hidden = positive("hiddenSize", s.hidden_size)?;
    let heads = positive("attentionHeads", s.attention_heads)?;
    let kv = positive("kvHeads", s.kv_heads)?;
    let ffn = positive("intermediateSize", s.intermediate_size)?;
    let vocab = positive("vocabSize", s.vocab_size)?;
    let ctx = positive("maxContext", s.max_context)?;
    if kv > heads || heads % kv != 0 {
        return Err(PlanError::InvalidModel(format!(
            "spec.model.shape.attentionHeads {heads} must be a multiple of kvHeads {kv}"
        )));
    }
    if hidden % heads != 0 {
        return Err(PlanError::InvalidModel(format!(
            "spec.model.shape.hiddenSize {hidden} is not a multiple of attentionHeads {heads}"
        )));
    }
    Ok(Model {
        name: name.to_string(),
        layers: layers as u32,
        hidden,
        heads: heads as u32,
        kv_heads: kv as u32,
        ffn,
        vocab,
        max_context: ctx,
        tied: s.tied_embeddings,
    })
}

impl Model {
    /// Width of one attention head.
    pub fn head_dim(&self) -> u64 {
        self.hidden / u64::from(self.heads)
    }

    /// Parameters of one transformer layer, unsharded: Q, K, V, O projections, the gated MLP
    /// (gate, up, down) and two norms.
    pub fn layer_params(&self) -> u64 {
        let hd = self.head_dim();
        let q_o = 2 * self.hidden * u64::from(self.heads) * hd;
        let kv = 2 * self.hidden * u64::from(self.kv_heads) * hd;
        q_o + kv + 3 * self.hidden * self.ffn + 2 * self.hidden
    }

    /// Parameters of the token embedding (the output head has the same count).
    pub fn embedding_params(&self) -> u64 {
        self.vocab * self.hidden
    }

    /// Total parameters, counting a tied head once.
    pub fn total_params(&self) -> u64 {
        let heads = if self.tied { 1 } else { 2 };
        u64::from(self.layers) * self.layer_params() + heads * self.embedding_params() + self.hidden
    }
}

/// A model small enough to work memory and cost out by hand in tests: 2 layers, hidden 64, 4
/// heads of 16, 2 KV heads, FFN 96, vocabulary 100, context 1000.
#[cfg(test)]
pub(crate) fn tiny(tied: bool) -> Model {
    Model {
        name: "tiny".into(),
        layers: 2,
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        ffn: 96,
        vocab: 100,
        max_context: 1000,
        tied,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_sizes_match_their_names() {
        for (name, billions) in [
            ("smollm2-135m", 0.135),
            ("llama-3.1-8b", 8.0),
            ("llama-3.1-70b", 70.6),
            ("llama-3.1-405b", 405.9),
            ("qwen2.5-72b", 72.7),
            ("mistral-7b", 7.25),
        ] {
            let m = preset(name).expect("preset");
            let got = m.total_params() as f64 / 1e9;
            assert!(
                (got - billions).abs() / billions < 0.03,
                "{name}: {got:.3}B params, expected about {billions}B"
            );
        }
    }

    #[test]
    fn unknown_preset_lists_the_presets() {
        let err = preset("gpt-5").unwrap_err().to_string();
        assert!(
            err.contains("gpt-5") && err.contains("llama-3.1-70b"),
            "{err}"
        );
    }

    #[test]
    fn explicit_shape_is_checked() {
        let mut s = ModelShape {
            layers: 4,
            hidden_size: 64,
            attention_heads: 8,
            kv_heads: 3,
            intermediate_size: 128,
            vocab_size: 100,
            max_context: 512,
            tied_embeddings: false,
        };
        assert!(from_shape("custom", &s).is_err());
        s.kv_heads = 2;
        assert_eq!(from_shape("custom", &s).map(|m| m.head_dim()), Ok(8));
        s.layers = 0;
        let err = from_shape("custom", &s).unwrap_err().to_string();
        assert!(err.contains("layers is 0"), "{err}");
        // As many KV heads as heads (multi-head attention, Llama 2 7B) is a shape; more is not.
        s.layers = 4;
        s.kv_heads = 8;
        assert_eq!(from_shape("custom", &s).map(|m| m.kv_heads), Ok(8));
        s.kv_heads = 16;
        let err = from_shape("custom", &s).unwrap_err().to_string();
        assert_eq!(
            err,
            "spec.model.shape.attentionHeads 8 must be a multiple of kvHeads 16"
        );
    }

    #[test]
    fn parameters_by_hand() {
        // hidden 64, 8 heads of 8, 2 KV heads, FFN 128: Q and O 2·64·64 = 8,192; K and V
        // 2·64·16 = 2,048; the gated MLP 3·64·128 = 24,576; two norms 128.
        let m = Model {
            name: "hand".into(),
            layers: 3,
            hidden: 64,
            heads: 8,
            kv_heads: 2,
            ffn: 128,
            vocab: 100,
            max_context: 512,
            tied: false,
        };
        assert_eq!(m.layer_params(), 8_192 + 2_048 + 24_576 + 128);
        assert_eq!(m.embedding_params(), 6_400);
        assert_eq!(m.total_params(), 3 * 34_944 + 2 * 6_400 + 64);
        let tied = Model { tied: true, ..m };
        assert_eq!(tied.total_params(), 3 * 34_944 + 6_400 + 64);
    }

    #[test]
    fn a_model_is_a_preset_or_a_shape_never_both() {
        let shape = ModelShape {
            layers: 4,
            hidden_size: 64,
            attention_heads: 8,
            kv_heads: 2,
            intermediate_size: 128,
            vocab_size: 100,
            max_context: 512,
            tied_embeddings: true,
        };
        let spec = |preset: Option<&str>, shape: Option<ModelShape>| ModelSpec {
            preset: preset.map(str::to_string),
            shape,
            weights: serde_json::from_value(serde_json::json!({"source": {"path": "/m.gguf"}}))
                .expect("weights"),
        };
        let custom = resolve(&spec(None, Some(shape.clone()))).expect("shape");
        assert_eq!(
            (custom.name.as_str(), custom.layers, custom.tied),
            ("custom", 4, true)
        );
        assert_eq!(
            resolve(&spec(Some("mistral-7b"), None)).map(|m| m.name),
            Ok("mistral-7b".into())
        );
        for wrong in [spec(None, None), spec(Some("mistral-7b"), Some(shape))] {
            assert_eq!(
                resolve(&wrong).unwrap_err().to_string(),
                "spec.model must set exactly one of preset or shape"
            );
        }
    }
}
