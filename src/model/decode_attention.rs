//! Attention of single-token (decode) queries straight from the paged KV cache, on the CPU.
//!
//! The general path gathers a sequence's keys and values out of the cache (`index_select`),
//! transposes them per head and runs two small matmuls and a softmax: half a dozen tensor
//! copies and allocations per sequence, layer and step, which grow with the context. Here each
//! (sequence, KV head) pair reads its cache rows in place, computes the scores of its query
//! heads, the softmax and the weighted sum of values in f32, and the pairs run on the rayon
//! pool. Each query's result depends only on its own sequence, so batching cannot change it.

use candle_core::{bail, CpuStorage, Result, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Shapes of the attention being computed.
#[derive(Clone, Copy)]
pub struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// One decode query: its row in `q` and the cache slots of the keys it attends.
pub struct Query<'a> {
    pub row: usize,
    pub slots: &'a [u32],
}

/// A KV cache element read as f32.
trait CacheElem: Copy + Send + Sync {
    fn f32(self) -> f32;
}
impl CacheElem for f32 {
    fn f32(self) -> f32 {
        self
    }
}
impl CacheElem for bf16 {
    fn f32(self) -> f32 {
        self.to_f32()
    }
}
impl CacheElem for f16 {
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

/// Less work than this (multiply-adds) stays on the calling thread.
const MIN_PARALLEL_WORK: usize = 32 * 1024;

/// Whether [`attend`] handles a cache in this storage (CPU, f32 / bf16 / f16).
pub fn supports(cache: &Tensor) -> bool {
    cache.device().is_cpu()
        && matches!(
            cache.dtype(),
            candle_core::DType::F32 | candle_core::DType::BF16 | candle_core::DType::F16
        )
}

/// `q`: `[n, num_heads * head_dim]` f32, row-major; `k_cache` / `v_cache`: `[slots, kv_heads *
/// head_dim]`. Returns, per query, its `num_heads * head_dim` outputs.
pub fn attend(
    q: &[f32],
    k_cache: &Tensor,
    v_cache: &Tensor,
    queries: &[Query<'_>],
    heads: Heads,
) -> Result<Vec<Vec<f32>>> {
    let (ks, kl) = k_cache.storage_and_layout();
    let (vs, vl) = v_cache.storage_and_layout();
    let (Some((k0, k1)), Some((v0, v1))) = (kl.contiguous_offsets(), vl.contiguous_offsets())
    else {
        bail!("decode attention needs contiguous caches");
    };
    match (&*ks, &*vs) {
        (Storage::Cpu(CpuStorage::F32(k)), Storage::Cpu(CpuStorage::F32(v))) => {
            run(q, &k[k0..k1], &v[v0..v1], queries, heads)
        }
        (Storage::Cpu(CpuStorage::BF16(k)), Storage::Cpu(CpuStorage::BF16(v))) => {
            run(q, &k[k0..k1], &v[v0..v1], queries, heads)
        }
        (Storage::Cpu(CpuStorage::F16(k)), Storage::Cpu(CpuStorage::F16(v))) => {
            run(q, &k[k0..k1], &v[v0..v1], queries, heads)
        }
        _ => bail!("decode attention: unsupported cache storage"),
    }
}

fn run<T: CacheElem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    queries: &[Query<'_>],
    h: Heads,
) -> Result<Vec<Vec<f32>>> {
    let hd = h.head_dim;
    let kv_dim = h.num_kv_heads * hd;
    let q_dim = h.num_heads * hd;
    let groups = h.num_heads / h.num_kv_heads.max(1);
    let slots = k.len() / kv_dim.max(1);
    for query in queries {
        if (query.row + 1) * q_dim > q.len() {
            bail!("decode attention: query row {} outside q", query.row);
        }
        if let Some(s) = query.slots.iter().find(|&&s| s as usize >= slots) {
            bail!("decode attention: slot {s} outside the cache of {slots}");
        }
    }
    // One task per (query, KV head): its `groups` query heads share the keys it reads.
    let tasks: Vec<(usize, usize)> = (0..queries.len())
        .flat_map(|i| (0..h.num_kv_heads).map(move |kh| (i, kh)))
        .collect();
    let task = |&(i, kh): &(usize, usize)| {
        let query = &queries[i];
        let mut out = vec![0f32; groups * hd];
        let mut scores = vec![0f32; query.slots.len()];
        for g in 0..groups {
            let head = kh * groups + g;
            let qv = &q[query.row * q_dim + head * hd..][..hd];
            for (s, &slot) in scores.iter_mut().zip(query.slots) {
                let kv = &k[slot as usize * kv_dim + kh * hd..][..hd];
                *s = dot(qv, kv) * h.scale;
            }
            let max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out[g * hd..(g + 1) * hd];
            for (p, &slot) in scores.iter().zip(query.slots) {
                let vv = &v[slot as usize * kv_dim + kh * hd..][..hd];
                let p = p / sum;
                for (o, &x) in o.iter_mut().zip(vv) {
                    *o += p * x.f32();
                }
            }
        }
        out
    };
    let work: usize = queries.iter().map(|q| q.slots.len()).sum::<usize>() * q_dim * 2;
    let parts: Vec<Vec<f32>> = if work < MIN_PARALLEL_WORK {
        tasks.iter().map(task).collect()
    } else {
        tasks.par_iter().map(task).collect()
    };
    // Reassemble per query: KV head kh holds query heads kh * groups..(kh + 1) * groups.
    let mut outs = Vec::with_capacity(queries.len());
    for per_query in parts.chunks(h.num_kv_heads.max(1)) {
        outs.push(per_query.concat());
    }
    Ok(outs)
}

/// A dot product over eight independent lanes, so it vectorises.
fn dot<T: CacheElem>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (ca, cb) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l].f32();
        }
    }
    let tail: f32 = a[chunks..]
        .iter()
        .zip(&b[chunks..])
        .map(|(x, y)| x * y.f32())
        .sum();
    acc.iter().sum::<f32>() + tail
}
