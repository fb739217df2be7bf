//! GQA attention over the paged KV cache, causal within a prefill chunk.

use super::batch::PreparedBatch;
use super::decode_attention::{self, Heads, Query};
use super::kv_cache::KvCache;
use super::layers::{softmax_f32, Linear, RotaryEmbedding};
use super::rope_cache;
use candle_core::{DType, Device, Result, Tensor};
use std::borrow::Cow;

/// Q, K, V as three projections (Mixtral) or one fused `Wqkv` clamped to ±clip (DBRX).
pub enum QkvProj {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused { wqkv: Linear, clip: Option<f64> },
}

/// Separate Q, K and V packed for this CPU become one weight: one rounding of the
/// activations and one parallel product instead of three (the same values: each output row
/// is its own lanes). Anything else stays as it is.
fn fuse_packed(qkv: QkvProj) -> QkvProj {
    #[cfg(target_arch = "x86_64")]
    if let QkvProj::Separate {
        q: Linear::Packed(q),
        k: Linear::Packed(k),
        v: Linear::Packed(v),
    } = &qkv
    {
        if let Some(wqkv) = super::quant_kernel::Packed::concat(&[q, k, v]) {
            return QkvProj::Fused {
                wqkv: Linear::Packed(wqkv),
                clip: None,
            };
        }
    }
    qkv
}

/// A step's rotated queries: f32 rows `[n, heads * head_dim]` from `rope_cache.rs`, or a
/// `[n, heads, head_dim]` tensor from the tensor path.
enum Queries {
    Rows(Vec<f32>),
    Tensor(Tensor),
}

impl Queries {
    /// As f32 rows, for the decode attention.
    fn rows(&self) -> Result<Cow<'_, [f32]>> {
        Ok(match self {
            Self::Rows(rows) => Cow::Borrowed(rows),
            Self::Tensor(q) => Cow::Owned(q.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?),
        })
    }

    /// As a `shape` tensor, for the attention of prefill chunks.
    fn into_tensor(self, shape: (usize, usize, usize), device: &Device) -> Result<Tensor> {
        match self {
            Self::Rows(rows) => Tensor::from_vec(rows, shape, device),
            Self::Tensor(q) => Ok(q),
        }
    }
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
            qkv: fuse_packed(qkv),
            o_proj,
            num_heads,
            num_kv_heads,
            head_dim,
        }
    }

    /// Whether Q, K and V are one product (for tests).
    #[cfg(test)]
    fn fused(&self) -> bool {
        matches!(self.qkv, QkvProj::Fused { .. })
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

    /// Rotates the step's queries and keys and writes its keys and values into their cache
    /// slots (in the cache's element type, `--kv-cache-dtype`): in one pass over f32 rows on
    /// the CPU (`rope_cache.rs`), with tensor operations otherwise.
    #[allow(clippy::too_many_arguments)]
    fn rotate_and_store(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        batch: &PreparedBatch,
        rope: &RotaryEmbedding,
        k_cache: &Tensor,
        v_cache: &Tensor,
    ) -> Result<Queries> {
        let (cos, sin) = (&batch.cos, &batch.sin);
        let (hd, slots) = (self.head_dim, &batch.slots);
        if let Some(rows) =
            rope_cache::rope_and_store(q, k, v, cos, sin, slots, k_cache, v_cache, hd)?
        {
            return Ok(Queries::Rows(rows));
        }
        let n = q.dim(0)?;
        let q = rope.apply(&q.reshape((n, self.num_heads, hd))?, cos, sin)?;
        let k = rope.apply(&k.reshape((n, self.num_kv_heads, hd))?, cos, sin)?;
        let kv_dim = self.num_kv_heads * hd;
        let kv_dtype = k_cache.dtype();
        let k_in = k.reshape((n, kv_dim))?.to_dtype(kv_dtype)?.contiguous()?;
        let v_in = v.contiguous()?.reshape((n, kv_dim))?.to_dtype(kv_dtype)?;
        let index = batch.slot_index()?;
        k_cache.scatter_set(index, &k_in, 0)?;
        v_cache.scatter_set(index, &v_in, 0)?;
        Ok(Queries::Tensor(q))
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
        let (q_dtype, device) = (q.dtype(), q.device().clone());

        // Rotate Q and K and write this step's keys and values into their slots, then attend
        // per sequence over everything its block table holds (earlier chunks and steps
        // included).
        let (k_cache, v_cache) = cache.layer(layer);
        let q = self.rotate_and_store(&q, &k, &v, batch, rope, k_cache, v_cache)?;

        let groups = self.num_heads / self.num_kv_heads;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let q_dim = self.num_heads * self.head_dim;
        // Single-token queries read the cache in place (see `decode_attention.rs`).
        let decoded = if decode_attention::supports(k_cache) {
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
                let qf = q.rows()?;
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
        };
        if decoded.len() == batch.seqs.len() {
            // Every sequence decodes one token (the usual step): one tensor of all the rows.
            let rows = Tensor::from_vec(decoded.concat(), (n, q_dim), &device)?;
            return self.o_proj.forward(&rows.to_dtype(q_dtype)?);
        }
        let q = q.into_tensor((n, self.num_heads, self.head_dim), &device)?;
        let mut decoded = decoded.into_iter();
        let mut outs = Vec::with_capacity(batch.seqs.len());
        for seq in &batch.seqs {
            let t = seq.len;
            let c = seq.keys;
            if t == 1 {
                if let Some(out) = decoded.next() {
                    outs.push(Tensor::from_vec(out, (1, q_dim), &device)?.to_dtype(q_dtype)?);
                    continue;
                }
            }
            // [t, heads, hd] → [kv_heads, groups * t, hd]: heads h = kv * groups + g share kv.
            let q_s = q
                .narrow(0, seq.start, t)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((self.num_kv_heads, groups * t, self.head_dim))?;
            let ctx_slots = seq.ctx_slots(k_cache.device())?;
            let k_s = k_cache
                .index_select(ctx_slots, 0)?
                .to_dtype(q.dtype())?
                .reshape((c, self.num_kv_heads, self.head_dim))?
                .transpose(0, 1)?
                .contiguous()?;
            let v_s = v_cache
                .index_select(ctx_slots, 0)?
                .to_dtype(q.dtype())?
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_data::data;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Device;

    /// Packed Q, K and V fused into one product give the three products' values, bit for
    /// bit: GQA, MQA, and K narrower than a run of 16 rows (then they stay three products).
    #[test]
    fn fused_packed_qkv_gives_the_separate_products() -> Result<()> {
        let dev = Device::Cpu;
        let (hidden, n) = (64, 5);
        for (dtype, heads, kv_heads, hd) in [
            (GgmlDType::Q8_0, 4, 2, 16),
            (GgmlDType::Q4_0, 4, 1, 16),
            (GgmlDType::Q8_0, 8, 1, 8),
        ] {
            let (q_dim, kv_dim) = (heads * hd, kv_heads * hd);
            let weight = |rows: usize, seed: u32| -> Result<Linear> {
                let w = Tensor::from_vec(data(rows * hidden, seed), (rows, hidden), &dev)?;
                Linear::quantized(QTensor::quantize(&w, dtype)?)
            };
            let separate = || -> Result<QkvProj> {
                Ok(QkvProj::Separate {
                    q: weight(q_dim, 1)?,
                    k: weight(kv_dim, 2)?,
                    v: weight(kv_dim, 3)?,
                })
            };
            let attn = Attention::new(separate()?, weight(hidden, 4)?, heads, kv_heads, hd);
            let QkvProj::Separate { q, k, v } = separate()? else {
                unreachable!()
            };
            if !matches!(q, Linear::Packed(_)) {
                return Ok(()); // no packed kernels on this CPU
            }
            assert_eq!(attn.fused(), kv_dim % 16 == 0, "{dtype:?} {kv_dim}");
            let xs = Tensor::from_vec(data(n * hidden, 5), (n, hidden), &dev)?;
            let (fq, fk, fv) = attn.project(&xs)?;
            let pairs = [
                (fq, q.forward(&xs)?),
                (fk, k.forward(&xs)?),
                (fv, v.forward(&xs)?),
            ];
            for (got, want) in pairs {
                let got: Vec<f32> = got.contiguous()?.flatten_all()?.to_vec1()?;
                let want: Vec<f32> = want.flatten_all()?.to_vec1()?;
                assert_eq!(got, want, "{dtype:?}");
            }
        }
        Ok(())
    }
}
