//! Engine throughput: aggregate generated tokens/s at 1, 4, 16 and 64 concurrent greedy
//! requests, and 16 requests run concurrently versus one after another.
//!
//! `cargo bench --bench engine` (model: `models/tiny-mixtral`, or `MIXSERVE_BENCH_MODEL=DIR`;
//! `MIXSERVE_BENCH_TOKENS` new tokens per request, default 64; `MIXSERVE_BENCH_CONCURRENCY`
//! the concurrency levels, default `1,4,16,64`).

use candle_core::{DType, Device};
use mixserve::config::MoeConfig;
use mixserve::engine::{Engine, EngineConfig, Event, Request, SchedulerConfig};
use mixserve::loader::{self, WeightSource};
use mixserve::model::MoeModel;
use mixserve::text::Tokenizer;
use std::time::Instant;

fn start(dir: &str) -> Engine {
    let files = loader::resolve(dir).expect("model files");
    let cfg = MoeConfig::from_file(&files.config).expect("config");
    let weights = WeightSource::open(&files.weights, &Device::Cpu, DType::F32).expect("weights");
    let model = MoeModel::load(&cfg, &weights).expect("model");
    let tokenizer = Tokenizer::from_files(
        &files.tokenizer,
        files.tokenizer_config.as_deref(),
        files.generation_config.as_deref(),
    )
    .expect("tokenizer");
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_batched_tokens: 2048,
            max_num_seqs: 64,
        },
        num_blocks: 2048,
        block_size: 16,
        // Distinct prompts anyway; off so every run computes the same work.
        prefix_caching: false,
        max_waiting: None,
        kv_cache_dtype: None,
        busy_poll: true,
    };
    Engine::start(model, tokenizer, config).expect("engine")
}

/// Prompts of different lengths, different per request.
fn prompt(engine: &Engine, i: usize) -> Vec<u32> {
    let text = format!(
        "Request {i}: mixture-of-experts models route every token to a few experts. {}",
        "The quick brown fox jumps over the lazy dog. ".repeat(1 + i % 4)
    );
    engine.tokenizer().encode(&text, true).expect("encode")
}

/// Runs `requests` at once; returns (generated tokens, seconds).
fn run_concurrent(engine: &Engine, ids: &[usize], tokens: usize) -> (usize, f64) {
    let t0 = Instant::now();
    let mut streams: Vec<_> = ids
        .iter()
        .map(|&i| {
            let mut r = Request::greedy(prompt(engine, i), tokens);
            r.ignore_eos = true;
            engine.submit(r).expect("submit")
        })
        .collect();
    let mut generated = 0;
    for s in &mut streams {
        while let Some(ev) = s.blocking_recv() {
            match ev {
                Event::Done(u) => {
                    generated += u.completion_tokens;
                    break;
                }
                Event::Error(e) => panic!("{e}"),
                _ => {}
            }
        }
    }
    (generated, t0.elapsed().as_secs_f64())
}

fn main() {
    mixserve::init_cpu_threads(None);
    let dir =
        std::env::var("MIXSERVE_BENCH_MODEL").unwrap_or_else(|_| "models/tiny-mixtral".into());
    let tokens: usize = std::env::var("MIXSERVE_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let levels: Vec<usize> = std::env::var("MIXSERVE_BENCH_CONCURRENCY")
        .ok()
        .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 16, 64]);
    let engine = start(&dir);
    // Warm-up.
    run_concurrent(&engine, &[0], 8);

    println!("model {dir}, f32, CPU, {tokens} new tokens per request");
    println!(
        "{:>11} {:>10} {:>9} {:>14}",
        "concurrency", "tokens", "seconds", "tokens/s"
    );
    for &c in &levels {
        let ids: Vec<usize> = (0..c).collect();
        let (n, s) = run_concurrent(&engine, &ids, tokens);
        println!("{c:>11} {n:>10} {s:>9.3} {:>14.1}", n as f64 / s);
    }

    // The comparison takes well under a second on small models, where one run's noise is
    // ±10%: three rounds, each figure and their median.
    let ids: Vec<usize> = (0..16).collect();
    let mut speedups = Vec::new();
    for round in 1..=3 {
        let (n_seq, s_seq) = ids
            .iter()
            .map(|&i| run_concurrent(&engine, &[i], tokens))
            .fold((0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        let (n_con, s_con) = run_concurrent(&engine, &ids, tokens);
        println!(
            "round {round}: 16 requests one after another: {:.1} tok/s; concurrently: {:.1} tok/s; \
             speed-up {:.2}x",
            n_seq as f64 / s_seq,
            n_con as f64 / s_con,
            s_seq / s_con
        );
        speedups.push(s_seq / s_con);
    }
    speedups.sort_by(f64::total_cmp);
    println!(
        "16 concurrent vs one after another, median of 3: {:.2}x",
        speedups[1]
    );
}
