//! mixserve: an inference server for sparse Mixture-of-Experts language models.
//!
//! Layers, each knowing only the one below: `cli` → `engine` → `model` (+ `text`), with
//! `loader` handing out files and weights and `config` describing the architecture.

pub mod cli;
pub mod config;
pub mod engine;
pub mod loader;
pub mod model;
pub mod server;
pub mod text;
