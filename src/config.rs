//! `config.json` of either supported family, read into one [`MoeConfig`].
//!
//! The serving model never looks at the raw JSON: everything that differs between Mixtral and
//! DBRX (norm kind, fused QKV, clip_qkv, router normalisation, weight names) is decided here.

use serde::Deserialize;
use std::path::Path;

/// The architectures this build can serve, as written in `config.json`'s `architectures`.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["MixtralForCausalLM", "DbrxForCausalLM"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid config: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("unsupported architecture {found:?} in {path}; supported: {}", SUPPORTED_ARCHITECTURES.join(", "))]
    Unsupported { path: String, found: Vec<String> },
    #[error("invalid config {path}: {msg}")]
    Invalid { path: String, msg: String },
    #[error("{0}")]
    Override(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Mixtral,
    Dbrx,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    /// RMSNorm with a learned scale (Mixtral).
    Rms { eps: f64 },
    /// LayerNorm with a learned scale and no bias (DBRX).
    LayerNormNoBias { eps: f64 },
}

/// How the top-k routing weights are normalised after the softmax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RouterNorm {
    /// Keep the softmax probabilities as they are.
    None,
    /// Divide by the p-norm of the top-k weights (Mixtral: p = 1, i.e. renormalise to sum 1).
    PNorm(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    /// The tanh approximation of GELU.
    GeluTanh,
}

/// One description of a sparse MoE decoder, whatever family it came from.
#[derive(Debug, Clone)]
pub struct MoeConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Hidden size of one expert's FFN.
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    /// Mixtral-style sliding-window attention: a query sees only the last `n` positions.
    pub sliding_window: Option<usize>,
    pub norm: NormKind,
    /// DBRX clamps the fused QKV projection to ±clip_qkv.
    pub clip_qkv: Option<f64>,
    pub num_experts: usize,
    pub experts_per_token: usize,
    pub router_norm: RouterNorm,
    pub activation: Activation,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// `torch_dtype` of the checkpoint, if given ("bfloat16", "float16", "float32").
    pub torch_dtype: Option<String>,
}

impl MoeConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: p.clone(),
            source,
        })?;
        Self::from_json_str(&text, &p)
    }

    /// Parses `config.json` text; `origin` names the file in error messages.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let json = |source| ConfigError::Json {
            path: origin.to_string(),
            source,
        };
        let head: Head = serde_json::from_str(text).map_err(json)?;
        let arch = head.architectures.clone().unwrap_or_default();
        let family = if arch.iter().any(|a| a == "MixtralForCausalLM") {
            Family::Mixtral
        } else if arch.iter().any(|a| a == "DbrxForCausalLM") {
            Family::Dbrx
        } else if arch.is_empty() {
            match head.model_type.as_deref() {
                Some("mixtral") => Family::Mixtral,
                Some("dbrx") => Family::Dbrx,
                _ => {
                    return Err(ConfigError::Unsupported {
                        path: origin.into(),
                        found: arch,
                    })
                }
            }
        } else {
            return Err(ConfigError::Unsupported {
                path: origin.into(),
                found: arch,
            });
        };
        let cfg = match family {
            Family::Mixtral => serde_json::from_str::<MixtralJson>(text)
                .map_err(json)?
                .into_config(origin)?,
            Family::Dbrx => serde_json::from_str::<DbrxJson>(text)
                .map_err(json)?
                .into_config(origin)?,
        };
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Replaces experts-per-token (the `--experts-per-token` override), validated.
    pub fn with_experts_per_token(mut self, k: usize) -> Result<Self, ConfigError> {
        if k == 0 || k > self.num_experts {
            return Err(ConfigError::Override(format!(
                "--experts-per-token must be between 1 and the model's {} experts, got {k}",
                self.num_experts
            )));
        }
        self.experts_per_token = k;
        Ok(self)
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |msg: String| {
            Err(ConfigError::Invalid {
                path: origin.into(),
                msg,
            })
        };
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden size", self.hidden_size),
            ("expert ffn size", self.intermediate_size),
            ("number of layers", self.num_layers),
            ("number of heads", self.num_heads),
            ("number of kv heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("number of experts", self.num_experts),
            ("experts per token", self.experts_per_token),
        ];
        for (name, v) in positive {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} attention heads are not a multiple of {} kv heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            ));
        }
        if self.experts_per_token > self.num_experts {
            return bad(format!(
                "{} experts per token but only {} experts",
                self.experts_per_token, self.num_experts
            ));
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window must be positive or null".into());
        }
        if let Some(c) = self.clip_qkv {
            if c <= 0.0 {
                return bad(format!("clip_qkv must be positive, got {c}"));
            }
        }
        if let RouterNorm::PNorm(p) = self.router_norm {
            if p <= 0.0 {
                return bad(format!(
                    "expert weight normalisation p must be positive, got {p}"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct Head {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
}

/// Token ids may be a single integer or a list (EOS in particular).
#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
pub enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![*x],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
}

#[derive(Deserialize)]
struct MixtralJson {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    sliding_window: Option<usize>,
    num_experts_per_tok: usize,
    num_local_experts: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

fn activation(name: Option<&str>, origin: &str) -> Result<Activation, ConfigError> {
    match name.unwrap_or("silu") {
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu" => Ok(Activation::Gelu),
        "gelu_pytorch_tanh" | "gelu_new" => Ok(Activation::GeluTanh),
        other => Err(ConfigError::Invalid {
            path: origin.into(),
            msg: format!("unsupported activation {other:?} (supported: silu, gelu)"),
        }),
    }
}

impl MixtralJson {
    fn into_config(self, origin: &str) -> Result<MoeConfig, ConfigError> {
        let head_dim = self.head_dim.unwrap_or_else(|| {
            self.hidden_size
                .checked_div(self.num_attention_heads)
                .unwrap_or(0)
        });
        let rope_theta = self
            .rope_parameters
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(1e6);
        Ok(MoeConfig {
            family: Family::Mixtral,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(32768),
            rope_theta,
            sliding_window: self.sliding_window,
            norm: NormKind::Rms {
                eps: self.rms_norm_eps.unwrap_or(1e-5),
            },
            clip_qkv: None,
            num_experts: self.num_local_experts,
            experts_per_token: self.num_experts_per_tok,
            router_norm: RouterNorm::PNorm(1.0),
            activation: activation(self.hidden_act.as_deref(), origin)?,
            tie_word_embeddings: self.tie_word_embeddings,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_id.map(|e| e.to_vec()).unwrap_or_default(),
            torch_dtype: self.torch_dtype.or(self.dtype),
        })
    }
}

#[derive(Deserialize)]
struct DbrxJson {
    d_model: usize,
    n_heads: usize,
    n_layers: usize,
    max_seq_len: Option<usize>,
    vocab_size: usize,
    attn_config: DbrxAttn,
    ffn_config: DbrxFfn,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    rope_parameters: Option<RopeParameters>,
}

#[derive(Deserialize)]
struct DbrxAttn {
    kv_n_heads: Option<usize>,
    clip_qkv: Option<f64>,
    rope_theta: Option<f64>,
}

#[derive(Deserialize)]
struct DbrxActFn {
    name: Option<String>,
}

#[derive(Deserialize)]
struct DbrxFfn {
    ffn_hidden_size: usize,
    moe_num_experts: usize,
    moe_top_k: usize,
    /// `null` means the top-k softmax weights are used as they are.
    #[serde(default = "default_pnorm")]
    moe_normalize_expert_weights: Option<f64>,
    ffn_act_fn: Option<DbrxActFn>,
}

fn default_pnorm() -> Option<f64> {
    Some(1.0)
}

impl DbrxJson {
    fn into_config(self, origin: &str) -> Result<MoeConfig, ConfigError> {
        let head_dim = self.d_model.checked_div(self.n_heads).unwrap_or(0);
        // The checkpoint's own attn_config.rope_theta is the truth (see the fixtures' README).
        let rope_theta = self
            .attn_config
            .rope_theta
            .or(self.rope_parameters.and_then(|r| r.rope_theta))
            .unwrap_or(10000.0);
        let act = self.ffn_config.ffn_act_fn.and_then(|a| a.name);
        Ok(MoeConfig {
            family: Family::Dbrx,
            vocab_size: self.vocab_size,
            hidden_size: self.d_model,
            intermediate_size: self.ffn_config.ffn_hidden_size,
            num_layers: self.n_layers,
            num_heads: self.n_heads,
            num_kv_heads: self.attn_config.kv_n_heads.unwrap_or(1),
            head_dim,
            max_position_embeddings: self.max_seq_len.unwrap_or(2048),
            rope_theta,
            sliding_window: None,
            norm: NormKind::LayerNormNoBias { eps: 1e-5 },
            clip_qkv: self.attn_config.clip_qkv,
            num_experts: self.ffn_config.moe_num_experts,
            experts_per_token: self.ffn_config.moe_top_k,
            router_norm: match self.ffn_config.moe_normalize_expert_weights {
                Some(p) => RouterNorm::PNorm(p),
                None => RouterNorm::None,
            },
            activation: activation(act.as_deref(), origin)?,
            tie_word_embeddings: self.tie_word_embeddings,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_id.map(|e| e.to_vec()).unwrap_or_default(),
            torch_dtype: self.torch_dtype.or(self.dtype),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_architecture_names_supported_ones() {
        let err = MoeConfig::from_json_str(r#"{"architectures":["LlamaForCausalLM"]}"#, "c.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("LlamaForCausalLM"), "{err}");
        assert!(err.contains("MixtralForCausalLM") && err.contains("DbrxForCausalLM"));
    }

    #[test]
    fn rope_parameters_and_eos_list_are_accepted() {
        let cfg = MoeConfig::from_json_str(
            r#"{"architectures":["MixtralForCausalLM"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,
            "num_key_value_heads":1,"num_experts_per_tok":1,"num_local_experts":3,
            "sliding_window":null,"rope_parameters":{"rope_theta":5.0,"rope_type":"default"},
            "eos_token_id":[2,7]}"#,
            "c.json",
        )
        .unwrap();
        assert_eq!(cfg.rope_theta, 5.0);
        assert_eq!(cfg.eos_token_ids, vec![2, 7]);
        assert_eq!(cfg.head_dim, 4);
        assert!(cfg.clone().with_experts_per_token(4).is_err());
        assert_eq!(cfg.with_experts_per_token(3).unwrap().experts_per_token, 3);
    }

    #[test]
    fn dbrx_null_normalisation_means_none() {
        let cfg = MoeConfig::from_json_str(
            r#"{"architectures":["DbrxForCausalLM"],"d_model":8,"n_heads":2,"n_layers":1,
            "vocab_size":10,"attn_config":{"kv_n_heads":1,"clip_qkv":null,"rope_theta":7.0,"return_dict":true},
            "ffn_config":{"ffn_hidden_size":4,"moe_num_experts":4,"moe_top_k":3,
            "moe_normalize_expert_weights":null,"ffn_act_fn":{"name":"silu"}}}"#,
            "c.json",
        )
        .unwrap();
        assert_eq!(cfg.router_norm, RouterNorm::None);
        assert_eq!(cfg.rope_theta, 7.0);
        assert_eq!(cfg.clip_qkv, None);
        assert_eq!(cfg.experts_per_token, 3);
    }
}
