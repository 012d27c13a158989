//! Compute backends. The engine only talks to the small [`Backend`] trait so a CUDA backend can
//! slot in later behind a feature without touching the forward pass.

pub mod cpu;

use crate::model::gguf::GgmlType;

/// A weight matrix (rows × cols, row-major, in its ggml encoding) owned by this rank.
#[derive(Debug, Clone)]
pub struct Weight {
    /// Encoding of `data`.
    pub ty: GgmlType,
    /// Output features.
    pub rows: usize,
    /// Input features (contiguous).
    pub cols: usize,
    /// Raw ggml blocks, `rows * row_bytes` long.
    pub data: Vec<u8>,
}

impl Weight {
    /// Bytes of one encoded row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_elems() as usize * self.ty.block_bytes() as usize
    }

    /// The encoded bytes of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Decode row `r` into `out` (length `cols`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        cpu::dequantize_row(self.ty, self.row(r), out);
    }
}

/// The operations the forward pass needs from a device.
pub trait Backend: Send + Sync {
    /// Short name for logs and the bench output.
    fn name(&self) -> &'static str;
    /// Number of worker threads.
    fn threads(&self) -> usize;
    /// `out[t][r] = sum_c w[r][c] * x[t][c]` for `t` in `0..n` (x is `n × cols`, out `n × rows`).
    fn matmul(&self, w: &Weight, x: &[f32], n: usize, out: &mut [f32]);
    /// Run `f(i)` for every `i` in `0..n`, spread over the backend's threads.
    fn parallel_for(&self, n: usize, f: &(dyn Fn(usize) + Sync));
}
