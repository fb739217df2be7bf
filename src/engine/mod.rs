//! Turning prompts into tokens: KV blocks, sampling, and the generation loop.

pub mod block_manager;
pub mod generator;
pub mod sampler;

pub use block_manager::{BlockError, BlockManager};
pub use generator::{FinishReason, GenerateError, GenerateParams, GenerateStats, Generator};
pub use sampler::{Sampler, SamplingParams};
