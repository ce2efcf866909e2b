//! Dense solves: LU, transposed LU, reusable factorization, Cholesky, least squares,
//! batched solves, singularity and input errors; both backends against each other under the
//! `lapack` feature.

use crate::common;

use clarke_core::Error;
use clarke_solve::dense::{
    DenseLu, backend_name, batched_solve, cholesky_solve, faer_backend, lstsq, lstsq_rcond, lu_solve,
    lu_solve_transpose, singular_values,
};
use common::*;
use ndarray::{Array1, Array2, Array3, Axis, array};

fn max_abs(a: &Array2<f64>) -> f64 {
    a.iter().fold(0.0, |m, v| m.max(v.abs()))
}

#[test]
fn backend_is_named() {
    let expected = if cfg!(feature = "lapack") { "lapack" } else { "faer" };
    assert_eq!(backend_name(), expected);
}

#[test]
fn lu_recovers_a_known_solution() {
    for n in [1, 2, 7, 50] {
        let a = well_conditioned(n, n as u64);
        let x_true = random_vector(n, 100 + n as u64);
        let b = a.dot(&x_true);
        let x = lu_solve(a.view(), b.view()).unwrap();
        assert!(max_abs_diff(&x, &x_true) < 1e-12, "n = {n}");
        let x = faer_backend::lu_solve(a.view(), b.view()).unwrap();
        assert!(max_abs_diff(&x, &x_true) < 1e-12, "n = {n}");
    }
}

#[test]
fn lu_with_matrix_rhs_solves_each_column() {
    let n = 20;
    let a = well_conditioned(n, 3);
    let b = random_matrix(n, 4, 4);
    let x = lu_solve(a.view(), b.view()).unwrap();
    assert_eq!(x.dim(), (n, 4));
    for j in 0..4 {
        let xj = lu_solve(a.view(), b.column(j)).unwrap();
        assert!(max_abs_diff(&x.column(j).to_owned(), &xj) < 1e-13);
    }
    assert!(max_abs(&(a.dot(&x) - &b)) < 1e-12);
    // non-contiguous (transposed) views work too
    let bt = b.t().to_owned();
    let x2 = lu_solve(a.view(), bt.t()).unwrap();
    assert!(max_abs(&(x2 - &x)) < 1e-14);
    let x3 = lu_solve(a.t(), b.view()).unwrap();
    assert!(max_abs(&(a.t().dot(&x3) - &b)) < 1e-12);
}

#[test]
fn lu_in_f32() {
    let n = 30;
    let a = well_conditioned(n, 8);
    let x_true = random_vector(n, 9);
    let b = a.dot(&x_true);
    let x = lu_solve(to_f32_mat(&a).view(), to_f32_vec(&b).view()).unwrap();
    assert!(max_abs_diff(&x.mapv(f64::from), &x_true) < 1e-5);
}

#[test]
fn transposed_lu_solves_a_transpose_system() {
    let n = 25;
    let a = well_conditioned(n, 10);
    let b = random_vector(n, 11);
    let x = lu_solve_transpose(a.view(), b.view()).unwrap();
    assert!(max_abs_diff(&a.t().dot(&x), &b) < 1e-12);
    let x_ref = lu_solve(a.t(), b.view()).unwrap();
    assert!(max_abs_diff(&x, &x_ref) < 1e-12);
    let bm = random_matrix(n, 3, 12);
    let xm = lu_solve_transpose(a.view(), bm.view()).unwrap();
    assert!(max_abs(&(a.t().dot(&xm) - &bm)) < 1e-12);
}

#[test]
fn reusable_factorization() {
    let n = 40;
    let a = well_conditioned(n, 13);
    let lu = DenseLu::new(a.view()).unwrap();
    assert_eq!(lu.dim(), n);
    assert!(lu.pivot_ratio() > 0.1 && lu.pivot_ratio() <= 1.0);
    for seed in 0..5 {
        let b = random_vector(n, 200 + seed);
        let x = lu.solve(b.view()).unwrap();
        assert!(max_abs_diff(&a.dot(&x), &b) < 1e-12);
        let y = lu.solve_transpose(b.view()).unwrap();
        assert!(max_abs_diff(&a.t().dot(&y), &b) < 1e-12);
    }
    let bm = random_matrix(n, 5, 14);
    let xm = lu.solve(bm.view()).unwrap();
    assert!(max_abs(&(a.dot(&xm) - &bm)) < 1e-12);
    let dbg = format!("{lu:?}");
    assert!(dbg.contains("DenseLu") && dbg.contains("dim: 40"));
    let e = lu.solve(Array1::<f64>::ones(n + 1).view()).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }));
}

#[test]
fn rcond_estimate_is_close_to_the_true_one_norm_rcond() {
    for (n, scale) in [(10usize, 1.0), (30, 1e-6), (60, 1e3)] {
        // a badly scaled last column makes the condition number large
        let mut a = well_conditioned(n, n as u64 + 20);
        a.column_mut(n - 1).mapv_inplace(|v| v * scale);
        let lu = DenseLu::new(a.view()).unwrap();
        let inv = lu.solve(Array2::<f64>::eye(n).view()).unwrap();
        let norm1 = |m: &Array2<f64>| {
            m.columns()
                .into_iter()
                .map(|c| c.iter().map(|v| v.abs()).sum::<f64>())
                .fold(0.0, f64::max)
        };
        let rcond_true = 1.0 / (norm1(&a) * norm1(&inv));
        let est = lu.rcond_estimate().unwrap();
        // Hager's estimate of ||A^-1|| is a lower bound, usually within a factor of ~3.
        assert!(est >= rcond_true * (1.0 - 1e-12), "n {n}: {est:e} < {rcond_true:e}");
        assert!(est <= 10.0 * rcond_true, "n {n}: {est:e} vs {rcond_true:e}");
    }
}

#[test]
fn singular_matrices_are_refused_with_the_pivot_estimate() {
    // exactly singular
    let a = array![[1.0, 2.0], [2.0, 4.0]];
    let e = lu_solve(a.view(), array![1.0, 1.0].view()).unwrap_err();
    match &e {
        Error::Singular { op, detail } => {
            assert_eq!(*op, "lu_solve");
            assert!(detail.contains("pivot"), "{detail}");
        }
        other => panic!("expected Singular, got {other}"),
    }
    // numerically singular: rank-deficient random product
    let u = random_matrix(30, 29, 1);
    let v = random_matrix(29, 30, 2);
    let a = u.dot(&v);
    let e = DenseLu::new(a.view()).unwrap_err();
    assert!(matches!(e, Error::Singular { op: "DenseLu::new", .. }), "{e}");
    let e = faer_backend::lu_solve(a.view(), Array1::<f64>::ones(30).view()).unwrap_err();
    assert!(matches!(e, Error::Singular { .. }), "{e}");
    // zero matrix, f32
    let z = Array2::<f32>::zeros((3, 3));
    assert!(matches!(
        lu_solve(z.view(), Array1::<f32>::ones(3).view()),
        Err(Error::Singular { .. })
    ));
    // batched: the failing sample is named
    let mut batch = Array3::<f64>::zeros((3, 2, 2));
    batch.index_axis_mut(Axis(0), 0).assign(&Array2::eye(2));
    batch.index_axis_mut(Axis(0), 1).assign(&array![[1.0, 2.0], [2.0, 4.0]]);
    batch.index_axis_mut(Axis(0), 2).assign(&Array2::eye(2));
    let e = batched_solve(batch.view(), Array2::<f64>::ones((3, 2)).view(), false).unwrap_err();
    match e {
        Error::Singular { detail, .. } => assert!(detail.contains("sample 1"), "{detail}"),
        other => panic!("expected Singular, got {other}"),
    }
}

#[test]
fn bad_inputs_are_errors() {
    let a = well_conditioned(4, 1);
    // rhs length
    let e = lu_solve(a.view(), Array1::<f64>::ones(3).view()).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { op: "lu_solve", .. }), "{e}");
    // not square
    let r = random_matrix(4, 3, 2);
    let e = lu_solve(r.view(), Array1::<f64>::ones(4).view()).unwrap_err();
    match e {
        Error::ShapeMismatch { lhs, .. } => assert_eq!(lhs, vec![4, 3]),
        other => panic!("{other}"),
    }
    // NaN in the matrix or the rhs
    let mut an = a.clone();
    an[[1, 2]] = f64::NAN;
    let e = lu_solve(an.view(), Array1::<f64>::ones(4).view()).unwrap_err();
    match e {
        Error::InvalidArgument { detail, .. } => assert!(detail.contains("(1, 2)"), "{detail}"),
        other => panic!("{other}"),
    }
    let mut b = Array1::<f64>::ones(4);
    b[3] = f64::INFINITY;
    assert!(matches!(
        lu_solve(a.view(), b.view()),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        cholesky_solve(a.view(), b.view()),
        Err(Error::InvalidArgument { .. })
    ));
    // 3-D rhs
    let b3 = Array3::<f64>::ones((4, 1, 1));
    assert!(matches!(
        lu_solve(a.view(), b3.view()),
        Err(Error::InvalidArgument { .. })
    ));
    // batched shapes
    let batch = Array3::<f64>::zeros((2, 3, 3));
    assert!(matches!(
        batched_solve(batch.view(), Array2::<f64>::ones((2, 4)).view(), false),
        Err(Error::ShapeMismatch { .. })
    ));
    let batch = Array3::<f64>::zeros((2, 3, 4));
    assert!(matches!(
        batched_solve(batch.view(), Array2::<f64>::ones((2, 3)).view(), false),
        Err(Error::ShapeMismatch { .. })
    ));
    // lstsq rcond
    assert!(matches!(
        lstsq_rcond(a.view(), Array1::<f64>::ones(4).view(), -1.0),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn empty_systems() {
    let a = Array2::<f64>::zeros((0, 0));
    let b = Array1::<f64>::zeros(0);
    assert_eq!(lu_solve(a.view(), b.view()).unwrap().len(), 0);
    assert_eq!(cholesky_solve(a.view(), b.view()).unwrap().len(), 0);
    assert_eq!(lstsq(a.view(), b.view()).unwrap().rank, 0);
}

#[test]
fn cholesky_matches_lu_on_spd() {
    for n in [1, 5, 40] {
        let a = spd(n, 30 + n as u64);
        let b = random_vector(n, 31);
        let x = cholesky_solve(a.view(), b.view()).unwrap();
        let x_lu = lu_solve(a.view(), b.view()).unwrap();
        assert!(max_abs_diff(&x, &x_lu) < 1e-12, "n {n}");
        let bm = random_matrix(n, 3, 32);
        let xm = cholesky_solve(a.view(), bm.view()).unwrap();
        assert!(max_abs(&(a.dot(&xm) - &bm)) < 1e-11);
    }
    let a32 = to_f32_mat(&spd(10, 33));
    let x = cholesky_solve(a32.view(), Array1::<f32>::ones(10).view()).unwrap();
    assert!((a32.dot(&x) - 1.0f32).iter().all(|r| r.abs() < 1e-4));
}

#[test]
fn cholesky_refuses_indefinite_and_unsymmetric_matrices() {
    let a = symmetric_with_eigenvalues(&[3.0, 2.0, 1.0, -0.5], 4);
    let e = cholesky_solve(a.view(), Array1::<f64>::ones(4).view()).unwrap_err();
    match e {
        Error::InvalidArgument { op, detail } => {
            assert_eq!(op, "cholesky_solve");
            assert!(detail.contains("positive definite"), "{detail}");
        }
        other => panic!("{other}"),
    }
    let a = array![[2.0, 1.0], [0.0, 2.0]];
    let e = cholesky_solve(a.view(), Array1::<f64>::ones(2).view()).unwrap_err();
    match e {
        Error::InvalidArgument { detail, .. } => assert!(detail.contains("not symmetric"), "{detail}"),
        other => panic!("{other}"),
    }
}

#[test]
fn lstsq_overdetermined_matches_normal_equations() {
    let (m, n) = (60, 8);
    let a = random_matrix(m, n, 40);
    let b = random_vector(m, 41);
    let fit = lstsq(a.view(), b.view()).unwrap();
    assert_eq!(fit.rank, n);
    assert_eq!(fit.singular_values.len(), n);
    let ata = a.t().dot(&a);
    let atb = a.t().dot(&b);
    let x_ne = cholesky_solve(ata.view(), atb.view()).unwrap();
    assert!(max_abs_diff(&fit.solution, &x_ne) < 1e-10);
    // the residual is orthogonal to the range of A
    let r = &b - &a.dot(&fit.solution);
    assert!(a.t().dot(&r).iter().all(|v| v.abs() < 1e-10));
    // matrix rhs
    let bm = random_matrix(m, 2, 42);
    let fitm = lstsq(a.view(), bm.view()).unwrap();
    let x0 = lstsq(a.view(), bm.column(0)).unwrap().solution;
    assert!(max_abs_diff(&fitm.solution.column(0).to_owned(), &x0) < 1e-12);
}

#[test]
fn lstsq_underdetermined_and_rank_deficient_give_minimum_norm() {
    // underdetermined: x = A^T (A A^T)^-1 b
    let a = random_matrix(5, 12, 50);
    let b = random_vector(5, 51);
    let fit = lstsq(a.view(), b.view()).unwrap();
    assert_eq!(fit.rank, 5);
    let aat = a.dot(&a.t());
    let x_mn = a.t().dot(&lu_solve(aat.view(), b.view()).unwrap());
    assert!(max_abs_diff(&fit.solution, &x_mn) < 1e-10);
    // rank deficient: duplicate a column; the minimum-norm answer splits the weight
    let base = random_matrix(20, 3, 52);
    let mut a = Array2::<f64>::zeros((20, 4));
    a.slice_mut(ndarray::s![.., ..3]).assign(&base);
    a.column_mut(3).assign(&base.column(2));
    let x_true = array![1.0, -2.0, 3.0];
    let b = base.dot(&x_true);
    let fit = lstsq(a.view(), b.view()).unwrap();
    assert_eq!(fit.rank, 3);
    assert!(fit.singular_values[3] < 1e-12);
    let expected = array![1.0, -2.0, 1.5, 1.5];
    assert!(max_abs_diff(&fit.solution, &expected) < 1e-10, "{}", fit.solution);
}

#[test]
fn batched_solve_equals_per_sample_solves() {
    // small batch (sequential path) and large batch (parallel path)
    for (batch, n) in [(3usize, 4usize), (64, 12)] {
        let mut a = Array3::<f64>::zeros((batch, n, n));
        for i in 0..batch {
            a.index_axis_mut(Axis(0), i)
                .assign(&well_conditioned(n, 1000 + i as u64));
        }
        let b = random_matrix(batch, n, 77);
        for transpose in [false, true] {
            let x = batched_solve(a.view(), b.view(), transpose).unwrap();
            assert_eq!(x.dim(), (batch, n));
            for i in 0..batch {
                let ai = a.index_axis(Axis(0), i);
                let xi = if transpose {
                    lu_solve_transpose(ai, b.row(i)).unwrap()
                } else {
                    lu_solve(ai, b.row(i)).unwrap()
                };
                assert!(max_abs_diff(&x.row(i).to_owned(), &xi) < 1e-14, "sample {i}");
            }
        }
    }
    // f32
    let a = Array3::from_shape_fn((4, 3, 3), |(k, i, j)| if i == j { 2.0f32 + k as f32 } else { 0.1 });
    let b = Array2::<f32>::ones((4, 3));
    let x = batched_solve(a.view(), b.view(), false).unwrap();
    for k in 0..4 {
        let r = a.index_axis(Axis(0), k).dot(&x.row(k)) - 1.0f32;
        assert!(r.iter().all(|v| v.abs() < 1e-6));
    }
}

#[test]
fn larger_system_uses_the_parallel_path_correctly() {
    let n = 300; // above the parallel threshold
    let a = well_conditioned(n, 90);
    let x_true = random_vector(n, 91);
    let b = a.dot(&x_true);
    let x = lu_solve(a.view(), b.view()).unwrap();
    assert!(max_abs_diff(&x, &x_true) < 1e-11);
    let y = lu_solve_transpose(a.view(), b.view()).unwrap();
    assert!(max_abs_diff(&a.t().dot(&y), &b) < 1e-11);
    let s = spd(n, 92);
    let xc = cholesky_solve(s.view(), b.view()).unwrap();
    assert!(max_abs_diff(&s.dot(&xc), &b) < 1e-10);
}

#[test]
fn singular_values_of_a_diagonal_matrix() {
    let a = Array2::from_diag(&array![3.0, -5.0, 0.5]);
    let s = singular_values(a.view()).unwrap();
    assert!(max_abs_diff(&s, &array![5.0, 3.0, 0.5]) < 1e-14);
    let s = faer_backend::singular_values(random_matrix(7, 3, 1).view()).unwrap();
    assert_eq!(s.len(), 3);
    assert!(s[0] >= s[1] && s[1] >= s[2]);
}

/// Under `lapack`, the faer and LAPACK backends agree.
#[cfg(feature = "lapack")]
mod backends_agree {
    use super::*;
    use clarke_solve::dense::lapack_backend;

    #[test]
    fn lu_and_transposed_lu() {
        for n in [1, 9, 64, 300] {
            let a = well_conditioned(n, 500 + n as u64);
            let b = random_vector(n, 501);
            let xf = faer_backend::lu_solve(a.view(), b.view()).unwrap();
            let xl = lapack_backend::lu_solve(a.view(), b.view()).unwrap();
            assert!(max_abs_diff(&xf, &xl) < 1e-10, "n {n}");
            let xf = faer_backend::lu_solve_transpose(a.view(), b.view()).unwrap();
            let xl = lapack_backend::lu_solve_transpose(a.view(), b.view()).unwrap();
            assert!(max_abs_diff(&xf, &xl) < 1e-10, "n {n}");
            let bm = random_matrix(n, 3, 502);
            let xf = faer_backend::lu_solve(a.view(), bm.view()).unwrap();
            let xl = lapack_backend::lu_solve(a.view(), bm.view()).unwrap();
            assert!(max_abs(&(xf - xl)) < 1e-10, "n {n}");
        }
    }

    #[test]
    fn large_lapack_lu_in_a_small_stack_thread() {
        // OpenBLAS's parallel getrf needs more stack than a 2 MiB Rust thread has; the
        // backend moves it to a helper thread.
        let handle = std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(|| {
                let a = well_conditioned(250, 530);
                let b = random_vector(250, 531);
                let x = lapack_backend::lu_solve(a.view(), b.view()).unwrap();
                max_abs_diff(&a.dot(&x), &b)
            })
            .unwrap();
        assert!(handle.join().unwrap() < 1e-11);
    }

    #[test]
    fn f32_goes_through_single_precision() {
        let n = 20;
        let a = to_f32_mat(&well_conditioned(n, 510));
        let b = to_f32_vec(&random_vector(n, 511));
        let xf = faer_backend::lu_solve(a.view(), b.view()).unwrap();
        let xl = lapack_backend::lu_solve(a.view(), b.view()).unwrap();
        assert!((&xf - &xl).iter().all(|d| d.abs() < 1e-5));
        let s = to_f32_mat(&spd(n, 512));
        let cf = faer_backend::cholesky_solve(s.view(), b.view()).unwrap();
        let cl = lapack_backend::cholesky_solve(s.view(), b.view()).unwrap();
        assert!((&cf - &cl).iter().all(|d| d.abs() < 1e-5));
    }

    #[test]
    fn cholesky_lstsq_and_singular_values() {
        let s = spd(30, 520);
        let b = random_vector(30, 521);
        let xf = faer_backend::cholesky_solve(s.view(), b.view()).unwrap();
        let xl = lapack_backend::cholesky_solve(s.view(), b.view()).unwrap();
        assert!(max_abs_diff(&xf, &xl) < 1e-10);
        let a = random_matrix(40, 7, 522);
        let bb = random_vector(40, 523);
        let ff = faer_backend::lstsq(a.view(), bb.view()).unwrap();
        let fl = lapack_backend::lstsq(a.view(), bb.view()).unwrap();
        assert_eq!(ff.rank, fl.rank);
        assert!(max_abs_diff(&ff.solution, &fl.solution) < 1e-10);
        let sf = faer_backend::singular_values(a.view()).unwrap();
        let sl = lapack_backend::singular_values(a.view()).unwrap();
        assert!(max_abs_diff(&sf, &sl) < 1e-10);
        // wide matrix: minimum-norm solutions agree
        let w = random_matrix(5, 11, 524);
        let bw = random_vector(5, 525);
        let ff = faer_backend::lstsq(w.view(), bw.view()).unwrap();
        let fl = lapack_backend::lstsq(w.view(), bw.view()).unwrap();
        assert!(max_abs_diff(&ff.solution, &fl.solution) < 1e-10);
    }

    #[test]
    fn batched_and_errors() {
        let (batch, n) = (16, 6);
        let mut a = Array3::<f64>::zeros((batch, n, n));
        for i in 0..batch {
            a.index_axis_mut(Axis(0), i)
                .assign(&well_conditioned(n, 600 + i as u64));
        }
        let b = random_matrix(batch, n, 601);
        for t in [false, true] {
            let xf = faer_backend::batched_solve(a.view(), b.view(), t).unwrap();
            let xl = lapack_backend::batched_solve(a.view(), b.view(), t).unwrap();
            assert!(max_abs(&(xf - xl)) < 1e-10);
        }
        // both refuse a singular matrix
        let sing = array![[1.0, 2.0], [2.0, 4.0]];
        let one = Array1::<f64>::ones(2);
        assert!(matches!(
            lapack_backend::lu_solve(sing.view(), one.view()),
            Err(Error::Singular { .. })
        ));
        assert!(matches!(
            faer_backend::lu_solve(sing.view(), one.view()),
            Err(Error::Singular { .. })
        ));
        // and an indefinite Cholesky
        let ind = symmetric_with_eigenvalues(&[1.0, -1.0, 2.0], 3);
        let b3 = Array1::<f64>::ones(3);
        assert!(matches!(
            lapack_backend::cholesky_solve(ind.view(), b3.view()),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            faer_backend::cholesky_solve(ind.view(), b3.view()),
            Err(Error::InvalidArgument { .. })
        ));
    }
}
