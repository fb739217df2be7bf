//! The paged KV cache: per layer, one K and one V tensor of `num_blocks * block_size` slots.
//!
//! Which blocks belong to which sequence is the block manager's business (engine); the model
//! only reads and writes the slots a batch's block tables point at.

use crate::config::MoeConfig;
use candle_core::{DType, Device, Result, Tensor};

pub const DEFAULT_BLOCK_SIZE: usize = 16;

pub struct KvCache {
    /// Per layer `[num_blocks * block_size, kv_heads * head_dim]`.
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
}

impl KvCache {
    pub fn new(
        cfg: &MoeConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            candle_core::bail!("the KV cache needs at least one block of at least one token");
        }
        let slots = num_blocks * block_size;
        let mut k = Vec::with_capacity(cfg.num_layers);
        let mut v = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            k.push(lazy_zeros(slots, cfg.kv_dim(), dtype, device)?);
            v.push(lazy_zeros(slots, cfg.kv_dim(), dtype, device)?);
        }
        Ok(Self {
            k,
            v,
            block_size,
            num_blocks,
        })
    }

    /// Bytes one block takes across all layers, K and V: what a memory budget is divided by.
    pub fn bytes_per_block(cfg: &MoeConfig, block_size: usize, dtype: DType) -> usize {
        2 * cfg.num_layers * block_size * cfg.kv_dim() * dtype.size_in_bytes()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    pub(crate) fn layer(&self, i: usize) -> (&Tensor, &Tensor) {
        (&self.k[i], &self.v[i])
    }
}

/// Zeros that cost no memory until written. On the CPU candle writes every element of bf16 /
/// f16 zeros (f32 ones come from the allocator's zeroed pages), so a `--kv-cache-memory 8GiB`
/// cache in bf16 took 8 GiB of RSS at start-up; zeroed `u16`s are lazy like f32.
fn lazy_zeros(rows: usize, cols: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    fn zeroed<T>(n: usize) -> Vec<T> {
        // `vec![0u16; n]` is one zeroed allocation (calloc); bf16 and f16 are
        // `repr(transparent)` over u16, and all-zero bits are +0.0 in both.
        let mut v = std::mem::ManuallyDrop::new(vec![0u16; n]);
        let (ptr, len, cap) = (v.as_mut_ptr(), v.len(), v.capacity());
        // SAFETY: same size and alignment as u16 (asserted at compile time below), the
        // allocation is moved, not copied, and zero bits are a valid value of T.
        unsafe { Vec::from_raw_parts(ptr.cast::<T>(), len, cap) }
    }
    const _: () = assert!(
        std::mem::size_of::<half::bf16>() == 2
            && std::mem::align_of::<half::bf16>() == std::mem::align_of::<u16>()
            && std::mem::size_of::<half::f16>() == 2
            && std::mem::align_of::<half::f16>() == std::mem::align_of::<u16>()
    );
    let n = rows * cols;
    match (dtype, device) {
        (DType::BF16, Device::Cpu) => {
            Tensor::from_vec(zeroed::<half::bf16>(n), (rows, cols), device)
        }
        (DType::F16, Device::Cpu) => Tensor::from_vec(zeroed::<half::f16>(n), (rows, cols), device),
        _ => Tensor::zeros((rows, cols), dtype, device),
    }
}
