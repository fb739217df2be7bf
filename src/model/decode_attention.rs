//! Attention of single-token (decode) queries straight from the paged KV cache, on the CPU.
//!
//! The general path gathers a sequence's keys and values out of the cache (`index_select`),
//! transposes them per head and runs two small matmuls and a softmax: half a dozen tensor
//! copies and allocations per sequence, layer and step, which grow with the context. Here each
//! (sequence, KV head) pair reads its cache rows in place, computes the scores of its query
//! heads, the softmax and the weighted sum of values in f32, and the pairs run on the rayon
//! pool. Each query's result depends only on its own sequence, so batching cannot change it.

use super::layers::{exp_shifted, softmax_rows_with};
use candle_core::{bail, CpuStorage, Result, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
use avx512::Load16 as Simd;
/// What the x86 kernels need of a cache element, needed of none elsewhere.
#[cfg(not(target_arch = "x86_64"))]
trait Simd {}
#[cfg(not(target_arch = "x86_64"))]
impl<T> Simd for T {}

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
trait CacheElem: Copy + Send + Sync + Simd {
    fn f32(self) -> f32;
    /// Whether a row is converted whole ([`CacheElem::widen`]) before the loops read it,
    /// rather than an element at a time inside them. f16's one-at-a-time conversion made the
    /// 16-sequence decode attention 6x slower than over an f32 cache; bf16's is a shift.
    const WIDEN: bool = false;
    /// `row` as f32 into `buf` (as long).
    fn widen(row: &[Self], buf: &mut [f32]) {
        for (b, x) in buf.iter_mut().zip(row) {
            *b = x.f32();
        }
    }
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
    const WIDEN: bool = true;
    /// The `half` crate's SIMD conversion (F16C where the CPU has it).
    fn widen(row: &[Self], buf: &mut [f32]) {
        row.convert_to_f32_slice(&mut buf[..row.len()]);
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
    // One task per query and run of KV heads: the whole run's part of each cache row is read
    // in one go (contiguous lines, each page visited once), for all the query heads that use
    // it. Runs are split finer only when there are too few queries to feed the pool. Every
    // head's arithmetic is the same however the runs fall, so the split cannot change results.
    let threads = rayon::current_num_threads().max(1);
    let splits = (2 * threads)
        .div_ceil(queries.len().max(1))
        .clamp(1, h.num_kv_heads.max(1));
    let per_task = h.num_kv_heads.div_ceil(splits).max(1);
    let tasks: Vec<(usize, usize)> = (0..queries.len())
        .flat_map(|i| (0..h.num_kv_heads).step_by(per_task).map(move |kh| (i, kh)))
        .collect();
    let task = |&(i, kh): &(usize, usize)| {
        let query = &queries[i];
        let run = per_task.min(h.num_kv_heads - kh);
        let qs = &q[query.row * q_dim + kh * groups * hd..][..run * groups * hd];
        let (k, v) = (&k[kh * hd..], &v[kh * hd..]);
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            // SAFETY: the CPU has AVX-512 F, BW and VL; every slot was checked to be inside
            // the caches, and `k` / `v` start at KV head `kh`'s first element.
            let out = unsafe { avx512::kv_heads(qs, k, v, query.slots, kv_dim, run, hd, h.scale) };
            if let Some(out) = out {
                return out;
            }
        }
        #[cfg(target_arch = "x86_64")]
        if crate::model::cpu::simd().avx2 {
            // SAFETY: the CPU has AVX2, FMA and F16C.
            return unsafe { kv_heads_avx2(qs, k, v, query.slots, kv_dim, run, h) };
        }
        kv_heads(qs, k, v, query.slots, kv_dim, run, h, false)
    };
    let work: usize = queries.iter().map(|q| q.slots.len()).sum::<usize>() * q_dim * 2;
    let parts: Vec<Vec<f32>> = if work < MIN_PARALLEL_WORK {
        tasks.iter().map(task).collect()
    } else {
        tasks.par_iter().map(task).collect()
    };
    // Reassemble per query: a run from KV head kh holds query heads from kh * groups on.
    let mut outs = Vec::with_capacity(queries.len());
    for per_query in parts.chunks(h.num_kv_heads.div_ceil(per_task).max(1)) {
        outs.push(per_query.concat());
    }
    Ok(outs)
}

/// How many slots ahead [`kv_heads`] prefetches the cache rows it will read.
const PREFETCH_SLOTS: usize = 4;

/// [`kv_heads`] compiled for AVX2 (the same operations, 8 lanes at a time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kv_heads_avx2<T: CacheElem>(
    qs: &[f32],
    k: &[T],
    v: &[T],
    slots: &[u32],
    kv_dim: usize,
    run: usize,
    h: Heads,
) -> Vec<f32> {
    kv_heads(qs, k, v, slots, kv_dim, run, h, true)
}

/// `run` consecutive KV heads and the query heads `qs` that use them (`run * groups *
/// head_dim`), against their keys and values (`k` / `v` start at the first head's first
/// element; a slot's row is `kv_dim` on). Each slot's `run * head_dim` keys and values are
/// read once, for all the query heads. `avx2`: called from [`kv_heads_avx2`] (the CPU has
/// AVX2 and FMA), so the softmax's exponentials take 8 lanes at a time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn kv_heads<T: CacheElem>(
    qs: &[f32],
    k: &[T],
    v: &[T],
    slots: &[u32],
    kv_dim: usize,
    run: usize,
    h: Heads,
    avx2: bool,
) -> Vec<f32> {
    let hd = h.head_dim;
    let heads = qs.len() / hd.max(1);
    let groups = heads / run.max(1);
    let n = slots.len();
    let width = run * hd;
    let mut scores = vec![0f32; heads * n];
    let mut wide = vec![0f32; if T::WIDEN { width } else { 0 }];
    // Rows are a head's slice of scattered cache slots: too short and far apart for the
    // hardware prefetcher, so fetch the rows a few slots ahead.
    let ahead = |rows: &[T], si: usize| {
        #[cfg(target_arch = "x86_64")]
        if let Some(&slot) = slots.get(si + PREFETCH_SLOTS) {
            let row = rows[slot as usize * kv_dim..].as_ptr() as *const u8;
            super::small_matmul::prefetch_lines(row, width * std::mem::size_of::<T>());
        }
        let _ = (rows, si);
    };
    for (si, &slot) in slots.iter().enumerate() {
        ahead(k, si);
        let row = &k[slot as usize * kv_dim..][..width];
        let at = Slot { si, n, hd, groups };
        if T::WIDEN {
            T::widen(row, &mut wide);
            at.score(&wide, qs, h.scale, &mut scores);
        } else {
            at.score(row, qs, h.scale, &mut scores);
        }
    }
    softmax_rows_with(&mut scores, n, |head, max| {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: `avx2` only from `kv_heads_avx2`, which the CPU's AVX2 and FMA gate.
            return unsafe { softmax_avx2::exp_shifted(head, max) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = avx2;
        exp_shifted(head, max)
    });
    let mut out = vec![0f32; heads * hd];
    for (si, &slot) in slots.iter().enumerate() {
        ahead(v, si);
        let row = &v[slot as usize * kv_dim..][..width];
        let at = Slot { si, n, hd, groups };
        if T::WIDEN {
            T::widen(row, &mut wide);
            at.add_values(&wide, &scores, &mut out);
        } else {
            at.add_values(row, &scores, &mut out);
        }
    }
    out
}

/// One cache slot of a [`kv_heads`] run: its index among the `n` slots, and the shape.
#[derive(Clone, Copy)]
struct Slot {
    si: usize,
    n: usize,
    hd: usize,
    groups: usize,
}

impl Slot {
    /// Each query head's score against this slot's keys (`row`: the run's KV heads), KV
    /// head by KV head, then its query heads: no division per head and slot.
    #[inline(always)]
    fn score<U: CacheElem>(self, row: &[U], qs: &[f32], scale: f32, scores: &mut [f32]) {
        let Slot { si, n, hd, groups } = self;
        for (kh, kv) in row.chunks_exact(hd).enumerate() {
            for g in 0..groups {
                let j = kh * groups + g;
                scores[j * n + si] = dot(&qs[j * hd..][..hd], kv) * scale;
            }
        }
    }

    /// This slot's values (`row`), weighted by each query head's probability, into `out`.
    #[inline(always)]
    fn add_values<U: CacheElem>(self, row: &[U], probs: &[f32], out: &mut [f32]) {
        let Slot { si, n, hd, groups } = self;
        for (kh, vv) in row.chunks_exact(hd).enumerate() {
            for g in 0..groups {
                let j = kh * groups + g;
                let p = probs[j * n + si];
                for (o, &x) in out[j * hd..][..hd].iter_mut().zip(vv) {
                    *o += p * x.f32();
                }
            }
        }
    }
}

/// [`exp_shifted`] 8 lanes at a time (`simd_exp.rs`): libm's `expf`, one value per call,
/// was ~9% of the decode attention's CPU time (16 queries of ~48 slots, timed per layer).
#[cfg(target_arch = "x86_64")]
mod softmax_avx2 {
    use super::super::simd_exp::exp8 as exp;
    use std::arch::x86_64::*;

    /// `s = e^(s - max)` over `xs`, returning their sum: 8-lane partial sums, then the tail.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(xs: &mut [f32], max: f32) -> f32 {
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut sum: f32 = lanes.iter().sum();
        for s in chunks.into_remainder() {
            let mut v = [0f32; 8];
            v[0] = *s - max;
            let mut e = [0f32; 8];
            _mm256_storeu_ps(e.as_mut_ptr(), exp(_mm256_loadu_ps(v.as_ptr())));
            *s = e[0];
            sum += e[0];
        }
        sum
    }
}

/// A dot product over eight independent lanes, so it vectorises.
#[inline(always)]
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The 8-lane exponentials against libm's: within 3 ulp over a softmax's range, the
    /// clamped low end tiny, NaN kept, every tail length; and the sum is the values' sum.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vectorised_softmax_exponentials_track_libm() {
        if !crate::model::cpu::simd().avx2 {
            return;
        }
        let mut xs: Vec<f32> = data(3000, 9).iter().map(|v| v * 44.0 - 44.0).collect();
        xs.extend([
            0.0,
            -1e-30,
            -87.0,
            -87.5,
            -100.0,
            -1e4,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        for len in [xs.len(), 1, 7, 8, 9, 23] {
            let mut got = xs[..len].to_vec();
            // SAFETY: AVX2 and FMA checked above.
            let sum = unsafe { softmax_avx2::exp_shifted(&mut got, 0.0) };
            let mut total = 0f64;
            for (i, (&x, &g)) in xs[..len].iter().zip(&got).enumerate() {
                let want = x.exp();
                if want.is_nan() {
                    assert!(g.is_nan(), "[{i}] e^{x} -> {g}");
                    continue;
                }
                total += g as f64;
                if x < -87.3 {
                    assert!((0.0..=1.3e-38).contains(&g), "[{i}] e^{x} -> {g}");
                    continue;
                }
                let ulp = (want * f32::EPSILON).max(f32::MIN_POSITIVE);
                assert!((g - want).abs() <= 3.0 * ulp, "[{i}] e^{x}: {g} vs {want}");
            }
            if !sum.is_nan() {
                assert!(
                    (sum as f64 - total).abs() <= 1e-5 * total.max(1e-30),
                    "{sum} vs {total}"
                );
            }
        }
    }
    use crate::model::test_data::data;
    use candle_core::{DType, Device};

    /// Softmax(q k^T * scale) v per query head, in f64, from the same cache rows.
    fn naive(q: &[f32], k: &[f32], v: &[f32], row: usize, slots: &[u32], h: Heads) -> Vec<f32> {
        let (hd, groups) = (h.head_dim, h.num_heads / h.num_kv_heads);
        let (q_dim, kv_dim) = (h.num_heads * hd, h.num_kv_heads * hd);
        let mut out = vec![0f32; q_dim];
        for head in 0..h.num_heads {
            let kh = head / groups;
            let qv = &q[row * q_dim + head * hd..][..hd];
            let scores: Vec<f64> = slots
                .iter()
                .map(|&s| {
                    let kv = &k[s as usize * kv_dim + kh * hd..][..hd];
                    qv.iter().zip(kv).map(|(a, b)| (a * b) as f64).sum::<f64>() * h.scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..hd {
                let acc: f64 = slots
                    .iter()
                    .zip(&e)
                    .map(|(&s, p)| p / sum * v[s as usize * kv_dim + kh * hd + d] as f64)
                    .sum();
                out[head * hd + d] = acc as f32;
            }
        }
        out
    }

    #[test]
    fn matches_a_naive_computation_for_gqa_and_each_cache_dtype() -> Result<()> {
        let h = Heads {
            num_heads: 6,
            num_kv_heads: 3,
            head_dim: 20,
            scale: 1.0 / (20f32).sqrt(),
        };
        let (n, slots) = (4, 50);
        let kv_dim = h.num_kv_heads * h.head_dim;
        let q = data(n * h.num_heads * h.head_dim, 1);
        let k = data(slots * kv_dim, 2);
        let v = data(slots * kv_dim, 3);
        // Scattered, out-of-order slots, as block tables give them.
        let a: Vec<u32> = vec![7, 3, 49, 20, 21, 22, 0];
        let b: Vec<u32> = (10..40).rev().collect();
        let queries = [Query { row: 1, slots: &a }, Query { row: 3, slots: &b }];
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let kt = Tensor::from_vec(k.clone(), (slots, kv_dim), &dev)?.to_dtype(dtype)?;
            let vt = Tensor::from_vec(v.clone(), (slots, kv_dim), &dev)?.to_dtype(dtype)?;
            // The reference reads the same rounded values.
            let kr: Vec<f32> = kt.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let vr: Vec<f32> = vt.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            assert!(supports(&kt));
            let got = attend(&q, &kt, &vt, &queries, h)?;
            for (out, query) in got.iter().zip(&queries) {
                let want = naive(&q, &kr, &vr, query.row, query.slots, h);
                for (g, e) in out.iter().zip(&want) {
                    assert!((g - e).abs() < 1e-5, "{dtype:?}: {g} vs {e}");
                }
            }
        }
        Ok(())
    }

    /// A query's output is bit-identical alone (its KV heads split over tasks) and among many
    /// queries (one task each), with MQA, GQA and one-head-per-KV-head shapes.
    #[test]
    fn a_query_alone_and_batched_gets_the_same_bits() -> Result<()> {
        for (num_heads, num_kv_heads) in [(8, 1), (8, 4), (6, 6)] {
            let h = Heads {
                num_heads,
                num_kv_heads,
                head_dim: 16,
                scale: 0.25,
            };
            let (n, slots) = (12, 64);
            let kv_dim = num_kv_heads * 16;
            let q = data(n * num_heads * 16, 4);
            let k = Tensor::from_vec(data(slots * kv_dim, 5), (slots, kv_dim), &Device::Cpu)?;
            let v = Tensor::from_vec(data(slots * kv_dim, 6), (slots, kv_dim), &Device::Cpu)?;
            let tables: Vec<Vec<u32>> = (0..n as u32)
                .map(|i| (0..20 + i).map(|j| (j * 7 + i) % slots as u32).collect())
                .collect();
            let queries: Vec<Query> = tables
                .iter()
                .enumerate()
                .map(|(row, slots)| Query { row, slots })
                .collect();
            let batched = attend(&q, &k, &v, &queries, h)?;
            for (i, query) in queries.iter().enumerate() {
                let alone = attend(&q, &k, &v, std::slice::from_ref(query), h)?;
                assert_eq!(
                    alone[0], batched[i],
                    "{num_heads}/{num_kv_heads} heads, query {i}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn slots_outside_the_cache_are_an_error() -> Result<()> {
        let h = Heads {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 8,
            scale: 0.5,
        };
        let dev = Device::Cpu;
        let cache = Tensor::zeros((4, 8), DType::F32, &dev)?;
        let q = vec![0f32; 16];
        let bad = [Query {
            row: 0,
            slots: &[1, 4],
        }];
        assert!(attend(&q, &cache, &cache, &bad, h).is_err());
        Ok(())
    }
}
