//! `GpuPool`: a set of GPU nodes and how they are wired, which LlmDeployments are planned on.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a GpuPool: which nodes belong to it and what their GPUs and links are.
// kube's printcolumn(...) arguments repeat `type_ = ...`, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "whaleflux.io",
    version = "v1alpha1",
    kind = "GpuPool",
    plural = "gpupools",
    singular = "gpupool",
    shortname = "gpool",
    status = "GpuPoolStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "GpuPool is a cluster-scoped set of GPU nodes, with their GPU model and interconnect, that LlmDeployments are planned on.",
    printcolumn(
        name = "GPU",
        type_ = "string",
        json_path = ".status.gpuModels",
        description = "GPU models in the pool"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "integer",
        json_path = ".status.totalNodes",
        description = "Nodes matching the selector"
    ),
    printcolumn(
        name = "GPUs",
        type_ = "integer",
        json_path = ".status.totalGpus",
        description = "GPUs on those nodes"
    ),
    printcolumn(
        name = "Healthy",
        type_ = "integer",
        json_path = ".status.healthyGpus",
        description = "GPUs on ready, unquarantined nodes"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct GpuPoolSpec {
    /// Labels a Node must carry to belong to this pool. Empty selects every node.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,

    /// GPU model and count for nodes without GPU feature discovery labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuOverride>,

    /// How GPUs inside a node and nodes among themselves are connected.
    #[serde(default)]
    pub interconnect: InterconnectSpec,
}

/// GPU model and count that override what the nodes' labels say.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuOverride {
    /// GPU model: a catalog short name (H100, H100-PCIe, H200, A100-80GB, A100-40GB, RTX4090, L40S)
    /// or a `nvidia.com/gpu.product` label value.
    #[x_kube(validation = Rule::new("self.size() > 0").message("spec.gpu.model must name a GPU model such as H100 or A100-80GB"))]
    pub model: String,

    /// GPUs per node; when absent, the node's allocatable `nvidia.com/gpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.gpu.perNode must be at least 1"))]
    pub per_node: Option<i32>,
}

/// Interconnect of the pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct InterconnectSpec {
    /// Link between GPUs of one node; Auto trusts the GPU model (SXM parts have NVLink).
    #[serde(default)]
    pub intra_node: IntraNodeLink,

    /// Network between nodes, used for pipeline hand-offs.
    #[serde(default)]
    pub inter_node: InterNodeNetwork,

    /// Per-node network bandwidth in Gbit/s; when absent, a typical figure for interNode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.interconnect.bandwidthGbps must be at least 1"))]
    pub bandwidth_gbps: Option<i32>,
}

/// Link between the GPUs of one node.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IntraNodeLink {
    /// NVLink when the GPU model has it, otherwise PCIe.
    #[default]
    Auto,
    /// All GPUs of a node share one NVLink/NVSwitch domain.
    NVLink,
    /// GPUs talk over PCIe only.
    PCIe,
}

/// Network between nodes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InterNodeNetwork {
    /// InfiniBand (default figure 400 Gbit/s).
    InfiniBand,
    /// RDMA over Converged Ethernet (default figure 200 Gbit/s).
    RoCE,
    /// Plain TCP over Ethernet (default figure 25 Gbit/s).
    #[default]
    Ethernet,
}

impl InterNodeNetwork {
    /// Typical per-node bandwidth in Gbit/s when the pool does not say.
    pub fn default_gbps(self) -> i32 {
        match self {
            InterNodeNetwork::InfiniBand => 400,
            InterNodeNetwork::RoCE => 200,
            InterNodeNetwork::Ethernet => 25,
        }
    }
}

/// Observed state of a GpuPool.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GpuPoolStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Every node matching the selector, healthy or not.
    #[serde(default)]
    pub nodes: Vec<PoolNode>,

    /// GPU models present, comma-separated (for `kubectl get gpool`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_models: Option<String>,

    /// Nodes matching the selector.
    #[serde(default)]
    pub total_nodes: i32,

    /// GPUs on those nodes.
    #[serde(default)]
    pub total_gpus: i32,

    /// Nodes that are Ready and not quarantined.
    #[serde(default)]
    pub healthy_nodes: i32,

    /// GPUs on healthy nodes.
    #[serde(default)]
    pub healthy_gpus: i32,

    /// Ready and Degraded, in the standard Kubernetes condition shape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One node of the pool as the operator sees it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PoolNode {
    /// Node name.
    pub name: String,
    /// GPU model: the `nvidia.com/gpu.product` label or the pool's override.
    pub gpu_model: String,
    /// GPUs on the node.
    pub gpu_count: i32,
    /// GPUs free for new plans: the node's GPUs minus those WhaleFlux plans hold and those other
    /// pods bound to the node request.
    pub allocatable: i32,
    /// NVLink domain (e.g. an NVSwitch or NVL72 rack id); nodes sharing one can run TP across
    /// them at NVLink speed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvlink_domain: Option<String>,
    /// Node Ready condition.
    pub ready: bool,
    /// Until when the node is kept out of plans after a GPU failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined_until: Option<Time>,
    /// Why the node is unhealthy or unusable, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
