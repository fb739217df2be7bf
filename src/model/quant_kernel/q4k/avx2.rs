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
        for p in 0..4 {
            if prefetch && R == 1 {
                // One row: the next group, a quarter at each sub-block pair, into L1: on Zen 3
                // this beat the VNNI kernel's non-temporal fetch a run ahead (MoE bench, one
                // token: 0.50-0.62 vs 0.68-0.87 ms a layer).
                let lines = std::mem::size_of::<Q4kGroup>().div_ceil(64);
                let per = lines.div_ceil(4);
                for l in p * per..((p + 1) * per).min(lines) {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64 * l) as *const i8);
                }
            }
            for high in [false, true] {
                let at = bi * QK_K + 64 * p + if high { 32 } else { 0 };
                let x: [*const i8; R] = std::array::from_fn(|r| xq[r].add(at));
                let j = 2 * p + high as usize;
                // More rows: 5 lines of the next group spread through each sub-block's steps
                // (40 a group: its 37 and 3 of the one after), for the pass that fetches; the
                // others touch their own group's lines, in L1 already. In batches of 9 at each
                // sub-block pair (as one row has them) a core kept too few misses in flight
                // while computing: the model's 16-sequence q4k step took 6% longer (38.7 vs
                // 36.2 and 32.4 vs 30.3 ms, median step, both alternating in one process).
                let fetch = if prefetch {
                    next
                } else {
                    g as *const Q4kGroup as *const u8
                };
                let acc = sub_block::<R>(
                    g.qs[8 * p].as_ptr(),
                    x,
                    high,
                    nibble,
                    fetch.wrapping_add(320 * j),
                );
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
                acc.fmadd(r, h, f, _mm256_set1_ps(*xd[r].add(bi)));
            }
        }
    }
    acc.finish();
}

/// The weight vectors of one step from the low nibbles of the bytes at offsets `$o`, `$o2`.
macro_rules! lo {
    ($o:literal, $o2:literal) => {
        concat!(
            "vpand {w0}, {nib}, ymmword ptr [{w} + ",
            $o,
            "]\n",
            "vpand {w1}, {nib}, ymmword ptr [{w} + ",
            $o2,
            "]\n"
        )
    };
}

/// The same from the high nibbles.
macro_rules! hi {
    ($o:literal, $o2:literal) => {
        concat!(
            "vmovdqa {w0}, ymmword ptr [{w} + ",
            $o,
            "]\n",
            "vpsrlw {w0}, {w0}, 4\n",
            "vpand {w0}, {w0}, {nib}\n",
            "vmovdqa {w1}, ymmword ptr [{w} + ",
            $o2,
            "]\n",
            "vpsrlw {w1}, {w1}, 4\n",
            "vpand {w1}, {w1}, {nib}\n"
        )
    };
}

/// One row of one step: its 4 activations at offset `$xo` broadcast, times both halves of
/// the weight vectors, added to its two sums.
macro_rules! row {
    ($x:literal, $a0:literal, $a1:literal, $xo:literal) => {
        concat!(
            "vpbroadcastd {b}, dword ptr [{",
            $x,
            "} + ",
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

/// A prefetch of the line at offset `$o` from `{pf}`.
macro_rules! pf {
    ($o:literal) => {
        concat!("prefetcht0 byte ptr [{pf} + ", $o, "]\n")
    };
}

/// No prefetch (one row a pass fetches outside the steps).
macro_rules! no_pf {
    ($o:literal) => {
        ""
    };
}

/// The 8 steps of a sub-block for the rows listed (each `(x, sum 0, sum 1)` operand names),
/// with 5 prefetches (`$pf`) spread among them.
macro_rules! steps {
    ($wm:ident, $pf:ident; $( ($x:literal, $a0:literal, $a1:literal) ),+) => {
        concat!(
            $wm!(0, 32), $( row!($x, $a0, $a1, 0), )+ $pf!(0),
            $wm!(64, 96), $( row!($x, $a0, $a1, 4), )+
            $wm!(128, 160), $( row!($x, $a0, $a1, 8), )+ $pf!(64),
            $wm!(192, 224), $( row!($x, $a0, $a1, 12), )+
            $wm!(256, 288), $( row!($x, $a0, $a1, 16), )+ $pf!(128),
            $wm!(320, 352), $( row!($x, $a0, $a1, 20), )+ $pf!(192),
            $wm!(384, 416), $( row!($x, $a0, $a1, 24), )+
            $wm!(448, 480), $( row!($x, $a0, $a1, 28), )+ $pf!(256),
        )
    };
}

/// One sub-block's 16-bit sums for `R` (1 to 4) rows: 8 steps of 4 inputs from the low or
/// high nibbles of the 512 bytes at `w`, the activations from `x[r]`; with 2 or more rows,
/// the lines at `pf`, `pf + 64`, ... `pf + 256` prefetched among the steps. In assembly because
/// the compiled loop's register allocation moved with unrelated changes to the crate (the same
/// source came out with twice the stack traffic, prefill 25-30% slower); written out, every
/// build runs the same instructions.
///
/// # Safety
/// AVX2; `w` holds 512 bytes, aligned to 32; each `x[r]` holds 32 activations (`pf` may be
/// any address: a prefetch never faults).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sub_block<const R: usize>(
    w: *const u8,
    x: [*const i8; R],
    high: bool,
    nib: __m256i,
    pf: *const u8,
) -> [[__m256i; 2]; R] {
    use std::arch::asm;
    let mut a = [[_mm256_setzero_si256(); 2]; R];
    macro_rules! run {
        ($wm:ident) => {
            match R {
                1 => asm!(
                    steps!($wm, no_pf; ("x0", "a00", "a01")),
                    w = in(reg) w, x0 = in(reg) x[0], nib = in(ymm_reg) nib,
                    a00 = inout(ymm_reg) a[0][0], a01 = inout(ymm_reg) a[0][1],
                    w0 = out(ymm_reg) _, w1 = out(ymm_reg) _, b = out(ymm_reg) _, t = out(ymm_reg) _,
                    options(nostack, pure, readonly),
                ),
                2 => asm!(
                    steps!($wm, pf; ("x0", "a00", "a01"), ("x1", "a10", "a11")),
                    w = in(reg) w, pf = in(reg) pf, x0 = in(reg) x[0], x1 = in(reg) x[1],
                    nib = in(ymm_reg) nib,
                    a00 = inout(ymm_reg) a[0][0], a01 = inout(ymm_reg) a[0][1],
                    a10 = inout(ymm_reg) a[1][0], a11 = inout(ymm_reg) a[1][1],
                    w0 = out(ymm_reg) _, w1 = out(ymm_reg) _, b = out(ymm_reg) _, t = out(ymm_reg) _,
                    options(nostack, pure, readonly),
                ),
                3 => asm!(
                    steps!($wm, pf; ("x0", "a00", "a01"), ("x1", "a10", "a11"),
                        ("x2", "a20", "a21")),
                    w = in(reg) w, pf = in(reg) pf, x0 = in(reg) x[0], x1 = in(reg) x[1],
                    x2 = in(reg) x[2], nib = in(ymm_reg) nib,
                    a00 = inout(ymm_reg) a[0][0], a01 = inout(ymm_reg) a[0][1],
                    a10 = inout(ymm_reg) a[1][0], a11 = inout(ymm_reg) a[1][1],
                    a20 = inout(ymm_reg) a[2][0], a21 = inout(ymm_reg) a[2][1],
                    w0 = out(ymm_reg) _, w1 = out(ymm_reg) _, b = out(ymm_reg) _, t = out(ymm_reg) _,
                    options(nostack, pure, readonly),
                ),
                _ => asm!(
                    steps!($wm, pf; ("x0", "a00", "a01"), ("x1", "a10", "a11"),
                        ("x2", "a20", "a21"), ("x3", "a30", "a31")),
                    w = in(reg) w, pf = in(reg) pf, x0 = in(reg) x[0], x1 = in(reg) x[1],
                    x2 = in(reg) x[2], x3 = in(reg) x[3], nib = in(ymm_reg) nib,
                    a00 = inout(ymm_reg) a[0][0], a01 = inout(ymm_reg) a[0][1],
                    a10 = inout(ymm_reg) a[1][0], a11 = inout(ymm_reg) a[1][1],
                    a20 = inout(ymm_reg) a[2][0], a21 = inout(ymm_reg) a[2][1],
                    a30 = inout(ymm_reg) a[3][0], a31 = inout(ymm_reg) a[3][1],
                    w0 = out(ymm_reg) _, w1 = out(ymm_reg) _, b = out(ymm_reg) _, t = out(ymm_reg) _,
                    options(nostack, pure, readonly),
                ),
            }
        };
    }
    if high {
        run!(hi)
    } else {
        run!(lo)
    }
    a
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
