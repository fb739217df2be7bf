//! `mixserve bench`: prefill and decode throughput through the real engine, next to what the
//! machine allows: decode against its memory bandwidth (the roofline of a memory-bound decode
//! step), prefill against its measured matrix-multiply peak.
//!
//! Decode on CPU reads every weight it uses once per step, whatever the batch, so the ceiling
//! on tokens/s is `batch × bandwidth / bytes read per step`; how close the engine gets says
//! whether time goes to memory traffic or to overhead. Prefill multiplies whole prompts by the
//! weights, so its ceiling is compute: its FLOPs over its time, as a fraction of the GFLOP/s a
//! large square matrix product reaches on the same device.

use super::synthetic::{self, splitmix64, SyntheticKind};
use super::{parse_bytes, parse_device, EngineArgs, ModelArgs};
use crate::config::MoeConfig;
use crate::engine::{Engine, Event, Request};
use crate::loader::{select_dtype, DTypeArg, WeightSource};
use crate::model::{MoeModel, Quant};
use crate::text::Tokenizer;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// The model `--model` defaults to, as for the other commands.
const DEFAULT_MODEL: &str = "models/tiny-mixtral";

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A local model directory or a hub repo id (default: models/tiny-mixtral).
    #[arg(long, short = 'm', conflicts_with = "synthetic")]
    pub model: Option<String>,

    /// Benchmark a full-size model with random weights (≈0.79 B parameters) instead.
    #[arg(long, value_enum)]
    pub synthetic: Option<SyntheticKind>,

    /// Seed of the synthetic weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Also write the synthetic model to this directory as a hub-layout checkpoint.
    #[arg(long, requires = "synthetic")]
    pub save: Option<PathBuf>,

    /// Where the synthetic model's tokenizer files come from (a 32,000-token vocabulary).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub tokenizer_from: PathBuf,

    /// Compute dtypes to measure, each in turn (repeatable or comma-separated); f32 when
    /// neither this nor `--quant` is given.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub dtype: Vec<DTypeArg>,

    /// Quantized formats to measure too, each in turn (weights quantized on load, f32
    /// activations), after the dtypes.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub quant: Vec<Quant>,

    /// Device: cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Override the number of experts each token is routed to.
    #[arg(long)]
    pub experts_per_token: Option<usize>,

    /// Numbers of concurrent requests for the decode measurement (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub concurrency: Vec<usize>,

    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,

    /// Tokens each decode request generates.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,

    /// Prompt length of each decode request (short, distinct per request).
    #[arg(long, default_value_t = 16)]
    pub decode_prompt_tokens: usize,

    /// Buffer streamed to measure memory bandwidth; must be well beyond the caches.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub bandwidth_buffer: u64,

    /// Side of the square matrix product that measures the matmul peak (larger on a GPU).
    #[arg(long, default_value_t = 1024)]
    pub matmul_size: usize,

    /// Decode measurements per concurrency, interleaved (1, 4, 16, .., then again), each with
    /// its own bandwidth reading; the round with the median decode rate is reported. On a
    /// machine whose bandwidth drifts, ratios between concurrencies need more than one.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,

    /// Write one JSON object per line per configuration to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// `--kv-cache-memory` is the most the KV cache may take; the benchmark allocates only
    /// what its largest concurrency needs.
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// One row of results: a dtype at one concurrency.
#[derive(Debug, Clone)]
struct Row {
    dtype: DType,
    quant: Option<Quant>,
    /// The KV cache's element type.
    kv_dtype: DType,
    concurrency: usize,
    prefill_tok_s: f64,
    prefill_ttft_s: f64,
    prefill_flops: f64,
    /// GFLOP/s of the matmul peak in this row's dtype.
    matmul_peak_gflop_s: f64,
    ttft_s: f64,
    decode_tok_s: f64,
    roofline: Roofline,
    roofline_tok_s: f64,
    /// The memory read bandwidth measured before this row's configuration (or round).
    bandwidth_gb_s: f64,
    peak_rss_mb: Option<f64>,
    /// Decode tok/s of every round, in order (the row is the median one's).
    rounds_tok_s: Vec<f64>,
    /// 10th and 50th percentile of the decode steps' durations (s) while all N decode.
    step_s: Option<(f64, f64)>,
}

impl Row {
    fn prefill_gflop_s(&self) -> f64 {
        self.prefill_flops / self.prefill_ttft_s / 1e9
    }

    fn prefill_peak_fraction(&self) -> f64 {
        self.prefill_gflop_s() / self.matmul_peak_gflop_s
    }
}

pub fn bench(args: BenchArgs) -> Result<()> {
    validate(&args)?;
    let device = parse_device(&args.device)?;
    let mut json = match &args.json {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => None,
    };
    if let (Some(kind), Some(dir)) = (args.synthetic, &args.save) {
        eprintln!("generating {} (seed {}) to save it", kind.name(), args.seed);
        let (_, tensors) = synthetic::synthetic(kind, args.seed)?;
        synthetic::save(dir, kind, kind.full_dims(), &tensors, &args.tokenizer_from)?;
        eprintln!("saved {} to {}", kind.name(), dir.display());
    }

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dtypes = if args.dtype.is_empty() && args.quant.is_empty() {
        vec![DTypeArg::F32]
    } else {
        args.dtype.clone()
    };
    let mut prompt_seed = 0u64;
    let mut header_done = false;
    // Each dtype as loaded, then each quantized format with f32 activations.
    let configs: Vec<(DTypeArg, Option<Quant>)> = dtypes
        .iter()
        .map(|&d| (d, None))
        .chain(args.quant.iter().map(|&q| (DTypeArg::F32, Some(q))))
        .collect();
    for &(dtype_arg, quant) in &configs {
        // Measured again before each configuration, with no model loaded (the buffer neither
        // competes with one nor counts in its RSS): on a shared VM the bandwidth drifts by
        // tens of percent over minutes, and each roofline should use its own.
        let bandwidth = memory_bandwidth(args.bandwidth_buffer, threads)?;
        super::malloc::for_loading();
        // The load's own peak, not the bandwidth buffer's or the previous configuration's.
        let can_reset = reset_peak_rss();
        let (name, model, tokenizer) = load(&args, dtype_arg, quant, &device)?;
        let load_peak = rss_mb("VmHWM").filter(|_| can_reset);
        super::malloc::for_serving();
        if !header_done {
            print_header(&name, model.config(), &args, load_peak, threads);
            header_done = true;
        }
        let dtype = model.dtype();
        // Measured again for each configuration, as the bandwidth is: on a shared VM the
        // cores' speed drifts too (one run read 168 and 121 GFLOP/s an hour apart), and the
        // prefill's fraction should be of the peak of its own minutes.
        let matmul_peak = matmul_peak(args.matmul_size, dtype, &device)?;
        println!(
            "matmul peak: {:.1} GFLOP/s ({n}x{n} by {n}x{n}, {}, best of 5, before this configuration)",
            matmul_peak / 1e9,
            dtype.as_str(),
            n = args.matmul_size
        );
        let cfg = model.config().clone();
        let mut config = args.engine.config(&model)?;
        let kv_dtype = config.kv_cache_dtype.unwrap_or(dtype);
        config.num_blocks = kv_blocks(&args, &model, config.block_size, kv_dtype)?;
        config.max_waiting = None;
        let engine = Engine::start(model, tokenizer, config)?;
        let mut next_prompt = |len: usize| {
            prompt_seed += 1;
            prompt(cfg.vocab_size, len, prompt_seed)
        };

        // Warm-up: first-call allocations and thread pools are not what is measured.
        run_batch(&engine, vec![next_prompt(args.decode_prompt_tokens)], 4)?;

        let t = run_batch(&engine, vec![next_prompt(args.prompt_tokens)], 1)?;
        let prefill_ttft_s = t[0][0];
        let prefill_tok_s = args.prompt_tokens as f64 / prefill_ttft_s;
        let prefill_flops = prefill_flops(&cfg, args.prompt_tokens);

        let mut measured: Vec<Vec<Row>> = vec![Vec::new(); args.concurrency.len()];
        for round in 0..args.rounds {
            // Later rounds read the bandwidth again: it drifts while the rounds run.
            let bandwidth = if round == 0 {
                bandwidth
            } else {
                memory_bandwidth(args.bandwidth_buffer, threads)?
            };
            for (rows, &c) in measured.iter_mut().zip(&args.concurrency) {
                let can_reset = reset_peak_rss();
                let prompts = (0..c)
                    .map(|_| next_prompt(args.decode_prompt_tokens))
                    .collect();
                let times = run_batch(&engine, prompts, args.decode_tokens)?;
                let s = summarize(&times)
                    .with_context(|| format!("concurrency {c}: too few tokens to time decoding"))?;
                // Mean context over the decode steps: the prompt, then half the new tokens.
                let avg_context = (args.decode_prompt_tokens + 1) as f64
                    + (args.decode_tokens.saturating_sub(1)) as f64 / 2.0;
                let roofline = Roofline::new(&cfg, dtype, quant, kv_dtype, c, avg_context);
                rows.push(Row {
                    dtype,
                    quant,
                    kv_dtype,
                    concurrency: c,
                    prefill_tok_s,
                    prefill_ttft_s,
                    prefill_flops,
                    matmul_peak_gflop_s: matmul_peak / 1e9,
                    ttft_s: s.mean_ttft_s,
                    decode_tok_s: s.decode_tok_s,
                    step_s: s.step_s,
                    roofline_tok_s: c as f64 * bandwidth / roofline.bytes_per_step,
                    roofline,
                    bandwidth_gb_s: bandwidth / 1e9,
                    peak_rss_mb: rss_mb("VmHWM").filter(|_| can_reset),
                    rounds_tok_s: Vec::new(),
                });
            }
        }
        for rows in measured {
            let Some(row) = median_round(rows) else {
                continue;
            };
            print_row(&row);
            if let Some(out) = json.as_mut() {
                let line = json_line(&name, &row, load_peak);
                writeln!(out, "{line}")
                    .and_then(|_| out.flush())
                    .context("writing the --json file")?;
            }
        }
        engine.shutdown();
    }
    Ok(())
}

/// The round with the median decode rate (the lower of the middle two for an even count),
/// carrying every round's rate.
fn median_round(mut rows: Vec<Row>) -> Option<Row> {
    let rates: Vec<f64> = rows.iter().map(|r| r.decode_tok_s).collect();
    rows.sort_by(|a, b| a.decode_tok_s.total_cmp(&b.decode_tok_s));
    let mut row = rows.into_iter().nth(rates.len().saturating_sub(1) / 2)?;
    row.rounds_tok_s = rates;
    Some(row)
}

fn validate(args: &BenchArgs) -> Result<()> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency needs numbers of at least 1");
    }
    if args.prompt_tokens == 0 || args.decode_prompt_tokens == 0 {
        bail!("--prompt-tokens and --decode-prompt-tokens must be at least 1");
    }
    if args.decode_tokens < 2 {
        bail!("--decode-tokens must be at least 2: decode is timed from the first token on");
    }
    let tokenizer = args.tokenizer_from.join("tokenizer.json");
    if args.synthetic.is_some() && !tokenizer.is_file() {
        bail!(
            "--tokenizer-from: {} not found (the synthetic model borrows a 32,000-token \
             tokenizer; run from the repository root or pass --tokenizer-from DIR)",
            tokenizer.display()
        );
    }
    if args.bandwidth_buffer < 1 << 20 {
        bail!("--bandwidth-buffer must be at least 1MiB (and far larger than the caches)");
    }
    if args.matmul_size == 0 {
        bail!("--matmul-size must be at least 1");
    }
    Ok(())
}

/// Loads the model in one dtype: the synthetic one is generated afresh each time, so the
/// previous dtype's copy is gone and no bf16 original lingers beside an f32 model.
fn load(
    args: &BenchArgs,
    dtype_arg: DTypeArg,
    quant: Option<Quant>,
    device: &Device,
) -> Result<(String, MoeModel, Tokenizer)> {
    let Some(kind) = args.synthetic else {
        let model_args = ModelArgs {
            model: args
                .model
                .clone()
                .unwrap_or_else(|| DEFAULT_MODEL.to_string()),
            dtype: dtype_arg,
            device: args.device.clone(),
            experts_per_token: args.experts_per_token,
            quant,
            chat_template: None,
            engine: args.engine.clone(),
        };
        let loaded = model_args.load()?;
        return Ok((loaded.files.name, loaded.model, loaded.tokenizer));
    };
    // The tokenizer first: a wrong path should fail before seconds of weight generation.
    let dir = &args.tokenizer_from;
    let optional = |f: &str| Some(dir.join(f)).filter(|p| p.is_file());
    let tokenizer = Tokenizer::from_files(
        &dir.join("tokenizer.json"),
        optional("tokenizer_config.json").as_deref(),
        optional("generation_config.json").as_deref(),
    )
    .with_context(|| format!("loading the tokenizer from {}", dir.display()))?;
    let t0 = Instant::now();
    let (mut cfg, tensors) = synthetic::synthetic(kind, args.seed)?;
    if let Some(k) = args.experts_per_token {
        cfg = cfg.with_experts_per_token(k)?;
    }
    let dtype = select_dtype(dtype_arg, cfg.torch_dtype.as_deref(), device);
    let weights = WeightSource::from_tensors(tensors, device, dtype)?;
    let model = MoeModel::load_quantized(&cfg, &weights, quant)
        .with_context(|| format!("building {}", kind.name()))?;
    drop(weights);
    eprintln!(
        "{}: generated and loaded in {:.1}s ({})",
        kind.name(),
        t0.elapsed().as_secs_f64(),
        quant.map_or(dtype.as_str(), Quant::name)
    );
    if tokenizer.vocab_size() > cfg.vocab_size {
        bail!(
            "the tokenizer of {} has {} tokens, more than the synthetic model's {}",
            dir.display(),
            tokenizer.vocab_size(),
            cfg.vocab_size
        );
    }
    Ok((kind.name().to_string(), model, tokenizer))
}

/// KV blocks for the largest phase (one long prefill, or every concurrent request at once),
/// within the `--kv-cache-memory` budget. Only what is needed is allocated: a bf16 cache is
/// written (zeroed) in full when created, so a larger one would inflate the peak RSS of bf16
/// runs but not of f32 ones, whose zeroed pages stay untouched until used.
fn kv_blocks(
    args: &BenchArgs,
    model: &MoeModel,
    block_size: usize,
    kv_dtype: DType,
) -> Result<usize> {
    let per_seq = |prompt: usize, new: usize| (prompt + new).div_ceil(block_size) + 1;
    let most = args.concurrency.iter().copied().max().unwrap_or(1);
    let needed = per_seq(args.prompt_tokens, 1)
        .max(most * per_seq(args.decode_prompt_tokens, args.decode_tokens));
    let bytes = needed as u64 * model.kv_bytes_per_block(block_size, Some(kv_dtype)) as u64;
    if bytes > args.engine.kv_cache_memory {
        bail!(
            "the largest concurrency needs {} of KV cache, more than --kv-cache-memory {}",
            bytesize::ByteSize(bytes),
            bytesize::ByteSize(args.engine.kv_cache_memory)
        );
    }
    Ok(needed)
}

/// A distinct pseudo-random prompt: no prefix-cache hits between measurements, and ids clear
/// of the first few (special) tokens.
fn prompt(vocab: usize, len: usize, seed: u64) -> Vec<u32> {
    let mut state = seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let span = vocab.saturating_sub(3).max(1) as u64;
    (0..len)
        .map(|_| (3 + splitmix64(&mut state) % span).min(vocab.saturating_sub(1) as u64) as u32)
        .collect()
}

/// Submits all prompts at once (greedy, EOS ignored) and returns, per request, the arrival of
/// each token in seconds since submission.
fn run_batch(engine: &Engine, prompts: Vec<Vec<u32>>, max_tokens: usize) -> Result<Vec<Vec<f64>>> {
    let t0 = Instant::now();
    let mut streams = Vec::with_capacity(prompts.len());
    for p in prompts {
        let mut r = Request::greedy(p, max_tokens);
        r.ignore_eos = true;
        streams.push(engine.submit(r).context("submitting a benchmark request")?);
    }
    // One receiver thread per request; tokens are timed by when the engine sent them.
    std::thread::scope(|s| {
        let handles: Vec<_> = streams
            .into_iter()
            .map(|mut stream| {
                s.spawn(move || -> Result<Vec<f64>> {
                    let mut times = Vec::with_capacity(max_tokens);
                    loop {
                        match stream.blocking_recv() {
                            Some(Event::Token { at, .. }) => {
                                times.push(at.saturating_duration_since(t0).as_secs_f64())
                            }
                            Some(Event::Done(_)) => return Ok(times),
                            Some(Event::Error(e)) => bail!("benchmark request failed: {e}"),
                            Some(_) => {}
                            None => bail!("the engine stopped during the benchmark"),
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow!("a benchmark receiver thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })
    .and_then(|times| {
        if times.iter().any(|t| t.is_empty()) {
            bail!("a benchmark request produced no token");
        }
        Ok(times)
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Summary {
    mean_ttft_s: f64,
    decode_tok_s: f64,
    /// The decode steps' durations while every request decodes (the gaps between a request's
    /// tokens): 10th and 50th percentile. The rate is the mean; these say whether some steps
    /// ran much faster than the rest (a machine whose speed drifts while it runs).
    step_s: Option<(f64, f64)>,
}

/// Decode throughput of a batch: tokens generated after the last request got its first token,
/// divided by the time from then to the last token. Tokens of the step that gave that first
/// token arrive within microseconds of it; they are told apart from the next step's by a
/// tolerance of half the median gap between a request's tokens.
fn summarize(times: &[Vec<f64>]) -> Option<Summary> {
    let firsts: Vec<f64> = times.iter().filter_map(|t| t.first().copied()).collect();
    if firsts.len() != times.len() || firsts.is_empty() {
        return None;
    }
    let mean_ttft_s = firsts.iter().sum::<f64>() / firsts.len() as f64;
    let start = firsts.iter().copied().fold(f64::MIN, f64::max);
    let lasts: Vec<f64> = times.iter().filter_map(|t| t.last().copied()).collect();
    let end = lasts.iter().copied().fold(f64::MIN, f64::max);
    let mut gaps: Vec<f64> = times
        .iter()
        .flat_map(|t| t.windows(2).map(|w| w[1] - w[0]))
        .collect();
    gaps.sort_by(f64::total_cmp);
    let tolerance = gaps.get(gaps.len() / 2).copied().unwrap_or(0.0) / 2.0;
    let tokens = times
        .iter()
        .flatten()
        .filter(|&&t| t > start + tolerance)
        .count();
    if tokens == 0 || end <= start {
        return None;
    }
    // Steps between the last first token and the first last one: all N requests in the batch.
    let all_end = lasts.iter().copied().fold(f64::MAX, f64::min);
    let mut steps: Vec<f64> = times
        .iter()
        .flat_map(|t| t.windows(2))
        .filter(|w| w[0] > start + tolerance && w[1] <= all_end + tolerance)
        .map(|w| w[1] - w[0])
        .collect();
    steps.sort_by(f64::total_cmp);
    let at = |f: f64| steps[((steps.len() - 1) as f64 * f) as usize];
    Some(Summary {
        mean_ttft_s,
        decode_tok_s: tokens as f64 / (end - start),
        step_s: (!steps.is_empty()).then(|| (at(0.1), at(0.5))),
    })
}

/// What one decode step reads from memory, by the model's shapes.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Roofline {
    /// Expected distinct experts per layer for the batch, under uniform routing.
    experts_per_layer: f64,
    bytes_per_step: f64,
}

impl Roofline {
    /// Attention, router and norm weights of every layer, the LM head (kept in f32) and final
    /// norm, the batch's embedding rows, the experts the step touches — `E · (1 − (1 − k/E)^B)`
    /// per layer for `B` tokens routed uniformly — and each sequence's KV cache at
    /// `avg_context` tokens, in `kv_dtype`.
    /// With `quant`, the projections (attention, experts, LM head) count at its bytes per
    /// weight, scales included; the router and embeddings stay in `dtype`.
    fn new(
        cfg: &MoeConfig,
        dtype: DType,
        quant: Option<Quant>,
        kv_dtype: DType,
        batch: usize,
        avg_context: f64,
    ) -> Self {
        let w = dtype.size_in_bytes() as f64;
        let f32b = DType::F32.size_in_bytes() as f64;
        let (proj, head) = match quant {
            Some(q) => (q.bytes_per_weight(), q.bytes_per_weight()),
            None => (w, f32b),
        };
        let (h, q, kv) = (
            cfg.hidden_size as f64,
            cfg.q_dim() as f64,
            cfg.kv_dim() as f64,
        );
        let (e, k, b) = (
            cfg.num_experts as f64,
            cfg.experts_per_token as f64,
            batch as f64,
        );
        let layers = cfg.num_layers as f64;
        let attention = (q + 2.0 * kv) * h * proj + h * q * proj;
        let router = e * h * w;
        let norms = 2.0 * h * f32b;
        let expert = 3.0 * h * cfg.intermediate_size as f64 * proj;
        let experts_per_layer = e * (1.0 - (1.0 - k / e).powf(b));
        let globals = cfg.vocab_size as f64 * h * head + h * f32b + b * h * w;
        let kv_cache = b * avg_context * kv * 2.0 * layers * kv_dtype.size_in_bytes() as f64;
        let bytes_per_step =
            layers * (attention + router + norms + experts_per_layer * expert) + globals + kv_cache;
        Self {
            experts_per_layer,
            bytes_per_step,
        }
    }
}

/// FLOPs of prefilling a `tokens`-long prompt as the engine computes it (2 per multiply-add):
/// per token and layer the attention projections (q, k, v, o), the router and the k routed
/// experts' three projections; per layer the attention scores and weighted values, each query
/// against the keys before it (causal, within the sliding window); and the LM head of the last
/// position only (no other logits are computed without prompt logprobs). Norms, rotary and
/// softmax are left out. Each chunk's attention also computes the masked part of its square of
/// scores; that work is not counted, as it is not needed.
fn prefill_flops(cfg: &MoeConfig, tokens: usize) -> f64 {
    let (h, q, kv) = (
        cfg.hidden_size as f64,
        cfg.q_dim() as f64,
        cfg.kv_dim() as f64,
    );
    let per_token = 2.0
        * (h * (q + 2.0 * kv)
            + q * h
            + cfg.num_experts as f64 * h
            + cfg.experts_per_token as f64 * 3.0 * h * cfg.intermediate_size as f64);
    let window = cfg.sliding_window.unwrap_or(usize::MAX);
    let keys: f64 = (1..=tokens).map(|p| p.min(window) as f64).sum();
    let attention = 2.0 * 2.0 * q * keys;
    let lm_head = 2.0 * h * cfg.vocab_size as f64;
    cfg.num_layers as f64 * (tokens as f64 * per_token + attention) + lm_head
}

/// FLOP/s of an `n`×`n` by `n`×`n` matrix product in `dtype`, best of five after a warm-up.
fn matmul_peak(n: usize, dtype: DType, device: &Device) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    a.matmul(&b)?;
    device.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        let c = a.matmul(&b)?;
        device.synchronize()?;
        best = best.min(t0.elapsed().as_secs_f64());
        drop(c);
    }
    Ok(2.0 * (n as f64).powi(3) / best)
}

/// Streams `bytes` of u64s from memory, split over `threads`, best of three passes; bytes/s.
fn memory_bandwidth(bytes: u64, threads: usize) -> Result<f64> {
    let n = usize::try_from(bytes / 8).context("--bandwidth-buffer is too large")?;
    // Written, not just allocated: untouched pages would all read the one zero page.
    let data: Vec<u64> = (0..n as u64).collect();
    let per = n.div_ceil(threads.max(1)).max(1);
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t0 = Instant::now();
        let sum = std::thread::scope(|s| {
            let handles: Vec<_> = data
                .chunks(per)
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow!("a bandwidth thread panicked")))
                .try_fold(0u64, |a, x| x.map(|x| a.wrapping_add(x)))
        })?;
        std::hint::black_box(sum);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok((n * 8) as f64 / best)
}

/// A `/proc/self/status` size field (VmHWM: peak resident set) in MB; None off Linux.
fn rss_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0 / 1e6)
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0), so each configuration reports its own peak
/// rather than the model load's.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn param_count(cfg: &MoeConfig) -> f64 {
    let h = cfg.hidden_size as f64;
    let per_layer = (cfg.q_dim() + 2 * cfg.kv_dim()) as f64 * h
        + h * cfg.q_dim() as f64
        + cfg.num_experts as f64 * h
        + cfg.num_experts as f64 * 3.0 * h * cfg.intermediate_size as f64
        + 2.0 * h;
    let heads = if cfg.tie_word_embeddings { 1.0 } else { 2.0 };
    cfg.num_layers as f64 * per_layer + heads * cfg.vocab_size as f64 * h + h
}

fn print_header(
    name: &str,
    cfg: &MoeConfig,
    args: &BenchArgs,
    load_peak: Option<f64>,
    threads: usize,
) {
    let params = param_count(cfg);
    let params = if params >= 1e9 {
        format!("{:.2} B", params / 1e9)
    } else {
        format!("{:.1} M", params / 1e6)
    };
    println!(
        "model {name}: {params} parameters, {} layers, {} experts top-{}, hidden {}, expert ffn {}; \
         peak RSS while loading {}",
        cfg.num_layers,
        cfg.num_experts,
        cfg.experts_per_token,
        cfg.hidden_size,
        cfg.intermediate_size,
        load_peak.map_or("n/a".into(), |m| format!("{m:.0} MB")),
    );
    println!(
        "prefill: one {}-token prompt, max_tokens 1 (prefill tok/s = prompt / its TTFT); {:.2} \
         GFLOP = per token 2 x (q,k,v,o + router + {} experts x 3 projections) + causal \
         attention (2 x 2 x query x keys x heads x head_dim) + the LM head of the last position \
         only; GFLOP/s = GFLOP / TTFT, against the matmul peak of its dtype measured before the configuration",
        args.prompt_tokens,
        prefill_flops(cfg, args.prompt_tokens) / 1e9,
        cfg.experts_per_token
    );
    println!(
        "decode: N requests of {} distinct prompt tokens submitted at once, {} tokens each, EOS \
         ignored; tok/s = tokens after the last request's first token / time from it to the last \
         token (all requests together); TTFT = mean over the N requests",
        args.decode_prompt_tokens, args.decode_tokens
    );
    println!(
        "roofline: bytes/step = per layer (attention + router + norms + X experts) + LM head (f32, or \
         quantized with --quant) \
         + embeddings + KV cache read (N x mean context x kv_dim x 2 x layers x KV dtype size), \
         X = E(1 - (1 - k/E)^N) distinct experts per layer (uniform routing); roofline tok/s = \
         N x bandwidth / bytes/step; bandwidth (GB/s) = memory read bandwidth measured before \
         each configuration and each --rounds round ({} streamed by {threads} threads, best of \
         3); with --rounds, the round with the median decode tok/s is shown",
        bytesize::ByteSize(args.bandwidth_buffer)
    );
    println!("peak RSS: VmHWM during each configuration (reset before it)");
    println!(
        "{:>5} {:>4} {:>5} {:>13} {:>8} {:>8} {:>8} {:>8} {:>12} {:>8} {:>9} {:>6} {:>14} {:>9} {:>12}",
        "dtype",
        "KV",
        "N",
        "prefill tok/s",
        "prefill",
        "GFLOP/s",
        "of peak",
        "TTFT s",
        "decode tok/s",
        "experts",
        "MB/step",
        "GB/s",
        "roofline tok/s",
        "fraction",
        "peak RSS MB"
    );
}

fn print_row(r: &Row) {
    println!(
        "{:>5} {:>4} {:>5} {:>13.1} {:>7.3}s {:>8.1} {:>7.1}% {:>8.3} {:>12.2} {:>8.2} {:>9.1} {:>6.1} {:>14.2} {:>8.1}% {:>12}",
        r.quant.map_or(r.dtype.as_str(), Quant::name),
        r.kv_dtype.as_str(),
        r.concurrency,
        r.prefill_tok_s,
        r.prefill_ttft_s,
        r.prefill_gflop_s(),
        100.0 * r.prefill_peak_fraction(),
        r.ttft_s,
        r.decode_tok_s,
        r.roofline.experts_per_layer,
        r.roofline.bytes_per_step / 1e6,
        r.bandwidth_gb_s,
        r.roofline_tok_s,
        100.0 * r.decode_tok_s / r.roofline_tok_s,
        r.peak_rss_mb.map_or("n/a".into(), |m| format!("{m:.0}")),
    );
    if r.rounds_tok_s.len() > 1 {
        let rounds: Vec<String> = r.rounds_tok_s.iter().map(|v| format!("{v:.1}")).collect();
        println!("{:>11} decode tok/s by round: {}", "", rounds.join(" / "));
    }
    if let Some((p10, p50)) = r.step_s {
        println!(
            "{:>11} decode steps: p10 {:.1} ms, p50 {:.1} ms ({:.1} / {:.1} tok/s at those)",
            "",
            p10 * 1e3,
            p50 * 1e3,
            r.concurrency as f64 / p10,
            r.concurrency as f64 / p50
        );
    }
}

fn json_line(name: &str, r: &Row, load_peak: Option<f64>) -> serde_json::Value {
    serde_json::json!({
        "model": name,
        "dtype": r.dtype.as_str(),
        "quant": r.quant.map(Quant::name),
        "kv_cache_dtype": r.kv_dtype.as_str(),
        "concurrency": r.concurrency,
        "decode_tok_s": r.decode_tok_s,
        "prefill_tok_s": r.prefill_tok_s,
        "ttft_s": r.ttft_s,
        "roofline_tok_s": r.roofline_tok_s,
        "roofline_fraction": r.decode_tok_s / r.roofline_tok_s,
        "peak_rss_mb": r.peak_rss_mb,
        "bandwidth_gb_s": r.bandwidth_gb_s,
        "prefill_ttft_s": r.prefill_ttft_s,
        "prefill_gflop": r.prefill_flops / 1e9,
        "prefill_gflop_s": r.prefill_gflop_s(),
        "matmul_peak_gflop_s": r.matmul_peak_gflop_s,
        "prefill_peak_fraction": r.prefill_peak_fraction(),
        "bytes_per_step": r.roofline.bytes_per_step,
        "experts_per_layer_step": r.roofline.experts_per_layer,
        "load_peak_rss_mb": load_peak,
        "decode_tok_s_rounds": r.rounds_tok_s,
        "decode_step_ms_p10": r.step_s.map(|s| s.0 * 1e3),
        "decode_step_ms_p50": r.step_s.map(|s| s.1 * 1e3),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_round_is_reported_with_every_rounds_rate() {
        let kind = SyntheticKind::Mixtral;
        let json = synthetic::config_json(kind, kind.full_dims());
        let cfg = MoeConfig::from_json_str(&json, "config.json").unwrap();
        let row = |rate: f64, bandwidth: f64| Row {
            dtype: DType::F32,
            quant: None,
            kv_dtype: DType::F32,
            concurrency: 1,
            prefill_tok_s: 1.0,
            prefill_ttft_s: 1.0,
            prefill_flops: 1.0,
            matmul_peak_gflop_s: 1.0,
            ttft_s: 0.1,
            decode_tok_s: rate,
            roofline: Roofline::new(&cfg, DType::F32, None, DType::F32, 1, 1.0),
            roofline_tok_s: 50.0,
            bandwidth_gb_s: bandwidth,
            peak_rss_mb: None,
            rounds_tok_s: Vec::new(),
            step_s: None,
        };
        let median = median_round(vec![row(40.0, 1.0), row(60.0, 2.0), row(45.0, 3.0)]).unwrap();
        // The median round's own bandwidth comes with it; all rates in their order.
        assert_eq!((median.decode_tok_s, median.bandwidth_gb_s), (45.0, 3.0));
        assert_eq!(median.rounds_tok_s, vec![40.0, 60.0, 45.0]);
        let even = median_round(vec![row(40.0, 1.0), row(60.0, 2.0)]).unwrap();
        assert_eq!(even.decode_tok_s, 40.0);
        assert!(median_round(Vec::new()).is_none());
    }

    #[test]
    fn distinct_experts_follow_uniform_routing() {
        let kind = SyntheticKind::Mixtral;
        let json = synthetic::config_json(kind, kind.full_dims());
        let cfg = MoeConfig::from_json_str(&json, "config.json").unwrap();
        let one = Roofline::new(&cfg, DType::F32, None, DType::F32, 1, 0.0);
        assert!((one.experts_per_layer - 2.0).abs() < 1e-9);
        let many = Roofline::new(&cfg, DType::F32, None, DType::F32, 64, 0.0);
        assert!((many.experts_per_layer - 8.0).abs() < 1e-6);
        // bf16 weights halve everything but the f32 LM head and norms.
        let bf16 = Roofline::new(&cfg, DType::BF16, None, DType::BF16, 1, 0.0);
        assert!(bf16.bytes_per_step < one.bytes_per_step * 0.6);
        // Per token, batching reads fewer bytes.
        assert!(many.bytes_per_step / 64.0 < one.bytes_per_step / 4.0);
        // q8_0 projections: 34 bytes per 32 weights, about 0.27 of f32 (router, embeddings and
        // KV stay f32).
        let q8 = Roofline::new(&cfg, DType::F32, Some(Quant::Q8_0), DType::F32, 1, 0.0);
        let ratio = q8.bytes_per_step / one.bytes_per_step;
        assert!((0.26..0.30).contains(&ratio), "{ratio}");
        // An f16 KV cache halves the KV bytes and nothing else.
        let kv32 = Roofline::new(&cfg, DType::F32, Some(Quant::Q4K), DType::F32, 16, 100.0);
        let kv16 = Roofline::new(&cfg, DType::F32, Some(Quant::Q4K), DType::F16, 16, 100.0);
        let kv_bytes = 16.0 * 100.0 * cfg.kv_dim() as f64 * 2.0 * cfg.num_layers as f64 * 4.0;
        assert!((kv32.bytes_per_step - kv16.bytes_per_step - kv_bytes / 2.0).abs() < 1.0);
    }

    #[test]
    fn decode_time_starts_at_the_last_first_token() {
        // Two requests, steps every 10 ms; the second's first token comes one step later, with
        // the first request's token of that step a few microseconds after it.
        let times = vec![
            vec![0.010, 0.020003, 0.030, 0.040],
            vec![0.020, 0.030, 0.040, 0.050],
        ];
        let s = summarize(&times).unwrap();
        assert!((s.mean_ttft_s - 0.015).abs() < 1e-12);
        // After 0.020: tokens at 0.030, 0.040 (first) and 0.030, 0.040, 0.050 (second).
        assert!((s.decode_tok_s - 5.0 / 0.030).abs() < 1e-6, "{s:?}");
        // Steps while both decode (after 0.020, up to 0.040): each request's 0.030 -> 0.040;
        // the second's last gap ends after the first request has.
        let (p10, p50) = s.step_s.unwrap();
        assert!(
            (p10 - 0.010).abs() < 1e-9 && (p50 - 0.010).abs() < 1e-9,
            "{s:?}"
        );
        assert!(summarize(&[vec![0.01]]).is_none());
    }

    #[test]
    fn prefill_flops_count_projections_experts_causal_attention_and_one_lm_head_row() {
        let kind = SyntheticKind::Mixtral;
        let json = synthetic::config_json(kind, kind.full_dims());
        let cfg = MoeConfig::from_json_str(&json, "config.json").unwrap();
        // hidden 1024, q 1024, k/v 256 each, 8 experts top-2 of ffn 3584, vocab 32000, 8 layers.
        let per_token = 2.0 * (1024.0 * 1536.0 + 1024.0 * 1024.0 + 8.0 * 1024.0)
            + 2.0 * 2.0 * 3.0 * 1024.0 * 3584.0;
        let attention = 4.0 * 1024.0 * (512.0 * 513.0 / 2.0);
        let want = 8.0 * (512.0 * per_token + attention) + 2.0 * 1024.0 * 32000.0;
        assert_eq!(prefill_flops(&cfg, 512), want);
        // A sliding window of 1 leaves each query one key.
        let mut windowed = cfg.clone();
        windowed.sliding_window = Some(1);
        let attention = 4.0 * 1024.0 * 512.0;
        let want = 8.0 * (512.0 * per_token + attention) + 2.0 * 1024.0 * 32000.0;
        assert_eq!(prefill_flops(&windowed, 512), want);
    }

    #[test]
    fn prompts_are_distinct_and_in_vocabulary() {
        let a = prompt(32000, 16, 1);
        let b = prompt(32000, 16, 2);
        assert_ne!(a, b);
        assert!(a.iter().all(|&t| (3..32000).contains(&t)));
        assert_eq!(prompt(2, 3, 1), vec![1, 1, 1]);
    }
}
