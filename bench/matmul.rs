//! Decode-shaped matrix products: candle's matmul against mixserve's small-batch kernel.
//!
//! `cargo bench --bench matmul` prints, for the synthetic Mixtral's expert shapes and a few
//! row counts, the time per product, the weight bytes streamed per second and GFLOP/s.
//! `cargo bench --bench matmul -- experts` streams whole packed experts (gate and up fused,
//! then down) from memory, as a decode step does, next to a plain read's bandwidth.
//! `cargo bench --bench matmul -- moe` times whole MoE layers, one token against sixteen.
//! `cargo bench --bench matmul -- hot` times the packed kernels on one thread with the weight
//! in L2, so arithmetic alone: ns per 16 x 256 block of weights and activation row.
//! `cargo bench --bench matmul -- dense` times the LM head's and the QKV's packed products at
//! 1 to 16 rows on the pool (GB/s and multiply-adds a second per core).
//! `cargo bench --bench matmul -- attention` times the decode attention of 16 sequences over
//! `CTX` (default 1000) slots of a scattered f16 cache in blocks of `BLOCK` (16), 8 layers.
//! `cargo bench --bench matmul -- overlap` times one expert-sized packed product of 4 rows,
//! call by call, on one weight that stays in the L3 and on 40 copies streamed from memory,
//! on one thread and on the pool: whether the reads hide behind the arithmetic, and how the
//! core's speed moves from call to call.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Module;
use candle_core::{DType, Device, Tensor};
use mixserve::config::Activation;
use mixserve::model::quant_kernel::Packed;
use mixserve::model::small_matmul::small_matmul_t;
use mixserve::model::swiglu::gate_rows;
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

/// Where a mode runs: a pool of every core, a pool of one thread (arithmetic alone), or the
/// pools it builds itself.
enum Pool {
    All,
    One,
    Own,
}

/// A named part of a decode step, timed on its own.
type Mode = fn() -> candle_core::Result<()>;

fn main() -> candle_core::Result<()> {
    mixserve::init_cpu_threads(None);
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
    // Inside a pool, as the engine's loop runs: a caller outside it sleeps through every
    // product while the pool's threads do the work.
    let modes: [(&str, Mode, Pool); 6] = [
        ("experts", stream_experts, Pool::All),
        ("hot", hot_kernels, Pool::One),
        ("dense", dense, Pool::All),
        ("attention", attention, Pool::All),
        ("overlap", overlap, Pool::Own),
        ("moe", moe_layers, Pool::All),
    ];
    for (name, mode, pool) in modes {
        if !only.iter().any(|o| o == name) {
            continue;
        }
        let threads = match pool {
            Pool::Own => {
                mode()?;
                continue;
            }
            Pool::One => 1,
            Pool::All => 0,
        };
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(candle_core::Error::wrap)?
            .install(mode)?;
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
            let packed: Vec<Packed> = match qs
                .iter()
                .map(Packed::new)
                .collect::<candle_core::Result<Option<Vec<_>>>>()?
            {
                Some(p) => p,
                None => {
                    println!("{dtype:?}: no packed kernel on this CPU (candle's runs)");
                    break;
                }
            };
            let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let ours = time(20, || {
                i = (i + 1) % packed.len();
                Tensor::from_vec(packed[i].matmul(&xv, m), (m, n), &dev)
            })?;
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

/// The packed kernels on one thread against a weight that stays in L2 (768 x 512: 221 to
/// 418 KB; many rows, so rounding the activations costs little beside the products), for 1
/// to 16 activation rows: what the arithmetic costs without the reads, as ns
/// per 16 x 256 block of weights and activation row, and integer multiply-adds per second.
fn hot_kernels() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (n, k) = (768usize, 512usize);
    println!(
        "{:>6} {:>5} {:>12} {:>9}",
        "format", "m", "ns/block-row", "GMAC/s"
    );
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4K] {
        let q = QTensor::quantize(&Tensor::randn(0f32, 0.02, (n, k), &dev)?, dtype)?;
        let Some(packed) = Packed::new(&q)? else {
            println!("{dtype:?}: no packed kernel on this CPU");
            continue;
        };
        for m in [1usize, 2, 3, 4, 6, 8, 16] {
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &dev)?
                .flatten_all()?
                .to_vec1()?;
            let reps = 400 / m;
            let secs = time(reps, || {
                let y = packed.matmul(&x, m);
                Tensor::from_vec(y, (m, n), &dev)
            })?;
            let block_rows = (n / 16 * k / 256 * m) as f64;
            println!(
                "{:>6} {m:>5} {:>12.1} {:>9.1}",
                format!("{dtype:?}"),
                secs / block_rows * 1e9,
                (m * n * k) as f64 / secs / 1e9
            );
        }
    }
    Ok(())
}

/// Per-call times (us) of `f`, called for about `secs` seconds, sorted.
fn call_times(secs: f64, mut f: impl FnMut()) -> Vec<f64> {
    let (start, mut times) = (Instant::now(), Vec::new());
    while start.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    times
}

/// The `f` quantile (0 to 1) of [`call_times`]' sorted times.
fn quantile(times: &[f64], f: f64) -> f64 {
    times[((times.len() - 1) as f64 * f) as usize]
}

/// A `[3584, 1024]` packed product of 4 rows (an expert's gate at 16 sequences), for each
/// format: one weight over and over (it stays in the L3) against 40 copies in turn (streamed
/// from memory), on one thread and on all of them. Per call: min, 10th, 50th and 90th
/// percentile, and the weight bytes a second at the 10th. Streamed close to resident: the
/// reads hide behind the arithmetic. Min far below the median: the core's own speed moved
/// while the product ran.
fn overlap() -> candle_core::Result<()> {
    let (dev, (n, k), m, copies) = (Device::Cpu, (3584usize, 1024usize), 4usize, 40usize);
    let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &dev)?
        .flatten_all()?
        .to_vec1()?;
    println!(
        "{:>6} {:>7} {:>9} {:>7} {:>7} {:>7} {:>7} {:>11}",
        "format", "threads", "weights", "min us", "p10", "p50", "p90", "GB/s at p10"
    );
    let all = rayon::current_num_threads();
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q4_0] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let q = QTensor::quantize(&w, dtype)?;
        let bytes = q.storage_size_in_bytes() as f64;
        let mut ws = Vec::with_capacity(copies);
        for _ in 0..copies {
            match Packed::new(&q)? {
                Some(p) => ws.push(p),
                None => break,
            }
        }
        if ws.len() < copies {
            println!("{dtype:?}: no packed kernel on this CPU");
            continue;
        }
        let sizes: &[usize] = if all > 1 { &[1, all] } else { &[1] };
        for &threads in sizes {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(candle_core::Error::wrap)?;
            for streamed in [false, true] {
                let mut i = 0;
                let times = pool.install(|| {
                    call_times(2.0, || {
                        i = (i + 1) % copies;
                        let w = if streamed { &ws[i] } else { &ws[0] };
                        std::hint::black_box(w.matmul(&x, m));
                    })
                });
                let at = |f: f64| quantile(&times, f);
                println!(
                    "{:>6} {threads:>7} {:>9} {:>7.0} {:>7.0} {:>7.0} {:>7.0} {:>11.1}",
                    format!("{dtype:?}"),
                    if streamed { "streamed" } else { "resident" },
                    at(0.0),
                    at(0.1),
                    at(0.5),
                    at(0.9),
                    bytes / at(0.1) / 1e3
                );
            }
        }
    }
    Ok(())
}

/// GB/s of a plain read (u64 sums) of `data` by the pool's threads, best of 3.
fn read_bandwidth(data: &[u64]) -> f64 {
    let per = data.len().div_ceil(rayon::current_num_threads().max(1));
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let sum: u64 = std::thread::scope(|s| {
            let parts: Vec<_> = data
                .chunks(per)
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            parts.into_iter().filter_map(|h| h.join().ok()).sum()
        });
        std::hint::black_box(sum);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (data.len() * 8) as f64 / best / 1e9
}

/// The synthetic Mixtral's expert: hidden 1024, FFN 3584.
const EXPERT_SHAPE: (usize, usize) = (1024, 3584);

type PackedExpert = (Packed, Packed, Packed);

/// Packed q4k experts `(gate, up, down)` of [`EXPERT_SHAPE`] (all the same random weights,
/// each its own copy in memory) and their bytes in all; `None`, said under `what`, where this
/// CPU has no packed kernel.
fn packed_experts(
    count: usize,
    what: &str,
) -> candle_core::Result<Option<(Vec<PackedExpert>, usize)>> {
    let (dev, (h, f)) = (Device::Cpu, EXPERT_SHAPE);
    let gate = QTensor::quantize(&Tensor::randn(0f32, 0.02, (f, h), &dev)?, GgmlDType::Q4K)?;
    let down = QTensor::quantize(&Tensor::randn(0f32, 0.02, (h, f), &dev)?, GgmlDType::Q4K)?;
    let pack = |q: &QTensor| -> candle_core::Result<Packed> {
        Packed::new(q)?.ok_or_else(|| candle_core::Error::Msg("no packed kernel here".into()))
    };
    match (0..count)
        .map(|_| Ok((pack(&gate)?, pack(&gate)?, pack(&down)?)))
        .collect::<candle_core::Result<Vec<_>>>()
    {
        Ok(e) => Ok(Some((e, 3 * gate.storage_size_in_bytes() * count))),
        Err(e) => {
            println!("{what}: {e}");
            Ok(None)
        }
    }
}

/// Whole packed experts of the synthetic Mixtral's shape (q4k, 48 of them: 300 MB, far past
/// the caches) against `m` rows, one after another as a decode step's MoE block runs them,
/// best of 3 passes; the machine's (drifting) read bandwidth before and after.
fn stream_experts() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (h, count) = (EXPERT_SHAPE.0, 48usize);
    let Some((experts, bytes)) = packed_experts(count, "experts")? else {
        return Ok(());
    };
    let bytes = bytes as f64;
    let plain: Vec<u64> = (0..1u64 << 27).collect();
    let before = read_bandwidth(&plain);
    println!("{:>5} {:>12} {:>12}", "m", "experts GB/s", "ms/expert");
    for m in [1usize, 2, 4, 6, 8] {
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, h), &dev)?
            .flatten_all()?
            .to_vec1()?;
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            for (g, u, d) in &experts {
                let hidden = g
                    .gated_matmul(u, &x, m, |g, u, o| gate_rows(Activation::Silu, g, u, o))
                    .unwrap_or_default();
                std::hint::black_box(d.matmul(&hidden, m));
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{m:>5} {:>12.1} {:>12.3}",
            bytes / best / 1e9,
            best / count as f64 * 1e3
        );
    }
    // Reads interleaved with the experts slowed them by half (the caches and TLB each
    // leave cold): the machine's bandwidth is read before and after instead.
    println!(
        "plain read: {before:.1} GB/s before, {:.1} GB/s after",
        read_bandwidth(&plain)
    );
    Ok(())
}

/// MoE layers of the synthetic Mixtral's shape (q4k, 8 experts, top-2; 6 layers, 300 MB, far
/// past the caches) run as the model's packed MoE block runs them: the active experts side by
/// side on the pool, each on its tokens' rows. A one-token step against a 16-token step,
/// alternating 20 times, three times over (this VM's bandwidth drifts by the minute): with
/// tokens routed at random (fixed seed; ~7.9 experts a layer, 3.96x the one-token bytes), and
/// with every expert given the same 1 or 4 rows (4.0x the bytes).
fn moe_layers() -> candle_core::Result<()> {
    use rayon::prelude::*;
    let (h, layers, per) = (EXPERT_SHAPE.0, 6usize, 8usize);
    let Some((experts, _)) = packed_experts(layers * per, "moe")? else {
        return Ok(());
    };
    let mut seed = 12345u64;
    let mut random = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    // Rows per expert of one layer: `tokens` routed at random to 2 distinct experts each.
    let mut routed = |tokens: usize| {
        let mut rows = vec![0usize; per];
        for _ in 0..tokens {
            let a = random() % per;
            rows[a] += 1;
            rows[(a + 1 + random() % (per - 1)) % per] += 1;
        }
        rows
    };
    let step = |rows_of: &mut dyn FnMut() -> Vec<usize>| -> f64 {
        let t = Instant::now();
        for l in 0..layers {
            let rows = rows_of();
            let active: Vec<(usize, usize)> = (0..per)
                .filter(|&e| rows[e] > 0)
                .map(|e| (l * per + e, rows[e]))
                .collect();
            active.par_iter().for_each(|&(e, m)| {
                let (g, u, d) = &experts[e];
                let x = vec![0.5f32; m * h];
                let hidden = g
                    .gated_matmul(u, &x, m, |g, u, o| gate_rows(Activation::Silu, g, u, o))
                    .unwrap_or_default();
                std::hint::black_box(d.matmul(&hidden, m));
            });
        }
        t.elapsed().as_secs_f64()
    };
    println!(
        "{:>22} {:>14} {:>14} {:>7}",
        "16-token step", "1 token ms", "16 tokens ms", "ratio"
    );
    for _ in 0..3 {
        for (name, fixed) in [
            ("routed at random", 0usize),
            ("1 row an expert", 1),
            ("4 rows an expert", 4),
        ] {
            let (mut one, mut many) = (0f64, 0f64);
            for _ in 0..20 {
                one += step(&mut || routed(1));
                many += step(&mut || {
                    if fixed > 0 {
                        vec![fixed; per]
                    } else {
                        routed(16)
                    }
                });
            }
            let per_layer = |t: f64| t / (20 * layers) as f64 * 1e3;
            println!(
                "{name:>22} {:>14.3} {:>14.3} {:>6.2}x",
                per_layer(one),
                per_layer(many),
                many / one
            );
        }
    }
    Ok(())
}

/// Dense products at decode shapes on the pool, as a 16-sequence step runs them: the LM head
/// (`[32000, 1024]`) and the fused QKV (`[1536, 1024]`) for 1 to 16 activation rows, call by
/// call, with the weight bytes a second and the integer multiply-adds a second per core at
/// the 10th percentile. One weight is called over and over, so it sits partly in the L3 (the
/// 1-row GB/s are above memory's). At 8-16 rows they are bound by their arithmetic.
fn dense() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let threads = rayon::current_num_threads() as f64;
    println!(
        "{:>6} {:>6} {:>6} {:>3} {:>9} {:>9} {:>9} {:>16}",
        "format", "n", "k", "m", "p10 us", "p50 us", "GB/s", "GMAC/s per core"
    );
    for (n, k) in [(32000usize, 1024usize), (1536, 1024)] {
        for dtype in [GgmlDType::Q4K, GgmlDType::Q8_0, GgmlDType::Q4_0] {
            let q = QTensor::quantize(&Tensor::randn(0f32, 0.02, (n, k), &dev)?, dtype)?;
            let Some(packed) = Packed::new(&q)? else {
                println!("{dtype:?}: no packed kernel on this CPU");
                continue;
            };
            for m in [1usize, 4, 8, 16] {
                let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &dev)?
                    .flatten_all()?
                    .to_vec1()?;
                let t = call_times(1.0, || {
                    std::hint::black_box(packed.matmul(&x, m));
                });
                let (p10, p50) = (quantile(&t, 0.1), quantile(&t, 0.5));
                println!(
                    "{:>6} {n:>6} {k:>6} {m:>3} {p10:>9.1} {p50:>9.1} {:>9.1} {:>16.1}",
                    format!("{dtype:?}"),
                    q.storage_size_in_bytes() as f64 / p10 / 1e3,
                    (m * n * k) as f64 / p10 / 1e3 / threads,
                );
            }
        }
    }
    Ok(())
}

/// The positive count in environment variable `name`, or `default` when it is unset.
fn env_count(name: &str, default: usize) -> candle_core::Result<usize> {
    match std::env::var(name) {
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => candle_core::bail!("{name} must be a positive count, not {v:?}"),
        },
        Err(_) => Ok(default),
    }
}

/// The decode attention of a 16-sequence step over a long context, on the pool: the synthetic
/// Mixtral's heads (16 of 64 over 4 KV heads), an f16 cache of 16-slot blocks scattered by a
/// fixed permutation, 8 layers of their own (so the cache streams from memory, as in a step).
/// `CTX` slots per sequence (1000 by default), `BLOCK` slots per cache block (16, the
/// engine's default `--block-size`). Per step's 8 layers: time and cache bytes a second at the
/// 10th and 50th percentile.
fn attention() -> candle_core::Result<()> {
    use mixserve::model::decode_attention::{attend, Heads, Query};
    let dev = Device::Cpu;
    let (ctx, block) = (env_count("CTX", 1000)?, env_count("BLOCK", 16)?);
    let (seqs, layers, hd, num_heads, num_kv_heads) = (16usize, 8, 64, 16, 4);
    let kv_dim = num_kv_heads * hd;
    let per_seq = ctx.div_ceil(block);
    let blocks = seqs * per_seq;
    // A fixed shuffle of the blocks (an LCG), as a block table hands them out over time.
    let mut order: Vec<u32> = (0..blocks as u32).collect();
    let mut state = 12345u64;
    for i in (1..order.len()).rev() {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        order.swap(i, (state >> 33) as usize % (i + 1));
    }
    let slots: Vec<Vec<u32>> = (0..seqs)
        .map(|q| {
            (0..ctx)
                .map(|i| order[q * per_seq + i / block] * block as u32 + (i % block) as u32)
                .collect()
        })
        .collect();
    let cache = || Tensor::randn(0f32, 1.0, (blocks * block, kv_dim), &dev)?.to_dtype(DType::F16);
    let caches: Vec<(Tensor, Tensor)> = (0..layers)
        .map(|_| Ok((cache()?, cache()?)))
        .collect::<candle_core::Result<_>>()?;
    let q: Vec<f32> = Tensor::randn(0f32, 1.0, (seqs, num_heads * hd), &dev)?
        .flatten_all()?
        .to_vec1()?;
    let heads = Heads {
        num_heads,
        num_kv_heads,
        head_dim: hd,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    let queries: Vec<Query> = slots
        .iter()
        .enumerate()
        .map(|(row, slots)| Query { row, slots })
        .collect();
    let bytes = (layers * 2 * seqs * ctx * kv_dim * DType::F16.size_in_bytes()) as f64;
    for _ in 0..3 {
        let mut failed = None;
        let t = call_times(2.0, || {
            for (k, v) in &caches {
                if let Err(e) = attend(&q, k, v, &queries, heads) {
                    failed = Some(e);
                }
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let (p10, p50) = (quantile(&t, 0.1), quantile(&t, 0.5));
        println!(
            "decode attention, 16 sequences x {ctx} slots, 8 layers: p10 {:.3} ms, p50 {:.3} ms ({:.1} / {:.1} GB/s)",
            p10 / 1e3,
            p50 / 1e3,
            bytes / p10 / 1e3,
            bytes / p50 / 1e3
        );
    }
    Ok(())
}
