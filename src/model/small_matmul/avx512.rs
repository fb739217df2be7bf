//! AVX-512 versions of the float kernels: 16 lanes per instruction and 32 registers, so a
//! register block can hold 4 activation rows x 4 weight rows. With several rows per weight
//! (batched decode) the AVX2 kernel runs out of registers and instructions before memory
//! bandwidth; this one halves the instructions per weight.
//!
//! Chosen at run time for every product when the CPU has AVX-512F, so a row's result is
//! still the same alone or batched on a given machine.

use super::{prefetch_lines, prefetch_lines_as, WeightElem, TILE_COLS};
use half::{bf16, f16};
use std::arch::x86_64::*;

pub fn available() -> bool {
    crate::model::cpu::simd().avx512
}

/// Loads 16 weights from index `p` as f32 lanes.
pub trait Lanes16: WeightElem {
    /// # Safety
    /// `row` must hold weights `p..p + 16`, on a CPU with AVX-512F.
    unsafe fn load16(row: *const Self, p: usize) -> __m512;
}

impl Lanes16 for f32 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(row: *const Self, p: usize) -> __m512 {
        _mm512_loadu_ps(row.add(p))
    }
}

impl Lanes16 for bf16 {
    // bf16 is the top half of an f32: widen to 32 bits and shift into place.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(row: *const Self, p: usize) -> __m512 {
        let h = _mm256_loadu_si256(row.add(p) as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

impl Lanes16 for f16 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(row: *const Self, p: usize) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(row.add(p) as *const __m256i))
    }
}

pub fn tile<W: Lanes16>(xs: &[&[f32]], ws: &[&[W]], out: &mut [f32]) {
    let (m, c) = (xs.len(), ws.len());
    assert!(c <= TILE_COLS && out.len() >= m * c);
    let k = ws.first().map_or(0, |w| w.len());
    assert!(xs.iter().all(|x| x.len() >= k) && ws.iter().all(|w| w.len() >= k));
    let k16 = k / 16 * 16;
    // SAFETY: chosen only once `available()` has confirmed the CPU features; every row
    // holds at least `k16` weights (checked above) and the loads read no further.
    unsafe {
        groups::<W, 4, 4>(xs, ws, k16, out);
    }
    if k16 == k {
        return;
    }
    for (i, x) in xs.iter().enumerate() {
        for (ci, w) in ws.iter().enumerate() {
            let tail: f32 = (k16..k).map(|q| x[q] * W::get(w, q)).sum();
            out[i * c + ci] += tail;
        }
    }
}

/// Groups of `G` activation rows against `C` weight rows at a time (read from DRAM once,
/// re-read from L1 by the following groups), then the 1..G - 1 rows left.
#[target_feature(enable = "avx512f")]
unsafe fn groups<W: Lanes16, const G: usize, const C: usize>(
    xs: &[&[f32]],
    ws: &[&[W]],
    k16: usize,
    out: &mut [f32],
) {
    let (m, c) = (xs.len(), ws.len());
    let full = m / G * G;
    let mut j = 0;
    while j + C <= c {
        for i in (0..full).step_by(G) {
            block::<W, G, C>(&xs[i..i + G], &ws[j..j + C], k16, out, i, j, c);
        }
        j += C;
    }
    while j < c {
        for i in (0..full).step_by(G) {
            block::<W, G, 1>(&xs[i..i + G], &ws[j..j + 1], k16, out, i, j, c);
        }
        j += 1;
    }
    let mut i = full;
    while i < m {
        let rest = &xs[i..];
        match rest.len() {
            1 => columns::<W, 1, 8>(rest, ws, k16, out, i),
            2 => columns::<W, 2, 4>(rest, ws, k16, out, i),
            3 => columns::<W, 3, 4>(rest, ws, k16, out, i),
            _ => columns::<W, 4, 4>(&rest[..4], ws, k16, out, i),
        }
        i += rest.len().min(4);
    }
}

/// All the tile's weight rows against `R` activation rows: blocks of `C`, then singles.
#[target_feature(enable = "avx512f")]
unsafe fn columns<W: Lanes16, const R: usize, const C: usize>(
    xs: &[&[f32]],
    ws: &[&[W]],
    k16: usize,
    out: &mut [f32],
    i: usize,
) {
    let c = ws.len();
    let mut j = 0;
    while j + C <= c {
        block::<W, R, C>(xs, &ws[j..j + C], k16, out, i, j, c);
        j += C;
    }
    while j < c {
        block::<W, R, 1>(xs, &ws[j..j + 1], k16, out, i, j, c);
        j += 1;
    }
}

/// `R x C` products with their accumulators in registers.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn block<W: Lanes16, const R: usize, const C: usize>(
    xs: &[&[f32]],
    ws: &[&[W]],
    k16: usize,
    out: &mut [f32],
    i: usize,
    j: usize,
    stride: usize,
) {
    let mut xp = [std::ptr::null::<f32>(); R];
    for (p, x) in xp.iter_mut().zip(xs) {
        *p = x.as_ptr();
    }
    let mut wp = [std::ptr::null::<W>(); C];
    for (p, w) in wp.iter_mut().zip(ws) {
        *p = w.as_ptr();
    }
    // Prefetch the rows the next tile reads (C rows on, same offset), far enough ahead
    // for DRAM latency however long the pass over this one takes.
    let ahead = C * ws.first().map_or(0, |w| w.len());
    // Weights per prefetch: a cache line's worth, a whole number of 16-lane steps.
    let line = (64 / std::mem::size_of::<W>()).max(16) / 16 * 16;
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let mut p = 0;
    while p < k16 {
        if p % line == 0 {
            for w in wp {
                let at = w.wrapping_add(ahead + p) as *const u8;
                if std::mem::size_of::<W>() == 2 {
                    // Non-temporal, as the packed kernels fetch (see `prefetch_next_run`):
                    // bf16 weights stream once a step. Alternating every 8 steps in one
                    // process: 4.1% faster a step at 1 sequence, 2.3% at 16; f32 weights
                    // were the same or 0.5-1.6% slower with it, so they keep T0.
                    prefetch_lines_as::<_MM_HINT_NTA>(at, 64);
                } else {
                    prefetch_lines(at, 64);
                }
            }
        }
        let mut wv = [_mm512_setzero_ps(); C];
        for (v, w) in wv.iter_mut().zip(wp) {
            *v = W::load16(w, p);
        }
        for (r, x) in xp.iter().enumerate() {
            let xv = _mm512_loadu_ps(x.add(p));
            for (a, w) in acc[r].iter_mut().zip(&wv) {
                *a = _mm512_fmadd_ps(xv, *w, *a);
            }
        }
        p += 16;
    }
    for (r, acc) in acc.iter().enumerate() {
        let at = (i + r) * stride + j;
        store_sums(acc, &mut out[at..at + C]);
    }
}

/// The lane sums of each accumulator into `out`, four at a time where there are four. Every
/// sum follows the same tree (lane i + lane i+8, then + i+4, + i+2, + i+1), whichever way it
/// is computed, so a row's result does not depend on the block shape that produced it. For
/// short rows (a 64-wide LM head) the reductions cost as much as the products: four in one
/// go take about a third of the instructions of four separate ones.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn store_sums(accs: &[__m512], out: &mut [f32]) {
    let mut quads = accs.chunks_exact(4);
    let mut o = out.chunks_exact_mut(4);
    for (q, o) in (&mut quads).zip(&mut o) {
        _mm_storeu_ps(o.as_mut_ptr(), sum4(q[0], q[1], q[2], q[3]));
    }
    let start = accs.len() / 4 * 4;
    for (a, o) in quads.remainder().iter().zip(&mut out[start..]) {
        *o = sum1(*a);
    }
}

/// The sum of one accumulator's 16 lanes.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn sum1(a: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(a);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
    let s8 = _mm256_add_ps(lo, hi);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2));
    _mm_cvtss_f32(s1)
}

/// The sums of four accumulators' lanes, by the same tree as [`sum1`], as one vector.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sum4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
    // Lane i + lane i+8: quarters [a 0..4, a 4..8, b 0..4, b 4..8] (and c, d).
    let ab = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
        _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
    );
    let cd = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b01_00_01_00>(c, d),
        _mm512_shuffle_f32x4::<0b11_10_11_10>(c, d),
    );
    // + lane i+4: one quarter per accumulator.
    let s4 = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(ab, cd),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(ab, cd),
    );
    // + lane i+2, then + lane i+1, within each quarter.
    let s2 = _mm512_add_ps(s4, _mm512_shuffle_ps::<0b01_00_11_10>(s4, s4));
    let s1 = _mm512_add_ps(s2, _mm512_shuffle_ps::<0b10_11_00_01>(s2, s2));
    let firsts = _mm512_permutexvar_ps(
        _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        s1,
    );
    _mm512_castps512_ps128(firsts)
}
