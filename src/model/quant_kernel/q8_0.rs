//! q8_0 packed for AVX-512 VNNI (see `packed.rs`; `avx2.rs` for CPUs without it): with the 16 rows of a group interleaved
//! two weights at a time, widened to 16 bits, each `vpdpwssd` adds 32 products of 16 rows
//! with one pair of activations broadcast, and one conversion and FMA per block apply the 16
//! rows' scales. Activations are rounded to 16 bits per block of 32 (see `quant_kernel.rs`),
//! so block sums are exact i32 and the q8_0 parity test's margins hold; a third of the
//! instructions per row of the unpacked 16-bit kernels this replaced, which is what several
//! rows sharing the weights are bound by.

use super::packed::{prefetch_next_run, Group, PackedWeight, LANES};
use super::{BlockQ8_0, Row16, Rows16};
use candle_core::Result;
use std::arch::x86_64::*;

mod avx2;

/// Inputs per block.
const QK: usize = 32;

/// One block of 32 inputs of 16 q8_0 rows.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub struct Q8Group {
    /// `[j][lane][2]`: weights `2j, 2j + 1` of each row.
    w: [[i8; 32]; 16],
    /// f16 scale bits, one per row.
    d: [u16; 16],
}

const _: () = assert!(std::mem::size_of::<Q8Group>() == 544);

impl Group for Q8Group {
    const INPUTS: usize = QK;
    const ZERO: Self = Self {
        w: [[0; 32]; 16],
        d: [0; 16],
    };
    const MAX_ROWS: usize = 8;
    type Acts = Rows16;

    /// AVX-512 VNNI, or AVX2 (`avx2.rs`).
    fn available() -> bool {
        super::packed::vnni() || super::packed::avx2()
    }

    fn holds(x: &Row16<'_>, k: usize) -> bool {
        x.q.len() >= k && x.d.len() * QK >= k
    }

    unsafe fn rows<const R: usize>(
        xs: &[Row16<'_>],
        groups: &[Self],
        out: &mut [f32],
        prefetch: bool,
    ) {
        if super::packed::vnni() {
            rows::<R>(xs, groups, out, prefetch)
        } else {
            avx2::rows::<R>(xs, groups, out, prefetch)
        }
    }
}

/// A q8_0 weight packed for [`Q8Group`]'s kernel.
pub type PackedQ8_0 = PackedWeight<Q8Group>;

/// Packs candle's q8_0 bytes (`QTensor::data`) of an `[n, k]` weight.
pub fn pack(bytes: &[u8], n: usize, k: usize) -> Result<PackedQ8_0> {
    let blocks = super::packed::weight_blocks::<BlockQ8_0>(bytes, n, k, QK)?;
    let kb = k / QK;
    Ok(PackedWeight::new(n, k, |g: &mut Q8Group, row, bi, lane| {
        let b = &blocks[row * kb + bi];
        for (j, w) in g.w.iter_mut().enumerate() {
            w[2 * lane..2 * lane + 2].copy_from_slice(&b.qs[2 * j..2 * j + 2]);
        }
        g.d[lane] = u16::from_le_bytes(b.d);
    }))
}

/// `R` activation rows against one run of groups, accumulators in registers.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows<const R: usize>(
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
    let mut acc = [_mm512_setzero_ps(); R];
    for (bi, g) in groups.iter().enumerate() {
        if prefetch {
            prefetch_next_run(g, groups.len());
        }
        // Two accumulators per row: the pairs alternate between them, halving the chain.
        let mut s = [[_mm512_setzero_si512(); 2]; R];
        for (j, pair) in g.w.chunks_exact(2).enumerate() {
            let w = |t: usize| {
                _mm512_cvtepi8_epi16(_mm256_load_si256(pair[t].as_ptr() as *const __m256i))
            };
            let (w0, w1) = (w(0), w(1));
            for r in 0..R {
                // Activations 4j..4j + 4: two pairs, each one 32-bit lane.
                let x = xq[r].add(bi * QK + 4 * j) as *const i32;
                let (x0, x1) = (
                    std::ptr::read_unaligned(x),
                    std::ptr::read_unaligned(x.add(1)),
                );
                s[r][0] = _mm512_dpwssd_epi32(s[r][0], w0, _mm512_set1_epi32(x0));
                s[r][1] = _mm512_dpwssd_epi32(s[r][1], w1, _mm512_set1_epi32(x1));
            }
        }
        let d = _mm512_cvtph_ps(_mm256_load_si256(g.d.as_ptr() as *const __m256i));
        for r in 0..R {
            let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(s[r][0], s[r][1]));
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(*xd[r].add(bi)));
            acc[r] = _mm512_fmadd_ps(sum, scale, acc[r]);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(out[r * LANES..r * LANES + LANES].as_mut_ptr(), *a);
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::small_matmul::products;
    use super::super::{as_blocks, scalar_tile, Block};
    use super::*;
    use crate::model::test_data::data;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn bytes(n: usize, k: usize, seed: u32, dtype: GgmlDType) -> Result<Vec<u8>> {
        let w = Tensor::from_vec(data(n * k, seed), (n, k), &Device::Cpu)?;
        Ok(QTensor::quantize(&w, dtype)?.data()?.to_vec())
    }

    /// The packed kernel against the scalar one on the same rounded activations, for every
    /// row count the register blocking splits differently, with a partial group of rows.
    fn check<G: Group<Acts = Rows16>, B: Block>(
        pack: fn(&[u8], usize, usize) -> Result<PackedWeight<G>>,
        dtype: GgmlDType,
    ) -> Result<()> {
        let (n, k) = (40, 256);
        let raw = bytes(n, k, 1, dtype)?;
        let packed = pack(&raw, n, k)?;
        let blocks = as_blocks::<B>(&raw)?;
        for m in [1, 2, 3, 5, 8, 9, 17] {
            let x = data(m * k, m as u32 + 10);
            let acts = Rows16::new(&x, k);
            let want = products(&acts.rows(), blocks, n, k / QK, k, scalar_tile::<B>);
            let got = packed.matmul(&x, m, 128);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{dtype:?} m {m} [{i}]: {g} vs {e}"
                );
            }
            // Each row alone, and through passes of 4 rows, is bit-identical to the batch.
            assert_eq!(packed.matmul(&x, m, 4), got, "{dtype:?} m {m}: passes of 4");
            for i in 0..m {
                let alone = packed.matmul(&x[i * k..(i + 1) * k], 1, 128);
                assert_eq!(
                    alone[..],
                    got[i * n..(i + 1) * n],
                    "{dtype:?} m {m} row {i}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn packed_products_match_the_scalar_ones_and_are_batch_invariant() -> Result<()> {
        if !Q8Group::available() {
            return Ok(());
        }
        check::<Q8Group, BlockQ8_0>(pack, GgmlDType::Q8_0)
    }

    #[test]
    fn non_finite_activations_give_non_finite_output() -> Result<()> {
        if !Q8Group::available() {
            return Ok(());
        }
        let (n, k) = (16, 64);
        let packed = pack(&bytes(n, k, 2, GgmlDType::Q8_0)?, n, k)?;
        let mut x = data(k, 3);
        x[40] = f32::NAN;
        assert!(packed.matmul(&x, 1, 128).iter().all(|v| v.is_nan()));
        Ok(())
    }

    #[test]
    fn bytes_that_are_not_the_weight_are_an_error() -> Result<()> {
        let raw = bytes(2, 64, 4, GgmlDType::Q8_0)?;
        assert!(pack(&raw, 3, 64).is_err());
        assert!(pack(&raw[..17], 2, 64).is_err());
        Ok(())
    }
}
