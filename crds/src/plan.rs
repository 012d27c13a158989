//! The plan: how one model is split over GPUs. The planner produces it, the LlmDeployment status
//! shows it, the resource builders turn it into pods, and each worker reads its own part of it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::deployment::{Objective, WeightDtype};

/// A chosen split of a model over GPUs: tensor parallel inside a stage, pipeline stages across
/// GPUs or nodes, and data-parallel replica groups.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// Model name: the preset, or `custom` for an explicit shape.
    pub model: String,
    /// Weight storage type the memory figures assume.
    pub dtype: WeightDtype,
    /// GPU model the plan was sized for (catalog short name, e.g. H100).
    pub gpu_model: String,
    /// Objective the plan was chosen for.
    pub objective: Objective,
    /// GPUs that split each layer of a stage.
    pub tensor_parallel: i32,
    /// Stages the layers are split into; pod ordinal = stage.
    pub pipeline_parallel: i32,
    /// Data-parallel replica groups.
    pub replicas: i32,
    /// tensorParallel x pipelineParallel.
    pub gpus_per_replica: i32,
    /// True when a tensor-parallel group spans nodes because nothing else fits (slow).
    pub crosses_nodes: bool,
    /// The layer split and, for replica group 0, where each stage runs.
    pub stages: Vec<StagePlan>,
    /// Where every replica group's stages run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupPlacement>,
    /// Memory of the most loaded GPU, by part.
    pub memory_per_gpu_bytes: MemoryBreakdown,
    /// Cost-model estimate of decode speed (estimated, not measured).
    pub estimate: PlanEstimate,
    /// Remarks a reader should know: uneven layer split, KV heads replicated, TP across nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Options the planner considered and did not choose, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<RejectedOption>,
}

/// One pipeline stage: its layers and, for the first replica group, its node.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StagePlan {
    /// Stage number, equal to the pod ordinal in the group's StatefulSet.
    pub index: i32,
    /// Half-open range `[start, end)` of transformer layers this stage runs.
    pub layers: [i32; 2],
    /// Node of this stage in replica group 0.
    pub node: String,
    /// GPUs this stage uses (tensorParallel).
    pub gpus: i32,
    /// True when this stage holds the token embedding (the first stage).
    #[serde(default)]
    pub embedding: bool,
    /// True when this stage holds the output head (the last stage).
    #[serde(default)]
    pub head: bool,
}

impl StagePlan {
    /// Number of layers on this stage.
    pub fn layer_count(&self) -> i32 {
        self.layers[1] - self.layers[0]
    }
}

/// The nodes one replica group runs on, one per stage.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupPlacement {
    /// Replica group number.
    pub index: i32,
    /// Node of each stage, by stage index.
    pub nodes: Vec<String>,
}

/// Per-GPU memory, by part, in bytes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MemoryBreakdown {
    /// This GPU's share of the weights, with the embedding/head where the stage holds them.
    pub weights: i64,
    /// KV cache reserved for maxContextLength x maxConcurrentSequences.
    pub kv_cache: i64,
    /// Activations and scratch buffers of one forward step.
    pub activations: i64,
    /// Runtime overhead: CUDA context, allocator slack, communication buffers.
    pub overhead: i64,
    /// Sum of the parts.
    pub total: i64,
    /// Memory the plan may use on this GPU (a fraction of its capacity).
    pub usable: i64,
}

/// Cost-model estimate of decode speed. It is a model, not a measurement.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PlanEstimate {
    /// Estimated time for one decode step of the whole batch, in milliseconds.
    pub time_per_token_ms: f64,
    /// Estimated generated tokens per second of one replica group at the planned concurrency.
    pub decode_tokens_per_second: f64,
    /// The same per GPU of the group: what `MaxTokensPerGpu` ranks by.
    #[serde(default)]
    pub decode_tokens_per_second_per_gpu: f64,
    /// Sequences decoded together in the estimate (maxConcurrentSequences).
    pub concurrency: i32,
}

/// A (TP, PP) the planner did not choose, and why.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RejectedOption {
    /// Tensor parallelism of the option.
    pub tensor_parallel: i32,
    /// Pipeline parallelism of the option.
    pub pipeline_parallel: i32,
    /// Why it was not chosen.
    pub reason: String,
}
