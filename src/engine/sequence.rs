//! One sample being generated: its tokens, how many of them have KV in the cache, its blocks,
//! and the per-sample state that turns tokens into text and decides when to stop.

use super::block_manager::block_hash;
use super::request::{Event, Request, TokenLogprob};
use super::sampler::Sampler;
use crate::text::{IncrementalDetokenizer, StopMatcher};
use tokio::sync::mpsc::UnboundedSender;

pub type SeqId = u64;
pub type RequestId = u64;

/// The parts of a request that its samples share.
pub struct RequestState {
    pub request: Request,
    /// EOS (unless ignored) and the request's stop token ids.
    pub stop_ids: Vec<u32>,
    pub events: UnboundedSender<Event>,
    /// Samples not finished yet (the forks of samples 1.. count from the start).
    pub live: usize,
    /// Whether samples 1.. have been forked off sample 0.
    pub forked: bool,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
    /// Prompt logprobs gathered chunk by chunk; sent once the prompt is done.
    pub prompt_logprobs: Vec<Option<TokenLogprob>>,
    pub prompt_logprobs_sent: bool,
}

pub struct Sequence {
    pub id: SeqId,
    /// Which of its request's `n` samples this is.
    pub index: usize,
    pub request: RequestId,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose keys and values are in the cache (a prefix of `tokens`).
    pub num_computed: usize,
    pub block_table: Vec<u32>,
    /// Prefix-cache keys of the full blocks registered so far.
    pub block_hashes: Vec<u64>,
    /// Sequences preempted in the current step are not readmitted in it.
    pub preempted_at_step: Option<u64>,
    pub sampler: Sampler,
    pub detok: IncrementalDetokenizer,
    pub stop: StopMatcher,
    /// Admission order, for preempting the most recently admitted.
    pub admitted_at: u64,
}

impl Sequence {
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens that still need a forward pass before the next sample.
    pub fn remaining(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Hashes the full blocks computed since the last call; returns `(block index, hash)`.
    pub fn new_full_blocks(&mut self, block_size: usize) -> Vec<(usize, u64)> {
        let full = self.num_computed / block_size;
        let mut out = Vec::new();
        while self.block_hashes.len() < full {
            let j = self.block_hashes.len();
            let parent = j.checked_sub(1).map(|p| self.block_hashes[p]);
            let h = block_hash(parent, &self.tokens[j * block_size..(j + 1) * block_size]);
            self.block_hashes.push(h);
            out.push((j, h));
        }
        out
    }

    /// Forgets all KV state (after preemption): it will be recomputed from `tokens`.
    pub fn reset_computed(&mut self) {
        self.num_computed = 0;
        self.block_hashes.clear();
    }
}
