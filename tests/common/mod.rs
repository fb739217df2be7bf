//! Shared helpers for the integration tests: the shipped models and their reference outputs.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use mixserve::config::MoeConfig;
use mixserve::loader::{self, WeightSource};
use mixserve::model::{Batch, KvCache, MoeModel, Quant};
use std::collections::HashMap;
use std::path::PathBuf;

pub const FAMILIES: [&str; 2] = ["tiny-mixtral", "tiny-dbrx"];

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn model_dir(name: &str) -> PathBuf {
    root().join("models").join(name)
}

pub fn load_model(name: &str, dtype: DType) -> MoeModel {
    load_model_quantized(name, dtype, None)
}

pub fn load_model_quantized(name: &str, dtype: DType, quant: Option<Quant>) -> MoeModel {
    let files = loader::from_dir(&model_dir(name)).unwrap();
    let cfg = MoeConfig::from_file(&files.config).unwrap();
    let weights = WeightSource::open(&files.weights, &Device::Cpu, dtype).unwrap();
    MoeModel::load_quantized(&cfg, &weights, quant).unwrap()
}

pub struct RefPrompt {
    pub input_ids: Vec<u32>,
    /// `[rows, vocab]` reference logits and the positions they belong to.
    pub logits: Tensor,
    pub logit_positions: Vec<usize>,
    pub greedy: Vec<u32>,
}

pub fn reference(name: &str) -> Vec<RefPrompt> {
    let path = root()
        .join("tests/fixtures")
        .join(name)
        .join("reference.safetensors");
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let ids = |t: &Tensor| -> Vec<u32> {
        t.to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect()
    };
    let mut out = Vec::new();
    for i in 0.. {
        let Some(input) = tensors.get(&format!("p{i}.input_ids")) else {
            break;
        };
        let input_ids = ids(input);
        let logits = tensors[&format!("p{i}.logits")].clone();
        let rows = logits.dim(0).unwrap();
        let t = input_ids.len();
        out.push(RefPrompt {
            logit_positions: (t - rows..t).collect(),
            input_ids,
            logits,
            greedy: ids(&tensors[&format!("p{i}.greedy")]),
        });
    }
    assert_eq!(out.len(), 5);
    out
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn argmax(row: &Tensor) -> u32 {
    row.argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

/// A cache big enough for the tests, and consecutive blocks handed out per sequence.
pub struct Blocks {
    pub cache: KvCache,
    next: u32,
}

impl Blocks {
    pub fn new(model: &MoeModel, num_blocks: usize) -> Self {
        Self::of(model, num_blocks, None)
    }

    /// A cache of `dtype` (`None`: the model's compute dtype).
    pub fn of(model: &MoeModel, num_blocks: usize, dtype: Option<DType>) -> Self {
        Self {
            cache: model.new_kv_cache(num_blocks, 16, dtype).unwrap(),
            next: 0,
        }
    }

    /// Enough blocks for `tokens` positions.
    pub fn table(&mut self, tokens: usize) -> Vec<u32> {
        let n = tokens.div_ceil(16) as u32;
        let t = (self.next..self.next + n).collect();
        self.next += n;
        t
    }
}

/// One sequence's prefill in a single pass, logits for the given rows.
pub fn prefill(
    model: &MoeModel,
    blocks: &KvCache,
    ids: &[u32],
    table: &[u32],
    rows: &[usize],
) -> Tensor {
    let mut batch = Batch::default();
    batch.push_seq(ids, ids.len(), table.to_vec());
    batch.logits_rows = rows.to_vec();
    model.forward(&batch, blocks).unwrap()
}

/// One decode step of one sequence: `token` at context length `ctx` (itself included) over
/// the cache its `table` maps; its logits, `[1, vocab]`.
pub fn decode(model: &MoeModel, blocks: &KvCache, token: u32, ctx: usize, table: &[u32]) -> Tensor {
    let mut batch = Batch::default();
    batch.push_seq(&[token], ctx, table.to_vec());
    batch.logits_rows = vec![0];
    model.forward(&batch, blocks).unwrap()
}
