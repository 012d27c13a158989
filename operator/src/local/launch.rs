//! One start of `whaleflux run`'s group: the plan's processes, each with its configuration
//! file, ports, log, termination-log file and GPUs, in a fresh private run folder.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use whaleflux_crds::{LlmDeployment, Plan};

use super::devices::{LocalDevices, LocalGpu};
use super::{RunError, RunOptions, TpMode, group};
use crate::resources::worker_config::{self, Addressing};

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
pub(super) struct Launch {
    pub(super) spec: group::GroupSpec,
    pub(super) dir: PathBuf,
    pub(super) api_port: u16,
    pub(super) probe_ip: IpAddr,
    pub(super) served: String,
}

/// Renders the configurations of `plan`'s processes into a fresh run folder and picks their
/// ports: the API on the requested one, every other process on free ones, and a run of
/// consecutive peer ports.
pub(super) fn launch(
    opts: &RunOptions,
    deployment: &LlmDeployment,
    plan: &Plan,
    local: &LocalDevices,
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

#[cfg(test)]
mod tests {
    use super::*;

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
