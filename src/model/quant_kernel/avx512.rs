//! AVX-512 helpers of the quantized kernels: whether the CPU has AVX-512 F and BW, and the
//! 16-bit rounding of activations ([`super::Rows16`], for q8_0's packed kernel) on it.

use std::arch::x86_64::*;

/// AVX-512 F, BW and VL, and AVX2's level (read once: `model::cpu`).
pub fn available() -> bool {
    crate::model::cpu::simd().avx512
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
