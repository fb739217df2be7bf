//! The sparse MoE block: a router that picks the top-k experts per token, and experts that run
//! only on the tokens routed to them.

use super::layers::{exp_shifted, softmax_rows_with, swiglu, Linear};
#[cfg(target_arch = "x86_64")]
use super::quant_kernel::Packed;
use crate::config::{Activation, RouterNorm};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// One expert's SwiGLU FFN: `(act(x Wg^T) * (x Wu^T)) @ down`.
pub struct Expert {
    pub gate: Linear,
    pub up: Linear,
    /// `[hidden, ffn]` like every projection (Mixtral's `w2` as stored; DBRX's transposed).
    pub down: Linear,
}

impl Expert {
    /// Returns f32: the gate product and the weighted sum stay in f32 (fewer bf16 roundings).
    fn forward(&self, xs: &Tensor, act: Activation) -> Result<Tensor> {
        let gate = self.gate.forward(xs)?.to_dtype(DType::F32)?;
        let up = self.up.forward(xs)?.to_dtype(DType::F32)?;
        let h = swiglu(&gate, &up, act)?.to_dtype(xs.dtype())?;
        self.down.forward(&h)?.to_dtype(DType::F32)
    }

    /// Gate, up and down where all three are packed for this CPU and fit together (gate and
    /// up one format and shape, down taking gate's width): what [`Expert::forward_packed`]
    /// runs on.
    #[cfg(target_arch = "x86_64")]
    fn packed(&self) -> Option<(&Packed, &Packed, &Packed)> {
        let (Linear::Packed(g), Linear::Packed(u), Linear::Packed(d)) =
            (&self.gate, &self.up, &self.down)
        else {
            return None;
        };
        (g.dtype() == u.dtype() && g.dims() == u.dims() && d.dims().1 == g.dims().0)
            .then_some((g, u, d))
    }

    /// Whether [`Expert::forward_packed`] takes this expert.
    fn is_packed(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return self.packed().is_some();
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The same FFN on f32 rows `x` (`[m, hidden]`) where all three projections are packed
    /// for this CPU: the gate and up products share one rounding of the activations and one
    /// pass, SwiGLU applied as their tiles come out, no tensors in between. `None` otherwise.
    #[cfg(target_arch = "x86_64")]
    fn forward_packed(&self, x: &[f32], m: usize, act: Activation) -> Option<Vec<f32>> {
        let (gate, up, down) = self.packed()?;
        let h = gate.gated_matmul(up, x, m, |g, u, out| {
            super::swiglu::gate_rows(act, g, u, out)
        })?;
        Some(down.matmul(&h, m))
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn forward_packed(&self, _x: &[f32], _m: usize, _act: Activation) -> Option<Vec<f32>> {
        None
    }
}

/// The routing decision for a batch: for each token, its experts and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub experts: Vec<Vec<usize>>,
    pub weights: Vec<Vec<f32>>,
}

/// Each row of `width` router logits turned into probabilities, in place, in f32 as
/// transformers does: a plain loop (on the host, where routing runs anyway), not a tensor op
/// forked over the pool for 8 values a row.
pub fn softmax_rows(mut logits: Vec<f32>, width: usize) -> Vec<f32> {
    softmax_rows_with(&mut logits, width, exp_shifted);
    logits
}

/// Softmax over all experts (in f32, as transformers does), keep the top k, normalise.
pub fn route(probs: &[f32], num_experts: usize, k: usize, norm: RouterNorm) -> Routing {
    let n = probs.len() / num_experts;
    let mut experts = Vec::with_capacity(n);
    let mut weights = Vec::with_capacity(n);
    let mut order: Vec<usize> = Vec::with_capacity(num_experts);
    for row in probs.chunks_exact(num_experts) {
        order.clear();
        order.extend(0..num_experts);
        // Highest probability first; ties go to the lower expert index, as torch.topk does on CPU.
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        let top: Vec<usize> = order[..k].to_vec();
        let mut w: Vec<f32> = top.iter().map(|&e| row[e]).collect();
        if let RouterNorm::PNorm(p) = norm {
            let denom = if p == 1.0 {
                w.iter().map(|x| x.abs()).sum::<f32>()
            } else {
                w.iter()
                    .map(|x| x.abs().powf(p as f32))
                    .sum::<f32>()
                    .powf(1.0 / p as f32)
            };
            if denom > 0.0 {
                w.iter_mut().for_each(|x| *x /= denom);
            }
        }
        experts.push(top);
        weights.push(w);
    }
    Routing { experts, weights }
}

pub struct MoeBlock {
    router: Linear,
    experts: Vec<Expert>,
    top_k: usize,
    norm: RouterNorm,
    act: Activation,
    /// Tokens routed to each expert since start (for metrics: how balanced the router is).
    expert_tokens: Vec<AtomicU64>,
    /// Every expert packed for this CPU's kernels: the block works on plain f32 rows.
    packed: bool,
}

impl MoeBlock {
    pub fn new(
        router: Linear,
        experts: Vec<Expert>,
        top_k: usize,
        norm: RouterNorm,
        act: Activation,
    ) -> Self {
        let expert_tokens = experts.iter().map(|_| AtomicU64::new(0)).collect();
        let packed = !experts.is_empty() && experts.iter().all(Expert::is_packed);
        Self {
            packed,
            router,
            experts,
            top_k,
            norm,
            act,
            expert_tokens,
        }
    }

    pub fn expert_token_counts(&self) -> Vec<u64> {
        self.expert_tokens
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// `xs`: `[n, hidden]` → `[n, hidden]` in f32 (added to the f32 residual stream).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (n, hidden) = xs.dims2()?;
        let num_experts = self.experts.len();
        let logits = self.router.forward(xs)?.to_dtype(DType::F32)?;
        let probs = softmax_rows(logits.flatten_all()?.to_vec1()?, num_experts);
        let routing = route(&probs, num_experts, self.top_k, self.norm);

        // Group the batch's tokens by expert so each active expert runs one matrix product.
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); num_experts];
        let mut row_weights: Vec<Vec<f32>> = vec![Vec::new(); num_experts];
        for (tok, (es, ws)) in routing.experts.iter().zip(&routing.weights).enumerate() {
            for (&e, &w) in es.iter().zip(ws) {
                rows[e].push(tok as u32);
                row_weights[e].push(w);
            }
        }
        let device = xs.device();
        let active: Vec<usize> = (0..num_experts).filter(|&e| !rows[e].is_empty()).collect();
        for &e in &active {
            self.expert_tokens[e].fetch_add(rows[e].len() as u64, Ordering::Relaxed);
        }
        if self.packed && device.is_cpu() {
            return self.forward_packed(xs, &active, &rows, &row_weights);
        }
        // The active experts run side by side: a large expert's products split across the
        // pool anyway, but small ones (a few rows, a narrow FFN) run on one thread each and
        // would otherwise leave the other cores idle for the whole MoE block.
        let run = |&e: &usize| -> Result<Tensor> {
            let count = rows[e].len();
            let idx = Tensor::from_slice(&rows[e], count, device)?;
            let w = Tensor::from_slice(&row_weights[e], (count, 1), device)?;
            let x_e = xs.index_select(&idx, 0)?;
            self.experts[e].forward(&x_e, self.act)?.broadcast_mul(&w)
        };
        let all_out: Vec<Tensor> = if device.is_cpu() {
            active.par_iter().map(run).collect::<Result<_>>()?
        } else {
            active.iter().map(run).collect::<Result<_>>()?
        };
        let mut all_rows = Vec::with_capacity(n * self.top_k);
        for &e in &active {
            all_rows.extend_from_slice(&rows[e]);
        }
        let idx = Tensor::from_vec(all_rows, n * self.top_k, device)?;
        let ys = Tensor::cat(&all_out, 0)?;
        Tensor::zeros((n, hidden), DType::F32, device)?.index_add(&idx, &ys, 0)
    }

    /// [`MoeBlock::forward`]'s experts on plain f32 rows, every expert packed: no tensor per
    /// expert (gathers, products, weighting, scatter), which cost a fifth of a 16-sequence
    /// quantized decode step. The weighted outputs are summed per token in expert order,
    /// `0 + w_a y_a + w_b y_b` as the tensor path's `index_add` sums them.
    fn forward_packed(
        &self,
        xs: &Tensor,
        active: &[usize],
        rows: &[Vec<u32>],
        row_weights: &[Vec<f32>],
    ) -> Result<Tensor> {
        let (n, hidden) = xs.dims2()?;
        let x: Vec<f32> = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let run = |&e: &usize| -> Result<Vec<f32>> {
            let mut x_e = Vec::with_capacity(rows[e].len() * hidden);
            for &t in &rows[e] {
                let t = t as usize;
                x_e.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
            }
            let y = self.experts[e]
                .forward_packed(&x_e, rows[e].len(), self.act)
                .ok_or_else(|| candle_core::Error::Msg(format!("expert {e} is not packed")))?;
            if y.len() != rows[e].len() * hidden {
                candle_core::bail!("expert {e}: {} outputs for {} rows", y.len(), rows[e].len());
            }
            Ok(y)
        };
        let ys: Vec<Vec<f32>> = active.par_iter().map(run).collect::<Result<_>>()?;
        let mut out = vec![0f32; n * hidden];
        for (&e, y) in active.iter().zip(&ys) {
            for (r, (&t, &w)) in rows[e].iter().zip(&row_weights[e]).enumerate() {
                let dst = &mut out[t as usize * hidden..(t as usize + 1) * hidden];
                for (d, &v) in dst.iter_mut().zip(&y[r * hidden..(r + 1) * hidden]) {
                    *d += v * w;
                }
            }
        }
        Tensor::from_vec(out, (n, hidden), xs.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top2_renormalises_to_one() {
        let probs = [0.1, 0.4, 0.2, 0.3];
        let r = route(&probs, 4, 2, RouterNorm::PNorm(1.0));
        assert_eq!(r.experts, vec![vec![1, 3]]);
        let w = &r.weights[0];
        assert!((w[0] - 0.4 / 0.7).abs() < 1e-6 && (w[1] - 0.3 / 0.7).abs() < 1e-6);
    }

    #[test]
    fn p2_norm_and_no_norm() {
        let probs = [0.5, 0.1, 0.0, 0.4];
        let r = route(&probs, 4, 2, RouterNorm::PNorm(2.0));
        let d = (0.5f32 * 0.5 + 0.4 * 0.4).sqrt();
        assert!((r.weights[0][0] - 0.5 / d).abs() < 1e-6);
        let r = route(&probs, 4, 3, RouterNorm::None);
        assert_eq!(r.experts[0], vec![0, 3, 1]);
        assert_eq!(r.weights[0], vec![0.5, 0.4, 0.1]);
    }

    /// The packed experts' path (plain f32 rows, fused gate and up) gives what the tensor
    /// path gives on the same packed weights, for every packed format: bit for bit with
    /// candle's own GELU, within rounding with the vectorised SiLU.
    #[test]
    fn packed_experts_match_the_tensor_path() -> Result<()> {
        use crate::model::test_data::data;
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::Device;
        let dev = Device::Cpu;
        let (experts, n) = (4, 7);
        for (dtype, hidden, ffn, act) in [
            (GgmlDType::Q8_0, 64, 96, Activation::Silu),
            (GgmlDType::Q4_0, 64, 160, Activation::GeluTanh),
            (GgmlDType::Q4K, 256, 512, Activation::Silu),
            (GgmlDType::Q4K, 256, 512, Activation::Gelu),
        ] {
            let weight = |rows: usize, cols: usize, seed: u32| -> Result<Linear> {
                let w = Tensor::from_vec(data(rows * cols, seed), (rows, cols), &dev)?;
                Linear::quantized(QTensor::quantize(&(w * 0.1)?, dtype)?)
            };
            let make = || -> Result<MoeBlock> {
                let router = Tensor::from_vec(data(experts * hidden, 1), (experts, hidden), &dev)?;
                let list = (0..experts as u32)
                    .map(|e| {
                        Ok(Expert {
                            gate: weight(ffn, hidden, 10 + e)?,
                            up: weight(ffn, hidden, 20 + e)?,
                            down: weight(hidden, ffn, 30 + e)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(MoeBlock::new(
                    Linear::new(router)?,
                    list,
                    2,
                    RouterNorm::PNorm(1.0),
                    act,
                ))
            };
            let fast = make()?;
            if !fast.packed {
                // Neither VNNI nor AVX2 here: nothing is packed, the tensor path is the only one.
                return Ok(());
            }
            let mut slow = make()?;
            slow.packed = false;
            let xs = Tensor::from_vec(data(n * hidden, 2), (n, hidden), &dev)?;
            let a: Vec<f32> = fast.forward(&xs)?.flatten_all()?.to_vec1()?;
            let b: Vec<f32> = slow.forward(&xs)?.flatten_all()?.to_vec1()?;
            if act == Activation::Silu {
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                        "{dtype:?}: {x} vs {y}"
                    );
                }
            } else {
                assert_eq!(a, b, "{dtype:?} {act:?}");
            }
            assert!(a.iter().any(|v| *v != 0.0));
        }
        Ok(())
    }

    /// The router's softmax gives candle's `softmax_last_dim` bit for bit at the experts'
    /// widths (4, 8 and 16 here), and rows that sum to one.
    #[test]
    fn router_softmax_matches_candles() -> Result<()> {
        use crate::model::test_data::data;
        for width in [4, 8, 16] {
            let logits: Vec<f32> = data(5 * width, width as u32)
                .iter()
                .map(|x| x * 6.0)
                .collect();
            let t = Tensor::from_vec(logits.clone(), (5, width), &candle_core::Device::Cpu)?;
            let want: Vec<f32> = candle_nn::ops::softmax_last_dim(&t)?
                .flatten_all()?
                .to_vec1()?;
            let got = softmax_rows(logits, width);
            assert_eq!(got, want, "width {width}");
            for row in got.chunks(width) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            }
        }
        Ok(())
    }

    #[test]
    fn ties_go_to_lower_index() {
        let r = route(&[0.25, 0.25, 0.25, 0.25], 4, 1, RouterNorm::PNorm(1.0));
        assert_eq!(r.experts[0], vec![0]);
        assert_eq!(r.weights[0], vec![1.0]);
    }
}
