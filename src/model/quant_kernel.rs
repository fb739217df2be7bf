//! Integer kernels for GGML-quantized weights on the CPU.
//!
//! On x86 CPUs with AVX-512 VNNI or AVX2 every format is packed on load for the kernels in
//! `packed.rs` and its neighbours ([`Packed`]; each format's `avx2.rs` for CPUs without
//! VNNI); this file holds the blocks and activations they share, and the unpacked kernels
//! that `Linear` falls back to where nothing is packed.
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

use super::small_matmul::{has_simd, products};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, DType, Result, Tensor};
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

/// Computes the `m x c` dot products of all activation rows with up to `TILE_COLS` weight
/// rows into `out[i * c + ci]`.
pub type TileFn<B> = fn(&[Row16<'_>], &[&[B]], &mut [f32]);

/// A GGML block as stored: `repr(C)` byte arrays only, so any bytes are a valid value.
///
/// # Safety
/// Implementors have alignment 1 and no invalid bit patterns.
pub unsafe trait RawBlock: Copy + Send + Sync + 'static {}

// SAFETY: `repr(C)` structs of byte arrays.
unsafe impl RawBlock for BlockQ8_0 {}
// SAFETY: as above.
unsafe impl RawBlock for BlockQ4_0 {}

/// A GGML block type the 16-bit integer kernels read.
pub trait Block: RawBlock {
    /// Weights per block.
    const PER: usize;
    /// The weight at index `i` of a block, as f32 (for tests and the scalar kernel).
    fn weight(&self, i: usize) -> f32;
    /// The tile kernel: AVX2 where the CPU has it, else plain Rust.
    fn tile_kernel() -> TileFn<Self>;
}

macro_rules! tile_kernel {
    () => {
        fn tile_kernel() -> TileFn<Self> {
            #[cfg(target_arch = "x86_64")]
            if avx512::available() {
                return avx512::tile::<Self>;
            }
            #[cfg(target_arch = "x86_64")]
            if has_simd() {
                return avx2::tile::<Self>;
            }
            scalar_tile::<Self>
        }
    };
}

impl Block for BlockQ8_0 {
    const PER: usize = 32;
    tile_kernel!();
    fn weight(&self, i: usize) -> f32 {
        f16_le(self.d) * self.qs[i] as f32
    }
}

impl Block for BlockQ4_0 {
    const PER: usize = 32;
    tile_kernel!();
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

#[cfg(target_arch = "x86_64")]
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
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            // SAFETY: the CPU has AVX-512 F and BW.
            unsafe { avx512::fill16(x, &mut rows.q, &mut rows.d) };
            return rows;
        }
        #[cfg(target_arch = "x86_64")]
        if has_simd() {
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { rows.fill_avx2(x) };
            return rows;
        }
        rows.fill(x);
        rows
    }

    /// The same code compiled for AVX2, where rounding is one instruction (without it,
    /// `round_ties_even` is a libm call per value); IEEE rounding makes both identical.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fill_avx2(&mut self, x: &[f32]) {
        self.fill(x)
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

/// `xs @ W^T` for GGML-quantized weights on the CPU, activations kept to 16 bits (see the
/// module's comment). Every batch size runs the integer kernels, prefill chunks in passes of
/// [`CHUNK_ROWS`]: candle dequantizes a whole weight on one thread, which cost more than the
/// kernels' own product up to hundreds of rows (q8_0 3584 x 1024: 64 rows 4.2 ms that way,
/// 1.8 ms here), and so a row's result is the same in any batch, prefill included. `None` for
/// formats or CPUs without a kernel here (the caller then uses candle's quantized matmul).
pub fn quantized_matmul_t(xs: &Tensor, q: &QTensor) -> Result<Option<Tensor>> {
    if !xs.device().is_cpu() || !has_simd() || xs.rank() != 2 {
        return Ok(None);
    }
    match q.dtype() {
        GgmlDType::Q8_0 => quantized::<BlockQ8_0>(xs, q).map(Some),
        GgmlDType::Q4_0 => quantized::<BlockQ4_0>(xs, q).map(Some),
        _ => Ok(None),
    }
}

fn quantized<B: Block>(xs: &Tensor, q: &QTensor) -> Result<Tensor> {
    let (m, k) = xs.dims2()?;
    let (n, wk) = q.shape().dims2()?;
    if k != wk {
        bail!("quantized matmul: x is [{m}, {k}] but the weight is [{n}, {wk}]");
    }
    let xs = xs.to_dtype(DType::F32)?;
    let x: Vec<f32> = xs.flatten_all()?.to_vec1()?;
    let data = q.data()?;
    let w = as_blocks::<B>(&data)?;
    if !k.is_multiple_of(B::PER) || w.len() != n * (k / B::PER) {
        bail!(
            "quantized matmul: {} blocks do not make a [{n}, {k}] weight",
            w.len()
        );
    }
    let mut out = Vec::with_capacity(m * n);
    for rows in x.chunks(CHUNK_ROWS * k.max(1)) {
        out.extend(matmul_blocks(rows, rows.len() / k.max(1), w, n, k));
    }
    Tensor::from_vec(out, (m, n), xs.device())
}

/// `x [m, k] @ W^T` for `W` given as `n` rows of `k / B::PER` blocks: `[m, n]` row-major.
pub fn matmul_blocks<B: Block>(x: &[f32], m: usize, w: &[B], n: usize, k: usize) -> Vec<f32> {
    let acts = Rows16::new(&x[..m * k], k);
    products(&acts.rows(), w, n, k / B::PER, k, B::tile_kernel())
}

/// The same products in plain Rust on the same rounded activations, for tests and CPUs
/// without AVX2.
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

#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod packed;
#[cfg(target_arch = "x86_64")]
mod q4_0;
#[cfg(target_arch = "x86_64")]
pub mod q4k;
#[cfg(target_arch = "x86_64")]
mod q8_0;
#[cfg(target_arch = "x86_64")]
mod rows8;

/// A quantized weight packed on load for this CPU's VNNI or AVX2 kernels (see `packed.rs`).
#[cfg(target_arch = "x86_64")]
pub enum Packed {
    Q4K(q4k::PackedQ4K),
    Q8_0(q8_0::PackedQ8_0),
    Q4_0(q4_0::PackedQ4_0),
}

#[cfg(target_arch = "x86_64")]
impl Packed {
    /// `q` packed, or `None` where the CPU or the format has no packed kernel (candle's or
    /// the unpacked kernels then take it).
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

/// Pointers to the 16-bit values and block scales of `R` activation rows, for the kernels.
#[cfg(target_arch = "x86_64")]
struct Xs<const R: usize> {
    q: [*const i16; R],
    d: [*const f32; R],
}

#[cfg(target_arch = "x86_64")]
impl<const R: usize> Xs<R> {
    /// The first `R` of `rows`.
    fn new(rows: &[Row16<'_>]) -> Self {
        let mut x = Self {
            q: [std::ptr::null(); R],
            d: [std::ptr::null(); R],
        };
        for (r, row) in rows.iter().take(R).enumerate() {
            x.q[r] = row.q.as_ptr();
            x.d[r] = row.d.as_ptr();
        }
        x
    }
}

/// AVX2 kernels: per row and block, an exact i32 dot product of 16-bit weights and
/// activations, converted once and scaled into an 8-lane f32 accumulator.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::small_matmul::{avx2::hsum, prefetch_lines};
    use super::super::small_matmul::{TILE_COLS, TILE_ROWS};
    use super::{Block, BlockQ4_0, BlockQ8_0, Row16, Xs};
    use std::arch::x86_64::*;

    pub trait Dot: Block {
        /// Adds block `b`'s products with the `R` rows (from weight index `p`) to `acc`.
        ///
        /// # Safety
        /// The rows hold at least `p + PER` values; the CPU has AVX2, FMA and F16C.
        unsafe fn dot<const R: usize>(b: *const Self, x: &Xs<R>, p: usize, acc: &mut [__m256; R]);
    }

    /// An f16 scale, broadcast.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale(d: [u8; 2]) -> __m256 {
        _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes(d)))
    }

    /// 32 weights (two vectors of 16 i16) with scale `dw` against each row's block at `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot32<const R: usize>(
        w0: __m256i,
        w1: __m256i,
        dw: __m256,
        x: &Xs<R>,
        p: usize,
        acc: &mut [__m256; R],
    ) {
        for (r, acc) in acc.iter_mut().enumerate() {
            let xq = x.q[r].add(p) as *const __m256i;
            let s = _mm256_add_epi32(
                _mm256_madd_epi16(w0, _mm256_loadu_si256(xq)),
                _mm256_madd_epi16(w1, _mm256_loadu_si256(xq.add(1))),
            );
            let sc = _mm256_mul_ps(dw, _mm256_broadcast_ss(&*x.d[r].add(p / 32)));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, *acc);
        }
    }

    impl Dot for BlockQ8_0 {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn dot<const R: usize>(b: *const Self, x: &Xs<R>, p: usize, acc: &mut [__m256; R]) {
            let q = (*b).qs.as_ptr() as *const __m128i;
            let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(q));
            let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(1)));
            dot32(w0, w1, scale((*b).d), x, p, acc);
        }
    }

    impl Dot for BlockQ4_0 {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn dot<const R: usize>(b: *const Self, x: &Xs<R>, p: usize, acc: &mut [__m256; R]) {
            let bytes = _mm_loadu_si128((*b).qs.as_ptr() as *const __m128i);
            let mask = _mm_set1_epi8(0x0F);
            let eight = _mm_set1_epi8(8);
            let lo = _mm_sub_epi8(_mm_and_si128(bytes, mask), eight);
            let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16::<4>(bytes), mask), eight);
            let w0 = _mm256_cvtepi8_epi16(lo);
            let w1 = _mm256_cvtepi8_epi16(hi);
            dot32(w0, w1, scale((*b).d), x, p, acc);
        }
    }

    pub fn tile<B: Dot>(xs: &[Row16<'_>], ws: &[&[B]], out: &mut [f32]) {
        assert!(super::super::small_matmul::has_simd());
        let (m, c) = (xs.len(), ws.len());
        assert!(c <= TILE_COLS && out.len() >= m * c);
        let nb = ws.first().map_or(0, |w| w.len());
        let k = nb * B::PER;
        assert!(ws.iter().all(|w| w.len() == nb));
        assert!(xs.iter().all(|x| x.q.len() >= k && x.d.len() * 32 >= k));
        let full = m / TILE_ROWS * TILE_ROWS;
        // SAFETY: `has_simd()` confirmed the CPU features; every row holds `k` values and
        // every weight row `nb` blocks (checked above).
        unsafe {
            let mut j = 0;
            while j + 2 <= c {
                for i in (0..full).step_by(TILE_ROWS) {
                    block::<B, 4, 2>(&xs[i..i + 4], &ws[j..j + 2], nb, out, i, j, c);
                }
                j += 2;
            }
            if j < c {
                for i in (0..full).step_by(TILE_ROWS) {
                    block::<B, 4, 1>(&xs[i..i + 4], &ws[j..j + 1], nb, out, i, j, c);
                }
            }
            let rest = &xs[full..];
            match rest.len() {
                0 => {}
                1 => columns::<B, 1, 4>(rest, ws, nb, out, full),
                2 => columns::<B, 2, 4>(rest, ws, nb, out, full),
                _ => columns::<B, 3, 2>(rest, ws, nb, out, full),
            }
        }
    }

    /// All the tile's weight rows against `R` activation rows: blocks of `C`, then singles.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn columns<B: Dot, const R: usize, const C: usize>(
        xs: &[Row16<'_>],
        ws: &[&[B]],
        nb: usize,
        out: &mut [f32],
        i: usize,
    ) {
        let c = ws.len();
        let mut j = 0;
        while j + C <= c {
            block::<B, R, C>(xs, &ws[j..j + C], nb, out, i, j, c);
            j += C;
        }
        while j < c {
            block::<B, R, 1>(xs, &ws[j..j + 1], nb, out, i, j, c);
            j += 1;
        }
    }

    /// `R x C` products with their accumulators in registers.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block<B: Dot, const R: usize, const C: usize>(
        xs: &[Row16<'_>],
        ws: &[&[B]],
        nb: usize,
        out: &mut [f32],
        i: usize,
        j: usize,
        stride: usize,
    ) {
        let x = Xs::<R>::new(xs);
        let mut wp = [std::ptr::null::<B>(); C];
        for (p, w) in wp.iter_mut().zip(ws) {
            *p = w.as_ptr();
        }
        // Rows are short (a q8_0 row of 1024 weights is 17 cache lines) and read C at a time,
        // so the hardware prefetcher never gets going: fetch the rows the next tile reads,
        // C rows further on, at the same offset.
        let ahead = C * nb;
        let mut acc = [[_mm256_setzero_ps(); R]; C];
        for bi in 0..nb {
            for c in 0..C {
                let b = wp[c].add(bi);
                prefetch_lines(b.wrapping_add(ahead) as *const u8, std::mem::size_of::<B>());
                B::dot(b, &x, bi * B::PER, &mut acc[c]);
            }
        }
        for (c, acc) in acc.iter().enumerate() {
            for (r, a) in acc.iter().enumerate() {
                out[(i + r) * stride + j + c] = hsum(*a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_data::data;
    use candle_core::Device;

    const FORMATS: [GgmlDType; 2] = [GgmlDType::Q8_0, GgmlDType::Q4_0];

    #[test]
    fn block_readers_match_candles_dequantization() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k) = (8, 512);
        let w = Tensor::from_vec(data(n * k, 11), (n, k), &dev)?;
        for dtype in FORMATS {
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

    #[test]
    fn products_match_the_dequantized_weights() -> Result<()> {
        if !has_simd() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let (n, k) = (24, 512);
        let w = Tensor::from_vec(data(n * k, 7), (n, k), &dev)?;
        for dtype in FORMATS {
            let q = QTensor::quantize(&w, dtype)?;
            let deq = q.dequantize(&dev)?;
            for m in [1, 2, 3, 4, 5, 6, 7, 9, 32, 40, 130] {
                let x = Tensor::from_vec(data(m * k, m as u32), (m, k), &dev)?;
                let want = x.matmul(&deq.t()?)?;
                let got = quantized_matmul_t(&x, &q)?.expect("a kernel for each format");
                // 16-bit activations: each term off by at most |w| * max|x| / 65534.
                let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 2e-3, "{dtype:?} m = {m}: {diff}");
            }
        }
        Ok(())
    }

    /// Every SIMD kernel the CPU has (not only the one `tile_kernel` picks) against the
    /// scalar one on the same rounded activations, and a row alone against the same row in
    /// a batch.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_simd_kernel_matches_the_scalar_one_and_is_batch_invariant() -> Result<()> {
        let (m, n, k) = (7, 20, 512);
        let w = Tensor::from_vec(data(n * k, 3), (n, k), &Device::Cpu)?;
        let x = data(m * k, 4);
        let acts = Rows16::new(&x, k);
        let rows = acts.rows();
        for dtype in FORMATS {
            let q = QTensor::quantize(&w, dtype)?;
            let bytes = q.data()?;
            match dtype {
                GgmlDType::Q8_0 => check(&rows, as_blocks::<BlockQ8_0>(&bytes)?, n, k),
                _ => check(&rows, as_blocks::<BlockQ4_0>(&bytes)?, n, k),
            }
        }
        Ok(())
    }

    #[cfg(target_arch = "x86_64")]
    fn check<B: avx2::Dot + avx512::Dot512>(rows: &[Row16<'_>], w: &[B], n: usize, k: usize) {
        let kw = k / B::PER;
        let want = products(rows, w, n, kw, k, scalar_tile::<B>);
        let mut kernels: Vec<(&str, TileFn<B>)> = Vec::new();
        if has_simd() {
            kernels.push(("avx2", avx2::tile::<B>));
        }
        if avx512::available() {
            kernels.push(("avx512", avx512::tile::<B>));
        }
        for (name, kernel) in kernels {
            let got = products(rows, w, n, kw, k, kernel);
            for (g, e) in got.iter().zip(&want) {
                assert!(
                    (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{name}: {g} vs {e}"
                );
            }
            for i in 0..rows.len() {
                let alone = products(&rows[i..i + 1], w, n, kw, k, kernel);
                assert_eq!(alone[..], got[i * n..(i + 1) * n], "{name}: row {i}");
            }
        }
    }

    #[test]
    fn a_row_is_bit_identical_alone_and_batched() -> Result<()> {
        if !has_simd() {
            return Ok(());
        }
        let dev = Device::Cpu;
        // More rows than one pass of the kernels takes, as in a prefill chunk.
        let (m, n, k) = (CHUNK_ROWS + 9, 40, 256);
        let x = Tensor::from_vec(data(m * k, 5), (m, k), &dev)?;
        let w = Tensor::from_vec(data(n * k, 6), (n, k), &dev)?;
        for dtype in FORMATS {
            let q = QTensor::quantize(&w, dtype)?;
            let batched = quantized_matmul_t(&x, &q)?.expect("a kernel");
            let batched: Vec<Vec<f32>> = batched.to_vec2()?;
            for (i, row) in batched.iter().enumerate().step_by(11) {
                let alone = quantized_matmul_t(&x.narrow(0, i, 1)?, &q)?.expect("a kernel");
                assert_eq!(&alone.to_vec2::<f32>()?[0], row, "{dtype:?} row {i}");
            }
        }
        Ok(())
    }

    /// The AVX-512 rounding of activations gives the scalar code's values, bit for bit, on
    /// ordinary, all-zero, tiny, huge and non-finite blocks.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_rounding_of_activations_matches_the_scalar_one() {
        if !avx512::available() {
            return;
        }
        let mut x = data(32 * 8, 12);
        x[32..64].fill(0.0);
        x[64..96].iter_mut().for_each(|v| *v *= 1e-37);
        x[96..128].iter_mut().for_each(|v| *v *= 3e38);
        x[130] = f32::INFINITY;
        x[170] = f32::NAN;
        x[200] = -0.0;
        let mut scalar = Rows16 {
            k: x.len(),
            q: vec![0; x.len()],
            d: vec![0.0; x.len() / 32],
        };
        scalar.fill(&x);
        let (mut q, mut d) = (vec![0i16; x.len()], vec![0f32; x.len() / 32]);
        // SAFETY: the CPU has AVX-512 F and BW (checked above).
        unsafe { avx512::fill16(&x, &mut q, &mut d) };
        assert_eq!(q, scalar.q);
        let bits = |d: &[f32]| d.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&d), bits(&scalar.d));
    }

    #[test]
    fn non_finite_activations_give_non_finite_output() -> Result<()> {
        if !has_simd() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let k = 64;
        let mut x = data(k, 9);
        x[3] = f32::NAN;
        let x = Tensor::from_vec(x, (1, k), &dev)?;
        let w = Tensor::from_vec(data(2 * k, 10), (2, k), &dev)?;
        let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let got: Vec<f32> = quantized_matmul_t(&x, &q)?
            .expect("a kernel")
            .flatten_all()?
            .to_vec1()?;
        assert!(got.iter().all(|v| v.is_nan()), "{got:?}");
        Ok(())
    }
}
