//! q4k (GGML's Q4_K) weights packed for AVX-512 VNNI (see `packed.rs`), and their products.
//!
//! candle's q4k kernel reached 47% of the memory roofline for one sequence, and ran on a
//! spinning thread pool of its own beside ours (its spin-waits were ~20% of a decode profile
//! on 2 cores). A kernel reading candle's layout as is needs 8 multiplies per row and block
//! to apply the 8 sub-block scales to lanes that each hold a piece of one sub-block, which
//! made it slower than candle's. Packed, 16 rows interleaved 4 bytes at a time, each lane of a
//! `vpdpbusd` accumulator is one row's whole sub-block, and one multiply applies that
//! sub-block's 16 scales. The arithmetic is GGML's: activations rounded to 8 bits per 256
//! values (`q8_K`, an error small next to the 4-bit weights'), exact integer sums per
//! super-block, the mins folded in through each activation sub-block's sum.

use super::packed::{prefetch_next_run_part, Group, PackedWeight, LANES};
use super::rows8::{Row8, RowPtrs, Rows8};
use super::RawBlock;
use candle_core::Result;
use std::arch::x86_64::*;

mod avx2;

/// Weights per super-block.
pub const QK_K: usize = 256;

/// GGML's Q4_K super-block, as candle stores it: weight `l` of sub-block `j` (32 each) is
/// `d * scale_j * q - dmin * min_j` with `q` in 0..16.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4K {
    d: [u8; 2],
    dmin: [u8; 2],
    /// Eight 6-bit scales and eight 6-bit mins, packed as [`BlockQ4K::scales_mins`] reads.
    scales: [u8; 12],
    /// Bytes `32c..32c + 32`: low nibbles are sub-block `2c`, high nibbles sub-block `2c + 1`.
    qs: [u8; 128],
}

const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);

// SAFETY: a `repr(C)` struct of byte arrays.
unsafe impl RawBlock for BlockQ4K {}

impl BlockQ4K {
    /// The eight sub-block scales, then the eight mins (GGML's `get_scale_min_k4`).
    fn scales_mins(&self) -> [u8; 16] {
        let s = &self.scales;
        let mut out = [0u8; 16];
        for j in 0..8 {
            let (sc, m) = if j < 4 {
                (s[j] & 63, s[j + 4] & 63)
            } else {
                (
                    (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
                    (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
                )
            };
            out[j] = sc;
            out[8 + j] = m;
        }
        out
    }

    /// Weight `i` (0..256) as f32, for tests.
    #[cfg(test)]
    pub fn weight(&self, i: usize) -> f32 {
        let sm = self.scales_mins();
        let (j, l) = (i / 32, i % 32);
        let byte = self.qs[32 * (j / 2) + l];
        let q = if j % 2 == 0 { byte & 0x0F } else { byte >> 4 };
        let d = half::f16::from_le_bytes(self.d).to_f32();
        let dmin = half::f16::from_le_bytes(self.dmin).to_f32();
        d * sm[j] as f32 * q as f32 - dmin * sm[8 + j] as f32
    }
}

/// One super-block (256 inputs) of 16 weight rows, interleaved for the kernel.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Q4kGroup {
    /// `[pair p][group g]`: for each of the 16 rows, bytes `4g..4g + 4` of its `qs` chunk `p`
    /// (low nibbles sub-block `2p`, high nibbles `2p + 1`).
    qs: [[u8; 64]; 32],
    /// `[sub-block][row]`.
    scales: [[u8; 16]; 8],
    /// `[pair p][row][2]`: the mins of sub-blocks `2p` and `2p + 1`.
    mins: [[u8; 32]; 4],
    /// f16 bits, one per row.
    d: [u16; 16],
    dmin: [u16; 16],
}

const _: () = assert!(std::mem::size_of::<Q4kGroup>() == 2368);

impl Group for Q4kGroup {
    const INPUTS: usize = QK_K;
    const MAX_ROWS: usize = 8;
    const ZERO: Self = Self {
        qs: [[0; 64]; 32],
        scales: [[0; 16]; 8],
        mins: [[0; 32]; 4],
        d: [0; 16],
        dmin: [0; 16],
    };
    type Acts = Rows8<QK_K>;

    /// AVX-512 VNNI, or AVX2 (`avx2.rs`).
    fn available() -> bool {
        super::packed::vnni() || super::packed::avx2()
    }

    fn holds(x: &Row8<'_>, k: usize) -> bool {
        x.q.len() >= k && x.d.len() * QK_K >= k && x.sums.len() * 32 >= k
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

/// A q4k weight packed for [`Q4kGroup`]'s kernel.
pub type PackedQ4K = PackedWeight<Q4kGroup>;

/// Packs candle's q4k bytes (`QTensor::data`) of an `[n, k]` weight.
pub fn pack(bytes: &[u8], n: usize, k: usize) -> Result<PackedQ4K> {
    let blocks = super::packed::weight_blocks::<BlockQ4K>(bytes, n, k, QK_K)?;
    let kb = k / QK_K;
    Ok(PackedWeight::new(
        n,
        k,
        |group: &mut Q4kGroup, row, bi, lane| {
            let b = &blocks[row * kb + bi];
            let sm = b.scales_mins();
            for (scales, &sc) in group.scales.iter_mut().zip(&sm[..8]) {
                scales[lane] = sc;
            }
            for p in 0..4 {
                group.mins[p][2 * lane] = sm[8 + 2 * p];
                group.mins[p][2 * lane + 1] = sm[8 + 2 * p + 1];
                for gr in 0..8 {
                    let src = &b.qs[32 * p + 4 * gr..32 * p + 4 * gr + 4];
                    group.qs[8 * p + gr][4 * lane..4 * lane + 4].copy_from_slice(src);
                }
            }
            group.d[lane] = u16::from_le_bytes(b.d);
            group.dmin[lane] = u16::from_le_bytes(b.dmin);
        },
    ))
}

/// `R` activation rows against the same run of `C` weights of one shape (an expert's gate and
/// up: `C` = 2), each broadcast activation feeding all `C`: with two, 8% less arithmetic at 2
/// to 4 rows than two passes (hot). Registers hold `R` rows' sums of all `C` weights: the p
/// loop keeps only `lo`, `hi` and `isum`, the mins are taken after it (exact integers either
/// way) and the f32 accumulators live in `outs`, so `R * C` is at most 8. Rows 5 to 8 of one
/// weight in one pass rather than two: the second pass over a run cost as much as the first
/// (streaming expert products, 6 rows: 25-28 -> 28-33 GB/s). The instructions for one weight
/// are the same whatever `C`, so are its results.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // `bi` indexes all C runs
unsafe fn runs<const R: usize, const C: usize>(
    xs: &[Row8<'_>],
    groups: [&[Q4kGroup]; C],
    outs: [&mut [f32]; C],
    prefetch: bool,
) {
    let RowPtrs {
        q: xq,
        d: xd,
        sums: xsum,
    } = RowPtrs::<R>::new(xs);
    let nibble = _mm512_set1_epi8(0x0F);
    macro_rules! bcast {
        ($p:expr) => {
            _mm512_set1_epi32(std::ptr::read_unaligned($p as *const i32))
        };
    }
    let o = outs.map(|out| out.as_mut_ptr());
    for o in o {
        for r in 0..R {
            _mm512_storeu_ps(o.add(r * LANES), _mm512_setzero_ps());
        }
    }
    let len = groups[0].len();
    for bi in 0..len {
        let g: [&Q4kGroup; C] = std::array::from_fn(|c| &groups[c][bi]);
        let mut isum = [[_mm512_setzero_si512(); R]; C];
        for p in 0..4 {
            if prefetch {
                for g in g {
                    prefetch_next_run_part(g, len, p, 4);
                }
            }
            let mut lo = [[_mm512_setzero_si512(); R]; C];
            let mut hi = [[_mm512_setzero_si512(); R]; C];
            for gr in 0..8 {
                let mut wl = [_mm512_setzero_si512(); C];
                let mut wh = [_mm512_setzero_si512(); C];
                for c in 0..C {
                    let v = _mm512_load_si512(g[c].qs[8 * p + gr].as_ptr() as *const __m512i);
                    wl[c] = _mm512_and_si512(v, nibble);
                    wh[c] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
                }
                for r in 0..R {
                    let x = xq[r].add(bi * QK_K + 64 * p + 4 * gr) as *const u8;
                    let b = bcast!(x);
                    for c in 0..C {
                        lo[c][r] = _mm512_dpbusd_epi32(lo[c][r], wl[c], b);
                    }
                    let b = bcast!(x.add(32));
                    for c in 0..C {
                        hi[c][r] = _mm512_dpbusd_epi32(hi[c][r], wh[c], b);
                    }
                }
            }
            for c in 0..C {
                let scales = |j: usize| {
                    _mm512_cvtepu8_epi32(_mm_load_si128(g[c].scales[j].as_ptr() as *const __m128i))
                };
                let (sl, sh) = (scales(2 * p), scales(2 * p + 1));
                for r in 0..R {
                    let s = _mm512_add_epi32(
                        _mm512_mullo_epi32(lo[c][r], sl),
                        _mm512_mullo_epi32(hi[c][r], sh),
                    );
                    isum[c][r] = _mm512_add_epi32(isum[c][r], s);
                }
            }
        }
        // The mins of every weight, each row's pair of activation sums broadcast once for all.
        let mut msum = [[_mm512_setzero_si512(); R]; C];
        for p in 0..4 {
            let mins: [__m512i; C] = std::array::from_fn(|c| {
                _mm512_cvtepu8_epi16(_mm256_load_si256(g[c].mins[p].as_ptr() as *const __m256i))
            });
            for r in 0..R {
                let pair = bcast!(xsum[r].add(bi * 8 + 2 * p) as *const u8);
                for c in 0..C {
                    msum[c][r] = _mm512_dpwssd_epi32(msum[c][r], mins[c], pair);
                }
            }
        }
        for c in 0..C {
            let g = g[c];
            let d = _mm512_cvtph_ps(_mm256_load_si256(g.d.as_ptr() as *const __m256i));
            let dmin = _mm512_cvtph_ps(_mm256_load_si256(g.dmin.as_ptr() as *const __m256i));
            for r in 0..R {
                let f = _mm512_mul_ps(_mm512_cvtepi32_ps(isum[c][r]), d);
                let f = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum[c][r]), dmin, f);
                let at = o[c].add(r * LANES);
                let a = _mm512_loadu_ps(at);
                _mm512_storeu_ps(at, _mm512_fmadd_ps(f, _mm512_set1_ps(*xd[r].add(bi)), a));
            }
        }
    }
}

/// The same products in plain Rust on the same rounded activations, for tests.
#[cfg(test)]
pub fn scalar_products(xs: &[Row8<'_>], w: &[BlockQ4K], n: usize) -> Vec<f32> {
    let kb = w.len() / n.max(1);
    let mut out = vec![0f32; xs.len() * n];
    for (r, x) in xs.iter().enumerate() {
        for j in 0..n {
            let mut acc = 0f64;
            for bi in 0..kb {
                let b = &w[j * kb + bi];
                for i in 0..QK_K {
                    acc += b.weight(i) as f64 * x.q[bi * QK_K + i] as f64 * x.d[bi] as f64;
                }
            }
            out[r * n + j] = acc as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::packed::Activations;
    use super::*;
    use crate::model::test_data::data;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn quantize(n: usize, k: usize, seed: u32) -> Result<QTensor> {
        let w = Tensor::from_vec(data(n * k, seed), (n, k), &Device::Cpu)?;
        QTensor::quantize(&w, GgmlDType::Q4K)
    }

    #[test]
    fn block_reader_matches_candles_dequantization() -> Result<()> {
        let q = quantize(6, 512, 1)?;
        let want: Vec<f32> = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let bytes = q.data()?;
        let blocks = super::super::as_blocks::<BlockQ4K>(&bytes)?;
        let got: Vec<f32> = blocks
            .iter()
            .flat_map(|b| (0..QK_K).map(move |i| b.weight(i)))
            .collect();
        assert_eq!(got.len(), want.len());
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            assert!((g - e).abs() <= 1e-6 * (1.0 + e.abs()), "[{i}]: {g} vs {e}");
        }
        Ok(())
    }

    /// The kernel against plain Rust on the same rounded activations, for every row count
    /// the register blocking splits differently and a width that leaves a partial group.
    #[test]
    fn packed_products_match_the_scalar_ones() -> Result<()> {
        if !Q4kGroup::available() {
            return Ok(());
        }
        let (n, k) = (40, 512);
        let q = quantize(n, k, 2)?;
        let bytes = q.data()?;
        let packed = pack(&bytes, n, k)?;
        let blocks = super::super::as_blocks::<BlockQ4K>(&bytes)?;
        for m in [1, 2, 3, 4, 5, 7, 8, 9, 16, 19] {
            let x = data(m * k, m as u32);
            let acts = Rows8::<QK_K>::new(&x, k);
            let want = scalar_products(&acts.rows(), blocks, n);
            let got = packed.matmul(&x, m, 128);
            assert_eq!(got.len(), want.len());
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "m {m} [{i}]: {g} vs {e}"
                );
            }
        }
        Ok(())
    }

    /// Against f32 activations and the dequantized weights: off only by the activations'
    /// 8-bit rounding, at most half a step (max|x| / 254 per super-block) per term.
    #[test]
    fn products_track_the_dequantized_weights() -> Result<()> {
        if !Q4kGroup::available() {
            return Ok(());
        }
        let (m, n, k) = (3, 24, 768);
        let q = quantize(n, k, 3)?;
        let w: Vec<f32> = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let packed = pack(&q.data()?, n, k)?;
        let x = data(m * k, 4);
        let got = packed.matmul(&x, m, 128);
        for r in 0..m {
            for j in 0..n {
                let (xr, wr) = (&x[r * k..(r + 1) * k], &w[j * k..(j + 1) * k]);
                let want: f64 = xr.iter().zip(wr).map(|(a, b)| (a * b) as f64).sum();
                let bound: f64 = xr
                    .chunks(QK_K)
                    .zip(wr.chunks(QK_K))
                    .map(|(xb, wb)| {
                        let step = xb.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                        wb.iter().map(|v| v.abs() as f64).sum::<f64>() * step as f64 / 2.0
                    })
                    .sum();
                let diff = (got[r * n + j] as f64 - want).abs();
                assert!(diff <= bound + 1e-4, "[{r}, {j}]: {diff} > {bound}");
            }
        }
        Ok(())
    }

    /// A row's result alone is bit-identical to the same row inside a batch of many passes.
    #[test]
    fn a_row_is_bit_identical_alone_and_batched() -> Result<()> {
        if !Q4kGroup::available() {
            return Ok(());
        }
        let (m, n, k) = (23, 33, 256);
        let packed = pack(&quantize(n, k, 5)?.data()?, n, k)?;
        let x = data(m * k, 6);
        let batched = packed.matmul(&x, m, 8);
        for i in 0..m {
            let alone = packed.matmul(&x[i * k..(i + 1) * k], 1, 8);
            assert_eq!(alone[..], batched[i * n..(i + 1) * n], "row {i}");
        }
        Ok(())
    }

    /// Gate and up in one pass give, bit for bit, what two products give, for row counts
    /// that make one pass, several and a remainder.
    #[test]
    fn paired_products_equal_separate_ones() -> Result<()> {
        if !Q4kGroup::available() {
            return Ok(());
        }
        let (n, k) = (40, 512);
        let gate = pack(&quantize(n, k, 11)?.data()?, n, k)?;
        let up = pack(&quantize(n, k, 12)?.data()?, n, k)?;
        super::super::packed::assert_paired_equals_separate(&gate, &up);
        Ok(())
    }

    #[test]
    fn non_finite_activations_give_non_finite_output() -> Result<()> {
        if !Q4kGroup::available() {
            return Ok(());
        }
        let (n, k) = (16, 256);
        let packed = pack(&quantize(n, k, 7)?.data()?, n, k)?;
        let mut x = data(k, 8);
        x[100] = f32::INFINITY;
        let got = packed.matmul(&x, 1, 128);
        assert!(got.iter().all(|v| v.is_nan()), "{got:?}");
        Ok(())
    }

    #[test]
    fn a_weight_that_is_not_whole_super_blocks_is_an_error() -> Result<()> {
        let bytes = quantize(2, 256, 9)?.data()?.to_vec();
        assert!(pack(&bytes, 3, 256).is_err());
        assert!(pack(&bytes[..100], 2, 256).is_err());
        Ok(())
    }
}
