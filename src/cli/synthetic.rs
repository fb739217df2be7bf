//! Full-size models with random weights, for benchmarking without downloading a checkpoint.
//!
//! The shapes, tensor names and `config.json` are those of the real families, so the model
//! builds (and costs) what a real checkpoint of that size would: the config goes through
//! [`MoeConfig::from_json_str`] and the weights through [`WeightSource::from_tensors`]
//! (`crate::loader::WeightSource`). Weights are bf16, as in the hub checkpoints.

use crate::config::MoeConfig;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use half::bf16;
use std::collections::HashMap;
use std::path::Path;

/// Which family's architecture to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyntheticKind {
    Mixtral,
    Dbrx,
}

impl SyntheticKind {
    /// The name reported in benchmark output.
    pub fn name(self) -> &'static str {
        match self {
            SyntheticKind::Mixtral => "synthetic-mixtral",
            SyntheticKind::Dbrx => "synthetic-dbrx",
        }
    }

    /// The benchmark's full-size shape (≈0.79 B parameters for both families).
    pub fn full_dims(self) -> SyntheticDims {
        match self {
            SyntheticKind::Mixtral => SyntheticDims {
                hidden: 1024,
                intermediate: 3584,
                layers: 8,
                heads: 16,
                kv_heads: 4,
                experts: 8,
                top_k: 2,
                vocab: 32000,
                max_positions: 4096,
            },
            SyntheticKind::Dbrx => SyntheticDims {
                hidden: 1024,
                intermediate: 1792,
                layers: 8,
                heads: 16,
                kv_heads: 4,
                experts: 16,
                top_k: 4,
                vocab: 32000,
                max_positions: 4096,
            },
        }
    }
}

/// The shape of a synthetic model; tests use scaled-down ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticDims {
    pub hidden: usize,
    /// One expert's FFN size (Mixtral `intermediate_size`, DBRX `ffn_hidden_size`).
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub experts: usize,
    pub top_k: usize,
    pub vocab: usize,
    pub max_positions: usize,
}

/// Standard deviation of the random weights: the usual `initializer_range`, small enough that
/// activations stay finite through every layer.
const WEIGHT_STD: f32 = 0.02;

/// The full-size synthetic model of `kind`: its config and its bf16 tensors by checkpoint name.
/// The same seed always gives the same weights.
pub fn synthetic(kind: SyntheticKind, seed: u64) -> Result<(MoeConfig, HashMap<String, Tensor>)> {
    synthetic_with(kind, seed, kind.full_dims())
}

/// [`synthetic`] with an explicit shape.
pub fn synthetic_with(
    kind: SyntheticKind,
    seed: u64,
    dims: SyntheticDims,
) -> Result<(MoeConfig, HashMap<String, Tensor>)> {
    let json = config_json(kind, dims);
    let cfg = MoeConfig::from_json_str(&json, &format!("{} config.json", kind.name()))?;
    let specs = tensor_specs(kind, &cfg);
    let tensors = generate(&specs, seed)?;
    Ok((cfg, tensors))
}

/// The `config.json` the hub file of such a model would have.
pub fn config_json(kind: SyntheticKind, d: SyntheticDims) -> String {
    let value = match kind {
        SyntheticKind::Mixtral => serde_json::json!({
            "architectures": ["MixtralForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": d.hidden,
            "initializer_range": WEIGHT_STD,
            "intermediate_size": d.intermediate,
            "max_position_embeddings": d.max_positions,
            "model_type": "mixtral",
            "num_attention_heads": d.heads,
            "num_experts_per_tok": d.top_k,
            "num_hidden_layers": d.layers,
            "num_key_value_heads": d.kv_heads,
            "num_local_experts": d.experts,
            "output_router_logits": false,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1e6,
            "router_aux_loss_coef": 0.02,
            "sliding_window": null,
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.36.0",
            "use_cache": true,
            "vocab_size": d.vocab,
        }),
        SyntheticKind::Dbrx => serde_json::json!({
            "architectures": ["DbrxForCausalLM"],
            "attn_config": {
                "clip_qkv": 8.0,
                "kv_n_heads": d.kv_heads,
                "model_type": "",
                "rope_theta": 5e5,
            },
            "d_model": d.hidden,
            "emb_pdrop": 0.0,
            "ffn_config": {
                "ffn_act_fn": {"name": "silu"},
                "ffn_hidden_size": d.intermediate,
                "model_type": "",
                "moe_jitter_eps": 0.0,
                "moe_loss_weight": 0.05,
                "moe_normalize_expert_weights": 1.0,
                "moe_num_experts": d.experts,
                "moe_top_k": d.top_k,
            },
            "initializer_range": WEIGHT_STD,
            "max_seq_len": d.max_positions,
            "model_type": "dbrx",
            "n_heads": d.heads,
            "n_layers": d.layers,
            "output_router_logits": false,
            "resid_pdrop": 0.0,
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.40.0",
            "use_cache": true,
            "vocab_size": d.vocab,
        }),
    };
    // Pretty-printing a `Value` cannot fail.
    serde_json::to_string_pretty(&value).unwrap_or_default()
}

/// How a tensor is filled.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// Approximately N(0, WEIGHT_STD).
    Random,
    /// Norm scales.
    Ones,
}

struct Spec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

/// Every tensor of the family's checkpoint, named and shaped as on the hub.
fn tensor_specs(kind: SyntheticKind, cfg: &MoeConfig) -> Vec<Spec> {
    let (v, h, f, e) = (
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_experts,
    );
    let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
    let mut specs = Vec::new();
    // The only vectors in either family are norm scales.
    let mut add = |name: String, shape: &[usize]| {
        specs.push(Spec {
            name,
            shape: shape.to_vec(),
            init: if shape.len() == 1 {
                Init::Ones
            } else {
                Init::Random
            },
        })
    };
    match kind {
        SyntheticKind::Mixtral => {
            add("model.embed_tokens.weight".into(), &[v, h]);
            add("lm_head.weight".into(), &[v, h]);
            add("model.norm.weight".into(), &[h]);
            for i in 0..cfg.num_layers {
                let p = format!("model.layers.{i}");
                add(format!("{p}.self_attn.q_proj.weight"), &[q, h]);
                add(format!("{p}.self_attn.k_proj.weight"), &[kv, h]);
                add(format!("{p}.self_attn.v_proj.weight"), &[kv, h]);
                add(format!("{p}.self_attn.o_proj.weight"), &[h, q]);
                add(format!("{p}.block_sparse_moe.gate.weight"), &[e, h]);
                for x in 0..e {
                    let ep = format!("{p}.block_sparse_moe.experts.{x}");
                    add(format!("{ep}.w1.weight"), &[f, h]);
                    add(format!("{ep}.w2.weight"), &[h, f]);
                    add(format!("{ep}.w3.weight"), &[f, h]);
                }
                add(format!("{p}.input_layernorm.weight"), &[h]);
                add(format!("{p}.post_attention_layernorm.weight"), &[h]);
            }
        }
        SyntheticKind::Dbrx => {
            add("transformer.wte.weight".into(), &[v, h]);
            add("lm_head.weight".into(), &[v, h]);
            add("transformer.norm_f.weight".into(), &[h]);
            for i in 0..cfg.num_layers {
                let p = format!("transformer.blocks.{i}");
                let a = format!("{p}.norm_attn_norm");
                add(format!("{a}.attn.Wqkv.weight"), &[q + 2 * kv, h]);
                add(format!("{a}.attn.out_proj.weight"), &[h, q]);
                add(format!("{a}.norm_1.weight"), &[h]);
                add(format!("{a}.norm_2.weight"), &[h]);
                add(format!("{p}.ffn.router.layer.weight"), &[e, h]);
                for w in ["w1", "v1", "w2"] {
                    add(format!("{p}.ffn.experts.mlp.{w}"), &[e * f, h]);
                }
            }
        }
    }
    specs
}

/// Elements per independently seeded chunk: the unit of parallel work. Each chunk's values
/// depend only on the seed, the tensor's name and the chunk's index, so the weights do not
/// depend on the number of threads.
const CHUNK: usize = 1 << 20;

fn generate(specs: &[Spec], seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut buffers: Vec<Vec<bf16>> = specs
        .iter()
        .map(|s| vec![bf16::ZERO; s.shape.iter().product()])
        .collect();
    let mut work: Vec<(u64, Init, &mut [bf16])> = Vec::new();
    for (spec, buf) in specs.iter().zip(buffers.iter_mut()) {
        let base = splitmix64(&mut (seed ^ fnv1a(spec.name.as_bytes())));
        for (i, chunk) in buf.chunks_mut(CHUNK).enumerate() {
            work.push((base.wrapping_add(i as u64), spec.init, chunk));
        }
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // Round-robin over equal-sized chunks keeps the threads evenly loaded.
    let mut shares: Vec<Vec<(u64, Init, &mut [bf16])>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, w) in work.into_iter().enumerate() {
        shares[i % threads].push(w);
    }
    std::thread::scope(|s| {
        for share in shares {
            s.spawn(move || {
                for (chunk_seed, init, out) in share {
                    fill(out, init, chunk_seed);
                }
            });
        }
    });
    specs
        .iter()
        .zip(buffers)
        .map(|(spec, buf)| {
            let t = Tensor::from_vec(buf, spec.shape.as_slice(), &Device::Cpu)
                .with_context(|| format!("building synthetic tensor {}", spec.name))?;
            Ok((spec.name.clone(), t))
        })
        .collect()
}

/// Fills `out` from its own generator. Random values are an Irwin–Hall sum of four uniforms
/// (one 64-bit draw), rescaled to unit variance: close to a normal, bounded at ±3.5σ, and far
/// cheaper than Box–Muller, so the 0.79 B weights take seconds.
fn fill(out: &mut [bf16], init: Init, seed: u64) {
    match init {
        Init::Ones => out.fill(bf16::ONE),
        Init::Random => {
            let mut state = seed;
            // Sum of four U[0, 65535] has mean 131070 and variance 4 * (65536² - 1) / 12.
            let scale = WEIGHT_STD * (3.0f32).sqrt() / 65536.0;
            for x in out.iter_mut() {
                let r = splitmix64(&mut state);
                let s = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
                *x = bf16::from_f32((s as f32 - 131070.0) * scale);
            }
        }
    }
}

/// SplitMix64: a fast, well-mixed generator that also turns any seed into a good state.
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a: a stable hash of a tensor's name (std's hasher is not stable across releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes the model as a hub-layout checkpoint other engines can load: `config.json`,
/// `model.safetensors`, and the tokenizer files of `tokenizer_dir` (same 32,000 vocabulary).
pub fn save(
    dir: &Path,
    kind: SyntheticKind,
    dims: SyntheticDims,
    tensors: &HashMap<String, Tensor>,
    tokenizer_dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = dir.join("config.json");
    std::fs::write(&config, config_json(kind, dims))
        .with_context(|| format!("writing {}", config.display()))?;
    let weights = dir.join("model.safetensors");
    candle_core::safetensors::save(tensors, &weights)
        .with_context(|| format!("writing {}", weights.display()))?;
    // safetensors writes through a private temporary file (mode 0600); give the weights the
    // umask's mode, as config.json has, so another user's engine can read the checkpoint.
    std::fs::metadata(&config)
        .and_then(|m| std::fs::set_permissions(&weights, m.permissions()))
        .with_context(|| format!("setting the mode of {}", weights.display()))?;
    for (file, required) in [
        ("tokenizer.json", true),
        ("tokenizer_config.json", false),
        ("generation_config.json", false),
    ] {
        let from = tokenizer_dir.join(file);
        if !required && !from.is_file() {
            continue;
        }
        std::fs::copy(&from, dir.join(file))
            .with_context(|| format!("copying {} into {}", from.display(), dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::{self, WeightSource};
    use crate::model::{Batch, MoeModel};
    use candle_core::DType;

    fn small(kind: SyntheticKind) -> SyntheticDims {
        SyntheticDims {
            hidden: 64,
            intermediate: 96,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 1000,
            max_positions: 256,
            ..kind.full_dims()
        }
    }

    fn logits(cfg: &MoeConfig, tensors: HashMap<String, Tensor>, dtype: DType) -> Vec<f32> {
        let weights = WeightSource::from_tensors(tensors, &Device::Cpu, dtype).unwrap();
        let model = MoeModel::load(cfg, &weights).unwrap();
        let cache = model.new_kv_cache(2, 16, None).unwrap();
        let mut batch = Batch::default();
        let tokens: Vec<u32> = (0..20).map(|i| (i * 37 + 5) % 1000).collect();
        batch.push_seq(&tokens, tokens.len(), vec![0, 1]);
        batch.logits_rows = vec![0, tokens.len() - 1];
        let out = model.forward(&batch, &cache).unwrap();
        assert_eq!(out.dims(), &[2, cfg.vocab_size]);
        out.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn scaled_down_models_load_and_give_finite_logits() {
        for kind in [SyntheticKind::Mixtral, SyntheticKind::Dbrx] {
            let (cfg, tensors) = synthetic_with(kind, 7, small(kind)).unwrap();
            assert_eq!(cfg.num_experts, kind.full_dims().experts);
            for dtype in [DType::F32, DType::BF16] {
                let l = logits(&cfg, tensors.clone(), dtype);
                assert!(l.iter().all(|x| x.is_finite()), "{kind:?} {dtype:?}");
                // Random weights still give a spread of logits, not a constant.
                let spread = l.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(spread > 1e-3, "{kind:?} {dtype:?}: {spread}");
            }
        }
    }

    #[test]
    fn weights_are_deterministic_and_near_the_intended_scale() {
        let dims = small(SyntheticKind::Mixtral);
        let (_, a) = synthetic_with(SyntheticKind::Mixtral, 1, dims).unwrap();
        let (_, b) = synthetic_with(SyntheticKind::Mixtral, 1, dims).unwrap();
        let (_, c) = synthetic_with(SyntheticKind::Mixtral, 2, dims).unwrap();
        let name = "model.layers.1.block_sparse_moe.experts.3.w2.weight";
        let vals = |m: &HashMap<String, Tensor>| -> Vec<f32> {
            m[name]
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .unwrap()
        };
        assert_eq!(vals(&a), vals(&b));
        assert_ne!(vals(&a), vals(&c));
        let v = vals(&a);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt();
        assert!(
            mean.abs() < 1e-3 && (std - WEIGHT_STD).abs() < 2e-3,
            "{mean} {std}"
        );
        let norm = a["model.layers.0.input_layernorm.weight"]
            .to_dtype(DType::F32)
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap();
        assert!(norm.iter().all(|&x| x == 1.0));
    }

    #[test]
    fn saved_checkpoint_loads_through_the_normal_path() {
        let kind = SyntheticKind::Dbrx;
        let dims = small(kind);
        let (cfg, tensors) = synthetic_with(kind, 3, dims).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tok = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-dbrx");
        save(dir.path(), kind, dims, &tensors, &tok).unwrap();
        let files = loader::from_dir(dir.path()).unwrap();
        let cfg2 = MoeConfig::from_file(&files.config).unwrap();
        assert_eq!(cfg2.num_experts, cfg.num_experts);
        assert!(files.tokenizer_config.is_some() && files.generation_config.is_some());
        let weights = WeightSource::open(&files.weights, &Device::Cpu, DType::F32).unwrap();
        MoeModel::load(&cfg2, &weights).unwrap();
        // The weights are as readable as the rest of the checkpoint (not the 0600 of a
        // temporary file).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |f: &str| {
                let m = std::fs::metadata(dir.path().join(f)).unwrap();
                m.permissions().mode() & 0o777
            };
            assert_eq!(mode("model.safetensors"), mode("config.json"));
        }
    }
}
