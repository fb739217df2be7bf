//! Weight quantization on load (`--quant`): projections are quantized tensor by tensor as
//! they are read, with candle's quantized tensors, and the unquantized copy is dropped at
//! once, so peak memory stays near the quantized size plus one tensor.

use super::layers::Linear;
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;
use std::cell::Cell;

/// The quantized formats offered, named as llama.cpp names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quant {
    /// 8-bit, blocks of 32 with an f16 scale (8.5 bits per weight): near-lossless.
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit k-quant, super-blocks of 256 with 6-bit scales and mins (4.5 bits per weight).
    #[value(name = "q4k")]
    Q4K,
    /// 4-bit, blocks of 32 with an f16 scale (4.5 bits per weight).
    #[value(name = "q4_0")]
    Q4_0,
}

impl Quant {
    pub fn name(self) -> &'static str {
        match self {
            Quant::Q8_0 => "q8_0",
            Quant::Q4K => "q4k",
            Quant::Q4_0 => "q4_0",
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Quant::Q8_0 => GgmlDType::Q8_0,
            Quant::Q4K => GgmlDType::Q4K,
            Quant::Q4_0 => GgmlDType::Q4_0,
        }
    }

    /// Bytes per weight as stored (block scales included).
    pub fn bytes_per_weight(self) -> f64 {
        let d = self.ggml();
        d.type_size() as f64 / d.block_size() as f64
    }
}

/// Weight rows per quantization task.
const ROWS_PER_TASK: usize = 64;

/// `weight` (`[n, k]`) quantized, its rows in chunks on the CPU's threads: candle quantizes a
/// tensor on one thread, and q4k's per-block scale search took ~10 s for the 0.79 B-parameter
/// synthetic model, which would be minutes for a real one. Blocks never span rows, so the
/// bytes are the same as quantizing the whole tensor at once.
fn quantize(weight: &Tensor, dtype: GgmlDType) -> Result<QTensor> {
    let (n, k) = weight.dims2()?;
    if !weight.device().is_cpu() || n <= ROWS_PER_TASK {
        return QTensor::quantize(&own_storage(weight)?, dtype);
    }
    let parts: Vec<Vec<u8>> = (0..n.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .map(|c| {
            let first = c * ROWS_PER_TASK;
            let rows = weight.narrow(0, first, ROWS_PER_TASK.min(n - first))?;
            Ok(QTensor::quantize(&own_storage(&rows)?, dtype)?
                .data()?
                .into_owned())
        })
        .collect::<Result<_>>()?;
    qtensor_from_ggml(dtype, &parts.concat(), vec![n, k], weight.device())
}

/// `t`, or a copy of it where it is a view into a larger storage: candle's `QTensor::quantize`
/// reads the storage from its start, ignoring a view's offset (a row slice of an in-memory
/// weight, or our chunks, would quantize the wrong rows).
fn own_storage(t: &Tensor) -> Result<Tensor> {
    use candle_core::{CpuStorage, Storage};
    let whole = {
        let (storage, layout) = t.storage_and_layout();
        let len = match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => Some(v.len()),
            Storage::Cpu(CpuStorage::BF16(v)) => Some(v.len()),
            Storage::Cpu(CpuStorage::F16(v)) => Some(v.len()),
            _ => None,
        };
        layout.start_offset() == 0 && layout.is_contiguous() && len == Some(t.elem_count())
    };
    if whole {
        return Ok(t.clone());
    }
    // (`Tensor::copy` keeps the view's offset into a cloned storage.) Quantizing reads f32.
    let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Tensor::from_vec(values, t.shape(), t.device())
}

/// Builds the model's projections, quantized or not, and counts what it did.
pub struct Quantizer {
    quant: Option<Quant>,
    quantized: Cell<usize>,
    /// Tensors whose input width is not a multiple of the format's block: q4k falls back to
    /// q8_0 (as llama.cpp does for such rows), anything else stays unquantized.
    fallbacks: Cell<usize>,
    kept: Cell<usize>,
}

impl Quantizer {
    pub fn new(quant: Option<Quant>) -> Self {
        Self {
            quant,
            quantized: Cell::new(0),
            fallbacks: Cell::new(0),
            kept: Cell::new(0),
        }
    }

    /// A projection from its `[out, in]` weight.
    pub fn linear(&self, weight: Tensor) -> Result<Linear> {
        let Some(quant) = self.quant else {
            return Linear::new(weight);
        };

        let k = weight.dim(1)?;
        let fits = |d: GgmlDType| k.is_multiple_of(d.block_size());
        let dtype = if fits(quant.ggml()) {
            quant.ggml()
        } else if fits(GgmlDType::Q8_0) {
            self.fallbacks.set(self.fallbacks.get() + 1);
            GgmlDType::Q8_0
        } else {
            self.kept.set(self.kept.get() + 1);
            return Linear::new(weight);
        };
        let q = quantize(&weight, dtype)?;
        drop(weight);
        self.quantized.set(self.quantized.get() + 1);
        Linear::quantized(q)
    }

    /// One log line for the whole model: what was quantized and what was not.
    pub fn report(&self) {
        if let Some(quant) = self.quant {
            tracing::info!(
                quant = quant.name(),
                quantized = self.quantized.get(),
                fell_back_to_q8_0 = self.fallbacks.get(),
                left_unquantized = self.kept.get(),
                "weights quantized on load (embeddings, norms and routers stay unquantized)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn weight(n: usize, k: usize) -> Result<Tensor> {
        let v: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(v, (n, k), &Device::Cpu)
    }

    fn quant_dtype(l: &Linear) -> Option<GgmlDType> {
        match l {
            Linear::Quantized { q, .. } => Some(q.dtype()),
            #[cfg(target_arch = "x86_64")]
            Linear::Packed(p) => Some(p.dtype()),
            Linear::Dense(_) => None,
        }
    }

    #[test]
    fn formats_and_fallbacks() -> Result<()> {
        let q4k = Quantizer::new(Some(Quant::Q4K));
        assert_eq!(
            quant_dtype(&q4k.linear(weight(16, 256)?)?),
            Some(GgmlDType::Q4K)
        );
        // 64 is not a multiple of q4k's 256: q8_0 instead.
        assert_eq!(
            quant_dtype(&q4k.linear(weight(16, 64)?)?),
            Some(GgmlDType::Q8_0)
        );
        // 48 is not a multiple of 32 either: left as loaded.
        assert_eq!(quant_dtype(&q4k.linear(weight(16, 48)?)?), None);
        assert_eq!(
            (q4k.quantized.get(), q4k.fallbacks.get(), q4k.kept.get()),
            (2, 1, 1)
        );
        let none = Quantizer::new(None);
        assert_eq!(quant_dtype(&none.linear(weight(16, 256)?)?), None);
        Ok(())
    }

    /// Quantizing rows in parallel chunks gives the bytes of quantizing the whole tensor.
    #[test]
    fn parallel_quantization_gives_the_same_bytes() -> Result<()> {
        let w = weight(ROWS_PER_TASK * 2 + 5, 256)?;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q4_0] {
            let whole = QTensor::quantize(&w, dtype)?;
            let chunked = quantize(&w, dtype)?;
            assert_eq!(chunked.shape(), whole.shape());
            assert!(chunked.data()? == whole.data()?, "{dtype:?}");
        }
        Ok(())
    }

    /// A row slice that shares a larger storage is quantized from its own rows (candle alone
    /// would read the storage from its start).
    #[test]
    fn a_view_into_a_larger_weight_quantizes_its_own_rows() -> Result<()> {
        let w = weight(32, 64)?;
        let rows = w.narrow(0, 16, 16)?;
        let want = QTensor::quantize(
            &rows.copy()?.contiguous()?.affine(1.0, 0.0)?,
            GgmlDType::Q8_0,
        )?;
        assert!(quantize(&rows, GgmlDType::Q8_0)?.data()? == want.data()?);
        Ok(())
    }

    /// Every format's product stays close to the unquantized one (through whichever kernel
    /// the CPU takes: the packed VNNI or AVX2 ones, or candle's where neither is there).
    #[test]
    fn quantized_products_track_the_dense_one() -> Result<()> {
        let w = weight(64, 512)?;
        let x = weight(5, 512)?.affine(0.5, 0.1)?;
        let dense = x.matmul(&w.t()?)?;
        let scale = dense.abs()?.max_all()?.to_scalar::<f32>()?;
        for (quant, tol) in [(Quant::Q8_0, 0.01), (Quant::Q4K, 0.06), (Quant::Q4_0, 0.06)] {
            let l = Quantizer::new(Some(quant)).linear(w.clone())?;
            assert_eq!(l.dtype(), DType::F32);
            for rows in [x.narrow(0, 0, 1)?, x.clone()] {
                let want = rows.matmul(&w.t()?)?;
                let err = (l.forward(&rows)? - want)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert!(err <= tol * scale, "{quant:?}: error {err} of {scale}");
            }
        }
        Ok(())
    }
}
