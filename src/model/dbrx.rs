//! DBRX's weight names (`transformer.blocks.{i}...`, fused `Wqkv`, fused expert tensors) mapped
//! onto the shared decoder.

use super::attention::{Attention, QkvProj};
use super::layers::Linear;
use super::moe::{Expert, MoeBlock};
use super::norm::Norm;
use super::quant::Quantizer;
use super::{DecoderLayer, ModelError};
use crate::config::MoeConfig;
use crate::loader::WeightSource;

pub(super) const EMBED: &str = "transformer.wte.weight";
pub(super) const FINAL_NORM: &str = "transformer.norm_f.weight";

pub(super) fn load_layer(
    cfg: &MoeConfig,
    w: &WeightSource,
    q: &Quantizer,
    i: usize,
) -> Result<DecoderLayer, ModelError> {
    let p = format!("transformer.blocks.{i}");
    let (h, ffn, ne) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_experts);
    let qkv_rows = cfg.q_dim() + 2 * cfg.kv_dim();
    let attn = Attention::new(
        QkvProj::Fused {
            wqkv: q.linear(w.get(
                &format!("{p}.norm_attn_norm.attn.Wqkv.weight"),
                &[qkv_rows, h],
            )?)?,
            clip: cfg.clip_qkv,
        },
        q.linear(w.get(
            &format!("{p}.norm_attn_norm.attn.out_proj.weight"),
            &[h, cfg.q_dim()],
        )?)?,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    );
    // w1 (gate), v1 (up), w2 (down) are fused `[experts * ffn, hidden]` tensors without a
    // `.weight` suffix; each expert's rows are read on their own from the mapping.
    // Never quantized: it is small, and its choices decide everything after it.
    let router = Linear::new(w.get(&format!("{p}.ffn.router.layer.weight"), &[ne, h])?)?;
    let fused = [ne * ffn, h];
    let mlp = format!("{p}.ffn.experts.mlp");
    let mut experts = Vec::with_capacity(ne);
    for e in 0..ne {
        let rows = |name: &str| w.get_rows(&format!("{mlp}.{name}"), &fused, e * ffn, ffn);
        experts.push(Expert {
            gate: q.linear(rows("w1")?)?,
            up: q.linear(rows("v1")?)?,
            // Stored `[ffn, hidden]` per expert: transposed once here to `[out, in]`.
            down: q.linear(rows("w2")?.t()?)?,
        });
    }
    let moe = MoeBlock::new(
        router,
        experts,
        cfg.experts_per_token,
        cfg.router_norm,
        cfg.activation,
    );
    let norm = |name: &str| -> Result<Norm, ModelError> {
        Ok(Norm::new(
            cfg.norm,
            w.get(&format!("{p}.norm_attn_norm.{name}.weight"), &[h])?,
        )?)
    };
    Ok(DecoderLayer {
        attn_norm: norm("norm_1")?,
        attn,
        ffn_norm: norm("norm_2")?,
        moe,
    })
}
