//! A step's rotary embeddings and KV-cache writes in one pass over its rows, on the CPU.
//!
//! The tensor path copies Q and K out of the projection's views, rotates them, converts and
//! scatters K and V into the cache through an index tensor, and flattens Q once more for the
//! decode attention: about ten small tensor operations a layer, 15 us at 16 decode tokens for
//! a few microseconds of arithmetic. Here each token's row is read where the projection left
//! it, its queries rotated into one f32 buffer, its keys rotated and its values copied straight
//! into their slots in the cache's element type. The expressions and roundings are the tensor
//! path's (tested bit for bit), so results do not depend on which path ran.

use super::layers::f32_slice;
use candle_core::{bail, CpuStorage, DType, InplaceOp1, Layout, Result, Storage, Tensor};
use half::slice::HalfFloatSliceExt;

/// Where the rows of a 2-D f32 CPU tensor lie in its storage, rows contiguous (a narrow of a
/// wider product is fine): row `t` is `cols` elements from `first + t * stride`.
struct Rows {
    first: usize,
    stride: usize,
    cols: usize,
}

fn rows_of(t: &Tensor) -> Option<Rows> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return None;
    }
    let (n, cols) = t.dims2().ok()?;
    let l = t.layout();
    let st = l.stride();
    (cols <= 1 || st[1] == 1).then_some(Rows {
        first: l.start_offset(),
        stride: if n <= 1 { cols } else { st[0] },
        cols,
    })
}

/// With `f` on the f32 elements behind `t` (see [`rows_of`]).
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (s, _) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(CpuStorage::F32(v)) => Some(f(v)),
        _ => None,
    }
}

/// One head `x` (`2 * c.len()` values) rotated into `o`: its first half against its second,
/// the expressions of candle's `rope_thd` (so the same bits). Zipped iterators, so the loop
/// has no bounds checks and vectorises (indexed, it stayed scalar).
#[inline(always)]
fn rotate(x: &[f32], c: &[f32], s: &[f32], o: &mut [f32]) {
    let half = c.len();
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = o.split_at_mut(half);
    let pairs = x1.iter().zip(x2).zip(c.iter().zip(s));
    for ((o1, o2), ((&a, &b), (&c, &s))) in o1.iter_mut().zip(o2.iter_mut()).zip(pairs) {
        *o1 = a * c - b * s;
        *o2 = a * s + b * c;
    }
}

/// The step's queries rotated (`[n, q_dim]`, f32), with its rotated keys and its values
/// written into `slots` of the caches (`[slots, kv_dim]`, f32 / bf16 / f16). `None` (nothing
/// written) where the inputs are not f32 rows on the CPU or the caches another type: the
/// tensor path runs instead.
#[allow(clippy::too_many_arguments)]
pub fn rope_and_store(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    slots: &[u32],
    k_cache: &Tensor,
    v_cache: &Tensor,
    head_dim: usize,
) -> Result<Option<Vec<f32>>> {
    let (Some(qr), Some(kr), Some(vr)) = (rows_of(q), rows_of(k), rows_of(v)) else {
        return Ok(None);
    };
    let cached = |c: &Tensor| {
        c.device().is_cpu() && matches!(c.dtype(), DType::F32 | DType::BF16 | DType::F16)
    };
    if !(cached(k_cache) && cached(v_cache)) {
        return Ok(None);
    }
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let n = slots.len();
    let half = head_dim / 2;
    if !head_dim.is_multiple_of(2)
        || q.dim(0)? != n
        || k.dim(0)? != n
        || v.dim(0)? != n
        || cos.dims2()? != (n, half)
        || sin.dims2()? != (n, half)
        || !qr.cols.is_multiple_of(head_dim)
        || !kr.cols.is_multiple_of(head_dim)
        || kr.cols != vr.cols
        || k_cache.dim(1)? != kr.cols
        || v_cache.dim(1)? != kr.cols
    {
        return Ok(None);
    }
    let (cos_s, cos_l) = cos.storage_and_layout();
    let (sin_s, sin_l) = sin.storage_and_layout();
    let (Some(cos), Some(sin)) = (f32_slice(&cos_s, cos_l), f32_slice(&sin_s, sin_l)) else {
        return Ok(None);
    };
    let mut qs = vec![0f32; n * qr.cols];
    let mut ks = vec![0f32; n * kr.cols];
    let rotate_rows = |src: &[f32], r: &Rows, out: &mut [f32]| {
        for (t, o) in out.chunks_exact_mut(r.cols).enumerate() {
            let x = &src[r.first + t * r.stride..][..r.cols];
            let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
            for (x, o) in x.chunks_exact(head_dim).zip(o.chunks_exact_mut(head_dim)) {
                rotate(x, c, s, o);
            }
        }
    };
    if with_f32(q, |src| rotate_rows(src, &qr, &mut qs)).is_none()
        || with_f32(k, |src| rotate_rows(src, &kr, &mut ks)).is_none()
    {
        return Ok(None);
    }
    k_cache.inplace_op1(&WriteRows {
        src: RowSource::Packed(&ks),
        cols: kr.cols,
        slots,
    })?;
    let written = with_f32(v, |src| {
        v_cache.inplace_op1(&WriteRows {
            src: RowSource::Strided(src, &vr),
            cols: vr.cols,
            slots,
        })
    });
    match written {
        Some(r) => r?,
        None => bail!("values are not f32 on the CPU"),
    }
    Ok(Some(qs))
}

/// Where [`WriteRows`] takes row `t` from.
enum RowSource<'a> {
    Packed(&'a [f32]),
    Strided(&'a [f32], &'a Rows),
}

impl RowSource<'_> {
    fn row(&self, t: usize, cols: usize) -> &[f32] {
        match self {
            Self::Packed(v) => &v[t * cols..][..cols],
            Self::Strided(v, r) => &v[r.first + t * r.stride..][..cols],
        }
    }
}

/// Row `t` of the source into cache row `slots[t]`, converted as `to_dtype` converts.
struct WriteRows<'a> {
    src: RowSource<'a>,
    cols: usize,
    slots: &'a [u32],
}

impl WriteRows<'_> {
    /// `conv(src_row, dst_row)` for each row and its slot.
    fn write<T>(&self, dst: &mut [T], conv: impl Fn(&[f32], &mut [T])) -> Result<()> {
        let rows = dst.len() / self.cols.max(1);
        for (t, &slot) in self.slots.iter().enumerate() {
            let slot = slot as usize;
            if slot >= rows {
                bail!("KV slot {slot} is outside the cache of {rows}");
            }
            conv(
                self.src.row(t, self.cols),
                &mut dst[slot * self.cols..][..self.cols],
            );
        }
        Ok(())
    }
}

impl InplaceOp1 for WriteRows<'_> {
    fn name(&self) -> &'static str {
        "kv-cache-write-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let Some((a, b)) = layout.contiguous_offsets() else {
            bail!("the KV cache is not contiguous");
        };
        // A row at a time through `half`'s slice conversion: F16C, several values an
        // instruction (the value-by-value `from_f32` took ~1% of a 16-sequence q4k step, on
        // the engine thread while the pool waited). Same rounding, same bits.
        match storage {
            CpuStorage::F32(d) => self.write(&mut d[a..b], |s, d| d.copy_from_slice(s)),
            CpuStorage::BF16(d) => self.write(&mut d[a..b], |s, d| d.convert_from_f32_slice(s)),
            CpuStorage::F16(d) => self.write(&mut d[a..b], |s, d| d.convert_from_f32_slice(s)),
            _ => bail!("KV cache of an unsupported type"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::RotaryEmbedding;
    use crate::model::test_data::data;
    use candle_core::{DType, Device};

    /// The tensor path (candle's narrow / rope / to_dtype / scatter_set, as the attention ran
    /// it before) and this one give the same bits: queries, keys and values, in every cache
    /// type, from narrowed views of one fused product as from separate ones.
    #[test]
    fn matches_the_tensor_path_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let (hd, heads, kv_heads, n) = (16, 4, 2, 5);
        let (q_dim, kv_dim) = (heads * hd, kv_heads * hd);
        let rope = RotaryEmbedding::new(10_000.0, hd, 64, DType::F32, &dev);
        let positions: Vec<u32> = vec![3, 9, 10, 11, 40];
        let (cos, sin) = rope.tables(&positions)?;
        let slots: Vec<u32> = vec![7, 0, 31, 12, 5];
        let fused = Tensor::from_vec(
            data(n * (q_dim + 2 * kv_dim), 1),
            (n, q_dim + 2 * kv_dim),
            &dev,
        )?;
        let q = fused.narrow(1, 0, q_dim)?;
        let k = fused.narrow(1, q_dim, kv_dim)?;
        let v = fused.narrow(1, q_dim + kv_dim, kv_dim)?;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let caches = || -> Result<(Tensor, Tensor)> {
                let k =
                    Tensor::from_vec(data(32 * kv_dim, 2), (32, kv_dim), &dev)?.to_dtype(dtype)?;
                let v =
                    Tensor::from_vec(data(32 * kv_dim, 3), (32, kv_dim), &dev)?.to_dtype(dtype)?;
                Ok((k, v))
            };
            let (kc, vc) = caches()?;
            let qs = rope_and_store(&q, &k, &v, &cos, &sin, &slots, &kc, &vc, hd)?
                .expect("f32 rows on the CPU take this path");

            let (kc2, vc2) = caches()?;
            let q2 = rope.apply(&q.reshape((n, heads, hd))?, &cos, &sin)?;
            let k2 = rope.apply(&k.reshape((n, kv_heads, hd))?, &cos, &sin)?;
            let index = Tensor::from_vec(slots.clone(), (n, 1), &dev)?
                .broadcast_as((n, kv_dim))?
                .contiguous()?;
            kc2.scatter_set(
                &index,
                &k2.reshape((n, kv_dim))?.to_dtype(dtype)?.contiguous()?,
                0,
            )?;
            vc2.scatter_set(&index, &v.contiguous()?.to_dtype(dtype)?, 0)?;

            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                Ok(t.to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|x| x.to_bits())
                    .collect())
            };
            let q2: Vec<u32> = bits(&q2)?;
            assert_eq!(qs.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), q2);
            assert_eq!(bits(&kc)?, bits(&kc2)?, "{dtype:?} keys");
            assert_eq!(bits(&vc)?, bits(&vc2)?, "{dtype:?} values");
        }
        Ok(())
    }

    /// A slot past the cache is an error, not a write out of bounds; bf16 projections are
    /// left to the tensor path.
    #[test]
    fn bad_slots_fail_and_other_types_decline() -> Result<()> {
        let dev = Device::Cpu;
        let rope = RotaryEmbedding::new(10_000.0, 8, 16, DType::F32, &dev);
        let (cos, sin) = rope.tables(&[1])?;
        let q = Tensor::from_vec(data(16, 1), (1, 16), &dev)?;
        let kv = Tensor::from_vec(data(8, 2), (1, 8), &dev)?;
        let cache = Tensor::zeros((4, 8), DType::F32, &dev)?;
        let cache2 = Tensor::zeros((4, 8), DType::F32, &dev)?;
        assert!(rope_and_store(&q, &kv, &kv, &cos, &sin, &[4], &cache, &cache2, 8).is_err());
        let qb = q.to_dtype(DType::BF16)?;
        assert!(rope_and_store(&qb, &kv, &kv, &cos, &sin, &[1], &cache, &cache2, 8)?.is_none());
        Ok(())
    }
}
