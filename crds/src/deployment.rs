//! `LlmDeployment`: one model served by one or more replica groups of worker pods.

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::plan::Plan;

/// Desired state of an LlmDeployment: which model, on which GPU pool, how many replica groups,
/// and the serving limits the planner sizes memory for.
// kube's printcolumn(...) arguments repeat `type_ = ...`, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "whaleflux.io",
    version = "v1alpha1",
    kind = "LlmDeployment",
    plural = "llmdeployments",
    singular = "llmdeployment",
    shortname = "llmd",
    namespaced,
    status = "LlmDeploymentStatus",
    derive = "PartialEq",
    doc = "LlmDeployment runs one large language model on a GpuPool, split by tensor, pipeline and data parallelism as the operator plans it, and serves an OpenAI-compatible API.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".spec.model.preset",
        description = "Model preset (empty for an explicit shape)"
    ),
    printcolumn(
        name = "TP",
        type_ = "integer",
        json_path = ".status.plan.tensorParallel",
        description = "Tensor-parallel GPUs per stage"
    ),
    printcolumn(
        name = "PP",
        type_ = "integer",
        json_path = ".status.plan.pipelineParallel",
        description = "Pipeline stages per replica group"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Requested replica groups"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Replica groups whose every pod is ready"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct LlmDeploymentSpec {
    /// The model to serve: a preset name or an explicit shape, plus where its weights are.
    pub model: ModelSpec,

    /// Name of the cluster-scoped GpuPool whose nodes run this model. `whaleflux run` ignores it
    /// and plans against the local machine.
    #[x_kube(validation = Rule::new("self.size() > 0").message("spec.gpuPool must name a GpuPool (kubectl get gpool lists them)"))]
    pub gpu_pool: String,

    /// Number of data-parallel replica groups; each group holds one full copy of the model.
    /// 0 keeps the deployment but stops every worker.
    #[serde(default = "default_replicas")]
    #[x_kube(validation = Rule::new("self >= 0").message("spec.replicas must be 0 or more; use 0 to stop all replica groups"))]
    pub replicas: i32,

    /// Fixed tensor/pipeline parallelism and the planning objective. Leave out to let the
    /// operator choose the split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<ParallelismSpec>,

    /// Serving limits; the planner reserves KV-cache memory for them.
    #[serde(default)]
    pub serving: ServingSpec,

    /// How the operator reacts to failed GPUs, pods and nodes.
    #[serde(default)]
    pub failover: FailoverSpec,

    /// Worker container image; defaults to the operator's own worker image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// CPU and memory requests/limits for each worker container. GPU requests are set by the
    /// plan (`nvidia.com/gpu` = tensorParallel) and must not be given here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Tolerations added to every worker pod, e.g. for tainted GPU nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

fn default_replicas() -> i32 {
    1
}

/// Which model to serve. Exactly one of `preset` and `shape` is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.preset) != has(self.shape)").message("spec.model: set exactly one of preset (e.g. smollm2-135m, llama-3.1-70b) or shape (layers, hiddenSize, attentionHeads, ...)"))]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// A known model: smollm2-135m, llama-3.1-8b, llama-3.1-70b, llama-3.1-405b, qwen2.5-72b,
    /// mistral-7b. `whaleflux plan --help` lists the presets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,

    /// An explicit transformer shape, for models without a preset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<ModelShape>,

    /// Weight format and location.
    pub weights: WeightsSpec,
}

/// The shape of a decoder-only transformer, as in its config.json.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.kvHeads <= self.attentionHeads").message("spec.model.shape.kvHeads must not exceed attentionHeads; set kvHeads to num_key_value_heads from the model's config"))]
#[x_kube(validation = Rule::new("self.kvHeads == 0 || self.attentionHeads % self.kvHeads == 0").message("spec.model.shape.attentionHeads must be a multiple of kvHeads (grouped-query attention); check num_attention_heads and num_key_value_heads"))]
#[serde(rename_all = "camelCase")]
pub struct ModelShape {
    /// Number of transformer layers (num_hidden_layers).
    #[x_kube(validation = Rule::new("self >= 1").message("spec.model.shape.layers must be at least 1"))]
    pub layers: i32,
    /// Width of the residual stream (hidden_size).
    #[x_kube(validation = Rule::new("self >= 1").message("spec.model.shape.hiddenSize must be at least 1"))]
    pub hidden_size: i32,
    /// Query heads per layer (num_attention_heads).
    #[x_kube(validation = Rule::new("self >= 1").message("spec.model.shape.attentionHeads must be at least 1"))]
    pub attention_heads: i32,
    /// Key/value heads per layer (num_key_value_heads); equal to attentionHeads without GQA.
    #[x_kube(validation = Rule::new("self >= 1").message("spec.model.shape.kvHeads must be at least 1"))]
    pub kv_heads: i32,
    /// Width of the feed-forward block (intermediate_size).
    #[x_kube(validation = Rule::new("self >= 1").message("spec.model.shape.intermediateSize must be at least 1"))]
    pub intermediate_size: i32,
    /// Vocabulary size (vocab_size).
    #[x_kube(validation = Rule::new("self >= 1").message("spec.model.shape.vocabSize must be at least 1"))]
    pub vocab_size: i32,
    /// Longest context the model was trained for (max_position_embeddings).
    #[x_kube(validation = Rule::new("self >= 1").message("spec.model.shape.maxContext must be at least 1"))]
    pub max_context: i32,
    /// Whether the output head shares the embedding matrix (tie_word_embeddings).
    #[serde(default)]
    pub tied_embeddings: bool,
}

/// Weight format and where the worker reads it from.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WeightsSpec {
    /// Storage type of the weights; sets bytes per parameter for memory planning.
    #[serde(default)]
    pub dtype: WeightDtype,
    /// Where the weight file lives.
    pub source: WeightSource,
}

/// Storage type of the model weights.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum WeightDtype {
    /// 32-bit float (4 bytes per parameter).
    #[serde(rename = "f32")]
    F32,
    /// 16-bit brain float (2 bytes per parameter).
    #[serde(rename = "bf16")]
    #[default]
    Bf16,
    /// 16-bit IEEE float (2 bytes per parameter).
    #[serde(rename = "f16")]
    F16,
    /// 8-bit float, per-tensor scaled (1 byte per parameter).
    #[serde(rename = "fp8")]
    Fp8,
    /// GGUF Q8_0: 32 weights in 34 bytes.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// GGUF Q4_0: 32 weights in 18 bytes.
    #[serde(rename = "q4_0")]
    Q4_0,
    /// GGUF Q4_1: 32 weights in 20 bytes.
    #[serde(rename = "q4_1")]
    Q4_1,
    /// GGUF Q5_0: 32 weights in 22 bytes.
    #[serde(rename = "q5_0")]
    Q5_0,
    /// GGUF Q5_1: 32 weights in 24 bytes.
    #[serde(rename = "q5_1")]
    Q5_1,
    /// A llama.cpp Q4_K_M file: mostly Q4_K (256 weights in 144 bytes) with Q6_K for some
    /// tensors, about 4.9 bits per weight.
    #[serde(rename = "q4_k_m")]
    Q4KM,
    /// A llama.cpp Q5_K_M file: mostly Q5_K with Q6_K for some tensors, about 5.7 bits per
    /// weight.
    #[serde(rename = "q5_k_m")]
    Q5KM,
    /// A llama.cpp Q6_K file: 256 weights in 210 bytes.
    #[serde(rename = "q6_k")]
    Q6K,
}

impl WeightDtype {
    /// Bytes per parameter, averaged over a quantization block.
    pub fn bytes_per_param(self) -> f64 {
        match self {
            WeightDtype::F32 => 4.0,
            WeightDtype::Bf16 | WeightDtype::F16 => 2.0,
            WeightDtype::Fp8 => 1.0,
            WeightDtype::Q8_0 => 34.0 / 32.0,
            WeightDtype::Q4_0 => 18.0 / 32.0,
            WeightDtype::Q4_1 => 20.0 / 32.0,
            WeightDtype::Q5_0 => 22.0 / 32.0,
            WeightDtype::Q5_1 => 24.0 / 32.0,
            // llama.cpp's own sizes for Llama 3.1 8B: 4.58 GiB and 5.33 GiB for 8.03 B weights.
            WeightDtype::Q4KM => 4.9 / 8.0,
            WeightDtype::Q5KM => 5.7 / 8.0,
            WeightDtype::Q6K => 210.0 / 256.0,
        }
    }

    /// The name used in manifests (`q4_1`, `bf16`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::F16 => "f16",
            WeightDtype::Fp8 => "fp8",
            WeightDtype::Q8_0 => "q8_0",
            WeightDtype::Q4_0 => "q4_0",
            WeightDtype::Q4_1 => "q4_1",
            WeightDtype::Q5_0 => "q5_0",
            WeightDtype::Q5_1 => "q5_1",
            WeightDtype::Q4KM => "q4_k_m",
            WeightDtype::Q5KM => "q5_k_m",
            WeightDtype::Q6K => "q6_k",
        }
    }
}

/// Where a worker reads the weights. Exactly one of `path`, `pvc` and `url` is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("(has(self.path) ? 1 : 0) + (has(self.pvc) ? 1 : 0) + (has(self.url) ? 1 : 0) == 1").message("spec.model.weights.source: set exactly one of path, pvc or url"))]
#[x_kube(validation = Rule::new("!has(self.url) || self.url.startsWith('https://') || (has(self.insecure) && self.insecure)").message("spec.model.weights.source.url is plain http://, which anyone on the path can alter: use https://, or set insecure: true to accept it"))]
#[serde(rename_all = "camelCase")]
pub struct WeightSource {
    /// Absolute path of the weight file on the node (mounted read-only into the worker through a
    /// hostPath volume); for `whaleflux run`, a path on this machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("spec.model.weights.source.path must be an absolute path such as /models/model.gguf"))]
    pub path: Option<String>,

    /// A PersistentVolumeClaim in the deployment's namespace and the file's path inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,

    /// An http(s) URL the worker downloads the file from at start-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("spec.model.weights.source.url must start with https:// or http://"))]
    pub url: Option<String>,

    /// Accept a plain `http://` URL (its bytes can be altered on the way; pair it with sha256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure: Option<bool>,

    /// SHA-256 of the weight file (64 hex digits): each worker checks the file against it before
    /// loading and refuses to start, naming both digests, when they differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-fA-F]{64}$')").message("spec.model.weights.source.sha256 must be 64 hex digits (sha256sum's output)"))]
    pub sha256: Option<String>,
}

/// A file inside a PersistentVolumeClaim.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// Name of the PersistentVolumeClaim, in the LlmDeployment's namespace.
    #[x_kube(validation = Rule::new("self.size() > 0").message("spec.model.weights.source.pvc.claimName must name a PersistentVolumeClaim"))]
    pub claim_name: String,
    /// Path of the weight file relative to the volume's root.
    #[x_kube(validation = Rule::new("self.size() > 0 && !self.startsWith('/')").message("spec.model.weights.source.pvc.path must be a relative path inside the volume, e.g. models/llama.gguf"))]
    pub path: String,
}

/// Fixed parallelism and the planning objective.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ParallelismSpec {
    /// GPUs that split each layer (tensor parallel). Leave out to let the operator choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.parallelism.tensorParallel must be at least 1; remove it to let the operator choose"))]
    pub tensor_parallel: Option<i32>,

    /// Stages that split the layers (pipeline parallel). Leave out to let the operator choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.parallelism.pipelineParallel must be at least 1; remove it to let the operator choose"))]
    pub pipeline_parallel: Option<i32>,

    /// What the planner optimises when it chooses the split.
    #[serde(default)]
    pub objective: Objective,
}

/// What the planner optimises among the plans that fit.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Objective {
    /// Most estimated decode tokens/s per GPU at the serving concurrency (the least GPU time per
    /// token); ties go to fewer GPUs, then fewer nodes, then fewer pipeline stages.
    #[default]
    MaxTokensPerGpu,
    /// Fewest GPUs per replica group that fit, then the best estimated throughput.
    MinGpus,
    /// Best estimated decode throughput per replica group.
    MaxThroughput,
    /// Lowest estimated time per output token.
    MinLatency,
}

/// Serving limits of each replica group.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServingSpec {
    /// Longest sequence (prompt + output tokens) a request may use.
    #[serde(default = "default_max_context")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.serving.maxContextLength must be at least 1 token"))]
    pub max_context_length: i32,

    /// Sequences decoded together; more raises throughput and the KV-cache reservation.
    #[serde(default = "default_max_sequences")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.serving.maxConcurrentSequences must be at least 1"))]
    pub max_concurrent_sequences: i32,

    /// Port of the OpenAI-compatible HTTP API on each group's first rank.
    #[serde(default = "default_port")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("spec.serving.port must be between 1 and 65535"))]
    pub port: i32,

    /// A Secret in this namespace whose key holds the API keys (comma-separated) clients must
    /// send as `Authorization: Bearer KEY`. Absent: the API is open to whatever can reach it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKeyRef>,

    /// Seconds a stopping worker (scale-down, rollout, deletion) gets to finish the requests in
    /// flight; the pods' grace period is sized from it.
    #[serde(default = "default_drain_seconds")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 3600").message("spec.serving.drainSeconds must be between 0 and 3600"))]
    pub drain_seconds: i32,

    /// Who may reach the API port: pods matching this selector in this namespace (the
    /// NetworkPolicy's `podSelector` form). Absent: any pod in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_clients: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
}

/// One key of a Secret in the deployment's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[x_kube(validation = Rule::new("self.size() > 0").message("spec.serving.apiKeySecret.name must name a Secret in this namespace"))]
    pub name: String,
    /// The key inside it.
    #[serde(default = "default_api_key_key")]
    pub key: String,
}

fn default_api_key_key() -> String {
    "api-keys".into()
}

fn default_drain_seconds() -> i32 {
    30
}

fn default_max_context() -> i32 {
    4096
}
fn default_max_sequences() -> i32 {
    8
}
fn default_port() -> i32 {
    8000
}

impl Default for ServingSpec {
    fn default() -> Self {
        Self {
            max_context_length: default_max_context(),
            max_concurrent_sequences: default_max_sequences(),
            port: default_port(),
            api_key_secret: None,
            drain_seconds: default_drain_seconds(),
            allowed_clients: None,
        }
    }
}

/// Limits on automatic recovery.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FailoverSpec {
    /// Group restarts allowed per hour before the deployment is marked Degraded and left alone.
    #[serde(default = "default_restart_budget")]
    #[x_kube(validation = Rule::new("self >= 0").message("spec.failover.restartBudget must be 0 or more"))]
    pub restart_budget: i32,

    /// Minutes a node whose GPU failed is kept out of plans.
    #[serde(default = "default_quarantine_minutes")]
    #[x_kube(validation = Rule::new("self >= 0").message("spec.failover.quarantineMinutes must be 0 or more"))]
    pub quarantine_minutes: i32,
}

fn default_restart_budget() -> i32 {
    5
}
fn default_quarantine_minutes() -> i32 {
    30
}

impl Default for FailoverSpec {
    fn default() -> Self {
        Self {
            restart_budget: default_restart_budget(),
            quarantine_minutes: default_quarantine_minutes(),
        }
    }
}

/// Coarse lifecycle of an LlmDeployment; `conditions` hold the detail.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Phase {
    /// Accepted, not planned yet.
    #[default]
    Pending,
    /// Planned; worker groups are being created or replaced.
    Progressing,
    /// Every requested replica group is serving.
    Ready,
    /// Serving with fewer groups than asked, or recovering from a failure.
    Degraded,
    /// Cannot run as specified (no plan fits, pool missing); see the Planned condition.
    Failed,
}

/// Observed state of an LlmDeployment.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LlmDeploymentStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Coarse lifecycle: Pending, Progressing, Ready, Degraded or Failed.
    #[serde(default)]
    pub phase: Phase,

    /// Planned, Progressing, Ready and Degraded, in the standard Kubernetes condition shape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// The chosen split and placement, with the options the planner rejected and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,

    /// Replica groups created (the scale subresource's status replicas).
    #[serde(default)]
    pub replicas: i32,

    /// Replica groups whose every pod is ready.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Label selector of the worker pods, for the scale subresource and autoscalers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// In-cluster URL of the OpenAI-compatible API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// Group recreations of the last hour, oldest first: what `spec.failover.restartBudget`
    /// counts, kept in the status so a new operator leader counts the same.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restarts: Vec<GroupRestart>,
}

/// One recreation of a replica group after a fault.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GroupRestart {
    /// Group number.
    pub group: i32,
    /// When the operator recreated it.
    pub time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    /// What happened, naming the pod (and the GPU for a GPU fault).
    pub reason: String,
}
