//! The commands: each composes loader → model → engine (→ server). Nothing below calls up here.

pub mod run;

use crate::config::MoeConfig;
use crate::loader::{self, DTypeArg, ModelFiles, WeightSource};
use crate::model::{MoeModel, DEFAULT_BLOCK_SIZE};
use crate::text::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::Device;
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

    /// Override the number of experts each token is routed to (1..=number of experts).
    #[arg(long)]
    pub experts_per_token: Option<usize>,

    /// Memory for the KV cache, e.g. 512MiB or 4GiB; it sets the number of KV blocks.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub kv_cache_memory: u64,

    /// Tokens per KV cache block.
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE, value_parser = clap::value_parser!(usize))]
    pub block_size: usize,

    /// A chat template file (Jinja) to use instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
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
    /// KV blocks the memory budget buys.
    pub num_blocks: usize,
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
            ?device,
            "loading"
        );
        let weights = WeightSource::open(&files.weights, &device, dtype)?;
        let model = MoeModel::load(&cfg, &weights)
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
        if self.block_size == 0 {
            bail!("--block-size must be at least 1");
        }
        let per_block = model.kv_bytes_per_block(self.block_size) as u64;
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
            "KV cache: {} in {num_blocks} blocks of {} tokens",
            bytesize::ByteSize(num_blocks as u64 * per_block),
            self.block_size
        );
        Ok(Loaded {
            files,
            model,
            tokenizer,
            num_blocks,
        })
    }
}

/// Token ids that end a generation: the tokenizer's and generation config's EOS, and the
/// model config's.
pub fn stop_token_ids(loaded: &Loaded) -> Vec<u32> {
    let mut ids: Vec<u32> = loaded.tokenizer.eos_token_ids().to_vec();
    ids.extend(&loaded.model.config().eos_token_ids);
    ids.sort_unstable();
    ids.dedup();
    ids
}
