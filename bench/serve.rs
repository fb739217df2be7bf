//! Serving benchmark: concurrent streaming clients against a running OpenAI-compatible server
//! (`mixserve serve`, or any other), in the manner of vLLM's `benchmark_serving.py`.
//!
//! ```sh
//! cargo bench --bench serve -- --url http://127.0.0.1:8080 --clients 16 --requests 64 \
//!     --max-tokens 64 [--endpoint completions|chat] [--prompt-len N | --prompt TEXT] \
//!     [--api-key K] [--model NAME] [--json FILE]
//! ```
//!
//! `--clients` tasks each send streamed requests back to back until `--requests` have been
//! sent: greedy (temperature 0), `ignore_eos` so every request generates `--max-tokens`, and
//! `stream_options.include_usage` for the token counts. Prompts are synthetic, `--prompt-len`
//! words drawn with a fixed seed and different per request, so the prefix cache does not turn
//! prefill into a no-op (`--prompt` sends one fixed text instead). One request is sent first,
//! not counted: it checks the endpoint (a clear error if it fails) and warms the server up.
//!
//! Per request: TTFT = time from sending to the first chunk with generated text; ITL = the gaps
//! between such chunks; E2E = time to `[DONE]`; tokens from the usage chunk. Throughputs are
//! totals over the wall time of the whole run. Failed requests (transport errors, non-200
//! answers, error events, streams cut short) are counted and their messages printed.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Parser)]
#[command(about = "Concurrent streaming clients against an OpenAI-compatible server")]
struct Args {
    /// The server's base URL (with or without `/v1`).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Concurrent clients, each sending its requests one after another.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Tokens each request generates (EOS is ignored).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    #[arg(long, value_enum, default_value = "completions")]
    endpoint: Endpoint,
    /// Words in each synthetic prompt.
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    /// One fixed prompt for every request instead of synthetic ones.
    #[arg(long, conflicts_with = "prompt_len")]
    prompt: Option<String>,
    /// Seed of the synthetic prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sent as `Authorization: Bearer K`.
    #[arg(long)]
    api_key: Option<String>,
    /// The `model` field (default: the first model `/v1/models` lists).
    #[arg(long)]
    model: Option<String>,
    /// Append the results as one JSON object (one line) to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passed by `cargo bench` to harness-less benchmarks; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

/// What every client shares.
struct Setup {
    args: Args,
    client: reqwest::Client,
    /// The base URL, without `/v1` or a trailing slash.
    base: String,
    model: String,
    /// Index of the next request to send.
    next: AtomicUsize,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    if args.clients == 0 || args.requests == 0 || args.max_tokens == 0 {
        bail!("--clients, --requests and --max-tokens must be at least 1");
    }
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    let base = args
        .url
        .trim_end_matches('/')
        .trim_end_matches("/v1")
        .to_string();
    let model = match &args.model {
        Some(m) => m.clone(),
        None => served_model(&client, &base, args.api_key.as_deref()).await?,
    };
    let setup = Arc::new(Setup {
        args,
        client,
        base,
        model,
        next: AtomicUsize::new(0),
    });
    // Not counted: a clear error now beats N identical failures, and it warms the server up.
    let probe = setup.args.requests; // a prompt no measured request uses
    send(&setup, probe).await.map_err(|e| {
        anyhow!(
            "the test request to {}{} failed: {e}",
            setup.base,
            setup.args.endpoint.path()
        )
    })?;

    let t0 = Instant::now();
    let tasks: Vec<_> = (0..setup.args.clients)
        .map(|_| tokio::spawn(client_loop(setup.clone())))
        .collect();
    let mut outcomes = Vec::with_capacity(setup.args.requests);
    for t in tasks {
        outcomes.extend(t.await.context("a client task panicked")?);
    }
    let report = Report::new(&setup, &outcomes, t0.elapsed().as_secs_f64());
    report.print();
    if let Some(path) = &setup.args.json {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{}", serde_json::to_string(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if report.requests_ok == 0 {
        bail!("every request failed");
    }
    if report.requests_failed > 0 {
        eprintln!(
            "warning: {} of {} requests failed; the figures count only the others",
            report.requests_failed, setup.args.requests
        );
    }
    Ok(())
}

/// The id of the first model the server lists; also tells an unreachable server early.
async fn served_model(client: &reqwest::Client, base: &str, key: Option<&str>) -> Result<String> {
    let url = format!("{base}/v1/models");
    let mut req = client.get(&url).timeout(Duration::from_secs(30));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| anyhow!("cannot reach {url}: {}", error_chain(&e)))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("GET {url}: HTTP {status}: {}", body_message(&text));
    }
    let v: Value = serde_json::from_str(&text).with_context(|| format!("GET {url}: not JSON"))?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("GET {url}: no model listed (pass --model)"))
}

/// Sends requests until the shared count is reached; the outcome of each.
async fn client_loop(setup: Arc<Setup>) -> Vec<Result<Sample, String>> {
    let mut out = Vec::new();
    loop {
        let i = setup.next.fetch_add(1, Ordering::Relaxed);
        if i >= setup.args.requests {
            return out;
        }
        out.push(send(&setup, i).await);
    }
}

/// Request `i`'s prompt: the fixed one, or `prompt_len` words seeded by `seed` and `i`.
fn prompt(args: &Args, i: usize) -> String {
    const WORDS: &[&str] = &[
        "the", "model", "routes", "every", "token", "to", "a", "few", "experts", "while", "cache",
        "blocks", "hold", "keys", "and", "values", "of", "long", "prompts", "river", "stone",
        "light", "garden", "music", "winter", "paper", "engine", "signal", "quiet", "bright",
        "number", "story", "city", "forest", "ocean", "bridge", "window", "market", "teacher",
        "planet", "silver", "morning", "travel", "simple", "history", "friend", "question",
    ];
    if let Some(p) = &args.prompt {
        return p.clone();
    }
    let mut rng = StdRng::seed_from_u64(args.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    (0..args.prompt_len)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

fn body(setup: &Setup, i: usize) -> Value {
    let mut body = json!({
        "model": setup.model,
        "max_tokens": setup.args.max_tokens,
        "temperature": 0.0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let text = prompt(&setup.args, i);
    match setup.args.endpoint {
        Endpoint::Completions => body["prompt"] = json!(text),
        Endpoint::Chat => body["messages"] = json!([{"role": "user", "content": text}]),
    }
    body
}

/// Sends request `i` and times its stream.
async fn send(setup: &Setup, i: usize) -> Result<Sample, String> {
    let start = Instant::now();
    let mut req = setup
        .client
        .post(format!("{}{}", setup.base, setup.args.endpoint.path()))
        .json(&body(setup, i));
    if let Some(k) = &setup.args.api_key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.map_err(|e| error_chain(&e))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(format!("HTTP {status}: {}", body_message(&text)));
    }
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut timer = Timer::default();
    while let Some(bytes) = stream.next().await {
        let bytes = bytes.map_err(|e| format!("stream broken: {}", error_chain(&e)))?;
        let now = start.elapsed().as_secs_f64();
        buf.extend_from_slice(&bytes);
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            if let Some(event) = parse_sse_line(String::from_utf8_lossy(&line).trim_end()) {
                timer.on(event, now)?;
            }
        }
    }
    timer.finish(start.elapsed().as_secs_f64())
}

/// A streamed event, as far as the benchmark cares.
#[derive(Debug, PartialEq)]
enum SseEvent {
    /// A chunk: whether it carries generated text; `(prompt, completion)` tokens if a usage one.
    Chunk {
        content: bool,
        usage: Option<(u64, u64)>,
    },
    Done,
    Error(String),
}

/// One line of an SSE stream; `None` for blank lines, comments and other fields.
fn parse_sse_line(line: &str) -> Option<SseEvent> {
    let data = line.strip_prefix("data:")?.trim();
    if data == "[DONE]" {
        return Some(SseEvent::Done);
    }
    let v: Value = match serde_json::from_str(data) {
        Ok(v) => v,
        Err(e) => return Some(SseEvent::Error(format!("bad chunk ({e}): {data:.200}"))),
    };
    if let Some(err) = v.get("error") {
        return Some(SseEvent::Error(error_message(err)));
    }
    let nonempty = |t: &Value| t.as_str().is_some_and(|s| !s.is_empty());
    let content = v["choices"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| nonempty(&c["text"]) || nonempty(&c["delta"]["content"]))
    });
    let u = &v["usage"];
    let usage = u["completion_tokens"]
        .as_u64()
        .map(|out| (u["prompt_tokens"].as_u64().unwrap_or(0), out));
    Some(SseEvent::Chunk { content, usage })
}

/// One request's measurements; times in seconds.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    ttft: f64,
    itls: Vec<f64>,
    e2e: f64,
    prompt_tokens: u64,
    output_tokens: u64,
}

/// Follows one stream's events.
#[derive(Debug, Default)]
struct Timer {
    first: Option<f64>,
    last: f64,
    itls: Vec<f64>,
    usage: Option<(u64, u64)>,
    done: bool,
}

impl Timer {
    fn on(&mut self, event: SseEvent, now: f64) -> Result<(), String> {
        match event {
            SseEvent::Error(e) => return Err(format!("error event: {e}")),
            SseEvent::Done => self.done = true,
            SseEvent::Chunk { content, usage } => {
                if content {
                    match self.first {
                        None => self.first = Some(now),
                        Some(_) => self.itls.push(now - self.last),
                    }
                    self.last = now;
                }
                self.usage = usage.or(self.usage);
            }
        }
        Ok(())
    }

    fn finish(self, e2e: f64) -> Result<Sample, String> {
        if !self.done {
            return Err("the stream ended before [DONE]".into());
        }
        let (prompt_tokens, output_tokens) = self.usage.ok_or("no usage chunk in the stream")?;
        let ttft = self.first.ok_or("no generated text in the stream")?;
        Ok(Sample {
            ttft,
            itls: self.itls,
            e2e,
            prompt_tokens,
            output_tokens,
        })
    }
}

/// The message of an OpenAI error body, or the body itself.
fn body_message(text: &str) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(v) if v.get("error").is_some() => error_message(&v["error"]),
        _ => format!("{:.200}", text.trim()),
    }
}

fn error_message(err: &Value) -> String {
    err["message"]
        .as_str()
        .map_or_else(|| err.to_string(), str::to_string)
}

/// An error and its causes: reqwest's own message alone hides "connection refused".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Linear interpolation between closest ranks (numpy's default); NaN when empty.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// Mean, p50 and p99 in milliseconds of values in seconds.
fn summary_ms(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let ms = |x: f64| x * 1e3;
    (
        ms(mean),
        ms(percentile(&xs, 50.0)),
        ms(percentile(&xs, 99.0)),
    )
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    endpoint: String,
    clients: usize,
    max_tokens: usize,
    requests_ok: usize,
    requests_failed: usize,
    duration_s: f64,
    req_s: f64,
    input_tokens: u64,
    output_tokens: u64,
    output_tok_s: f64,
    total_tok_s: f64,
    ttft_mean_ms: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    itl_mean_ms: f64,
    itl_p50_ms: f64,
    itl_p99_ms: f64,
    e2e_mean_ms: f64,
    e2e_p50_ms: f64,
    e2e_p99_ms: f64,
    /// Distinct error messages and how many requests failed with each.
    errors: BTreeMap<String, usize>,
}

impl Report {
    fn new(setup: &Setup, outcomes: &[Result<Sample, String>], duration_s: f64) -> Self {
        let args = &setup.args;
        let ok: Vec<&Sample> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        let mut errors = BTreeMap::new();
        for e in outcomes.iter().filter_map(|o| o.as_ref().err()) {
            *errors.entry(e.clone()).or_insert(0) += 1;
        }
        let input_tokens = ok.iter().map(|s| s.prompt_tokens).sum();
        let output_tokens = ok.iter().map(|s| s.output_tokens).sum();
        let (ttft_mean_ms, ttft_p50_ms, ttft_p99_ms) =
            summary_ms(ok.iter().map(|s| s.ttft).collect());
        let (itl_mean_ms, itl_p50_ms, itl_p99_ms) =
            summary_ms(ok.iter().flat_map(|s| s.itls.iter().copied()).collect());
        let (e2e_mean_ms, e2e_p50_ms, e2e_p99_ms) = summary_ms(ok.iter().map(|s| s.e2e).collect());
        Self {
            model: setup.model.clone(),
            endpoint: args.endpoint.path().to_string(),
            clients: args.clients,
            max_tokens: args.max_tokens,
            requests_ok: ok.len(),
            requests_failed: outcomes.len() - ok.len(),
            duration_s,
            req_s: ok.len() as f64 / duration_s,
            input_tokens,
            output_tokens,
            output_tok_s: output_tokens as f64 / duration_s,
            total_tok_s: (input_tokens + output_tokens) as f64 / duration_s,
            ttft_mean_ms,
            ttft_p50_ms,
            ttft_p99_ms,
            itl_mean_ms,
            itl_p50_ms,
            itl_p99_ms,
            e2e_mean_ms,
            e2e_p50_ms,
            e2e_p99_ms,
            errors,
        }
    }

    fn print(&self) {
        let line = |name: &str, value: String| println!("{name:<34}{value:>14}");
        println!(
            "=== serving benchmark: {}, {}, {} clients, {} new tokens per request ===",
            self.model, self.endpoint, self.clients, self.max_tokens
        );
        line(
            "requests ok / failed",
            format!("{} / {}", self.requests_ok, self.requests_failed),
        );
        line("duration (s)", format!("{:.2}", self.duration_s));
        line("request throughput (req/s)", format!("{:.2}", self.req_s));
        line(
            "input / output tokens",
            format!("{} / {}", self.input_tokens, self.output_tokens),
        );
        line(
            "output token throughput (tok/s)",
            format!("{:.1}", self.output_tok_s),
        );
        line(
            "total token throughput (tok/s)",
            format!("{:.1}", self.total_tok_s),
        );
        let ms = |mean: f64, p50: f64, p99: f64| format!("{mean:.1} / {p50:.1} / {p99:.1}");
        line(
            "TTFT mean / p50 / p99 (ms)",
            ms(self.ttft_mean_ms, self.ttft_p50_ms, self.ttft_p99_ms),
        );
        line(
            "ITL mean / p50 / p99 (ms)",
            ms(self.itl_mean_ms, self.itl_p50_ms, self.itl_p99_ms),
        );
        line(
            "E2E mean / p50 / p99 (ms)",
            ms(self.e2e_mean_ms, self.e2e_p50_ms, self.e2e_p99_ms),
        );
        for (e, n) in &self.errors {
            println!("failed {n}x: {e}");
        }
    }
}

/// Run by `cargo test --test serve_bench` (tests/serve_bench.rs includes this file): cargo
/// compiles benchmarks with `cfg(test)` but a harness-less one drops its `#[test]`s.
#[cfg(test)]
mod tests {
    #[allow(unused_imports)] // unused in the benchmark build, where the tests are dropped
    use super::*;

    #[test]
    fn percentile_interpolates_like_numpy() {
        let xs = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&xs, 0.0), 1.0);
        assert_eq!(percentile(&xs, 50.0), 2.5);
        assert!((percentile(&xs, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&xs, 100.0), 4.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn sse_lines_of_both_endpoints() {
        let chunk = |content, usage| Some(SseEvent::Chunk { content, usage });
        assert_eq!(parse_sse_line(""), None);
        assert_eq!(parse_sse_line(": keep-alive"), None);
        assert_eq!(parse_sse_line("data: [DONE]"), Some(SseEvent::Done));
        let text = r#"data: {"choices":[{"text":"Paris","index":0}],"usage":null}"#;
        assert_eq!(parse_sse_line(text), chunk(true, None));
        let empty = r#"data:{"choices":[{"text":"","finish_reason":"length"}]}"#;
        assert_eq!(parse_sse_line(empty), chunk(false, None));
        let role = r#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(parse_sse_line(role), chunk(false, None));
        let delta = r#"data: {"choices":[{"delta":{"content":"Hi"}}]}"#;
        assert_eq!(parse_sse_line(delta), chunk(true, None));
        let usage = r#"data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":16}}"#;
        assert_eq!(parse_sse_line(usage), chunk(false, Some((5, 16))));
        let err = r#"data: {"error":{"message":"engine stopped","type":"server_error"}}"#;
        assert_eq!(
            parse_sse_line(err),
            Some(SseEvent::Error("engine stopped".into()))
        );
        assert!(matches!(
            parse_sse_line("data: {oops"),
            Some(SseEvent::Error(_))
        ));
    }

    #[test]
    fn timer_measures_content_chunks_and_needs_done_and_usage() {
        let chunk = |content, usage| SseEvent::Chunk { content, usage };
        let mut t = Timer::default();
        t.on(chunk(false, None), 0.1).unwrap(); // chat's role chunk: not a token
        t.on(chunk(true, None), 0.5).unwrap();
        t.on(chunk(true, None), 0.75).unwrap();
        t.on(chunk(true, None), 1.0).unwrap();
        t.on(chunk(false, Some((5, 3))), 1.0).unwrap();
        t.on(SseEvent::Done, 1.0).unwrap();
        let s = t.finish(1.1).unwrap();
        assert_eq!(s.ttft, 0.5);
        assert_eq!(s.itls, vec![0.25, 0.25]);
        assert_eq!((s.prompt_tokens, s.output_tokens, s.e2e), (5, 3, 1.1));

        let mut cut = Timer::default();
        cut.on(chunk(true, None), 0.5).unwrap();
        assert!(cut.finish(1.0).unwrap_err().contains("[DONE]"));
        let mut no_usage = Timer::default();
        no_usage.on(chunk(true, None), 0.5).unwrap();
        no_usage.on(SseEvent::Done, 0.6).unwrap();
        assert!(no_usage.finish(1.0).unwrap_err().contains("usage"));
        assert!(Timer::default()
            .on(SseEvent::Error("x".into()), 0.0)
            .is_err());
    }

    #[test]
    fn synthetic_prompts_are_deterministic_and_distinct() {
        let args = Args::parse_from(["serve", "--prompt-len", "12", "--bench"]);
        assert_eq!(prompt(&args, 3), prompt(&args, 3));
        assert_ne!(prompt(&args, 3), prompt(&args, 4));
        assert_eq!(prompt(&args, 0).split(' ').count(), 12);
        let fixed = Args::parse_from(["serve", "--prompt", "Hello there"]);
        assert_eq!(prompt(&fixed, 9), "Hello there");
        assert_eq!(body_message(r#"{"error":{"message":"bad"}}"#), "bad");
        assert_eq!(body_message("Not Found"), "Not Found");
    }
}
