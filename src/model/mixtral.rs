//! Mixtral's weight names (`model.layers.{i}...`) mapped onto the shared decoder.

use super::attention::{Attention, QkvProj};
use super::layers::Linear;
use super::moe::{Expert, MoeBlock};
use super::norm::Norm;
use super::quant::Quantizer;
use super::{DecoderLayer, ModelError};
use crate::config::MoeConfig;
use crate::loader::WeightSource;

pub(super) const EMBED: &str = "model.embed_tokens.weight";
pub(super) const FINAL_NORM: &str = "model.norm.weight";

pub(super) fn load_layer(
    cfg: &MoeConfig,
    w: &WeightSource,
    q: &Quantizer,
    i: usize,
) -> Result<DecoderLayer, ModelError> {
    let p = format!("model.layers.{i}");
    let (h, ffn) = (cfg.hidden_size, cfg.intermediate_size);
    let lin = |name: &str, shape: &[usize]| -> Result<Linear, ModelError> {
        Ok(q.linear(w.get(&format!("{p}.{name}.weight"), shape)?)?)
    };
    let qkv = QkvProj::Separate {
        q: lin("self_attn.q_proj", &[cfg.q_dim(), h])?,
        k: lin("self_attn.k_proj", &[cfg.kv_dim(), h])?,
        v: lin("self_attn.v_proj", &[cfg.kv_dim(), h])?,
    };
    let attn = Attention::new(
        qkv,
        lin("self_attn.o_proj", &[h, cfg.q_dim()])?,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    );
    // The router first: its shape is the clearest sign of a config/weights mismatch.
    // Never quantized: it is small, and its choices decide everything after it.
    let router = Linear::new(w.get(
        &format!("{p}.block_sparse_moe.gate.weight"),
        &[cfg.num_experts, h],
    )?)?;
    let mut experts = Vec::with_capacity(cfg.num_experts);
    for e in 0..cfg.num_experts {
        let ep = format!("block_sparse_moe.experts.{e}");
        experts.push(Expert {
            gate: lin(&format!("{ep}.w1"), &[ffn, h])?,
            up: lin(&format!("{ep}.w3"), &[ffn, h])?,
            down: lin(&format!("{ep}.w2"), &[h, ffn])?,
        });
    }
    let moe = MoeBlock::new(
        router,
        experts,
        cfg.experts_per_token,
        cfg.router_norm,
        cfg.activation,
    );
    Ok(DecoderLayer {
        attn_norm: Norm::new(
            cfg.norm,
            w.get(&format!("{p}.input_layernorm.weight"), &[h])?,
        )?,
        attn,
        ffn_norm: Norm::new(
            cfg.norm,
            w.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
        )?,
        moe,
    })
}
