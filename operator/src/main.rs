//! `whaleflux`: the WhaleFlux operator binary and its command-line tools.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::jiff::Timestamp;
use whaleflux_crds::InterNodeNetwork;
use whaleflux_operator::plan_cmd;
use whaleflux_operator::planner::{self, PlanError, PlanRequest, Pool};

/// WhaleFlux runs large language models across GPU clusters.
#[derive(Parser)]
#[command(name = "whaleflux", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => crd(),
        Command::Plan(args) => plan(&args),
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
