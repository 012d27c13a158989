//! This machine as a pool the planner understands: its GPUs through NVML (libnvidia-ml is
//! loaded at run time, so the binary needs no driver to start), or CPU "slots" when there is no
//! usable GPU.
//!
//! A CPU slot is one worker process's share of the machine: `MemAvailable / slots` of RAM and
//! `cores / slots` of the cores ([`catalog::cpu_slot`] holds the rough per-core figures the
//! estimate uses). There are as many slots as cores, or as many as a fixed
//! `tensorParallel x pipelineParallel` asks for when that is more (the processes then share the
//! cores). The slots' memory adds up to what is free, so a plan that fits the slots fits the
//! machine.

use whaleflux_crds::worker::NVML_LIBRARY_ENV;
use whaleflux_crds::{InterNodeNetwork, IntraNodeLink, PoolNode};

use crate::planner::catalog::{self, CPU_SLOT, GpuSpec};
use crate::planner::{PlanError, Pool};

/// Node name of this machine in local plans.
pub const LOCAL_NODE: &str = "localhost";

/// Which devices `whaleflux run` plans on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// GPUs when NVML finds some the planner knows, CPU slots otherwise.
    #[default]
    Auto,
    /// GPUs through NVML; an error when there are none.
    Gpu,
    /// CPU slots, even where NVML finds GPUs.
    Cpu,
}

/// The devices found and the pool built from them.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalDevices {
    /// One node, [`LOCAL_NODE`], with the GPUs or CPU slots.
    pub pool: Pool,
    /// Devices outside the catalog the pool's node names (the CPU slot), for
    /// [`crate::planner::plan_with_devices`].
    pub devices: Vec<GpuSpec>,
    /// True when planning on CPU slots.
    pub cpu: bool,
    /// The GPUs planned on, in NVML order (none on CPU slots); a plan's ranks take them in
    /// order, stage by stage.
    pub gpus: Vec<LocalGpu>,
    /// One sentence for the log saying what was found and what is planned on.
    pub summary: String,
}

/// One GPU of this machine, as NVML names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalGpu {
    /// NVML's index.
    pub index: u32,
    /// NVML's UUID (`GPU-…`): what workers are given (`CUDA_VISIBLE_DEVICES`) and what a
    /// fault report names.
    pub uuid: String,
}

/// Why planning could not start on this machine's devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// `--devices gpu` and NVML could not give a GPU.
    #[error("--devices gpu: {0}; use --devices cpu (or auto) to plan on CPU slots")]
    NoGpu(String),
    /// A GPU pool could not be described to the planner.
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// GPUs NVML reports (the library `WHALEFLUX_NVML_LIBRARY` names, else the driver's): the
/// `nvidia.com/gpu.product`-style label of the first GPU and the GPUs of that model (a plan
/// uses one model).
fn nvml_gpus() -> Result<(String, Vec<LocalGpu>), String> {
    let nvml = match std::env::var_os(NVML_LIBRARY_ENV).filter(|p| !p.is_empty()) {
        Some(lib) => nvml_wrapper::Nvml::builder().lib_path(&lib).init(),
        None => nvml_wrapper::Nvml::init(),
    }
    .map_err(|e| format!("NVML: {e}"))?;
    let count = nvml
        .device_count()
        .map_err(|e| format!("NVML device count: {e}"))?;
    let mut found = Vec::new();
    for index in 0..count {
        let device = nvml
            .device_by_index(index)
            .map_err(|e| format!("NVML device {index}: {e}"))?;
        let name = device
            .name()
            .map_err(|e| format!("NVML device {index}: {e}"))?;
        let uuid = device
            .uuid()
            .map_err(|e| format!("NVML device {index}: {e}"))?;
        found.push((name, LocalGpu { index, uuid }));
    }
    let Some(first) = found.first().map(|(n, _)| n.clone()) else {
        return Err("NVML: no GPU found".into());
    };
    let same = found
        .into_iter()
        .filter(|(n, _)| *n == first)
        .map(|(_, g)| g)
        .collect();
    Ok((gpu_label(&first), same))
}

/// The label GPU feature discovery gives a GPU whose NVML name is `name`
/// (`NVIDIA H100 80GB HBM3` → `NVIDIA-H100-80GB-HBM3`), which the catalog matches.
pub fn gpu_label(name: &str) -> String {
    name.split_whitespace().collect::<Vec<_>>().join("-")
}

/// Bytes of RAM free for new processes (`MemAvailable` of `/proc/meminfo`), if the text has it.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        kib.checked_mul(1024)
    })
}

/// RAM assumed free when `/proc/meminfo` cannot be read (not Linux).
const ASSUMED_FREE_RAM: u64 = 8 << 30;

/// A pool of `slots` CPU slots over `free_ram` bytes and `cores` cores; `why` says why CPU
/// slots are used (for the summary).
pub fn cpu_pool(slots: u32, cores: u32, free_ram: u64, why: &str) -> LocalDevices {
    let slots = slots.max(1);
    let cores = cores.max(1);
    let per_slot = free_ram / u64::from(slots);
    let spec = catalog::cpu_slot(per_slot, f64::from(cores) / f64::from(slots));
    let sharing = if slots > cores {
        format!("{slots} processes share {cores} cores")
    } else {
        format!("{} core(s) each", cores / slots)
    };
    let summary = format!(
        "{why}; planning on {slots} CPU slots of {:.2} GiB ({sharing}; {:.2} GiB of RAM free)",
        per_slot as f64 / (1u64 << 30) as f64,
        free_ram as f64 / (1u64 << 30) as f64,
    );
    let slots_i = i32::try_from(slots).unwrap_or(i32::MAX);
    LocalDevices {
        pool: Pool {
            nodes: vec![PoolNode {
                name: LOCAL_NODE.into(),
                gpu_model: CPU_SLOT.into(),
                gpu_count: slots_i,
                allocatable: slots_i,
                nvlink_domain: None,
                ready: true,
                quarantined_until: None,
                reason: None,
            }],
            gpu_override: None,
            intra_node: IntraNodeLink::PCIe,
            network: InterNodeNetwork::Ethernet,
            network_gbps: f64::from(InterNodeNetwork::Ethernet.default_gbps()),
        },
        devices: vec![spec],
        cpu: true,
        gpus: Vec::new(),
        summary,
    }
}

/// A pool of `gpus`, of catalog model `label`, on this machine.
pub fn gpu_pool(label: &str, gpus: Vec<LocalGpu>) -> Result<LocalDevices, PlanError> {
    let gpu = catalog::lookup(label)?;
    let count = gpus.len();
    let mut pool = Pool::from_gpus_spec(
        &format!("1x{count}x{}", gpu.short_name),
        InterNodeNetwork::Ethernet,
    )?;
    for n in &mut pool.nodes {
        n.name = LOCAL_NODE.into();
    }
    Ok(LocalDevices {
        pool,
        devices: Vec::new(),
        cpu: false,
        gpus,
        summary: format!(
            "NVML found {count} {} GPU(s) ({label}); planning on them",
            gpu.short_name
        ),
    })
}

impl LocalDevices {
    /// The same GPUs without the one with `uuid` (it failed), as a pool to plan on again. With
    /// none left the pool is empty of GPUs and `gpus` says so.
    pub fn without_gpu(&self, uuid: &str) -> Result<LocalDevices, PlanError> {
        let gpus: Vec<LocalGpu> = self
            .gpus
            .iter()
            .filter(|g| g.uuid != uuid)
            .cloned()
            .collect();
        let model = self.pool.nodes.first().map_or("", |n| n.gpu_model.as_str());
        if gpus.is_empty() {
            let mut none = self.clone();
            none.gpus.clear();
            for n in &mut none.pool.nodes {
                n.gpu_count = 0;
                n.allocatable = 0;
            }
            none.summary = format!("no GPU remains ({uuid} failed)");
            return Ok(none);
        }
        let mut less = gpu_pool(model, gpus)?;
        less.summary = format!(
            "{} {model} GPU(s) remain ({uuid} failed); planning on them",
            less.gpus.len()
        );
        Ok(less)
    }
}

/// This machine's devices for `choice`. `wanted` is the number of processes a fixed
/// parallelism asks for (1 when the planner chooses), so CPU slots are never fewer.
pub fn detect(choice: DeviceChoice, wanted: u32) -> Result<LocalDevices, DeviceError> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let (free_ram, ram_note) = match std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| mem_available(&t))
    {
        Some(b) => (b, ""),
        None => (
            ASSUMED_FREE_RAM,
            " (cannot read MemAvailable from /proc/meminfo; 8 GiB assumed)",
        ),
    };
    let slots = cores.max(wanted);
    let cpu = |why: String| {
        let mut d = cpu_pool(slots, cores, free_ram, &why);
        d.summary.push_str(ram_note);
        d
    };
    match choice {
        DeviceChoice::Cpu => Ok(cpu("--devices cpu".into())),
        DeviceChoice::Gpu => {
            let (label, gpus) = nvml_gpus().map_err(DeviceError::NoGpu)?;
            Ok(gpu_pool(&label, gpus)?)
        }
        DeviceChoice::Auto => match nvml_gpus() {
            Err(why) => Ok(cpu(format!("no GPU found ({why})"))),
            Ok((label, gpus)) => {
                let count = gpus.len();
                match gpu_pool(&label, gpus) {
                    Ok(d) => Ok(d),
                    Err(_) => Ok(cpu(format!(
                        "NVML found {count} {label} GPU(s), a model the planner's catalog does not know"
                    ))),
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::models::preset;
    use crate::planner::{PlanRequest, Settings, plan_with_devices};
    use k8s_openapi::jiff::Timestamp;
    use whaleflux_crds::{Objective, WeightDtype};

    fn smollm2(tp: Option<u32>, pp: Option<u32>) -> PlanRequest {
        PlanRequest {
            model: preset("smollm2-135m").expect("preset"),
            dtype: WeightDtype::Q4_1,
            max_context: 2048,
            max_sequences: 8,
            replicas: 1,
            tensor_parallel: tp,
            pipeline_parallel: pp,
            objective: Objective::MinGpus,
            settings: Settings::default(),
        }
    }

    #[test]
    fn meminfo_and_gpu_labels_parse() {
        let text = "MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   20971520 kB\n";
        assert_eq!(mem_available(text), Some(20 << 30));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots kB\n"), None);
        assert_eq!(gpu_label("NVIDIA H100 80GB HBM3"), "NVIDIA-H100-80GB-HBM3");
        assert!(catalog::lookup(&gpu_label("NVIDIA H100 80GB HBM3")).is_ok());
    }

    #[test]
    fn cpu_slots_plan_the_sharded_smollm2_and_one_slot_when_free_to_choose() {
        let d = cpu_pool(6, 2, 12 << 30, "no GPU found (NVML: test)");
        assert!(
            d.summary.contains("6 CPU slots of 2.00 GiB"),
            "{}",
            d.summary
        );
        assert!(
            d.summary.contains("6 processes share 2 cores"),
            "{}",
            d.summary
        );
        let now = Timestamp::UNIX_EPOCH;
        let plan =
            plan_with_devices(&smollm2(Some(3), Some(2)), &d.pool, &d.devices, now).expect("plan");
        assert_eq!((plan.tensor_parallel, plan.pipeline_parallel), (3, 2));
        assert_eq!(plan.gpu_model, CPU_SLOT);
        assert_eq!(plan.stages.len(), 2);
        assert!(plan.stages.iter().all(|s| s.node == LOCAL_NODE));
        // Left to choose, the planner takes the fewest slots that fit.
        let plan = plan_with_devices(&smollm2(None, None), &d.pool, &d.devices, now).expect("plan");
        assert_eq!((plan.tensor_parallel, plan.pipeline_parallel), (1, 1));
        // Without the slot device the catalog does not know "CPU".
        assert!(crate::planner::plan(&smollm2(None, None), &d.pool, now).is_err());
    }

    #[test]
    fn slots_too_small_for_the_model_are_the_planners_no_fit() {
        // 6 slots over 3 GiB: 0.5 GiB each, less than the 1 GiB runtime overhead per process.
        let d = cpu_pool(6, 2, 3 << 30, "test");
        let err = plan_with_devices(
            &smollm2(Some(3), Some(2)),
            &d.pool,
            &d.devices,
            Timestamp::UNIX_EPOCH,
        )
        .expect_err("does not fit");
        assert!(err.is_infeasible());
        assert!(err.to_string().contains("CPU"), "{err}");
    }

    #[test]
    fn gpu_pool_is_one_local_node_of_catalog_gpus() {
        let gpu = |index: u32| LocalGpu {
            index,
            uuid: format!("GPU-{index}"),
        };
        let d = gpu_pool("NVIDIA-H100-80GB-HBM3", vec![gpu(1)]).expect("pool");
        assert!(!d.cpu && d.devices.is_empty());
        assert_eq!(d.pool.nodes.len(), 1);
        assert_eq!(d.pool.nodes[0].name, LOCAL_NODE);
        assert_eq!(d.pool.nodes[0].gpu_count, 1);
        assert_eq!(d.gpus, vec![gpu(1)]);
        assert!(gpu_pool("NVIDIA-B999", vec![gpu(0)]).is_err());

        // A failed GPU leaves the pool; the others keep their order.
        let d = gpu_pool("NVIDIA-H100-80GB-HBM3", vec![gpu(0), gpu(1), gpu(2)]).expect("pool");
        let less = d.without_gpu("GPU-1").expect("pool");
        assert_eq!(less.gpus, vec![gpu(0), gpu(2)]);
        assert_eq!(less.pool.nodes[0].gpu_count, 2);
        let none = less
            .without_gpu("GPU-0")
            .and_then(|d| d.without_gpu("GPU-2"))
            .expect("pool");
        assert!(none.gpus.is_empty());
        assert_eq!(none.pool.nodes[0].gpu_count, 0);
    }
}
