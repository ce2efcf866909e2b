//! Seeded test matrices shared by the test files.
#![allow(dead_code)]

use clarke_solve::dense::{lu_solve, singular_values};
use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform entries in [-1, 1).
pub fn random_matrix(rows: usize, cols: usize, seed: u64) -> Array2<f64> {
    let mut r = rng(seed);
    Array2::from_shape_fn((rows, cols), |_| r.random_range(-1.0..1.0))
}

pub fn random_vector(n: usize, seed: u64) -> Array1<f64> {
    let mut r = rng(seed);
    Array1::from_shape_fn(n, |_| r.random_range(-1.0..1.0))
}

/// A nonsymmetric matrix with singular values in about [1.4, 2.6]: 2 I + 0.5 R / sqrt(n).
pub fn well_conditioned(n: usize, seed: u64) -> Array2<f64> {
    let r = random_matrix(n, n, seed);
    Array2::<f64>::eye(n) * 2.0 + r * (0.5 / (n as f64).sqrt())
}

/// A symmetric positive definite matrix B^T B / n + I.
pub fn spd(n: usize, seed: u64) -> Array2<f64> {
    let b = random_matrix(n, n, seed);
    let mut a = b.t().dot(&b) / (n as f64) + Array2::<f64>::eye(n);
    // exact symmetry
    let at = a.t().to_owned();
    a = (&a + &at) * 0.5;
    a
}

/// A random matrix scaled to spectral norm `norm`.
pub fn with_norm(n: usize, norm: f64, seed: u64) -> Array2<f64> {
    let r = random_matrix(n, n, seed);
    let s = singular_values(r.view()).unwrap()[0];
    r * (norm / s)
}

/// An orthogonal matrix (Q of a Gram-Schmidt on a random matrix).
pub fn orthogonal(n: usize, seed: u64) -> Array2<f64> {
    let r = random_matrix(n, n, seed);
    let mut q = Array2::<f64>::zeros((n, n));
    for j in 0..n {
        let mut v = r.column(j).to_owned();
        for _ in 0..2 {
            for i in 0..j {
                let qi = q.column(i).to_owned();
                let c = qi.dot(&v);
                v.scaled_add(-c, &qi);
            }
        }
        let nv = v.dot(&v).sqrt();
        q.column_mut(j).assign(&(v / nv));
    }
    q
}

/// Q diag(d) Q^T.
pub fn symmetric_with_eigenvalues(d: &[f64], seed: u64) -> Array2<f64> {
    let n = d.len();
    let q = orthogonal(n, seed);
    let dm = Array2::from_diag(&Array1::from(d.to_vec()));
    let a = q.dot(&dm).dot(&q.t());
    let at = a.t().to_owned();
    (&a + &at) * 0.5
}

pub fn max_abs_diff(a: &Array1<f64>, b: &Array1<f64>) -> f64 {
    (a - b).iter().fold(0.0, |m, v| m.max(v.abs()))
}

pub fn rel_err(x: &Array1<f64>, reference: &Array1<f64>) -> f64 {
    let d = x - reference;
    d.dot(&d).sqrt() / reference.dot(reference).sqrt()
}

/// Reference solution by dense LU.
pub fn reference_solve(a: &Array2<f64>, b: &Array1<f64>) -> Array1<f64> {
    lu_solve(a.view(), b.view()).unwrap()
}

pub fn to_f32_mat(a: &Array2<f64>) -> Array2<f32> {
    a.mapv(|v| v as f32)
}

pub fn to_f32_vec(a: &Array1<f64>) -> Array1<f32> {
    a.mapv(|v| v as f32)
}
