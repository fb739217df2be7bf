//! Choosing the compute dtype (`--dtype`).

use candle_core::{DType, Device};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DTypeArg {
    /// The checkpoint's `torch_dtype` on a GPU, f32 on CPU.
    #[default]
    Auto,
    /// 32-bit float: exact parity with the reference, the CPU default.
    F32,
    /// bfloat16: half the memory; residual stream, norms and LM head stay f32.
    Bf16,
    /// float16.
    F16,
}

/// Resolves `--dtype` for a device. CPU defaults to f32: candle's CPU bf16 matmuls are slow and
/// f32 is what the parity tests pin down.
pub fn select_dtype(arg: DTypeArg, torch_dtype: Option<&str>, device: &Device) -> DType {
    match arg {
        DTypeArg::F32 => DType::F32,
        DTypeArg::Bf16 => DType::BF16,
        DTypeArg::F16 => DType::F16,
        DTypeArg::Auto if device.is_cpu() => DType::F32,
        DTypeArg::Auto => match torch_dtype {
            Some("float32") => DType::F32,
            Some("float16") => DType::F16,
            _ => DType::BF16,
        },
    }
}
