//! GPU health. Every rank samples the GPUs NVML shows it (in a pod, the ones the device plugin
//! gave it) and exports them under Prometheus names that mirror DCGM's fields; a pure table
//! turns each sample and each XID the driver reports into a verdict. NVML is loaded at run time: with no library or no GPU the
//! sampler says so once and the GPU families stay empty, never a panic.

pub mod metrics;
mod nvml;
pub mod verdict;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use verdict::{Verdict, XidClass, classify_xid, verdict};

use crate::metrics::Metrics;

/// One GPU as NVML reported it at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuSample {
    /// NVML's index of the GPU (within what this process sees).
    pub index: u32,
    pub uuid: String,
    /// Product name, e.g. `NVIDIA H100 80GB HBM3`.
    pub model: String,
    /// Every query on the device answered `GPU_IS_LOST` (fell off the bus).
    pub lost: bool,
    pub temperature_c: Option<u32>,
    /// Where the GPU starts hardware slowdown.
    pub slowdown_c: Option<u32>,
    /// Where the GPU shuts itself down.
    pub shutdown_c: Option<u32>,
    pub power_w: Option<f64>,
    pub power_limit_w: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    /// Share of the last sample period a kernel ran, 0 to 1.
    pub utilization: Option<f64>,
    /// Uncorrected ECC errors since the driver loaded (volatile).
    pub ecc_uncorrected: Option<u64>,
    /// NVML's clocks-throttle-reasons bitmask.
    pub throttle_reasons: Option<u64>,
    /// PCIe link replays since the driver loaded (a link retransmitting: a bad riser or
    /// slot).
    pub pcie_replays: Option<u64>,
    /// Memory pages wait to be retired at the next reset (ECC errors were seen).
    pub retired_pages_pending: Option<bool>,
    /// Row remapping, the way GPUs from Ampere on replace failing memory rows.
    pub row_remap: Option<RowRemap>,
    pub links: Vec<LinkSample>,
}

/// `nvmlDeviceGetRemappedRows`: what row remapping has done on a GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowRemap {
    /// Rows remapped for correctable errors, over the GPU's life.
    pub correctable: u64,
    /// Rows remapped for uncorrectable errors, over the GPU's life.
    pub uncorrectable: u64,
    /// A remapping waits for the next GPU reset.
    pub pending: bool,
    /// A remapping failed: the bank has no spare row left.
    pub failed: bool,
}

/// One NVLink of a GPU.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkSample {
    pub link: u32,
    pub active: bool,
    /// Replay, recovery and CRC (flit and data) errors, summed.
    pub errors: u64,
}

pub use whaleflux_crds::worker::VISIBLE_DEVICES_ENV;

/// The GPUs this process uses, as `CUDA_VISIBLE_DEVICES` lists them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Visible {
    /// Unset: every GPU NVML shows (in a pod, the device plugin already chose them).
    #[default]
    All,
    /// NVML indices or UUIDs (`GPU-…`; a prefix is enough, as for CUDA).
    Only(Vec<String>),
}

impl Visible {
    /// Reads the variable's value as CUDA does: comma-separated indices or UUIDs, the list
    /// ending at the first entry that is neither; an empty value shows no GPU.
    pub fn parse(value: Option<&str>) -> Self {
        let Some(value) = value else {
            return Self::All;
        };
        Self::Only(
            value
                .split(',')
                .map(str::trim)
                .take_while(|e| e.parse::<u32>().is_ok() || e.starts_with("GPU-"))
                .map(String::from)
                .collect(),
        )
    }

    /// Whether the GPU at NVML `index` with `uuid` is one of this process's.
    pub fn admits(&self, index: u32, uuid: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(list) => list.iter().any(|e| match e.parse::<u32>() {
                Ok(i) => i == index,
                Err(_) => uuid.starts_with(e.as_str()),
            }),
        }
    }
}

/// Where NVML comes from, which GPUs to watch, how often to sample, and where a fatal fault is
/// reported.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    /// The NVML library to load (default: the driver's `libnvidia-ml.so.1`).
    pub library: Option<PathBuf>,
    /// The GPUs of this process.
    pub visible: Visible,
    pub every: Duration,
    /// The container's termination message file; written on a fatal fault when it exists
    /// (the kubelet creates `/dev/termination-log`; elsewhere nothing is created).
    pub termination_log: PathBuf,
}

pub use whaleflux_crds::worker::EXIT_GPU_FAULT;

/// A fatal fault stops the rank: `/readyz` already answers 503 with the fault; the reason goes
/// to the termination message, the log, the group's other ranks and every open request, and the
/// process exits with [`EXIT_GPU_FAULT`] so the group is restarted away from the GPU.
fn stop_rank(config: &MonitorConfig, fault: &str) -> ! {
    if config.termination_log.exists()
        && let Err(e) = std::fs::write(&config.termination_log, fault)
    {
        tracing::warn!(path = %config.termination_log.display(), "cannot write the termination message: {e}");
    }
    eprintln!("whaleflux-worker: {fault}; stopping this rank");
    // The group's other ranks learn why (not only that a peer went away), and the requests
    // open here end with an error naming the GPU instead of being cut off.
    crate::comm::tcp::abort_all(fault);
    crate::server::fail_in_flight(fault);
    std::thread::sleep(crate::server::FAIL_FLUSH);
    std::process::exit(EXIT_GPU_FAULT)
}

/// Starts the sampler thread: it loads NVML once, then samples every GPU each period into
/// `metrics`. Without NVML or GPUs it logs why once and ends.
pub fn spawn(config: MonitorConfig, metrics: Arc<Metrics>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("gpu-health".into())
        .spawn(move || {
            let nvml = match nvml::open(config.library.as_deref()) {
                Ok(n) => n,
                Err(why) => {
                    tracing::info!("no GPU health: {why}");
                    metrics.gpu.set_status(format!("no GPU ({why})"));
                    return;
                }
            };
            let ours = nvml::indices(&nvml, &config.visible);
            if ours.is_empty() {
                let why = format!("{VISIBLE_DEVICES_ENV} shows none of NVML's GPUs");
                tracing::info!("no GPU health: {why}");
                metrics.gpu.set_status(format!("no GPU ({why})"));
                return;
            }
            let xids = nvml::xid_events(&nvml, &ours);
            let mut previous: Vec<GpuSample> = Vec::new();
            loop {
                let mut samples = nvml::sample(&nvml, &ours);
                // A lost GPU cannot say who it is any more: it is who it was.
                for s in samples.iter_mut().filter(|s| s.uuid.is_empty()) {
                    if let Some(p) = previous.iter().find(|p| p.index == s.index) {
                        s.uuid.clone_from(&p.uuid);
                        s.model.clone_from(&p.model);
                    }
                }
                metrics.gpu.set_status(format!("{} GPU(s)", samples.len()));
                for s in &samples {
                    let before = previous.iter().find(|p| p.uuid == s.uuid);
                    metrics.gpu.record(s, before, &verdict(s, before));
                }
                if let Some(fault) = metrics.gpu.fatal() {
                    stop_rank(&config, fault);
                }
                previous = samples;
                // Between samples, wait on the driver's XID events (or just the period).
                let next = std::time::Instant::now() + config.every;
                while let Some(left) = next.checked_duration_since(std::time::Instant::now()) {
                    let Some(set) = &xids else {
                        std::thread::sleep(left);
                        break;
                    };
                    let Some((index, code)) = nvml::next_xid(set, left) else {
                        continue;
                    };
                    let class = classify_xid(code);
                    let gpu = previous
                        .iter()
                        .find(|s| s.index == index)
                        .cloned()
                        .unwrap_or(GpuSample {
                            index,
                            ..GpuSample::default()
                        });
                    tracing::warn!(gpu = index, uuid = %gpu.uuid, xid = code, ?class, "XID error");
                    metrics.gpu.record_xid(&gpu, code, class);
                    if let Some(fault) = metrics.gpu.fatal() {
                        stop_rank(&config, fault);
                    }
                }
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::Visible;

    #[test]
    fn visible_devices_read_as_cuda_reads_them() {
        let all = Visible::parse(None);
        assert!(all.admits(7, "GPU-anything"));
        let some = Visible::parse(Some("1, GPU-5b3e"));
        assert!(some.admits(1, "GPU-0000"));
        assert!(
            some.admits(4, "GPU-5b3e-77aa-0000"),
            "a UUID prefix is enough"
        );
        assert!(!some.admits(0, "GPU-0000"));
        // The list ends at the first entry that is neither an index nor a UUID.
        let cut = Visible::parse(Some("2,MIG-x,3"));
        assert!(cut.admits(2, "") && !cut.admits(3, ""));
        assert!(
            !Visible::parse(Some("")).admits(0, "GPU-0"),
            "empty: no GPU"
        );
    }
}
