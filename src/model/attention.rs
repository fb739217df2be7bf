//! GQA attention over the paged KV cache, causal within a prefill chunk.

use super::batch::PreparedBatch;
use super::decode_attention::{self, Heads, Query};
use super::kv_cache::KvCache;
use super::layers::{softmax_f32, Linear, RotaryEmbedding};
use candle_core::{DType, Result, Tensor};

/// Q, K, V as three projections (Mixtral) or one fused `Wqkv` clamped to ±clip (DBRX).
pub enum QkvProj {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused { wqkv: Linear, clip: Option<f64> },
}

pub struct Attention {
    qkv: QkvProj,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn new(
        qkv: QkvProj,
        o_proj: Linear,
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        Self {
            qkv,
            o_proj,
            num_heads,
            num_kv_heads,
            head_dim,
        }
    }

    fn project(&self, xs: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        match &self.qkv {
            QkvProj::Separate { q, k, v } => Ok((q.forward(xs)?, k.forward(xs)?, v.forward(xs)?)),
            QkvProj::Fused { wqkv, clip } => {
                let mut qkv = wqkv.forward(xs)?;
                if let Some(c) = clip {
                    qkv = qkv.clamp(-c, *c)?;
                }
                let q_dim = self.num_heads * self.head_dim;
                let kv_dim = self.num_kv_heads * self.head_dim;
                Ok((
                    qkv.narrow(1, 0, q_dim)?,
                    qkv.narrow(1, q_dim, kv_dim)?,
                    qkv.narrow(1, q_dim + kv_dim, kv_dim)?,
                ))
            }
        }
    }

    /// `xs`: `[n, hidden]` for the whole flattened batch → `[n, hidden]`.
    pub fn forward(
        &self,
        xs: &Tensor,
        layer: usize,
        batch: &PreparedBatch,
        rope: &RotaryEmbedding,
        cache: &KvCache,
    ) -> Result<Tensor> {
        let n = xs.dim(0)?;
        let (q, k, v) = self.project(xs)?;
        let q = q.reshape((n, self.num_heads, self.head_dim))?;
        let k = k.reshape((n, self.num_kv_heads, self.head_dim))?;
        let q = rope.apply(&q, &batch.cos, &batch.sin)?;
        let k = rope.apply(&k, &batch.cos, &batch.sin)?;

        // Write this step's keys and values into their slots, then attend per sequence over
        // everything its block table holds (earlier chunks and steps included).
        let (k_cache, v_cache) = cache.layer(layer);
        let kv_dim = self.num_kv_heads * self.head_dim;
        k_cache.scatter_set(&batch.slot_index, &k.reshape((n, kv_dim))?.contiguous()?, 0)?;
        v_cache.scatter_set(&batch.slot_index, &v.contiguous()?.reshape((n, kv_dim))?, 0)?;

        let groups = self.num_heads / self.num_kv_heads;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let q_dim = self.num_heads * self.head_dim;
        // Single-token queries read the cache in place (see `decode_attention.rs`).
        let mut decoded = if decode_attention::supports(k_cache) {
            let queries: Vec<Query> = batch
                .seqs
                .iter()
                .filter(|s| s.len == 1)
                .map(|s| Query {
                    row: s.start,
                    slots: &s.ctx,
                })
                .collect();
            if queries.is_empty() {
                Vec::new()
            } else {
                let qf: Vec<f32> = q
                    .reshape((n, q_dim))?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                let heads = Heads {
                    num_heads: self.num_heads,
                    num_kv_heads: self.num_kv_heads,
                    head_dim: self.head_dim,
                    scale: scale as f32,
                };
                decode_attention::attend(&qf, k_cache, v_cache, &queries, heads)?
            }
        } else {
            Vec::new()
        }
        .into_iter();
        let mut outs = Vec::with_capacity(batch.seqs.len());
        for seq in &batch.seqs {
            let t = seq.len;
            let c = seq.keys;
            if t == 1 {
                if let Some(out) = decoded.next() {
                    outs.push(Tensor::from_vec(out, (1, q_dim), q.device())?.to_dtype(q.dtype())?);
                    continue;
                }
            }
            // [t, heads, hd] → [kv_heads, groups * t, hd]: heads h = kv * groups + g share kv.
            let q_s = q
                .narrow(0, seq.start, t)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((self.num_kv_heads, groups * t, self.head_dim))?;
            let k_s = k_cache
                .index_select(&seq.ctx_slots, 0)?
                .reshape((c, self.num_kv_heads, self.head_dim))?
                .transpose(0, 1)?
                .contiguous()?;
            let v_s = v_cache
                .index_select(&seq.ctx_slots, 0)?
                .reshape((c, self.num_kv_heads, self.head_dim))?
                .transpose(0, 1)?
                .contiguous()?;
            let scores = (q_s.matmul(&k_s.t()?)? * scale)?;
            let scores = match &seq.mask {
                Some(mask) => scores
                    .to_dtype(DType::F32)?
                    .reshape((self.num_kv_heads, groups, t, c))?
                    .broadcast_add(mask)?
                    .reshape((self.num_kv_heads, groups * t, c))?,
                None => scores,
            };
            let probs = softmax_f32(&scores)?.to_dtype(v_s.dtype())?;
            let out = probs
                .matmul(&v_s)? // [kv_heads, groups * t, hd]
                .reshape((self.num_heads, t, self.head_dim))?
                .transpose(0, 1)?
                .reshape((t, self.num_heads * self.head_dim))?;
            outs.push(out);
        }
        let attn = if outs.len() == 1 {
            outs.pop()
                .ok_or_else(|| candle_core::Error::Msg("empty batch".into()))?
        } else {
            Tensor::cat(&outs, 0)?
        };
        self.o_proj.forward(&attn)
    }
}
