//! Decode-shaped matrix products: candle's matmul against mixserve's small-batch kernel.
//!
//! `cargo bench --bench matmul` prints, for the synthetic Mixtral's expert shapes and a few
//! row counts, the time per product, the weight bytes streamed per second and GFLOP/s.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Module;
use candle_core::{DType, Device, Tensor};
use mixserve::model::quant_kernel::{quantized_matmul_t, Packed};
use mixserve::model::small_matmul::small_matmul_t;
use std::time::Instant;

fn time(
    reps: usize,
    mut f: impl FnMut() -> candle_core::Result<Tensor>,
) -> candle_core::Result<f64> {
    f()?;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        best = best.min(start.elapsed().as_secs_f64() / reps as f64);
    }
    Ok(best)
}

fn main() -> candle_core::Result<()> {
    mixserve::init_cpu_threads();
    // `cargo bench --bench matmul -- q8_0 bf16`: only the named formats (all by default).
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.to_lowercase())
        .collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| *o == name.to_lowercase());
    let dev = Device::Cpu;
    println!(
        "{:>6} {:>5} {:>6} {:>6} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9}",
        "dtype", "m", "n", "k", "candle ms", "GB/s", "GFLOP/s", "small ms", "GB/s", "GFLOP/s"
    );
    for dtype in [DType::F32, DType::BF16] {
        if !wanted(dtype.as_str()) {
            continue;
        }
        // Up/gate ([3584, 1024]) and down ([1024, 3584]); 8 weights so they never sit in cache.
        for (n, k) in [(3584usize, 1024usize), (1024, 3584)] {
            let ws: Vec<Tensor> = (0..8)
                .map(|_| Tensor::randn(0f32, 0.02, (n, k), &dev)?.to_dtype(dtype))
                .collect::<candle_core::Result<_>>()?;
            for m in [1usize, 2, 4, 8, 16, 32] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_dtype(dtype)?;
                let mut i = 0;
                let candle = time(20, || {
                    i = (i + 1) % ws.len();
                    x.matmul(&ws[i].t()?)
                })?;
                let small = time(20, || {
                    i = (i + 1) % ws.len();
                    small_matmul_t(&x, &ws[i])
                })?;
                let bytes = (n * k * dtype.size_in_bytes()) as f64;
                let flops = (2 * m * n * k) as f64;
                println!(
                    "{:>6} {m:>5} {n:>6} {k:>6} {:>10.3} {:>9.1} {:>9.1} {:>10.3} {:>9.1} {:>9.1}",
                    format!("{dtype:?}"),
                    candle * 1e3,
                    bytes / candle / 1e9,
                    flops / candle / 1e9,
                    small * 1e3,
                    bytes / small / 1e9,
                    flops / small / 1e9,
                );
            }
        }
    }
    // Quantized weights: candle's kernel (activations rounded to 8 bits) against ours.
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4K] {
        if !wanted(&format!("{dtype:?}")) {
            continue;
        }
        let (n, k) = (3584usize, 1024usize);
        let qs: Vec<QTensor> = (0..8)
            .map(|_| QTensor::quantize(&Tensor::randn(0f32, 0.02, (n, k), &dev)?, dtype))
            .collect::<candle_core::Result<_>>()?;
        let mms: Vec<QMatMul> = qs
            .iter()
            .map(|q| QMatMul::from_qtensor(QTensor::quantize(&q.dequantize(&dev)?, dtype)?))
            .collect::<candle_core::Result<_>>()?;
        for m in [1usize, 2, 4, 8, 16, 64] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let mut i = 0;
            let candle = time(20, || {
                i = (i + 1) % mms.len();
                mms[i].forward(&x)
            })?;
            let packed: Vec<Option<Packed>> = qs
                .iter()
                .map(Packed::new)
                .collect::<candle_core::Result<_>>()?;
            let ours = if let Some(Some(_)) = packed.first() {
                let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
                time(20, || {
                    i = (i + 1) % packed.len();
                    let y = match &packed[i] {
                        Some(p) => p.matmul(&xv, m),
                        None => Vec::new(),
                    };
                    Tensor::from_vec(y, (m, n), &dev)
                })?
            } else {
                time(20, || {
                    i = (i + 1) % qs.len();
                    Ok(quantized_matmul_t(&x, &qs[i])?.unwrap_or(x.clone()))
                })?
            };
            let bytes = qs[0].storage_size_in_bytes() as f64;
            println!(
                "{:>6} {m:>5} {n:>6} {k:>6} {:>10.3} {:>9.1} {:>9.1} {:>10.3} {:>9.1} {:>9.1}",
                format!("{dtype:?}"),
                candle * 1e3,
                bytes / candle / 1e9,
                (2 * m * n * k) as f64 / candle / 1e9,
                ours * 1e3,
                bytes / ours / 1e9,
                (2 * m * n * k) as f64 / ours / 1e9,
            );
        }
    }
    Ok(())
}
