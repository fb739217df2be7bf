//! The shared building blocks: norms, rotary embeddings, linear projections.

#[cfg(target_arch = "x86_64")]
use super::quant_kernel;
use super::small_matmul;
use crate::config::Activation;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};
use std::sync::Arc;

/// A bias-free projection `x @ W^T` with `W` stored `[out, in]` as in the checkpoints, kept
/// as loaded or quantized (see `quant.rs`).
pub enum Linear {
    Dense(Tensor),
    Quantized {
        q: Arc<QTensor>,
        mm: QMatMul,
    },
    /// Packed for the CPU's VNNI or AVX2 kernels (candle's copy dropped).
    #[cfg(target_arch = "x86_64")]
    Packed(quant_kernel::Packed),
}

impl Linear {
    /// Quantized weights: the small-batch kernels on the CPU, candle's quantized matmul
    /// elsewhere.
    pub fn quantized(q: QTensor) -> Result<Self> {
        #[cfg(target_arch = "x86_64")]
        if let Some(packed) = quant_kernel::Packed::new(&q)? {
            return Ok(Self::Packed(packed));
        }
        let q = Arc::new(q);
        let mm = QMatMul::from_arc(q.clone())?;
        Ok(Self::Quantized { q, mm })
    }

    /// `weight`: `[out, in]`, made contiguous (the small-batch kernel reads its rows).
    pub fn new(weight: Tensor) -> Result<Self> {
        Ok(Self::Dense(weight.contiguous()?))
    }

    /// The dtype its input is best given in (quantized products take f32).
    pub fn dtype(&self) -> DType {
        match self {
            Self::Dense(w) => w.dtype(),
            Self::Quantized { .. } => DType::F32,
            #[cfg(target_arch = "x86_64")]
            Self::Packed(_) => DType::F32,
        }
    }

    /// `xs`: `[n, in]` → `[n, out]`, in the dtype of `xs`. Decode-sized batches on the CPU
    /// take the small-batch kernel, which streams the weight once for all rows.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) if small_matmul::applies(xs, w) => {
                small_matmul::small_matmul_t(&xs.contiguous()?, w)
            }
            Self::Dense(w) => matmul_few_rows(xs, &w.t()?),
            Self::Quantized { mm, .. } => {
                let x = xs.to_dtype(DType::F32)?.contiguous()?;
                mm.forward(&x)?.to_dtype(xs.dtype())
            }
            #[cfg(target_arch = "x86_64")]
            Self::Packed(w) => {
                let dims = xs.dims();
                let k = dims.last().copied().unwrap_or(0);
                let (n, wk) = w.dims();
                if k != wk {
                    candle_core::bail!("quantized matmul: input width {k}, weight [{n}, {wk}]");
                }
                let m = xs.elem_count() / k.max(1);
                let x: Vec<f32> = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let y = w.matmul(&x, m);
                let mut shape = dims.to_vec();
                if let Some(last) = shape.last_mut() {
                    *last = n;
                }
                Tensor::from_vec(y, shape, xs.device())?.to_dtype(xs.dtype())
            }
        }
    }
}

/// Row counts for which [`matmul_few_rows`] swaps the operands.
const FEW_ROWS: std::ops::RangeInclusive<usize> = 2..=64;

/// `xs @ rhs`. For a handful of rows (an expert's share of a decode batch) it is computed as
/// `(rhs^T @ xs^T)^T`: candle's CPU gemm packs its right-hand operand on every call, and
/// packing a whole weight matrix to multiply it by 2..16 rows cost more than reading it.
pub fn matmul_few_rows(xs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    let rows = xs.dim(0)?;
    if xs.device().is_cpu() && xs.rank() == 2 && FEW_ROWS.contains(&rows) {
        rhs.t()?.matmul(&xs.t()?)?.t()?.contiguous()
    } else {
        xs.matmul(rhs)
    }
}

/// NeoX-style (half-split) rotary embeddings with per-token positions, so sequences at
/// different offsets can share one batch.
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    max_positions: usize,
    dtype: DType,
    device: Device,
}

impl RotaryEmbedding {
    /// Angles are computed in f32 the way transformers computes them (inv_freq, then
    /// pos * inv_freq), then cast to the compute dtype as transformers does before applying
    /// them. They are made per batch for its positions only: a table for a long-context
    /// model's every position would cost hundreds of MB.
    pub fn new(
        theta: f64,
        head_dim: usize,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Self {
            inv_freq,
            max_positions,
            dtype,
            device: device.clone(),
        }
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// cos/sin for the given positions → two `[n, head_dim / 2]` in the compute dtype.
    pub fn tables(&self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &pos in positions {
            let p = pos as f32;
            for f in &self.inv_freq {
                let angle = p * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (positions.len(), half);
        Ok((
            Tensor::from_vec(cos, shape, &self.device)?.to_dtype(self.dtype)?,
            Tensor::from_vec(sin, shape, &self.device)?.to_dtype(self.dtype)?,
        ))
    }

    /// `xs`: `[n, heads, head_dim]`, rotated per token by the gathered tables.
    pub fn apply(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let xs = xs.unsqueeze(0)?.contiguous()?;
        candle_nn::rotary_emb::rope_thd(&xs, cos, sin)?.squeeze(0)
    }
}

/// A contiguous CPU f32 storage's elements, borrowed.
pub(super) fn f32_slice<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> Option<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => {
            Some(&v[a..b])
        }
        _ => None,
    }
}

/// `xs + h` on the f32 residual stream (`h` converted to f32 first). On the CPU a plain loop
/// (the same additions): candle's binary op hands an add of 16 rows to its own thread pool and
/// waits at a barrier, ~10 us a call on the engine thread while the pool's workers spin (~1.5%
/// of a 16-sequence q4k decode step, two calls a layer).
pub fn add_residual(xs: &Tensor, h: &Tensor) -> Result<Tensor> {
    let h = h.to_dtype(DType::F32)?;
    if xs.device().is_cpu() && xs.dtype() == DType::F32 && xs.shape() == h.shape() {
        let (a, b) = (xs.contiguous()?, h.contiguous()?);
        let (a_s, a_l) = a.storage_and_layout();
        let (b_s, b_l) = b.storage_and_layout();
        if let (Some(x), Some(y)) = (f32_slice(&a_s, a_l), f32_slice(&b_s, b_l)) {
            let sum: Vec<f32> = x.iter().zip(y).map(|(x, y)| x + y).collect();
            return Tensor::from_vec(sum, xs.shape(), xs.device());
        }
    }
    xs + h
}

/// SiLU gate times up, the SwiGLU of both families' experts.
pub fn swiglu(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    let g = match act {
        Activation::Silu => candle_nn::ops::silu(gate)?,
        Activation::Gelu => gate.gelu_erf()?,
        Activation::GeluTanh => gate.gelu()?,
    };
    g * up
}

/// `s = e^(s - max)` over `xs`, returning their sum (libm's `expf`): the scalar softmax's
/// exponentials, for the router and the decode attention.
pub(super) fn exp_shifted(xs: &mut [f32], max: f32) -> f32 {
    let mut sum = 0f32;
    for s in xs.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    sum
}

/// Softmax of each `width`-wide row of `xs`, in place: the row's max, `exp` of the values
/// shifted by it (returning their sum, as [`exp_shifted`] does), then one division a value,
/// in candle's order of operations. The router's and the portable decode attention's.
pub(super) fn softmax_rows_with(
    xs: &mut [f32],
    width: usize,
    mut exp: impl FnMut(&mut [f32], f32) -> f32,
) {
    for row in xs.chunks_mut(width.max(1)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum = exp(row, max);
        for v in row.iter_mut() {
            *v /= sum;
        }
    }
}

/// Row-wise softmax in f32, whatever the input dtype.
pub fn softmax_f32(xs: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax_last_dim(&xs.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_data::data;

    /// The residual add gives candle's `+` bit for bit, from an f32 or a bf16 branch output,
    /// and from a non-contiguous view.
    #[test]
    fn residual_add_matches_candles() -> Result<()> {
        let dev = Device::Cpu;
        let xs = Tensor::from_vec(data(6 * 40, 1), (6, 40), &dev)?;
        let wide = Tensor::from_vec(data(6 * 80, 2), (6, 80), &dev)?;
        for h in [
            Tensor::from_vec(data(6 * 40, 3), (6, 40), &dev)?,
            Tensor::from_vec(data(6 * 40, 4), (6, 40), &dev)?.to_dtype(DType::BF16)?,
            wide.narrow(1, 20, 40)?,
        ] {
            let want: Vec<f32> = (&xs + h.to_dtype(DType::F32)?)?.flatten_all()?.to_vec1()?;
            let got: Vec<f32> = add_residual(&xs, &h)?.flatten_all()?.to_vec1()?;
            assert_eq!(got, want);
        }
        Ok(())
    }
}
