//! The OpenAI-compatible HTTP server end to end: the real router and engine on the shipped
//! tiny Mixtral (f32, CPU), served in-process on an ephemeral port and driven over HTTP with
//! reqwest, as a client would. Covers health and models, completions and chat (plain and
//! streamed), the error contract, cleanup of abandoned requests, /metrics and graceful shutdown.
//!
//! Every wait is bounded, so a stuck server fails a test instead of hanging it.

mod common;

use candle_core::DType;
use common::*;
use mixserve::engine::{Engine, EngineConfig, EngineStats, SchedulerConfig};
use mixserve::server::{self, AppState, ServerConfig, DEFAULT_BODY_LIMIT};
use mixserve::text::Tokenizer;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const MODEL: &str = "tiny-mixtral";
/// `/v1/models` id and the `model` field clients send.
const SERVED: &str = "tiny-mixtral";
const PROMPT0: &str = "The capital of France is";
const PROMPT1: &str = "Mixture of experts routes each token to";
/// The tiny checkpoint's context (`max_position_embeddings`); the KV budget below is larger.
const MAX_CONTEXT: usize = 4096;
/// Longest any single HTTP exchange may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// How soon an abandoned request must be gone from the engine.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// Server setup

struct Options {
    api_key: Option<String>,
    body_limit: usize,
    max_waiting: Option<usize>,
    /// Start the engine (and `set_engine`) before returning.
    engine: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            api_key: None,
            body_limit: DEFAULT_BODY_LIMIT,
            max_waiting: None,
            engine: true,
        }
    }
}

/// A server on 127.0.0.1:<ephemeral>, its state, and a shutdown trigger.
struct TestServer {
    base: String,
    state: Arc<AppState>,
    client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

fn tokenizer() -> Tokenizer {
    let dir = model_dir(MODEL);
    Tokenizer::from_files(
        &dir.join("tokenizer.json"),
        Some(&dir.join("tokenizer_config.json")),
        Some(&dir.join("generation_config.json")),
    )
    .unwrap()
}

fn start_engine(max_waiting: Option<usize>) -> Arc<Engine> {
    let config = EngineConfig {
        scheduler: SchedulerConfig::default(),
        num_blocks: 512,
        block_size: 16,
        prefix_caching: true,
        max_waiting,
        kv_cache_dtype: None,
        busy_poll: true,
    };
    Arc::new(Engine::start(load_model(MODEL, DType::F32), tokenizer(), config).unwrap())
}

fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder().timeout(timeout).build().unwrap()
}

impl TestServer {
    async fn start(opts: Options) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = AppState::new(ServerConfig {
            served_name: SERVED.into(),
            api_key: opts.api_key,
            body_limit: opts.body_limit,
        });
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(listener, state.clone(), async move {
            let _ = rx.await;
        }));
        let server = Self {
            base,
            state,
            client: client(CLIENT_TIMEOUT),
            shutdown: Some(tx),
            task: Some(task),
        };
        if opts.engine {
            let max_waiting = opts.max_waiting;
            let engine = tokio::task::spawn_blocking(move || start_engine(max_waiting))
                .await
                .unwrap();
            server.state.set_engine(engine);
        }
        server
    }

    async fn new() -> Self {
        Self::start(Options::default()).await
    }

    fn engine(&self) -> &Arc<Engine> {
        self.state.engine_handle().expect("no engine")
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let resp = self.client.get(self.url(path)).send().await.unwrap();
        let status = resp.status();
        (status, resp.text().await.unwrap())
    }

    async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        let (status, body) = self.get(path).await;
        (status, parse(&body))
    }

    /// POSTs a JSON body; the status and the JSON answer.
    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.post_raw(path, body.to_string()).await
    }

    async fn post_raw(&self, path: &str, body: String) -> (StatusCode, Value) {
        let resp = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, parse(&resp.text().await.unwrap()))
    }

    /// POSTs and expects 200 (printing the error body otherwise).
    async fn ok(&self, path: &str, body: Value) -> Value {
        let (status, v) = self.post(path, body).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    }

    /// A streamed request read to the end: the JSON chunks before `data: [DONE]`.
    async fn stream(&self, path: &str, body: Value) -> Vec<Value> {
        let resp = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ctype.starts_with("text/event-stream"), "{ctype}");
        sse_chunks(&resp.text().await.unwrap())
    }

    /// Waits until the engine holds no request and every KV block is free again.
    async fn wait_idle(&self) -> EngineStats {
        let engine = self.engine().clone();
        let deadline = Instant::now() + CLEANUP_TIMEOUT;
        loop {
            let s = engine.stats();
            let idle = s.running == 0
                && s.waiting == 0
                && s.live_requests == 0
                && s.free_blocks == s.num_blocks;
            if idle {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the engine still holds work {CLEANUP_TIMEOUT:?} later: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, StatusCode::OK);
        body
    }
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// Splits an SSE body into its JSON chunks, checking the framing: every event is exactly
/// `data: <payload>\n\n` and the last one is `data: [DONE]`.
fn sse_chunks(body: &str) -> Vec<Value> {
    assert!(
        body.ends_with("data: [DONE]\n\n"),
        "no final [DONE]: {body:?}"
    );
    let events: Vec<&str> = body.strip_suffix("\n\n").unwrap().split("\n\n").collect();
    let (done, chunks) = events.split_last().unwrap();
    assert_eq!(*done, "data: [DONE]");
    chunks
        .iter()
        .map(|e| {
            let payload = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"));
            assert!(!payload.contains('\n'), "multi-line event: {e:?}");
            let v = parse(payload);
            assert!(v.get("error").is_none(), "error in stream: {v}");
            v
        })
        .collect()
}

/// The `greedy_text` of each prompt of the tiny Mixtral's reference fixture.
fn reference_greedy(index: usize) -> String {
    let path = root().join("tests/fixtures/tiny-mixtral/reference.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let p = &v["prompts"][index];
    assert_eq!(p["index"], index);
    p["greedy_text"].as_str().unwrap().to_string()
}

/// Checks OpenAI's error shape (all four keys present) and the status and type; returns it.
fn assert_error(status: StatusCode, body: &Value, want: StatusCode, kind: &str) -> Value {
    assert_eq!(status, want, "{body}");
    let e = body
        .get("error")
        .unwrap_or_else(|| panic!("no error object: {body}"));
    let obj = e.as_object().unwrap();
    for key in ["message", "type", "param", "code"] {
        assert!(obj.contains_key(key), "missing {key:?}: {body}");
    }
    assert!(!e["message"].as_str().unwrap().is_empty(), "{body}");
    assert_eq!(e["type"], kind, "{body}");
    assert!(e["param"].is_null() || e["param"].is_string(), "{body}");
    assert!(e["code"].is_null() || e["code"].is_string(), "{body}");
    e.clone()
}

/// A 400 whose `param` names `param`.
fn assert_bad_param(status: StatusCode, body: &Value, param: &str) {
    let e = assert_error(
        status,
        body,
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
    );
    assert_eq!(e["param"], param, "{body}");
}

fn usage(v: &Value) -> (u64, u64, u64) {
    let u = &v["usage"];
    let (p, c, t) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
        u["total_tokens"].as_u64().unwrap(),
    );
    assert_eq!(t, p + c, "total_tokens is not prompt + completion: {u}");
    (p, c, t)
}

fn text(v: &Value, choice: usize) -> String {
    v["choices"][choice]["text"].as_str().unwrap().to_string()
}

fn content(v: &Value, choice: usize) -> String {
    v["choices"][choice]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The value of an unlabelled Prometheus sample (`name value`).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

// ---------------------------------------------------------------------------------------------
// Health and models

/// /health and /v1/models answer 503 (with an error body) until the engine is set, then 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_models_follow_engine_readiness() {
    let server = TestServer::start(Options {
        engine: false,
        ..Options::default()
    })
    .await;
    let (status, body) = server.get_json("/health").await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable_error",
    );
    let (status, body) = server.get_json("/v1/models").await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable_error",
    );

    let engine = tokio::task::spawn_blocking(|| start_engine(None))
        .await
        .unwrap();
    server.state.set_engine(engine);
    let (status, _) = server.get("/health").await;
    assert_eq!(status, StatusCode::OK);
    let (status, models) = server.get_json("/v1/models").await;
    assert_eq!(status, StatusCode::OK, "{models}");
    assert_eq!(models["object"], "list");
    let data = models["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{models}");
    assert_eq!(data[0]["id"], SERVED);
    assert_eq!(data[0]["object"], "model");
    assert!(data[0]["created"].as_u64().unwrap() > 0);
    assert!(data[0]["owned_by"].is_string());
}

// ---------------------------------------------------------------------------------------------
// Completions

/// Greedy output for every prompt form (text, texts, ids, id lists) equals the reference
/// greedy continuation, with correct usage and one choice per prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_prompt_forms_match_reference_greedy() {
    let server = TestServer::new().await;
    let tok = server.engine().tokenizer().clone();
    let ids0 = tok.encode(PROMPT0, true).unwrap();
    let ids1 = tok.encode(PROMPT1, true).unwrap();
    let (want0, want1) = (reference_greedy(0), reference_greedy(1));
    let req = |prompt: Value| json!({"model": SERVED, "prompt": prompt, "max_tokens": 24, "temperature": 0});

    let v = server.ok("/v1/completions", req(json!(PROMPT0))).await;
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"), "{v}");
    assert_eq!(v["model"], SERVED);
    assert_eq!(v["choices"].as_array().unwrap().len(), 1);
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(text(&v, 0).trim_start(), want0);
    assert_eq!(usage(&v), (6, 24, 30));

    let v = server.ok("/v1/completions", req(json!(ids0))).await;
    assert_eq!(text(&v, 0).trim_start(), want0);
    assert_eq!(usage(&v).0, ids0.len() as u64);

    for prompts in [json!([PROMPT0, PROMPT1]), json!([ids0, ids1])] {
        let v = server.ok("/v1/completions", req(prompts)).await;
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 2, "{v}");
        assert_eq!(
            (choices[0]["index"].as_u64(), choices[1]["index"].as_u64()),
            (Some(0), Some(1))
        );
        assert_eq!(text(&v, 0).trim_start(), want0);
        assert_eq!(text(&v, 1).trim_start(), want1);
        assert_eq!(usage(&v), (15, 48, 63));
    }
}

/// `n: 2` with a seed: two choices indexed 0 and 1, usage counting both, and the same seeded
/// request answering the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_n_with_seed_is_indexed_and_reproducible() {
    let server = TestServer::new().await;
    let req = json!({
        "prompt": PROMPT1, "max_tokens": 8, "n": 2, "seed": 1234,
        "temperature": 0.8, "top_p": 0.9, "ignore_eos": true,
    });
    let a = server.ok("/v1/completions", req.clone()).await;
    let choices = a["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{a}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["finish_reason"], "length");
        assert!(!c["text"].as_str().unwrap().is_empty());
    }
    assert_eq!(usage(&a), (9, 16, 25));
    let b = server.ok("/v1/completions", req).await;
    assert_eq!(a["choices"], b["choices"], "same seed, different samples");
}

/// A stop string cuts the text just before its first occurrence, with finish_reason "stop".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_stop_string_cuts_text() {
    let server = TestServer::new().await;
    let req = json!({"prompt": PROMPT0, "max_tokens": 24, "temperature": 0});
    let full = text(&server.ok("/v1/completions", req.clone()).await, 0);
    // Four characters from the middle of the greedy text.
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 4].iter().collect();
    let want = &full[..full.find(&stop).unwrap()];

    let mut with_stop = req.clone();
    with_stop["stop"] = json!(stop);
    let v = server.ok("/v1/completions", with_stop).await;
    assert_eq!(text(&v, 0), want, "stop {stop:?} in {full:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let (_, completion, _) = usage(&v);
    assert!(completion < 24, "{v}");

    // A list of stops: the earliest match wins.
    let mut with_stops = req;
    with_stops["stop"] = json!(["never-generated-xyz", stop]);
    let v = server.ok("/v1/completions", with_stops.clone()).await;
    assert_eq!(text(&v, 0), want);

    // Streamed, the held-back text never leaks past the stop either.
    with_stops["stream"] = json!(true);
    let chunks = server.stream("/v1/completions", with_stops).await;
    let joined: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(joined, want);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
}

/// `logprobs: 3`: four parallel arrays as long as the completion, tokens joining to the text,
/// offsets counting bytes, and the greedy token being the most likely alternative.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_logprobs_are_consistent() {
    let server = TestServer::new().await;
    let v = server
        .ok(
            "/v1/completions",
            json!({"prompt": PROMPT0, "max_tokens": 12, "temperature": 0, "logprobs": 3}),
        )
        .await;
    let (_, completion, _) = usage(&v);
    let lp = &v["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let token_logprobs = lp["token_logprobs"].as_array().unwrap();
    let top = lp["top_logprobs"].as_array().unwrap();
    let offsets = lp["text_offset"].as_array().unwrap();
    assert_eq!(tokens.len() as u64, completion, "{lp}");
    assert_eq!(token_logprobs.len(), tokens.len());
    assert_eq!(top.len(), tokens.len());
    assert_eq!(offsets.len(), tokens.len());
    assert_eq!(tokens.concat(), text(&v, 0));
    let mut offset = 0;
    for i in 0..tokens.len() {
        assert_eq!(offsets[i], offset, "text_offset[{i}]");
        offset += tokens[i].len() as u64;
        let lp = token_logprobs[i].as_f64().unwrap();
        assert!(lp <= 0.0, "{lp}");
        let alts = top[i].as_object().unwrap();
        assert!((1..=3).contains(&alts.len()), "{alts:?}");
        let best = alts
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::NEG_INFINITY, f64::max);
        assert!(
            (best - lp).abs() < 1e-5,
            "greedy token {i} is not the top: {lp} vs {best}"
        );
    }
}

/// `echo` + `logprobs: 1` + `max_tokens: 0` (lm-evaluation-harness scoring): the prompt back
/// as text, one logprob per prompt token, the first null and the rest numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_echo_scores_the_prompt() {
    let server = TestServer::new().await;
    let v = server
        .ok(
            "/v1/completions",
            json!({"prompt": PROMPT0, "max_tokens": 0, "echo": true, "logprobs": 1, "temperature": 0}),
        )
        .await;
    assert_eq!(text(&v, 0), PROMPT0);
    let (prompt, completion, _) = usage(&v);
    assert_eq!((prompt, completion), (6, 0));
    let lp = &v["choices"][0]["logprobs"];
    let token_logprobs = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(token_logprobs.len() as u64, prompt, "{lp}");
    assert!(token_logprobs[0].is_null(), "{lp}");
    for x in &token_logprobs[1..] {
        assert!(x.as_f64().is_some_and(|x| x <= 0.0), "{lp}");
    }
    for key in ["tokens", "top_logprobs", "text_offset"] {
        assert_eq!(
            lp[key].as_array().unwrap().len() as u64,
            prompt,
            "{key}: {lp}"
        );
    }
    assert!(lp["top_logprobs"][0].is_null(), "{lp}");

    // With one generated token, the prompt's entries come first, then the new token's.
    let v = server
        .ok(
            "/v1/completions",
            json!({"prompt": PROMPT0, "max_tokens": 1, "echo": true, "logprobs": 1, "temperature": 0}),
        )
        .await;
    assert!(text(&v, 0).starts_with(PROMPT0), "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 7, "{lp}");
    assert!(lp["token_logprobs"][6].is_number(), "{lp}");
}

/// `return_tokens_as_token_ids`: every token is "token_id:N", and the ids decode to the text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_tokens_as_token_ids() {
    let server = TestServer::new().await;
    let v = server
        .ok(
            "/v1/completions",
            json!({"prompt": PROMPT0, "max_tokens": 8, "temperature": 0, "logprobs": 2,
                   "return_tokens_as_token_ids": true}),
        )
        .await;
    let lp = &v["choices"][0]["logprobs"];
    let ids: Vec<u32> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let t = t.as_str().unwrap();
            t.strip_prefix("token_id:")
                .unwrap_or_else(|| panic!("{t:?}"))
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(ids.len(), 8);
    for alts in lp["top_logprobs"].as_array().unwrap() {
        for key in alts.as_object().unwrap().keys() {
            assert!(key.starts_with("token_id:"), "{key}");
        }
    }
    let decoded = server.engine().tokenizer().decode(&ids, true).unwrap();
    assert_eq!(decoded.trim_start(), text(&v, 0).trim_start());
}

// ---------------------------------------------------------------------------------------------
// Chat

/// Streamed chat: framing, role first, one finish_reason per choice, usage last, and the joined
/// deltas equal the non-streamed content of the same seeded request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_matches_non_streamed() {
    let server = TestServer::new().await;
    let req = json!({
        "model": SERVED, "messages": user("Tell me about experts."), "max_tokens": 16,
        "temperature": 0.8, "seed": 7, "n": 2, "ignore_eos": true,
    });
    let full = server.ok("/v1/chat/completions", req.clone()).await;
    assert_eq!(full["object"], "chat.completion");
    assert!(full["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let (_, completion, _) = usage(&full);
    assert_eq!(completion, 32);
    for i in 0..2 {
        let c = &full["choices"][i];
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["role"], "assistant");
        assert_eq!(c["finish_reason"], "length");
    }

    let mut streamed = req;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = server.stream("/v1/chat/completions", streamed).await;
    let (last, body) = chunks.split_last().unwrap();
    let mut joined = [String::new(), String::new()];
    let mut finishes = [0, 0];
    let mut saw_role = [false, false];
    for c in body {
        assert_eq!(c["object"], "chat.completion.chunk");
        for key in ["id", "created", "model"] {
            assert_eq!(c[key], chunks[0][key], "{key} differs between chunks");
        }
        assert!(
            c.get("usage").is_some_and(Value::is_null),
            "usage before the end: {c}"
        );
        let choices = c["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 1, "{c}");
        let ch = &choices[0];
        let i = ch["index"].as_u64().unwrap() as usize;
        if !saw_role[i] {
            // The first chunk of each choice carries the role.
            assert_eq!(ch["delta"]["role"], "assistant", "{c}");
            saw_role[i] = true;
        } else {
            assert!(ch["delta"].get("role").is_none(), "role repeated: {c}");
        }
        assert_eq!(finishes[i], 0, "chunk after finish_reason: {c}");
        if let Some(s) = ch["delta"]["content"].as_str() {
            joined[i].push_str(s);
        }
        if !ch["finish_reason"].is_null() {
            assert_eq!(ch["finish_reason"], "length");
            finishes[i] += 1;
        }
    }
    assert_eq!(finishes, [1, 1]);
    assert_eq!(last["choices"], json!([]), "{last}");
    assert_eq!(last["id"], chunks[0]["id"]);
    assert_eq!(usage(last), usage(&full));
    for (i, streamed) in joined.iter().enumerate() {
        assert_eq!(*streamed, content(&full, i), "choice {i}");
    }
}

/// Content as a list of text parts is the same as the joined string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_content_parts_equal_string_content() {
    let server = TestServer::new().await;
    let plain = server
        .ok(
            "/v1/chat/completions",
            json!({"messages": user("Hello world"), "max_tokens": 8, "temperature": 0}),
        )
        .await;
    let parts = server
        .ok(
            "/v1/chat/completions",
            json!({
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}
                ]}],
                "max_tokens": 8, "temperature": 0,
            }),
        )
        .await;
    assert_eq!(content(&parts, 0), content(&plain, 0));
    assert_eq!(usage(&parts), usage(&plain));
    // A multi-turn conversation renders through the template too.
    let v = server
        .ok(
            "/v1/chat/completions",
            json!({"messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"},
            ], "max_tokens": 4}),
        )
        .await;
    assert!(usage(&v).0 > usage(&plain).0);
}

/// `logprobs: true, top_logprobs: 2`: one entry per token, two alternatives each, tokens
/// joining to the content, bytes matching the tokens; streamed chunks carry theirs too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_logprobs() {
    let server = TestServer::new().await;
    let req = json!({"messages": user("Hello"), "max_tokens": 10, "temperature": 0,
                     "ignore_eos": true, "logprobs": true, "top_logprobs": 2});
    let v = server.ok("/v1/chat/completions", req.clone()).await;
    let entries = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(entries.len(), 10, "{v}");
    let mut joined = String::new();
    for e in entries {
        let token = e["token"].as_str().unwrap();
        joined.push_str(token);
        let bytes: Vec<u8> = serde_json::from_value(e["bytes"].clone()).unwrap();
        assert_eq!(bytes, token.as_bytes());
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2, "{e}");
        // Greedy: the chosen token is the most likely one.
        let (lp, best) = (
            e["logprob"].as_f64().unwrap(),
            top[0]["logprob"].as_f64().unwrap(),
        );
        assert!((lp - best).abs() < 1e-5, "{e}");
        assert!(best >= top[1]["logprob"].as_f64().unwrap());
    }
    assert_eq!(joined, content(&v, 0));

    let mut streamed = req;
    streamed["stream"] = json!(true);
    let chunks = server.stream("/v1/chat/completions", streamed).await;
    let streamed_tokens: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(&streamed_tokens, entries);
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Bad requests: malformed or mistyped JSON, out-of-range values naming their parameter,
/// unsupported options, unknown model and route; unknown extra fields are ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_openai_errors() {
    let server = TestServer::new().await;
    let cmpl = "/v1/completions";
    let chat = "/v1/chat/completions";
    let bad = "invalid_request_error";

    let (s, v) = server.post_raw(cmpl, "{\"prompt\": \"hi\",".into()).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, bad);
    let (s, v) = server.post_raw(chat, "not json".into()).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, bad);
    let (s, v) = server
        .post(cmpl, json!({"prompt": "hi", "max_tokens": "x"}))
        .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, bad);
    let (s, v) = server.post(cmpl, json!({"max_tokens": 3})).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, bad);

    for (param, value) in [
        ("temperature", json!(3)),
        ("top_p", json!(0)),
        ("n", json!(0)),
        ("logprobs", json!(21)),
        ("presence_penalty", json!(5)),
        ("frequency_penalty", json!(-2.5)),
        ("suffix", json!("tail")),
        ("best_of", json!(3)),
    ] {
        let mut req = json!({"prompt": "hi", "max_tokens": 3});
        req[param] = value;
        let (s, v) = server.post(cmpl, req).await;
        assert_bad_param(s, &v, param);
    }
    let (s, v) = server
        .post(cmpl, json!({"prompt": "hi", "max_tokens": 0}))
        .await;
    assert_bad_param(s, &v, "max_tokens");
    let (s, v) = server
        .post(
            cmpl,
            json!({"prompt": "hi", "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_bad_param(s, &v, "stream_options");

    let chat_req = |extra: Value| {
        let mut req = json!({"messages": user("hi"), "max_tokens": 3});
        req.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        req
    };
    for (param, extra) in [
        (
            "tools",
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
        ),
        (
            "response_format",
            json!({"response_format": {"type": "json_object"}}),
        ),
        (
            "stream_options",
            json!({"stream_options": {"include_usage": true}}),
        ),
        ("temperature", json!({"temperature": 2.5})),
    ] {
        let (s, v) = server.post(chat, chat_req(extra)).await;
        assert_bad_param(s, &v, param);
    }
    // The chat template's own exception reaches the client.
    let (s, v) = server
        .post(
            chat,
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
        )
        .await;
    let e = assert_error(s, &v, StatusCode::BAD_REQUEST, bad);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("Conversation roles must alternate user/assistant/user/assistant/..."),
        "{v}"
    );

    // Unknown model and route.
    let (s, v) = server
        .post(cmpl, json!({"model": "gpt-4", "prompt": "hi"}))
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found_error");
    let (s, v) = server
        .post(chat, json!({"model": "gpt-4", "messages": user("hi")}))
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found_error");
    let (s, v) = server.get_json("/v1/embeddings").await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found_error");
    let (s, v) = server
        .post("/v2/completions", json!({"prompt": "hi"}))
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found_error");

    // Unknown extra fields are ignored.
    let extra = json!({"user": "x", "store": true, "metadata": {}, "frobnicate": [1, 2]});
    let mut req = json!({"prompt": "hi", "max_tokens": 2});
    req.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    server.ok(cmpl, req).await;
    server.ok(chat, chat_req(extra)).await;
}

/// Chat's `top_logprobs` out of range is refused naming `top_logprobs`, the field the client
/// sent (chat has no numeric `logprobs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_top_logprobs_out_of_range_names_top_logprobs() {
    let server = TestServer::new().await;
    let (s, v) = server
        .post(
            "/v1/chat/completions",
            json!({"messages": user("hi"), "max_tokens": 3, "logprobs": true, "top_logprobs": 21}),
        )
        .await;
    assert_bad_param(s, &v, "top_logprobs");
}

/// A prompt plus completion beyond the context is a 400 `context_length_exceeded` whose
/// message has the numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_overflow_is_context_length_exceeded() {
    let server = TestServer::new().await;
    let prompt = vec![100u32; 4000];
    let (s, v) = server
        .post(
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 200}),
        )
        .await;
    let e = assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_request_error");
    assert_eq!(e["code"], "context_length_exceeded", "{v}");
    let msg = e["message"].as_str().unwrap();
    for n in [MAX_CONTEXT, 4000, 200] {
        assert!(msg.contains(&n.to_string()), "{n} not in {msg:?}");
    }

    let (s, v) = server
        .post(
            "/v1/chat/completions",
            json!({"messages": user("hi"), "max_tokens": 5000}),
        )
        .await;
    let e = assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_request_error");
    assert_eq!(e["code"], "context_length_exceeded", "{v}");
    let msg = e["message"].as_str().unwrap();
    for n in [MAX_CONTEXT, 5000] {
        assert!(msg.contains(&n.to_string()), "{n} not in {msg:?}");
    }
    // Nothing was left behind.
    server.wait_idle().await;
}

/// Bodies over the server's limit get 413 with an OpenAI error body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_413() {
    let server = TestServer::start(Options {
        body_limit: 1024,
        ..Options::default()
    })
    .await;
    let big = json!({"prompt": "x".repeat(2048), "max_tokens": 1});
    let (s, v) = server.post("/v1/completions", big).await;
    assert_error(
        s,
        &v,
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
    );
    // A small one still works.
    server
        .ok("/v1/completions", json!({"prompt": "hi", "max_tokens": 1}))
        .await;
}

/// With an API key, /v1 needs `Authorization: Bearer <key>`; /health does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_enforced() {
    let server = TestServer::start(Options {
        api_key: Some("sekret".into()),
        ..Options::default()
    })
    .await;
    let auth = "authentication_error";
    let (s, v) = server.get_json("/v1/models").await;
    assert_error(s, &v, StatusCode::UNAUTHORIZED, auth);
    let (s, v) = server
        .post("/v1/completions", json!({"prompt": "hi"}))
        .await;
    assert_error(s, &v, StatusCode::UNAUTHORIZED, auth);

    let send = |key: &str, path: &str| {
        server
            .client
            .post(server.url(path))
            .bearer_auth(key)
            .json(&json!({"prompt": "hi", "max_tokens": 2}))
            .send()
    };
    let resp = send("wrong", "/v1/completions").await.unwrap();
    let s = resp.status();
    assert_error(
        s,
        &resp.json().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        auth,
    );
    let resp = send("sekret", "/v1/completions").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = server
        .client
        .get(server.url("/v1/models"))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(server.get("/health").await.0, StatusCode::OK);
}

/// A full queue answers at once with 429, a Retry-After header and an error body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_429_with_retry_after() {
    let server = TestServer::start(Options {
        max_waiting: Some(0),
        ..Options::default()
    })
    .await;
    for (path, body) in [
        ("/v1/completions", json!({"prompt": "hi", "max_tokens": 2})),
        (
            "/v1/chat/completions",
            json!({"messages": user("hi"), "max_tokens": 2, "stream": true}),
        ),
    ] {
        let started = Instant::now();
        let resp = server
            .client
            .post(server.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        let status = resp.status();
        assert!(
            resp.headers().contains_key("retry-after"),
            "{:?}",
            resp.headers()
        );
        assert_error(
            status,
            &resp.json().await.unwrap(),
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Cleanup of abandoned requests

/// A client that drops a stream mid-way frees its request and KV blocks at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_stream_is_cancelled() {
    let server = TestServer::new().await;
    let abandoning = client(CLIENT_TIMEOUT);
    let mut resp = abandoning
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": PROMPT0, "max_tokens": 2000, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut seen = String::new();
    while seen.matches("data: ").count() < 2 {
        let chunk = tokio::time::timeout(CLIENT_TIMEOUT, resp.chunk())
            .await
            .unwrap()
            .unwrap()
            .expect("stream ended early");
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(
        server.engine().stats().live_requests > 0,
        "nothing running after two chunks"
    );
    drop(resp);
    drop(abandoning);

    let s = server.wait_idle().await;
    assert_eq!(s.aborted_requests, 1, "{s:?}");
    assert!(s.generation_tokens < 2000, "{s:?}");
    let m = server.metrics().await;
    assert_eq!(metric(&m, "mixserve_requests_running"), 0.0);
    assert_eq!(
        metric(&m, "mixserve_kv_cache_blocks_free"),
        metric(&m, "mixserve_kv_cache_blocks_total")
    );
    // The server still answers.
    server
        .ok("/v1/completions", json!({"prompt": "hi", "max_tokens": 2}))
        .await;
}

/// A non-streaming client that times out is cleaned up the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_request_is_cancelled() {
    let server = TestServer::new().await;
    let impatient = client(Duration::from_millis(300));
    let err = impatient
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": PROMPT0, "max_tokens": 4000, "ignore_eos": true}))
        .send()
        .await
        .expect_err("a 4000-token generation finished within 300 ms");
    assert!(err.is_timeout(), "{err}");
    drop(impatient);

    let s = server.wait_idle().await;
    assert_eq!(s.aborted_requests, 1, "{s:?}");
    assert!(s.generation_tokens < 4000, "{s:?}");
    server
        .ok("/v1/completions", json!({"prompt": "hi", "max_tokens": 2}))
        .await;
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// /metrics exposes the engine gauges, token counters matching the traffic, latency histograms
/// with one observation per request (and per token gap), and per-expert routing counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_reflect_traffic() {
    let server = TestServer::new().await;
    let a = server
        .ok(
            "/v1/completions",
            json!({"prompt": PROMPT0, "max_tokens": 5, "ignore_eos": true}),
        )
        .await;
    let chunks = server
        .stream(
            "/v1/chat/completions",
            json!({"messages": user("Hi"), "max_tokens": 3, "ignore_eos": true, "stream": true,
                   "stream_options": {"include_usage": true}}),
        )
        .await;
    let b = chunks.last().unwrap();
    let (pa, ca, _) = usage(&a);
    let (pb, cb, _) = usage(b);
    assert_eq!((ca, cb), (5, 3));
    server.wait_idle().await;

    let m = server.metrics().await;
    assert_eq!(metric(&m, "mixserve_requests_running"), 0.0);
    assert_eq!(metric(&m, "mixserve_requests_waiting"), 0.0);
    assert_eq!(metric(&m, "mixserve_kv_cache_usage_ratio"), 0.0);
    assert_eq!(metric(&m, "mixserve_generation_tokens_total"), 8.0);
    assert_eq!(metric(&m, "mixserve_prompt_tokens_total"), (pa + pb) as f64);
    for h in [
        "mixserve_time_to_first_token_seconds",
        "mixserve_inter_token_latency_seconds",
        "mixserve_request_latency_seconds",
    ] {
        assert!(
            m.contains(&format!("{h}_bucket{{le=")),
            "no {h} buckets in:\n{m}"
        );
    }
    assert_eq!(
        metric(&m, "mixserve_time_to_first_token_seconds_count"),
        2.0
    );
    assert_eq!(metric(&m, "mixserve_request_latency_seconds_count"), 2.0);
    // (5 - 1) + (3 - 1) gaps between tokens.
    assert_eq!(
        metric(&m, "mixserve_inter_token_latency_seconds_count"),
        6.0
    );

    // Every forwarded token went to top-k (2) experts of layer 0: the prompts (no prefix was
    // shared) and each generated token but the last of each request.
    let prefix = "mixserve_expert_tokens_total{layer=\"0\",expert=\"";
    let experts: Vec<f64> = m
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(experts.len(), 8, "expert lines of layer 0 in:\n{m}");
    let computed = metric(&m, "mixserve_prompt_tokens_computed_total");
    assert_eq!(computed, (pa + pb) as f64);
    assert_eq!(
        experts.iter().sum::<f64>(),
        2.0 * (computed + 8.0 - 2.0),
        "{experts:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown

/// Resolving the shutdown future lets an in-flight stream finish with [DONE]; `serve` then
/// returns Ok and no new connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_stream() {
    let mut server = TestServer::new().await;
    let mut resp = server
        .client
        .post(server.url("/v1/completions"))
        .json(
            &json!({"prompt": PROMPT0, "max_tokens": 200, "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = String::new();
    while !body.contains("\n\n") {
        let chunk = resp.chunk().await.unwrap().expect("stream ended early");
        body.push_str(std::str::from_utf8(&chunk).unwrap());
    }

    server.shutdown.take().unwrap().send(()).unwrap();
    let rest = tokio::time::timeout(CLIENT_TIMEOUT, resp.text())
        .await
        .expect("the stream did not finish")
        .expect("the stream was cut");
    body.push_str(&rest);
    let chunks = sse_chunks(&body);
    let last = chunks.last().unwrap();
    assert_eq!(usage(last).1, 200, "{last}");
    let finishes: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("length")]);

    let result = tokio::time::timeout(CLIENT_TIMEOUT, server.task.take().unwrap())
        .await
        .expect("serve did not return after shutdown")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    let fresh = client(Duration::from_secs(2));
    assert!(fresh.get(server.url("/health")).send().await.is_err());
}
