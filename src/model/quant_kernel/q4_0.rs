//! q4_0 packed for AVX-512 VNNI (see `packed.rs`; `avx2.rs` for CPUs without it), with activations rounded to 8 bits per
//! block of 32 as GGML's own q4_0 kernels round them (its `q8_0`): 16 rows interleaved 4
//! weights at a time, so a `vpdpbusd` adds 64 products (4-bit weight, 8-bit activation) into
//! 16 rows' lanes, half the instructions of the 16-bit `vpdpwssd` kernel q8_0 keeps. The
//! weights' offset of 8 comes off through each activation block's sum.

use super::packed::{prefetch_next_run, Group, PackedWeight, LANES};
use super::rows8::{Row8, RowPtrs, Rows8};
use super::BlockQ4_0;
use candle_core::Result;
use std::arch::x86_64::*;

mod avx2;

/// Inputs per block.
const QK: usize = 32;

/// One block of 32 inputs of 16 q4_0 rows.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub struct Q4Group {
    /// `[g][lane][4]`: GGML's bytes `4g..4g + 4` of each row: the low nibbles are weights
    /// `4g..4g + 4`, the high nibbles weights `16 + 4g..16 + 4g + 4` (unsigned, 8 above).
    w: [[u8; 64]; 4],
    /// f16 scale bits, one per row.
    d: [u16; 16],
}

const _: () = assert!(std::mem::size_of::<Q4Group>() == 288);

impl Group for Q4Group {
    const INPUTS: usize = QK;
    const MAX_ROWS: usize = 8;
    const ZERO: Self = Self {
        w: [[0x88; 64]; 4],
        d: [0; 16],
    };
    type Acts = Rows8<QK>;

    /// AVX-512 VNNI, or AVX2 (`avx2.rs`).
    fn available() -> bool {
        super::packed::vnni() || super::packed::avx2()
    }

    fn holds(x: &Row8<'_>, k: usize) -> bool {
        x.q.len() >= k && x.d.len() * QK >= k && x.sums.len() * QK >= k
    }

    unsafe fn rows<const R: usize>(
        xs: &[Row8<'_>],
        groups: &[Self],
        out: &mut [f32],
        prefetch: bool,
    ) {
        if super::packed::vnni() {
            runs::<R, 1>(xs, [groups], [out], prefetch)
        } else {
            avx2::rows::<R>(xs, groups, out, prefetch)
        }
    }

    /// Two weights' sums of 4 rows fill the registers.
    const PAIR_MAX_ROWS: usize = 4;

    unsafe fn rows_pair<const R: usize>(
        xs: &[Row8<'_>],
        a: &[Self],
        b: &[Self],
        out_a: &mut [f32],
        out_b: &mut [f32],
        prefetch: bool,
    ) {
        if super::packed::vnni() {
            runs::<R, 2>(xs, [a, b], [out_a, out_b], prefetch)
        } else {
            // AVX2's 16 registers hold no second weight's sums: two passes.
            avx2::rows::<R>(xs, a, out_a, prefetch);
            avx2::rows::<R>(xs, b, out_b, prefetch);
        }
    }
}

/// A q4_0 weight packed for [`Q4Group`]'s kernel.
pub type PackedQ4_0 = PackedWeight<Q4Group>;

/// Packs candle's q4_0 bytes (`QTensor::data`) of an `[n, k]` weight.
pub fn pack(bytes: &[u8], n: usize, k: usize) -> Result<PackedQ4_0> {
    let blocks = super::packed::weight_blocks::<BlockQ4_0>(bytes, n, k, QK)?;
    let kb = k / QK;
    Ok(PackedWeight::new(n, k, |g: &mut Q4Group, row, bi, lane| {
        let b = &blocks[row * kb + bi];
        for (gr, w) in g.w.iter_mut().enumerate() {
            w[4 * lane..4 * lane + 4].copy_from_slice(&b.qs[4 * gr..4 * gr + 4]);
        }
        g.d[lane] = u16::from_le_bytes(b.d);
    }))
}

/// `R` activation rows against the same run of `C` weights of one shape (`C` = 2: an
/// expert's gate and up, each broadcast activation feeding both), accumulators in registers.
/// A weight's instructions, so its results, are the same whatever `C`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // `bi` indexes all C runs
unsafe fn runs<const R: usize, const C: usize>(
    xs: &[Row8<'_>],
    groups: [&[Q4Group]; C],
    outs: [&mut [f32]; C],
    prefetch: bool,
) {
    let RowPtrs {
        q: xq,
        d: xd,
        sums: xsum,
    } = RowPtrs::<R>::new(xs);
    let nibble = _mm512_set1_epi8(0x0F);
    let mut acc = [[_mm512_setzero_ps(); R]; C];
    let len = groups[0].len();
    for bi in 0..len {
        let g: [&Q4Group; C] = std::array::from_fn(|c| &groups[c][bi]);
        if prefetch {
            for g in g {
                prefetch_next_run(g, len);
            }
        }
        let mut s = [[_mm512_setzero_si512(); R]; C];
        for gr in 0..4 {
            let mut lo = [_mm512_setzero_si512(); C];
            let mut hi = [_mm512_setzero_si512(); C];
            for c in 0..C {
                let v = _mm512_loadu_si512(g[c].w[gr].as_ptr() as *const __m512i);
                lo[c] = _mm512_and_si512(v, nibble);
                hi[c] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
            }
            for r in 0..R {
                let x = xq[r].add(bi * QK + 4 * gr);
                let xl = _mm512_set1_epi32(std::ptr::read_unaligned(x as *const i32));
                let xh = _mm512_set1_epi32(std::ptr::read_unaligned(x.add(16) as *const i32));
                for c in 0..C {
                    s[c][r] = _mm512_dpbusd_epi32(s[c][r], lo[c], xl);
                    s[c][r] = _mm512_dpbusd_epi32(s[c][r], hi[c], xh);
                }
            }
        }
        for c in 0..C {
            let d = _mm512_cvtph_ps(_mm256_load_si256(g[c].d.as_ptr() as *const __m256i));
            for r in 0..R {
                // Weights are stored 8 above their value: take 8 x the block's activation sum.
                let offset = _mm512_set1_epi32(8 * *xsum[r].add(bi) as i32);
                let sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(s[c][r], offset));
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(*xd[r].add(bi)));
                acc[c][r] = _mm512_fmadd_ps(sum, scale, acc[c][r]);
            }
        }
    }
    for (out, acc) in outs.into_iter().zip(&acc) {
        for (r, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(out[r * LANES..r * LANES + LANES].as_mut_ptr(), *a);
        }
    }
}

/// The same products in plain Rust on the same rounded activations, for tests: `[m, n]`.
#[cfg(test)]
pub fn scalar_products(xs: &[Row8<'_>], w: &[BlockQ4_0], n: usize) -> Vec<f32> {
    use super::Block;
    let kb = w.len() / n.max(1);
    let mut out = vec![0f32; xs.len() * n];
    for (r, x) in xs.iter().enumerate() {
        for j in 0..n {
            let mut acc = 0f64;
            for (bi, b) in w[j * kb..(j + 1) * kb].iter().enumerate() {
                for i in 0..QK {
                    acc += b.weight(i) as f64 * x.q[bi * QK + i] as f64 * x.d[bi] as f64;
                }
            }
            out[r * n + j] = acc as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::as_blocks;
    use super::super::packed::Activations;
    use super::*;
    use crate::model::test_data::data;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn bytes(n: usize, k: usize, seed: u32) -> Result<Vec<u8>> {
        let w = Tensor::from_vec(data(n * k, seed), (n, k), &Device::Cpu)?;
        Ok(QTensor::quantize(&w, GgmlDType::Q4_0)?.data()?.to_vec())
    }

    /// The kernel against plain Rust on the same rounded activations, for every row count
    /// the register blocking splits differently and a partial group of rows; each row alone
    /// and through passes of 4 is bit-identical to the batch.
    #[test]
    fn packed_products_match_the_scalar_ones_and_are_batch_invariant() -> Result<()> {
        if !Q4Group::available() {
            return Ok(());
        }
        let (n, k) = (40, 256);
        let raw = bytes(n, k, 1)?;
        let packed = pack(&raw, n, k)?;
        let blocks = as_blocks::<BlockQ4_0>(&raw)?;
        for m in [1, 2, 3, 5, 8, 9, 17] {
            let x = data(m * k, m as u32 + 20);
            let acts = Rows8::<QK>::new(&x, k);
            let rows = acts.rows();
            let got = packed.matmul(&x, m, 128);
            let want = scalar_products(&rows, blocks, n);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "m {m} [{i}]: {g} vs {e}"
                );
            }
            assert_eq!(packed.matmul(&x, m, 4), got, "m {m}: passes of 4");
            for i in 0..m {
                let alone = packed.matmul(&x[i * k..(i + 1) * k], 1, 128);
                assert_eq!(alone[..], got[i * n..(i + 1) * n], "m {m} row {i}");
            }
        }
        Ok(())
    }

    /// Gate and up in one pass give, bit for bit, what two products give.
    #[test]
    fn paired_products_equal_separate_ones() -> Result<()> {
        if !Q4Group::available() {
            return Ok(());
        }
        let (n, k) = (40, 256);
        let gate = pack(&bytes(n, k, 5)?, n, k)?;
        let up = pack(&bytes(n, k, 6)?, n, k)?;
        super::super::packed::assert_paired_equals_separate(&gate, &up);
        Ok(())
    }

    #[test]
    fn non_finite_activations_give_non_finite_output() -> Result<()> {
        if !Q4Group::available() {
            return Ok(());
        }
        let (n, k) = (16, 64);
        let packed = pack(&bytes(n, k, 2)?, n, k)?;
        let mut x = data(k, 3);
        x[40] = f32::NAN;
        assert!(packed.matmul(&x, 1, 128).iter().all(|v| v.is_nan()));
        Ok(())
    }

    #[test]
    fn bytes_that_are_not_the_weight_are_an_error() -> Result<()> {
        let raw = bytes(2, 64, 4)?;
        assert!(pack(&raw, 3, 64).is_err());
        assert!(pack(&raw[..17], 2, 64).is_err());
        Ok(())
    }
}
