//! Builds the flattened batch for a step's plan, runs the model, and hands back the logits rows
//! each sequence needs.

use super::sequence::{SeqId, Sequence};
use crate::model::{Batch, KvCache, ModelError, MoeModel};
use candle_core::Tensor;
use std::collections::HashMap;

/// Which logits rows belong to which sequence.
pub struct SeqRows {
    pub id: SeqId,
    /// Tokens computed in this step.
    pub chunk: usize,
    /// Position (in the sequence) of the first computed token.
    pub first_pos: usize,
    /// Rows of the logits output for prompt positions (prompt logprobs), in order.
    pub prompt_rows: std::ops::Range<usize>,
    /// Row of the logits for the next token, if this step reaches the sequence's end.
    pub sample_row: Option<usize>,
}

pub struct StepOutput {
    /// `[rows, vocab]` f32.
    pub logits: Tensor,
    pub rows: Vec<SeqRows>,
}

/// Runs one forward pass over `items` (sequence, tokens to compute).
pub fn run(
    model: &MoeModel,
    cache: &KvCache,
    seqs: &HashMap<SeqId, Sequence>,
    items: &[(SeqId, usize)],
    wants_prompt_logprobs: impl Fn(&Sequence) -> bool,
) -> Result<StepOutput, ModelError> {
    let mut batch = Batch::default();
    let mut rows = Vec::with_capacity(items.len());
    for &(id, chunk) in items {
        let Some(seq) = seqs.get(&id) else {
            continue;
        };
        let first = seq.num_computed;
        let end = first + chunk;
        let range = batch.push_seq(&seq.tokens[first..end], end, seq.block_table.clone());
        // Logits at prompt position p predict prompt token p + 1.
        let prompt_rows = if wants_prompt_logprobs(seq) && first + 1 < seq.prompt_len {
            let last = end.min(seq.prompt_len - 1);
            let start = batch.logits_rows.len();
            batch
                .logits_rows
                .extend((first..last).map(|p| range.start + p - first));
            start..batch.logits_rows.len()
        } else {
            0..0
        };
        let sample_row = (end == seq.tokens.len()).then(|| {
            batch.logits_rows.push(range.end - 1);
            batch.logits_rows.len() - 1
        });
        rows.push(SeqRows {
            id,
            chunk,
            first_pos: first,
            prompt_rows,
            sample_row,
        });
    }
    let logits = model.forward(&batch, cache)?;
    Ok(StepOutput { logits, rows })
}
