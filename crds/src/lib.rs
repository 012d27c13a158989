//! WhaleFlux API types (`whaleflux.io/v1alpha1`): what users apply (`LlmDeployment`, `GpuPool`)
//! and the `Plan` that flows from the planner to status, to pod configuration, to the worker.
//!
//! This crate holds types only: no client, no IO, so the worker can depend on it cheaply.

pub mod deployment;
pub mod manifests;
pub mod plan;
pub mod pool;
pub mod split;
pub mod worker;

pub use deployment::{
    FailoverSpec, GroupRestart, LlmDeployment, LlmDeploymentSpec, LlmDeploymentStatus, ModelShape,
    ModelSpec, Objective, ParallelismSpec, Phase, PvcSource, SecretKeyRef, ServingSpec,
    WeightDtype, WeightSource, WeightsSpec,
};
pub use plan::{GroupPlacement, MemoryBreakdown, Plan, PlanEstimate, RejectedOption, StagePlan};
pub use pool::{
    GpuOverride, GpuPool, GpuPoolSpec, GpuPoolStatus, InterNodeNetwork, InterconnectSpec,
    IntraNodeLink, PoolNode,
};
pub use worker::{
    PeerAddress, WorkerConfig, WorkerConfigError, WorkerModel, WorkerPorts, WorkerServing,
};

/// API group of every WhaleFlux kind.
pub const GROUP: &str = "whaleflux.io";
/// API version served by this crate.
pub const VERSION: &str = "v1alpha1";

/// Condition types written to `status.conditions`, shared by the operator and tests.
pub mod condition {
    /// A plan was chosen (`True`) or no legal plan fits (`False`, with the reason).
    pub const PLANNED: &str = "Planned";
    /// Groups are being created, replaced or scaled.
    pub const PROGRESSING: &str = "Progressing";
    /// Every pod of at least one replica group is ready to serve.
    pub const READY: &str = "Ready";
    /// Something needs attention: fewer ready groups than asked, a bad node, an unknown GPU.
    pub const DEGRADED: &str = "Degraded";
}
