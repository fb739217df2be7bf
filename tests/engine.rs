//! The engine end to end on the shipped tiny checkpoints (f32, CPU): batching invariance,
//! seeded sampling, preemption under a tiny KV budget, cancellation, prefix caching, stop
//! conditions, chunked prefill, logprobs and request validation.
//!
//! Every wait on the engine is bounded, so a stuck engine fails a test instead of hanging it.

mod common;

use candle_core::DType;
use common::*;
use mixserve::engine::{
    Engine, EngineConfig, EngineStats, Event, FinishReason, Request, RequestStream, SamplingParams,
    SchedulerConfig, SubmitError, TokenLogprob, Usage,
};
use mixserve::text::Tokenizer;
use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

const BLOCK_SIZE: usize = 16;
/// Room for every test's requests at once: no preemption.
const ROOMY: usize = 1024;
/// Longest wait for one event before the engine is declared stuck.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the engine's published stats to reach an expected state.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// EOS of both tiny checkpoints (`</s>`).
const EOS: u32 = 2;

// ---------------------------------------------------------------------------------------------
// Engine setup

fn tokenizer(name: &str) -> Tokenizer {
    let dir = model_dir(name);
    Tokenizer::from_files(
        &dir.join("tokenizer.json"),
        Some(&dir.join("tokenizer_config.json")),
        Some(&dir.join("generation_config.json")),
    )
    .unwrap()
}

fn config(num_blocks: usize, prefix_caching: bool) -> EngineConfig {
    EngineConfig {
        scheduler: SchedulerConfig::default(),
        num_blocks,
        block_size: BLOCK_SIZE,
        prefix_caching,
        max_waiting: None,
        kv_cache_dtype: None,
        busy_poll: true,
    }
}

fn with_token_budget(mut config: EngineConfig, max_num_batched_tokens: usize) -> EngineConfig {
    config.scheduler.max_num_batched_tokens = max_num_batched_tokens;
    config
}

fn start(name: &str, config: EngineConfig) -> Engine {
    Engine::start(load_model(name, DType::F32), tokenizer(name), config).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Requests

/// Greedy, exactly `max_tokens` tokens (EOS ignored).
fn greedy(prompt: &[u32], max_tokens: usize) -> Request {
    Request {
        ignore_eos: true,
        ..Request::greedy(prompt.to_vec(), max_tokens)
    }
}

/// The seeded sampling of the acceptance list: temperature 0.8, top-p 0.9, top-k 50.
fn sampled(prompt: &[u32], max_tokens: usize, seed: Option<u64>) -> Request {
    Request {
        sampling: SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            top_k: 50,
            seed,
            ..SamplingParams::default()
        },
        ..greedy(prompt, max_tokens)
    }
}

/// The reference prompts plus three prefixes (37, 150, 300 tokens) of the longest one.
fn varied_prompts(refs: &[RefPrompt]) -> Vec<Vec<u32>> {
    let mut prompts: Vec<Vec<u32>> = refs.iter().map(|r| r.input_ids.clone()).collect();
    for len in [37, 150, 300] {
        prompts.push(refs[4].input_ids[..len].to_vec());
    }
    prompts
}

// ---------------------------------------------------------------------------------------------
// Streams

/// The next event if one is ready (`Pending` if not), without blocking.
fn try_next(stream: &mut RequestStream) -> Poll<Option<Event>> {
    let mut cx = Context::from_waker(Waker::noop());
    let fut = std::pin::pin!(stream.recv());
    fut.poll(&mut cx)
}

/// The next event, `None` once the stream is closed; panics after `timeout`.
fn next_within(stream: &mut RequestStream, timeout: Duration) -> Option<Event> {
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_micros(50);
    loop {
        if let Poll::Ready(event) = try_next(stream) {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "no event from the engine within {timeout:?}"
        );
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(2));
    }
}

fn next(stream: &mut RequestStream) -> Option<Event> {
    next_within(stream, EVENT_TIMEOUT)
}

/// One sample as the client sees it.
#[derive(Debug, Clone, Default, PartialEq)]
struct Sample {
    tokens: Vec<u32>,
    /// Token texts plus the `Finished` text.
    text: String,
    reason: Option<FinishReason>,
    matched_stop: Option<String>,
    logprobs: Vec<Option<TokenLogprob>>,
}

/// A request's events, gathered.
#[derive(Debug, Clone, Default)]
struct Output {
    samples: Vec<Sample>,
    usage: Option<Usage>,
    prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
}

impl Output {
    fn sample(&self) -> &Sample {
        assert_eq!(self.samples.len(), 1, "expected one sample: {self:?}");
        &self.samples[0]
    }

    fn tokens(&self) -> Vec<u32> {
        self.sample().tokens.clone()
    }

    fn usage(&self) -> Usage {
        self.usage.expect("request not done")
    }

    /// Tokens received so far by sample 0.
    fn received(&self) -> usize {
        self.samples.first().map_or(0, |s| s.tokens.len())
    }

    /// Adds one event, checking the protocol's order; returns true for the final `Done`.
    fn record(&mut self, event: Event) -> bool {
        assert!(self.usage.is_none(), "event after Done: {event:?}");
        match event {
            Event::PromptLogprobs(lp) => {
                assert!(self.prompt_logprobs.is_none(), "prompt logprobs sent twice");
                assert!(self.samples.is_empty(), "prompt logprobs after a token");
                self.prompt_logprobs = Some(lp);
            }
            Event::Token {
                index,
                token,
                text,
                logprob,
                ..
            } => {
                let s = self.slot(index);
                assert!(s.reason.is_none(), "token for finished sample {index}");
                s.tokens.push(token);
                s.text += &text;
                s.logprobs.push(logprob);
            }
            Event::Finished {
                index,
                reason,
                text,
                matched_stop,
            } => {
                let s = self.slot(index);
                assert!(s.reason.is_none(), "sample {index} finished twice");
                s.reason = Some(reason);
                s.text += &text;
                s.matched_stop = matched_stop;
            }
            Event::Done(usage) => {
                assert!(
                    self.samples.iter().all(|s| s.reason.is_some()),
                    "Done before every sample finished: {self:?}"
                );
                self.usage = Some(usage);
                return true;
            }
            Event::Error(e) => panic!("request failed: {e}"),
        }
        false
    }

    fn slot(&mut self, index: usize) -> &mut Sample {
        if self.samples.len() <= index {
            self.samples.resize(index + 1, Sample::default());
        }
        &mut self.samples[index]
    }
}

/// Reads events until sample 0 has `n` tokens.
fn read_tokens(stream: &mut RequestStream, out: &mut Output, n: usize) {
    while out.received() < n {
        let event = next(stream).expect("stream closed early");
        assert!(!out.record(event), "request ended before {n} tokens");
    }
}

/// Reads the rest of a request; the stream must close right after `Done`.
fn finish(mut stream: RequestStream, mut out: Output) -> Output {
    while out.usage.is_none() {
        let event = next(&mut stream).expect("stream closed before Done");
        out.record(event);
    }
    assert!(
        next_within(&mut stream, SETTLE_TIMEOUT).is_none(),
        "stream still open after Done"
    );
    out
}

fn drain(stream: RequestStream) -> Output {
    finish(stream, Output::default())
}

fn run(engine: &Engine, request: Request) -> Output {
    drain(engine.submit(request).unwrap())
}

/// Each prompt's greedy tokens, one request at a time on a fresh engine.
fn solo_greedy(name: &str, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    let engine = start(name, config(ROOMY, false));
    prompts
        .iter()
        .map(|p| run(&engine, greedy(p, max_tokens)).tokens())
        .collect()
}

/// Reads several requests to the end at once (round robin, so none waits on another's
/// reader); panics with the engine's stats if they are not all done within `EVENT_TIMEOUT`.
fn drain_all(engine: &Engine, streams: Vec<RequestStream>, what: &str) -> Vec<Output> {
    let mut streams: Vec<Option<RequestStream>> = streams.into_iter().map(Some).collect();
    let mut outs = vec![Output::default(); streams.len()];
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while streams.iter().any(Option::is_some) {
        for (slot, out) in streams.iter_mut().zip(&mut outs) {
            while let Some(stream) = slot {
                match try_next(stream) {
                    Poll::Pending => break,
                    Poll::Ready(None) => panic!("{what}: stream closed before Done: {out:?}"),
                    Poll::Ready(Some(event)) => {
                        if out.record(event) {
                            *slot = None;
                        }
                    }
                }
            }
        }
        if Instant::now() > deadline {
            let stuck: Vec<(usize, Vec<usize>)> = (0..outs.len())
                .filter(|&i| streams[i].is_some())
                .map(|i| (i, outs[i].samples.iter().map(|s| s.tokens.len()).collect()))
                .collect();
            panic!(
                "{what}: requests (index, tokens per sample) {stuck:?} not done after \
                 {EVENT_TIMEOUT:?}; engine: {:?}",
                engine.stats()
            );
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    outs
}

// ---------------------------------------------------------------------------------------------
// Stats

/// Polls the stats (published at the end of each engine step) until `done` holds or
/// `SETTLE_TIMEOUT` passes; returns the last reading.
fn settle(engine: &Engine, done: impl Fn(&EngineStats) -> bool) -> EngineStats {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let s = engine.stats();
        if done(&s) || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn is_idle(s: &EngineStats) -> bool {
    s.free_blocks == s.num_blocks && s.live_sequences == 0 && s.live_requests == 0
}

/// Every block free, no sequence or request left.
fn assert_idle(engine: &Engine, what: &str) -> EngineStats {
    let s = settle(engine, is_idle);
    assert!(is_idle(&s), "{what}: engine still holds resources: {s:?}");
    s
}

// ---------------------------------------------------------------------------------------------
// 1. Batching invariance

/// Eight greedy requests of 6..481 prompt tokens, arriving while others decode (so batches
/// mix prefill chunks and decodes of varying sizes), each give exactly the tokens they give
/// alone, which for the reference prompts are the reference's greedy tokens.
#[test]
fn batching_does_not_change_greedy_outputs() {
    for name in FAMILIES {
        let refs = reference(name);
        let tok = tokenizer(name);
        let prompts = varied_prompts(&refs);
        let solo_engine = start(name, config(ROOMY, false));
        let solo: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| run(&solo_engine, greedy(p, 24)).tokens())
            .collect();
        let solo_steps = assert_idle(&solo_engine, name).steps;
        for (i, r) in refs.iter().enumerate() {
            assert_eq!(solo[i], r.greedy, "{name} prompt {i} alone vs reference");
        }

        // A small token budget: long prompts are prefilled in chunks next to the decodes.
        let engine = start(name, with_token_budget(config(ROOMY, false), 128));
        let mut streams: Vec<Option<RequestStream>> = (0..prompts.len()).map(|_| None).collect();
        let mut outs = vec![Output::default(); prompts.len()];
        // Staggered arrival: short ones first, the longest while they decode, then the rest.
        for i in [0, 5, 1] {
            streams[i] = Some(engine.submit(greedy(&prompts[i], 24)).unwrap());
        }
        read_tokens(streams[0].as_mut().unwrap(), &mut outs[0], 3);
        for i in [4, 7] {
            streams[i] = Some(engine.submit(greedy(&prompts[i], 24)).unwrap());
        }
        read_tokens(streams[5].as_mut().unwrap(), &mut outs[5], 2);
        read_tokens(streams[1].as_mut().unwrap(), &mut outs[1], 1);
        for i in [2, 3, 6] {
            streams[i] = Some(engine.submit(greedy(&prompts[i], 24)).unwrap());
        }
        for (i, stream) in streams.into_iter().enumerate() {
            let out = finish(stream.unwrap(), std::mem::take(&mut outs[i]));
            assert_eq!(
                out.tokens(),
                solo[i],
                "{name} prompt {i} ({} tokens): batched vs alone",
                prompts[i].len()
            );
            assert_eq!(out.sample().reason, Some(FinishReason::Length));
            // The streamed text is the decoded completion (prompt text removed).
            let prompt_text = tok.decode(&prompts[i], true).unwrap();
            let all = tok
                .decode(&[&prompts[i][..], &solo[i]].concat(), true)
                .unwrap();
            assert_eq!(
                Some(out.sample().text.as_str()),
                all.strip_prefix(&prompt_text),
                "{name} prompt {i}: text"
            );
        }
        let s = assert_idle(&engine, name);
        // The requests really shared forward passes.
        assert!(
            s.steps < solo_steps,
            "{name}: {} batched steps vs {solo_steps} alone",
            s.steps
        );
    }
}

/// `--no-busy-poll` (the pool's workers sleep between parallel parts): the reference greedy
/// tokens still, for prompts decoded side by side.
#[test]
fn greedy_outputs_hold_without_busy_polling() {
    for name in FAMILIES {
        let refs = reference(name);
        let engine = start(
            name,
            EngineConfig {
                busy_poll: false,
                ..config(ROOMY, false)
            },
        );
        let streams = refs
            .iter()
            .map(|r| engine.submit(greedy(&r.input_ids, 24)).unwrap())
            .collect();
        let outs = drain_all(&engine, streams, name);
        for (i, (out, r)) in outs.iter().zip(&refs).enumerate() {
            assert_eq!(out.tokens(), r.greedy, "{name} prompt {i}");
        }
        assert_idle(&engine, name);
    }
}

/// With an f16 KV cache (`--kv-cache-dtype f16`) a sequence's greedy tokens are the same
/// alone and among others: what batching shares does not depend on the cache's type.
#[test]
fn batching_does_not_change_greedy_outputs_with_an_f16_kv_cache() {
    let name = FAMILIES[0];
    let prompts = varied_prompts(&reference(name));
    let half = EngineConfig {
        kv_cache_dtype: Some(DType::F16),
        ..config(ROOMY, false)
    };
    let solo_engine = start(name, half.clone());
    let solo: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| run(&solo_engine, greedy(p, 16)).tokens())
        .collect();
    let engine = start(name, with_token_budget(half, 128));
    let streams = prompts
        .iter()
        .map(|p| engine.submit(greedy(p, 16)).unwrap())
        .collect();
    for (i, out) in drain_all(&engine, streams, name).iter().enumerate() {
        assert_eq!(
            out.tokens(),
            solo[i],
            "{name} prompt {i}: batched vs alone, f16 KV"
        );
    }
    assert_idle(&engine, name);
}

// ---------------------------------------------------------------------------------------------
// 2. Seeded sampling

/// A seeded request draws the same tokens alone, again, and inside a busy batch of unseeded
/// and differently seeded requests; another seed draws other tokens.
#[test]
fn seeded_sampling_is_reproducible_in_any_batch() {
    for name in FAMILIES {
        let refs = reference(name);
        let prompt = &refs[1].input_ids;
        let engine = start(name, config(ROOMY, true));
        let alone = run(&engine, sampled(prompt, 24, Some(1234))).tokens();
        assert_ne!(
            alone, refs[1].greedy,
            "{name}: sampling should not be greedy"
        );
        assert_eq!(
            run(&engine, sampled(prompt, 24, Some(1234))).tokens(),
            alone,
            "{name}: same seed alone, twice"
        );

        // Busy: six others (unseeded, other seeds, the same prompt with seed 1235), some
        // mid-generation when the seeded one arrives, some arriving after it.
        let submit = |r: Request| (engine.submit(r).unwrap(), Output::default());
        let mut early = vec![
            submit(sampled(&refs[0].input_ids, 40, None)),
            submit(sampled(&refs[4].input_ids, 30, Some(99))),
            submit(sampled(prompt, 40, Some(1235))),
        ];
        let (s, o) = &mut early[0];
        read_tokens(s, o, 2);
        let mut seeded = submit(sampled(prompt, 24, Some(1234)));
        let mut late = vec![
            submit(sampled(&refs[2].input_ids, 40, None)),
            submit(sampled(&refs[3].input_ids, 40, Some(7))),
            submit(greedy(&refs[4].input_ids[..200], 40)),
        ];
        read_tokens(&mut seeded.0, &mut seeded.1, 1);
        let (s, o) = &mut late[0];
        read_tokens(s, o, 1);
        // The same seed twice in one batch.
        let twin = submit(sampled(prompt, 24, Some(1234)));
        let seeded = finish(seeded.0, seeded.1);
        let twin = finish(twin.0, twin.1);
        let others: Vec<Output> = early
            .into_iter()
            .chain(late)
            .map(|(s, o)| finish(s, o))
            .collect();
        assert_eq!(seeded.tokens(), alone, "{name}: seeded, in a busy batch");
        assert_eq!(twin.tokens(), alone, "{name}: its twin in the same batch");
        assert_ne!(
            others[2].tokens()[..24],
            alone[..],
            "{name}: seed 1235 drew what seed 1234 did"
        );
        assert_idle(&engine, name);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Preemption under a tiny KV budget

/// 16 requests at once under a budget of 8 blocks of 16 tokens (each fits alone) all complete
/// with their unconstrained outputs, through preemption, and give every block back; a request
/// that can never fit is refused at submit.
#[test]
fn tiny_kv_budget_preempts_and_completes_everything() {
    let name = "tiny-mixtral";
    let refs = reference(name);
    let requests: Vec<Request> = (0..16)
        .map(|i| {
            let src = &refs[i % 5].input_ids;
            let prompt = &src[..src.len().min(10 + 4 * i)];
            greedy(prompt, 24 + (i % 3) * 16)
        })
        .collect();
    for r in &requests {
        assert!(r.prompt.len() + r.max_tokens <= 8 * BLOCK_SIZE);
    }
    let roomy = start(name, config(ROOMY, false));
    let expected: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| run(&roomy, r.clone()).tokens())
        .collect();

    for prefix_caching in [false, true] {
        let engine = start(name, config(8, prefix_caching));
        assert_eq!(engine.max_context(), 8 * BLOCK_SIZE);
        let streams: Vec<RequestStream> = requests
            .iter()
            .map(|r| engine.submit(r.clone()).unwrap())
            .collect();
        let outs = drain_all(&engine, streams, "16 requests in 8 blocks");
        for (i, out) in outs.iter().enumerate() {
            assert_eq!(
                out.tokens(),
                expected[i],
                "request {i} under the tiny budget (prefix caching {prefix_caching})"
            );
            assert_eq!(out.usage().completion_tokens, requests[i].max_tokens);
        }
        let s = assert_idle(&engine, "after the tiny-budget run");
        assert!(s.preemptions > 0, "no preemption happened: {s:?}");
        assert_eq!(s.finished_requests, 16);

        // One request needing all 128 tokens fits; one more token never will.
        let full = greedy(&refs[4].input_ids[..100], 28);
        assert_eq!(
            run(&engine, full.clone()).tokens(),
            run(&roomy, full).tokens(),
            "a request filling the whole cache"
        );
        match engine.submit(greedy(&refs[4].input_ids[..100], 29)) {
            Err(SubmitError::Invalid(msg)) => {
                assert!(msg.contains("KV cache"), "message: {msg}")
            }
            Err(e) => panic!("wrong error for an oversized request: {e}"),
            Ok(_) => panic!("a request larger than the KV cache was accepted"),
        }
        assert_idle(&engine, "after the oversized request");
    }
}

/// Compares what the client sees of two runs of the same request: tokens, text and finish
/// reasons exactly, prompt logprobs by token and (to rounding) value.
fn assert_same_output(got: &Output, want: &Output, what: &str) {
    assert_eq!(got.samples.len(), want.samples.len(), "{what}: samples");
    for (k, (g, w)) in got.samples.iter().zip(&want.samples).enumerate() {
        assert_eq!(g.tokens, w.tokens, "{what}: sample {k} tokens");
        assert_eq!(g.text, w.text, "{what}: sample {k} text");
        assert_eq!(g.reason, w.reason, "{what}: sample {k} finish reason");
    }
    assert_eq!(
        got.usage().completion_tokens,
        want.usage().completion_tokens,
        "{what}"
    );
    match (&got.prompt_logprobs, &want.prompt_logprobs) {
        (None, None) => {}
        (Some(g), Some(w)) => {
            assert_eq!(g.len(), w.len(), "{what}: prompt logprobs entries");
            for (i, (g, w)) in g.iter().zip(w).enumerate() {
                match (g, w) {
                    (None, None) => {}
                    (Some(g), Some(w)) => {
                        assert_eq!(g.token, w.token, "{what}: prompt token {i}");
                        assert!(
                            (g.logprob - w.logprob).abs() < 1e-4,
                            "{what}: prompt token {i}: {g:?} vs {w:?}"
                        );
                    }
                    _ => panic!("{what}: prompt logprob {i}: {g:?} vs {w:?}"),
                }
            }
        }
        (g, w) => panic!("{what}: prompt logprobs {g:?} vs {w:?}"),
    }
}

/// A request gathering prompt logprobs over a chunked prefill (32-token steps), preempted
/// mid-prompt again and again by an older decode that needs its blocks, still reports exactly
/// one entry per prompt token, equal to its unconstrained run.
#[test]
fn preemption_mid_prefill_restarts_prompt_logprobs() {
    let name = "tiny-mixtral";
    let long = &reference(name)[4].input_ids;
    // The scored prompt (80 tokens, 5 blocks) is admitted while the decode holds 3 of the 8
    // blocks; 8 tokens a step make its prefill take ~10 steps, during which the decode needs
    // a 4th block, so the scored request is preempted mid-prefill.
    let decode = greedy(&long[..47], 60);
    let scored = Request {
        prompt_logprobs: Some(2),
        ..greedy(&long[..80], 4)
    };
    let roomy = start(name, config(ROOMY, false));
    let want = [run(&roomy, decode.clone()), run(&roomy, scored.clone())];
    for prefix_caching in [false, true] {
        let engine = start(name, with_token_budget(config(8, prefix_caching), 8));
        let streams = vec![
            engine.submit(decode.clone()).unwrap(),
            engine.submit(scored.clone()).unwrap(),
        ];
        let outs = drain_all(&engine, streams, "decode + prompt logprobs in 8 blocks");
        for (k, (got, want)) in outs.iter().zip(&want).enumerate() {
            let what = format!("request {k}, prefix caching {prefix_caching}");
            assert_same_output(got, want, &what);
        }
        let s = assert_idle(&engine, "after the prompt-logprobs run");
        assert!(s.preemptions > 0, "no preemption happened: {s:?}");
    }
}

/// The second sample of an n = 2 request waits for blocks while holding its share of the
/// prompt's blocks; a request preempted ahead of it in the queue, which fits the cache alone,
/// must still complete (and so must the n = 2 request), with their unconstrained outputs.
#[test]
fn waiting_forked_sample_does_not_stall_the_queue() {
    let name = "tiny-mixtral";
    let refs = reference(name);
    let forked = Request {
        n: 2,
        ..sampled(&refs[3].input_ids[..40], 30, Some(5))
    };
    // 110 tokens: 7 of the 8 blocks, one more than the fork's 2 shared blocks leave.
    let big = greedy(&refs[4].input_ids[..90], 20);
    let roomy = start(name, config(ROOMY, false));
    let want = [run(&roomy, forked.clone()), run(&roomy, big.clone())];
    let engine = start(name, with_token_budget(config(8, false), 32));
    // Submitted together: `big` is admitted before the fork and preempted after it.
    let streams = vec![engine.submit(forked).unwrap(), engine.submit(big).unwrap()];
    let outs = drain_all(
        &engine,
        streams,
        "n = 2 request + 110-token request in 8 blocks",
    );
    for (k, (got, want)) in outs.iter().zip(&want).enumerate() {
        assert_same_output(got, want, &format!("request {k}"));
    }
    assert_idle(&engine, "after the fork run");
}

// ---------------------------------------------------------------------------------------------
// 4. Cancellation

/// Dropping streams mid-generation frees their blocks, sequences and requests.
#[test]
fn dropped_streams_free_everything() {
    let name = "tiny-mixtral";
    let refs = reference(name);
    let engine = start(name, config(64, false));
    let prompts = [
        refs[3].input_ids.clone(),
        refs[4].input_ids[..200].to_vec(),
        refs[1].input_ids.clone(),
        refs[2].input_ids.clone(),
    ];
    let mut streams: Vec<RequestStream> = prompts
        .iter()
        .map(|p| engine.submit(greedy(p, 500)).unwrap())
        .collect();
    for s in &mut streams {
        read_tokens(s, &mut Output::default(), 3);
    }
    // Every request has produced a token since all four were in: they hold blocks now.
    let busy = engine.stats();
    assert_eq!(busy.live_requests, 4, "{busy:?}");
    assert_eq!(busy.live_sequences, 4, "{busy:?}");
    assert!(busy.free_blocks < busy.num_blocks, "{busy:?}");

    streams.drain(..2);
    let s = settle(&engine, |s| s.live_requests == 2 && s.live_sequences == 2);
    assert_eq!((s.live_requests, s.live_sequences), (2, 2), "{s:?}");
    drop(streams);
    let s = assert_idle(&engine, "after dropping every stream");
    assert_eq!((s.aborted_requests, s.finished_requests), (4, 0), "{s:?}");

    // Under a budget of 8 blocks: running, preempted and waiting requests dropped while the
    // first one generates; it still completes as it would alone.
    for prefix_caching in [false, true] {
        let engine = start(name, config(8, prefix_caching));
        let mut streams: Vec<RequestStream> = (0..12)
            .map(|i| {
                engine
                    .submit(greedy(&refs[4].input_ids[..10 + 5 * i], 60))
                    .unwrap()
            })
            .collect();
        let mut first_stream = streams.remove(0);
        let mut first = Output::default();
        read_tokens(&mut first_stream, &mut first, 2);
        drop(streams);
        let first = finish(first_stream, first);
        assert_eq!(
            first.tokens(),
            solo_greedy(name, &[refs[4].input_ids[..10].to_vec()], 60)[0]
        );
        let s = assert_idle(&engine, "after dropping queued and running requests");
        assert_eq!(
            (s.aborted_requests, s.finished_requests),
            (11, 1),
            "prefix caching {prefix_caching}: {s:?}"
        );
    }
}

/// 500 short requests, a third dropped at once, a third after one token, a third (some with
/// n = 2) read to the end, leave nothing behind; every request is counted once as finished or
/// aborted. Prefix caching is on: cached-but-unused blocks count as free.
#[test]
fn five_hundred_requests_leave_nothing_behind() {
    let name = "tiny-mixtral";
    let refs = reference(name);
    let engine = start(name, config(64, true));
    let long = &refs[4].input_ids;
    const MAX_TOKENS: usize = 6;
    let mut completed = 0;
    for wave in 0..50 {
        let mut after_one = Vec::new();
        let mut to_end = Vec::new();
        for j in 0..10 {
            let i = wave * 10 + j;
            let prompt = &long[..5 + i % 40];
            let mut request = if i % 7 == 0 {
                Request {
                    n: 2,
                    ..sampled(prompt, MAX_TOKENS, Some(i as u64))
                }
            } else {
                greedy(prompt, MAX_TOKENS)
            };
            request.ignore_eos = true;
            let stream = engine.submit(request.clone()).unwrap();
            match i % 3 {
                0 => drop(stream),
                1 => after_one.push(stream),
                _ => to_end.push((stream, request.n)),
            }
        }
        for mut stream in after_one {
            let mut out = Output::default();
            read_tokens(&mut stream, &mut out, 1);
        }
        for (stream, n) in to_end {
            let out = drain(stream);
            assert_eq!(out.samples.len(), n);
            assert_eq!(out.usage().completion_tokens, n * MAX_TOKENS);
            completed += 1;
        }
    }
    let s = settle(&engine, |s| {
        is_idle(s) && s.finished_requests + s.aborted_requests == 500
    });
    assert!(is_idle(&s), "engine still holds resources: {s:?}");
    assert_eq!(s.finished_requests + s.aborted_requests, 500, "{s:?}");
    assert!(s.finished_requests >= completed, "{s:?}");
    assert!(s.aborted_requests > 0, "{s:?}");
}

// ---------------------------------------------------------------------------------------------
// 5. Prefix caching

/// Requests sharing prompt 4's first 400 tokens (25 full blocks) take them from the cache,
/// whether the first holder has finished or is still running, compute only the rest, and
/// produce what they produce without a prefix cache.
#[test]
fn prefix_cache_reuses_shared_prefixes() {
    for name in FAMILIES {
        let refs = reference(name);
        let shared = &refs[4].input_ids[..400];
        // Different tails (BOS dropped), whose first tokens differ.
        let prompts: Vec<Vec<u32>> = (0..4)
            .map(|k| [shared, &refs[k].input_ids[1..]].concat())
            .collect();
        let expected = solo_greedy(name, &prompts, 12);

        let engine = start(name, config(ROOMY, true));
        let first = run(&engine, greedy(&prompts[0], 12));
        assert_eq!(first.tokens(), expected[0], "{name}: first request");
        assert_eq!(first.usage().cached_tokens, 0, "{name}: nothing cached yet");

        let before = settle(&engine, is_idle);
        let second = run(&engine, greedy(&prompts[1], 12));
        let after = settle(&engine, is_idle);
        let usage = second.usage();
        assert_eq!(usage.cached_tokens, 400, "{name}: {usage:?}");
        assert_eq!(usage.prompt_tokens, prompts[1].len());
        let computed = after.computed_prompt_tokens - before.computed_prompt_tokens;
        assert_eq!(
            computed as usize,
            prompts[1].len() - 400,
            "{name}: prompt tokens computed for the second request"
        );
        assert_eq!(
            after.cached_prompt_tokens - before.cached_prompt_tokens,
            400,
            "{name}"
        );
        assert_eq!(second.tokens(), expected[1], "{name}: cached vs uncached");

        // Sharing blocks that another running request still holds.
        let mut holder = engine.submit(greedy(&prompts[2], 12)).unwrap();
        let mut held = Output::default();
        read_tokens(&mut holder, &mut held, 1);
        let sharer = run(&engine, greedy(&prompts[3], 12));
        let held = finish(holder, held);
        assert_eq!(held.usage().cached_tokens, 400, "{name}");
        assert_eq!(sharer.usage().cached_tokens, 400, "{name}");
        assert_eq!(held.tokens(), expected[2], "{name}: holder");
        assert_eq!(sharer.tokens(), expected[3], "{name}: sharer");

        // An identical prompt of 481 tokens: all 30 full blocks hit, only the last token is
        // computed, and the output is still the reference's.
        let whole = &refs[4];
        let before = run(&engine, greedy(&whole.input_ids, 24));
        let again = run(&engine, greedy(&whole.input_ids, 24));
        assert_eq!(before.tokens(), whole.greedy, "{name}");
        assert_eq!(again.usage().cached_tokens, 480, "{name}");
        assert_eq!(again.tokens(), whole.greedy, "{name}: full prefix hit");
        assert_idle(&engine, name);
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Stop conditions, max/min tokens, n

/// A stop string that starts inside one token and ends inside a later one ends the output
/// right before it.
#[test]
fn stop_string_across_tokens() {
    for name in FAMILIES {
        let refs = reference(name);
        let engine = start(name, config(ROOMY, false));
        for (p, r) in refs.iter().enumerate().take(2) {
            // The text of the first k tokens, k = 1..=24, without stop strings.
            let cum: Vec<String> = (1..=24)
                .map(|k| run(&engine, greedy(&r.input_ids, k)).sample().text.clone())
                .collect();
            let full = &cum[23];
            // Token j's text is full[cum[j - 1].len()..cum[j].len()]; the stop string is its
            // last two characters and the first two of token j + 1 (each has at least three,
            // so the stop string starts and ends strictly inside them).
            let token_text = |j: usize| {
                let start = cum[j - 1].len();
                (full.starts_with(&cum[j - 1]) && full.starts_with(&cum[j]))
                    .then(|| (start, &full[start..cum[j].len()]))
            };
            let (j, stop, at) = (1..23)
                .find_map(|j| {
                    let ((start, own), (next_start, next)) = (token_text(j)?, token_text(j + 1)?);
                    if own.chars().count() < 3 || next.chars().count() < 3 {
                        return None;
                    }
                    let from = start + own.char_indices().rev().nth(1)?.0;
                    let to = next_start + next.char_indices().nth(2)?.0;
                    let stop = full[from..to].to_string();
                    (full.find(&stop) == Some(from)).then_some((j, stop, from))
                })
                .unwrap_or_else(|| panic!("{name} prompt {p}: no stop string candidate"));
            let out = run(
                &engine,
                Request {
                    stop: vec!["\u{1}never".into(), stop.clone()],
                    ..greedy(&r.input_ids, 24)
                },
            );
            let s = out.sample();
            assert_eq!(s.text, full[..at], "{name} prompt {p}: stop {stop:?}");
            assert_eq!(s.reason, Some(FinishReason::Stop), "{name} prompt {p}");
            assert_eq!(s.matched_stop.as_deref(), Some(stop.as_str()));
            assert_eq!(s.tokens, r.greedy[..j + 2], "{name} prompt {p}: tokens");
            assert_eq!(out.usage().completion_tokens, j + 2);
        }
        assert_idle(&engine, name);
    }
}

/// Empty stop strings are ignored (as the engine documents); they must not shift which stop
/// string is reported as matched.
#[test]
fn empty_stop_string_does_not_shift_matched_stop() {
    let name = "tiny-mixtral";
    let refs = reference(name);
    let engine = start(name, config(ROOMY, false));
    // The reference greedy text of prompt 0 begins "ugh отно Kent kinda".
    let plain = run(&engine, greedy(&refs[0].input_ids, 24));
    let at = plain
        .sample()
        .text
        .find(" Kent")
        .expect("\" Kent\" in the greedy text");
    let out = run(
        &engine,
        Request {
            stop: vec!["".into(), " Kent".into()],
            ..greedy(&refs[0].input_ids, 24)
        },
    );
    let s = out.sample();
    assert_eq!(s.text, plain.sample().text[..at]);
    assert_eq!(s.reason, Some(FinishReason::Stop));
    assert_eq!(s.matched_stop.as_deref(), Some(" Kent"), "{s:?}");
}

/// A stop token ends the sample (its text left out); min_tokens holds EOS back; max_tokens
/// ends with `length`; n = 3 gives three finished, reproducible samples.
#[test]
fn stop_tokens_min_tokens_max_tokens_and_n() {
    for name in FAMILIES {
        let refs = reference(name);
        let tok = tokenizer(name);
        let engine = start(name, config(ROOMY, true));
        let r = &refs[0];
        let prompt = &r.input_ids;
        assert!(
            !r.greedy.contains(&EOS),
            "{name}: the greedy output has EOS"
        );

        // Stop token: the fifth greedy token.
        let stop_id = r.greedy[4];
        assert!(!r.greedy[..4].contains(&stop_id));
        let four = run(&engine, greedy(prompt, 4)).sample().text.clone();
        let out = run(
            &engine,
            Request {
                stop_token_ids: vec![stop_id],
                ..greedy(prompt, 24)
            },
        );
        let s = out.sample();
        assert_eq!(s.tokens, r.greedy[..5], "{name}: stop token");
        assert_eq!(s.text, four, "{name}: the stop token's text is not output");
        assert_eq!(s.reason, Some(FinishReason::Stop));
        assert_eq!(s.matched_stop, tok.id_to_token(stop_id));

        // EOS made overwhelmingly likely: it ends the sample at once, or after min_tokens.
        let eos_likely = |min_tokens: usize, ignore_eos: bool| Request {
            min_tokens,
            ignore_eos,
            sampling: SamplingParams {
                logit_bias: [(EOS, 100.0)].into(),
                ..SamplingParams::greedy()
            },
            ..Request::greedy(prompt.clone(), 20)
        };
        let out = run(&engine, eos_likely(0, false));
        assert_eq!(out.tokens(), [EOS], "{name}: EOS at once");
        assert_eq!(out.sample().reason, Some(FinishReason::Stop));
        assert_eq!(out.sample().text, "");
        let out = run(&engine, eos_likely(5, false));
        let s = out.sample();
        assert_eq!(s.tokens.len(), 6, "{name}: min_tokens 5 then EOS: {s:?}");
        assert!(!s.tokens[..5].contains(&EOS), "{name}: {s:?}");
        assert_eq!(s.tokens[5], EOS);
        assert_eq!(s.reason, Some(FinishReason::Stop));
        let out = run(
            &engine,
            Request {
                max_tokens: 3,
                ..eos_likely(0, true)
            },
        );
        assert_eq!(out.tokens(), [EOS; 3], "{name}: ignore_eos");
        assert_eq!(out.sample().reason, Some(FinishReason::Length));

        // max_tokens, EOS not ignored.
        let out = run(&engine, Request::greedy(prompt.clone(), 7));
        assert_eq!(out.tokens(), r.greedy[..7], "{name}: max_tokens");
        assert_eq!(out.sample().reason, Some(FinishReason::Length));
        assert_eq!(out.sample().matched_stop, None);
        assert_eq!(
            out.usage(),
            Usage {
                prompt_tokens: prompt.len(),
                completion_tokens: 7,
                cached_tokens: 0
            }
        );

        // n = 3 with a seed.
        let three = || Request {
            n: 3,
            ignore_eos: false,
            ..sampled(&refs[3].input_ids, 10, Some(42))
        };
        let out = run(&engine, three());
        assert_eq!(out.samples.len(), 3, "{name}: {out:?}");
        for (i, s) in out.samples.iter().enumerate() {
            assert!(!s.tokens.is_empty(), "{name}: sample {i} has no token");
            assert!(s.reason.is_some(), "{name}: sample {i} not finished");
        }
        let total: usize = out.samples.iter().map(|s| s.tokens.len()).sum();
        assert_eq!(out.usage().completion_tokens, total, "{name}");
        assert_eq!(out.usage().prompt_tokens, refs[3].input_ids.len());
        let tokens: Vec<&Vec<u32>> = out.samples.iter().map(|s| &s.tokens).collect();
        assert!(
            tokens[0] != tokens[1] || tokens[1] != tokens[2],
            "{name}: three identical samples"
        );
        let again = run(&engine, three());
        assert_eq!(
            again.samples, out.samples,
            "{name}: n = 3 with a seed, twice"
        );
        assert_idle(&engine, name);
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Chunked prefill

/// With a 64-token step budget a 481-token prompt is prefilled in chunks while four requests
/// keep decoding: they receive tokens between its submission and its first token, and all five
/// outputs equal their solo runs.
#[test]
fn chunked_prefill_keeps_decodes_going() {
    for name in FAMILIES {
        let refs = reference(name);
        let decoders: Vec<Vec<u32>> = refs[..4].iter().map(|r| r.input_ids.clone()).collect();
        let long = refs[4].input_ids.clone();
        let solo_engine = start(name, config(ROOMY, false));
        let solo: Vec<Vec<u32>> = decoders
            .iter()
            .map(|p| run(&solo_engine, greedy(p, 40)).tokens())
            .chain([run(&solo_engine, greedy(&long, 8)).tokens()])
            .collect();
        drop(solo_engine);

        let engine = start(name, with_token_budget(config(ROOMY, false), 64));
        let mut streams: Vec<RequestStream> = decoders
            .iter()
            .map(|p| engine.submit(greedy(p, 40)).unwrap())
            .collect();
        let mut outs = vec![Output::default(); 5];
        for (s, o) in streams.iter_mut().zip(&mut outs) {
            read_tokens(s, o, 2);
        }
        streams.push(engine.submit(greedy(&long, 8)).unwrap());

        // Poll all five streams, counting the decoders' tokens seen before the long
        // request's first token.
        let mut between = [0usize; 4];
        let mut done = [false; 5];
        let mut long_started = false;
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while !done.iter().all(|&d| d) {
            assert!(Instant::now() < deadline, "{name}: engine stuck");
            for k in 0..5 {
                while !done[k] {
                    let Poll::Ready(event) = try_next(&mut streams[k]) else {
                        break;
                    };
                    let event = event.expect("stream closed before Done");
                    if matches!(event, Event::Token { .. }) {
                        if k == 4 {
                            long_started = true;
                        } else if !long_started {
                            between[k] += 1;
                        }
                    }
                    done[k] = outs[k].record(event);
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        for (k, n) in between.iter().enumerate() {
            assert!(
                *n >= 4,
                "{name}: decoder {k} got only {n} tokens while the long prompt was prefilled \
                 ({between:?})"
            );
        }
        for (k, out) in outs.iter().enumerate() {
            assert_eq!(out.tokens(), solo[k], "{name}: request {k} vs alone");
        }
        assert_idle(&engine, name);
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Logprobs

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + row
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&l| l as f64 - lse).collect()
}

/// Alternatives sorted descending, the entry's own logprob <= 0 and no better than the best.
fn check_logprob(lp: &TokenLogprob, token: u32, top_n: usize, what: &str) {
    assert_eq!(lp.token, token, "{what}");
    assert!(
        lp.logprob <= 0.0 && lp.logprob.is_finite(),
        "{what}: {lp:?}"
    );
    assert_eq!(lp.top.len(), top_n, "{what}: {lp:?}");
    assert!(
        lp.top.windows(2).all(|w| w[0].1 >= w[1].1),
        "{what}: {lp:?}"
    );
    assert!(lp.top.iter().all(|t| t.1 <= 0.0), "{what}: {lp:?}");
    if let Some(best) = lp.top.first() {
        assert!(lp.logprob <= best.1, "{what}: {lp:?}");
    }
}

/// Greedy tokens' logprobs with 5 alternatives (the chosen token first, matching the
/// reference logits); prompt logprobs, one per prompt token, the first `None`, matching the
/// reference, also when the prompt is prefilled in chunks or already in the prefix cache.
#[test]
fn logprobs_and_prompt_logprobs() {
    let name = "tiny-mixtral";
    let refs = reference(name);
    let engine = start(name, with_token_budget(config(ROOMY, true), 64));
    for (p, r) in refs.iter().enumerate() {
        // Two passes: the second finds the prompt in the prefix cache.
        for pass in 0..2 {
            let what = format!("prompt {p} pass {pass}");
            let out = run(
                &engine,
                Request {
                    logprobs: Some(5),
                    prompt_logprobs: Some(2),
                    ..greedy(&r.input_ids, 6)
                },
            );
            let s = out.sample();
            assert_eq!(s.tokens, r.greedy[..6], "{what}");
            assert_eq!(s.logprobs.len(), 6, "{what}");
            for (k, lp) in s.logprobs.iter().enumerate() {
                let lp = lp.as_ref().expect("logprobs asked for");
                check_logprob(lp, s.tokens[k], 5, &format!("{what} token {k}"));
                assert_eq!(lp.top[0], (lp.token, lp.logprob), "{what} token {k}");
            }
            let rows: Vec<Vec<f32>> = r.logits.to_vec2().unwrap();
            let last = log_softmax(rows.last().unwrap());
            let first = s.logprobs[0].as_ref().unwrap().logprob as f64;
            assert!((first - last[s.tokens[0] as usize]).abs() < 2e-3, "{what}");

            let plp = out.prompt_logprobs.as_ref().expect("prompt logprobs");
            assert_eq!(plp.len(), r.input_ids.len(), "{what}");
            assert!(plp[0].is_none(), "{what}");
            for (i, lp) in plp.iter().enumerate().skip(1) {
                let lp = lp
                    .as_ref()
                    .unwrap_or_else(|| panic!("{what}: entry {i} missing"));
                check_logprob(lp, r.input_ids[i], 2, &format!("{what} prompt token {i}"));
                // Logits at position i - 1 predict token i.
                if let Some(row) = r.logit_positions.iter().position(|&q| q == i - 1) {
                    let want = log_softmax(&rows[row])[r.input_ids[i] as usize];
                    assert!(
                        (lp.logprob as f64 - want).abs() < 2e-3,
                        "{what} prompt token {i}: {} vs {want}",
                        lp.logprob
                    );
                }
            }
            // Prompt logprobs need every position computed: no prefix-cache hit.
            assert_eq!(out.usage().cached_tokens, 0, "{what}");
        }
    }
    // Without alternatives: the chosen token's logprob only.
    let out = run(
        &engine,
        Request {
            logprobs: Some(0),
            ..greedy(&refs[0].input_ids, 3)
        },
    );
    for lp in &out.sample().logprobs {
        let lp = lp.as_ref().unwrap();
        assert!(lp.top.is_empty() && lp.logprob <= 0.0, "{lp:?}");
    }
    // Not asked for: none.
    let out = run(&engine, greedy(&refs[0].input_ids, 3));
    assert!(out.sample().logprobs.iter().all(Option::is_none));
    assert!(out.prompt_logprobs.is_none());
    assert_idle(&engine, name);
}

// ---------------------------------------------------------------------------------------------
// 9. Validation

fn invalid(engine: &Engine, request: Request, needle: &str) {
    match engine.submit(request) {
        Err(SubmitError::Invalid(msg)) => {
            assert!(msg.contains(needle), "{needle:?} not in {msg:?}")
        }
        Err(e) => panic!("expected Invalid mentioning {needle:?}, got {e:?}"),
        Ok(_) => panic!("accepted a request that should mention {needle:?}"),
    }
}

/// Requests that can never be served are refused at submit with a message naming the
/// problem; a full queue refuses with QueueFull; a stopped engine with ShutDown.
#[test]
fn invalid_requests_are_refused_at_submit() {
    let name = "tiny-mixtral";
    let engine = start(name, config(ROOMY, true));
    assert_eq!(engine.max_context(), 4096);
    let ok = || greedy(&[1, 415, 5565], 4);
    invalid(&engine, greedy(&[], 4), "empty");
    invalid(&engine, greedy(&[1, 32000], 4), "vocabulary");
    invalid(&engine, greedy(&[1, 2, 3], 4094), "context length");
    invalid(&engine, Request { n: 0, ..ok() }, "n must");
    invalid(
        &engine,
        Request {
            logprobs: Some(21),
            ..ok()
        },
        "logprobs",
    );
    invalid(
        &engine,
        Request {
            prompt_logprobs: Some(21),
            ..ok()
        },
        "prompt_logprobs",
    );
    let mut cold = ok();
    cold.sampling.temperature = -1.0;
    invalid(&engine, cold, "temperature");
    let mut narrow = ok();
    narrow.sampling.top_p = 0.0;
    invalid(&engine, narrow, "top_p");
    invalid(
        &engine,
        Request {
            min_tokens: 5,
            ..ok()
        },
        "min_tokens",
    );
    invalid(
        &engine,
        Request {
            stop_token_ids: vec![40000],
            ..ok()
        },
        "stop token id",
    );
    let mut biased = ok();
    biased.sampling.logit_bias.insert(32000, 1.0);
    invalid(&engine, biased, "logit_bias");
    // The boundary itself is fine.
    drop(engine.submit(greedy(&[1, 2, 3], 4093)).unwrap());
    assert_eq!(run(&engine, ok()).tokens().len(), 4);
    assert_idle(&engine, name);

    let full = start(
        name,
        EngineConfig {
            max_waiting: Some(0),
            ..config(64, true)
        },
    );
    match full.submit(ok()) {
        Err(SubmitError::QueueFull(_)) => {}
        Err(e) => panic!("expected QueueFull, got {e:?}"),
        Ok(_) => panic!("max_waiting 0 accepted a request"),
    }

    engine.shutdown();
    assert!(matches!(engine.submit(ok()), Err(SubmitError::ShutDown)));
}
