//! Activations rounded to 8 bits for the VNNI kernels (`vpdpbusd` multiplies unsigned 8-bit
//! weights by signed 8-bit activations): one scale per block of `B` values, as GGML rounds
//! them for its 4-bit formats.

use super::packed::Activations;
use super::{block_scale, round_avx2};
use std::arch::x86_64::*;

/// Activations rounded to 8 bits per block of `B` values (GGML's `q8_K` for `B` = 256, its
/// `q8_0` for 32), with the sum of every 32 rounded values (for the weights' mins or offsets).
pub struct Rows8<const B: usize> {
    k: usize,
    /// `[m, k]`.
    q: Vec<i8>,
    /// `[m, k / B]`: value = q * d.
    d: Vec<f32>,
    /// `[m, k / 32]`: each 32 values' sum of q.
    sums: Vec<i16>,
}

/// One row of [`Rows8`].
#[derive(Clone, Copy)]
pub struct Row8<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub sums: &'a [i16],
}

/// The values, scales and sums of `R` rows as pointers, for the kernels' inner loops.
pub struct RowPtrs<const R: usize> {
    pub q: [*const i8; R],
    pub d: [*const f32; R],
    pub sums: [*const i16; R],
}

impl<const R: usize> RowPtrs<R> {
    /// The first `R` of `rows`.
    pub fn new(rows: &[Row8<'_>]) -> Self {
        let mut p = Self {
            q: [std::ptr::null(); R],
            d: [std::ptr::null(); R],
            sums: [std::ptr::null(); R],
        };
        for (r, x) in rows.iter().take(R).enumerate() {
            p.q[r] = x.q.as_ptr();
            p.d[r] = x.d.as_ptr();
            p.sums[r] = x.sums.as_ptr();
        }
        p
    }
}

impl<const B: usize> Activations for Rows8<B> {
    type Row<'a> = Row8<'a>;

    /// `x`: `[m, k]` row-major, `k` a multiple of `B`.
    fn new(x: &[f32], k: usize) -> Self {
        let blocks = x.len() / B;
        let mut rows = Self {
            k,
            q: vec![0; blocks * B],
            d: vec![0.0; blocks],
            sums: vec![0; blocks * B / 32],
        };
        if super::avx512::available() {
            // SAFETY: the CPU has AVX-512 F and BW.
            unsafe { rows.fill_avx512(x) };
        } else if crate::model::cpu::simd().avx2 {
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { rows.fill_avx2(x) };
        } else {
            rows.fill(x);
        }
        rows
    }

    fn rows(&self) -> Vec<Row8<'_>> {
        let (kb, ks) = (self.k / B, self.k / 32);
        (0..self.q.len() / self.k.max(1))
            .map(|i| Row8 {
                q: &self.q[i * self.k..(i + 1) * self.k],
                d: &self.d[i * kb..(i + 1) * kb],
                sums: &self.sums[i * ks..(i + 1) * ks],
            })
            .collect()
    }
}

impl<const B: usize> Rows8<B> {
    /// [`Rows8::fill`] a vector at a time: the same operations, so the same values.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn fill_avx512(&mut self, x: &[f32]) {
        let limit = _mm512_set1_ps(127.0);
        let blocks = x.chunks_exact(B).zip(self.q.chunks_exact_mut(B));
        let rest = self.d.iter_mut().zip(self.sums.chunks_exact_mut(B / 32));
        for ((block, q), (d, sums)) in blocks.zip(rest) {
            let v = |i: usize| _mm512_loadu_ps(block[16 * i..].as_ptr());
            let (mut amax, mut bad) = (_mm512_setzero_ps(), 0u16);
            for i in 0..B / 16 {
                let v = v(i);
                amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
                // x - x is NaN exactly for infinities and NaNs.
                let z = _mm512_sub_ps(v, v);
                bad |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(z, z);
            }
            let (scale, inv) = block_scale(_mm512_reduce_max_ps(amax), bad == 0, 127.0);
            *d = scale;
            if bad != 0 {
                // The scalar code's values: x * 0 is 0, or NaN, which converts to 0.
                q.fill(0);
                sums.fill(0);
                continue;
            }
            let inv = _mm512_set1_ps(inv);
            for (j, sum) in sums.iter_mut().enumerate() {
                let round = |v: __m512| {
                    let y = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                        _mm512_mul_ps(v, inv),
                    );
                    let y = _mm512_max_ps(
                        _mm512_min_ps(y, limit),
                        _mm512_sub_ps(_mm512_setzero_ps(), limit),
                    );
                    _mm512_cvtps_epi32(y)
                };
                let (a, b) = (round(v(2 * j)), round(v(2 * j + 1)));
                let out = q[32 * j..].as_mut_ptr() as *mut __m128i;
                _mm_storeu_si128(out, _mm512_cvtepi32_epi8(a));
                _mm_storeu_si128(out.add(1), _mm512_cvtepi32_epi8(b));
                *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(a, b)) as i16;
            }
        }
    }

    /// [`Rows8::fill`] 8 values at a time: the same operations, so the same values.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fill_avx2(&mut self, x: &[f32]) {
        let blocks = x.chunks_exact(B).zip(self.q.chunks_exact_mut(B));
        let rest = self.d.iter_mut().zip(self.sums.chunks_exact_mut(B / 32));
        for ((block, q), (d, sums)) in blocks.zip(rest) {
            let (amax, finite) = round_avx2::amax(block);
            let (scale, inv) = block_scale(amax, finite, 127.0);
            *d = scale;
            if !finite {
                // The scalar code's values: x * 0 is 0, or NaN, which converts to 0.
                q.fill(0);
                sums.fill(0);
                continue;
            }
            for (j, sum) in sums.iter_mut().enumerate() {
                let v = round_avx2::round32(block[32 * j..].as_ptr(), inv, 127.0);
                _mm256_storeu_si256(
                    q[32 * j..].as_mut_ptr() as *mut __m256i,
                    round_avx2::to_i8(v),
                );
                *sum = round_avx2::sum(v) as i16;
            }
        }
    }

    #[inline(always)]
    fn fill(&mut self, x: &[f32]) {
        let blocks = x.chunks_exact(B).zip(self.q.chunks_exact_mut(B));
        let rest = self.d.iter_mut().zip(self.sums.chunks_exact_mut(B / 32));
        for ((block, q), (d, sums)) in blocks.zip(rest) {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            let finite = block.iter().all(|v| v.is_finite());
            let (scale, inv) = block_scale(amax, finite, 127.0);
            for (q, v) in q.iter_mut().zip(block) {
                *q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
            }
            for (sum, q) in sums.iter_mut().zip(q.chunks_exact(32)) {
                *sum = q.iter().map(|&v| v as i16).sum();
            }
            *d = scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_data::data;

    /// The AVX-512 and AVX2 roundings (those the CPU has) give the scalar code's values, on
    /// ordinary, zero, tiny, huge and non-finite super-blocks.
    #[test]
    fn simd_rounding_of_activations_matches_the_scalar_one() {
        check::<256>();
        check::<32>();
    }

    fn check<const B: usize>() {
        let mut x = data(B * 6, 13);
        x[B..2 * B].fill(0.0);
        x[2 * B..3 * B].iter_mut().for_each(|v| *v *= 1e-37);
        x[3 * B..4 * B].iter_mut().for_each(|v| *v *= 3e38);
        x[4 * B + 7] = f32::NEG_INFINITY;
        x[5 * B + B / 2] = f32::NAN;
        x[5 * B - 3] = -0.0;
        let empty = || Rows8::<B> {
            k: x.len(),
            q: vec![0; x.len()],
            d: vec![0.0; x.len() / B],
            sums: vec![0; x.len() / 32],
        };
        let mut scalar = empty();
        scalar.fill(&x);
        let mut simd = Vec::new();
        if super::super::avx512::available() {
            let mut r = empty();
            // SAFETY: `available()` implies AVX-512 F and BW.
            unsafe { r.fill_avx512(&x) };
            simd.push(("avx512", r));
        }
        if crate::model::cpu::simd().avx2 {
            let mut r = empty();
            // SAFETY: the AVX2 level implies AVX2 and FMA.
            unsafe { r.fill_avx2(&x) };
            simd.push(("avx2", r));
        }
        let bits = |d: &[f32]| d.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for (name, r) in simd {
            assert_eq!(r.q, scalar.q, "{name} B {B}");
            assert_eq!(r.sums, scalar.sums, "{name} B {B}");
            assert_eq!(bits(&r.d), bits(&scalar.d), "{name} B {B}");
        }
    }
}
