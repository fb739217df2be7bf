//! Small-batch matrix products on the CPU: `x [m, k] @ W^T` with `W` stored `[n, k]` and m a
//! handful of rows (one per decoding sequence, or an expert's share of them).
//!
//! Decoding is bound by reading the weights: each step must stream every active weight
//! from memory once, for all its rows together. A general gemm packs its operands into
//! cache-sized panels first, which for a few rows costs more than the product itself (and
//! candle's bf16 path converts the whole weight on every call). Here each weight row is read
//! once, straight from its `[n, k]` storage, and dotted with every activation row while it
//! sits in L1; the activations (m x k floats) stay in L2. Output columns are split across
//! the rayon pool.
//!
//! Each output element is one fixed-order dot product whatever `m` is and wherever its row
//! sits in the batch, so a sequence gets bit-identical results alone or batched.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

/// Up to this many rows take the small-batch path. Beyond it gemm's packing pays for itself:
/// with the AVX2 kernel, for f32 weights from 16 rows on (`cargo bench --bench matmul`: equal
/// at 16, gemm 1.3x faster at 32); the AVX-512 one and bf16/f16 stay faster up to 32 rows.
pub const MAX_ROWS: usize = 32;
const MAX_ROWS_F32: usize = 16;

/// `xs @ weight^T` through [`SmallBatchMatmul`]; the caller checks the device and row count.
pub fn small_matmul_t(xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
    xs.apply_op2_no_bwd(weight, &SmallBatchMatmul)
}

/// Whether [`small_matmul_t`] handles this product.
pub fn applies(xs: &Tensor, weight: &Tensor) -> bool {
    let supported = |dt: DType| matches!(dt, DType::F32 | DType::BF16 | DType::F16);
    let max_rows = match weight.dtype() {
        DType::F32 if !has_avx512() => MAX_ROWS_F32,
        _ => MAX_ROWS,
    };
    xs.device().is_cpu()
        && xs.rank() == 2
        && weight.rank() == 2
        && (1..=max_rows).contains(&xs.dims()[0])
        && supported(xs.dtype())
        && supported(weight.dtype())
}

pub struct SmallBatchMatmul;

/// A contiguous row-major view of a CPU tensor's elements.
fn contiguous<'a, T: WithDType>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("small-batch matmul needs contiguous operands"),
    }
}

/// The activations as f32 (they are small: m x k).
fn activations_f32(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    Ok(match s {
        CpuStorage::F32(d) => contiguous(d, l)?.to_vec(),
        CpuStorage::BF16(d) => contiguous(d, l)?.iter().map(|v| v.to_f32()).collect(),
        CpuStorage::F16(d) => contiguous(d, l)?.iter().map(|v| v.to_f32()).collect(),
        other => bail!("small-batch matmul: unsupported dtype {:?}", other.dtype()),
    })
}

impl CustomOp2 for SmallBatchMatmul {
    fn name(&self) -> &'static str {
        "small-batch-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, wk) = wl.shape().dims2()?;
        if k != wk {
            bail!("small-batch matmul: x is [{m}, {k}] but the weight is [{n}, {wk}]");
        }
        let x = activations_f32(xs, xl)?;
        let out = match ws {
            CpuStorage::F32(d) => matmul_rows(&x, m, contiguous(d, wl)?, n, k),
            CpuStorage::BF16(d) => matmul_rows(&x, m, contiguous(d, wl)?, n, k),
            CpuStorage::F16(d) => matmul_rows(&x, m, contiguous(d, wl)?, n, k),
            other => bail!("small-batch matmul: unsupported dtype {:?}", other.dtype()),
        };
        let storage = match xs.dtype() {
            DType::F32 => CpuStorage::F32(out),
            DType::BF16 => CpuStorage::BF16(out.iter().map(|&v| bf16::from_f32(v)).collect()),
            DType::F16 => CpuStorage::F16(out.iter().map(|&v| f16::from_f32(v)).collect()),
            dt => bail!("small-batch matmul: unsupported dtype {dt:?}"),
        };
        Ok((storage, Shape::from((m, n))))
    }
}

/// A float weight format the kernels read (GGML's blocks have integer kernels of their
/// own, in `quant_kernel.rs`).
pub trait WeightElem: Copy + Send + Sync + 'static {
    /// The weight at index `q` of a row, as f32.
    fn get(row: &[Self], q: usize) -> f32;
    /// The dot-tile kernel for this format: the SIMD one when the CPU has it.
    fn tile_kernel() -> TileFn<Self>;
}

/// Computes the `m x c` dot products of all activation rows with up to [`TILE_COLS`] weight
/// rows into `out[i * c + ci]`.
pub type TileFn<W> = fn(&[&[f32]], &[&[W]], &mut [f32]);

/// Whether the float kernels run 16 lanes wide (then f32 products beat gemm up to 32 rows).
fn has_avx512() -> bool {
    super::cpu::simd().avx512
}

macro_rules! weight_elem {
    ($ty:ty, $get:expr) => {
        impl WeightElem for $ty {
            fn get(row: &[Self], q: usize) -> f32 {
                $get(row, q)
            }
            fn tile_kernel() -> TileFn<Self> {
                #[cfg(target_arch = "x86_64")]
                if avx512::available() {
                    return avx512::tile::<$ty>;
                }
                #[cfg(target_arch = "x86_64")]
                if avx2::available() {
                    return avx2::tile::<$ty>;
                }
                portable::tile::<$ty>
            }
        }
    };
}
weight_elem!(f32, |r: &[f32], q: usize| r[q]);
weight_elem!(bf16, |r: &[bf16], q: usize| r[q].to_f32());
weight_elem!(f16, |r: &[f16], q: usize| r[q].to_f32());

/// Activation rows per register block, and weight rows per kernel call (whose reads from
/// DRAM are shared by all the activation rows).
pub(super) const TILE_ROWS: usize = 4;
pub(super) const TILE_COLS: usize = 8;

/// The least work worth handing to another thread.
pub(super) const MIN_WEIGHTS_PER_TASK: usize = 64 * 1024;

/// `x [m, k] @ W^T` for `W` given as `n` rows of `k` weights: `[m, n]` row-major.
pub fn matmul_rows<W: WeightElem>(x: &[f32], m: usize, w: &[W], n: usize, k: usize) -> Vec<f32> {
    let x_rows: Vec<&[f32]> = x.chunks_exact(k.max(1)).take(m).collect();
    products(&x_rows, w, n, k, k, W::tile_kernel())
}

/// The output matrix, shared by the tasks that fill disjoint column ranges of it.
pub(super) struct SharedOut(pub(super) *mut f32);
// SAFETY: tasks write disjoint columns (see `products`), and the buffer outlives them.
unsafe impl Sync for SharedOut {}

/// All products of the activation rows `xs` (`k` wide) with the `n` weight rows of `w`
/// (`kw` elements each): `[m, n]` row-major. `kernel` computes one tile: every activation
/// row against up to [`TILE_COLS`] weight rows, into `out[i * c + ci]`.
pub(super) fn products<X: Sync, W: Sync>(
    xs: &[X],
    w: &[W],
    n: usize,
    kw: usize,
    k: usize,
    kernel: impl Fn(&[X], &[&[W]], &mut [f32]) + Sync,
) -> Vec<f32> {
    let m = xs.len();
    let mut out = vec![0f32; m * n];
    if n == 0 || m == 0 {
        return out;
    }
    // Chunks of at least ~64K weights (the pool's hand-off costs microseconds), and enough
    // of them to balance the pool; small products run on the calling thread.
    let threads = rayon::current_num_threads().max(1);
    let min_cols = (MIN_WEIGHTS_PER_TASK / k.max(1)).max(1);
    let cols = n
        .div_ceil(threads * 4)
        .max(min_cols)
        .clamp(TILE_COLS, 512)
        .next_multiple_of(TILE_COLS);
    let shared = SharedOut(out.as_mut_ptr());
    let run = |chunk: usize| {
        let shared = &shared;
        let mut tile = vec![0f32; m * TILE_COLS];
        for j in (chunk * cols..((chunk + 1) * cols).min(n)).step_by(TILE_COLS) {
            let c = TILE_COLS.min(n - j);
            let mut w_rows: [&[W]; TILE_COLS] = [&[]; TILE_COLS];
            for (ci, row) in w_rows.iter_mut().take(c).enumerate() {
                *row = &w[(j + ci) * kw..(j + ci + 1) * kw];
            }
            kernel(xs, &w_rows[..c], &mut tile[..m * c]);
            for i in 0..m {
                // SAFETY: row i, columns j..j + c: inside the buffer, and this chunk's alone.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        tile[i * c..].as_ptr(),
                        shared.0.add(i * n + j),
                        c,
                    );
                }
            }
        }
    };
    let chunks = n.div_ceil(cols);
    if chunks == 1 {
        run(0);
    } else {
        (0..chunks).into_par_iter().for_each(run);
    }
    out
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512;

/// Prefetches into L1 the cache lines of `bytes` bytes from `p`. A hint only: the address
/// need not be valid (the kernels prefetch the next tile's rows, which may lie past the end).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn prefetch_lines(p: *const u8, bytes: usize) {
    prefetch_lines_as::<{ std::arch::x86_64::_MM_HINT_T0 }>(p, bytes);
}

/// [`prefetch_lines`] with the hint `HINT` (`_MM_HINT_NTA` for weights a step reads once).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn prefetch_lines_as<const HINT: i32>(p: *const u8, bytes: usize) {
    let mut off = 0;
    while off < bytes {
        // SAFETY: a prefetch never faults, whatever the address (SSE, always on x86_64).
        unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(p.wrapping_add(off) as *const i8) };
        off += 64;
    }
}

/// Plain Rust, for CPUs without AVX2 (the compiler vectorises the 8-lane accumulators).
mod portable {
    use super::WeightElem;

    pub fn tile<W: WeightElem>(xs: &[&[f32]], ws: &[&[W]], out: &mut [f32]) {
        let c = ws.len();
        for (r, x) in xs.iter().enumerate() {
            for (ci, w) in ws.iter().enumerate() {
                out[r * c + ci] = dot(x, w);
            }
        }
    }

    fn dot<W: WeightElem>(x: &[f32], w: &[W]) -> f32 {
        let k = w.len();
        let k8 = k / 8 * 8;
        let mut acc = [0f32; 8];
        for p in (0..k8).step_by(8) {
            for (l, a) in acc.iter_mut().enumerate() {
                *a += x[p + l] * W::get(w, p + l);
            }
        }
        let tail: f32 = (k8..k).map(|q| x[q] * W::get(w, q)).sum();
        acc.iter().sum::<f32>() + tail
    }
}

/// AVX2 + FMA kernels. Every product is one 8-lane FMA chain over `k` in order, summed
/// across lanes the same way, whatever the tile shape: results do not depend on `m`.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::{prefetch_lines, WeightElem, TILE_COLS, TILE_ROWS};
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        crate::model::cpu::simd().avx2
    }

    /// Loads 32 weights (from index `p`, a multiple of 32) as four vectors of f32 lanes.
    pub trait Lanes: WeightElem {
        /// # Safety
        /// `row` must hold weights `p..p + 32`, on a CPU with AVX2, FMA and F16C.
        unsafe fn load32(row: *const Self, p: usize) -> [__m256; 4];
    }

    macro_rules! float_lanes {
        ($ty:ty, $load8:expr) => {
            impl Lanes for $ty {
                #[inline]
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn load32(row: *const Self, p: usize) -> [__m256; 4] {
                    let at = row.add(p);
                    let load8 = $load8;
                    [
                        load8(at),
                        load8(at.add(8)),
                        load8(at.add(16)),
                        load8(at.add(24)),
                    ]
                }
            }
        };
    }
    float_lanes!(f32, |p: *const f32| _mm256_loadu_ps(p));
    // bf16 is the top half of an f32: widen to 32 bits and shift into place.
    float_lanes!(bf16, |p: *const bf16| {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    });
    float_lanes!(f16, |p: *const f16| _mm256_cvtph_ps(_mm_loadu_si128(
        p as *const __m128i
    )));

    pub fn tile<W: Lanes>(xs: &[&[f32]], ws: &[&[W]], out: &mut [f32]) {
        let (m, c) = (xs.len(), ws.len());
        assert!(c <= TILE_COLS && out.len() >= m * c);
        let k = ws.first().map_or(0, |w| w.len());
        assert!(xs.iter().all(|x| x.len() >= k) && ws.iter().all(|w| w.len() >= k));
        let k32 = k / 32 * 32;
        let full = m / TILE_ROWS * TILE_ROWS;
        // SAFETY: chosen only once `available()` has confirmed the CPU features; every row
        // holds at least `k32` weights (checked above) and the blocks read no further.
        unsafe {
            // Two weight rows at a time for every group of 4 activation rows: the pair comes
            // from DRAM once and is re-read from L1 by the following groups.
            let mut j = 0;
            while j + 2 <= c {
                for i in (0..full).step_by(TILE_ROWS) {
                    block::<W, 4, 2>(&xs[i..i + 4], &ws[j..j + 2], k32, out, i, j, c);
                }
                j += 2;
            }
            if j < c {
                for i in (0..full).step_by(TILE_ROWS) {
                    block::<W, 4, 1>(&xs[i..i + 4], &ws[j..j + 1], k32, out, i, j, c);
                }
            }
            // The 1-3 rows left: about 8 accumulators hide the FMA latency, so the fewer
            // the rows, the more weight rows per block.
            let rest = &xs[full..];
            match rest.len() {
                0 => {}
                1 => columns::<W, 1, 8>(rest, ws, k32, out, full),
                2 => columns::<W, 2, 4>(rest, ws, k32, out, full),
                _ => columns::<W, 3, 2>(rest, ws, k32, out, full),
            }
        }
        // Rows whose length is not a multiple of 32 end here (skipped when there is no
        // tail: the empty loop over every output cost a tenth of a 64-wide LM head).
        if k32 == k {
            return;
        }
        for (i, x) in xs.iter().enumerate() {
            for (ci, w) in ws.iter().enumerate() {
                let tail: f32 = (k32..k).map(|q| x[q] * W::get(w, q)).sum();
                out[i * c + ci] += tail;
            }
        }
    }

    /// All the tile's weight rows against `R` activation rows: blocks of `C`, then singles.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn columns<W: Lanes, const R: usize, const C: usize>(
        xs: &[&[f32]],
        ws: &[&[W]],
        k32: usize,
        out: &mut [f32],
        i: usize,
    ) {
        let c = ws.len();
        let mut j = 0;
        while j + C <= c {
            block::<W, R, C>(xs, &ws[j..j + C], k32, out, i, j, c);
            j += C;
        }
        while j < c {
            block::<W, R, 1>(xs, &ws[j..j + 1], k32, out, i, j, c);
            j += 1;
        }
    }

    /// `R x C` products with their accumulators in registers (fixed trip counts unroll).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block<W: Lanes, const R: usize, const C: usize>(
        xs: &[&[f32]],
        ws: &[&[W]],
        k32: usize,
        out: &mut [f32],
        i: usize,
        j: usize,
        stride: usize,
    ) {
        let mut xp = [std::ptr::null::<f32>(); R];
        for (p, x) in xp.iter_mut().zip(xs) {
            *p = x.as_ptr();
        }
        let mut wp = [std::ptr::null::<W>(); C];
        for (p, w) in wp.iter_mut().zip(ws) {
            *p = w.as_ptr();
        }
        // Prefetch the rows the next tile reads (C rows on, same offset): far enough ahead
        // for DRAM latency even when several activation rows slow the pass down, which
        // a fixed distance inside the row was not.
        let ahead = C * ws.first().map_or(0, |w| w.len());
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut p = 0;
        while p < k32 {
            for c in 0..C {
                let next = wp[c].wrapping_add(ahead + p) as *const u8;
                prefetch_lines(next, 32 * std::mem::size_of::<W>());
                let wv = W::load32(wp[c], p);
                for (g, w) in wv.iter().enumerate() {
                    for r in 0..R {
                        let x = _mm256_loadu_ps(xp[r].add(p + 8 * g));
                        acc[r][c] = _mm256_fmadd_ps(x, *w, acc[r][c]);
                    }
                }
            }
            p += 32;
        }
        for r in 0..R {
            for c in 0..C {
                out[(i + r) * stride + j + c] = hsum(acc[r][c]);
            }
        }
    }

    /// The sum of a vector's 8 lanes, always by the same tree.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_data::data;
    use candle_core::Device;

    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
            }
        }
        out
    }

    #[test]
    fn matches_reference_for_odd_shapes_and_all_dtypes() -> Result<()> {
        let dev = Device::Cpu;
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 7, 13),
            (3, 5, 8),
            (4, 2, 16),
            (5, 33, 70),
            (32, 64, 264),
        ] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let want = reference(&x, &w, m, n, k);
            let xt = Tensor::from_vec(x, (m, k), &dev)?;
            let wt = Tensor::from_vec(w, (n, k), &dev)?;
            for dt in [DType::F32, DType::BF16, DType::F16] {
                let wd = wt.to_dtype(dt)?;
                // The reference on the rounded weights, so only summation order differs.
                let w_rounded: Vec<f32> = wd.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let want_dt = reference(&xt.flatten_all()?.to_vec1()?, &w_rounded, m, n, k);
                let got: Vec<f32> = small_matmul_t(&xt, &wd)?.flatten_all()?.to_vec1()?;
                for (g, e) in got.iter().zip(&want_dt) {
                    assert!(
                        (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{dt:?} {m}x{n}x{k}: {g} vs {e}"
                    );
                }
            }
            let got: Vec<f32> = small_matmul_t(&xt, &wt)?.flatten_all()?.to_vec1()?;
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()));
            }
        }
        Ok(())
    }

    #[test]
    fn bf16_activations_give_bf16_output() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(data(2 * 16, 3), (2, 16), &dev)?.to_dtype(DType::BF16)?;
        let w = Tensor::from_vec(data(3 * 16, 4), (3, 16), &dev)?.to_dtype(DType::BF16)?;
        let got = small_matmul_t(&x, &w)?;
        assert_eq!(got.dtype(), DType::BF16);
        let want = x
            .to_dtype(DType::F32)?
            .matmul(&w.to_dtype(DType::F32)?.t()?)?;
        let diff = (got.to_dtype(DType::F32)? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 0.05, "{diff}");
        Ok(())
    }

    #[test]
    fn a_row_is_bit_identical_alone_and_batched() -> Result<()> {
        let dev = Device::Cpu;
        let (m, n, k) = (7, 40, 96);
        let x = Tensor::from_vec(data(m * k, 5), (m, k), &dev)?;
        let w = Tensor::from_vec(data(n * k, 6), (n, k), &dev)?;
        let batched: Vec<Vec<f32>> = small_matmul_t(&x, &w)?.to_vec2()?;
        for (i, row) in batched.iter().enumerate() {
            let alone: Vec<Vec<f32>> = small_matmul_t(&x.narrow(0, i, 1)?, &w)?.to_vec2()?;
            assert_eq!(&alone[0], row, "row {i}");
        }
        Ok(())
    }

    /// Each SIMD kernel the CPU has, not only the one `tile_kernel` picks: every kernel
    /// against the reference, and a row alone against the same row in a batch.
    #[test]
    fn every_available_kernel_matches_and_is_batch_invariant() {
        let kernels: Vec<(&str, TileFn<f32>)> = {
            let mut v: Vec<(&str, TileFn<f32>)> = vec![("portable", portable::tile::<f32>)];
            #[cfg(target_arch = "x86_64")]
            {
                if avx2::available() {
                    v.push(("avx2", avx2::tile::<f32>));
                }
                if avx512::available() {
                    v.push(("avx512", avx512::tile::<f32>));
                }
            }
            v
        };
        let (m, n, k) = (11, 37, 200);
        let x = data(m * k, 21);
        let w = data(n * k, 22);
        let want = reference(&x, &w, m, n, k);
        let rows: Vec<&[f32]> = x.chunks_exact(k).collect();
        for (name, kernel) in kernels {
            let got = products(&rows, &w, n, k, k, kernel);
            for (g, e) in got.iter().zip(&want) {
                assert!(
                    (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{name}: {g} vs {e}"
                );
            }
            for i in 0..m {
                let alone = products(&rows[i..i + 1], &w, n, k, k, kernel);
                assert_eq!(alone[..], got[i * n..(i + 1) * n], "{name}: row {i}");
            }
        }
    }

    #[test]
    fn mismatched_inner_dims_are_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 8), DType::F32, &dev)?;
        let w = Tensor::zeros((3, 9), DType::F32, &dev)?;
        assert!(small_matmul_t(&x, &w).is_err());
        Ok(())
    }
}
