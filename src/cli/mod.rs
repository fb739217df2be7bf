//! The commands: each composes loader → model → engine (→ server). Nothing below calls up here.

pub mod bench;
mod malloc;
pub mod run;
pub mod serve;
pub mod synthetic;

use crate::config::MoeConfig;
use crate::engine::{Engine, EngineConfig, SchedulerConfig};
use crate::loader::{self, DTypeArg, ModelFiles, WeightSource};
use crate::model::{MoeModel, Quant, DEFAULT_BLOCK_SIZE};
use crate::text::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::path::PathBuf;

/// Where the model comes from and how it runs; shared by every command.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A local model directory or a hub repo id (owner/name[@revision]). Hub files go through
    /// the standard Hugging Face cache (HF_HOME, HF_HUB_CACHE, HF_TOKEN; HF_HUB_OFFLINE=1 uses
    /// the cache only).
    #[arg(
        long,
        short = 'm',
        default_value = "models/tiny-mixtral",
        env = "MIXSERVE_MODEL"
    )]
    pub model: String,

    /// Compute dtype: auto is the checkpoint's dtype on a GPU and f32 on CPU.
    #[arg(long, value_enum, default_value_t = DTypeArg::Auto)]
    pub dtype: DTypeArg,

    /// Device: cpu, cuda[:N] (build with --features cuda) or metal[:N] (--features metal).
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Quantize the attention, expert and LM-head weights as they load (llama.cpp's
    /// formats); embeddings, norms and routers stay unquantized.
    #[arg(long, value_enum)]
    pub quant: Option<Quant>,

    /// Override the number of experts each token is routed to (1..=number of experts).
    #[arg(long)]
    pub experts_per_token: Option<usize>,

    /// A chat template file (Jinja) to use instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,

    #[command(flatten)]
    pub engine: EngineArgs,
}

/// How the engine batches and caches.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Memory for the KV cache, e.g. 512MiB or 4GiB; it sets the number of KV blocks.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub kv_cache_memory: u64,

    /// Tokens per KV cache block.
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,

    /// Most tokens (decode steps plus prefill chunks) in one forward pass; longer prompts
    /// are prefilled in chunks of this size.
    #[arg(long, default_value_t = 512)]
    pub max_num_batched_tokens: usize,

    /// Most sequences decoding at once.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,

    /// Turn off prefix caching (reuse of the KV blocks of shared prompt prefixes).
    #[arg(long)]
    pub no_prefix_cache: bool,

    /// Element type of the KV cache: auto keeps the compute dtype (f32 on CPU, exact parity),
    /// but takes f16 for weights quantized to f32 activations (`--quant`, as llama.cpp's
    /// default cache); f16 or bf16 halve its memory (twice the tokens in --kv-cache-memory)
    /// and the bytes each decode step reads from it, at a rounding of the keys and values.
    #[arg(long, value_enum, default_value_t = KvCacheDtype::Auto)]
    pub kv_cache_dtype: KvCacheDtype,

    /// Let the CPU pool's idle workers sleep between the parallel parts of a step instead of
    /// polling for work (as llama.cpp's `--poll 0`): less CPU burnt on a shared machine,
    /// slower steps (waking a sleeping core costs tens of microseconds, dozens of times a step).
    #[arg(long)]
    pub no_busy_poll: bool,
}

/// `--kv-cache-dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvCacheDtype {
    /// The model's compute dtype; f16 where that is f32 and the weights are quantized.
    Auto,
    F32,
    F16,
    Bf16,
}

impl KvCacheDtype {
    /// The cache's dtype for a model computing in `compute`, its weights `quantized` or not.
    /// Quantized weights have given up exact parity already: an f16 cache moves the q8_0
    /// fixtures' prompt logprobs by under 0.001 and halves the bytes a decode step reads from
    /// it, which at long contexts are most of the step (16 sequences at ~590 tokens of
    /// context, q4k: 12.7 vs 14.7 ms a step).
    pub fn resolve(self, compute: DType, quantized: bool) -> DType {
        match self {
            Self::Auto if quantized && compute == DType::F32 => DType::F16,
            Self::Auto => compute,
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size like 512MiB or 4GiB: {e}"))
}

pub fn parse_device(s: &str) -> Result<Device> {
    let (kind, ordinal) = match s.split_once(':') {
        Some((k, n)) => (
            k,
            n.parse::<usize>()
                .with_context(|| format!("device ordinal in {s:?} is not a number"))?,
        ),
        None => (s, 0),
    };
    Ok(match kind {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(ordinal).with_context(|| {
            format!("cannot open {s} (is this build made with --features cuda?)")
        })?,
        "metal" => Device::new_metal(ordinal).with_context(|| {
            format!("cannot open {s} (is this build made with --features metal?)")
        })?,
        other => bail!("unknown device {other:?}: use cpu, cuda[:N] or metal[:N]"),
    })
}

/// A model ready to serve: weights, tokenizer and the files they came from.
pub struct Loaded {
    pub files: ModelFiles,
    pub model: MoeModel,
    pub tokenizer: Tokenizer,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Loaded> {
        let device = parse_device(&self.device)?;
        let files = loader::resolve(&self.model)?;
        let mut cfg = MoeConfig::from_file(&files.config)?;
        if let Some(k) = self.experts_per_token {
            cfg = cfg.with_experts_per_token(k)?;
        }
        let dtype = loader::select_dtype(self.dtype, cfg.torch_dtype.as_deref(), &device);
        tracing::info!(
            model = %files.name,
            family = ?cfg.family,
            layers = cfg.num_layers,
            experts = cfg.num_experts,
            experts_per_token = cfg.experts_per_token,
            ?dtype,
            quant = self.quant.map(Quant::name),
            ?device,
            "loading"
        );
        let weights = WeightSource::open(&files.weights, &device, dtype)?;
        let model = MoeModel::load_quantized(&cfg, &weights, self.quant)
            .with_context(|| format!("building the model from {}", files.dir.display()))?;
        let mut tokenizer = Tokenizer::from_files(
            &files.tokenizer,
            files.tokenizer_config.as_deref(),
            files.generation_config.as_deref(),
        )?;
        if let Some(path) = &self.chat_template {
            let template = crate::text::ChatTemplate::from_file(
                path,
                tokenizer.bos_token().map(str::to_string),
                tokenizer.eos_token().map(str::to_string),
            )?;
            tokenizer = tokenizer.with_chat_template(Some(template));
        }
        // Loaded: from here on, forward passes (see `malloc.rs`).
        malloc::for_serving();
        Ok(Loaded {
            files,
            model,
            tokenizer,
        })
    }

    /// Loads the model and starts the engine on it.
    pub fn start_engine(&self) -> Result<(ModelFiles, Engine)> {
        let loaded = self.load()?;
        let config = self.engine.config(&loaded.model)?;
        let engine = Engine::start(loaded.model, loaded.tokenizer, config)?;
        Ok((loaded.files, engine))
    }
}

impl EngineArgs {
    /// Sizes the KV cache from the memory budget and logs what that buys.
    pub fn config(&self, model: &MoeModel) -> Result<EngineConfig> {
        if self.block_size == 0 {
            bail!("--block-size must be at least 1");
        }
        if self.max_num_batched_tokens == 0 || self.max_num_seqs == 0 {
            bail!("--max-num-batched-tokens and --max-num-seqs must be at least 1");
        }
        let kv_dtype = self
            .kv_cache_dtype
            .resolve(model.dtype(), model.quant().is_some());
        let per_block = model.kv_bytes_per_block(self.block_size, Some(kv_dtype)) as u64;
        let num_blocks = (self.kv_cache_memory / per_block) as usize;
        if num_blocks == 0 {
            bail!(
                "--kv-cache-memory {} is less than one KV block ({} bytes of {} tokens)",
                bytesize::ByteSize(self.kv_cache_memory),
                per_block,
                self.block_size
            );
        }
        tracing::info!(
            blocks = num_blocks,
            tokens = num_blocks * self.block_size,
            "KV cache: {} of {kv_dtype:?} in {num_blocks} blocks of {} tokens ({} tokens)",
            bytesize::ByteSize(num_blocks as u64 * per_block),
            self.block_size,
            num_blocks * self.block_size
        );
        Ok(EngineConfig {
            scheduler: SchedulerConfig {
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_num_seqs: self.max_num_seqs,
            },
            num_blocks,
            block_size: self.block_size,
            prefix_caching: !self.no_prefix_cache,
            max_waiting: None,
            kv_cache_dtype: Some(kv_dtype),
            busy_poll: !self.no_busy_poll,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::KvCacheDtype;
    use candle_core::DType;

    #[test]
    fn auto_kv_cache_is_the_compute_dtype_but_f16_for_quantized_f32() {
        let auto = KvCacheDtype::Auto;
        assert_eq!(auto.resolve(DType::F32, false), DType::F32);
        assert_eq!(auto.resolve(DType::F32, true), DType::F16);
        assert_eq!(auto.resolve(DType::BF16, true), DType::BF16);
        assert_eq!(auto.resolve(DType::BF16, false), DType::BF16);
        // An explicit choice is kept whatever the weights.
        assert_eq!(KvCacheDtype::F32.resolve(DType::F32, true), DType::F32);
        assert_eq!(KvCacheDtype::Bf16.resolve(DType::F32, false), DType::BF16);
    }
}
