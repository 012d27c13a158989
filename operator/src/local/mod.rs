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

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use whaleflux_crds::{LlmDeployment, Plan};

use crate::plan_cmd::{self, ManifestError};
use crate::planner::{self, PlanError, PlanRequest};
use crate::resources::worker_config::{self, Addressing};
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

/// `n` consecutive ports free on `ip`, none of them in `taken`.
fn free_port_range(ip: IpAddr, n: u16, taken: &[u16]) -> Result<u16, RunError> {
    for _ in 0..64 {
        let base = free_port(ip, taken)?;
        let Some(last) = base.checked_add(n.saturating_sub(1)) else {
            continue;
        };
        let all_free =
            (base..=last).all(|p| !taken.contains(&p) && TcpListener::bind((ip, p)).is_ok());
        if all_free {
            return Ok(base);
        }
    }
    Err(RunError::Port(format!(
        "found no {n} consecutive free ports on {ip} for the workers' peer traffic"
    )))
}

/// A port free on `ip` now (the OS's choice), not in `taken`.
fn free_port(ip: IpAddr, taken: &[u16]) -> Result<u16, RunError> {
    for _ in 0..64 {
        let port = TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .map_err(|source| RunError::Io {
                what: format!("finding a free port on {ip}"),
                source,
            })?
            .port();
        if !taken.contains(&port) {
            return Ok(port);
        }
    }
    Err(RunError::Port(format!("found no free port on {ip}")))
}

/// A random group secret (hex), new for every run.
fn group_secret() -> Result<String, RunError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| RunError::Io {
        what: "drawing a random group secret".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A private folder for this run's worker configurations and logs.
fn run_dir() -> Result<PathBuf, RunError> {
    let dir = std::env::temp_dir().join(format!("whaleflux-run-{}", std::process::id()));
    let io = |source| RunError::Io {
        what: format!("creating {}", dir.display()),
        source,
    };
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io)?;
    }
    std::fs::create_dir_all(&dir).map_err(io)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(dir)
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

fn log_plan(plan: &Plan, processes: usize, threads: u32) {
    tracing::info!(
        "plan for {} ({}): tensor parallel {} x pipeline parallel {} on {} — {} worker process(es), {} thread(s) each",
        plan.model,
        plan.dtype.as_str(),
        plan.tensor_parallel,
        plan.pipeline_parallel,
        plan.gpu_model,
        processes,
        threads
    );
    for st in &plan.stages {
        let mut holds = Vec::new();
        if st.embedding {
            holds.push(", embedding");
        }
        if st.head {
            holds.push(", head");
        }
        tracing::info!(
            "  stage {}: layers [{}, {}){}",
            st.index,
            st.layers[0],
            st.layers[1],
            holds.concat()
        );
    }
    tracing::info!(
        "  estimated (cost model, not measured): {:.2} ms per token, {:.0} tokens/s at {} sequences",
        plan.estimate.time_per_token_ms,
        plan.estimate.decode_tokens_per_second,
        plan.estimate.concurrency
    );
}

/// The GPUs of the process for `stage` (and `tp_rank` when TP ranks are processes): the
/// stage's TP ranks take the plan's GPUs in order, stage by stage.
fn rank_gpus(gpus: &[LocalGpu], tp: usize, stage: i32, tp_rank: Option<i32>) -> Vec<String> {
    let stage = usize::try_from(stage).unwrap_or(0);
    let first = stage * tp;
    let range = match tp_rank.and_then(|t| usize::try_from(t).ok()) {
        Some(t) => first + t..first + t + 1,
        None => first..first + tp,
    };
    gpus.get(range)
        .unwrap_or_default()
        .iter()
        .map(|g| g.uuid.clone())
        .collect()
}

/// One start of the group: its plan's processes, configurations and ports.
struct Launch {
    spec: group::GroupSpec,
    dir: PathBuf,
    api_port: u16,
    probe_ip: IpAddr,
    served: String,
}

/// Renders the configurations of `plan`'s processes into a fresh run folder and picks their
/// ports: the API on the requested one, every other process on free ones, and a run of
/// consecutive peer ports.
fn launch(
    opts: &RunOptions,
    deployment: &LlmDeployment,
    plan: &Plan,
    local: &devices::LocalDevices,
    model: &Path,
    worker: &Path,
    budget_note: u32,
) -> Result<Launch, RunError> {
    let tp_processes = opts.tp_mode == TpMode::Processes;
    let ranks: Vec<(i32, Option<i32>)> = worker_config::local_ranks(plan, tp_processes).collect();
    let n = ranks.len();
    let cores = std::thread::available_parallelism()
        .map(|c| c.get() as u32)
        .unwrap_or(1);
    let threads = opts
        .threads
        .unwrap_or_else(|| (cores / n.max(1) as u32).max(1));
    log_plan(plan, n, threads);

    let host = opts.host;
    let probe_ip = if host.is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host
    };
    let api_port = match opts.port {
        Some(p) => p,
        None => u16::try_from(deployment.spec.serving.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                RunError::Port(format!(
                    "spec.serving.port {} is not a port; pass --port",
                    deployment.spec.serving.port
                ))
            })?,
    };
    TcpListener::bind((host, api_port)).map_err(|e| {
        RunError::Port(format!(
            "port {api_port} on {host} cannot be used ({e}); pass --port with a free one"
        ))
    })?;
    let mut taken = vec![api_port];
    let n_u16 = u16::try_from(n).unwrap_or(u16::MAX);
    let peer_base = free_port_range(host, n_u16, &taken)?;
    taken.extend(peer_base..peer_base.saturating_add(n_u16));
    let mut http_ports = vec![api_port];
    for _ in 1..n {
        let p = free_port(host, &taken)?;
        taken.push(p);
        http_ports.push(p);
    }

    let dir = run_dir()?;
    let group_cfg = worker_config::render(
        deployment,
        plan,
        0,
        &model.display().to_string(),
        &Addressing::Local {
            host: host.to_string(),
            base_peer_port: peer_base,
            tp_processes,
        },
    );
    let tp = usize::try_from(plan.tensor_parallel).unwrap_or(1).max(1);
    let mut group_ranks = Vec::with_capacity(n);
    for (&(stage, tp_rank), &http_port) in ranks.iter().zip(&http_ports) {
        let mut cfg =
            worker_config::for_local_process(&group_cfg, stage, tp_rank, i32::from(http_port));
        cfg.threads = i32::try_from(threads).unwrap_or(i32::MAX);
        let (label, file) = match tp_rank {
            Some(t) => (
                format!("stage {stage} tp {t}"),
                format!("stage-{stage}-tp-{t}"),
            ),
            None => (format!("stage {stage}"), format!("stage-{stage}")),
        };
        let config = dir.join(format!("{file}.json"));
        let json = serde_json::to_string_pretty(&cfg).map_err(|e| RunError::Io {
            what: format!("encoding the configuration of {label}"),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(&config, json).map_err(|source| RunError::Io {
            what: format!("writing {}", config.display()),
            source,
        })?;
        let gpus = rank_gpus(&local.gpus, tp, stage, tp_rank);
        if !gpus.is_empty() {
            tracing::info!("  {label} on {}", gpus.join(", "));
        }
        group_ranks.push(group::Rank {
            label,
            probe: SocketAddr::new(probe_ip, http_port),
            config,
            log: dir.join(format!("{file}.log")),
            termination_log: dir.join(format!("{file}.termination-log")),
            gpus,
        });
    }
    tracing::info!(
        "worker configurations and logs in {}; model {}; {budget_note} group restart(s) allowed per hour",
        dir.display(),
        model.display()
    );
    Ok(Launch {
        spec: group::GroupSpec {
            worker: worker.to_path_buf(),
            host: host.to_string(),
            secret: group_secret()?,
            ranks: group_ranks,
            ready_timeout: opts.ready_timeout,
            stop_grace: Duration::from_secs(10),
        },
        dir,
        api_port,
        probe_ip,
        served: group_cfg.model.served_name,
    })
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
        let launch = launch(opts, &deployment, &plan, &local, &model, &worker, per_hour)?;
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

    #[test]
    fn ranks_take_the_gpus_in_order_stage_by_stage() {
        let gpus: Vec<LocalGpu> = (0..6)
            .map(|index| LocalGpu {
                index,
                uuid: format!("GPU-{index}"),
            })
            .collect();
        let uuids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // TP 3 as threads: one process per stage holds its stage's three GPUs.
        assert_eq!(
            rank_gpus(&gpus, 3, 1, None),
            uuids(&["GPU-3", "GPU-4", "GPU-5"])
        );
        // TP 3 as processes: one GPU each.
        assert_eq!(rank_gpus(&gpus, 3, 1, Some(2)), uuids(&["GPU-5"]));
        assert_eq!(rank_gpus(&gpus, 3, 0, Some(0)), uuids(&["GPU-0"]));
        // CPU slots: none.
        assert!(rank_gpus(&[], 3, 1, None).is_empty());
    }

    #[test]
    fn peer_ports_are_consecutive_and_avoid_taken_ones() {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let base = free_port_range(ip, 4, &[]).expect("range");
        for p in base..base + 4 {
            assert!(TcpListener::bind((ip, p)).is_ok(), "{p}");
        }
        let taken: Vec<u16> = (base..base + 4).collect();
        let p = free_port(ip, &taken).expect("port");
        assert!(!taken.contains(&p));
        let s = group_secret().expect("secret");
        assert_eq!(s.len(), 64);
        assert_ne!(s, group_secret().expect("secret"));
    }
}
