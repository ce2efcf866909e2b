//! Matrix-free linear solvers: accuracy against dense LU, warm starts, honest statuses.

use crate::common;

use clarke_core::Error;
use clarke_solve::{
    FnOperator, IdentityMinus, LinearOperator, SolveOptions, SolveReport, SolveStatus, Transposed, bicgstab, cg, gmres,
    neumann,
};
use common::*;
use ndarray::{Array1, Array2, ArrayView1, array};

type Solver = fn(
    &Array2<f64>,
    ArrayView1<'_, f64>,
    Option<ArrayView1<'_, f64>>,
    &SolveOptions,
) -> clarke_core::Result<(Array1<f64>, SolveReport)>;

fn cg_dense(
    a: &Array2<f64>,
    b: ArrayView1<'_, f64>,
    x0: Option<ArrayView1<'_, f64>>,
    o: &SolveOptions,
) -> clarke_core::Result<(Array1<f64>, SolveReport)> {
    cg(a, b, x0, o)
}
fn gmres_dense(
    a: &Array2<f64>,
    b: ArrayView1<'_, f64>,
    x0: Option<ArrayView1<'_, f64>>,
    o: &SolveOptions,
) -> clarke_core::Result<(Array1<f64>, SolveReport)> {
    gmres(a, b, x0, o)
}
fn bicgstab_dense(
    a: &Array2<f64>,
    b: ArrayView1<'_, f64>,
    x0: Option<ArrayView1<'_, f64>>,
    o: &SolveOptions,
) -> clarke_core::Result<(Array1<f64>, SolveReport)> {
    bicgstab(a, b, x0, o)
}
/// Neumann solves (I - A) x = b given A; for a comparison on "A x = b" pass I - M.
fn neumann_dense(
    a: &Array2<f64>,
    b: ArrayView1<'_, f64>,
    x0: Option<ArrayView1<'_, f64>>,
    o: &SolveOptions,
) -> clarke_core::Result<(Array1<f64>, SolveReport)> {
    let n = a.nrows();
    let m = Array2::<f64>::eye(n) - a;
    neumann(&m, b, x0, o)
}

/// The general solvers with a matrix each handles: (name, solver, matrix).
fn cases(n: usize, seed: u64) -> Vec<(&'static str, Solver, Array2<f64>)> {
    vec![
        ("cg", cg_dense as Solver, spd(n, seed)),
        ("gmres", gmres_dense as Solver, well_conditioned(n, seed)),
        ("bicgstab", bicgstab_dense as Solver, well_conditioned(n, seed)),
        // I - A with ||A|| = 0.5: Neumann converges
        (
            "neumann",
            neumann_dense as Solver,
            Array2::<f64>::eye(n) - with_norm(n, 0.5, seed),
        ),
    ]
}

#[test]
fn each_solver_matches_dense_lu_f64() {
    for seed in [1, 2, 3] {
        for (name, solve, a) in cases(60, seed) {
            let b = random_vector(60, seed + 100);
            let x_ref = reference_solve(&a, &b);
            let opts = SolveOptions::default().with_tol(1e-13);
            let (x, report) = solve(&a, b.view(), None, &opts).unwrap();
            assert_eq!(report.status, SolveStatus::Converged, "{name}: {report}");
            assert_eq!(report.solver, name);
            assert!(report.residual <= 1e-13, "{name}: {report}");
            let err = rel_err(&x, &x_ref);
            assert!(err < 1e-10, "{name} seed {seed}: relative error {err:e}");
            // the reported residual is the true one of the returned x
            let r = &b - &a.dot(&x);
            let true_res = r.dot(&r).sqrt() / b.dot(&b).sqrt();
            assert!(
                (true_res - report.residual).abs() <= 1e-14 + 1e-6 * true_res,
                "{name}: {true_res:e} vs {:e}",
                report.residual
            );
        }
    }
}

#[test]
fn each_solver_matches_dense_lu_f32() {
    let n = 40;
    let spd64 = spd(n, 7);
    let wc64 = well_conditioned(n, 7);
    let m64 = with_norm(n, 0.5, 7);
    let b64 = random_vector(n, 8);
    let opts = SolveOptions::for_precision::<f32>();
    assert_eq!(opts.tol, 1e-5);
    let b = to_f32_vec(&b64);
    let check = |name: &str, x: Array1<f32>, report: SolveReport, a64: &Array2<f64>| {
        assert!(report.is_converged(), "{name}: {report}");
        let x_ref = reference_solve(a64, &b64);
        let err = rel_err(&x.mapv(f64::from), &x_ref);
        assert!(err < 1e-4, "{name} f32: relative error {err:e}");
    };
    let (x, r) = cg(&to_f32_mat(&spd64), b.view(), None, &opts).unwrap();
    check("cg", x, r, &spd64);
    let (x, r) = gmres(&to_f32_mat(&wc64), b.view(), None, &opts).unwrap();
    check("gmres", x, r, &wc64);
    let (x, r) = bicgstab(&to_f32_mat(&wc64), b.view(), None, &opts).unwrap();
    check("bicgstab", x, r, &wc64);
    let (x, r) = neumann(&to_f32_mat(&m64), b.view(), None, &opts).unwrap();
    check("neumann", x, r, &(Array2::<f64>::eye(n) - &m64));
}

#[test]
fn warm_start_reduces_iterations() {
    for (name, solve, a) in cases(80, 11) {
        let b = random_vector(80, 12);
        let opts = SolveOptions::default().with_tol(1e-10);
        let (x, cold) = solve(&a, b.view(), None, &opts).unwrap();
        assert!(cold.is_converged(), "{name}: {cold}");
        // a nearby right-hand side, warm-started from the previous answer
        let b2 = &b + &(random_vector(80, 13) * 1e-4);
        let (_, cold2) = solve(&a, b2.view(), None, &opts).unwrap();
        let (x2, warm) = solve(&a, b2.view(), Some(x.view()), &opts).unwrap();
        assert!(warm.is_converged(), "{name}: {warm}");
        assert!(
            warm.iterations < cold2.iterations,
            "{name}: warm {} vs cold {} iterations",
            warm.iterations,
            cold2.iterations
        );
        let x_ref = reference_solve(&a, &b2);
        assert!(rel_err(&x2, &x_ref) < 1e-8, "{name}");
        // starting at the answer: zero iterations
        let (_, exact) = solve(&a, b2.view(), Some(x2.view()), &opts).unwrap();
        assert_eq!(exact.iterations, 0, "{name}: {exact}");
    }
}

#[test]
fn cg_on_indefinite_matrix_reports_breakdown() {
    let n = 20;
    let mut d: Vec<f64> = (0..n).map(|i| 1.0 + i as f64).collect();
    d[n - 1] = -1.0;
    let q = orthogonal(n, 5);
    let a = q.dot(&Array2::from_diag(&Array1::from(d))).dot(&q.t());
    // b along the negative eigenvector: p0^T A p0 < 0 at once
    let b = q.column(n - 1).to_owned();
    let (_, report) = cg(&a, b.view(), None, &SolveOptions::default()).unwrap();
    assert_eq!(report.status, SolveStatus::Breakdown, "{report}");
    assert!(report.residual > 0.5, "{report}");
    assert!(matches!(
        report.into_result(),
        Err(Error::NotConverged { solver: "cg", .. })
    ));
}

#[test]
fn cg_on_nonsymmetric_matrix_never_claims_a_wrong_answer() {
    for seed in 0..5 {
        let a = well_conditioned(30, seed) + random_matrix(30, 30, seed + 50) * 0.5;
        let b = random_vector(30, seed + 60);
        let opts = SolveOptions::default().with_tol(1e-10).with_max_iter(200);
        let (x, report) = cg(&a, b.view(), None, &opts).unwrap();
        let r = &b - &a.dot(&x);
        let true_res = r.dot(&r).sqrt() / b.dot(&b).sqrt();
        if report.is_converged() {
            assert!(true_res <= 1e-10, "claimed convergence with residual {true_res:e}");
        } else {
            assert!(true_res > 1e-10);
        }
        assert!((true_res - report.residual).abs() <= 1e-12 + 1e-6 * true_res || !true_res.is_finite());
    }
}

#[test]
fn shape_mismatches_are_errors() {
    let a = spd(5, 1);
    let b_bad = Array1::<f64>::ones(4);
    let b = Array1::<f64>::ones(5);
    let x0_bad = Array1::<f64>::zeros(6);
    let rect = Array2::<f64>::ones((5, 4));
    let opts = SolveOptions::default();
    for (name, solve, a) in cases(5, 1) {
        let e = solve(&a, b_bad.view(), None, &opts).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{name}: {e}");
        let e = solve(&a, b.view(), Some(x0_bad.view()), &opts).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{name}: {e}");
    }
    let e = gmres(&rect, b.view(), None, &opts).unwrap_err();
    match e {
        Error::ShapeMismatch { op, lhs, .. } => {
            assert_eq!(op, "gmres");
            assert_eq!(lhs, vec![5, 4]);
        }
        other => panic!("unexpected {other}"),
    }
    let e = cg(&a, b.view(), None, &SolveOptions::default().with_restart(0)).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }));
    let e = cg(&a, b.view(), None, &SolveOptions::default().with_tol(f64::NAN)).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }));
}

#[test]
fn nan_rhs_gives_non_finite_status() {
    for (name, solve, a) in cases(10, 3) {
        let mut b = random_vector(10, 4);
        b[3] = f64::NAN;
        let (_, report) = solve(&a, b.view(), None, &SolveOptions::default()).unwrap();
        assert_eq!(report.status, SolveStatus::NonFinite, "{name}");
        assert!(report.residual.is_nan());
        assert!(report.clone().into_result().is_err());
        let mut b = random_vector(10, 4);
        b[0] = f64::INFINITY;
        let (_, report) = solve(&a, b.view(), None, &SolveOptions::default()).unwrap();
        assert_eq!(report.status, SolveStatus::NonFinite, "{name}");
        // NaN in the warm start too
        let b = random_vector(10, 4);
        let mut x0 = Array1::zeros(10);
        x0[1] = f64::NAN;
        let (_, report) = solve(&a, b.view(), Some(x0.view()), &SolveOptions::default()).unwrap();
        assert_eq!(report.status, SolveStatus::NonFinite, "{name}");
    }
}

#[test]
fn operator_producing_nan_gives_non_finite_status() {
    let n = 8;
    let op = FnOperator::new(n, n, |x: ArrayView1<f64>, mut y: ndarray::ArrayViewMut1<f64>| {
        y.assign(&x);
        y[2] = f64::NAN;
        Ok(())
    });
    let b = Array1::ones(n);
    let opts = SolveOptions::default();
    assert_eq!(cg(&op, b.view(), None, &opts).unwrap().1.status, SolveStatus::NonFinite);
    assert_eq!(
        gmres(&op, b.view(), None, &opts).unwrap().1.status,
        SolveStatus::NonFinite
    );
    assert_eq!(
        bicgstab(&op, b.view(), None, &opts).unwrap().1.status,
        SolveStatus::NonFinite
    );
    assert_eq!(
        neumann(&op, b.view(), None, &opts).unwrap().1.status,
        SolveStatus::NonFinite
    );
}

#[test]
fn operator_errors_are_passed_on() {
    let op = FnOperator::new(3, 3, |_x: ArrayView1<f64>, _y: ndarray::ArrayViewMut1<f64>| {
        Err(Error::invalid("my_vjp", "tape replay failed"))
    });
    let b = Array1::ones(3);
    let e = gmres(&op, b.view(), None, &SolveOptions::default()).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { op: "my_vjp", .. }), "{e}");
}

#[test]
fn too_few_iterations_gives_max_iterations_and_not_converged_error() {
    for (name, solve, a) in cases(100, 21) {
        let b = random_vector(100, 22);
        let opts = SolveOptions::default().with_tol(1e-14).with_max_iter(3);
        let (_, report) = solve(&a, b.view(), None, &opts).unwrap();
        assert_eq!(report.status, SolveStatus::MaxIterations, "{name}: {report}");
        assert_eq!(report.iterations, 3, "{name}");
        assert!(report.residual > 1e-14 && report.residual < 1.0, "{name}: {report}");
        let (iterations, residual) = (report.iterations, report.residual);
        match report.into_result() {
            Err(Error::NotConverged {
                solver,
                iterations: it,
                residual: res,
                tolerance,
            }) => {
                assert_eq!(solver, name);
                assert_eq!(it, iterations);
                assert_eq!(res, residual);
                assert_eq!(tolerance, 1e-14);
            }
            other => panic!("{name}: expected NotConverged, got {other:?}"),
        }
    }
}

#[test]
fn gmres_bicgstab_neumann_agree_on_i_minus_a() {
    let n = 50;
    let a = with_norm(n, 0.5, 31);
    let b = random_vector(n, 32);
    let op = IdentityMinus::new(&a);
    let opts = SolveOptions::default().with_tol(1e-13);
    let (xg, rg) = gmres(&op, b.view(), None, &opts).unwrap();
    let (xb, rb) = bicgstab(&op, b.view(), None, &opts).unwrap();
    let (xn, rn) = neumann(&a, b.view(), None, &opts).unwrap();
    assert!(
        rg.is_converged() && rb.is_converged() && rn.is_converged(),
        "{rg}\n{rb}\n{rn}"
    );
    assert!(max_abs_diff(&xg, &xb) < 1e-8);
    assert!(max_abs_diff(&xg, &xn) < 1e-8);
    // and with the dense reference
    let x_ref = reference_solve(&(Array2::<f64>::eye(n) - &a), &b);
    assert!(max_abs_diff(&xg, &x_ref) < 1e-10);
    // Neumann needs about log(1e-13)/log(0.5) ~ 43 products or fewer; GMRES far fewer.
    assert!(rn.iterations <= 50, "{rn}");
    assert!(rg.iterations < rn.iterations, "{rg} vs {rn}");
}

#[test]
fn neumann_diverges_when_not_a_contraction() {
    let n = 10;
    let a = Array2::<f64>::eye(n) * 2.0;
    let b = Array1::ones(n);
    let (_, report) = neumann(&a, b.view(), None, &SolveOptions::default().with_history(true)).unwrap();
    assert_eq!(report.status, SolveStatus::Diverged, "{report}");
    assert!(report.residual > 1e8);
    assert!(report.residual_history.len() > 20);
    assert!(report.residual_history.windows(2).all(|w| w[1] > w[0]));
}

#[test]
fn zero_rhs_is_solved_exactly() {
    for (name, solve, a) in cases(6, 2) {
        let b = Array1::zeros(6);
        let (x, report) = solve(&a, b.view(), None, &SolveOptions::default()).unwrap();
        assert!(report.is_converged(), "{name}");
        assert_eq!(report.iterations, 0);
        assert_eq!(x, Array1::<f64>::zeros(6));
        // with a warm start the residual is absolute
        let x0 = Array1::ones(6);
        let (x, report) = solve(&a, b.view(), Some(x0.view()), &SolveOptions::default().with_tol(1e-12)).unwrap();
        assert!(report.is_converged(), "{name}: {report}");
        assert!(x.iter().all(|v| v.abs() < 1e-10), "{name}: {x}");
    }
}

#[test]
fn history_is_recorded_on_request() {
    let a = spd(30, 9);
    let b = random_vector(30, 10);
    let (_, off) = cg(&a, b.view(), None, &SolveOptions::default()).unwrap();
    assert!(off.residual_history.is_empty());
    let (_, on) = cg(&a, b.view(), None, &SolveOptions::default().with_history(true)).unwrap();
    assert_eq!(on.residual_history.len(), on.iterations + 1);
    assert_eq!(on.residual_history[0], 1.0);
}

#[test]
fn gmres_with_short_restart_converges() {
    let a = well_conditioned(120, 41);
    let b = random_vector(120, 42);
    let opts = SolveOptions::default().with_restart(5).with_tol(1e-12);
    let (x, report) = gmres(&a, b.view(), None, &opts).unwrap();
    assert!(report.is_converged(), "{report}");
    assert!(rel_err(&x, &reference_solve(&a, &b)) < 1e-10);
}

#[test]
fn gmres_happy_breakdown_on_low_degree_problem() {
    // A = I + rank-one: the Krylov space has dimension 2, GMRES is exact after 2 steps.
    let n = 40;
    let u = random_vector(n, 1);
    let v = random_vector(n, 2);
    let a = Array2::<f64>::eye(n)
        + &u.view()
            .insert_axis(ndarray::Axis(1))
            .dot(&v.view().insert_axis(ndarray::Axis(0)))
            * 0.1;
    let b = random_vector(n, 3);
    let (x, report) = gmres(&a, b.view(), None, &SolveOptions::default().with_tol(1e-14)).unwrap();
    assert!(report.is_converged(), "{report}");
    assert!(report.iterations <= 3, "{report}");
    assert!(rel_err(&x, &reference_solve(&a, &b)) < 1e-12);
}

#[test]
fn gmres_on_singular_operator_does_not_claim_convergence() {
    // A = diag(1, 1, 0), b has a component in the null direction: no solution.
    let a = Array2::from_diag(&array![1.0, 1.0, 0.0]);
    let b = array![1.0, 2.0, 3.0];
    let (_, report) = gmres(&a, b.view(), None, &SolveOptions::default()).unwrap();
    assert!(!report.is_converged(), "{report}");
    assert!(report.residual > 0.5);
    assert!((report.residual - 3.0 / 14f64.sqrt()).abs() < 1e-12, "{report}");
    let (_, report) = bicgstab(&a, b.view(), None, &SolveOptions::default().with_max_iter(50)).unwrap();
    assert!(!report.is_converged(), "{report}");
    // consistent right-hand side (in the range): solvable, and GMRES says so
    let b = array![1.0, 2.0, 0.0];
    let (x, report) = gmres(&a, b.view(), None, &SolveOptions::default()).unwrap();
    assert!(report.is_converged(), "{report}");
    assert!((a.dot(&x) - &b).iter().all(|r: &f64| r.abs() < 1e-12));
}

#[test]
fn transposed_operator_solves_the_adjoint() {
    let n = 30;
    let a = well_conditioned(n, 51);
    let g = random_vector(n, 52);
    let (w, report) = gmres(
        &Transposed::new(&a),
        g.view(),
        None,
        &SolveOptions::default().with_tol(1e-13),
    )
    .unwrap();
    assert!(report.is_converged());
    let w_ref = clarke_solve::lu_solve_transpose(a.view(), g.view()).unwrap();
    assert!(rel_err(&w, &w_ref) < 1e-10);
    // the implicit adjoint (I - J)^T w = g
    let j = with_norm(n, 0.6, 53);
    let op = Transposed::new(IdentityMinus::new(&j));
    assert!(op.has_transpose());
    let (w, report) = bicgstab(&op, g.view(), None, &SolveOptions::default().with_tol(1e-13)).unwrap();
    assert!(report.is_converged());
    let w_ref = reference_solve(&(Array2::<f64>::eye(n) - &j).t().to_owned(), &g);
    assert!(rel_err(&w, &w_ref) < 1e-10);
}

#[test]
fn matrix_free_closure_operator() {
    // The 1-D Laplacian (SPD, tridiagonal), never formed.
    let n = 50;
    let op = FnOperator::new(n, n, |x: ArrayView1<f64>, mut y: ndarray::ArrayViewMut1<f64>| {
        let n = x.len();
        for i in 0..n {
            let left = if i > 0 { x[i - 1] } else { 0.0 };
            let right = if i + 1 < n { x[i + 1] } else { 0.0 };
            y[i] = 2.0 * x[i] - left - right;
        }
        Ok(())
    });
    let dense = Array2::from_shape_fn((n, n), |(i, j)| {
        if i == j {
            2.0
        } else if i.abs_diff(j) == 1 {
            -1.0
        } else {
            0.0
        }
    });
    let b = random_vector(n, 61);
    let (x, report) = cg(&op, b.view(), None, &SolveOptions::default().with_tol(1e-12)).unwrap();
    assert!(report.is_converged(), "{report}");
    // CG on an n x n SPD matrix: at most about n steps in exact arithmetic.
    assert!(report.iterations <= n + 5, "{report}");
    assert!(rel_err(&x, &reference_solve(&dense, &b)) < 1e-9);
}
