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

/// Activation rows a pass holds: six rows' 12 integer sums, the two widened halves, a
/// broadcast and a product fill the 16 registers ([`wide_group`]).
const MAX_ROWS: usize = 6;

/// `R` activation rows (1 to 8) against one run of groups, `out[r * 16 + lane]`: up to
/// [`MAX_ROWS`] in one pass, 7 and 8 as 4 + 3 and 4 + 4. From four rows the float sums live
/// in `out` (the integer ones and the weights fill the registers). Measured:
/// - 4 rows in one pass rather than 2 + 2: hot, 20-25% less a block and row, ~10% at 16;
///   the model at 16 sequences 17-25% faster (alternating binaries).
/// - 5 and 6 in one pass rather than 3 + 2 and 4 + 2: the model at 16 sequences 3% faster
///   (in-process A/B). 7 and 8 as 5 + 2 and 6 + 2 measured the same there, so prefill's
///   chunks of 8 keep their passes.
///
/// # Safety
/// AVX2, FMA and F16C; as [`super::super::packed::Group::rows`].
pub unsafe fn rows<const R: usize>(
    xs: &[Row16<'_>],
    groups: &[Q8Group],
    out: &mut [f32],
    prefetch: bool,
) {
    // Past six rows, passes of four: 8 rows (prefill's chunks) as 4 + 4.
    let max = if R > MAX_ROWS { 4 } else { MAX_ROWS };
    for (done, take) in avx2_passes(R, max) {
        let (xs, out, prefetch) = (&xs[done..], &mut out[done * LANES..], prefetch && done == 0);
        match take {
            1 => runs::<1>(xs, groups, out, prefetch),
            2 => runs::<2>(xs, groups, out, prefetch),
            3 => runs::<3>(xs, groups, out, prefetch),
            4 => runs::<4>(xs, groups, out, prefetch),
            5 => runs::<5>(xs, groups, out, prefetch),
            _ => runs::<6>(xs, groups, out, prefetch),
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
    // From four rows the float sums live in `out`.
    let mut acc = Avx2Sums::<R>::new(out, R > 3);
    for (bi, g) in groups.iter().enumerate() {
        if prefetch {
            prefetch_next_run(g, groups.len());
        }
        let s = if R > 4 {
            let x = std::array::from_fn(|r| xq[r].add(bi * QK));
            wide_group::<R>(g.w.as_ptr() as *const i8, x)
        } else {
            let mut s = [[_mm256_setzero_si256(); 2]; R];
            for (j, pair) in g.w.iter().enumerate() {
                let w = |h: usize| {
                    let half = pair.as_ptr().add(16 * h) as *const __m128i;
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(half))
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
            s
        };
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

/// One pair step (`$o` = 32 x the pair's index, `$o2` = `$o` + 16, `$xo` = 4 x the index):
/// both halves of the pair's weights widened to 16 bits, then each row's two activations
/// broadcast, times both halves, added to its two sums.
macro_rules! pair {
    ($o:literal, $o2:literal, $xo:literal, $( ($x:literal, $s0:literal, $s1:literal) ),+) => {
        concat!(
            "vpmovsxbw {w0}, xmmword ptr [{w} + ", $o, "]\n",
            "vpmovsxbw {w1}, xmmword ptr [{w} + ", $o2, "]\n",
            $(
                "vpbroadcastd {b}, dword ptr [{", $x, "} + ", $xo, "]\n",
                "vpmaddwd {t}, {w0}, {b}\n",
                "vpaddd {", $s0, "}, {", $s0, "}, {t}\n",
                "vpmaddwd {t}, {w1}, {b}\n",
                "vpaddd {", $s1, "}, {", $s1, "}, {t}\n",
            )+
        )
    };
}

/// The 16 pair steps of a group for the rows listed (each `(x, sum 0, sum 1)` operand names).
macro_rules! steps {
    ($($rows:tt)+) => {
        concat!(
            pair!(0, 16, 0, $($rows)+), pair!(32, 48, 4, $($rows)+),
            pair!(64, 80, 8, $($rows)+), pair!(96, 112, 12, $($rows)+),
            pair!(128, 144, 16, $($rows)+), pair!(160, 176, 20, $($rows)+),
            pair!(192, 208, 24, $($rows)+), pair!(224, 240, 28, $($rows)+),
            pair!(256, 272, 32, $($rows)+), pair!(288, 304, 36, $($rows)+),
            pair!(320, 336, 40, $($rows)+), pair!(352, 368, 44, $($rows)+),
            pair!(384, 400, 48, $($rows)+), pair!(416, 432, 52, $($rows)+),
            pair!(448, 464, 56, $($rows)+), pair!(480, 496, 60, $($rows)+),
        )
    };
}

/// One group's exact i32 sums for `R` (5 or 6) rows, each row's two halves: the 512 weight
/// bytes at `w` against the 32 activations at each `x[r]`. In assembly because six rows take
/// all 16 registers; up to four stay compiled in [`runs`] (the same steps written out in
/// assembly for them measured no faster in the model).
///
/// # Safety
/// AVX2; `w` holds 512 bytes; each `x[r]` holds 32 activations.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn wide_group<const R: usize>(w: *const i8, x: [*const i16; R]) -> [[__m256i; 2]; R] {
    use std::arch::asm;
    debug_assert!(R == 5 || R == 6);
    let mut s = [[_mm256_setzero_si256(); 2]; R];
    macro_rules! run {
        ([$($rows:tt)*], $($ops:tt)*) => {
            asm!(
                steps!($($rows)*),
                w = in(reg) w, $($ops)*
                w0 = out(ymm_reg) _, w1 = out(ymm_reg) _, b = out(ymm_reg) _, t = out(ymm_reg) _,
                options(nostack, pure, readonly),
            )
        };
    }
    match R {
        5 => run!([("x0", "s00", "s01"), ("x1", "s10", "s11"), ("x2", "s20", "s21"),
                ("x3", "s30", "s31"), ("x4", "s40", "s41")],
            x0 = in(reg) x[0], s00 = inout(ymm_reg) s[0][0], s01 = inout(ymm_reg) s[0][1],
            x1 = in(reg) x[1], s10 = inout(ymm_reg) s[1][0], s11 = inout(ymm_reg) s[1][1],
            x2 = in(reg) x[2], s20 = inout(ymm_reg) s[2][0], s21 = inout(ymm_reg) s[2][1],
            x3 = in(reg) x[3], s30 = inout(ymm_reg) s[3][0], s31 = inout(ymm_reg) s[3][1],
            x4 = in(reg) x[4], s40 = inout(ymm_reg) s[4][0], s41 = inout(ymm_reg) s[4][1],),
        _ => run!([("x0", "s00", "s01"), ("x1", "s10", "s11"), ("x2", "s20", "s21"),
                ("x3", "s30", "s31"), ("x4", "s40", "s41"), ("x5", "s50", "s51")],
            x0 = in(reg) x[0], s00 = inout(ymm_reg) s[0][0], s01 = inout(ymm_reg) s[0][1],
            x1 = in(reg) x[1], s10 = inout(ymm_reg) s[1][0], s11 = inout(ymm_reg) s[1][1],
            x2 = in(reg) x[2], s20 = inout(ymm_reg) s[2][0], s21 = inout(ymm_reg) s[2][1],
            x3 = in(reg) x[3], s30 = inout(ymm_reg) s[3][0], s31 = inout(ymm_reg) s[3][1],
            x4 = in(reg) x[4], s40 = inout(ymm_reg) s[4][0], s41 = inout(ymm_reg) s[4][1],
            x5 = in(reg) x[5], s50 = inout(ymm_reg) s[5][0], s51 = inout(ymm_reg) s[5][1],),
    }
    s
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
