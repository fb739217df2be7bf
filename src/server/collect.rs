//! Turning a handler's merged engine events into choices: all at once (JSON responses) or as
//! Server-Sent Events (streaming), with latency metrics recorded on the way.

use super::error::ApiError;
use super::metrics::Metrics;
use crate::engine::{Event, FinishReason, TokenLogprob, Usage};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedReceiver;

/// Everything one choice produced.
#[derive(Debug, Default, Clone)]
pub struct Choice {
    pub text: String,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
}

/// Latency bookkeeping for one HTTP request.
pub struct Timing {
    metrics: Arc<Metrics>,
    start: Instant,
    last_token: Option<Instant>,
}

impl Timing {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            start: Instant::now(),
            last_token: None,
        }
    }

    fn token(&mut self) {
        let now = Instant::now();
        match self.last_token {
            None => self.metrics.time_to_first_token.record(now - self.start),
            Some(prev) => self.metrics.inter_token_latency.record(now - prev),
        }
        self.last_token = Some(now);
    }

    fn done(&self) {
        self.metrics.request_latency.record(self.start.elapsed());
    }
}

/// The result of all engine requests of one HTTP request.
pub struct Collected {
    /// Indexed by `prompt * n + sample`.
    pub choices: Vec<Choice>,
    /// Per prompt, when asked for.
    pub prompt_logprobs: Vec<Option<Vec<Option<TokenLogprob>>>>,
    pub usage: Usage,
}

pub fn add_usage(total: &mut Usage, u: &Usage) {
    total.prompt_tokens += u.prompt_tokens;
    total.completion_tokens += u.completion_tokens;
    total.cached_tokens += u.cached_tokens;
}

/// Waits for every request to finish (non-streaming responses).
pub async fn collect(
    mut rx: UnboundedReceiver<(usize, Event)>,
    prompts: usize,
    n: usize,
    mut timing: Timing,
) -> Result<Collected, ApiError> {
    let mut out = Collected {
        choices: vec![Choice::default(); prompts * n],
        prompt_logprobs: vec![None; prompts],
        usage: Usage::default(),
    };
    let mut done = 0;
    while done < prompts {
        let Some((p, ev)) = rx.recv().await else {
            return Err(ApiError::internal("engine streams ended early"));
        };
        match ev {
            Event::PromptLogprobs(lp) => out.prompt_logprobs[p] = Some(lp),
            Event::Token {
                index,
                token,
                text,
                logprob,
                ..
            } => {
                timing.token();
                let c = &mut out.choices[p * n + index];
                c.text.push_str(&text);
                c.tokens.push(token);
                c.logprobs.extend(logprob);
            }
            Event::Finished {
                index,
                reason,
                text,
                ..
            } => {
                let c = &mut out.choices[p * n + index];
                c.text.push_str(&text);
                c.finish = Some(reason);
            }
            Event::Done(u) => {
                add_usage(&mut out.usage, &u);
                done += 1;
            }
            Event::Error(msg) => return Err(ApiError::internal(msg)),
        }
    }
    timing.done();
    Ok(out)
}

/// Writes one streamed chunk per engine event; returns the JSON payloads to send.
pub trait ChunkWriter: Send + 'static {
    fn on_event(&mut self, prompt: usize, event: Event) -> Vec<String>;
    /// After every request is done: the usage chunk, if asked for.
    fn on_done(&mut self, usage: Usage) -> Vec<String>;
}

struct SseState<W> {
    rx: UnboundedReceiver<(usize, Event)>,
    writer: W,
    pending: VecDeque<SseEvent>,
    prompts_left: usize,
    usage: Usage,
    finished: bool,
    timing: Timing,
}

/// An SSE response: `data: {chunk}` per event, errors as `data: {"error": ...}`, and always a
/// final `data: [DONE]`. Dropping it (client gone) drops `rx`, which cancels the requests.
pub fn sse_response<W: ChunkWriter>(
    rx: UnboundedReceiver<(usize, Event)>,
    prompts: usize,
    writer: W,
    timing: Timing,
) -> Response {
    let state = SseState {
        rx,
        writer,
        pending: VecDeque::new(),
        prompts_left: prompts,
        usage: Usage::default(),
        finished: false,
        timing,
    };
    let events = stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if st.finished {
                return None;
            }
            let payloads = match st.rx.recv().await {
                Some((_, Event::Error(msg))) => {
                    st.finished = true;
                    let err = ApiError::internal(msg);
                    vec![serde_json::to_string(&err.body()).unwrap_or_default()]
                }
                Some((p, ev)) => {
                    if let Event::Done(u) = &ev {
                        add_usage(&mut st.usage, u);
                        st.prompts_left = st.prompts_left.saturating_sub(1);
                    }
                    if matches!(ev, Event::Token { .. }) {
                        st.timing.token();
                    }
                    let mut out = st.writer.on_event(p, ev);
                    if st.prompts_left == 0 {
                        st.timing.done();
                        out.extend(st.writer.on_done(st.usage));
                        st.finished = true;
                    }
                    out
                }
                None => {
                    st.finished = true;
                    vec![serde_json::to_string(
                        &ApiError::internal("engine streams ended early").body(),
                    )
                    .unwrap_or_default()]
                }
            };
            st.pending
                .extend(payloads.into_iter().map(|p| SseEvent::default().data(p)));
            if st.finished {
                st.pending.push_back(SseEvent::default().data("[DONE]"));
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Seconds since the Unix epoch, for `created`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random id with OpenAI's prefixes (`cmpl-`, `chatcmpl-`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}
