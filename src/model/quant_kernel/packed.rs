//! Quantized weights repacked on load, 16 rows interleaved per block of inputs, as llama.cpp
//! repacks them for its CPU kernels: each lane of a VNNI accumulator is one output row, so one
//! multiply applies 16 rows' block scales and no horizontal sums are needed. Lanes are output
//! columns, so a row's result is the same instruction sequence whatever its batch. CPUs
//! with AVX2 but not VNNI read the same layout as two 8-lane halves (each format's
//! `avx2.rs`), so the packing is one whatever the CPU.

use super::super::small_matmul::{prefetch_lines_as, SharedOut, MIN_WEIGHTS_PER_TASK};
use super::{as_blocks, RawBlock};
use candle_core::{bail, Result};
use rayon::prelude::*;
use std::arch::x86_64::_MM_HINT_NTA;

/// Weight rows interleaved in one group.
pub const LANES: usize = 16;

/// Whether the CPU has what the VNNI kernels need: AVX-512 F and BW, and VNNI.
pub fn vnni() -> bool {
    crate::model::cpu::simd().vnni
}

/// The passes an AVX2 kernel makes over a run for `rows` activation rows, at most `max` (what
/// its 16 registers hold) each, as (first row, rows): one row more than `max` goes as two
/// passes of two or more (with 3: 2 + 2; with 4: 3 + 2) rather than leaving a row alone, a
/// lone row's pass being the dearest. Only the first pass prefetches.
pub fn avx2_passes(rows: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut done = 0;
    std::iter::from_fn(move || {
        let left = rows - done;
        let take = if left == max + 1 && max >= 3 {
            left - 2
        } else {
            left.min(max)
        };
        let pass = (done, take);
        done += take;
        (take > 0).then_some(pass)
    })
}

/// An AVX2 pass's float sums, two 8-lane halves a row (`out[r * 16 + lane]` at the end): in
/// registers, or, where the pass's integer sums take the registers (`in_out`), in `out`
/// itself, zeroed first and added to in place.
pub struct Avx2Sums<const R: usize> {
    regs: [[std::arch::x86_64::__m256; 2]; R],
    out: *mut f32,
    in_out: bool,
}

impl<const R: usize> Avx2Sums<R> {
    /// # Safety
    /// AVX2; `out` holds `R` rows of 16 and outlives the sums.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn new(out: &mut [f32], in_out: bool) -> Self {
        use std::arch::x86_64::*;
        debug_assert!(out.len() >= R * LANES);
        let out = out.as_mut_ptr();
        if in_out {
            for r in 0..R {
                _mm256_storeu_ps(out.add(r * LANES), _mm256_setzero_ps());
                _mm256_storeu_ps(out.add(r * LANES + LANES / 2), _mm256_setzero_ps());
            }
        }
        Self {
            regs: [[_mm256_setzero_ps(); 2]; R],
            out,
            in_out,
        }
    }

    /// Row `r`'s half `h` += `a * b`.
    ///
    /// # Safety
    /// AVX2 and FMA; `r < R`, `h < 2`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fmadd(
        &mut self,
        r: usize,
        h: usize,
        a: std::arch::x86_64::__m256,
        b: std::arch::x86_64::__m256,
    ) {
        use std::arch::x86_64::*;
        if self.in_out {
            let at = self.out.add(r * LANES + LANES / 2 * h);
            _mm256_storeu_ps(at, _mm256_fmadd_ps(a, b, _mm256_loadu_ps(at)));
        } else {
            self.regs[r][h] = _mm256_fmadd_ps(a, b, self.regs[r][h]);
        }
    }

    /// Writes the sums held in registers to `out`.
    ///
    /// # Safety
    /// AVX2.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn finish(self) {
        use std::arch::x86_64::*;
        if self.in_out {
            return;
        }
        for (r, halves) in self.regs.iter().enumerate() {
            for (h, v) in halves.iter().enumerate() {
                _mm256_storeu_ps(self.out.add(r * LANES + LANES / 2 * h), *v);
            }
        }
    }
}

/// Whether the CPU has what the AVX2 kernels (for CPUs without VNNI) need: AVX2, FMA, F16C.
pub fn avx2() -> bool {
    crate::model::cpu::simd().avx2
}

/// Prefetches the group one run on from `g` (a run is `run` groups: the same block of the
/// next 16 weight rows), at most [`PREFETCH_MAX_BYTES`] ahead. Several row passes of a kernel
/// go over one run while it sits in cache; fetching only a few blocks ahead left the memory
/// idle during all passes but the first, and fetching the next run during them overlaps the
/// two. Only the first pass over a run prefetches: later ones would ask again for lines
/// already on their way.
///
/// The hint is non-temporal: a decode step reads every packed weight once (hundreds of MB
/// through a 32 MB L3), and with T0 those reads pushed out of L3 what the step reads again,
/// the KV cache above all. Alternating every 8 steps in one process: q4k 2.9% faster a step
/// at 1 and at 16 sequences, q8_0 2.9% / 0.6%, the synthetic DBRX at 16 the same; later
/// passes over a run still find it in L1 (prefill unchanged).
#[inline(always)]
pub fn prefetch_next_run<G>(g: *const G, run: usize) {
    prefetch_next_run_part(g, run, 0, 1);
}

/// Part `part` of `parts` of [`prefetch_next_run`]'s lines, for a kernel that spreads them
/// through its loop over a large group: issued all at once, q4k's 37 lines stalled the loop
/// on the core's few outstanding-miss slots, and its arithmetic stopped overlapping the reads
/// (streaming expert products, one pass: 26-28 -> 30-34 GB/s).
#[inline(always)]
pub fn prefetch_next_run_part<G>(g: *const G, run: usize, part: usize, parts: usize) {
    let ahead = run.min(PREFETCH_MAX_BYTES / std::mem::size_of::<G>().max(1));
    let lines = std::mem::size_of::<G>().div_ceil(64);
    let per = lines.div_ceil(parts.max(1));
    let first = part * per;
    prefetch_lines_as::<_MM_HINT_NTA>(
        (g.wrapping_add(ahead) as *const u8).wrapping_add(first * 64),
        per.min(lines.saturating_sub(first)) * 64,
    );
}

/// The farthest [`prefetch_next_run`] reaches (well inside a core's L2).
const PREFETCH_MAX_BYTES: usize = 256 * 1024;

/// candle's bytes (`QTensor::data`) of an `[n, k]` weight as its blocks of `per` weights,
/// checked to be exactly that weight.
pub fn weight_blocks<B: RawBlock>(bytes: &[u8], n: usize, k: usize, per: usize) -> Result<&[B]> {
    let blocks = as_blocks::<B>(bytes)?;
    if !k.is_multiple_of(per) || blocks.len() != n * (k / per) {
        bail!(
            "{} blocks of {per} do not make a [{n}, {k}] weight",
            blocks.len()
        );
    }
    Ok(blocks)
}

/// A weight `[n, k]` as `ceil(n / 16)` runs of `k / G::INPUTS` groups (rows past `n` zero).
pub struct PackedWeight<G> {
    n: usize,
    k: usize,
    pub(super) groups: Vec<G>,
}

/// Activation rows rounded to integers the way a kernel takes them.
pub trait Activations: Sized {
    type Row<'a>: Sync
    where
        Self: 'a;
    /// `x`: `[m, k]` row-major.
    fn new(x: &[f32], k: usize) -> Self;
    fn rows(&self) -> Vec<Self::Row<'_>>;
}

/// The rows a group's kernel takes.
pub type RowOf<'a, G> = <<G as Group>::Acts as Activations>::Row<'a>;

/// One block of inputs of 16 weight rows in a kernel's layout.
pub trait Group: Copy + Send + Sync + 'static {
    /// Inputs per group.
    const INPUTS: usize;
    /// All-zero weights (the padding rows past `n`).
    const ZERO: Self;
    /// Activation rows per pass of the kernel (at most 8: its accumulators in registers).
    const MAX_ROWS: usize;
    type Acts: Activations;
    /// Whether this CPU runs the kernel.
    fn available() -> bool;
    /// Whether an activation row holds `k` inputs.
    fn holds(x: &RowOf<'_, Self>, k: usize) -> bool;
    /// `R` activation rows against one run of groups: `out[r * 16 + lane]`. With `prefetch`
    /// (the first pass over the run) it also fetches the next run.
    ///
    /// # Safety
    /// `available()`, `xs` holds `R` rows, each holding the run's inputs, `out` `R * 16`.
    unsafe fn rows<const R: usize>(
        xs: &[RowOf<'_, Self>],
        groups: &[Self],
        out: &mut [f32],
        prefetch: bool,
    );
    /// Activation rows per pass of [`Group::rows_pair`].
    const PAIR_MAX_ROWS: usize = Self::MAX_ROWS;
    /// `R` activation rows against the same run of two weights of one shape that take the
    /// same activations (an expert's gate and up): `out_a` and `out_b` as [`Group::rows`]
    /// fills them, bit for bit. By default, two passes of it.
    ///
    /// # Safety
    /// As [`Group::rows`], for both runs and outputs, with `R` at most `PAIR_MAX_ROWS`.
    unsafe fn rows_pair<const R: usize>(
        xs: &[RowOf<'_, Self>],
        a: &[Self],
        b: &[Self],
        out_a: &mut [f32],
        out_b: &mut [f32],
        prefetch: bool,
    ) {
        Self::rows::<R>(xs, a, out_a, prefetch);
        Self::rows::<R>(xs, b, out_b, prefetch);
    }
}

impl<G: Group> PackedWeight<G> {
    /// Packs `n` rows of `k` inputs (a multiple of `G::INPUTS`): `fill(group, row, block,
    /// lane)` writes weight row `row`'s block `block` into lane `lane` of `group`.
    pub fn new(n: usize, k: usize, mut fill: impl FnMut(&mut G, usize, usize, usize)) -> Self {
        debug_assert!(k.is_multiple_of(G::INPUTS));
        let kb = k / G::INPUTS;
        let mut groups = vec![G::ZERO; n.div_ceil(LANES) * kb];
        for (gi, group) in groups.iter_mut().enumerate() {
            let (g, bi) = (gi / kb, gi % kb);
            for lane in 0..LANES.min(n - g * LANES) {
                fill(group, g * LANES + lane, bi, lane);
            }
        }
        Self { n, k, groups }
    }

    /// The weights one under another (`[n1 + n2 + .., k]`), as one: each part's runs copied
    /// in order. `None` unless all take the same inputs and all but the last fill whole runs
    /// of 16 rows (so no padding row lands inside).
    pub fn concat(parts: &[&Self]) -> Option<Self> {
        let (first, rest) = parts.split_first()?;
        let whole = parts[..parts.len() - 1]
            .iter()
            .all(|p| p.n.is_multiple_of(LANES));
        if !whole || rest.iter().any(|p| p.k != first.k) {
            return None;
        }
        let mut groups = Vec::with_capacity(parts.iter().map(|p| p.groups.len()).sum());
        for p in parts {
            groups.extend_from_slice(&p.groups);
        }
        Some(Self {
            n: parts.iter().map(|p| p.n).sum(),
            k: first.k,
            groups,
        })
    }

    /// Output width (weight rows).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// `x [m, k] @ W^T`: `[m, n]` row-major, in passes of `chunk_rows` activation rows (whose
    /// rounded values stay in L2 while each group is multiplied by all of them).
    pub fn matmul(&self, x: &[f32], m: usize, chunk_rows: usize) -> Vec<f32> {
        self.products(None, x, m, chunk_rows, |tile, _, out| {
            out.copy_from_slice(tile)
        })
    }

    /// `gate(x Wg^T, x Wu^T)` with `self` the gate and `up` the up projection (both `[n, k]`),
    /// the SwiGLU of an expert: the activations rounded once for both, and each run's gate
    /// and up tiles combined as they come out (`combine(gate, up, out)` on one row's piece of
    /// up to 16 columns), so neither product is written whole.
    pub fn gated_matmul(
        &self,
        up: &Self,
        x: &[f32],
        m: usize,
        chunk_rows: usize,
        combine: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
    ) -> Vec<f32> {
        assert!(
            up.n == self.n && up.k == self.k,
            "gate and up differ in shape"
        );
        self.products(Some(up), x, m, chunk_rows, combine)
    }

    /// Run `g`'s groups.
    fn run(&self, g: usize) -> &[G] {
        let kb = self.k / G::INPUTS;
        &self.groups[g * kb..(g + 1) * kb]
    }

    /// `[m, n]` row-major from `x [m, k]`: in passes of `chunk_rows` activation rows, rounded
    /// once per pass; per run of 16 weight rows, this weight's tile (and `other`'s, the same
    /// shape, on the same rounded rows; empty without one) handed row by row to
    /// `emit(tile, other_tile, out)`, `out` being that row's piece of up to 16 columns.
    fn products(
        &self,
        other: Option<&Self>,
        x: &[f32],
        m: usize,
        chunk_rows: usize,
        emit: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
    ) -> Vec<f32> {
        assert!(G::available() && x.len() >= m * self.k);
        let (chunk, k, n) = (chunk_rows.max(1), self.k.max(1), self.n);
        let mut out = vec![0f32; m * n];
        for (pass, rows) in x[..m * self.k].chunks(chunk * k).enumerate() {
            let acts = G::Acts::new(rows, self.k);
            let xs = acts.rows();
            let rows_here = xs.len();
            let shared = SharedOut(out[pass * chunk * n..].as_mut_ptr());
            self.in_tasks(rows_here, 1 + other.is_some() as usize, |runs| {
                let shared = &shared;
                let mut tile = vec![0f32; rows_here * LANES];
                let mut other_tile = vec![
                    0f32;
                    if other.is_some() {
                        rows_here * LANES
                    } else {
                        0
                    }
                ];
                for g in runs {
                    // SAFETY: `available()` checked above; the rows were made `k` wide.
                    unsafe {
                        match other {
                            Some(o) => {
                                kernel_pair(&xs, self.run(g), o.run(g), &mut tile, &mut other_tile)
                            }
                            None => kernel(&xs, self.run(g), &mut tile),
                        }
                    }
                    let (j, c) = (g * LANES, LANES.min(n - g * LANES));
                    for i in 0..rows_here {
                        // SAFETY: row i, columns j..j + c: inside `out`, and this task's alone.
                        let dst =
                            unsafe { std::slice::from_raw_parts_mut(shared.0.add(i * n + j), c) };
                        let at = i * LANES..i * LANES + c;
                        let o = other_tile.get(at.clone()).unwrap_or(&[]);
                        emit(&tile[at], o, dst);
                    }
                }
            });
        }
        out
    }

    /// Runs `task` on ranges of this weight's runs, shared out to the pool in chunks of at
    /// least [`MIN_WEIGHTS_PER_TASK`] weights (`weights` per run of this one: 2 where each
    /// run is taken with another weight's).
    fn in_tasks(&self, m: usize, weights: usize, task: impl Fn(std::ops::Range<usize>) + Sync) {
        let runs = self.n.div_ceil(LANES);
        if m == 0 || runs == 0 {
            return;
        }
        let threads = rayon::current_num_threads().max(1);
        let min_runs = (MIN_WEIGHTS_PER_TASK / (weights * LANES * self.k).max(1)).max(1);
        let per_task = runs.div_ceil(threads * 4).max(min_runs);
        let tasks = runs.div_ceil(per_task);
        let range = |t: usize| t * per_task..((t + 1) * per_task).min(runs);
        if tasks == 1 {
            task(range(0));
        } else {
            (0..tasks).into_par_iter().for_each(|t| task(range(t)));
        }
    }
}

/// Every activation row against one run of groups (`k` inputs): `out[i * 16 + lane]`,
/// rows `G::MAX_ROWS` at a time, then the rest.
///
/// # Safety
/// `G::available()`.
unsafe fn kernel<G: Group>(xs: &[RowOf<'_, G>], groups: &[G], out: &mut [f32]) {
    let k = groups.len() * G::INPUTS;
    assert!(out.len() >= xs.len() * LANES && xs.iter().all(|x| G::holds(x, k)));
    let max = G::MAX_ROWS;
    let mut i = 0;
    while i + max <= xs.len() {
        rows::<G>(max, &xs[i..i + max], groups, &mut out[i * LANES..], i == 0);
        i += max;
    }
    rows::<G>(
        xs.len() - i,
        &xs[i..],
        groups,
        &mut out[i * LANES..],
        i == 0,
    );
}

/// [`kernel`] for two weights of one shape on the same rows (an expert's gate and up): one
/// [`Group::rows_pair`] pass for 2 to `G::PAIR_MAX_ROWS` rows, [`kernel`] for each weight
/// otherwise. In-process A/B, q4k, 16 sequences: -1.3% and -1.6% a step against two products
/// (16 pairs; q4_0 -0.9%). One row streams each run whole: the two weights interleaved group
/// by group made one-sequence steps 0.8% slower. Past the limit, passes of 4 for both against
/// one of 8 for each made the step 3.5% slower (11 pairs): the same arithmetic, twice the
/// passes over each run.
///
/// # Safety
/// `G::available()`.
unsafe fn kernel_pair<G: Group>(
    xs: &[RowOf<'_, G>],
    a: &[G],
    b: &[G],
    out_a: &mut [f32],
    out_b: &mut [f32],
) {
    let k = a.len() * G::INPUTS;
    assert!(b.len() == a.len() && out_a.len().min(out_b.len()) >= xs.len() * LANES);
    assert!(xs.iter().all(|x| G::holds(x, k)));
    if xs.len() < 2 || xs.len() > G::PAIR_MAX_ROWS.min(8) {
        kernel(xs, a, out_a);
        kernel(xs, b, out_b);
        return;
    }
    match xs.len() {
        2 => G::rows_pair::<2>(xs, a, b, out_a, out_b, true),
        3 => G::rows_pair::<3>(xs, a, b, out_a, out_b, true),
        4 => G::rows_pair::<4>(xs, a, b, out_a, out_b, true),
        5 => G::rows_pair::<5>(xs, a, b, out_a, out_b, true),
        6 => G::rows_pair::<6>(xs, a, b, out_a, out_b, true),
        7 => G::rows_pair::<7>(xs, a, b, out_a, out_b, true),
        _ => G::rows_pair::<8>(xs, a, b, out_a, out_b, true),
    }
}

/// `G::rows::<R>` for a run-time `r` (0..=8).
///
/// # Safety
/// As [`Group::rows`].
unsafe fn rows<G: Group>(
    r: usize,
    xs: &[RowOf<'_, G>],
    groups: &[G],
    out: &mut [f32],
    prefetch: bool,
) {
    match r {
        0 => {}
        1 => G::rows::<1>(xs, groups, out, prefetch),
        2 => G::rows::<2>(xs, groups, out, prefetch),
        3 => G::rows::<3>(xs, groups, out, prefetch),
        4 => G::rows::<4>(xs, groups, out, prefetch),
        5 => G::rows::<5>(xs, groups, out, prefetch),
        6 => G::rows::<6>(xs, groups, out, prefetch),
        7 => G::rows::<7>(xs, groups, out, prefetch),
        _ => G::rows::<8>(xs, groups, out, prefetch),
    }
}

/// Test helper: `gated_matmul` of `gate` and `up` equals, bit for bit, their two products
/// combined the same way, for row counts below, at and past the shared pass's limit.
#[cfg(test)]
pub fn assert_paired_equals_separate<G: Group>(gate: &PackedWeight<G>, up: &PackedWeight<G>) {
    let k = gate.cols();
    for m in [1, 2, 3, 4, 5, 7, 8, 9, 13] {
        let x = crate::model::test_data::data(m * k, 30 + m as u32);
        let (g, u) = (gate.matmul(&x, m, 128), up.matmul(&x, m, 128));
        let want: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g - 3.0 * u).collect();
        let got = gate.gated_matmul(up, &x, m, 128, |g, u, out| {
            for ((o, g), u) in out.iter_mut().zip(g).zip(u) {
                *o = g - 3.0 * u;
            }
        });
        assert_eq!(got, want, "m {m}");
    }
}

/// One kernel's `rows::<1>` to `rows::<8>`, for [`assert_rows_kernels`].
#[cfg(test)]
pub type RowsKernels<X, G> = [unsafe fn(&[X], &[G], &mut [f32], bool); 8];

/// A kernel's `rows::<1>` to `rows::<8>` as [`RowsKernels`] (the type given where it is used).
#[cfg(test)]
macro_rules! rows_kernels {
    ($rows:ident) => {
        [
            $rows::<1> as _,
            $rows::<2> as _,
            $rows::<3> as _,
            $rows::<4> as _,
            $rows::<5> as _,
            $rows::<6> as _,
            $rows::<7> as _,
            $rows::<8> as _,
        ]
    };
}
#[cfg(test)]
pub(crate) use rows_kernels;

/// Test helper: a kernel called directly, so a CPU whose products take another kernel (the
/// VNNI one) tests it too, for 1 to 8 rows (every way its passes split): each row against
/// `want` (`xs[r]` against the run `groups`, `[8, 16]`), and row 0 alone the same as batched,
/// bit for bit.
///
/// # Safety
/// The CPU runs `kernels`; `xs` holds 8 rows, each holding the run's inputs.
#[cfg(test)]
pub unsafe fn assert_rows_kernels<X, G>(
    kernels: RowsKernels<X, G>,
    xs: &[X],
    groups: &[G],
    want: &[f32],
) {
    let run = |m: usize| {
        let mut out = vec![0f32; m * LANES];
        // SAFETY: as this function's contract.
        unsafe { kernels[m - 1](&xs[..m], groups, &mut out, true) };
        out
    };
    let one = run(1);
    for m in 1..=8 {
        let got = run(m);
        for (i, (g, e)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                "m {m} [{i}]: {g} vs {e}"
            );
        }
        assert_eq!(got[..LANES], one[..], "m {m}: row 0 alone and batched");
    }
}

#[cfg(test)]
mod tests {
    use super::avx2_passes;

    #[test]
    fn avx2_passes_cover_the_rows_and_never_leave_a_lone_row_after_a_full_pass() {
        let split = |r, max| avx2_passes(r, max).collect::<Vec<_>>();
        assert_eq!(split(0, 3), vec![]);
        assert_eq!(split(1, 3), vec![(0, 1)]);
        assert_eq!(split(4, 3), vec![(0, 2), (2, 2)]);
        assert_eq!(split(7, 3), vec![(0, 3), (3, 2), (5, 2)]);
        assert_eq!(split(8, 3), vec![(0, 3), (3, 3), (6, 2)]);
        assert_eq!(split(5, 2), vec![(0, 2), (2, 2), (4, 1)]);
        assert_eq!(split(4, 4), vec![(0, 4)]);
        assert_eq!(split(5, 4), vec![(0, 3), (3, 2)]);
        assert_eq!(split(7, 4), vec![(0, 4), (4, 3)]);
        assert_eq!(split(9, 4), vec![(0, 4), (4, 3), (7, 2)]);
    }
}
