//! Clearing the upper halves of the AVX registers after faer's kernels.
//!
//! faer's GEMM microkernels (AVX2 / AVX-512) return with the upper halves of the vector
//! registers still in use. Until a `vzeroupper`, every legacy-SSE instruction that follows
//! (the default x86-64 build of this crate, and glibc's `exp`, `tanh`, ...) runs with a
//! dependency on those upper halves: measured here, an `exp` took 225 ns instead of 7 ns
//! after a 64 x 64 GEMM, and the elementwise passes between the GEMMs of a DEQ iteration
//! slowed down alike. Every call into faer that may run such kernels is followed by
//! [`clear_upper_state`].
//!
//! The other direction: [`with_avx2`] runs a hot loop compiled for AVX2 and FMA when the CPU
//! has them, where the default x86-64 build has SSE2 only.

/// Clears the upper halves of the AVX registers (`vzeroupper`) when the CPU has AVX; does
/// nothing elsewhere. Cheap (the feature test is cached, the instruction takes a cycle).
#[inline]
pub fn clear_upper_state() {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX (tested above). `vzeroupper` zeroes bits 128 and up
            // of the vector registers; the call is an opaque function call, across which
            // the ABI keeps no value in those bits.
            unsafe { zero_upper() }
        }
    }
}

/// Runs `f` compiled for AVX2 and FMA when the CPU has them, as it is otherwise.
///
/// The default x86-64 target has SSE2 only, so the elementwise passes and small reductions
/// between GEMMs run on 2-wide vectors; inlined into a function with these features they
/// use 4-wide ones. Results do not change: Rust never contracts `a * b + c` into an FMA nor
/// reassociates floating-point sums, so the instructions compute the same operations in
/// the same order, only more of them at once.
///
/// `f` and the functions it calls must be inlined into the feature-enabled frame for this
/// to take effect: pass an `#[inline(always)]` closure and keep its helpers
/// `#[inline(always)]`.
///
/// A loop over several slices may still stay scalar inside `f`: rustc inlines
/// `#[inline(always)]` helpers before LLVM sees their arguments' no-alias attributes, and
/// without them LLVM assumes a store through one slice may change another. Such a kernel
/// gets a non-inlined `#[target_feature(enable = "avx2,fma")]` function of its own, chosen by
/// [`has_avx2_fma`]: its slices are then arguments again, and its loop vectorises.
#[inline(always)]
pub fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (tested above), the only requirement of a
            // `target_feature` function.
            return unsafe { run_with_avx2(f) };
        }
    }
    f()
}

/// Whether the CPU has AVX2 and FMA (the features of [`with_avx2`]); `false` off x86-64.
/// Cheap: the feature test is cached.
#[inline(always)]
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn zero_upper() {
    std::arch::x86_64::_mm256_zeroupper();
}

/// Runs [`clear_upper_state`] when dropped: one at the top of a function that calls faer
/// clears the state on every way out of it, errors and early returns included.
#[derive(Debug)]
pub struct UpperStateGuard;

impl Drop for UpperStateGuard {
    #[inline]
    fn drop(&mut self) {
        clear_upper_state();
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// The AVX components in use (XINUSE, `xgetbv` with `ecx = 1`): bit 2 the upper halves
    /// of the YMM registers, bit 6 the upper halves of ZMM0-15. `None` where the CPU cannot
    /// report it.
    fn upper_state_in_use() -> Option<u64> {
        use std::arch::x86_64::__cpuid_count;
        if !std::arch::is_x86_feature_detected!("xsave") {
            return None;
        }
        // CPUID.(EAX=0DH, ECX=1):EAX bit 2: XGETBV with ECX = 1 is supported.
        let leaf = __cpuid_count(0xD, 1);
        if leaf.eax & (1 << 2) == 0 {
            return None;
        }
        #[target_feature(enable = "xsave")]
        fn xinuse() -> u64 {
            // SAFETY: xsave is enabled for this function and XGETBV(1) is supported.
            unsafe { std::arch::x86_64::_xgetbv(1) }
        }
        // SAFETY: the CPU has xsave (tested above).
        Some(unsafe { xinuse() } & ((1 << 2) | (1 << 6)))
    }

    #[test]
    fn gemm_returns_with_the_upper_state_clear() {
        let a = Array2::from_shape_fn((64, 64), |(i, j)| ((i + 2 * j) % 7) as f64);
        let mut c = Array2::zeros((64, 64));
        // faer's own matmul, for the record: on AVX-512 and AVX2 machines its kernels leave
        // the upper halves in use, which is what the wrappers clear.
        faer::linalg::matmul::matmul(
            faer_ext::IntoFaer::into_faer(c.view_mut()),
            faer::Accum::Replace,
            faer_ext::IntoFaer::into_faer(a.view()),
            faer_ext::IntoFaer::into_faer(a.view()),
            1.0,
            faer::Par::Seq,
        );
        let raw = upper_state_in_use();
        crate::gemm::gemm(1.0, a.view(), a.view(), false, c.view_mut());
        let wrapped = upper_state_in_use();
        eprintln!("upper state after faer's matmul: {raw:?}, after clarke's gemm: {wrapped:?}");
        if let Some(state) = wrapped {
            assert_eq!(state, 0, "clarke's gemm left the upper AVX state in use");
        }
        clear_upper_state();
        assert_eq!(upper_state_in_use().unwrap_or(0), 0);
    }
}
