//! The engine: scheduling, KV blocks, sampling.
