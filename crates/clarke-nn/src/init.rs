//! Seeded initialisers.

use clarke_core::Scalar;
use ndarray::Array2;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// Glorot (Xavier) uniform: `U(-a, a)` with `a = sqrt(6 / (fan_in + fan_out))`, shape
/// `[fan_out, fan_in]`.
pub fn glorot_uniform<S: Scalar>(fan_out: usize, fan_in: usize, rng: &mut impl Rng) -> Array2<S> {
    let a = (6.0 / (fan_in + fan_out).max(1) as f64).sqrt();
    Array2::from_shape_fn((fan_out, fan_in), |_| S::from_f64_lossy(rng.random_range(-a..a)))
}

/// He (Kaiming) uniform for relu layers: `U(-a, a)` with `a = sqrt(6 / fan_in)`, shape
/// `[fan_out, fan_in]`.
pub fn he_uniform<S: Scalar>(fan_out: usize, fan_in: usize, rng: &mut impl Rng) -> Array2<S> {
    let a = (6.0 / fan_in.max(1) as f64).sqrt();
    Array2::from_shape_fn((fan_out, fan_in), |_| S::from_f64_lossy(rng.random_range(-a..a)))
}

/// Independent normal entries with standard deviation `std`.
pub fn normal<S: Scalar>(rows: usize, cols: usize, std: f64, rng: &mut impl Rng) -> Array2<S> {
    Array2::from_shape_fn((rows, cols), |_| {
        let v: f64 = StandardNormal.sample(rng);
        S::from_f64_lossy(std * v)
    })
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
