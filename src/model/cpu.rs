//! The SIMD levels this CPU runs, detected once for every kernel. The kernels ask on every
//! call (the quantized products on every run of groups), and five detections a call showed in
//! a decode profile (~0.3%, session 21); one table also keeps each level's meaning in one place.

/// The x86 levels the kernels are compiled for, each implying the one before.
#[derive(Clone, Copy, Debug, Default)]
pub struct Simd {
    /// AVX2 with FMA and F16C: the 8-lane kernels.
    pub avx2: bool,
    /// AVX-512 F, BW and VL as well: the 16-lane kernels (masked 16-bit loads and stores).
    pub avx512: bool,
    /// AVX-512 VNNI as well: the packed integer kernels.
    pub vnni: bool,
}

/// This CPU's [`Simd`] levels (all false off x86-64).
pub fn simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        static SIMD: std::sync::LazyLock<Simd> = std::sync::LazyLock::new(|| {
            use std::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            let avx512 = avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl");
            let vnni = avx512 && has!("avx512vnni");
            Simd { avx2, avx512, vnni }
        });
        *SIMD
    }
    #[cfg(not(target_arch = "x86_64"))]
    Simd::default()
}

#[cfg(test)]
mod tests {
    /// The levels nest: a kernel that checks a higher one may use every lower one's code.
    #[test]
    fn levels_nest() {
        let s = super::simd();
        assert!(!s.vnni || s.avx512);
        assert!(!s.avx512 || s.avx2);
    }
}
