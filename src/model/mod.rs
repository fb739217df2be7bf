//! The sparse MoE decoder, shared by both families; `mixtral.rs` and `dbrx.rs` only map their
//! weight names onto it.

mod attention;
mod batch;
pub mod cpu;
mod dbrx;
pub mod decode_attention;
mod kv_cache;
mod layers;
mod mixtral;
pub mod moe;
mod norm;
mod quant;
#[cfg(target_arch = "x86_64")]
pub mod quant_kernel;
mod rope_cache;
#[cfg(target_arch = "x86_64")]
mod simd_exp;
pub mod small_matmul;
pub mod swiglu;
#[cfg(test)]
mod test_data;

pub use batch::{Batch, SeqInput};
pub use kv_cache::{KvCache, DEFAULT_BLOCK_SIZE};
pub use quant::Quant;

use crate::config::{Family, MoeConfig};
use crate::loader::{WeightError, WeightSource};
use attention::Attention;
use batch::{BatchShape, PreparedBatch};
use candle_core::{DType, Device, Tensor};
use layers::{Linear, RotaryEmbedding};
use moe::MoeBlock;
use norm::Norm;
use quant::Quantizer;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Weight(#[from] WeightError),
    #[error(transparent)]
    Candle(Box<candle_core::Error>),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Candle(Box::new(e))
    }
}

pub(crate) struct DecoderLayer {
    attn_norm: Norm,
    attn: Attention,
    ffn_norm: Norm,
    moe: MoeBlock,
}

/// The global (non-layer) weights of a checkpoint.
pub(crate) struct Globals {
    embed: Tensor,
    final_norm: Norm,
    lm_head: Linear,
}

/// The LM head is kept in f32: logits decide sampling, and rounding them to bf16 flips
/// near-tied top-1 tokens (on the fixtures it cost 3 of 108 rows). It is one matrix of the
/// whole model.
fn lm_head_f32(weight: Tensor) -> candle_core::Result<Tensor> {
    weight.to_dtype(DType::F32)
}

impl Globals {
    /// Embeddings, final norm and LM head (tied to the embeddings when the config says so and
    /// the checkpoint has no `lm_head.weight`).
    fn load(
        cfg: &MoeConfig,
        w: &WeightSource,
        q: &Quantizer,
        embed_name: &str,
        norm_name: &str,
    ) -> Result<Self, ModelError> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = w.get(embed_name, &[v, h])?;
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            embed.clone()
        } else {
            w.get("lm_head.weight", &[v, h])?
        };
        Ok(Self {
            embed,
            final_norm: Norm::new(cfg.norm, w.get(norm_name, &[h])?)?,
            lm_head: q.linear(lm_head_f32(lm_head)?)?,
        })
    }
}

pub struct MoeModel {
    cfg: MoeConfig,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    final_norm: Norm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    quant: Option<Quant>,
}

impl MoeModel {
    /// Builds the model from a checkpoint's weights; every tensor's shape is checked against
    /// the config, so a config that disagrees with the weights fails here, naming the tensor.
    pub fn load(cfg: &MoeConfig, weights: &WeightSource) -> Result<Self, ModelError> {
        Self::load_quantized(cfg, weights, None)
    }

    /// [`MoeModel::load`], quantizing the attention, expert and LM-head weights as they are
    /// read when `quant` is given (embeddings, norms and routers stay as loaded).
    pub fn load_quantized(
        cfg: &MoeConfig,
        weights: &WeightSource,
        quant: Option<Quant>,
    ) -> Result<Self, ModelError> {
        let q = Quantizer::new(quant);
        let (embed, norm) = match cfg.family {
            Family::Mixtral => (mixtral::EMBED, mixtral::FINAL_NORM),
            Family::Dbrx => (dbrx::EMBED, dbrx::FINAL_NORM),
        };
        let globals = Globals::load(cfg, weights, &q, embed, norm)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            layers.push(match cfg.family {
                Family::Mixtral => mixtral::load_layer(cfg, weights, &q, i)?,
                Family::Dbrx => dbrx::load_layer(cfg, weights, &q, i)?,
            });
        }
        weights.finish();
        q.report();
        let rope = RotaryEmbedding::new(
            cfg.rope_theta,
            cfg.head_dim,
            cfg.max_position_embeddings,
            weights.dtype(),
            weights.device(),
        );
        Ok(Self {
            cfg: cfg.clone(),
            embed: globals.embed,
            layers,
            final_norm: globals.final_norm,
            lm_head: globals.lm_head,
            rope,
            quant,
        })
    }

    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// The format the projections were quantized to on load, if any.
    pub fn quant(&self) -> Option<Quant> {
        self.quant
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Longest context (prompt plus generated tokens) the model accepts.
    pub fn max_context(&self) -> usize {
        self.rope.max_positions()
    }

    /// A paged KV cache for this model holding `dtype` (`None`: its compute dtype).
    pub fn new_kv_cache(
        &self,
        num_blocks: usize,
        block_size: usize,
        dtype: Option<DType>,
    ) -> Result<KvCache, ModelError> {
        let dtype = dtype.unwrap_or(self.dtype());
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(candle_core::Error::Msg(format!(
                "a KV cache of {dtype:?}: use f32, f16 or bf16"
            ))
            .into());
        }
        Ok(KvCache::new(
            &self.cfg,
            num_blocks,
            block_size,
            dtype,
            self.device(),
        )?)
    }

    /// Bytes one KV block of `block_size` tokens costs for this model, in `dtype` (`None`:
    /// its compute dtype).
    pub fn kv_bytes_per_block(&self, block_size: usize, dtype: Option<DType>) -> usize {
        KvCache::bytes_per_block(&self.cfg, block_size, dtype.unwrap_or(self.dtype()))
    }

    /// Per layer, per expert: tokens routed to it since the model was loaded.
    pub fn expert_token_counts(&self) -> Vec<Vec<u64>> {
        self.layers
            .iter()
            .map(|l| l.moe.expert_token_counts())
            .collect()
    }

    /// Runs one step over a flattened multi-sequence batch, writing its keys and values into
    /// `cache`, and returns f32 logits `[batch.logits_rows.len(), vocab]`.
    pub fn forward(&self, batch: &Batch, cache: &KvCache) -> Result<Tensor, ModelError> {
        let prepared = PreparedBatch::new(
            batch,
            cache,
            &self.rope,
            BatchShape {
                vocab_size: self.cfg.vocab_size,
                kv_dim: self.cfg.kv_dim(),
                sliding_window: self.cfg.sliding_window,
            },
            self.device(),
        )?;
        // The residual stream and the norms run in f32 whatever the compute dtype: in bf16 the
        // rounding of the running sum is what moves near-tied logits (measured on the fixtures).
        let dtype = self.dtype();
        let mut xs = self
            .embed
            .index_select(&prepared.input_ids, 0)?
            .to_dtype(DType::F32)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&xs)?.to_dtype(dtype)?;
            let h = layer.attn.forward(&h, i, &prepared, &self.rope, cache)?;
            xs = layers::add_residual(&xs, &h)?;
            let h = layer.ffn_norm.forward(&xs)?.to_dtype(dtype)?;
            let h = layer.moe.forward(&h)?;
            xs = layers::add_residual(&xs, &h)?;
        }
        if prepared.num_logits_rows == 0 {
            return Ok(Tensor::zeros(
                (0, self.cfg.vocab_size),
                DType::F32,
                self.device(),
            )?);
        }
        // Norm and LM head only on the rows that will be sampled: they are per-row operations.
        let rows = xs.index_select(&prepared.logits_rows, 0)?;
        let logits = self
            .lm_head
            .forward(
                &self
                    .final_norm
                    .forward(&rows)?
                    .to_dtype(self.lm_head.dtype())?,
            )?
            .to_dtype(DType::F32)?;
        Ok(logits)
    }
}
