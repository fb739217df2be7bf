//! [`Q8Group`]'s products on CPUs with AVX2 but not AVX-512 VNNI: the same packed layout,
//! each 16-lane pair of weights read as two 8-lane halves widened to 16 bits, `vpmaddwd`
//! and an add in place of `vpdpwssd`. The same exact i32 block sums (32 products of at most
//! 128 x 32,767) and the same float tail per row, in a fixed order.

use super::super::packed::{avx2_passes, prefetch_next_run, Avx2Sums, LANES};
use super::super::Row16;
use super::{Q8Group, QK};
use std::arch::x86_64::*;

/// Lanes in a half.
const HALF: usize = LANES / 2;

/// `R` activation rows (1 to 8) against one run of groups, `out[r * 16 + lane]`, in passes
/// of at most four rows (5 as 3 + 2). Four rows hold their float sums in `out` (their
/// integer ones and the weights fill the registers): in one pass rather than 2 + 2, hot,
/// 20-25% less a block and row at 4 rows, ~10% at 16; the model at 16 sequences 17-25%
/// faster (alternating binaries), prefill the same within this VM's noise.
///
/// # Safety
/// AVX2, FMA and F16C; as [`super::super::packed::Group::rows`].
pub unsafe fn rows<const R: usize>(
    xs: &[Row16<'_>],
    groups: &[Q8Group],
    out: &mut [f32],
    prefetch: bool,
) {
    for (done, take) in avx2_passes(R, 4) {
        let (xs, out, prefetch) = (&xs[done..], &mut out[done * LANES..], prefetch && done == 0);
        match take {
            1 => runs::<1>(xs, groups, out, prefetch),
            2 => runs::<2>(xs, groups, out, prefetch),
            3 => runs::<3>(xs, groups, out, prefetch),
            _ => runs::<4>(xs, groups, out, prefetch),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // `h` indexes the sums and the group's halves
unsafe fn runs<const R: usize>(
    xs: &[Row16<'_>],
    groups: &[Q8Group],
    out: &mut [f32],
    prefetch: bool,
) {
    let mut xq = [std::ptr::null::<i16>(); R];
    let mut xd = [std::ptr::null::<f32>(); R];
    for (r, x) in xs.iter().take(R).enumerate() {
        xq[r] = x.q.as_ptr();
        xd[r] = x.d.as_ptr();
    }
    // Four rows keep their float sums in `out`.
    let mut acc = Avx2Sums::<R>::new(out, R > 3);
    for (bi, g) in groups.iter().enumerate() {
        if prefetch {
            prefetch_next_run(g, groups.len());
        }
        let mut s = [[_mm256_setzero_si256(); 2]; R];
        for (j, pair) in g.w.iter().enumerate() {
            let w = |h: usize| {
                _mm256_cvtepi8_epi16(_mm_loadu_si128(pair.as_ptr().add(16 * h) as *const __m128i))
            };
            let w = [w(0), w(1)];
            for r in 0..R {
                // Activations 2j, 2j + 1: one 32-bit lane.
                let x = std::ptr::read_unaligned(xq[r].add(bi * QK + 2 * j) as *const i32);
                let x = _mm256_set1_epi32(x);
                for h in 0..2 {
                    s[r][h] = _mm256_add_epi32(s[r][h], _mm256_madd_epi16(w[h], x));
                }
            }
        }
        for h in 0..2 {
            let d = _mm256_cvtph_ps(_mm_loadu_si128(g.d.as_ptr().add(HALF * h) as *const __m128i));
            for r in 0..R {
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(*xd[r].add(bi)));
                acc.fmadd(r, h, _mm256_cvtepi32_ps(s[r][h]), scale);
            }
        }
    }
    acc.finish();
}

#[cfg(test)]
mod tests {
    use super::super::super::super::small_matmul::products;
    use super::super::super::packed::{assert_rows_kernels, avx2, rows_kernels, RowsKernels};
    use super::super::super::{as_blocks, scalar_tile, BlockQ8_0, Rows16};
    use super::super::pack;
    use super::*;
    use crate::model::test_data::data;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Called directly, so CPUs whose packed products take the VNNI kernel test this one too.
    #[test]
    fn matches_the_scalar_products_for_every_pass_split() -> candle_core::Result<()> {
        if !avx2() {
            return Ok(());
        }
        let (n, k) = (16, 256);
        let w = Tensor::from_vec(data(n * k, 25), (n, k), &Device::Cpu)?;
        let bytes = QTensor::quantize(&w, GgmlDType::Q8_0)?.data()?.to_vec();
        let packed = pack(&bytes, n, k)?;
        let x = data(8 * k, 26);
        let acts = Rows16::new(&x, k);
        let xs = acts.rows();
        let blocks = as_blocks::<BlockQ8_0>(&bytes)?;
        let want = products(&xs, blocks, n, k / QK, k, scalar_tile::<BlockQ8_0>);
        let kernels: RowsKernels<Row16<'_>, Q8Group> = rows_kernels!(rows);
        // SAFETY: AVX2, FMA and F16C (checked above); 8 rows of `k`, one run of 16 rows.
        unsafe { assert_rows_kernels(kernels, &xs, &packed.groups, &want) };
        Ok(())
    }
}
