//! GPU catalog: the datasheet figures the memory check and the cost model use, and the
//! `nvidia.com/gpu.product` label values (GPU feature discovery) that map a node to an entry.
//!
//! Memory is the datasheet capacity read as GiB (what `nvidia-smi` shows, less a few hundred MiB
//! the driver keeps; the planner's usable fraction covers that). Bandwidths are the datasheet's
//! aggregate (both directions) figures in GB/s; the cost model halves them for one direction.
//! TFLOPS are dense (no sparsity) BF16 tensor-core figures.

use super::PlanError;

/// One GPU model and the figures the planner needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuSpec {
    /// Catalog short name used in plans and `--gpus` (e.g. `H100`).
    pub short_name: &'static str,
    /// Memory per GPU in GiB.
    pub memory_gib: f64,
    /// HBM/GDDR bandwidth in GB/s.
    pub hbm_gbps: f64,
    /// Dense BF16 tensor-core TFLOPS.
    pub bf16_tflops: f64,
    /// NVLink bandwidth per GPU in GB/s (both directions); 0 when the part has no NVLink switch.
    pub nvlink_gbps: f64,
    /// Host PCIe bandwidth in GB/s (both directions).
    pub pcie_gbps: f64,
    /// `nvidia.com/gpu.product` label values this entry matches.
    pub labels: &'static [&'static str],
}

impl GpuSpec {
    /// Memory per GPU in bytes.
    pub fn memory_bytes(&self) -> u64 {
        (self.memory_gib * (1u64 << 30) as f64) as u64
    }

    /// Whether a node's device label names this entry: its short name or one of its labels,
    /// ignoring ASCII case and surrounding space.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.trim();
        self.short_name.eq_ignore_ascii_case(name)
            || self.labels.iter().any(|l| l.eq_ignore_ascii_case(name))
    }
}

/// Device label of a CPU slot (see [`cpu_slot`]).
pub const CPU_SLOT: &str = "CPU";

/// Rough DRAM bandwidth one core streams, GB/s. A desktop or server core reads 10-20 GB/s
/// from memory; the worker's decode on this project's 2-core CI machine reads the SmolLM2
/// weights at about 9.7 GB/s in all (113 tokens/s x 84 MB), so the low end is used.
const CPU_CORE_MEMORY_GBPS: f64 = 5.0;
/// Rough compute of one core in TFLOPS for the worker's quantized kernels: prefill of
/// ~300 tokens/s on 2 cores x 2 x 135 M parameters is ~40 GFLOPS per core.
const CPU_CORE_TFLOPS: f64 = 0.04;
/// Link between processes on one host (loopback TCP), both directions, GB/s: the cost model
/// halves it to ~8 GB/s one way and adds the PCIe latency (20 us), about what loopback TCP
/// between two processes does.
const CPU_LOOPBACK_GBPS: f64 = 16.0;

/// A CPU "slot": one local worker process's share of a machine without a usable GPU, as a
/// device the planner understands, so `whaleflux run` plans CPU processes with the same code
/// as GPU pods. Memory is `memory_bytes` (the caller's share of RAM for one process); memory
/// bandwidth and compute scale with `cores` (the cores the slot gets, possibly a fraction when
/// processes outnumber cores) from rough per-core figures above; slots talk over loopback,
/// modelled as the intra-node (PCIe-like) link. The planner's estimate for slots is as rough
/// as these figures.
pub fn cpu_slot(memory_bytes: u64, cores: f64) -> GpuSpec {
    let cores = if cores.is_finite() && cores > 0.0 {
        cores
    } else {
        1.0
    };
    GpuSpec {
        short_name: CPU_SLOT,
        memory_gib: memory_bytes as f64 / (1u64 << 30) as f64,
        hbm_gbps: CPU_CORE_MEMORY_GBPS * cores,
        bf16_tflops: CPU_CORE_TFLOPS * cores,
        nvlink_gbps: 0.0,
        pcie_gbps: CPU_LOOPBACK_GBPS,
        labels: &["cpu"],
    }
}

/// Every GPU the planner knows, in a fixed order (the order ties are broken in).
pub const CATALOG: &[GpuSpec] = &[
    // NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100, H100 SXM column):
    // 80 GB HBM3, 3.35 TB/s, BF16 1,979 TFLOPS with sparsity = 989 dense, NVLink 900 GB/s,
    // PCIe Gen5 128 GB/s.
    GpuSpec {
        short_name: "H100",
        memory_gib: 80.0,
        hbm_gbps: 3350.0,
        bf16_tflops: 989.0,
        nvlink_gbps: 900.0,
        pcie_gbps: 128.0,
        labels: &["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-SXM5-80GB"],
    },
    // NVIDIA H100 Tensor Core GPU datasheet (H100 PCIe column): 80 GB HBM2e, 2 TB/s, BF16 1,513
    // TFLOPS with sparsity = 756 dense, PCIe Gen5 128 GB/s. Its NVLink bridge joins pairs of
    // cards only, so the planner treats it as a PCIe part (NVLink 0).
    GpuSpec {
        short_name: "H100-PCIe",
        memory_gib: 80.0,
        hbm_gbps: 2000.0,
        bf16_tflops: 756.0,
        nvlink_gbps: 0.0,
        pcie_gbps: 128.0,
        labels: &["NVIDIA-H100-PCIe", "NVIDIA-H100-80GB-PCIe"],
    },
    // NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200, H200 SXM
    // column): 141 GB HBM3e, 4.8 TB/s, BF16 1,979 TFLOPS with sparsity = 989 dense, NVLink
    // 900 GB/s, PCIe Gen5 128 GB/s.
    GpuSpec {
        short_name: "H200",
        memory_gib: 141.0,
        hbm_gbps: 4800.0,
        bf16_tflops: 989.0,
        nvlink_gbps: 900.0,
        pcie_gbps: 128.0,
        labels: &["NVIDIA-H200", "NVIDIA-H200-141GB-HBM3e"],
    },
    // NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100, A100 80GB SXM
    // column): 80 GB HBM2e, 2,039 GB/s, BF16 312 TFLOPS dense, NVLink 600 GB/s, PCIe Gen4
    // 64 GB/s.
    GpuSpec {
        short_name: "A100-80GB",
        memory_gib: 80.0,
        hbm_gbps: 2039.0,
        bf16_tflops: 312.0,
        nvlink_gbps: 600.0,
        pcie_gbps: 64.0,
        labels: &["NVIDIA-A100-SXM4-80GB"],
    },
    // A100 datasheet, A100 80GB PCIe column: 80 GB HBM2e, 1,935 GB/s, BF16 312 TFLOPS dense,
    // PCIe Gen4 64 GB/s; NVLink bridge joins pairs only (treated as none).
    GpuSpec {
        short_name: "A100-80GB-PCIe",
        memory_gib: 80.0,
        hbm_gbps: 1935.0,
        bf16_tflops: 312.0,
        nvlink_gbps: 0.0,
        pcie_gbps: 64.0,
        labels: &["NVIDIA-A100-80GB-PCIe"],
    },
    // A100 datasheet (40GB SXM, original A100 launch datasheet): 40 GB HBM2, 1,555 GB/s, BF16
    // 312 TFLOPS dense, NVLink 600 GB/s, PCIe Gen4 64 GB/s.
    GpuSpec {
        short_name: "A100-40GB",
        memory_gib: 40.0,
        hbm_gbps: 1555.0,
        bf16_tflops: 312.0,
        nvlink_gbps: 600.0,
        pcie_gbps: 64.0,
        labels: &["NVIDIA-A100-SXM4-40GB"],
    },
    // A100 datasheet, A100 40GB PCIe: 40 GB HBM2, 1,555 GB/s, BF16 312 TFLOPS dense, PCIe Gen4
    // 64 GB/s; NVLink bridge pairs only (treated as none).
    GpuSpec {
        short_name: "A100-40GB-PCIe",
        memory_gib: 40.0,
        hbm_gbps: 1555.0,
        bf16_tflops: 312.0,
        nvlink_gbps: 0.0,
        pcie_gbps: 64.0,
        labels: &["NVIDIA-A100-PCIE-40GB"],
    },
    // NVIDIA Ada Lovelace GPU architecture whitepaper, appendix table for GeForce RTX 4090:
    // 24 GB GDDR6X, 1,008 GB/s, FP16/BF16 tensor TFLOPS with FP32 accumulate 165.2 dense;
    // no NVLink; PCIe Gen4 x16 (64 GB/s both directions).
    GpuSpec {
        short_name: "RTX4090",
        memory_gib: 24.0,
        hbm_gbps: 1008.0,
        bf16_tflops: 165.2,
        nvlink_gbps: 0.0,
        pcie_gbps: 64.0,
        labels: &["NVIDIA-GeForce-RTX-4090"],
    },
    // NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s): 48 GB GDDR6, 864 GB/s, BF16
    // 733 TFLOPS with sparsity = 362.05 dense; no NVLink; PCIe Gen4 x16 64 GB/s.
    GpuSpec {
        short_name: "L40S",
        memory_gib: 48.0,
        hbm_gbps: 864.0,
        bf16_tflops: 362.05,
        nvlink_gbps: 0.0,
        pcie_gbps: 64.0,
        labels: &["NVIDIA-L40S"],
    },
    // NVIDIA H100 datasheet, H100 NVL column (nvidia.com/en-us/data-center/h100): 94 GB HBM3,
    // 3.9 TB/s, BF16 1,671 TFLOPS with sparsity = 835.5 dense, PCIe Gen5 128 GB/s. Its NVLink
    // bridge (600 GB/s) joins pairs of cards only, so it counts as a PCIe part, like H100 PCIe.
    GpuSpec {
        short_name: "H100-NVL",
        memory_gib: 94.0,
        hbm_gbps: 3900.0,
        bf16_tflops: 835.5,
        nvlink_gbps: 0.0,
        pcie_gbps: 128.0,
        labels: &["NVIDIA-H100-NVL"],
    },
    // NVIDIA H20 (HGX H20; NVIDIA publishes no public datasheet, figures as given to OEMs and
    // reported at launch, e.g. tweaktown.com/news/95224): 96 GB HBM3, 4.0 TB/s, BF16 148
    // TFLOPS dense, NVLink 900 GB/s, PCIe Gen5 128 GB/s.
    GpuSpec {
        short_name: "H20",
        memory_gib: 96.0,
        hbm_gbps: 4000.0,
        bf16_tflops: 148.0,
        nvlink_gbps: 900.0,
        pcie_gbps: 128.0,
        labels: &["NVIDIA-H20"],
    },
    // NVIDIA L4 datasheet (nvidia.com/en-us/data-center/l4): 24 GB GDDR6, 300 GB/s, BF16 242
    // TFLOPS with sparsity = 121 dense; no NVLink; PCIe Gen4 x16 64 GB/s.
    GpuSpec {
        short_name: "L4",
        memory_gib: 24.0,
        hbm_gbps: 300.0,
        bf16_tflops: 121.0,
        nvlink_gbps: 0.0,
        pcie_gbps: 64.0,
        labels: &["NVIDIA-L4"],
    },
    // NVIDIA A10G (AWS G5 instances; aws.amazon.com/ec2/instance-types/g5): 24 GB GDDR6,
    // 600 GB/s; NVIDIA publishes no tensor figure for it, ~70 TFLOPS BF16 dense as measured
    // and reported by Baseten (baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference); no
    // NVLink; PCIe Gen4 x16 64 GB/s.
    GpuSpec {
        short_name: "A10G",
        memory_gib: 24.0,
        hbm_gbps: 600.0,
        bf16_tflops: 70.0,
        nvlink_gbps: 0.0,
        pcie_gbps: 64.0,
        labels: &["NVIDIA-A10G"],
    },
    // NVIDIA DGX B200 / HGX B200 datasheet (nvidia.com/en-us/data-center/hgx): 180 GB HBM3e per
    // GPU (1,440 GB over 8), 8 TB/s, BF16 4.5 PFLOPS with sparsity = 2,250 dense, NVLink 5
    // 1,800 GB/s, PCIe Gen5 128 GB/s.
    GpuSpec {
        short_name: "B200",
        memory_gib: 180.0,
        hbm_gbps: 8000.0,
        bf16_tflops: 2250.0,
        nvlink_gbps: 1800.0,
        pcie_gbps: 128.0,
        labels: &["NVIDIA-B200"],
    },
];

/// Finds the catalog entry for a short name or a `nvidia.com/gpu.product` label (exact match,
/// ignoring ASCII case), so both GPU feature discovery labels and pool overrides work.
pub fn lookup(name: &str) -> Result<&'static GpuSpec, PlanError> {
    CATALOG
        .iter()
        .find(|g| g.matches(name))
        .ok_or_else(|| PlanError::UnknownGpu {
            label: name.trim().to_string(),
            known: short_names().join(", "),
        })
}

/// The catalog's short names, for error messages and help.
pub fn short_names() -> Vec<&'static str> {
    CATALOG.iter().map(|g| g.short_name).collect()
}

/// Position of an entry in the catalog, for deterministic ordering.
pub fn index_of(gpu: &GpuSpec) -> usize {
    CATALOG
        .iter()
        .position(|g| g.short_name == gpu.short_name)
        .unwrap_or(CATALOG.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_short_names_resolve() {
        for (name, short) in [
            ("NVIDIA-H100-80GB-HBM3", "H100"),
            ("NVIDIA-H100-PCIe", "H100-PCIe"),
            ("NVIDIA-H200", "H200"),
            ("NVIDIA-A100-SXM4-80GB", "A100-80GB"),
            ("NVIDIA-A100-SXM4-40GB", "A100-40GB"),
            ("NVIDIA-A100-PCIE-40GB", "A100-40GB-PCIe"),
            ("NVIDIA-A100-80GB-PCIe", "A100-80GB-PCIe"),
            ("NVIDIA-GeForce-RTX-4090", "RTX4090"),
            ("NVIDIA-L40S", "L40S"),
            ("NVIDIA-H100-NVL", "H100-NVL"),
            ("NVIDIA-H20", "H20"),
            ("NVIDIA-L4", "L4"),
            ("NVIDIA-A10G", "A10G"),
            ("NVIDIA-B200", "B200"),
            ("h100", "H100"),
            ("RTX4090", "RTX4090"),
            ("A100-80GB", "A100-80GB"),
        ] {
            assert_eq!(lookup(name).map(|g| g.short_name), Ok(short), "{name}");
        }
    }

    #[test]
    fn unknown_label_names_it_and_the_override() {
        let err = lookup("NVIDIA-B300").unwrap_err().to_string();
        assert!(err.contains("NVIDIA-B300"), "{err}");
        assert!(err.contains("spec.gpu.model"), "{err}");
        let known = short_names().join(", ");
        assert!(known.starts_with("H100, H100-PCIe, H200"), "{known}");
        assert!(err.contains(&known), "{err}");
    }

    #[test]
    fn catalog_order_breaks_ties_and_slots_come_last() {
        for (i, g) in CATALOG.iter().enumerate() {
            assert_eq!(index_of(g), i, "{}", g.short_name);
        }
        assert_eq!(index_of(&cpu_slot(1 << 30, 1.0)), CATALOG.len());
    }

    #[test]
    fn cpu_slot_scales_with_cores_and_is_not_in_the_catalog() {
        let one = cpu_slot(4 << 30, 1.0);
        let two = cpu_slot(4 << 30, 2.0);
        assert_eq!(one.memory_bytes(), 4 << 30);
        assert!((two.hbm_gbps - 2.0 * one.hbm_gbps).abs() < 1e-9);
        assert!((two.bf16_tflops - 2.0 * one.bf16_tflops).abs() < 1e-9);
        assert_eq!(one.nvlink_gbps, 0.0);
        assert!(one.matches("cpu") && one.matches(CPU_SLOT));
        // Oversubscribed slots get a fraction of a core; nonsense falls back to one core.
        assert!(cpu_slot(1 << 30, 0.5).hbm_gbps < one.hbm_gbps);
        for nonsense in [f64::NAN, f64::INFINITY, 0.0, -2.0] {
            assert_eq!(
                cpu_slot(1 << 30, nonsense).hbm_gbps,
                one.hbm_gbps,
                "{nonsense}"
            );
        }
        assert!(lookup("CPU").is_err());
    }

    #[test]
    fn sxm_parts_have_nvlink_and_pcie_parts_do_not() {
        for g in CATALOG {
            let sxm = matches!(
                g.short_name,
                "H100" | "H200" | "H20" | "B200" | "A100-80GB" | "A100-40GB"
            );
            assert_eq!(g.nvlink_gbps > 0.0, sxm, "{}", g.short_name);
            assert!(g.memory_gib > 0.0 && g.hbm_gbps > 0.0 && g.bf16_tflops > 0.0);
        }
    }
}
