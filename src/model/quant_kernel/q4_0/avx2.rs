//! [`Q4Group`]'s products on CPUs with AVX2 but not AVX-512 VNNI: the same packed layout read
//! as two 8-lane halves, `vpmaddubsw` in place of `vpdpbusd`. A block's 16-bit pair sums stay
//! exact through all its 32 products (at most 32 x 15 x 127 = 60,960 over two 16-bit
//! halves), so one `vpmaddwd` per block widens them; the offset of 8 and the float scales
//! are taken as the VNNI kernel takes them, in a fixed order per row.

use super::super::packed::{avx2_passes, prefetch_next_run, LANES};
use super::super::rows8::{Row8, RowPtrs};
use super::{Q4Group, QK};
use std::arch::x86_64::*;

/// Lanes in a half.
const HALF: usize = LANES / 2;

/// `R` activation rows (1 to 8) against one run of groups, `out[r * 16 + lane]`, in passes
/// of two rows (the registers of a third spill).
///
/// # Safety
/// AVX2, FMA and F16C; as [`super::super::packed::Group::rows`].
pub unsafe fn rows<const R: usize>(
    xs: &[Row8<'_>],
    groups: &[Q4Group],
    out: &mut [f32],
    prefetch: bool,
) {
    for (done, take) in avx2_passes(R, 2) {
        let (xs, out, prefetch) = (&xs[done..], &mut out[done * LANES..], prefetch && done == 0);
        if take == 2 {
            runs::<2>(xs, groups, out, prefetch)
        } else {
            runs::<1>(xs, groups, out, prefetch)
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn runs<const R: usize>(
    xs: &[Row8<'_>],
    groups: &[Q4Group],
    out: &mut [f32],
    prefetch: bool,
) {
    let RowPtrs {
        q: xq,
        d: xd,
        sums: xsum,
    } = RowPtrs::<R>::new(xs);
    let nibble = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let len = groups.len();
    for (bi, g) in groups.iter().enumerate() {
        if prefetch {
            prefetch_next_run(g, len);
        }
        let mut s = [[_mm256_setzero_si256(); 2]; R];
        for gr in 0..4 {
            let half = |h: usize| {
                let v = _mm256_loadu_si256(g.w[gr].as_ptr().add(32 * h) as *const __m256i);
                (
                    _mm256_and_si256(v, nibble),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble),
                )
            };
            let w = [half(0), half(1)];
            for r in 0..R {
                let x = xq[r].add(bi * QK + 4 * gr);
                let xl = _mm256_set1_epi32(std::ptr::read_unaligned(x as *const i32));
                let xh = _mm256_set1_epi32(std::ptr::read_unaligned(x.add(16) as *const i32));
                for h in 0..2 {
                    let p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(w[h].0, xl),
                        _mm256_maddubs_epi16(w[h].1, xh),
                    );
                    s[r][h] = _mm256_add_epi16(s[r][h], p);
                }
            }
        }
        for h in 0..2 {
            let d = _mm256_cvtph_ps(_mm_loadu_si128(g.d.as_ptr().add(HALF * h) as *const __m128i));
            for r in 0..R {
                // Weights are stored 8 above their value: take 8 x the block's activation sum.
                let offset = _mm256_set1_epi32(8 * *xsum[r].add(bi) as i32);
                let sum = _mm256_sub_epi32(_mm256_madd_epi16(s[r][h], ones), offset);
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(*xd[r].add(bi)));
                acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc[r][h]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (h, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out[r * LANES + HALF * h..].as_mut_ptr(), *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::packed::{
        assert_rows_kernels, avx2, rows_kernels, Activations, RowsKernels,
    };
    use super::super::super::{as_blocks, rows8::Rows8};
    use super::super::{pack, scalar_products};
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
        let w = Tensor::from_vec(data(n * k, 23), (n, k), &Device::Cpu)?;
        let bytes = QTensor::quantize(&w, GgmlDType::Q4_0)?.data()?.to_vec();
        let packed = pack(&bytes, n, k)?;
        let x = data(8 * k, 24);
        let acts = Rows8::<QK>::new(&x, k);
        let xs = acts.rows();
        let want = scalar_products(&xs, as_blocks(&bytes)?, n);
        let kernels: RowsKernels<Row8<'_>, Q4Group> = rows_kernels!(rows);
        // SAFETY: AVX2, FMA and F16C (checked above); 8 rows of `k`, one run of 16 rows.
        unsafe { assert_rows_kernels(kernels, &xs, &packed.groups, &want) };
        Ok(())
    }
}
