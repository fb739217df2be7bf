//! The sparse MoE block: a router that picks the top-k experts per token, and experts that run
//! only on the tokens routed to them.

use super::layers::{softmax_f32, swiglu, Linear};
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
}

/// The routing decision for a batch: for each token, its experts and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub experts: Vec<Vec<usize>>,
    pub weights: Vec<Vec<f32>>,
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
        Self {
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
        let probs = softmax_f32(&self.router.forward(xs)?)?;
        let probs: Vec<f32> = probs.flatten_all()?.to_vec1()?;
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
            self.expert_tokens[e].fetch_add(rows[e].len() as u64, Ordering::Relaxed);
            all_rows.extend_from_slice(&rows[e]);
        }
        let idx = Tensor::from_vec(all_rows, n * self.top_k, device)?;
        let ys = Tensor::cat(&all_out, 0)?;
        Tensor::zeros((n, hidden), DType::F32, device)?.index_add(&idx, &ys, 0)
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

    #[test]
    fn ties_go_to_lower_index() {
        let r = route(&[0.25, 0.25, 0.25, 0.25], 4, 1, RouterNorm::PNorm(1.0));
        assert_eq!(r.experts[0], vec![0]);
        assert_eq!(r.weights[0], vec![1.0]);
    }
}
