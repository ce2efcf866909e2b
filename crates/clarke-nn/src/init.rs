//! Seeded initialisers.

use clarke_core::{Error, Result, Scalar};
use ndarray::Array2;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// Glorot (Xavier) uniform: `U(-a, a)` with `a = sqrt(6 / (fan_in + fan_out))`, shape
/// `[fan_out, fan_in]`. Every entry is finite (`a <= sqrt(6)`); a zero fan gives an empty
/// array.
pub fn glorot_uniform<S: Scalar>(fan_out: usize, fan_in: usize, rng: &mut impl Rng) -> Array2<S> {
    let a = (6.0 / (fan_in + fan_out).max(1) as f64).sqrt();
    Array2::from_shape_fn((fan_out, fan_in), |_| S::from_f64_lossy(rng.random_range(-a..a)))
}

/// He (Kaiming) uniform for relu layers: `U(-a, a)` with `a = sqrt(6 / fan_in)`, shape
/// `[fan_out, fan_in]`. Every entry is finite (`a <= sqrt(6)`); a zero fan gives an empty
/// array.
pub fn he_uniform<S: Scalar>(fan_out: usize, fan_in: usize, rng: &mut impl Rng) -> Array2<S> {
    let a = (6.0 / fan_in.max(1) as f64).sqrt();
    Array2::from_shape_fn((fan_out, fan_in), |_| S::from_f64_lossy(rng.random_range(-a..a)))
}

/// Independent normal entries with standard deviation `std`.
///
/// # Errors
/// A `std` that is negative or not finite, or an entry that is not finite in `S` (a `std`
/// near `f32::MAX`).
pub fn try_normal<S: Scalar>(rows: usize, cols: usize, std: f64, rng: &mut impl Rng) -> Result<Array2<S>> {
    const OP: &str = "init::normal";
    if !(std >= 0.0 && std.is_finite()) {
        return Err(Error::invalid(
            OP,
            format!("the standard deviation must be finite and >= 0, got {std:?}"),
        ));
    }
    let a = Array2::from_shape_fn((rows, cols), |_| {
        let v: f64 = StandardNormal.sample(rng);
        S::from_f64_lossy(std * v)
    });
    if a.iter().any(|v| !v.is_finite()) {
        return Err(Error::invalid(
            OP,
            format!("an entry with standard deviation {std:?} is not finite in {}", S::NAME),
        ));
    }
    Ok(a)
}

/// Independent normal entries with standard deviation `std`. Panics (at the caller's line)
/// where [`try_normal`] returns an error.
#[track_caller]
pub fn normal<S: Scalar>(rows: usize, cols: usize, std: f64, rng: &mut impl Rng) -> Array2<S> {
    match try_normal(rows, cols, std, rng) {
        Ok(a) => a,
        Err(e) => panic!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn initialisers_are_seeded_and_bounded() {
        let mut r1 = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut r2 = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let a: Array2<f64> = glorot_uniform(30, 20, &mut r1);
        let b: Array2<f64> = glorot_uniform(30, 20, &mut r2);
        assert_eq!(a, b);
        let bound = (6.0f64 / 50.0).sqrt();
        assert!(a.iter().all(|v| v.abs() < bound));
        let h: Array2<f32> = he_uniform(10, 24, &mut r1);
        assert!(h.iter().all(|v| v.abs() < 0.5 + 1e-6));
        let n: Array2<f64> = normal(200, 200, 2.0, &mut r1);
        let var = n.iter().map(|v| v * v).sum::<f64>() / n.len() as f64;
        assert!((var.sqrt() - 2.0).abs() < 0.05, "std {}", var.sqrt());
    }
}
