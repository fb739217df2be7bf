//! The experts' gating on plain f32 rows, `act(gate) * up`, for the packed experts' fused
//! product. candle's SiLU calls libm's `expf` once per value through its generic map: in a
//! 16-sequence q4k decode step that was 9% of the time, as much as all the attention. Here
//! SiLU is vectorised with AVX-512 or AVX2 (`simd_exp.rs`: a few ulp from libm's), and
//! the GELUs keep candle's per-value code.

use crate::config::Activation;

/// Writes `act(gate[i]) * up[i]` to `out[i]`; all three the same length.
pub fn gate_rows(act: Activation, gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if act == Activation::Silu && super::cpu::simd().avx512 {
        // SAFETY: the CPU has AVX-512 F; the lengths are checked above.
        unsafe { avx512::silu_mul(gate, up, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if act == Activation::Silu && crate::model::cpu::simd().avx2 {
        // SAFETY: the CPU has AVX2 and FMA; the lengths are checked above.
        unsafe { avx2::silu_mul(gate, up, out) };
        return;
    }
    let f = scalar(act);
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = f(g) * u;
    }
}

/// candle's own per-value code for each activation (what its tensor ops compute).
pub fn scalar(act: Activation) -> fn(f32) -> f32 {
    use candle_core::op::{Gelu, GeluErf, Silu, UnaryOpT};
    match act {
        Activation::Silu => <Silu as UnaryOpT>::f32,
        Activation::Gelu => <GeluErf as UnaryOpT>::f32,
        Activation::GeluTanh => <Gelu as UnaryOpT>::f32,
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::simd_exp::exp16 as exp;
    use std::arch::x86_64::*;

    /// `out = silu(gate) * up`, 16 values a step, the tail masked: every value takes the same
    /// instructions wherever it sits.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < out.len() {
            let left = out.len() - i;
            let mask: __mmask16 = if left >= 16 {
                0xFFFF
            } else {
                (1u16 << left) - 1
            };
            let g = _mm512_maskz_loadu_ps(mask, gate.as_ptr().add(i));
            let u = _mm512_maskz_loadu_ps(mask, up.as_ptr().add(i));
            let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let s = _mm512_div_ps(g, _mm512_add_ps(one, e));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), mask, _mm512_mul_ps(s, u));
            i += 16;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::simd_exp::exp8;
    use std::arch::x86_64::*;

    /// `out = silu(gate) * up`, 8 values a step; the tail goes through a zero-padded copy, so
    /// every value takes the same instructions wherever it sits.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let whole = out.len() / 8 * 8;
        for i in (0..whole).step_by(8) {
            let v = eight(
                _mm256_loadu_ps(gate.as_ptr().add(i)),
                _mm256_loadu_ps(up.as_ptr().add(i)),
            );
            _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
        }
        if whole < out.len() {
            let (mut g, mut u, mut o) = ([0f32; 8], [0f32; 8], [0f32; 8]);
            let left = out.len() - whole;
            g[..left].copy_from_slice(&gate[whole..]);
            u[..left].copy_from_slice(&up[whole..]);
            _mm256_storeu_ps(
                o.as_mut_ptr(),
                eight(_mm256_loadu_ps(g.as_ptr()), _mm256_loadu_ps(u.as_ptr())),
            );
            out[whole..].copy_from_slice(&o[..left]);
        }
    }

    /// `exp8` clamps its input; past the point where libm's `expf` overflows, `e^-g` is made
    /// infinite as libm's is, so `g / (1 + e^-g)` gives its -0 (and NaN for -inf).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn eight(g: __m256, u: __m256) -> __m256 {
        let x = _mm256_sub_ps(_mm256_setzero_ps(), g);
        let over = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(88.722_84));
        let e = _mm256_blendv_ps(exp8(x), _mm256_set1_ps(f32::INFINITY), over);
        let s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0), e));
        _mm256_mul_ps(s, u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_data::data;

    /// Against candle's SiLU (libm's `expf`) over the range that matters and beyond: within
    /// 4 ulp of the product, the saturated ends exact, NaN kept, every tail length.
    #[test]
    fn vectorised_silu_tracks_candles() {
        let mut gate: Vec<f32> = data(4000, 1).iter().map(|v| v * 30.0).collect();
        gate.extend([
            0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, 100.0, -100.0, 1e4, -1e4,
        ]);
        gate.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            89.5,
            -89.5,
            103.0,
        ]);
        let up: Vec<f32> = data(gate.len(), 2).iter().map(|v| v + 1.5).collect();
        let silu = scalar(Activation::Silu);
        // The one `gate_rows` picks, and the AVX2 one on CPUs where it picks AVX-512.
        type Kernel = fn(&[f32], &[f32], &mut [f32]);
        let mut kernels: Vec<Kernel> = vec![|g, u, o| gate_rows(Activation::Silu, g, u, o)];
        #[cfg(target_arch = "x86_64")]
        if crate::model::cpu::simd().avx2 {
            // SAFETY: the CPU has AVX2 and FMA; the lengths are equal.
            kernels.push(|g, u, o| unsafe { avx2::silu_mul(g, u, o) });
        }
        for (kernel, len) in kernels
            .iter()
            .flat_map(|k| [gate.len(), 1, 7, 8, 9, 15, 16, 17, 33].map(|len| (k, len)))
        {
            let mut out = vec![0f32; len];
            kernel(&gate[..len], &up[..len], &mut out);
            for i in 0..len {
                let want = silu(gate[i]) * up[i];
                let got = out[i];
                if want.is_nan() {
                    assert!(got.is_nan(), "[{i}] silu({}) -> {got}", gate[i]);
                    continue;
                }
                if want.is_infinite() {
                    assert_eq!(got, want, "[{i}] silu({})", gate[i]);
                    continue;
                }
                let ulp = (want.abs() * f32::EPSILON).max(f32::MIN_POSITIVE);
                assert!(
                    (got - want).abs() <= 4.0 * ulp,
                    "[{i}] silu({}) * {}: {got} vs {want}",
                    gate[i],
                    up[i]
                );
            }
        }
    }

    #[test]
    fn gelus_use_candles_code() {
        let gate = data(40, 3);
        let up = data(40, 4);
        for act in [Activation::Gelu, Activation::GeluTanh] {
            let mut out = vec![0f32; 40];
            gate_rows(act, &gate, &up, &mut out);
            let f = scalar(act);
            for i in 0..40 {
                assert_eq!(out[i], f(gate[i]) * up[i]);
            }
        }
    }
}
