//! [`Q4kGroup`]'s products on CPUs with AVX2 but not AVX-512 VNNI (Zen 3, older Intel): the
//! same packed layout read as two 8-lane halves. Without `vpdpbusd`, `vpmaddubsw` multiplies
//! each lane's 4-bit weights by the broadcast 8-bit activations into pairs of 16-bit sums;
//! those stay exact in 16 bits through a whole sub-block (32 products of at most 15 x 127 =
//! 30,480), so one `vpmaddwd` per sub-block both widens them and applies the lane's 6-bit
//! scale. The integer sums are GGML's, and each row's float tail runs in a fixed order, so a
//! row's result is the same alone or batched.

use super::super::packed::{avx2_passes, Avx2Sums, LANES};
use super::super::rows8::{Row8, RowPtrs};
use super::{Q4kGroup, QK_K};
use std::arch::x86_64::*;

/// Lanes in a half.
const HALF: usize = LANES / 2;

/// Activation rows one pass of [`runs`] keeps in registers: two 16-bit sums a row, beside
/// the weight vectors, broadcast, product and mask, 13 of AVX2's 16. Four in one pass rather
/// than 2 + 2 made an MoE layer whose experts get 4 rows each 14-16% faster (3-5% with
/// random routing; `cargo bench --bench matmul -- moe`, both alternating in one process);
/// five rather than 3 + 2 or 4 + 1 gained 0-2%, not kept.
pub const MAX_ROWS: usize = 4;

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
            3 => runs::<3>(xs, groups, out, prefetch),
            _ => runs::<4>(xs, groups, out, prefetch),
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
    // The float sums live in `out`: the registers hold the sub-blocks' integer ones.
    let mut acc = Avx2Sums::<R>::new(out, true);
    for (bi, g) in groups.iter().enumerate() {
        let mut isum = [[_mm256_setzero_si256(); 2]; R];
        let next = (g as *const Q4kGroup).wrapping_add(1) as *const u8;
        if R == 1 {
            for p in 0..4 {
                if prefetch {
                    // The next group, a quarter at each sub-block pair, into L1: on Zen 3 this
                    // beat the VNNI kernel's non-temporal fetch a run ahead (MoE bench, one
                    // token: 0.50-0.62 vs 0.68-0.87 ms a layer); spread through the steps, 3%
                    // slower.
                    let lines = std::mem::size_of::<Q4kGroup>().div_ceil(64);
                    let per = lines.div_ceil(4);
                    for l in p * per..((p + 1) * per).min(lines) {
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64 * l) as *const i8);
                    }
                }
                for (j, high) in [(2 * p, false), (2 * p + 1, true)] {
                    let x = xq[0].add(bi * QK_K + 32 * j);
                    let a = one_row(g.qs[8 * p].as_ptr(), x, high, nibble);
                    for h in 0..2 {
                        let s = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                            g.scales[j].as_ptr().add(HALF * h) as *const __m128i,
                        ));
                        let s = _mm256_or_si256(s, _mm256_slli_epi32::<16>(s));
                        isum[0][h] = _mm256_add_epi32(isum[0][h], _mm256_madd_epi16(a[h], s));
                    }
                }
            }
        } else {
            // The pass that fetches takes the next group's lines; the others touch their own
            // group's (in L1 already), so every pass runs the same instructions.
            let fetch = if prefetch {
                next
            } else {
                g as *const Q4kGroup as *const u8
            };
            let x: [*const i8; R] = std::array::from_fn(|r| xq[r].add(bi * QK_K));
            group::<R>(g, x, nibble, fetch, &mut isum);
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
                acc.fmadd(r, h, f, _mm256_set1_ps(*xd[r].add(bi)));
            }
        }
    }
    acc.finish();
}

// The group's `asm!` is put together from the macros below. Offsets are assembler
// expressions (`[{w} + 512 + 32]`): `$W`, `$X`, `$S` and `$P` place a sub-block's weights,
// activations, scales and prefetches within the group, the inner offset a step within it.

/// The weight vectors of one step from the low nibbles of the bytes at `$W + $o`, `$W + $o2`.
macro_rules! lo {
    ($W:literal, $o:literal, $o2:literal) => {
        concat!(
            "vpand {w0}, {nib}, ymmword ptr [{w} + ",
            $W,
            " + ",
            $o,
            "]\n",
            "vpand {w1}, {nib}, ymmword ptr [{w} + ",
            $W,
            " + ",
            $o2,
            "]\n"
        )
    };
}

/// The same from the high nibbles.
macro_rules! hi {
    ($W:literal, $o:literal, $o2:literal) => {
        concat!(
            "vmovdqa {w0}, ymmword ptr [{w} + ",
            $W,
            " + ",
            $o,
            "]\n",
            "vpsrlw {w0}, {w0}, 4\n",
            "vpand {w0}, {w0}, {nib}\n",
            "vmovdqa {w1}, ymmword ptr [{w} + ",
            $W,
            " + ",
            $o2,
            "]\n",
            "vpsrlw {w1}, {w1}, 4\n",
            "vpand {w1}, {w1}, {nib}\n"
        )
    };
}

/// A row's first step of a sub-block: its products start its two 16-bit sums.
macro_rules! row0 {
    ($X:literal; $x:literal, $a0:literal, $a1:literal, $o0:literal, $o1:literal) => {
        concat!(
            "vpbroadcastd {b}, dword ptr [{",
            $x,
            "} + ",
            $X,
            "]\n",
            "vpmaddubsw {",
            $a0,
            "}, {w0}, {b}\n",
            "vpmaddubsw {",
            $a1,
            "}, {w1}, {b}\n"
        )
    };
}

/// One row of one step: its 4 activations at `$X + $xo` broadcast, times both halves of the
/// weight vectors, added to its two sums.
macro_rules! row {
    ($X:literal, $xo:literal; $x:literal, $a0:literal, $a1:literal, $o0:literal, $o1:literal) => {
        concat!(
            "vpbroadcastd {b}, dword ptr [{",
            $x,
            "} + ",
            $X,
            " + ",
            $xo,
            "]\n",
            "vpmaddubsw {t}, {w0}, {b}\n",
            "vpaddw {",
            $a0,
            "}, {",
            $a0,
            "}, {t}\n",
            "vpmaddubsw {t}, {w1}, {b}\n",
            "vpaddw {",
            $a1,
            "}, {",
            $a1,
            "}, {t}\n"
        )
    };
}

/// The sub-block's 6-bit scales (16 bytes at `$S`), each lane's as a pair of 16-bit words,
/// into `{w0}` and `{w1}` (free once the steps are done).
macro_rules! scales {
    ($S:literal) => {
        concat!(
            "vpmovzxbd {w0}, qword ptr [{sc} + ",
            $S,
            "]\n",
            "vpslld {t}, {w0}, 16\n",
            "vpor {w0}, {w0}, {t}\n",
            "vpmovzxbd {w1}, qword ptr [{sc} + ",
            $S,
            " + 8]\n",
            "vpslld {t}, {w1}, 16\n",
            "vpor {w1}, {w1}, {t}\n"
        )
    };
}

/// A row's 16-bit sums widened and scaled (`vpmaddwd`), added to its 32-bit sums at byte
/// offsets `$o0`, `$o1` from `{is}`.
macro_rules! add {
    ($x:literal, $a0:literal, $a1:literal, $o0:literal, $o1:literal) => {
        concat!(
            "vpmaddwd {",
            $a0,
            "}, {",
            $a0,
            "}, {w0}\n",
            "vpaddd {",
            $a0,
            "}, {",
            $a0,
            "}, ymmword ptr [{is} + ",
            $o0,
            "]\n",
            "vmovdqa ymmword ptr [{is} + ",
            $o0,
            "], {",
            $a0,
            "}\n",
            "vpmaddwd {",
            $a1,
            "}, {",
            $a1,
            "}, {w1}\n",
            "vpaddd {",
            $a1,
            "}, {",
            $a1,
            "}, ymmword ptr [{is} + ",
            $o1,
            "]\n",
            "vmovdqa ymmword ptr [{is} + ",
            $o1,
            "], {",
            $a1,
            "}\n"
        )
    };
}

/// A prefetch of the line at `$P + $o` from `{pf}`.
macro_rules! pf {
    ($P:literal, $o:literal) => {
        concat!("prefetcht0 byte ptr [{pf} + ", $P, " + ", $o, "]\n")
    };
}

/// No prefetch (one row fetches outside the steps).
macro_rules! no_pf {
    ($P:literal, $o:literal) => {
        ""
    };
}

/// One sub-block: its 8 steps (weights from `$wm` at `$W`, activations at `$X`) with 5
/// prefetches `$pf` from `$P` spread among them, then `$acc` (each row's sums widened into
/// its 32-bit ones, the scales at `$S`; or nothing).
macro_rules! sub_block {
    ($wm:ident, $pf:ident, $acc:ident; $W:literal, $X:literal, $S:literal, $P:literal;
     $( ($($row:tt)*) ),+) => {
        concat!(
            $wm!($W, 0, 32), $( row0!($X; $($row)*), )+ $pf!($P, 0),
            $wm!($W, 64, 96), $( row!($X, 4; $($row)*), )+
            $wm!($W, 128, 160), $( row!($X, 8; $($row)*), )+ $pf!($P, 64),
            $wm!($W, 192, 224), $( row!($X, 12; $($row)*), )+
            $wm!($W, 256, 288), $( row!($X, 16; $($row)*), )+ $pf!($P, 128),
            $wm!($W, 320, 352), $( row!($X, 20; $($row)*), )+ $pf!($P, 192),
            $wm!($W, 384, 416), $( row!($X, 24; $($row)*), )+
            $wm!($W, 448, 480), $( row!($X, 28; $($row)*), )+ $pf!($P, 256),
            $acc!($S; $( ($($row)*) ),+),
        )
    };
}

/// Every row's 16-bit sums widened by the scales at `$S` and added to its 32-bit sums.
macro_rules! widen {
    ($S:literal; $( ($($row:tt)*) ),+) => {
        concat!(scales!($S), $( add!($($row)*), )+)
    };
}

/// The 16-bit sums left in their registers (one row scales them outside).
macro_rules! keep {
    ($S:literal; $( ($($row:tt)*) ),+) => {
        ""
    };
}

/// A whole group for the rows listed (each `(x, sum 0, sum 1, offset 0, offset 1)`: operand
/// names and where its 32-bit sums sit in `{is}`), as a loop over the 4 sub-block pairs: pair
/// `p` reads the low, then the high nibbles of bytes `512 p..` of `qs` (`{w}`), activations
/// `64 p..` (`{x_r}`), scales at `2048 + 32 p` (`{sc}`), and its spread prefetches cover lines
/// `640 p..` from `{pf}`. A loop rather than all 8 sub-blocks written out: at 4 rows that is
/// ~2,000 instructions, and written out 3-4 rows measured 15-25% slower a block and row hot,
/// moving with where the code landed (the front end, likely, rather than the arithmetic).
macro_rules! group_asm {
    ($( ($x:literal, $($rest:tt)*) ),+) => {
        concat!(
            ".p2align 6\n",
            "2:\n",
            sub_block!(lo, pf, widen; "0", "0", "0", "0"; $( ($x, $($rest)*) ),+),
            sub_block!(hi, pf, widen; "0", "32", "16", "320"; $( ($x, $($rest)*) ),+),
            "add {w}, 512\n",
            "add {sc}, 32\n",
            "add {pf}, 640\n",
            $( "add {", $x, "}, 64\n", )+
            "dec {n:e}\n",
            "jnz 2b\n",
        )
    };
}

/// One group for `R` (2 to 4) rows: for each sub-block, 8 steps of 4 inputs into 16-bit sums,
/// those widened by the lanes' 6-bit scales into `isum` (`[row][half]`, zeroed by the caller);
/// the activations from `x[r]` (the group's 256), the lines from `pf` on fetched spread
/// through the steps (in batches a core computing 4 rows kept too few misses in flight: the
/// model's 16-sequence step took 6% longer). The whole group in assembly: with one `asm!` per
/// sub-block the compiler zeroed, spilled and rescaled the 16-bit sums between them, and its
/// register allocation moved with unrelated changes to the crate.
///
/// # Safety
/// AVX2; each `x[r]` holds 256 activations (`pf` may be any address: a prefetch never faults).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group<const R: usize>(
    g: &Q4kGroup,
    x: [*const i8; R],
    nib: __m256i,
    pf: *const u8,
    isum: &mut [[__m256i; 2]; R],
) {
    use std::arch::asm;
    let (w, sc, is) = (
        g.qs.as_ptr() as *const u8,
        g.scales.as_ptr() as *const u8,
        isum.as_mut_ptr(),
    );
    match R {
        2 => asm!(
            group_asm!(("x0", "a00", "a01", 0, 32), ("x1", "a10", "a11", 64, 96)),
            w = inout(reg) w => _, sc = inout(reg) sc => _, pf = inout(reg) pf => _,
            n = inout(reg) 4u32 => _, is = in(reg) is, nib = in(ymm_reg) nib,
            x0 = inout(reg) x[0] => _, x1 = inout(reg) x[1] => _,
            a00 = out(ymm_reg) _, a01 = out(ymm_reg) _,
            a10 = out(ymm_reg) _, a11 = out(ymm_reg) _,
            w0 = out(ymm_reg) _, w1 = out(ymm_reg) _, b = out(ymm_reg) _, t = out(ymm_reg) _,
            options(nostack),
        ),
        3 => asm!(
            group_asm!(("x0", "a00", "a01", 0, 32), ("x1", "a10", "a11", 64, 96),
                ("x2", "a20", "a21", 128, 160)),
            w = inout(reg) w => _, sc = inout(reg) sc => _, pf = inout(reg) pf => _,
            n = inout(reg) 4u32 => _, is = in(reg) is, nib = in(ymm_reg) nib,
            x0 = inout(reg) x[0] => _, x1 = inout(reg) x[1] => _, x2 = inout(reg) x[2] => _,
            a00 = out(ymm_reg) _, a01 = out(ymm_reg) _,
            a10 = out(ymm_reg) _, a11 = out(ymm_reg) _,
            a20 = out(ymm_reg) _, a21 = out(ymm_reg) _,
            w0 = out(ymm_reg) _, w1 = out(ymm_reg) _, b = out(ymm_reg) _, t = out(ymm_reg) _,
            options(nostack),
        ),
        _ => asm!(
            group_asm!(("x0", "a00", "a01", 0, 32), ("x1", "a10", "a11", 64, 96),
                ("x2", "a20", "a21", 128, 160), ("x3", "a30", "a31", 192, 224)),
            w = inout(reg) w => _, sc = inout(reg) sc => _, pf = inout(reg) pf => _,
            n = inout(reg) 4u32 => _, is = in(reg) is, nib = in(ymm_reg) nib,
            x0 = inout(reg) x[0] => _, x1 = inout(reg) x[1] => _, x2 = inout(reg) x[2] => _,
            x3 = inout(reg) x[3] => _,
            a00 = out(ymm_reg) _, a01 = out(ymm_reg) _,
            a10 = out(ymm_reg) _, a11 = out(ymm_reg) _,
            a20 = out(ymm_reg) _, a21 = out(ymm_reg) _,
            a30 = out(ymm_reg) _, a31 = out(ymm_reg) _,
            w0 = out(ymm_reg) _, w1 = out(ymm_reg) _, b = out(ymm_reg) _, t = out(ymm_reg) _,
            options(nostack),
        ),
    }
}

/// One row's sub-block: its 8 steps from the low or high nibbles of the 512 bytes at `w`, the
/// activations from `x`, as two 16-bit sums (scaled by the caller). One row keeps the
/// sub-block shape: the whole group in assembly (its 32-bit sums in registers, the same
/// batches) made the model's one-sequence q4k step ~2% slower (in-process A/B).
///
/// # Safety
/// AVX2; `w` holds 512 bytes, aligned to 32; `x` holds 32 activations.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn one_row(w: *const u8, x: *const i8, high: bool, nib: __m256i) -> [__m256i; 2] {
    use std::arch::asm;
    let (a0, a1);
    macro_rules! run {
        ($wm:ident) => {
            asm!(
                sub_block!($wm, no_pf, keep; "0", "0", "0", "0"; ("x0", "a00", "a01", 0, 0)),
                w = in(reg) w, x0 = in(reg) x, nib = in(ymm_reg) nib,
                a00 = out(ymm_reg) a0, a01 = out(ymm_reg) a1,
                w0 = out(ymm_reg) _, w1 = out(ymm_reg) _, b = out(ymm_reg) _, t = out(ymm_reg) _,
                options(nostack, pure, readonly),
            )
        };
    }
    if high {
        run!(hi)
    } else {
        run!(lo)
    }
    [a0, a1]
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
