//! Integer kernels for GGML-quantized weights on x86 CPUs (the module is x86-only).
//!
//! On x86 CPUs with AVX-512 VNNI or AVX2 every format is packed on load for the kernels in
//! `packed.rs` and its neighbours ([`Packed`]; each format's `avx2.rs` for CPUs without
//! VNNI); this file holds the blocks and activations they share. Elsewhere (other
//! architectures, x86 without AVX2) `Linear` takes candle's quantized matmul.
//!
//! GGML's own kernels (candle's `QMatMul`) round the activations to 8 bits per block; on the
//! reference fixtures that alone moved q8_0 prompt logprobs by up to 0.29. Widening the
//! weights to f32 instead keeps accuracy but makes the product compute-bound (a third of the
//! memory roofline). Here activations are rounded to 16 bits per block of 32 (an error of at
//! most 1/65534 of the block's largest value, far below the weights' own rounding), so every
//! block is an exact integer dot product (`vpmaddwd`: 16 multiply-adds per instruction) with
//! one float scale per block and row. Integer sums are exact and each row's float
//! accumulation runs in a fixed order, so a row's result is the same alone or batched.
//!
//! The 4-bit formats' packed kernels round activations to 8 bits as GGML does (their error
//! is small next to 4-bit weights'); q8_0's keeps them at 16 bits.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, Result};
use half::f16;

/// GGML's q8_0 block, as candle stores it: an f16 scale, then 32 signed 8-bit weights.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ8_0 {
    d: [u8; 2],
    qs: [i8; 32],
}

/// GGML's q4_0 block: an f16 scale, then 16 bytes whose low nibbles are weights 0..16 and
/// high nibbles weights 16..32, each offset by 8.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4_0 {
    d: [u8; 2],
    qs: [u8; 16],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);

/// A GGML f16 scale, little-endian.
fn f16_le(d: [u8; 2]) -> f32 {
    f16::from_le_bytes(d).to_f32()
}

/// A GGML block as stored: `repr(C)` byte arrays only, so any bytes are a valid value.
///
/// # Safety
/// Implementors have alignment 1 and no invalid bit patterns.
pub unsafe trait RawBlock: Copy + Send + Sync + 'static {}

// SAFETY: `repr(C)` structs of byte arrays.
unsafe impl RawBlock for BlockQ8_0 {}
// SAFETY: as above.
unsafe impl RawBlock for BlockQ4_0 {}

/// A GGML block of 32 weights with one f16 scale (q8_0, q4_0).
pub trait Block: RawBlock {
    /// Weights per block.
    const PER: usize;
    /// The weight at index `i` of a block, as f32 (for tests).
    fn weight(&self, i: usize) -> f32;
}

impl Block for BlockQ8_0 {
    const PER: usize = 32;
    fn weight(&self, i: usize) -> f32 {
        f16_le(self.d) * self.qs[i] as f32
    }
}

impl Block for BlockQ4_0 {
    const PER: usize = 32;
    fn weight(&self, i: usize) -> f32 {
        let byte = self.qs[i % 16];
        let nibble = if i < 16 { byte & 0x0F } else { byte >> 4 };
        f16_le(self.d) * (nibble as i32 - 8) as f32
    }
}

/// Reads GGML block bytes (candle's `QTensor::data`) as blocks of `B`.
pub fn as_blocks<B: RawBlock>(bytes: &[u8]) -> Result<&[B]> {
    let size = std::mem::size_of::<B>();
    if !bytes.len().is_multiple_of(size) {
        bail!("{} bytes are not whole blocks of {size}", bytes.len());
    }
    // SAFETY: `RawBlock`s have alignment 1 and no invalid values, and the length was checked to be a whole number of blocks.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const B, bytes.len() / size) })
}

/// The scale and its inverse that round a block of activations whose largest magnitude is
/// `amax` onto integers in `-levels..=levels`: a NaN scale for a block with a non-finite
/// value (so the output says so), zero for an all-zero block or one so close to zero that
/// the inverse overflows. Shared by every rounding, scalar and SIMD, so they agree bit for bit.
pub(super) fn block_scale(amax: f32, finite: bool, levels: f32) -> (f32, f32) {
    let scale = amax / levels;
    if !finite {
        (f32::NAN, 0.0)
    } else if scale > 0.0 && (1.0 / scale).is_finite() {
        (scale, 1.0 / scale)
    } else {
        (0.0, 0.0)
    }
}

/// AVX2 pieces of the activations' rounding, the scalar code's operations 8 values at a time
/// (so the same values): rounding a 1,024-wide row value by value was 3% of a 16-sequence
/// step with the packed kernels.
mod round_avx2 {
    use std::arch::x86_64::*;

    /// A block's largest magnitude and whether all its values are finite.
    ///
    /// # Safety
    /// AVX2; `block.len()` a multiple of 8.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn amax(block: &[f32]) -> (f32, bool) {
        let sign = _mm256_set1_ps(-0.0);
        let (mut amax, mut bad) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for c in block.chunks_exact(8) {
            let v = _mm256_loadu_ps(c.as_ptr());
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
            // x - x is NaN exactly for infinities and NaNs.
            let z = _mm256_sub_ps(v, v);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_UNORD_Q>(z, z));
        }
        let m = _mm_max_ps(
            _mm256_castps256_ps128(amax),
            _mm256_extractf128_ps::<1>(amax),
        );
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
        (_mm_cvtss_f32(m), _mm256_movemask_ps(bad) == 0)
    }

    /// Values `p..p + 32` times `inv`, rounded half to even and clamped to `-levels..=levels`,
    /// as four vectors of eight i32.
    ///
    /// # Safety
    /// AVX2; `p` holds 32 values.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn round32(p: *const f32, inv: f32, levels: f32) -> [__m256i; 4] {
        let (inv, hi) = (_mm256_set1_ps(inv), _mm256_set1_ps(levels));
        let lo = _mm256_set1_ps(-levels);
        std::array::from_fn(|i| {
            let y = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(_mm256_loadu_ps(p.add(8 * i)), inv),
            );
            _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(y, lo), hi))
        })
    }

    /// Four vectors of i32 (each within i16) as 32 i16, in order.
    ///
    /// # Safety
    /// AVX2.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn to_i16(v: [__m256i; 4]) -> [__m256i; 2] {
        // `packs` works within 128-bit halves: put the 64-bit pieces back in order.
        let fix = |a, b| _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a, b));
        [fix(v[0], v[1]), fix(v[2], v[3])]
    }

    /// Four vectors of i32 (each within i8) as 32 i8, in order.
    ///
    /// # Safety
    /// AVX2.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn to_i8(v: [__m256i; 4]) -> __m256i {
        let p = _mm256_packs_epi16(
            _mm256_packs_epi32(v[0], v[1]),
            _mm256_packs_epi32(v[2], v[3]),
        );
        // Within each half the four pieces come a0 b0 c0 d0 | a1 b1 c1 d1 (4 values each).
        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }

    /// The sum of four vectors' 32 i32.
    ///
    /// # Safety
    /// AVX2.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum(v: [__m256i; 4]) -> i32 {
        let s = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }
}

/// Activations rounded to 16 bits per block of 32.
pub struct Rows16 {
    k: usize,
    /// `[m, k]` rounded values.
    q: Vec<i16>,
    /// `[m, k / 32]` scales: value = q * d.
    d: Vec<f32>,
}

/// One row of [`Rows16`].
#[derive(Clone, Copy)]
pub struct Row16<'a> {
    q: &'a [i16],
    d: &'a [f32],
}

impl packed::Activations for Rows16 {
    type Row<'a> = Row16<'a>;

    fn new(x: &[f32], k: usize) -> Self {
        Rows16::new(x, k)
    }

    fn rows(&self) -> Vec<Row16<'_>> {
        Rows16::rows(self)
    }
}

impl Rows16 {
    /// `x`: `[m, k]` row-major, `k` a multiple of 32.
    pub fn new(x: &[f32], k: usize) -> Self {
        let blocks = x.len() / 32;
        let mut rows = Self {
            k,
            q: vec![0; blocks * 32],
            d: vec![0.0; blocks],
        };
        if avx512::available() {
            // SAFETY: the CPU has AVX-512 F and BW.
            unsafe { avx512::fill16(x, &mut rows.q, &mut rows.d) };
            return rows;
        }
        if crate::model::cpu::simd().avx2 {
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { rows.fill_avx2(x) };
            return rows;
        }
        rows.fill(x);
        rows
    }

    /// [`Rows16::fill`] 8 values at a time: the same operations, so the same values.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fill_avx2(&mut self, x: &[f32]) {
        use std::arch::x86_64::{__m256i, _mm256_storeu_si256};
        let blocks = x.chunks_exact(32).zip(self.q.chunks_exact_mut(32));
        for ((block, q), d) in blocks.zip(self.d.iter_mut()) {
            let (amax, finite) = round_avx2::amax(block);
            let (scale, inv) = block_scale(amax, finite, 32767.0);
            *d = scale;
            if !finite {
                // The scalar code's values: x * 0 is 0, or NaN, which converts to 0.
                q.fill(0);
                continue;
            }
            let v = round_avx2::to_i16(round_avx2::round32(block.as_ptr(), inv, 32767.0));
            let out = q.as_mut_ptr() as *mut __m256i;
            _mm256_storeu_si256(out, v[0]);
            _mm256_storeu_si256(out.add(1), v[1]);
        }
    }

    #[inline(always)]
    fn fill(&mut self, x: &[f32]) {
        let blocks = x.chunks_exact(32).zip(self.q.chunks_exact_mut(32));
        for ((block, q), d) in blocks.zip(self.d.iter_mut()) {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            let finite = block.iter().all(|v| v.is_finite());
            let (scale, inv) = block_scale(amax, finite, 32767.0);
            for (q, v) in q.iter_mut().zip(block) {
                *q = (v * inv).round_ties_even().clamp(-32767.0, 32767.0) as i16;
            }
            *d = scale;
        }
    }

    pub fn rows(&self) -> Vec<Row16<'_>> {
        let kb = self.k / 32;
        (0..self.q.len() / self.k.max(1))
            .map(|i| Row16 {
                q: &self.q[i * self.k..(i + 1) * self.k],
                d: &self.d[i * kb..(i + 1) * kb],
            })
            .collect()
    }
}

/// Rows per pass of the kernels over the weights: their 16-bit activations (128 x 2 KB for a
/// 1,024-wide input) stay in L2 while every weight tile is multiplied by all of them.
pub const CHUNK_ROWS: usize = 128;

/// The products of 16-bit rounded activations with plain blocks in plain Rust: the
/// reference the packed kernels are tested against (a tile of `small_matmul::products`).
#[cfg(test)]
fn scalar_tile<B: Block>(xs: &[Row16<'_>], ws: &[&[B]], out: &mut [f32]) {
    let c = ws.len();
    for (r, x) in xs.iter().enumerate() {
        for (ci, w) in ws.iter().enumerate() {
            let mut acc = 0f64;
            for (bi, b) in w.iter().enumerate() {
                for i in 0..B::PER {
                    let p = bi * B::PER + i;
                    acc += (b.weight(i) * x.q[p] as f32 * x.d[p / 32]) as f64;
                }
            }
            out[r * c + ci] = acc as f32;
        }
    }
}

mod avx512;
mod packed;
mod q4_0;
pub mod q4k;
mod q8_0;
mod rows8;

/// A quantized weight packed on load for this CPU's VNNI or AVX2 kernels (see `packed.rs`).
pub enum Packed {
    Q4K(q4k::PackedQ4K),
    Q8_0(q8_0::PackedQ8_0),
    Q4_0(q4_0::PackedQ4_0),
}

impl Packed {
    /// `q` packed, or `None` where the CPU or the format has no packed kernel (candle's
    /// quantized matmul then takes it).
    pub fn new(q: &QTensor) -> Result<Option<Self>> {
        use packed::Group;
        if !q.device().is_cpu() {
            return Ok(None);
        }
        let (n, k) = q.shape().dims2()?;
        Ok(match q.dtype() {
            GgmlDType::Q4K if q4k::Q4kGroup::available() => {
                Some(Self::Q4K(q4k::pack(&q.data()?, n, k)?))
            }
            GgmlDType::Q8_0 if q8_0::Q8Group::available() => {
                Some(Self::Q8_0(q8_0::pack(&q.data()?, n, k)?))
            }
            GgmlDType::Q4_0 if q4_0::Q4Group::available() => {
                Some(Self::Q4_0(q4_0::pack(&q.data()?, n, k)?))
            }
            _ => None,
        })
    }

    pub fn dtype(&self) -> GgmlDType {
        match self {
            Self::Q4K(_) => GgmlDType::Q4K,
            Self::Q8_0(_) => GgmlDType::Q8_0,
            Self::Q4_0(_) => GgmlDType::Q4_0,
        }
    }

    /// `parts` one under another as one weight (see [`packed::PackedWeight::concat`]), or
    /// `None` where their formats or widths differ.
    pub fn concat(parts: &[&Packed]) -> Option<Packed> {
        macro_rules! all {
            ($variant:ident) => {{
                let ws: Option<Vec<_>> = parts
                    .iter()
                    .map(|p| match p {
                        Self::$variant(w) => Some(w),
                        _ => None,
                    })
                    .collect();
                packed::PackedWeight::concat(&ws?).map(Self::$variant)
            }};
        }
        match parts.first()? {
            Self::Q4K(_) => all!(Q4K),
            Self::Q8_0(_) => all!(Q8_0),
            Self::Q4_0(_) => all!(Q4_0),
        }
    }

    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Self::Q4K(w) => (w.rows(), w.cols()),
            Self::Q8_0(w) => (w.rows(), w.cols()),
            Self::Q4_0(w) => (w.rows(), w.cols()),
        }
    }

    /// `x [m, in] @ W^T`: `[m, out]` row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        match self {
            Self::Q4K(w) => w.matmul(x, m, CHUNK_ROWS),
            Self::Q8_0(w) => w.matmul(x, m, CHUNK_ROWS),
            Self::Q4_0(w) => w.matmul(x, m, CHUNK_ROWS),
        }
    }

    /// `combine(x Wg^T, x Wu^T)` with `self` the gate and `up` the up projection, in one
    /// pass (see [`packed::PackedWeight::gated_matmul`]): `[m, out]` row-major, or `None`
    /// where the two are not the same format and shape.
    pub fn gated_matmul(
        &self,
        up: &Packed,
        x: &[f32],
        m: usize,
        act: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
    ) -> Option<Vec<f32>> {
        if self.dims() != up.dims() {
            return None;
        }
        Some(match (self, up) {
            (Self::Q4K(g), Self::Q4K(u)) => g.gated_matmul(u, x, m, CHUNK_ROWS, act),
            (Self::Q8_0(g), Self::Q8_0(u)) => g.gated_matmul(u, x, m, CHUNK_ROWS, act),
            (Self::Q4_0(g), Self::Q4_0(u)) => g.gated_matmul(u, x, m, CHUNK_ROWS, act),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_data::data;
    use candle_core::{Device, Tensor};

    #[test]
    fn block_readers_match_candles_dequantization() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k) = (8, 512);
        let w = Tensor::from_vec(data(n * k, 11), (n, k), &dev)?;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
            let q = QTensor::quantize(&w, dtype)?;
            let want: Vec<f32> = q.dequantize(&dev)?.flatten_all()?.to_vec1()?;
            let bytes = q.data()?;
            let got: Vec<f32> = match dtype {
                GgmlDType::Q8_0 => weights(as_blocks::<BlockQ8_0>(&bytes)?),
                _ => weights(as_blocks::<BlockQ4_0>(&bytes)?),
            };
            assert_eq!(got.len(), want.len());
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-6 * (1.0 + e.abs()),
                    "{dtype:?} [{i}]: {g} vs {e}"
                );
            }
        }
        Ok(())
    }

    fn weights<B: Block>(blocks: &[B]) -> Vec<f32> {
        blocks
            .iter()
            .flat_map(|b| (0..B::PER).map(move |i| b.weight(i)))
            .collect()
    }

    /// Through [`Packed`], as `Linear` takes them: against candle's dequantized weights,
    /// for row counts the passes split differently and more than one pass of
    /// [`CHUNK_ROWS`]; a row alone the same as in the batch.
    #[test]
    fn packed_products_match_the_dequantized_weights_and_are_batch_invariant() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k) = (24, 512);
        let w = Tensor::from_vec(data(n * k, 7), (n, k), &dev)?;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4K] {
            let q = QTensor::quantize(&w, dtype)?;
            let Some(packed) = Packed::new(&q)? else {
                return Ok(()); // no packed kernel on this CPU
            };
            let deq = q.dequantize(&dev)?;
            let dw: Vec<f32> = deq.flatten_all()?.to_vec1()?;
            // Activations rounded to 16 bits per 32 (q8_0) or to 8 bits per 32 (q4_0) or
            // 256 (q4k, GGML's q8_K): each term off by at most |w| x the block's max|x| over
            // twice the levels.
            let (block, levels) = match dtype {
                GgmlDType::Q8_0 => (32, 32767.0),
                GgmlDType::Q4_0 => (32, 127.0),
                _ => (256, 127.0),
            };
            for m in [1, 2, 3, 4, 5, 6, 7, 9, 32, CHUNK_ROWS + 9] {
                let x = data(m * k, m as u32);
                let got = packed.matmul(&x, m);
                for r in 0..m {
                    let xr = &x[r * k..(r + 1) * k];
                    let step: Vec<f32> = xr
                        .chunks(block)
                        .map(|b| b.iter().fold(0f32, |a, v| a.max(v.abs())) / (2.0 * levels))
                        .collect();
                    for j in 0..n {
                        let wj = &dw[j * k..(j + 1) * k];
                        let want: f64 = wj.iter().zip(xr).map(|(w, x)| (w * x) as f64).sum();
                        let bound: f64 = wj
                            .iter()
                            .enumerate()
                            .map(|(i, w)| (w.abs() * step[i / block]) as f64)
                            .sum();
                        let g = got[r * n + j] as f64;
                        assert!(
                            (g - want).abs() <= bound * 1.01 + 1e-5,
                            "{dtype:?} m {m} [{r}, {j}]: {g} vs {want} (bound {bound})"
                        );
                    }
                }
                for i in (0..m).step_by(11) {
                    let alone = packed.matmul(&x[i * k..(i + 1) * k], 1);
                    assert_eq!(
                        alone[..],
                        got[i * n..(i + 1) * n],
                        "{dtype:?} m {m} row {i}"
                    );
                }
            }
        }
        Ok(())
    }

    /// The AVX-512 and AVX2 roundings of activations (those the CPU has) give the scalar
    /// code's values, bit for bit, on ordinary, all-zero, tiny, huge and non-finite blocks.
    #[test]
    fn simd_rounding_of_activations_matches_the_scalar_one() {
        let mut x = data(32 * 8, 12);
        x[32..64].fill(0.0);
        x[64..96].iter_mut().for_each(|v| *v *= 1e-37);
        x[96..128].iter_mut().for_each(|v| *v *= 3e38);
        x[130] = f32::INFINITY;
        x[170] = f32::NAN;
        x[200] = -0.0;
        let empty = || Rows16 {
            k: x.len(),
            q: vec![0; x.len()],
            d: vec![0.0; x.len() / 32],
        };
        let mut scalar = empty();
        scalar.fill(&x);
        let mut simd = Vec::new();
        if avx512::available() {
            let mut r = empty();
            // SAFETY: the CPU has AVX-512 F and BW (checked above).
            unsafe { avx512::fill16(&x, &mut r.q, &mut r.d) };
            simd.push(("avx512", r));
        }
        if crate::model::cpu::simd().avx2 {
            let mut r = empty();
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe { r.fill_avx2(&x) };
            simd.push(("avx2", r));
        }
        let bits = |d: &[f32]| d.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for (name, r) in simd {
            assert_eq!(r.q, scalar.q, "{name}");
            assert_eq!(bits(&r.d), bits(&scalar.d), "{name}");
        }
    }
}
