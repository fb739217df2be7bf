//! AVX-512 versions of the integer kernels: a block of 32 weights is one 512-bit register of
//! 16-bit values, so a row's block product is one `vpmaddwd`, one conversion and one scaled
//! FMA, about half the instructions of the AVX2 kernel, which is compute-bound once several
//! rows share each weight. Same arithmetic (exact i32 block sums, one f32 scale per block and
//! row), chosen at run time for every product on CPUs with AVX-512F and BW.

use super::super::small_matmul::{avx512::store_sums, prefetch_lines, TILE_COLS};
use super::{Block, BlockQ4_0, BlockQ8_0, Row16, Xs};
use std::arch::x86_64::*;

pub fn available() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

/// [`super::Rows16`]'s rounding, a block of 32 per step: the same operations as the scalar
/// code (scale = max|x| / 32767, q = round-to-even(x * (1 / scale)), NaN scale for non-finite
/// blocks), so the same values.
///
/// # Safety
/// The CPU has AVX-512 F and BW; `q` holds `x.len()` values and `d` one per 32.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn fill16(x: &[f32], q: &mut [i16], d: &mut [f32]) {
    assert!(q.len() >= x.len() && d.len() * 32 >= x.len() && x.len().is_multiple_of(32));
    let limit = _mm512_set1_ps(32767.0);
    for (bi, d) in d.iter_mut().enumerate().take(x.len() / 32) {
        let p = x.as_ptr().add(bi * 32);
        let (a, b) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
        // x - x is NaN exactly for infinities and NaNs.
        let bad = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(_mm512_sub_ps(a, a), _mm512_sub_ps(b, b));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        let out = q.as_mut_ptr().add(bi * 32) as *mut __m256i;
        let (scale, inv) = super::block_scale(amax, bad == 0, 32767.0);
        if bad != 0 {
            // The scalar code's values: x * 0 is 0, or NaN, which converts to 0.
            _mm256_storeu_si256(out, _mm256_setzero_si256());
            _mm256_storeu_si256(out.add(1), _mm256_setzero_si256());
            *d = scale;
            continue;
        }
        let inv = _mm512_set1_ps(inv);
        let round = |v: __m512| {
            let y = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(v, inv),
            );
            _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_max_ps(
                _mm512_min_ps(y, limit),
                _mm512_sub_ps(_mm512_setzero_ps(), limit),
            )))
        };
        _mm256_storeu_si256(out, round(a));
        _mm256_storeu_si256(out.add(1), round(b));
        *d = scale;
    }
}

pub trait Dot512: Block {
    /// Adds block `b`'s products with the `R` rows (from weight index `p`) to `acc`.
    ///
    /// # Safety
    /// The rows hold at least `p + PER` values; the CPU has AVX-512F and BW.
    unsafe fn dot<const R: usize>(b: *const Self, x: &Xs<R>, p: usize, acc: &mut [__m512; R]);
}

/// An f16 scale, broadcast.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn scale(d: [u8; 2]) -> __m512 {
    _mm512_cvtph_ps(_mm256_set1_epi16(i16::from_le_bytes(d)))
}

/// 32 weights as i16 with scale `dw` against each row's block at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn dot32<const R: usize>(
    w: __m512i,
    dw: __m512,
    x: &Xs<R>,
    p: usize,
    acc: &mut [__m512; R],
) {
    for (r, acc) in acc.iter_mut().enumerate() {
        let s = _mm512_madd_epi16(w, _mm512_loadu_si512(x.q[r].add(p) as *const __m512i));
        let sc = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d[r].add(p / 32)));
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, *acc);
    }
}

impl Dot512 for BlockQ8_0 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn dot<const R: usize>(b: *const Self, x: &Xs<R>, p: usize, acc: &mut [__m512; R]) {
        let w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((*b).qs.as_ptr() as *const __m256i));
        dot32(w, scale((*b).d), x, p, acc);
    }
}

impl Dot512 for BlockQ4_0 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn dot<const R: usize>(b: *const Self, x: &Xs<R>, p: usize, acc: &mut [__m512; R]) {
        let bytes = _mm_loadu_si128((*b).qs.as_ptr() as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(bytes, mask);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), mask);
        // Weights 0..16 are the low nibbles, 16..32 the high ones, each offset by 8.
        let q = _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
        dot32(_mm512_cvtepi8_epi16(q), scale((*b).d), x, p, acc);
    }
}

pub fn tile<B: Dot512>(xs: &[Row16<'_>], ws: &[&[B]], out: &mut [f32]) {
    assert!(available());
    let (m, c) = (xs.len(), ws.len());
    assert!(c <= TILE_COLS && out.len() >= m * c);
    let nb = ws.first().map_or(0, |w| w.len());
    let k = nb * B::PER;
    assert!(ws.iter().all(|w| w.len() == nb));
    assert!(xs.iter().all(|x| x.q.len() >= k && x.d.len() * 32 >= k));
    // SAFETY: `available()` confirmed the CPU features; every row holds `k` values and
    // every weight row `nb` blocks (checked above).
    unsafe {
        // Groups of 4 rows against 4 weight rows (read from DRAM once, re-read from L1 by
        // the following groups), then the rows left.
        let full = m / 4 * 4;
        let mut j = 0;
        while j + 4 <= c {
            for i in (0..full).step_by(4) {
                block::<B, 4, 4>(&xs[i..i + 4], &ws[j..j + 4], nb, out, i, j, c);
            }
            j += 4;
        }
        while j < c {
            for i in (0..full).step_by(4) {
                block::<B, 4, 1>(&xs[i..i + 4], &ws[j..j + 1], nb, out, i, j, c);
            }
            j += 1;
        }
        let rest = &xs[full..];
        match rest.len() {
            0 => {}
            1 => columns::<B, 1, 8>(rest, ws, nb, out, full),
            2 => columns::<B, 2, 4>(rest, ws, nb, out, full),
            _ => columns::<B, 3, 4>(rest, ws, nb, out, full),
        }
    }
}

/// All the tile's weight rows against `R` activation rows: blocks of `C`, then singles.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn columns<B: Dot512, const R: usize, const C: usize>(
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
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn block<B: Dot512, const R: usize, const C: usize>(
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
    // Prefetch the rows the next tile reads (C rows on, same offset): the hardware
    // prefetcher misses these short rows.
    let ahead = C * nb;
    let mut acc = [[_mm512_setzero_ps(); R]; C];
    for bi in 0..nb {
        for c in 0..C {
            let b = wp[c].add(bi);
            prefetch_lines(b.wrapping_add(ahead) as *const u8, std::mem::size_of::<B>());
            B::dot(b, &x, bi * B::PER, &mut acc[c]);
        }
    }
    for r in 0..R {
        let mut row = [_mm512_setzero_ps(); C];
        for (v, acc) in row.iter_mut().zip(&acc) {
            *v = acc[r];
        }
        let at = (i + r) * stride + j;
        store_sums(&row, &mut out[at..at + C]);
    }
}
