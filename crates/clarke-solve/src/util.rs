//! Small vector helpers shared by the solvers.

use clarke_core::{Error, Result, Scalar};
use ndarray::{Array1, ArrayView1};

/// Euclidean norm that neither overflows nor underflows for `f32` vectors with large or tiny
/// entries. NaN if any entry is NaN, infinite if any entry is infinite.
///
/// The fast path is one vectorisable pass `sqrt(x . x)`; only when that sum over- or
/// underflows (or is not finite) does it rescale by the largest magnitude in a second pass.
pub(crate) fn norm2<S: Scalar>(x: ArrayView1<'_, S>) -> S {
    let sum = x.dot(&x);
    let lo = S::min_positive_value() / S::epsilon();
    if sum.is_finite() && sum > lo {
        return sum.sqrt();
    }
    scaled_norm2(x)
}

/// The two-pass norm, scaled by the largest magnitude.
fn scaled_norm2<S: Scalar>(x: ArrayView1<'_, S>) -> S {
    let mut amax = S::zero();
    for &v in x.iter() {
        let a = v.abs();
        if a.is_nan() {
            return a;
        }
        if a > amax {
            amax = a;
        }
    }
    if amax == S::zero() || amax.is_infinite() {
        return amax;
    }
    let inv = S::one() / amax;
    let mut s = S::zero();
    for &v in x.iter() {
        let t = v * inv;
        s += t * t;
    }
    amax * s.sqrt()
}

/// Dot product.
pub(crate) fn dot<S: Scalar>(x: ArrayView1<'_, S>, y: ArrayView1<'_, S>) -> S {
    x.dot(&y)
}

/// `true` if every entry is finite.
pub(crate) fn all_finite<S: Scalar>(x: ArrayView1<'_, S>) -> bool {
    x.iter().all(|v| v.is_finite())
}

/// Widens to `f64`.
pub(crate) fn f<S: Scalar>(x: S) -> f64 {
    x.to_f64_exact()
}

/// Checks a vector length, naming the op and the argument.
pub(crate) fn check_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::shapes(
            op,
            &[got],
            &[want],
            format!("{what} must have length {want}"),
        ))
    }
}

/// The warm start, or zeros, with its length checked.
pub(crate) fn initial_guess<S: Scalar>(op: &'static str, x0: Option<ArrayView1<'_, S>>, n: usize) -> Result<Array1<S>> {
    match x0 {
        Some(x0) => {
            check_len(op, "the warm start x0", x0.len(), n)?;
            Ok(x0.to_owned())
        }
        None => Ok(Array1::zeros(n)),
    }
}

/// Deterministic pseudo-random numbers (SplitMix64) for seeded start vectors, so that
/// estimates are reproducible without a random-number dependency.
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    pub(crate) fn next_signed(&mut self) -> f64 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        2.0 * u - 1.0
    }
}

/// A seeded unit vector of length `n` with entries of both signs (none of them zero in
/// practice), used as the start of power and inverse iterations.
pub(crate) fn seeded_unit_vector<S: Scalar>(n: usize, seed: u64) -> Array1<S> {
    let mut rng = SplitMix64::new(seed);
    let mut v = Array1::from_shape_fn(n, |_| S::from_f64_lossy(rng.next_signed() + 0.01));
    let nv = norm2(v.view());
    if nv > S::zero() {
        v.mapv_inplace(|x| x / nv);
    }
    v
}
