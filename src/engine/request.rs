//! What a client asks the engine for, and the events it gets back.

use super::sampler::SamplingParams;
use std::collections::HashMap;

/// Largest number of alternatives `logprobs` / `prompt_logprobs` may ask for (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;

/// One generation request: a tokenized prompt and everything that shapes its continuation.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Most tokens to generate per sample.
    pub max_tokens: usize,
    /// EOS and stop tokens are suppressed until this many tokens exist.
    pub min_tokens: usize,
    /// Stop strings, matched across token boundaries; not part of the output.
    pub stop: Vec<String>,
    /// Extra token ids that end the generation (besides EOS unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Log-probabilities of each generated token with up to this many top alternatives.
    pub logprobs: Option<usize>,
    /// Log-probabilities of the prompt tokens (the first is `None`), with alternatives.
    pub prompt_logprobs: Option<usize>,
    /// Independent samples of the same prompt (sharing its KV blocks).
    pub n: usize,
    pub skip_special_tokens: bool,
}

impl Request {
    /// Greedy, `max_tokens` new tokens, one sample: a convenient starting point.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::greedy(),
            max_tokens,
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            n: 1,
            skip_special_tokens: true,
        }
    }
}

impl Request {
    /// Checks what can be checked before queueing; the error is meant for the client.
    pub fn validate(
        &self,
        vocab_size: usize,
        max_context: usize,
        kv_capacity: usize,
    ) -> Result<(), String> {
        if self.prompt.is_empty() {
            return Err("the prompt is empty".into());
        }
        if let Some(t) = self.prompt.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(format!(
                "token id {t} in the prompt is outside the vocabulary (0..{vocab_size})"
            ));
        }
        let total = self.prompt.len() + self.max_tokens;
        if total > max_context {
            return Err(format!(
                "this model's maximum context length is {max_context} tokens, but {total} were \
                 requested ({} in the prompt, {} for the completion)",
                self.prompt.len(),
                self.max_tokens
            ));
        }
        if total > kv_capacity {
            return Err(format!(
                "the KV cache holds {kv_capacity} tokens, but this request needs {total} \
                 ({} in the prompt, {} for the completion); raise --kv-cache-memory",
                self.prompt.len(),
                self.max_tokens
            ));
        }
        if self.n == 0 || self.n > 128 {
            return Err(format!("n must be between 1 and 128, got {}", self.n));
        }
        for (name, v) in [
            ("logprobs", self.logprobs),
            ("prompt_logprobs", self.prompt_logprobs),
        ] {
            if v.is_some_and(|v| v > MAX_LOGPROBS) {
                return Err(format!("{name} must be at most {MAX_LOGPROBS}"));
            }
        }
        if self.min_tokens > self.max_tokens {
            return Err(format!(
                "min_tokens ({}) must not exceed max_tokens ({})",
                self.min_tokens, self.max_tokens
            ));
        }
        if let Some(t) = self
            .stop_token_ids
            .iter()
            .find(|&&t| t as usize >= vocab_size)
        {
            return Err(format!("stop token id {t} is outside the vocabulary"));
        }
        if let Some(t) = self
            .sampling
            .logit_bias
            .keys()
            .find(|&&t| t as usize >= vocab_size)
        {
            return Err(format!("logit_bias token id {t} is outside the vocabulary"));
        }
        self.sampling.validate()
    }
}

/// Why a sample ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The request was cancelled (its stream dropped) or the engine shut down.
    Abort,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// A token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// `(token, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Generated tokens, summed over the `n` samples.
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache instead of being computed.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Sent once, before any token, when `prompt_logprobs` was asked for: one entry per prompt
    /// token, the first `None`.
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    /// A new token of sample `index`, with the text that became final with it (may be empty:
    /// text is held back while it could be half a character or the start of a stop string).
    Token {
        index: usize,
        token: u32,
        text: String,
        logprob: Option<TokenLogprob>,
        /// When the engine produced it (it may be sent a moment later, by another worker):
        /// benchmarks time tokens by this, not by when a receiver thread got around to them.
        at: std::time::Instant,
    },
    /// Sample `index` ended; `text` is whatever it still held back.
    Finished {
        index: usize,
        reason: FinishReason,
        text: String,
        /// The stop string or token that ended it, if any.
        matched_stop: Option<String>,
    },
    /// Every sample ended; the last event of a request.
    Done(Usage),
    /// The request failed; the last event of a request.
    Error(String),
}

/// Logit biases keyed by token id (OpenAI's `logit_bias`), clamped to [-100, 100] on input.
pub type LogitBias = HashMap<u32, f32>;
