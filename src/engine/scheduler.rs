//! Iteration-level scheduling: which sequences run in the next forward pass, and how many of
//! their tokens.
//!
//! Every step first gives each running sequence its next token (a decode) or its next prefill
//! chunk, in admission order, then admits waiting sequences into what is left of the token
//! budget. A long prompt is prefilled in chunks, so it never holds the running sequences up
//! for more than one chunk. When KV blocks run out, the most recently admitted sequence is
//! preempted: its blocks are freed and it is requeued to be recomputed later.

use super::block_manager::BlockManager;
use super::sequence::{SeqId, Sequence};
use std::collections::{HashMap, VecDeque};

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Most tokens (decodes plus prefill chunks) in one forward pass.
    pub max_num_batched_tokens: usize,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_batched_tokens: 512,
            max_num_seqs: 64,
        }
    }
}

#[derive(Debug, Default)]
pub struct Scheduler {
    pub config: SchedulerConfig,
    pub waiting: VecDeque<SeqId>,
    pub running: Vec<SeqId>,
    step: u64,
    admissions: u64,
}

/// One step's plan: `(sequence, tokens to compute)` in batch order.
#[derive(Debug, Default)]
pub struct Plan {
    pub items: Vec<(SeqId, usize)>,
    pub preempted: Vec<SeqId>,
    /// Prompt tokens found in the prefix cache at admission, per sequence.
    pub cache_hits: Vec<(SeqId, usize)>,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            ..Default::default()
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Whether another sequence may run now.
    pub fn has_room(&self) -> bool {
        self.running.len() < self.config.max_num_seqs
    }

    /// Puts a sequence that already holds its blocks straight into the running set.
    pub fn admit(&mut self, seq: &mut Sequence) {
        self.admissions += 1;
        seq.admitted_at = self.admissions;
        self.running.push(seq.id);
    }

    /// Removes a sequence from whichever queue holds it.
    pub fn remove(&mut self, id: SeqId) {
        self.waiting.retain(|&s| s != id);
        self.running.retain(|&s| s != id);
    }

    pub fn schedule(
        &mut self,
        seqs: &mut HashMap<SeqId, Sequence>,
        blocks: &mut BlockManager,
        can_use_prefix_cache: impl Fn(&Sequence) -> bool,
    ) -> Plan {
        self.step += 1;
        let mut plan = Plan::default();
        let mut budget = self.config.max_num_batched_tokens;

        // 1. Running sequences keep going, oldest first; the newest make room if needed.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(seq) = seqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let chunk = seq.remaining().min(budget);
            let target = seq.num_computed + chunk;
            let mut self_preempted = false;
            while !blocks.can_grow(&seqs[&id].block_table, target) {
                let Some(&victim) = self.running.last() else {
                    break;
                };
                self.preempt(victim, seqs, blocks);
                plan.preempted.push(victim);
                plan.items.retain(|&(s, _)| s != victim);
                if victim == id {
                    self_preempted = true;
                    break;
                }
            }
            if self_preempted {
                break;
            }
            if let Some(seq) = seqs.get_mut(&id) {
                if blocks.grow(&mut seq.block_table, target).is_err() {
                    break;
                }
                plan.items.push((id, chunk));
                budget -= chunk;
            }
            i += 1;
        }

        // 2. Admit waiting sequences, first come first served, into what is left.
        while budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let Some(seq) = seqs.get_mut(&id) else {
                self.waiting.pop_front();
                continue;
            };
            if seq.preempted_at_step == Some(self.step) {
                break;
            }
            let mut hits = 0;
            if seq.num_computed == 0 && seq.block_table.is_empty() && can_use_prefix_cache(seq) {
                hits = Self::match_prefix(seq, blocks);
            }
            // Admit only what can be prefilled to the end with the blocks free now: a prompt
            // let in on its first chunk alone gets preempted and recomputed over and over.
            let chunk = seq.remaining().min(budget);
            let fits = blocks.can_grow(&seq.block_table, seq.tokens.len());
            if !fits
                || blocks
                    .grow(&mut seq.block_table, seq.num_computed + chunk)
                    .is_err()
            {
                // Undo the prefix hits: the blocks go back to the cache untouched.
                if hits > 0 {
                    blocks.release(&mut seq.block_table);
                    seq.reset_computed();
                }
                break;
            }
            if hits > 0 {
                plan.cache_hits.push((id, hits));
            }
            self.waiting.pop_front();
            self.admit(seq);
            plan.items.push((id, chunk));
            budget -= chunk;
        }
        plan
    }

    /// Takes the cached blocks of the longest cached prefix of `seq`'s tokens (always leaving
    /// the last token to compute, whose logits are needed); returns the tokens covered.
    fn match_prefix(seq: &mut Sequence, blocks: &mut BlockManager) -> usize {
        let bs = blocks.block_size();
        let full = (seq.tokens.len() - 1) / bs;
        let mut parent = None;
        for j in 0..full {
            let toks = &seq.tokens[j * bs..(j + 1) * bs];
            let h = super::block_manager::block_hash(parent, toks);
            match blocks.acquire_cached(h, toks) {
                Some(b) => {
                    seq.block_table.push(b);
                    seq.block_hashes.push(h);
                    parent = Some(h);
                }
                None => break,
            }
        }
        seq.num_computed = seq.block_table.len() * bs;
        seq.num_computed
    }

    fn preempt(
        &mut self,
        id: SeqId,
        seqs: &mut HashMap<SeqId, Sequence>,
        blocks: &mut BlockManager,
    ) {
        self.running.retain(|&s| s != id);
        if let Some(seq) = seqs.get_mut(&id) {
            blocks.release(&mut seq.block_table);
            seq.reset_computed();
            seq.preempted_at_step = Some(self.step);
        }
        self.waiting.push_front(id);
    }
}
