//! Linear-operator adapters agree with dense matrix algebra.

use crate::common;

use clarke_core::Error;
use clarke_solve::linop::{apply_new, apply_transpose_new};
use clarke_solve::{DenseOperator, FnOperator, IdentityMinus, LinearOperator, NormalOperator, Transposed};
use common::*;
use ndarray::{Array1, Array2, ArrayView1, ArrayViewMut1};

#[test]
fn dense_adapters_apply_and_transpose() {
    let a = random_matrix(5, 3, 1);
    let x = random_vector(3, 2);
    let w = random_vector(5, 3);
    let owned = apply_new(&a, x.view()).unwrap();
    let view = apply_new(&a.view(), x.view()).unwrap();
    let wrapped = apply_new(&DenseOperator::new(a.view()), x.view()).unwrap();
    let expected = a.dot(&x);
    for y in [&owned, &view, &wrapped] {
        assert!(max_abs_diff(y, &expected) < 1e-15);
    }
    let yt = apply_transpose_new(&a, w.view()).unwrap();
    assert!(max_abs_diff(&yt, &a.t().dot(&w)) < 1e-15);
    assert_eq!((a.nrows(), LinearOperator::<f64>::ncols(&a)), (5, 3));
    assert!(LinearOperator::<f64>::has_transpose(&a));
    assert_eq!(DenseOperator::new(a.view()).matrix(), a.view());
}

#[test]
fn wrong_lengths_are_errors_not_panics() {
    let a = random_matrix(4, 3, 1);
    let mut y = Array1::<f64>::zeros(4);
    let e = a.apply(Array1::<f64>::zeros(5).view(), y.view_mut()).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let e = apply_new(&a, Array1::<f64>::zeros(4).view()).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }));
    let e = apply_transpose_new(&a, Array1::<f64>::zeros(3).view()).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }));
    // I - A needs a square A
    let e = apply_new(&IdentityMinus::new(&a), Array1::<f64>::zeros(3).view()).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }));
    let sq = random_matrix(3, 3, 2);
    let mut y2 = Array1::<f64>::zeros(2);
    let e = IdentityMinus::new(&sq)
        .apply(Array1::<f64>::zeros(3).view(), y2.view_mut())
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }));
}

#[test]
fn closure_operator_with_and_without_transpose() {
    let a = random_matrix(4, 6, 5);
    let at = a.t().to_owned();
    let plain = FnOperator::new(4, 6, |x: ArrayView1<f64>, mut y: ArrayViewMut1<f64>| {
        y.assign(&a.dot(&x));
        Ok(())
    });
    let x = random_vector(6, 6);
    assert!(max_abs_diff(&apply_new(&plain, x.view()).unwrap(), &a.dot(&x)) < 1e-15);
    assert!(!plain.has_transpose());
    let e = apply_transpose_new(&plain, Array1::zeros(4).view()).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    let full = plain.with_transpose(|x: ArrayView1<f64>, mut y: ArrayViewMut1<f64>| {
        y.assign(&at.dot(&x));
        Ok(())
    });
    assert!(full.has_transpose());
    let w = random_vector(4, 7);
    assert!(max_abs_diff(&apply_transpose_new(&full, w.view()).unwrap(), &a.t().dot(&w)) < 1e-15);
}

#[test]
fn identity_minus_transposed_and_normal() {
    let n = 6;
    let a = random_matrix(n, n, 8);
    let x = random_vector(n, 9);
    let i_minus_a = Array2::<f64>::eye(n) - &a;
    let op = IdentityMinus::new(&a);
    assert!(max_abs_diff(&apply_new(&op, x.view()).unwrap(), &i_minus_a.dot(&x)) < 1e-14);
    assert!(max_abs_diff(&apply_transpose_new(&op, x.view()).unwrap(), &i_minus_a.t().dot(&x)) < 1e-14);
    assert_eq!(op.inner().dim(), (n, n));
    // (I - A)^T through Transposed
    let opt = Transposed::new(IdentityMinus::new(&a));
    assert!(max_abs_diff(&apply_new(&opt, x.view()).unwrap(), &i_minus_a.t().dot(&x)) < 1e-14);
    assert!(max_abs_diff(&apply_transpose_new(&opt, x.view()).unwrap(), &i_minus_a.dot(&x)) < 1e-14);
    // rectangular transpose swaps the shape
    let r = random_matrix(3, 5, 10);
    let rt = Transposed::new(&r);
    assert_eq!((rt.nrows(), rt.ncols()), (5, 3));
    // A^T A
    let normal = NormalOperator::new(&r);
    assert_eq!((normal.nrows(), normal.ncols()), (5, 5));
    let z = random_vector(5, 11);
    assert!(max_abs_diff(&apply_new(&normal, z.view()).unwrap(), &r.t().dot(&r.dot(&z))) < 1e-14);
    assert!(normal.has_transpose());
}
