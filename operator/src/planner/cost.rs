//! Cost model of one decode step. It is a roofline estimate, not a measurement: each stage takes
//! the longer of reading its bytes from HBM and doing its FLOPs (at the fractions of the
//! datasheet figures real kernels reach), plus a fixed cost per layer and two all-reduces per
//! layer over its tensor-parallel link; stages hand activations to the next over their link; with
//! pipeline parallelism the batch is split into micro-batches that keep the stages busy.

use whaleflux_crds::{InterNodeNetwork, WeightDtype};

use super::Model;
use super::catalog::GpuSpec;
use super::legality::kv_heads_per_rank;
use super::memory::{StageShape, stage_weights};

/// Fraction of the datasheet HBM bandwidth that decode kernels achieve: gpt-fast measures
/// 1,397 GB/s on an A100-80GB (69 % of 2,039 GB/s), vLLM's batch-1 decode reaches about 77 % of
/// the ceiling (`tests/cost_vs_published.rs` lists the sources).
pub const HBM_EFFICIENCY: f64 = 0.75;
/// Fraction of the dense BF16 tensor rate that batched decode GEMMs achieve: TensorRT-LLM's
/// 70B at batch 512 on 8 A100s runs at about half the rate the datasheet allows.
pub const COMPUTE_EFFICIENCY: f64 = 0.5;
/// Fixed time per transformer layer per step: a layer is some ten kernels, and even under CUDA
/// graphs each launch and the gap after it costs a couple of microseconds.
pub const LAYER_OVERHEAD_S: f64 = 20e-6;

/// A link the cost model sends bytes over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Bandwidth in one direction, GB/s.
    pub gbytes_per_s: f64,
    /// Fixed cost of one transfer or collective, seconds.
    pub latency_s: f64,
}

impl Link {
    /// NVLink of a GPU: half the datasheet's two-way figure.
    pub fn nvlink(gpu: &GpuSpec) -> Self {
        Self {
            gbytes_per_s: gpu.nvlink_gbps / 2.0,
            latency_s: 8e-6,
        }
    }

    /// PCIe of a GPU: half the datasheet's two-way figure.
    pub fn pcie(gpu: &GpuSpec) -> Self {
        Self {
            gbytes_per_s: gpu.pcie_gbps / 2.0,
            latency_s: 20e-6,
        }
    }

    /// The network between nodes at `gbps` Gbit/s.
    pub fn network(net: InterNodeNetwork, gbps: f64) -> Self {
        let latency_s = match net {
            InterNodeNetwork::InfiniBand => 15e-6,
            InterNodeNetwork::RoCE => 20e-6,
            InterNodeNetwork::Ethernet => 60e-6,
        };
        Self {
            gbytes_per_s: gbps / 8.0,
            latency_s,
        }
    }

    /// Seconds to move `bytes` point to point.
    pub fn send_s(&self, bytes: f64) -> f64 {
        self.latency_s + bytes / (self.gbytes_per_s * 1e9)
    }

    /// Seconds of a ring all-reduce of `bytes` over `ranks`.
    pub fn all_reduce_s(&self, bytes: f64, ranks: u32) -> f64 {
        if ranks <= 1 {
            return 0.0;
        }
        let r = f64::from(ranks);
        self.latency_s + 2.0 * (r - 1.0) / r * bytes / (self.gbytes_per_s * 1e9)
    }
}

/// What the cost model needs to know about the whole request.
#[derive(Debug, Clone, Copy)]
pub struct CostInputs<'a> {
    /// Model shape.
    pub model: &'a Model,
    /// Weight storage type.
    pub dtype: WeightDtype,
    /// GPU of every stage.
    pub gpu: &'a GpuSpec,
    /// Bytes per KV-cache element.
    pub kv_bytes: u64,
    /// Max context; sequences are assumed half full on average.
    pub max_context: u64,
    /// Sequences decoded together.
    pub batch: u64,
}

/// Seconds one stage takes for one decode step of `batch` sequences, its tensor-parallel
/// all-reduces running over `tp_link`.
pub fn stage_step_s(c: &CostInputs<'_>, s: StageShape, batch: u64, tp_link: Link) -> f64 {
    let m = c.model;
    let w = stage_weights(m, c.dtype, s);
    let avg_ctx = (c.max_context as f64 / 2.0).max(1.0);
    let b = batch as f64;
    let hd = m.head_dim() as f64;
    let layers = f64::from(s.layers);
    // Decode reads every layer and head weight once per step, and the KV cache of every
    // sequence; the embedding is a lookup of `batch` rows.
    let kv_read =
        2.0 * layers * f64::from(kv_heads_per_rank(m, s.tp)) * hd * c.kv_bytes as f64 * avg_ctx * b;
    let bytes = w.layers + w.head + kv_read;
    let t_mem = bytes / (c.gpu.hbm_gbps * 1e9 * HBM_EFFICIENCY);
    let params = (w.layers + w.head) / c.dtype.bytes_per_param();
    let q_heads = f64::from(m.heads / s.tp);
    let flops = 2.0 * params * b + 4.0 * layers * q_heads * hd * avg_ctx * b;
    let t_compute = flops / (c.gpu.bf16_tflops * 1e12 * COMPUTE_EFFICIENCY);
    let activation = b * m.hidden as f64 * 2.0;
    let t_comm = 2.0 * layers * tp_link.all_reduce_s(activation, s.tp);
    t_mem.max(t_compute) + t_comm + layers * LAYER_OVERHEAD_S
}

/// Micro-batches a pipeline of `pp` stages splits a batch into, and their size.
pub fn micro_batches(pp: u32, batch: u64) -> (u64, u64) {
    let micro = u64::from(pp).min(batch).max(1);
    (micro, batch.div_ceil(micro))
}

/// Estimated period between two tokens of one sequence, in seconds, for a pipeline whose stages
/// take `stage_s` seconds per micro-batch and whose hand-offs take `handoff_s`: the longer of the
/// busiest stage doing all `micro` micro-batches and one micro-batch travelling through the
/// whole pipeline.
pub fn pipeline_period_s(micro: u64, stage_s: &[f64], handoff_s: &[f64]) -> f64 {
    let busiest = stage_s.iter().copied().fold(0.0, f64::max);
    let travel: f64 = stage_s.iter().sum::<f64>() + handoff_s.iter().sum::<f64>();
    (micro as f64 * busiest).max(travel)
}

/// Bytes a stage hands to the next per micro-batch of `mb` sequences (bf16 hidden states).
pub fn handoff_bytes(model: &Model, mb: u64) -> f64 {
    mb as f64 * model.hidden as f64 * 2.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::catalog::lookup;
    use crate::planner::models::{preset, tiny};

    #[test]
    fn decode_of_a_big_model_is_memory_bound_and_tp_speeds_it_up() {
        let m = preset("llama-3.1-70b").expect("preset");
        let gpu = lookup("H100").expect("gpu");
        let c = CostInputs {
            model: &m,
            dtype: WeightDtype::Bf16,
            gpu,
            kv_bytes: 2,
            max_context: 4096,
            batch: 1,
        };
        let shape = |tp| StageShape {
            tp,
            pp: 1,
            layers: 80,
            first: true,
            last: true,
        };
        let t1 = stage_step_s(&c, shape(1), 1, Link::nvlink(gpu));
        // ~141 GB at 75 % of 3.35 TB/s = ~56 ms, and 80 layers x 20 us.
        assert!((t1 * 1e3 - 57.8).abs() < 3.0, "{}", t1 * 1e3);
        let t8 = stage_step_s(&c, shape(8), 1, Link::nvlink(gpu));
        assert!(t8 < t1 / 5.0 && t8 > t1 / 8.0, "{t1} {t8}");
        // The same split over PCIe pays more for its all-reduces.
        assert!(stage_step_s(&c, shape(8), 1, Link::pcie(gpu)) > t8);
        // Two stages with two micro-batches: the busiest stage bounds the period.
        assert_eq!(micro_batches(2, 16), (2, 8));
        assert_eq!(pipeline_period_s(2, &[1.0, 1.0], &[0.5]), 2.5);
        assert_eq!(pipeline_period_s(4, &[1.0, 1.0], &[0.5]), 4.0);
    }

    fn gpu(hbm_gbps: f64, bf16_tflops: f64) -> GpuSpec {
        GpuSpec {
            short_name: "test",
            memory_gib: 1.0,
            hbm_gbps,
            bf16_tflops,
            nvlink_gbps: 900.0,
            pcie_gbps: 128.0,
            labels: &[],
        }
    }

    fn close(got: f64, want: f64) -> bool {
        (got - want).abs() <= want.abs() * 1e-9
    }

    #[test]
    fn a_decode_step_costs_what_the_roofline_says_by_hand() {
        // TP 2, both layers, first and last stage, bf16, 3 sequences, context 1000 (500 average).
        // Weights per rank: a layer is 2·64·2·16 (Q, O) + 2·64·1·16 (K, V) + 3·64·48 (MLP) + 2·64
        // (norms) = 15,488 params, 61,952 bytes for two; the head is 100·64/2 + 64 params = 6,528
        // bytes. KV read: 2 · 2 layers · 1 head · 16 · 2 bytes · 500 · 3 = 192,000 bytes.
        // FLOPs: 2 · 34,240 params · 3 + 4 · 2 layers · 2 heads · 16 · 500 · 3 = 589,440.
        // All-reduce of 3 · 64 · 2 = 384 bytes over two ranks: 1 ms + 384 B / 1 GB/s, twice per layer.
        // Kernels reach 75 % of the bandwidth and 50 % of the FLOPs; each layer costs 20 us more.
        let m = tiny(false);
        let shape = StageShape {
            tp: 2,
            pp: 1,
            layers: 2,
            first: true,
            last: true,
        };
        let link = Link {
            gbytes_per_s: 1.0,
            latency_s: 1e-3,
        };
        let comm = 4.0 * (1e-3 + 384.0 / 1e9) + 2.0 * 20e-6;
        for (gpu, want) in [
            // 1 GB/s and 1 TFLOPS: reading 260,480 bytes bounds the step.
            (gpu(1.0, 1.0), 260_480.0 / 0.75e9 + comm),
            // 1 TB/s and 1 MFLOPS: the FLOPs do.
            (gpu(1000.0, 1e-6), 589_440.0 / 0.5e6 + comm),
        ] {
            let c = CostInputs {
                model: &m,
                dtype: WeightDtype::Bf16,
                gpu: &gpu,
                kv_bytes: 2,
                max_context: 1000,
                batch: 3,
            };
            let got = stage_step_s(&c, shape, 3, link);
            assert!(close(got, want), "{got} vs {want}");
        }
        assert_eq!(handoff_bytes(&m, 3), 384.0);
    }

    #[test]
    fn links_micro_batches_and_the_pipeline_period_by_hand() {
        let g = gpu(1.0, 1.0);
        assert_eq!(
            Link::nvlink(&g),
            Link {
                gbytes_per_s: 450.0,
                latency_s: 8e-6
            }
        );
        assert_eq!(
            Link::pcie(&g),
            Link {
                gbytes_per_s: 64.0,
                latency_s: 20e-6
            }
        );
        for (net, latency_s) in [
            (InterNodeNetwork::InfiniBand, 15e-6),
            (InterNodeNetwork::RoCE, 20e-6),
            (InterNodeNetwork::Ethernet, 60e-6),
        ] {
            assert_eq!(
                Link::network(net, 400.0),
                Link {
                    gbytes_per_s: 50.0,
                    latency_s
                }
            );
        }
        let ib = Link::network(InterNodeNetwork::InfiniBand, 400.0);
        assert!(close(ib.send_s(1e9), 15e-6 + 0.02));
        let plain = Link {
            gbytes_per_s: 1.0,
            latency_s: 1e-3,
        };
        // A ring all-reduce moves 2 (r - 1) / r of the bytes: 1.5 GB over 4 ranks.
        assert!(close(plain.all_reduce_s(1e9, 4), 1e-3 + 1.5));
        assert_eq!(micro_batches(3, 2), (2, 1));
        assert_eq!(micro_batches(4, 10), (4, 3));
        assert_eq!(micro_batches(2, 0), (1, 0));
        assert_eq!(pipeline_period_s(3, &[1.0, 2.0, 0.5], &[0.25, 0.25]), 6.0);
        assert_eq!(pipeline_period_s(1, &[1.0, 2.0, 0.5], &[0.25, 0.25]), 4.0);
    }

    #[test]
    fn all_reduce_of_one_rank_is_free() {
        let l = Link::network(InterNodeNetwork::Ethernet, 25.0);
        assert_eq!(l.all_reduce_s(1e6, 1), 0.0);
        assert!(l.all_reduce_s(1e6, 2) > l.send_s(1e6) - 1e-9);
    }
}
