//! The worker's configuration: everything one `whaleflux-worker` process needs to take its place
//! in a replica group. The operator renders it into each deployment's ConfigMap and `whaleflux run`
//! writes it to a file per process; both use the same renderer (in the operator crate), and the
//! worker reads this one type. It is plain data, so it is shared here rather than duplicated.

use serde::{Deserialize, Serialize};

use crate::plan::Plan;

/// Environment variable holding the group secret peers present when they connect.
pub const GROUP_SECRET_ENV: &str = "WHALEFLUX_GROUP_SECRET";
/// Environment variable holding the pod name; its ordinal suffix is the pipeline stage when
/// [`WorkerConfig::stage`] is absent.
pub const POD_NAME_ENV: &str = "POD_NAME";
/// Where pods mount the rendered configuration (the ConfigMap key `worker.json`).
pub const CONFIG_MOUNT_PATH: &str = "/etc/whaleflux/worker.json";
/// ConfigMap key of the rendered configuration.
pub const CONFIG_KEY: &str = "worker.json";
/// The exit status of a worker stopped by a fatal GPU fault (its termination message names the
/// GPU and the fault). The operator quarantines the node of a container that ended with it.
pub const EXIT_GPU_FAULT: i32 = 4;
/// The exit status of a worker that stopped because its replica group failed (a peer went
/// away): it is not the cause, the peer that stopped first is.
pub const EXIT_GROUP_FAILED: i32 = 3;
/// The exit status of a worker in which a thread panicked (a bug: the group cannot go on with
/// a rank thread gone, so the process ends and its supervisor restarts the group).
pub const EXIT_PANIC: i32 = 70;
/// Where a container's termination message is written (Kubernetes' default
/// `terminationMessagePath`).
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// The variable that tells CUDA which GPUs a process may use (indices or `GPU-…` UUIDs).
/// `whaleflux run` gives each worker its GPUs with it; NVML ignores it, so the worker's health
/// monitor applies it to watch only its own.
pub const VISIBLE_DEVICES_ENV: &str = "CUDA_VISIBLE_DEVICES";
/// Environment variable naming the NVML library to load instead of the driver's
/// (`libnvidia-ml.so.1`): read by the worker and by `whaleflux run`, which plans on its GPUs.
pub const NVML_LIBRARY_ENV: &str = "WHALEFLUX_NVML_LIBRARY";

/// The sentence a worker stopped by a fatal GPU fault reports (readiness, termination message,
/// the errors of its open requests). It names the GPU by UUID so that a supervisor can leave
/// that GPU out ([`faulty_gpu_uuid`]).
pub fn gpu_fault_message(index: u32, uuid: &str, model: &str, reason: &str) -> String {
    format!("fatal GPU fault on GPU {index} ({uuid}, {model}): {reason}")
}

/// The UUID of the GPU a [`gpu_fault_message`] in `message` names.
pub fn faulty_gpu_uuid(message: &str) -> Option<&str> {
    let (_, rest) = message.split_once("fatal GPU fault on GPU ")?;
    let (_, inside) = rest.split_once(" (")?;
    let (uuid, _) = inside.split_once(", ")?;
    (!uuid.is_empty() && !uuid.contains(char::is_whitespace)).then_some(uuid)
}

/// One worker process's view of its replica group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerConfig {
    /// Name of the LlmDeployment (logs, metrics labels).
    pub deployment: String,
    /// The model file and the name clients use for it.
    pub model: WorkerModel,
    /// The whole plan; the worker takes its stage's layer range and the TP size from it.
    pub plan: Plan,
    /// Replica group this process belongs to.
    pub group: i32,
    /// Pipeline stage of this process. Absent in pods: the stage is the ordinal suffix of the
    /// pod name (`POD_NAME`), since one ConfigMap serves every pod of a StatefulSet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<i32>,
    /// Tensor-parallel rank of this process. Absent: this process runs all `tensorParallel` ranks
    /// of its stage as threads sharing memory (a pod with TP GPUs). Present: one process per TP
    /// rank, talking over TCP (`whaleflux run --tp-mode processes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tp_rank: Option<i32>,
    /// Where every process of the group listens for peer traffic.
    pub peers: Vec<PeerAddress>,
    /// Ports this process listens on.
    pub ports: WorkerPorts,
    /// Serving limits (stage 0 enforces them; every stage sizes its KV cache from them).
    pub serving: WorkerServing,
    /// CPU threads per process for the CPU backend (0 = all cores).
    #[serde(default)]
    pub threads: i32,
    /// Milliseconds a peer may take to connect or to answer a step before the group fails fast.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: i64,
    /// Milliseconds from the process's start within which its group must have formed (every
    /// peer loaded and connected): ranks load at different speeds, and one that is ready first
    /// waits this long (started, not ready) for the slowest instead of failing the group.
    #[serde(default = "default_formation_timeout_ms")]
    pub formation_timeout_ms: i64,
}

fn default_peer_timeout_ms() -> i64 {
    30_000
}

fn default_formation_timeout_ms() -> i64 {
    600_000
}

/// How long a group of `plan` may take to form: two minutes, plus reading the largest stage's
/// weights at 100 MB/s (a slow network volume), so a 70B model's ranks are not failed while
/// they still load.
pub fn formation_timeout_ms(plan: &Plan) -> i64 {
    let stage_bytes = plan
        .memory_per_gpu_bytes
        .weights
        .saturating_mul(i64::from(plan.tensor_parallel.max(1)));
    120_000 + stage_bytes / 100_000
}

/// The model file as the worker sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerModel {
    /// Path of the GGUF file inside the worker's filesystem (pod volume or local path).
    pub path: String,
    /// Model name accepted in API requests and listed by `/v1/models`.
    pub served_name: String,
    /// SHA-256 the file must have (hex); the worker checks it before loading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Peer endpoint of one process of the group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAddress {
    /// Pipeline stage of the peer.
    pub stage: i32,
    /// Tensor-parallel rank of the peer; absent when the stage's TP ranks are threads of one
    /// process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tp_rank: Option<i32>,
    /// Host name (pod DNS name through the headless Service) or IP address.
    pub host: String,
    /// Peer (collectives) port.
    pub port: i32,
}

/// Ports a worker listens on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerPorts {
    /// OpenAI API (stage 0, TP rank 0) and `/healthz` `/readyz` `/metrics` (every process).
    pub http: i32,
    /// Peer traffic (activations, all-reduce).
    pub peer: i32,
}

/// Serving limits the deployment asked for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerServing {
    /// Context per sequence, in tokens.
    pub max_context_length: i32,
    /// Sequences decoded together.
    pub max_concurrent_sequences: i32,
    /// Requests allowed to wait for a slot before the API answers 429.
    pub max_queue: i32,
}

/// Why a configuration cannot be used by this process.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WorkerConfigError {
    /// No stage in the config and no usable pod name.
    #[error(
        "the worker config has no `stage` and {POD_NAME_ENV} {0} does not end in an ordinal (`name-N`); set `stage` or {POD_NAME_ENV}"
    )]
    NoStage(String),
    /// The stage is not one of the plan's stages.
    #[error("stage {stage} is outside the plan's {stages} pipeline stages")]
    StageOutOfRange {
        /// The stage asked for.
        stage: i32,
        /// Stages in the plan.
        stages: usize,
    },
}

impl WorkerConfig {
    /// This process's stage: the config's `stage`, else the ordinal of `pod_name`.
    pub fn resolve_stage(&self, pod_name: Option<&str>) -> Result<i32, WorkerConfigError> {
        let stage = match (self.stage, pod_name) {
            (Some(s), _) => s,
            (None, Some(name)) => name
                .rsplit_once('-')
                .and_then(|(_, n)| n.parse::<i32>().ok())
                .ok_or_else(|| WorkerConfigError::NoStage(format!("`{name}`")))?,
            (None, None) => return Err(WorkerConfigError::NoStage("(unset)".into())),
        };
        if stage < 0 || stage as usize >= self.plan.stages.len() {
            return Err(WorkerConfigError::StageOutOfRange {
                stage,
                stages: self.plan.stages.len(),
            });
        }
        Ok(stage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_fault_message_names_its_gpu_by_uuid() {
        let m = gpu_fault_message(3, "GPU-5b3e-77aa", "NVIDIA H100 80GB HBM3", "xid_79");
        assert_eq!(
            m,
            "fatal GPU fault on GPU 3 (GPU-5b3e-77aa, NVIDIA H100 80GB HBM3): xid_79"
        );
        assert_eq!(faulty_gpu_uuid(&m), Some("GPU-5b3e-77aa"));
        // As a termination message, after a log line or with a newline after it.
        assert_eq!(
            faulty_gpu_uuid(&format!("whaleflux-worker: {m}; stopping this rank\n")),
            Some("GPU-5b3e-77aa")
        );
        for other in [
            "",
            "peer stage 1 went away",
            "fatal GPU fault on GPU 1",
            "fatal GPU fault on GPU 1 (, H100): lost",
        ] {
            assert_eq!(faulty_gpu_uuid(other), None, "{other:?}");
        }
    }
}
