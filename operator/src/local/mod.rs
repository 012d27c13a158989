//! `whaleflux run`: an LlmDeployment planned against this machine and run as local
//! `whaleflux-worker` processes — the same planner, the same worker configuration renderer
//! ([`crate::resources::worker_config`]) and the same worker binary as the operator's pods.
//!
//! The flow: read and check the manifest as `whaleflux plan` does, apply the command line's
//! overrides to `spec.parallelism` (so the planner judges them), plan on this machine's GPUs or
//! CPU slots ([`devices`]), render one configuration per process, then supervise the processes
//! until a signal stops them.

pub mod devices;
mod group;
pub mod http;
mod launch;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use whaleflux_crds::LlmDeployment;

use crate::plan_cmd::{self, ManifestError};
use crate::planner::{self, PlanError, PlanRequest};
pub use devices::{DeviceChoice, DeviceError, LocalGpu};

/// Environment variable with the model file when `--model` is not given; it overrides the
/// manifest's `spec.model.weights.source.path`.
pub const MODEL_ENV: &str = "WHALEFLUX_MODEL";
/// Environment variable with the `whaleflux-worker` executable to run (default: the one next
/// to the `whaleflux` executable).
pub const WORKER_BIN_ENV: &str = "WHALEFLUX_WORKER_BIN";
/// The command that fetches the model the examples use.
pub const FETCH_HINT: &str = "fetch SmolLM2-135M-Instruct with `scripts/fetch-model.sh` (it prints the file's path) and pass it with --model FILE or WHALEFLUX_MODEL=FILE";

/// How the tensor-parallel ranks of a stage run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TpMode {
    /// One process per stage; its TP ranks are threads sharing memory (as in a pod).
    #[default]
    Threads,
    /// One process per (stage, TP rank), all-reducing over loopback TCP.
    Processes,
}

/// What `whaleflux run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The LlmDeployment manifest.
    pub file: PathBuf,
    /// Fixed tensor parallelism (overrides `spec.parallelism.tensorParallel`).
    pub tensor_parallel: Option<u32>,
    /// Fixed pipeline parallelism (overrides `spec.parallelism.pipelineParallel`).
    pub pipeline_parallel: Option<u32>,
    /// Threads or processes for TP ranks.
    pub tp_mode: TpMode,
    /// API port (default: `spec.serving.port`).
    pub port: Option<u16>,
    /// Address the workers listen on.
    pub host: IpAddr,
    /// Model file (overrides `WHALEFLUX_MODEL` and the manifest's path).
    pub model: Option<PathBuf>,
    /// CPU threads per worker process (default: the cores divided among the processes).
    pub threads: Option<u32>,
    /// GPUs, CPU slots, or whichever this machine has.
    pub devices: DeviceChoice,
    /// Longest the group may take to become ready.
    pub ready_timeout: Duration,
}

/// Why `whaleflux run` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is not a usable LlmDeployment.
    #[error("{path}")]
    Manifest {
        /// The manifest.
        path: String,
        /// What is wrong.
        #[source]
        source: ManifestError,
    },
    /// The deployment's spec is out of range (what the API server would have rejected).
    #[error("{path}")]
    Request {
        /// The manifest.
        path: String,
        /// What is wrong.
        #[source]
        source: PlanError,
    },
    /// The planner found no plan (its one-sentence reason; `is_infeasible` says exit 2).
    #[error(transparent)]
    Plan(PlanError),
    /// This machine's devices could not be used.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// The model file is missing.
    #[error("{0}")]
    Model(String),
    /// The worker executable is missing.
    #[error("{0}")]
    WorkerBinary(String),
    /// A port cannot be used.
    #[error("{0}")]
    Port(String),
    /// A local file or process operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The worker group could not be kept running.
    #[error("{0}")]
    Group(String),
}

/// Reads and checks the manifest exactly as `whaleflux plan` does, then applies the command
/// line's parallelism overrides to `spec.parallelism`.
pub fn read_deployment(
    path: &Path,
    tensor_parallel: Option<u32>,
    pipeline_parallel: Option<u32>,
) -> Result<LlmDeployment, RunError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| RunError::Read {
        path: shown.clone(),
        source,
    })?;
    let mut deployment =
        plan_cmd::parse_deployment(&text).map_err(|source| RunError::Manifest {
            path: shown,
            source,
        })?;
    if tensor_parallel.is_some() || pipeline_parallel.is_some() {
        let par = deployment
            .spec
            .parallelism
            .get_or_insert_with(Default::default);
        let to_i32 = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
        if let Some(tp) = tensor_parallel {
            par.tensor_parallel = Some(to_i32(tp));
        }
        if let Some(pp) = pipeline_parallel {
            par.pipeline_parallel = Some(to_i32(pp));
        }
    }
    Ok(deployment)
}

/// The plan request for `deployment` (one replica group) and this machine's devices.
fn local_request(
    deployment: &LlmDeployment,
    file: &Path,
    choice: DeviceChoice,
) -> Result<(PlanRequest, devices::LocalDevices), RunError> {
    let mut request =
        PlanRequest::from_spec(&deployment.spec).map_err(|source| RunError::Request {
            path: file.display().to_string(),
            source,
        })?;
    if request.replicas != 1 {
        tracing::info!(
            "spec.replicas is {}; whaleflux run runs one replica group",
            request.replicas
        );
        request.replicas = 1;
    }
    let wanted = request
        .tensor_parallel
        .unwrap_or(1)
        .saturating_mul(request.pipeline_parallel.unwrap_or(1));
    let local = devices::detect(choice, wanted)?;
    tracing::info!("{}", local.summary);
    Ok((request, local))
}

/// The model file: `--model`, else `WHALEFLUX_MODEL`, else the manifest's
/// `spec.model.weights.source.path`; it must exist.
pub fn model_path(
    flag: Option<&Path>,
    env: Option<&str>,
    deployment: &LlmDeployment,
    file: &Path,
) -> Result<PathBuf, RunError> {
    let from_spec = deployment.spec.model.weights.source.path.as_deref();
    let (path, from) = match (flag, env.filter(|e| !e.is_empty()), from_spec) {
        (Some(p), _, _) => (p.to_path_buf(), "--model".to_string()),
        (None, Some(e), _) => (PathBuf::from(e), MODEL_ENV.to_string()),
        (None, None, Some(p)) => (
            PathBuf::from(p),
            format!("spec.model.weights.source.path of {}", file.display()),
        ),
        (None, None, None) => {
            return Err(RunError::Model(format!(
                "{} gives no local model file (spec.model.weights.source.path); {FETCH_HINT}",
                file.display()
            )));
        }
    };
    if !path.is_file() {
        return Err(RunError::Model(format!(
            "model file {} (from {from}) does not exist; {FETCH_HINT}",
            path.display()
        )));
    }
    Ok(std::fs::canonicalize(&path).unwrap_or(path))
}

/// The `whaleflux-worker` executable: `WHALEFLUX_WORKER_BIN`, else the one beside this
/// executable.
pub fn worker_binary() -> Result<PathBuf, RunError> {
    if let Some(p) = std::env::var_os(WORKER_BIN_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(RunError::WorkerBinary(format!(
                "{WORKER_BIN_ENV} is {}, which is not a file",
                p.display()
            )))
        };
    }
    let exe = std::env::current_exe().map_err(|source| RunError::Io {
        what: "finding the whaleflux executable".into(),
        source,
    })?;
    let beside = exe.with_file_name(format!("whaleflux-worker{}", std::env::consts::EXE_SUFFIX));
    if beside.is_file() {
        Ok(beside)
    } else {
        Err(RunError::WorkerBinary(format!(
            "cannot find {}; build it with `cargo build -p whaleflux-worker` (`cargo build --release -p whaleflux-worker` beside a release whaleflux), or set {WORKER_BIN_ENV} to its path",
            beside.display()
        )))
    }
}

/// Stops on SIGINT (Ctrl-C) and SIGTERM; a second one exits at once (the workers, which die
/// with their parent, go too).
fn shutdown_flag() -> Result<Arc<AtomicBool>, RunError> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let io = |source| RunError::Io {
            what: format!("installing the handler of signal {sig}"),
            source,
        };
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&flag))
            .map_err(io)?;
        signal_hook::flag::register(sig, Arc::clone(&flag)).map_err(io)?;
    }
    Ok(flag)
}

/// `whaleflux run`: plans, starts the worker group, serves until SIGINT/SIGTERM (then stops
/// the workers and returns `Ok`), restarting the group when a process dies, and planning it
/// again on the GPUs that remain when one of its GPUs fails; all within the restart budget.
pub fn run(opts: &RunOptions) -> Result<(), RunError> {
    let deployment = read_deployment(&opts.file, opts.tensor_parallel, opts.pipeline_parallel)?;
    let (request, mut local) = local_request(&deployment, &opts.file, opts.devices)?;
    let mut lost: Vec<String> = Vec::new();
    let plan_on = |local: &devices::LocalDevices, lost: &[String]| {
        planner::plan_with_devices(&request, &local.pool, &local.devices, Timestamp::now()).map_err(
            |e| {
                if lost.is_empty() {
                    RunError::Plan(e)
                } else {
                    RunError::Group(format!(
                        "GPU(s) {} failed, and no plan fits the {} GPU(s) that remain: {e}",
                        lost.join(", "),
                        local.gpus.len()
                    ))
                }
            },
        )
    };
    let mut plan = plan_on(&local, &lost)?;
    let env_model = std::env::var(MODEL_ENV).ok();
    let model = model_path(
        opts.model.as_deref(),
        env_model.as_deref(),
        &deployment,
        &opts.file,
    )?;
    let worker = worker_binary()?;
    let per_hour = u32::try_from(deployment.spec.failover.restart_budget).unwrap_or(0);
    let mut budget = group::RestartBudget::new(per_hour);
    let shutdown = shutdown_flag()?;
    let mut served_before = false;
    loop {
        let launch = launch::launch(opts, &deployment, &plan, &local, &model, &worker, per_hour)?;
        let base = format!(
            "http://{}/v1",
            SocketAddr::new(launch.probe_ip, launch.api_port)
        );
        let n = launch.spec.ranks.len();
        let result = group::supervise(&launch.spec, &shutdown, &mut budget, |_| {
            if served_before {
                tracing::info!(
                    "serving again at {base} (tensor parallel {} x pipeline parallel {})",
                    plan.tensor_parallel,
                    plan.pipeline_parallel
                );
                return;
            }
            served_before = true;
            let body = serde_json::json!({
                "model": launch.served,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 32,
            });
            println!(
                "Serving {} at {base} (tensor parallel {} x pipeline parallel {}, {n} worker process(es)). Ctrl-C stops it. Try:\n  curl {base}/chat/completions -H 'content-type: application/json' -d '{body}'",
                launch.served, plan.tensor_parallel, plan.pipeline_parallel
            );
        });
        match result {
            Ok(group::Outcome::Stopped) => {
                let _ = std::fs::remove_dir_all(&launch.dir);
                return Ok(());
            }
            Ok(group::Outcome::GpuFailed { uuid }) => {
                tracing::info!(
                    "worker logs of the group before the fault kept in {}",
                    launch.dir.display()
                );
                local = local.without_gpu(&uuid).map_err(RunError::Plan)?;
                lost.push(uuid);
                if local.gpus.is_empty() {
                    return Err(RunError::Group(format!(
                        "GPU(s) {} failed and no GPU remains to plan on",
                        lost.join(", ")
                    )));
                }
                tracing::info!("{}", local.summary);
                plan = plan_on(&local, &lost)?;
            }
            Err(e) => {
                tracing::info!("worker logs kept in {}", launch.dir.display());
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(extra: &str) -> LlmDeployment {
        let text = format!(
            "apiVersion: whaleflux.io/v1alpha1\nkind: LlmDeployment\nmetadata:\n  name: smol\nspec:\n  model:\n    preset: smollm2-135m\n    weights:\n      dtype: q4_1\n      source:\n        path: /nonexistent/smol.gguf\n  gpuPool: local\n{extra}"
        );
        plan_cmd::parse_deployment(&text).expect("manifest")
    }

    #[test]
    fn model_path_prefers_flag_then_env_then_spec_and_names_the_fetch_script() {
        let d = manifest("");
        let file = Path::new("smol.yaml");
        let here = std::env::current_exe().expect("exe");
        let from_flag = model_path(Some(&here), Some("/nope"), &d, file).expect("flag");
        assert_eq!(from_flag, std::fs::canonicalize(&here).expect("canon"));
        let err = model_path(None, Some("/nope/env.gguf"), &d, file)
            .expect_err("missing")
            .to_string();
        assert!(
            err.contains("/nope/env.gguf") && err.contains(MODEL_ENV),
            "{err}"
        );
        assert!(err.contains("scripts/fetch-model.sh"), "{err}");
        let err = model_path(None, Some(""), &d, file)
            .expect_err("missing")
            .to_string();
        assert!(err.contains("/nonexistent/smol.gguf"), "{err}");
        assert!(err.contains("spec.model.weights.source.path"), "{err}");
    }

    #[test]
    fn overrides_land_in_spec_parallelism() {
        let dir = std::env::temp_dir().join(format!("wf-local-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("d.yaml");
        std::fs::write(
            &file,
            "apiVersion: whaleflux.io/v1alpha1\nkind: LlmDeployment\nmetadata:\n  name: smol\nspec:\n  model:\n    preset: smollm2-135m\n    weights:\n      dtype: q4_1\n      source:\n        path: /x.gguf\n  gpuPool: local\n  parallelism:\n    tensorParallel: 3\n    pipelineParallel: 2\n",
        )
        .expect("write");
        let d = read_deployment(&file, Some(1), None).expect("read");
        let par = d.spec.parallelism.expect("parallelism");
        assert_eq!(
            (par.tensor_parallel, par.pipeline_parallel),
            (Some(1), Some(2))
        );
        let err = read_deployment(&dir.join("missing.yaml"), None, None).expect_err("missing");
        assert!(matches!(err, RunError::Read { .. }));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
