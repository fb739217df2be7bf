//! The model against Hugging Face transformers' outputs for the shipped tiny checkpoints.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use mixserve::model::Batch;

/// f32: every kept logits row within 1e-3; 24 greedy tokens decoded one at a time through the
/// paged KV cache equal the reference (the ~480-token prompt included).
#[test]
fn f32_logits_and_greedy_match_reference() {
    for name in FAMILIES {
        let model = load_model(name, DType::F32);
        for (i, p) in reference(name).iter().enumerate() {
            let total = p.input_ids.len() + p.greedy.len();
            let mut blocks = Blocks::new(&model, 64);
            let table = blocks.table(total);
            let logits = prefill(
                &model,
                &blocks.cache,
                &p.input_ids,
                &table,
                &p.logit_positions,
            );
            let diff = max_abs_diff(&logits, &p.logits);
            assert!(diff < 1e-3, "{name} prompt {i}: max logit error {diff}");

            let mut next = argmax(&logits.get(logits.dim(0).unwrap() - 1).unwrap());
            let mut generated = vec![next];
            for step in 1..p.greedy.len() {
                let ctx = p.input_ids.len() + step;
                let mut batch = Batch::default();
                batch.push_seq(&[next], ctx, table.clone());
                batch.logits_rows = vec![0];
                let l = model.forward(&batch, &blocks.cache).unwrap();
                next = argmax(&l.get(0).unwrap());
                generated.push(next);
            }
            assert_eq!(
                generated, p.greedy,
                "{name} prompt {i}: greedy continuation"
            );
        }
    }
}

/// A prompt prefilled in one pass or in three chunks gives the same logits.
#[test]
fn chunked_prefill_matches_single_pass() {
    for name in FAMILIES {
        let model = load_model(name, DType::F32);
        let p = &reference(name)[4];
        let ids = &p.input_ids;
        let n = ids.len();
        let mut blocks = Blocks::new(&model, 80);
        let whole_table = blocks.table(n);
        let all_rows: Vec<usize> = (0..n).collect();
        let whole = prefill(&model, &blocks.cache, ids, &whole_table, &all_rows);

        let table = blocks.table(n);
        let cuts = [0, 100, 317, n];
        let mut parts = Vec::new();
        for w in cuts.windows(2) {
            let mut batch = Batch::default();
            batch.push_seq(&ids[w[0]..w[1]], w[1], table.clone());
            batch.logits_rows = (0..w[1] - w[0]).collect();
            parts.push(model.forward(&batch, &blocks.cache).unwrap());
        }
        let chunked = Tensor::cat(&parts, 0).unwrap();
        let diff = max_abs_diff(&whole, &chunked);
        assert!(diff <= 1e-4, "{name}: chunked prefill differs by {diff}");
    }
}

/// All five prompts in one batched pass: each gets the logits it gets alone.
#[test]
fn batched_forward_matches_each_sequence_alone() {
    for name in FAMILIES {
        let model = load_model(name, DType::F32);
        let refs = reference(name);
        let mut blocks = Blocks::new(&model, 120);
        let mut batch = Batch::default();
        let mut alone = Vec::new();
        for p in &refs {
            let n = p.input_ids.len();
            let table = blocks.table(n);
            alone.push(prefill(
                &model,
                &blocks.cache,
                &p.input_ids,
                &table,
                &p.logit_positions,
            ));
            let rows = batch.push_seq(&p.input_ids, n, blocks.table(n));
            batch
                .logits_rows
                .extend(p.logit_positions.iter().map(|&r| rows.start + r));
        }
        let together = model.forward(&batch, &blocks.cache).unwrap();
        let mut offset = 0;
        for (i, a) in alone.iter().enumerate() {
            let r = a.dim(0).unwrap();
            let diff = max_abs_diff(a, &together.narrow(0, offset, r).unwrap());
            assert!(
                diff <= 1e-4,
                "{name} prompt {i}: batched logits differ by {diff}"
            );
            offset += r;
        }
    }
}

/// bf16 compute: top-1 token equal to the reference on at least 95% of kept rows.
#[test]
fn bf16_top1_agrees_with_reference() {
    for name in FAMILIES {
        let model = load_model(name, DType::BF16);
        let (mut agree, mut total) = (0, 0);
        for p in reference(name) {
            let mut blocks = Blocks::new(&model, 40);
            let table = blocks.table(p.input_ids.len());
            let logits = prefill(
                &model,
                &blocks.cache,
                &p.input_ids,
                &table,
                &p.logit_positions,
            );
            for r in 0..logits.dim(0).unwrap() {
                total += 1;
                agree +=
                    (argmax(&logits.get(r).unwrap()) == argmax(&p.logits.get(r).unwrap())) as usize;
            }
        }
        let frac = agree as f64 / total as f64;
        assert!(frac >= 0.95, "{name}: bf16 top-1 agreement {agree}/{total}");
    }
}
