//! Spectral estimates against exact values (faer SVD and eigenvalues).

use crate::common;

use clarke_core::Error;
use clarke_solve::spectral::{
    SpectralOptions, largest_singular_value, smallest_singular_value, smallest_singular_value_dense, spectral_norm,
    spectral_norm_dense, spectral_radius,
};
use clarke_solve::{FnOperator, IdentityMinus, SolveStatus};
use common::*;
use faer_ext::IntoFaer;
use ndarray::{Array1, Array2, ArrayView1, ArrayViewMut1, array};

/// Singular values straight from faer (not through this crate), non-increasing.
fn faer_singular_values(a: &Array2<f64>) -> Vec<f64> {
    a.view().into_faer().singular_values().unwrap()
}

/// Largest eigenvalue modulus straight from faer.
fn faer_spectral_radius(a: &Array2<f64>) -> f64 {
    a.view()
        .into_faer()
        .eigenvalues()
        .unwrap()
        .iter()
        .map(|z| z.norm())
        .fold(0.0, f64::max)
}

#[test]
fn norm_of_a_diagonal_matrix() {
    let a = Array2::from_diag(&array![0.5, -3.0, 2.0, 1.0, -2.5]);
    let est = spectral_norm(&a, &SpectralOptions::default()).unwrap();
    assert!(est.is_converged(), "{est:?}");
    assert!((est.value - 3.0).abs() < 1e-6, "{}", est.value);
    assert!(est.value <= 3.0 + 1e-12, "the power estimate is a lower bound");
    assert_eq!(est.history.len(), est.iterations + 1);
}

#[test]
fn norm_of_random_matrices_matches_the_svd() {
    for (m, n, seed) in [(30, 30, 1u64), (50, 20, 2), (20, 45, 3)] {
        let a = random_matrix(m, n, seed);
        let exact = faer_singular_values(&a)[0];
        let est = spectral_norm(&a, &SpectralOptions::default().with_tol(1e-12).with_max_iter(5000)).unwrap();
        assert!(est.is_converged(), "{est:?}");
        assert!(
            (est.value - exact).abs() < 1e-6 * exact,
            "{m}x{n}: {} vs {exact}",
            est.value
        );
        assert!((spectral_norm_dense(a.view()).unwrap() - exact).abs() < 1e-12);
    }
}

#[test]
fn lanczos_norm_matches_the_svd_from_below_with_fewer_products_than_power_iteration() {
    // A random square matrix: the top singular values crowd together.
    for (n, seed) in [(48usize, 11u64), (120, 12)] {
        let a = random_matrix(n, n, seed);
        let sv = faer_singular_values(&a);
        let opts = SpectralOptions::default().with_tol(1e-12).with_max_iter(20_000);
        let lanczos = largest_singular_value(&a, &opts).unwrap();
        let power = spectral_norm(&a, &opts).unwrap();
        assert!(lanczos.is_converged(), "{lanczos:?}");
        assert!(
            lanczos.value <= sv[0] * (1.0 + 1e-14) && lanczos.value >= sv[0] * (1.0 - 1e-10),
            "n = {n}: Lanczos {} vs SVD {}",
            lanczos.value,
            sv[0]
        );
        assert!(
            lanczos.matvecs * 4 < power.matvecs,
            "n = {n}, sigma_2 / sigma_1 = {:.4}: Lanczos {} products, power iteration {}",
            sv[1] / sv[0],
            lanczos.matvecs,
            power.matvecs
        );
    }
    // A tall matrix and a diagonal one with a negative entry.
    let tall = random_matrix(50, 20, 13);
    let est = largest_singular_value(&tall, &SpectralOptions::default()).unwrap();
    assert!((est.value - faer_singular_values(&tall)[0]).abs() < 1e-8);
    let d = Array2::from_diag(&array![0.5, -3.0, 2.0, 1.0, -2.5]);
    assert!((largest_singular_value(&d, &SpectralOptions::default()).unwrap().value - 3.0).abs() < 1e-12);
}

#[test]
fn spectral_radius_of_matrices_with_a_dominant_eigenvalue() {
    // diagonal with a negative dominant eigenvalue
    let a = Array2::from_diag(&array![0.3, -0.9, 0.5, 0.1]);
    let est = spectral_radius(&a, &SpectralOptions::default()).unwrap();
    assert!(est.is_converged());
    assert!((est.value - 0.9).abs() < 1e-6, "{}", est.value);
    // nonsymmetric with a real dominant eigenvalue: V diag(l) V^-1
    let n = 15;
    let v = well_conditioned(n, 7);
    let l: Vec<f64> = (0..n)
        .map(|i| if i == 0 { 1.3 } else { 0.9 * (i as f64 / n as f64) - 0.4 })
        .collect();
    let vinv = clarke_solve::lu_solve(v.view(), Array2::<f64>::eye(n).view()).unwrap();
    let a = v.dot(&Array2::from_diag(&Array1::from(l))).dot(&vinv);
    let exact = faer_spectral_radius(&a);
    assert!((exact - 1.3).abs() < 1e-10);
    let est = spectral_radius(&a, &SpectralOptions::default()).unwrap();
    assert!(est.is_converged(), "{est:?}");
    assert!((est.value - exact).abs() < 1e-6, "{} vs {exact}", est.value);
    // the contraction factor of a fixed-point adjoint: rho(J) for J = A / 2
    let half = &a * 0.5;
    let est = spectral_radius(&half, &SpectralOptions::default()).unwrap();
    assert!((est.value - 0.65).abs() < 1e-6);
}

#[test]
fn spectral_radius_with_a_complex_dominant_pair_is_honest() {
    // rotation by 1 radian scaled by 0.8, plus a small block
    let (c, s) = (1.0f64.cos() * 0.8, 1.0f64.sin() * 0.8);
    let a = array![[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 0.3]];
    let est = spectral_radius(&a, &SpectralOptions::default().with_max_iter(400)).unwrap();
    // ||A v|| = 0.8 exactly once v lies in the rotation plane, so this converges;
    // either way the value must be close to 0.8.
    assert!((est.value - 0.8).abs() < 1e-2, "{est:?}");
    // a non-normal complex pair: ||A v|| oscillates
    let b = array![[0.0, 2.0], [-0.5, 0.0]]; // eigenvalues +-i, rho = 1
    let est = spectral_radius(&b, &SpectralOptions::default().with_max_iter(200)).unwrap();
    assert_eq!(est.status, SolveStatus::MaxIterations, "{est:?}");
    assert!((est.value - 1.0).abs() < 0.05, "{est:?}");
    assert!(est.into_result().is_err());
}

#[test]
fn smallest_singular_value_matches_faer_svd() {
    for (n, seed) in [(10usize, 11u64), (40, 12), (80, 13)] {
        let a = well_conditioned(n, seed);
        let exact = *faer_singular_values(&a).last().unwrap();
        let est = smallest_singular_value(&a, &SpectralOptions::default().with_tol(1e-12)).unwrap();
        assert!(est.is_converged(), "{est:?}");
        assert!(
            (est.value - exact).abs() < 1e-6 * exact,
            "n {n}: {} vs {exact}",
            est.value
        );
        assert!(
            est.value >= exact * (1.0 - 1e-12),
            "the Rayleigh estimate is an upper bound"
        );
        let dense = smallest_singular_value_dense(a.view()).unwrap();
        assert!((dense - exact).abs() < 1e-12 * exact.max(1.0));
    }
    // tall matrix
    let a = random_matrix(30, 6, 14);
    let exact = *faer_singular_values(&a).last().unwrap();
    let est = smallest_singular_value(&a, &SpectralOptions::default().with_tol(1e-12)).unwrap();
    assert!((est.value - exact).abs() < 1e-6 * exact, "{} vs {exact}", est.value);
}

#[test]
fn smallest_singular_value_of_i_minus_j_matrix_free() {
    // the quantity the invertibility check needs: sigma_min(I - J), with J only as products
    let n = 25;
    let j = with_norm(n, 0.9, 21);
    let jt = j.t().to_owned();
    let op = FnOperator::new(n, n, |x: ArrayView1<f64>, mut y: ArrayViewMut1<f64>| {
        y.assign(&j.dot(&x));
        Ok(())
    })
    .with_transpose(|x: ArrayView1<f64>, mut y: ArrayViewMut1<f64>| {
        y.assign(&jt.dot(&x));
        Ok(())
    });
    let est = smallest_singular_value(&IdentityMinus::new(&op), &SpectralOptions::default().with_tol(1e-12)).unwrap();
    let exact = *faer_singular_values(&(Array2::<f64>::eye(n) - &j)).last().unwrap();
    assert!(est.is_converged(), "{est:?}");
    assert!((est.value - exact).abs() < 1e-6 * exact, "{} vs {exact}", est.value);
}

#[test]
fn singular_matrix_has_a_zero_estimate() {
    let a = Array2::from_diag(&array![2.0, 1.0, 0.0, 3.0]);
    let est = smallest_singular_value(&a, &SpectralOptions::default()).unwrap();
    assert!(est.value < 1e-6, "{est:?}");
    assert_eq!(smallest_singular_value_dense(a.view()).unwrap(), 0.0);
}

#[test]
fn estimates_are_deterministic_and_seeded() {
    let a = random_matrix(20, 20, 31);
    let o = SpectralOptions::default().with_max_iter(5).with_tol(0.0);
    let e1 = spectral_norm(&a, &o).unwrap();
    let e2 = spectral_norm(&a, &o).unwrap();
    assert_eq!(e1, e2);
    assert_eq!(e1.status, SolveStatus::MaxIterations);
    let e3 = spectral_norm(&a, &o.clone().with_seed(99)).unwrap();
    assert_ne!(e1.history, e3.history);
}

#[test]
fn bad_inputs_are_errors() {
    let op = FnOperator::new(3, 3, |x: ArrayView1<f64>, mut y: ArrayViewMut1<f64>| {
        y.assign(&x);
        Ok(())
    });
    assert!(matches!(
        spectral_norm(&op, &SpectralOptions::default()),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        smallest_singular_value(&op, &SpectralOptions::default()),
        Err(Error::InvalidArgument { .. })
    ));
    // the identity is fine for the spectral radius, which needs no transpose
    let est = spectral_radius(&op, &SpectralOptions::default()).unwrap();
    assert!((est.value - 1.0).abs() < 1e-12);
    let wide = random_matrix(3, 5, 1);
    assert!(matches!(
        smallest_singular_value(&wide, &SpectralOptions::default()),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        spectral_radius(&wide, &SpectralOptions::default()),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut nan = Array2::<f64>::eye(3);
    nan[[0, 0]] = f64::NAN;
    assert_eq!(
        spectral_norm(&nan, &SpectralOptions::default()).unwrap().status,
        SolveStatus::NonFinite
    );
    assert!(matches!(
        smallest_singular_value_dense(nan.view()),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn zero_operator() {
    let z = Array2::<f64>::zeros((4, 4));
    assert_eq!(spectral_norm(&z, &SpectralOptions::default()).unwrap().value, 0.0);
    assert_eq!(spectral_radius(&z, &SpectralOptions::default()).unwrap().value, 0.0);
    assert_eq!(
        smallest_singular_value(&z, &SpectralOptions::default()).unwrap().value,
        0.0
    );
}

#[test]
fn dense_smallest_singular_value_refuses_a_wide_matrix() {
    // A wide matrix has a null space: min ||A x|| / ||x|| is 0, not its 2nd singular value 1.
    let wide = array![[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];
    match smallest_singular_value_dense(wide.view()) {
        Err(Error::ShapeMismatch { op, lhs, .. }) => {
            assert_eq!((op, lhs), ("smallest_singular_value_dense", vec![2, 3]));
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    // Tall and square matrices: the n-th singular value, as the iterative estimate.
    let tall = wide.t().to_owned();
    assert_eq!(smallest_singular_value_dense(tall.view()).unwrap(), 1.0);
    let a = random_matrix(30, 6, 14);
    let exact = *faer_singular_values(&a).last().unwrap();
    assert!((smallest_singular_value_dense(a.view()).unwrap() - exact).abs() < 1e-12 * exact);
}
