//! One sequence at a time, straight through the model: what `mixserve run` drives.
//!
//! It keeps the KV cache of its conversation between calls, so a chat turn only prefills the
//! tokens that differ from what the cache already holds (the previous turns). Prefill runs in
//! chunks of at most `prefill_chunk` tokens.

use super::block_manager::{BlockError, BlockManager};
use super::sampler::{Sampler, SamplingParams};
use crate::model::{Batch, KvCache, ModelError, MoeModel};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "prompt of {prompt} tokens plus {max_tokens} new tokens exceeds the context of {context} tokens"
    )]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error(transparent)]
    Blocks(#[from] BlockError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("model output: {0}")]
    Tensor(Box<candle_core::Error>),
}

impl From<candle_core::Error> for GenerateError {
    fn from(e: candle_core::Error) -> Self {
        GenerateError::Tensor(Box::new(e))
    }
}

/// Why a generation ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token (or a stop condition) was produced.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The caller asked to stop.
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

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Tokens that end the generation (EOS); not passed to the callback.
    pub stop_token_ids: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV was already cached and not recomputed.
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    pub finish_reason: FinishReason,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

impl GenerateStats {
    /// Decode speed, excluding the prefill and the first token it yields.
    pub fn decode_tokens_per_s(&self) -> f64 {
        let secs = self.decode_time.as_secs_f64();
        if self.generated_tokens > 1 && secs > 0.0 {
            (self.generated_tokens - 1) as f64 / secs
        } else {
            0.0
        }
    }
}

pub struct Generator<'m> {
    model: &'m MoeModel,
    cache: KvCache,
    blocks: BlockManager,
    table: Vec<u32>,
    /// Tokens whose keys and values sit in `table`'s blocks, in order.
    cached: Vec<u32>,
    prefill_chunk: usize,
}

impl<'m> Generator<'m> {
    pub fn new(
        model: &'m MoeModel,
        num_blocks: usize,
        block_size: usize,
        prefill_chunk: usize,
    ) -> Result<Self, GenerateError> {
        Ok(Self {
            cache: model.new_kv_cache(num_blocks, block_size)?,
            blocks: BlockManager::new(num_blocks, block_size),
            model,
            table: Vec::new(),
            cached: Vec::new(),
            prefill_chunk: prefill_chunk.max(1),
        })
    }

    /// Longest context this generator can hold: the model's, or the KV budget's if smaller.
    pub fn max_context(&self) -> usize {
        self.model
            .max_context()
            .min(self.blocks.num_blocks() * self.blocks.block_size())
    }

    /// Forgets the cached conversation (its blocks are freed).
    pub fn reset(&mut self) {
        self.blocks.release(&mut self.table);
        self.cached.clear();
    }

    /// Generates after `prompt`, calling `on_token` with each new token; it may break to stop.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<GenerateStats, GenerateError> {
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let context = self.max_context();
        if prompt.len() + params.max_tokens > context {
            return Err(GenerateError::TooLong {
                prompt: prompt.len(),
                max_tokens: params.max_tokens,
                context,
            });
        }
        // Reuse the cached prefix; always recompute at least the last prompt token, whose
        // logits we need.
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        self.cached.truncate(common);
        self.blocks.truncate(&mut self.table, common);
        self.blocks.grow(&mut self.table, prompt.len())?;

        let mut sampler = Sampler::new(params.sampling.clone());
        let started = Instant::now();
        let mut logits = None;
        let mut done = common;
        while done < prompt.len() {
            let end = (done + self.prefill_chunk).min(prompt.len());
            logits = Some(self.step(&prompt[done..end])?);
            done = end;
        }
        let prefill_time = started.elapsed();
        let decode_start = Instant::now();
        let mut stats = GenerateStats {
            prompt_tokens: prompt.len(),
            cached_tokens: common,
            generated_tokens: 0,
            finish_reason: FinishReason::Length,
            prefill_time,
            decode_time: Duration::ZERO,
        };
        while let Some(row) = logits.take() {
            if stats.generated_tokens >= params.max_tokens {
                break;
            }
            let next = sampler.sample(&row);
            stats.generated_tokens += 1;
            if params.stop_token_ids.contains(&next) {
                stats.finish_reason = FinishReason::Stop;
                break;
            }
            if on_token(next).is_break() {
                stats.finish_reason = FinishReason::Abort;
                break;
            }
            if stats.generated_tokens < params.max_tokens {
                self.blocks.grow(&mut self.table, self.cached.len() + 1)?;
                logits = Some(self.step(&[next])?);
            }
        }
        stats.decode_time = decode_start.elapsed();
        Ok(stats)
    }

    /// Runs `tokens` after the cached ones; returns the logits of the last.
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GenerateError> {
        let context = self.cached.len() + tokens.len();
        let mut batch = Batch::default();
        batch.push_seq(tokens, context, self.table.clone());
        batch.logits_rows = vec![tokens.len() - 1];
        let logits = self.model.forward(&batch, &self.cache)?;
        self.cached.extend_from_slice(tokens);
        Ok(logits.squeeze(0)?.to_vec1()?)
    }
}
