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

/// Pins the CPU thread count once per process and returns it: `threads` (the `--threads`
/// flag) if given, else `RAYON_NUM_THREADS`, else candle's count of physical cores (as
/// llama.cpp's default: a second hyperthread per core only competes for the same vector units).
///
/// candle asks for the count on every matrix product and, unless `RAYON_NUM_THREADS` is set,
/// works it out by reading `/proc/cpuinfo`: on the tiny models that was most of a decode step's
/// time. Every pool (the engine's, candle's) sizes itself from it. Call at start-up, before
/// other threads exist.
pub fn init_cpu_threads(threads: Option<usize>) -> usize {
    if let Some(n) = threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    } else if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    candle_core::utils::get_num_threads()
}
