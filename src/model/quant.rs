//! Weight quantization on load (`--quant`): projections are quantized tensor by tensor as
//! they are read, with candle's quantized tensors, and the unquantized copy is dropped at
//! once, so peak memory stays near the quantized size plus one tensor.

use super::layers::Linear;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};
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
        let q = QTensor::quantize(&weight, dtype)?;
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

    /// Every format's product stays close to the unquantized one (through whichever kernel
    /// the CPU takes: the packed VNNI one or candle's for q4k, ours for q8_0 and q4_0).
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
