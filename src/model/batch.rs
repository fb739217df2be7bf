//! The batch: the contract between the engine and the model.
//!
//! One forward pass takes every scheduled sequence at once, flattened: token ids and positions
//! for all `n` tokens, and per sequence its token range, KV block table and context length.
//! Prefill chunks and single decode tokens mix freely.

use super::kv_cache::KvCache;
use super::layers::RotaryEmbedding;
use candle_core::{Device, Result, Tensor};
use std::sync::OnceLock;

/// One sequence's share of a batch.
#[derive(Debug, Clone)]
pub struct SeqInput {
    /// First row of this sequence in the flattened batch.
    pub start: usize,
    /// Number of new tokens (a prefill chunk, or 1 for a decode step).
    pub len: usize,
    /// Tokens in the KV cache once this step is written: earlier tokens plus `len`.
    /// The new tokens sit at positions `context_len - len .. context_len`.
    pub context_len: usize,
    /// KV block ids holding positions `0..context_len`, in order.
    pub block_table: Vec<u32>,
}

#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub seqs: Vec<SeqInput>,
    /// Rows (indices into the flattened batch) to compute logits for, in output order.
    pub logits_rows: Vec<usize>,
}

impl Batch {
    /// Adds one sequence's tokens; returns the rows they occupy.
    pub fn push_seq(
        &mut self,
        tokens: &[u32],
        context_len: usize,
        block_table: Vec<u32>,
    ) -> std::ops::Range<usize> {
        let start = self.input_ids.len();
        self.input_ids.extend_from_slice(tokens);
        self.seqs.push(SeqInput {
            start,
            len: tokens.len(),
            context_len,
            block_table,
        });
        start..start + tokens.len()
    }

    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }
}

/// Per-sequence tensors derived from a [`SeqInput`].
pub(crate) struct PreparedSeq {
    pub start: usize,
    pub len: usize,
    /// Number of key positions attended: `context_len` less what a sliding window hides.
    pub keys: usize,
    /// The cache slots of positions `context_len - keys..context_len` (single-token attention
    /// reads the cache with them on the host).
    pub ctx: Vec<u32>,
    /// [`PreparedSeq::ctx_slots`], once built.
    ctx_slots: OnceLock<Tensor>,
    /// `[len, keys]` f32 additive mask (causal, and the sliding window); `None` for a single
    /// query token, which sees every gathered key.
    pub mask: Option<Tensor>,
}

impl PreparedSeq {
    /// `[keys]` u32: [`PreparedSeq::ctx`] as a tensor on `device`, for the tensor path's
    /// gathers (prefill chunks, GPUs). Built on first use: decode steps on the CPU read `ctx`
    /// and never need it.
    pub fn ctx_slots(&self, device: &Device) -> Result<&Tensor> {
        built_once(&self.ctx_slots, || {
            Tensor::from_slice(&self.ctx, self.keys, device)
        })
    }
}

/// `cell`'s tensor, built by `build` the first time it is asked for (`OnceLock::get_or_try_init`
/// is not stable yet).
fn built_once(cell: &OnceLock<Tensor>, build: impl FnOnce() -> Result<Tensor>) -> Result<&Tensor> {
    if let Some(t) = cell.get() {
        return Ok(t);
    }
    let t = build()?;
    Ok(cell.get_or_init(|| t))
}

/// What of the model's shape the batch preparation needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchShape {
    pub vocab_size: usize,
    pub kv_dim: usize,
    pub sliding_window: Option<usize>,
}

/// A batch checked against the cache and turned into the index tensors every layer reuses.
pub(crate) struct PreparedBatch {
    pub input_ids: Tensor,
    /// Destination slot of each new token, one per row.
    pub slots: Vec<u32>,
    /// [`PreparedBatch::slot_index`], once built; `kv_dim` its width.
    slot_index: OnceLock<Tensor>,
    kv_dim: usize,
    pub cos: Tensor,
    pub sin: Tensor,
    pub seqs: Vec<PreparedSeq>,
    pub logits_rows: Tensor,
    pub num_logits_rows: usize,
}

impl PreparedBatch {
    /// `[n, kv_dim]` u32: each new token's slot repeated along its row, for `scatter_set`
    /// (the cache writes of the tensor path; f32 rows on the CPU write without it, see
    /// `rope_cache.rs`). Built on first use, once a step.
    pub fn slot_index(&self) -> Result<&Tensor> {
        built_once(&self.slot_index, || {
            let n = self.slots.len();
            Tensor::from_slice(&self.slots, (n, 1), self.input_ids.device())?
                .broadcast_as((n, self.kv_dim))?
                .contiguous()
        })
    }

    pub fn new(
        batch: &Batch,
        cache: &KvCache,
        rope: &RotaryEmbedding,
        shape: BatchShape,
        device: &Device,
    ) -> Result<Self> {
        let BatchShape {
            vocab_size,
            kv_dim,
            sliding_window,
        } = shape;
        let n = batch.input_ids.len();
        if n == 0 {
            candle_core::bail!("empty batch");
        }
        if let Some(bad) = batch.input_ids.iter().find(|&&t| t as usize >= vocab_size) {
            candle_core::bail!("token id {bad} is outside the vocabulary of {vocab_size}");
        }
        let bs = cache.block_size();
        let mut positions = vec![0u32; n];
        let mut slots = vec![0u32; n];
        let mut covered = 0usize;
        let mut seqs = Vec::with_capacity(batch.seqs.len());
        for s in &batch.seqs {
            if s.start != covered || s.len == 0 || s.len > s.context_len {
                candle_core::bail!(
                    "malformed batch: sequence rows {}..{} (context {}) do not follow row {covered}",
                    s.start,
                    s.start + s.len,
                    s.context_len
                );
            }
            if s.context_len > rope.max_positions() {
                candle_core::bail!(
                    "context of {} tokens exceeds the model's {} positions",
                    s.context_len,
                    rope.max_positions()
                );
            }
            let blocks_needed = s.context_len.div_ceil(bs);
            if s.block_table.len() < blocks_needed {
                candle_core::bail!(
                    "block table has {} blocks, {} tokens need {blocks_needed}",
                    s.block_table.len(),
                    s.context_len
                );
            }
            if let Some(b) = s
                .block_table
                .iter()
                .find(|&&b| b as usize >= cache.num_blocks())
            {
                candle_core::bail!(
                    "block id {b} is outside the cache of {}",
                    cache.num_blocks()
                );
            }
            let slot = |pos: usize| s.block_table[pos / bs] * bs as u32 + (pos % bs) as u32;
            let first_pos = s.context_len - s.len;
            for i in 0..s.len {
                positions[s.start + i] = (first_pos + i) as u32;
                slots[s.start + i] = slot(first_pos + i);
            }
            // Keys before the first query's window are never seen: don't even gather them.
            let window = sliding_window.unwrap_or(usize::MAX);
            let kstart = (first_pos + 1).saturating_sub(window);
            let keys = s.context_len - kstart;
            let ctx: Vec<u32> = (kstart..s.context_len).map(slot).collect();
            let mask = if s.len > 1 {
                let mut m = vec![0f32; s.len * keys];
                for i in 0..s.len {
                    let qpos = first_pos + i;
                    for (j, v) in m[i * keys..(i + 1) * keys].iter_mut().enumerate() {
                        let kpos = kstart + j;
                        if kpos > qpos || qpos - kpos >= window {
                            *v = f32::NEG_INFINITY;
                        }
                    }
                }
                Some(Tensor::from_vec(m, (s.len, keys), device)?)
            } else {
                None
            };
            seqs.push(PreparedSeq {
                start: s.start,
                len: s.len,
                keys,
                ctx,
                ctx_slots: OnceLock::new(),
                mask,
            });
            covered += s.len;
        }
        if covered != n {
            candle_core::bail!("malformed batch: sequences cover {covered} of {n} tokens");
        }
        if let Some(r) = batch.logits_rows.iter().find(|&&r| r >= n) {
            candle_core::bail!("logits row {r} is outside the batch of {n} tokens");
        }
        let (cos, sin) = rope.tables(&positions)?;
        let rows: Vec<u32> = batch.logits_rows.iter().map(|&r| r as u32).collect();
        Ok(Self {
            input_ids: Tensor::from_vec(batch.input_ids.clone(), n, device)?,
            slots,
            slot_index: OnceLock::new(),
            kv_dim,
            cos,
            sin,
            seqs,
            num_logits_rows: rows.len(),
            logits_rows: Tensor::from_vec(rows, batch.logits_rows.len(), device)?,
        })
    }
}
