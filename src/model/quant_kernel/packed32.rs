//! q8_0 and q4_0 packed for AVX-512 VNNI (see `packed.rs`): with the 16 rows of a group
//! interleaved two weights at a time, widened to 16 bits, each `vpdpwssd` adds 32 products
//! of 16 rows with one pair of activations broadcast, and one conversion and FMA per block
//! apply the 16 rows' scales. Same arithmetic as the unpacked kernels (activations rounded to
//! 16 bits per block of 32, exact i32 block sums), about a third of their instructions per
//! row, which is what several rows sharing the weights are bound by.

use super::super::small_matmul::prefetch_lines;
use super::packed::{Group, PackedWeight, LANES};
use super::{as_blocks, BlockQ4_0, BlockQ8_0, Row16, Rows16};
use candle_core::{bail, Result};
use std::arch::x86_64::*;

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

/// One block of 32 inputs of 16 q4_0 rows.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub struct Q4Group {
    /// `[j][lane][2]`: the low nibbles are weights `2j, 2j + 1` of each row, the high nibbles
    /// weights `2j + 16, 2j + 17` (unsigned, 8 above the weight).
    w: [[u8; 32]; 8],
    d: [u16; 16],
}

const _: () = assert!(std::mem::size_of::<Q8Group>() == 544);
const _: () = assert!(std::mem::size_of::<Q4Group>() == 288);

/// The 16-bit weight vectors of a block, two at a time, with the offsets of the activation
/// pairs each meets.
trait Unpack: Group {
    /// Pair `j` (0..8) of the 16 vectors.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BW.
    unsafe fn pair(&self, j: usize) -> [(__m512i, usize); 2];
    /// The rows' f16 scale bits.
    fn d(&self) -> &[u16; 16];
}

fn vnni() -> bool {
    super::avx512::available() && std::is_x86_feature_detected!("avx512vnni")
}

impl Group for Q8Group {
    const INPUTS: usize = QK;
    const ZERO: Self = Self {
        w: [[0; 32]; 16],
        d: [0; 16],
    };
    const MAX_ROWS: usize = 8;
    type Acts = Rows16;

    fn available() -> bool {
        vnni()
    }

    fn holds(x: &Row16<'_>, k: usize) -> bool {
        x.q.len() >= k && x.d.len() * QK >= k
    }

    unsafe fn rows<const R: usize>(xs: &[Row16<'_>], groups: &[Self], out: &mut [f32]) {
        rows::<R, Self>(xs, groups, out)
    }
}

impl Unpack for Q8Group {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pair(&self, j: usize) -> [(__m512i, usize); 2] {
        let a = _mm256_load_si256(self.w[2 * j].as_ptr() as *const __m256i);
        let b = _mm256_load_si256(self.w[2 * j + 1].as_ptr() as *const __m256i);
        [
            (_mm512_cvtepi8_epi16(a), 4 * j),
            (_mm512_cvtepi8_epi16(b), 4 * j + 2),
        ]
    }

    fn d(&self) -> &[u16; 16] {
        &self.d
    }
}

impl Group for Q4Group {
    const INPUTS: usize = QK;
    const ZERO: Self = Self {
        w: [[0x88; 32]; 8],
        d: [0; 16],
    };
    const MAX_ROWS: usize = 8;
    type Acts = Rows16;

    fn available() -> bool {
        vnni()
    }

    fn holds(x: &Row16<'_>, k: usize) -> bool {
        x.q.len() >= k && x.d.len() * QK >= k
    }

    unsafe fn rows<const R: usize>(xs: &[Row16<'_>], groups: &[Self], out: &mut [f32]) {
        rows::<R, Self>(xs, groups, out)
    }
}

impl Unpack for Q4Group {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pair(&self, j: usize) -> [(__m512i, usize); 2] {
        let v = _mm512_cvtepu8_epi16(_mm256_load_si256(self.w[j].as_ptr() as *const __m256i));
        let (nibble, eight) = (_mm512_set1_epi16(0x0F), _mm512_set1_epi16(8));
        let lo = _mm512_sub_epi16(_mm512_and_si512(v, nibble), eight);
        let hi = _mm512_sub_epi16(_mm512_srli_epi16::<4>(v), eight);
        [(lo, 2 * j), (hi, 2 * j + 16)]
    }

    fn d(&self) -> &[u16; 16] {
        &self.d
    }
}

/// A q8_0 weight packed for [`Q8Group`]'s kernel.
pub type PackedQ8_0 = PackedWeight<Q8Group>;
/// A q4_0 weight packed for [`Q4Group`]'s kernel.
pub type PackedQ4_0 = PackedWeight<Q4Group>;

/// The blocks of candle's bytes (`QTensor::data`) of an `[n, k]` weight, checked.
fn blocks<B: super::RawBlock>(bytes: &[u8], n: usize, k: usize) -> Result<&[B]> {
    let blocks = as_blocks::<B>(bytes)?;
    if !k.is_multiple_of(QK) || blocks.len() != n * (k / QK) {
        bail!("{} blocks do not make a [{n}, {k}] weight", blocks.len());
    }
    Ok(blocks)
}

/// Packs candle's q8_0 bytes of an `[n, k]` weight.
pub fn pack_q8_0(bytes: &[u8], n: usize, k: usize) -> Result<PackedQ8_0> {
    let blocks = blocks::<BlockQ8_0>(bytes, n, k)?;
    let kb = k / QK;
    Ok(PackedWeight::new(n, k, |g: &mut Q8Group, row, bi, lane| {
        let b = &blocks[row * kb + bi];
        for (j, w) in g.w.iter_mut().enumerate() {
            w[2 * lane..2 * lane + 2].copy_from_slice(&b.qs[2 * j..2 * j + 2]);
        }
        g.d[lane] = u16::from_le_bytes(b.d);
    }))
}

/// Packs candle's q4_0 bytes of an `[n, k]` weight.
pub fn pack_q4_0(bytes: &[u8], n: usize, k: usize) -> Result<PackedQ4_0> {
    let blocks = blocks::<BlockQ4_0>(bytes, n, k)?;
    let kb = k / QK;
    Ok(PackedWeight::new(n, k, |g: &mut Q4Group, row, bi, lane| {
        let b = &blocks[row * kb + bi];
        // GGML's q4_0 byte i holds weight i (low nibble) and weight i + 16 (high nibble), the
        // same split as ours: byte 2j + e of a lane is GGML's byte 2j + e.
        for (j, w) in g.w.iter_mut().enumerate() {
            w[2 * lane..2 * lane + 2].copy_from_slice(&b.qs[2 * j..2 * j + 2]);
        }
        g.d[lane] = u16::from_le_bytes(b.d);
    }))
}

/// Bytes ahead of the block being read that are prefetched.
const PREFETCH_BYTES: usize = 2048;

/// `R` activation rows against one run of groups, accumulators in registers.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows<const R: usize, G: Unpack>(xs: &[Row16<'_>], groups: &[G], out: &mut [f32]) {
    let mut xq = [std::ptr::null::<i16>(); R];
    let mut xd = [std::ptr::null::<f32>(); R];
    for (r, x) in xs.iter().take(R).enumerate() {
        xq[r] = x.q.as_ptr();
        xd[r] = x.d.as_ptr();
    }
    let mut acc = [_mm512_setzero_ps(); R];
    for (bi, g) in groups.iter().enumerate() {
        let at = g as *const G as *const u8;
        prefetch_lines(at.wrapping_add(PREFETCH_BYTES), std::mem::size_of::<G>());
        // Two accumulators per row: the pairs alternate between them, halving the chain.
        let mut s = [[_mm512_setzero_si512(); 2]; R];
        for j in 0..8 {
            for (e, (w, off)) in g.pair(j).into_iter().enumerate() {
                for r in 0..R {
                    let x = std::ptr::read_unaligned(xq[r].add(bi * QK + off) as *const i32);
                    s[r][e] = _mm512_dpwssd_epi32(s[r][e], w, _mm512_set1_epi32(x));
                }
            }
        }
        let d = _mm512_cvtph_ps(_mm256_load_si256(g.d().as_ptr() as *const __m256i));
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
    use super::super::{scalar_tile, Block};
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
        if !vnni() {
            return Ok(());
        }
        check::<Q8Group, BlockQ8_0>(pack_q8_0, GgmlDType::Q8_0)?;
        check::<Q4Group, BlockQ4_0>(pack_q4_0, GgmlDType::Q4_0)
    }

    #[test]
    fn non_finite_activations_give_non_finite_output() -> Result<()> {
        if !vnni() {
            return Ok(());
        }
        let (n, k) = (16, 64);
        let packed = pack_q8_0(&bytes(n, k, 2, GgmlDType::Q8_0)?, n, k)?;
        let mut x = data(k, 3);
        x[40] = f32::NAN;
        assert!(packed.matmul(&x, 1, 128).iter().all(|v| v.is_nan()));
        Ok(())
    }

    #[test]
    fn bytes_that_are_not_the_weight_are_an_error() -> Result<()> {
        let raw = bytes(2, 64, 4, GgmlDType::Q4_0)?;
        assert!(pack_q4_0(&raw, 3, 64).is_err());
        assert!(pack_q4_0(&raw[..17], 2, 64).is_err());
        Ok(())
    }
}
