//! `whaleflux`: the WhaleFlux operator binary and its command-line tools.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::jiff::Timestamp;
use whaleflux_crds::InterNodeNetwork;
use whaleflux_operator::planner::{self, PlanError, PlanRequest, Pool};
use whaleflux_operator::{local, plan_cmd};

/// WhaleFlux runs large language models across GPU clusters.
#[derive(Parser)]
#[command(name = "whaleflux", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the Kubernetes operator: reconcile GpuPools and LlmDeployments into worker groups
    /// (uses the kubeconfig, or the in-cluster service account). Exits 0 on SIGTERM, 1 when
    /// leadership is lost.
    Operator(OperatorArgs),
    /// Print the LlmDeployment and GpuPool CustomResourceDefinitions as YAML
    /// (`whaleflux crd | kubectl apply -f -`).
    Crd,
    /// Plan how an LlmDeployment splits over a GPU pool (tensor parallel, pipeline stages,
    /// replicas), with memory per GPU, an estimated speed, and the rejected options.
    ///
    /// Model presets: smollm2-135m, llama-3.1-8b, llama-3.1-70b, llama-3.1-405b, qwen2.5-72b,
    /// mistral-7b. GPU models: H100, H100-PCIe, H200, A100-80GB, A100-40GB, RTX4090, L40S (or a
    /// nvidia.com/gpu.product label). Exits 2 when no split fits or a fixed split is illegal.
    Plan(PlanArgs),
    /// Run an LlmDeployment on this machine: plan it on the local GPUs (through NVML) or CPU
    /// slots, start one `whaleflux-worker` process per rank, and serve the OpenAI-compatible API
    /// on localhost until Ctrl-C. A worker that dies restarts the group (within
    /// spec.failover.restartBudget per hour). Exits 2 when the plan is impossible.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// LlmDeployment manifest.
    #[arg(short = 'f', long = "file", value_name = "DEPLOYMENT.yaml")]
    file: PathBuf,
    /// Tensor parallel ranks per stage (overrides spec.parallelism.tensorParallel).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    tensor_parallel: Option<u32>,
    /// Pipeline stages (overrides spec.parallelism.pipelineParallel).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pipeline_parallel: Option<u32>,
    /// Run a stage's tensor-parallel ranks as threads of one process, or one process each.
    #[arg(long, value_enum, default_value_t = TpModeArg::Threads)]
    tp_mode: TpModeArg,
    /// Port of the OpenAI-compatible API (default: spec.serving.port).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    /// Address the workers listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// GGUF model file (default: $WHALEFLUX_MODEL, else spec.model.weights.source.path).
    #[arg(long, value_name = "FILE")]
    model: Option<PathBuf>,
    /// CPU threads per worker process (default: the cores shared out among the processes).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Plan on GPUs found through NVML, on CPU slots, or (auto) GPUs when there are any.
    #[arg(long, value_enum, default_value_t = DevicesArg::Auto)]
    devices: DevicesArg,
    /// Seconds the worker group may take to become ready.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    ready_timeout: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum TpModeArg {
    Threads,
    Processes,
}

#[derive(Clone, Copy, ValueEnum)]
enum DevicesArg {
    Auto,
    Gpu,
    Cpu,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// LlmDeployment manifest.
    #[arg(short = 'f', long = "file", value_name = "DEPLOYMENT.yaml")]
    file: PathBuf,
    /// GpuPool manifest with status.nodes, as `kubectl get gpool NAME -o yaml` prints it.
    #[arg(
        long,
        value_name = "GPUPOOL.yaml",
        conflicts_with = "gpus",
        required_unless_present = "gpus"
    )]
    pool: Option<PathBuf>,
    /// Nodes as NODESxGPUSxMODEL, comma-separated: `2x8xH100` is two nodes of eight H100.
    #[arg(long, value_name = "SPEC")]
    gpus: Option<String>,
    /// Network between nodes (default: the pool's, or ethernet with --gpus).
    #[arg(long, value_enum)]
    network: Option<Network>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, ValueEnum)]
enum Network {
    Infiniband,
    Roce,
    Ethernet,
}

impl From<Network> for InterNodeNetwork {
    fn from(n: Network) -> Self {
        match n {
            Network::Infiniband => InterNodeNetwork::InfiniBand,
            Network::Roce => InterNodeNetwork::RoCE,
            Network::Ethernet => InterNodeNetwork::Ethernet,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Operator(args) => operator(args),
        Command::Crd => crd(),
        Command::Plan(args) => plan(&args),
        Command::Run(args) => run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => match err.downcast_ref::<PlanError>() {
            Some(plan_err) if plan_err.is_infeasible() => {
                eprintln!("error: {plan_err}");
                ExitCode::from(2)
            }
            _ => {
                eprintln!("error: {err:#}");
                ExitCode::from(1)
            }
        },
    }
}

fn crd() -> anyhow::Result<()> {
    let yaml = whaleflux_crds::manifests::crds_yaml().context("generating the CRDs")?;
    std::io::stdout()
        .write_all(yaml.as_bytes())
        .context("writing the CRDs to standard output")
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn plan(args: &PlanArgs) -> anyhow::Result<()> {
    let deployment = plan_cmd::parse_deployment(&read(&args.file)?)
        .with_context(|| format!("{}", args.file.display()))?;
    let request = PlanRequest::from_spec(&deployment.spec)
        .with_context(|| format!("{}", args.file.display()))?;
    let pool = match (&args.pool, &args.gpus) {
        (Some(path), _) => {
            let gpool = plan_cmd::parse_pool(&read(path)?)
                .with_context(|| format!("{}", path.display()))?;
            let pool = Pool::from_gpu_pool(&gpool);
            match args.network {
                Some(n) => pool.with_network(n.into()),
                None => pool,
            }
        }
        (None, Some(spec)) => {
            Pool::from_gpus_spec(spec, args.network.map(Into::into).unwrap_or_default())?
        }
        (None, None) => anyhow::bail!("give the pool with --pool GPUPOOL.yaml or --gpus SPEC"),
    };
    // Planning errors carry their own full sentence: no context, so main finds them for the
    // exit code and prints them as they are.
    let plan = planner::plan(&request, &pool, Timestamp::now())?;
    let text = match args.output {
        Output::Table => plan_cmd::render_table(&plan),
        Output::Json => {
            let mut s = serde_json::to_string_pretty(&plan_cmd::PlanDocument::new(&plan))
                .context("encoding the plan as JSON")?;
            s.push('\n');
            s
        }
        Output::Yaml => serde_yaml::to_string(&plan_cmd::PlanDocument::new(&plan))
            .context("encoding the plan as YAML")?,
    };
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("writing the plan to standard output")
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let opts = local::RunOptions {
        file: args.file,
        tensor_parallel: args.tensor_parallel,
        pipeline_parallel: args.pipeline_parallel,
        tp_mode: match args.tp_mode {
            TpModeArg::Threads => local::TpMode::Threads,
            TpModeArg::Processes => local::TpMode::Processes,
        },
        port: args.port,
        host: args.host,
        model: args.model,
        threads: args.threads,
        devices: match args.devices {
            DevicesArg::Auto => local::DeviceChoice::Auto,
            DevicesArg::Gpu => local::DeviceChoice::Gpu,
            DevicesArg::Cpu => local::DeviceChoice::Cpu,
        },
        ready_timeout: std::time::Duration::from_secs(args.ready_timeout),
    };
    match local::run(&opts) {
        // The planner's sentence as it is, so main gives it exit status 2 when infeasible.
        Err(local::RunError::Plan(e)) => Err(e.into()),
        other => other.map_err(Into::into),
    }
}

#[derive(clap::Args)]
struct OperatorArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080", env = "WHALEFLUX_METRICS_ADDR")]
    metrics_addr: std::net::SocketAddr,
    /// Listen on this address instead of --metrics-addr's host (a pod's IP from the downward
    /// API, so replicas sharing a network never collide).
    #[arg(long, value_name = "IP")]
    metrics_host: Option<std::net::IpAddr>,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "whaleflux-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: $POD_NAMESPACE, else `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This process's identity in the Lease (default: $POD_NAME, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a standby waits, from when it last saw the Lease change, before it takes over.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..))]
    lease_duration_seconds: u64,
    /// Seconds the leader keeps trying to renew the Lease before it stops reconciling and exits
    /// (less than --lease-duration-seconds, so it stops before a standby takes over).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..))]
    lease_renew_deadline_seconds: u64,
    /// Seconds between the leader's renewals and a standby's attempts (less than
    /// --lease-renew-deadline-seconds).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    lease_retry_seconds: u64,
    /// Seconds an API call (not a watch) may wait for the API server before it fails.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    api_timeout_seconds: u64,
    /// Seconds one reconcile may run before it is cancelled and retried with backoff.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    reconcile_timeout_seconds: u64,
    /// Reconciles at once per controller (0 = unbounded).
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Seconds a node may be NotReady before the worker pods on it are force-deleted so their
    /// groups can start elsewhere (a dead node never confirms a deletion).
    #[arg(long, default_value_t = 60)]
    node_grace_seconds: u64,
    /// Cluster-wide settings for every worker pod (YAML: workerImage, downloadImage,
    /// imagePullSecrets, gpuTolerations), as the Helm chart's ConfigMap mounts them.
    #[arg(long, value_name = "FILE", env = "WHALEFLUX_OPERATOR_CONFIG")]
    config: Option<PathBuf>,
}

/// Refuses lease timings under which a leader could still reconcile after a standby took over,
/// or would never retry before giving up.
fn check_lease_timings(args: &OperatorArgs) -> anyhow::Result<()> {
    let (duration, deadline, retry) = (
        args.lease_duration_seconds,
        args.lease_renew_deadline_seconds,
        args.lease_retry_seconds,
    );
    if deadline >= duration {
        anyhow::bail!(
            "--lease-renew-deadline-seconds ({deadline}) must be less than \
             --lease-duration-seconds ({duration}): a leader that cannot renew must stop before a \
             standby may take the Lease over"
        );
    }
    if retry >= deadline {
        anyhow::bail!(
            "--lease-retry-seconds ({retry}) must be less than --lease-renew-deadline-seconds \
             ({deadline}): the leader must be able to retry a failed renewal before giving up"
        );
    }
    Ok(())
}

fn operator(args: OperatorArgs) -> anyhow::Result<()> {
    use std::time::Duration;
    use whaleflux_operator::controller::{self, LeaseConfig, OperatorConfig};
    use whaleflux_operator::resources::settings::ClusterSettings;
    check_lease_timings(&args)?;
    let identity = args.identity.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "whaleflux".into());
        format!("{host}-{}", std::process::id())
    });
    let duration = Duration::from_secs(args.lease_duration_seconds);
    let settings = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the operator settings {}", path.display()))?;
            ClusterSettings::from_yaml(&text).with_context(|| path.display().to_string())?
        }
        None => ClusterSettings::default(),
    };
    let mut listen = args.metrics_addr;
    if let Some(host) = args.metrics_host {
        listen.set_ip(host);
    }
    let cfg = OperatorConfig {
        listen,
        lease: LeaseConfig {
            name: args.lease_name,
            namespace: args.lease_namespace,
            identity,
            duration,
            renew_deadline: Duration::from_secs(args.lease_renew_deadline_seconds),
            retry_every: Duration::from_secs(args.lease_retry_seconds),
        },
        concurrency: args.concurrency,
        settings,
        node_grace: Duration::from_secs(args.node_grace_seconds),
        api_timeout: Duration::from_secs(args.api_timeout_seconds),
        reconcile_timeout: Duration::from_secs(args.reconcile_timeout_seconds),
    };
    tracing::info!(identity = %cfg.lease.identity, "starting the WhaleFlux operator");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(controller::run(cfg));
    // A task stuck on a blocked thread must not keep a process that lost the Lease alive.
    rt.shutdown_timeout(Duration::from_secs(5));
    result?;
    Ok(())
}
