//! [`Q4Group`]'s products on CPUs with AVX2 but not AVX-512 VNNI: the same packed layout read
//! as two 8-lane halves, `vpmaddubsw` in place of `vpdpbusd`. A block's 16-bit pair sums stay
//! exact through all its 32 products (at most 32 x 15 x 127 = 60,960 over two 16-bit
//! halves), so one `vpmaddwd` per block widens them; the offset of 8 is folded into where
//! the sums start ([`group`]), the float scales are taken as the VNNI kernel takes them, in a
//! fixed order per row.

use super::super::packed::{avx2_passes, prefetch_next_run, Avx2Sums, LANES};
use super::super::rows8::{Row8, RowPtrs};
use super::{Q4Group, QK};
use std::arch::x86_64::*;

/// Lanes in a half.
const HALF: usize = LANES / 2;

/// Activation rows a pass holds: a row's two 16-bit sums, beside the 4 weight vectors, 2
/// broadcasts, a product and the mask, fill all 16 registers at 4.
const MAX_ROWS: usize = 4;

/// `R` activation rows (1 to 8) against one run of groups, `out[r * 16 + lane]`, in passes
/// of at most [`MAX_ROWS`] (5 as 3 + 2). Passes of 4 rather than 2 + 2 (with the group in
/// `asm!`): hot, 10-15% less a block and row at 3 to 16 rows; the model at 16 sequences
/// 15-20% faster, prefill ~15%.
///
/// # Safety
/// AVX2, FMA and F16C; as [`super::super::packed::Group::rows`].
pub unsafe fn rows<const R: usize>(
    xs: &[Row8<'_>],
    groups: &[Q4Group],
    out: &mut [f32],
    prefetch: bool,
) {
    for (done, take) in avx2_passes(R, MAX_ROWS) {
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
    // Past two rows the float sums live in `out` (the registers hold the integer ones).
    let mut acc = Avx2Sums::<R>::new(out, R > 2);
    let len = groups.len();
    for (bi, g) in groups.iter().enumerate() {
        if prefetch {
            prefetch_next_run(g, len);
        }
        let x: [*const i8; R] = std::array::from_fn(|r| xq[r].add(bi * QK));
        // Weights are stored 8 above their value: each lane's two 16-bit sums start from -4 x
        // the block's activation sum, so that theirs is the block's exact sum.
        let start: [__m256i; R] = std::array::from_fn(|r| _mm256_set1_epi16(-4 * *xsum[r].add(bi)));
        let s = group::<R>(g.w.as_ptr() as *const u8, x, nibble, start);
        for h in 0..2 {
            let d = _mm256_cvtph_ps(_mm_loadu_si128(g.d.as_ptr().add(HALF * h) as *const __m128i));
            for r in 0..R {
                let sum = _mm256_madd_epi16(s[r][h], ones);
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(*xd[r].add(bi)));
                acc.fmadd(r, h, _mm256_cvtepi32_ps(sum), scale);
            }
        }
    }
    acc.finish();
}

/// The weight vectors of step `$g` (`$o` = 64 `$g`): both halves' low and high nibbles.
macro_rules! weights {
    ($o:literal, $o2:literal) => {
        concat!(
            "vpand {lo0}, {nib}, ymmword ptr [{w} + ",
            $o,
            "]\n",
            "vpand {lo1}, {nib}, ymmword ptr [{w} + ",
            $o2,
            "]\n",
            "vmovdqu {hi0}, ymmword ptr [{w} + ",
            $o,
            "]\n",
            "vpsrlw {hi0}, {hi0}, 4\n",
            "vpand {hi0}, {hi0}, {nib}\n",
            "vmovdqu {hi1}, ymmword ptr [{w} + ",
            $o2,
            "]\n",
            "vpsrlw {hi1}, {hi1}, 4\n",
            "vpand {hi1}, {hi1}, {nib}\n"
        )
    };
}

/// One row of a step: its 4 low-nibble inputs at `$xo` and 4 high-nibble ones 16 on,
/// broadcast, times both halves, added to its two sums.
macro_rules! row {
    ($x:literal, $s0:literal, $s1:literal, $xo:literal, $xo2:literal) => {
        concat!(
            "vpbroadcastd {xl}, dword ptr [{",
            $x,
            "} + ",
            $xo,
            "]\n",
            "vpbroadcastd {xh}, dword ptr [{",
            $x,
            "} + ",
            $xo2,
            "]\n",
            "vpmaddubsw {t}, {lo0}, {xl}\n",
            "vpaddw {",
            $s0,
            "}, {",
            $s0,
            "}, {t}\n",
            "vpmaddubsw {t}, {hi0}, {xh}\n",
            "vpaddw {",
            $s0,
            "}, {",
            $s0,
            "}, {t}\n",
            "vpmaddubsw {t}, {lo1}, {xl}\n",
            "vpaddw {",
            $s1,
            "}, {",
            $s1,
            "}, {t}\n",
            "vpmaddubsw {t}, {hi1}, {xh}\n",
            "vpaddw {",
            $s1,
            "}, {",
            $s1,
            "}, {t}\n"
        )
    };
}

/// The 4 steps of a group for the rows listed (each `(x, sum 0, sum 1)` operand names).
macro_rules! steps {
    ($( ($x:literal, $s0:literal, $s1:literal) ),+) => {
        concat!(
            weights!(0, 32), $( row!($x, $s0, $s1, 0, 16), )+
            weights!(64, 96), $( row!($x, $s0, $s1, 4, 20), )+
            weights!(128, 160), $( row!($x, $s0, $s1, 8, 24), )+
            weights!(192, 224), $( row!($x, $s0, $s1, 12, 28), )+
        )
    };
}

/// One group's 16-bit sums for `R` (1 to 4) rows, each lane's two from `start[r]`: the 256
/// weight bytes at `w` against the 32 activations at each `x[r]`. The low and high nibbles'
/// products go into the sums one at a time. With `start` -4 x the block's activation sum
/// (at most 4 x 32 x 127), a lane's final 16-bit sums are each 16 products of a weight in
/// 0..16 and an activation, less 4 x the 32 activations: within 11 x 16 x 127 + 4 x 16 x 127
/// = 30,480 of 0, and so is every partial sum (the start and some of the products). In
/// assembly because four rows take all 16 registers, which the compiler spilled.
///
/// # Safety
/// AVX2; `w` holds 256 bytes; each `x[r]` holds 32 activations.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group<const R: usize>(
    w: *const u8,
    x: [*const i8; R],
    nib: __m256i,
    start: [__m256i; R],
) -> [[__m256i; 2]; R] {
    use std::arch::asm;
    let mut s: [[__m256i; 2]; R] = std::array::from_fn(|r| [start[r]; 2]);
    macro_rules! run {
        ([$($rows:tt)*], $($ops:tt)*) => {
            asm!(
                steps!($($rows)*),
                w = in(reg) w, nib = in(ymm_reg) nib, $($ops)*
                lo0 = out(ymm_reg) _, lo1 = out(ymm_reg) _, hi0 = out(ymm_reg) _, hi1 = out(ymm_reg) _,
                xl = out(ymm_reg) _, xh = out(ymm_reg) _, t = out(ymm_reg) _,
                options(nostack, pure, readonly),
            )
        };
    }
    match R {
        1 => run!([("x0", "s00", "s01")],
            x0 = in(reg) x[0], s00 = inout(ymm_reg) s[0][0], s01 = inout(ymm_reg) s[0][1],),
        2 => run!([("x0", "s00", "s01"), ("x1", "s10", "s11")],
            x0 = in(reg) x[0], s00 = inout(ymm_reg) s[0][0], s01 = inout(ymm_reg) s[0][1],
            x1 = in(reg) x[1], s10 = inout(ymm_reg) s[1][0], s11 = inout(ymm_reg) s[1][1],),
        3 => run!([("x0", "s00", "s01"), ("x1", "s10", "s11"), ("x2", "s20", "s21")],
            x0 = in(reg) x[0], s00 = inout(ymm_reg) s[0][0], s01 = inout(ymm_reg) s[0][1],
            x1 = in(reg) x[1], s10 = inout(ymm_reg) s[1][0], s11 = inout(ymm_reg) s[1][1],
            x2 = in(reg) x[2], s20 = inout(ymm_reg) s[2][0], s21 = inout(ymm_reg) s[2][1],),
        _ => run!([("x0", "s00", "s01"), ("x1", "s10", "s11"), ("x2", "s20", "s21"),
                ("x3", "s30", "s31")],
            x0 = in(reg) x[0], s00 = inout(ymm_reg) s[0][0], s01 = inout(ymm_reg) s[0][1],
            x1 = in(reg) x[1], s10 = inout(ymm_reg) s[1][0], s11 = inout(ymm_reg) s[1][1],
            x2 = in(reg) x[2], s20 = inout(ymm_reg) s[2][0], s21 = inout(ymm_reg) s[2][1],
            x3 = in(reg) x[3], s30 = inout(ymm_reg) s[3][0], s31 = inout(ymm_reg) s[3][1],),
    }
    s
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
        assert_matches_scalar(&bytes, &data(8 * k, 24), k)
    }

    /// The kernel's every pass split against [`scalar_products`]: `bytes` one run of 16 rows
    /// of `k` weights, `x` 8 activation rows. Only where the CPU has AVX2, FMA and F16C.
    fn assert_matches_scalar(bytes: &[u8], x: &[f32], k: usize) -> candle_core::Result<()> {
        let packed = pack(bytes, 16, k)?;
        let acts = Rows8::<QK>::new(x, k);
        let xs = acts.rows();
        let want = scalar_products(&xs, as_blocks(bytes)?, 16);
        let kernels: RowsKernels<Row8<'_>, Q4Group> = rows_kernels!(rows);
        // SAFETY: the callers check AVX2, FMA and F16C; 8 rows of `k`, one run of 16 rows.
        unsafe { assert_rows_kernels(kernels, &xs, &packed.groups, &want) };
        Ok(())
    }

    /// The 16-bit sums' bound at its extremes: per lane, the inputs of one 16-bit sum at
    /// +-127 with weight 15, the other sum's at the opposite sign (each sum ends at +-30,480).
    #[test]
    fn extreme_blocks_stay_exact() -> candle_core::Result<()> {
        if !avx2() {
            return Ok(());
        }
        let (n, k) = (16, 32);
        // Inputs 4j and 4j + 1 (low nibbles j < 16, high nibbles 16 on) feed a lane's first
        // 16-bit sum, 4j + 2 and 4j + 3 its second.
        let first = |i: usize| i % 4 < 2;
        let mut bytes = Vec::new();
        for row in 0..n {
            // f16 1.0, then 16 bytes of two nibbles: weight 15 (value 7) where the row's
            // sum is pushed, 0 (value -8) elsewhere.
            bytes.extend_from_slice(&half::f16::ONE.to_le_bytes());
            let q = |i: usize| if first(i) == (row % 2 == 0) { 15u8 } else { 0 };
            bytes.extend((0..16).map(|j| q(j) | (q(j + 16) << 4)));
        }
        for sign in [1f32, -1.0] {
            let x: Vec<f32> = (0..8 * k)
                .map(|i| if first(i % k) { sign } else { -sign })
                .collect();
            assert_matches_scalar(&bytes, &x, k)?;
        }
        Ok(())
    }
}
