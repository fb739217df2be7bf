//! The unit tests of `bench/serve.rs` (percentiles, SSE parsing, stream timing, prompts): a
//! harness-less benchmark never runs its own `#[test]`s, so they are compiled and run here.

#[path = "../bench/serve.rs"]
#[allow(dead_code)]
mod serve;
