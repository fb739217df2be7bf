//! `e^x` in SIMD lanes, for the packed experts' SiLU (16 lanes) and the decode attention's
//! softmax (8 lanes): one polynomial, Cephes' `expf`. `x = n ln2 + f` with `|f| <= ln2 / 2`,
//! then `e^f = 1 + f + f^2 p(f)`; the widths differ only in how they build `2^n`.

use std::arch::x86_64::*;

/// ln 2 in two parts, so `n * LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `p`'s coefficients, highest degree first.
const POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// 16 lanes; `scalef` makes `2^n` and saturates to 0 and infinity by itself (so SiLU's
/// `x / (1 + e^-x)` needs no clamping), NaN carried through.
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn exp16(x: __m512) -> __m512 {
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let f = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let f = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), f);
    let mut p = _mm512_set1_ps(POLY[0]);
    for c in &POLY[1..] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
    }
    let p = _mm512_fmadd_ps(
        p,
        _mm512_mul_ps(f, f),
        _mm512_add_ps(f, _mm512_set1_ps(1.0)),
    );
    _mm512_scalef_ps(p, n)
}

/// 8 lanes (AVX2 has no `scalef`): `x` clamped to [-87.3, 88.7] so `2^n` stays a normal
/// number built in the exponent bits (below, the result is ~1e-38 instead of a subnormal,
/// nothing a softmax can tell apart), NaN kept.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp8(x: __m256) -> __m256 {
    // `max_ps` / `min_ps` return their second operand when one is NaN: x goes second.
    let x = _mm256_max_ps(_mm256_set1_ps(-87.3), x);
    let x = _mm256_min_ps(_mm256_set1_ps(88.7), x);
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let f = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let f = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), f);
    let mut p = _mm256_set1_ps(POLY[0]);
    for c in &POLY[1..] {
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(*c));
    }
    let p = _mm256_fmadd_ps(
        p,
        _mm256_mul_ps(f, f),
        _mm256_add_ps(f, _mm256_set1_ps(1.0)),
    );
    // 2^n for n in -126..=128, in two halves: 128 only at the top clamp, where p < 1 keeps
    // the product finite.
    let half = _mm256_cvtps_epi32(_mm256_mul_ps(n, _mm256_set1_ps(0.5)));
    let rest = _mm256_sub_epi32(_mm256_cvtps_epi32(n), half);
    let pow = |e: __m256i| {
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            e,
            _mm256_set1_epi32(127),
        )))
    };
    _mm256_mul_ps(_mm256_mul_ps(p, pow(half)), pow(rest))
}
