//! RMSNorm (Mixtral) and LayerNorm without bias (DBRX) over the last dimension.
//!
//! On the CPU in f32 (the residual stream always is) the rows are normalised here: candle's
//! kernels sum each row in one running f32 sum, a chain of dependent adds (~1 us a row of
//! 1024), run on one thread up to 32 rows, and cost ~0.25 ms of a 16-sequence decode step.
//! Here a row is summed in 32 independent lanes (vectorised), combined in a fixed order, so
//! a row's result does not depend on its batch.

use super::layers::f32_slice;
use crate::config::NormKind;
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Independent partial sums per row.
const LANES: usize = 32;
/// Elements below which the rows are normalised on one thread (a 16-row decode step's norm
/// takes a few microseconds, less than a fork of the pool).
const PAR_MIN_ELEMS: usize = 1 << 16;

enum Kind {
    Rms,
    /// With zeros standing in for the absent bias (candle's kernel, off the CPU, wants one).
    LayerNoBias {
        zero_bias: Tensor,
    },
}

pub struct Norm {
    /// f32 `[hidden]`.
    weight: Tensor,
    kind: Kind,
    eps: f32,
}

impl Norm {
    /// The weight is kept in f32: norms run on the f32 residual stream.
    pub fn new(kind: NormKind, weight: Tensor) -> Result<Self> {
        let weight = weight.to_dtype(DType::F32)?.contiguous()?;
        let (kind, eps) = match kind {
            NormKind::Rms { eps } => (Kind::Rms, eps),
            NormKind::LayerNormNoBias { eps } => (
                Kind::LayerNoBias {
                    zero_bias: weight.zeros_like()?,
                },
                eps,
            ),
        };
        Ok(Self {
            weight,
            kind,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(out) = self.forward_cpu_f32(xs)? {
            return Ok(out);
        }
        match &self.kind {
            Kind::Rms => candle_nn::ops::rms_norm(xs, &self.weight, self.eps),
            Kind::LayerNoBias { zero_bias } => {
                candle_nn::ops::layer_norm(xs, &self.weight, zero_bias, self.eps)
            }
        }
    }

    /// The rows of an f32 tensor on the CPU; `None` for anything else.
    fn forward_cpu_f32(&self, xs: &Tensor) -> Result<Option<Tensor>> {
        if !xs.device().is_cpu() || xs.dtype() != DType::F32 {
            return Ok(None);
        }
        let d = xs.dims().last().copied().unwrap_or(0);
        if d == 0 || self.weight.dims1()? != d {
            return Ok(None);
        }
        let xs = xs.contiguous()?;
        let mut out = vec![0f32; xs.elem_count()];
        {
            let (xs_s, xs_l) = xs.storage_and_layout();
            let (w_s, w_l) = self.weight.storage_and_layout();
            let (Some(src), Some(w)) = (f32_slice(&xs_s, xs_l), f32_slice(&w_s, w_l)) else {
                return Ok(None);
            };
            let row = |(x, o): (&[f32], &mut [f32])| match self.kind {
                Kind::Rms => rms_row(x, w, self.eps, o),
                Kind::LayerNoBias { .. } => layer_norm_row(x, w, self.eps, o),
            };
            if src.len() >= PAR_MIN_ELEMS {
                let min_rows = (PAR_MIN_ELEMS / 8 / d).max(1);
                src.par_chunks(d)
                    .zip(out.par_chunks_mut(d))
                    .with_min_len(min_rows)
                    .for_each(row);
            } else {
                src.chunks(d).zip(out.chunks_mut(d)).for_each(row);
            }
        }
        Ok(Some(Tensor::from_vec(out, xs.dims(), xs.device())?))
    }
}

/// `sum(f(x))` over a row in [`LANES`] partial sums, combined pairwise in a fixed order.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += f(v);
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0]
}

/// `x / sqrt(mean(x^2) + eps) * w`, candle's and transformers' expression.
fn rms_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum2 = lane_sum(x, |v| v * v);
    let m = (sum2 / x.len() as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
        *o = v / m * w;
    }
}

/// `(x - mean) / sqrt(var + eps) * w`, the variance from a second pass over `x - mean` (as
/// torch computes it; `E[x^2] - mean^2` loses digits when the mean is large).
fn layer_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = lane_sum(x, |v| v) / n;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    let inv_std = (var + eps).sqrt().recip();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
        *o = (v - mean) * inv_std * w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn input(rows: usize, d: usize, seed: u64) -> Vec<f32> {
        // Varied magnitudes and a large offset on odd rows (LayerNorm's hard case).
        let mut s = seed;
        (0..rows * d)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                u * 3.0 + if (i / d) % 2 == 1 { 40.0 } else { 0.0 }
            })
            .collect()
    }

    fn norms(d: usize) -> Result<Vec<Norm>> {
        let w: Vec<f32> = (0..d).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        let w = Tensor::from_vec(w, d, &Device::Cpu)?;
        Ok(vec![
            Norm::new(NormKind::Rms { eps: 1e-5 }, w.clone())?,
            Norm::new(NormKind::LayerNormNoBias { eps: 1e-5 }, w)?,
        ])
    }

    fn label(kind: &Kind) -> &'static str {
        match kind {
            Kind::Rms => "rms",
            Kind::LayerNoBias { .. } => "layer norm",
        }
    }

    /// The row normalised in f64, two-pass.
    fn reference(kind: &Kind, x: &[f32], w: &[f32], eps: f32) -> Vec<f64> {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let centre = if matches!(kind, Kind::Rms) { 0.0 } else { mean };
        let var = x.iter().map(|&v| (v as f64 - centre).powi(2)).sum::<f64>() / n;
        let scale = (var + eps as f64).sqrt();
        x.iter()
            .zip(w)
            .map(|(&v, &w)| (v as f64 - centre) / scale * w as f64)
            .collect()
    }

    #[test]
    fn matches_an_f64_reference_and_candles_kernels() -> Result<()> {
        for d in [1, 7, 32, 100, 1024] {
            for rows in [1, 3, 40, 80] {
                let x = input(rows, d, d as u64);
                let xs = Tensor::from_vec(x.clone(), (rows, d), &Device::Cpu)?;
                for norm in norms(d)? {
                    let w = norm.weight.to_vec1::<f32>()?;
                    let ours = norm.forward(&xs)?.to_vec2::<f32>()?;
                    let theirs = match &norm.kind {
                        Kind::Rms => candle_nn::ops::rms_norm(&xs, &norm.weight, norm.eps)?,
                        Kind::LayerNoBias { zero_bias } => {
                            candle_nn::ops::layer_norm(&xs, &norm.weight, zero_bias, norm.eps)?
                        }
                    }
                    .to_vec2::<f32>()?;
                    for (r, (ours, theirs)) in ours.iter().zip(&theirs).enumerate() {
                        let exact = reference(&norm.kind, &x[r * d..(r + 1) * d], &w, norm.eps);
                        for ((&a, &b), &e) in ours.iter().zip(theirs).zip(&exact) {
                            let what = format!(
                                "{} d={d} rows={rows}: {a} / candle {b} / {e}",
                                label(&norm.kind)
                            );
                            assert!((a as f64 - e).abs() <= 5e-5 * e.abs().max(1.0), "{what}");
                            // candle's E[x^2] - mean^2 loses digits on the offset rows.
                            assert!((a - b).abs() <= 5e-3 * b.abs().max(1.0), "{what}");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_row_is_the_same_alone_in_a_batch_and_in_a_parallel_batch() -> Result<()> {
        let d = 1024;
        let rows = PAR_MIN_ELEMS / d * 2;
        let all = input(rows, d, 3);
        let batch = Tensor::from_vec(all.clone(), (rows, d), &Device::Cpu)?;
        for norm in norms(d)? {
            let out = norm.forward(&batch)?.to_vec2::<f32>()?;
            for r in [0, 1, 17, rows - 1] {
                let alone = Tensor::from_slice(&all[r * d..(r + 1) * d], (1, d), &Device::Cpu)?;
                let a = norm.forward(&alone)?.to_vec2::<f32>()?;
                assert_eq!(a[0], out[r], "{} row {r}", label(&norm.kind));
            }
        }
        Ok(())
    }

    #[test]
    fn takes_any_leading_shape_and_strided_input() -> Result<()> {
        let d = 100;
        let flat = input(6, d, 9);
        let xs = Tensor::from_vec(flat.clone(), (2, 3, d), &Device::Cpu)?;
        // The same rows as a non-contiguous view: columns of a transposed [d, 6].
        let strided = Tensor::from_vec(flat, (6, d), &Device::Cpu)?
            .t()?
            .contiguous()?
            .t()?;
        for norm in norms(d)? {
            let a = norm.forward(&xs)?;
            assert_eq!(a.dims(), &[2, 3, d]);
            let b = norm.forward(&strided)?;
            assert_eq!(a.reshape((6, d))?.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        }
        Ok(())
    }
}
