//! AVX-512 versions of the float kernels: 16 lanes per instruction and 32 registers, so a
//! register block can hold 4 activation rows x 4 weight rows. With several rows per weight
//! (batched decode) the AVX2 kernel runs out of registers and instructions before memory
//! bandwidth; this one halves the instructions per weight.
//!
//! Chosen at run time for every product when the CPU has AVX-512F, so a row's result is
//! still the same alone or batched on a given machine.

use super::{WeightElem, TILE_COLS};
use half::{bf16, f16};
use std::arch::x86_64::*;

pub fn available() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
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
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(ahead + p) as *const i8);
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
        for (c, a) in acc.iter().enumerate() {
            out[(i + r) * stride + j + c] = _mm512_reduce_add_ps(*a);
        }
    }
}
