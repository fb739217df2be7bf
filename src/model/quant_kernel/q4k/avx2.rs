//! [`Q4kGroup`]'s products on CPUs with AVX2 but not AVX-512 VNNI (Zen 3, older Intel): the
//! same packed layout read as two 8-lane halves. Without `vpdpbusd`, `vpmaddubsw` multiplies
//! each lane's 4-bit weights by the broadcast 8-bit activations into pairs of 16-bit sums;
//! those stay exact in 16 bits through a whole sub-block (32 products of at most 15 x 127 =
//! 30,480), so one `vpmaddwd` per sub-block both widens them and applies the lane's 6-bit
//! scale. The integer sums are GGML's, and each row's float tail runs in a fixed order, so a
//! row's result is the same alone or batched.

use super::super::packed::{avx2_passes, LANES};
use super::super::rows8::{Row8, RowPtrs};
use super::{Q4kGroup, QK_K};
use std::arch::x86_64::*;

/// Lanes in a half.
const HALF: usize = LANES / 2;

/// Activation rows one pass of [`runs`] keeps in registers (AVX2 has 16).
pub const MAX_ROWS: usize = 3;

/// `R` activation rows (1 to 8) against one run of groups: `out[r * 16 + lane]`, as the
/// VNNI kernel fills it. Past [`MAX_ROWS`], the run is gone over again for the other rows
/// (it is in L1 or L2 by then).
///
/// # Safety
/// AVX2, FMA and F16C; as [`super::super::packed::Group::rows`].
pub unsafe fn rows<const R: usize>(
    xs: &[Row8<'_>],
    groups: &[Q4kGroup],
    out: &mut [f32],
    prefetch: bool,
) {
    for (done, take) in avx2_passes(R, MAX_ROWS) {
        let (xs, out, prefetch) = (&xs[done..], &mut out[done * LANES..], prefetch && done == 0);
        match take {
            1 => runs::<1>(xs, groups, out, prefetch),
            2 => runs::<2>(xs, groups, out, prefetch),
            _ => runs::<3>(xs, groups, out, prefetch),
        }
    }
}

/// `R` rows (at most [`MAX_ROWS`]) against one run: per group, each sub-block's low or
/// high nibbles at a time, each broadcast activation feeding both halves of the lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // `h` indexes every row's sums and the group's halves
unsafe fn runs<const R: usize>(
    xs: &[Row8<'_>],
    groups: &[Q4kGroup],
    out: &mut [f32],
    prefetch: bool,
) {
    let RowPtrs {
        q: xq,
        d: xd,
        sums: xsum,
    } = RowPtrs::<R>::new(xs);
    let nibble = _mm256_set1_epi8(0x0F);
    macro_rules! bcast {
        ($p:expr) => {
            _mm256_set1_epi32(std::ptr::read_unaligned($p as *const i32))
        };
    }
    let o = out.as_mut_ptr();
    for r in 0..R {
        _mm256_storeu_ps(o.add(r * LANES), _mm256_setzero_ps());
        _mm256_storeu_ps(o.add(r * LANES + HALF), _mm256_setzero_ps());
    }
    for (bi, g) in groups.iter().enumerate() {
        let mut isum = [[_mm256_setzero_si256(); 2]; R];
        for p in 0..4 {
            if prefetch {
                // The next group, a quarter at each sub-block pair, into L1: on Zen 3 this
                // beat the VNNI kernel's non-temporal fetch a run ahead (MoE bench, one
                // token: 0.50-0.62 vs 0.68-0.87 ms a layer).
                let lines = std::mem::size_of::<Q4kGroup>().div_ceil(64);
                let per = lines.div_ceil(4);
                let next = (g as *const Q4kGroup).wrapping_add(1) as *const u8;
                for l in p * per..((p + 1) * per).min(lines) {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64 * l) as *const i8);
                }
            }
            for high in [false, true] {
                let mut acc = [[_mm256_setzero_si256(); 2]; R];
                for gr in 0..8 {
                    let w: [__m256i; 2] = std::array::from_fn(|h| {
                        let v = _mm256_load_si256(
                            g.qs[8 * p + gr].as_ptr().add(32 * h) as *const __m256i
                        );
                        if high {
                            _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble)
                        } else {
                            _mm256_and_si256(v, nibble)
                        }
                    });
                    let at = bi * QK_K + 64 * p + 4 * gr + if high { 32 } else { 0 };
                    for r in 0..R {
                        let b = bcast!(xq[r].add(at));
                        for h in 0..2 {
                            acc[r][h] = _mm256_add_epi16(acc[r][h], _mm256_maddubs_epi16(w[h], b));
                        }
                    }
                }
                let j = 2 * p + high as usize;
                for h in 0..2 {
                    let s = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        g.scales[j].as_ptr().add(HALF * h) as *const __m128i,
                    ));
                    let s = _mm256_or_si256(s, _mm256_slli_epi32::<16>(s));
                    for r in 0..R {
                        isum[r][h] = _mm256_add_epi32(isum[r][h], _mm256_madd_epi16(acc[r][h], s));
                    }
                }
            }
        }
        for h in 0..2 {
            let mut msum = [_mm256_setzero_si256(); R];
            for p in 0..4 {
                let mins = _mm256_cvtepu8_epi16(_mm_load_si128(
                    g.mins[p].as_ptr().add(2 * HALF * h) as *const __m128i,
                ));
                for r in 0..R {
                    let pair = bcast!(xsum[r].add(bi * 8 + 2 * p));
                    msum[r] = _mm256_add_epi32(msum[r], _mm256_madd_epi16(mins, pair));
                }
            }
            let f16s = |v: &[u16; 16]| {
                _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(HALF * h) as *const __m128i))
            };
            let (d, dmin) = (f16s(&g.d), f16s(&g.dmin));
            for r in 0..R {
                let f = _mm256_mul_ps(_mm256_cvtepi32_ps(isum[r][h]), d);
                let f = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum[r]), dmin, f);
                let at = o.add(r * LANES + HALF * h);
                let a = _mm256_loadu_ps(at);
                _mm256_storeu_ps(at, _mm256_fmadd_ps(f, _mm256_set1_ps(*xd[r].add(bi)), a));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::packed::{
        assert_rows_kernels, rows_kernels, Activations, RowsKernels,
    };
    use super::super::super::rows8::Rows8;
    use super::super::{pack, scalar_products};
    use super::*;
    use crate::model::test_data::data;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Called directly, so CPUs whose packed products take the VNNI kernel test this one too.
    #[test]
    fn matches_the_scalar_products_for_every_pass_split() -> candle_core::Result<()> {
        if !super::super::super::packed::avx2() {
            return Ok(());
        }
        let (n, k) = (16, 512);
        let w = Tensor::from_vec(data(n * k, 21), (n, k), &Device::Cpu)?;
        let q = QTensor::quantize(&w, GgmlDType::Q4K)?;
        let bytes = q.data()?;
        let packed = pack(&bytes, n, k)?;
        let blocks = super::super::super::as_blocks(&bytes)?;
        let x = data(8 * k, 22);
        let acts = Rows8::<QK_K>::new(&x, k);
        let xs = acts.rows();
        let want = scalar_products(&xs, blocks, n);
        let kernels: RowsKernels<Row8<'_>, Q4kGroup> = rows_kernels!(rows);
        // SAFETY: AVX2, FMA and F16C (checked above); 8 rows of `k`, one run of 16 rows.
        unsafe { assert_rows_kernels(kernels, &xs, &packed.groups, &want) };
        Ok(())
    }
}
