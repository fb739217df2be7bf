//! glibc malloc settings around a model's load and its forward passes.
//!
//! A forward pass allocates and frees activation buffers of megabytes every layer (prefill of
//! 512 tokens: 2-16 MB each). With glibc's defaults those keep coming back as freshly mapped
//! zero pages, one 4 KB page fault each, because a buffer over the mmap threshold is its own
//! mapping and freed memory at the top of the heap is handed back to the OS past twice that
//! threshold. On the CI machine a 512-token prefill spent a third of its time in those faults.
//! Once a model is loaded, freed memory stays mapped for the next pass. The load itself keeps
//! the defaults: its freed f32 copies (quantization on load) must go back to the OS.

/// For the forward passes: allocations up to 32 MiB come from the heap, the heap grows 256 MiB
/// at a time (address space; pages count once touched), and free memory at its top is kept up
/// to 512 MiB. q4k prefill of 512 tokens: 1,066-1,212 tok/s with the defaults, 1,561 with a
/// 16 MiB pad, 1,683-1,768 with 64 MiB, 1,771-1,864 with 256 MiB.
pub fn for_serving() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tunables; any value is valid to pass.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Before loading another model in the same process (the benchmark's configurations): large
/// allocations are their own mappings again and free memory goes back to the OS, the kept
/// memory of the last passes included.
pub fn for_loading() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: as above; malloc_trim only returns free memory to the OS.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_TOP_PAD, 0);
        libc::malloc_trim(0);
    }
}
