//! Sparse cone programs: the same programs stored dense and sparse give the same solutions,
//! forward and adjoint derivatives (the adjoint on the patterns of `A` and `P`) and checks;
//! the matrix-free check above the dense limit walks the same kinks; bad sparse input.

use clarke_convex::CscMatrix;
use clarke_convex::cone::*;
use clarke_core::Error;
use clarke_implicit::CheckOutcome;
use clarke_solve::SolveOptions;
use ndarray::{Array1, Array2, array};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use rand_distr::StandardNormal;

use crate::cone::{max_abs_diff, normal, normal_vec};

/// The same program with `A` and `P` stored sparse.
fn to_sparse(prog: &ConeProgram) -> ConeProgram {
    let a = CscMatrix::from_dense(prog.a.view()).unwrap();
    let sp = ConeProgram::new_sparse(a, prog.b.clone(), prog.c.clone(), prog.cones.clone()).unwrap();
    match &prog.p {
        Some(p) => sp
            .with_sparse_quadratic(CscMatrix::from_dense(p.view()).unwrap())
            .unwrap(),
        None => sp,
    }
}

/// An LP with a planted vertex solution: `n` of the `m` rows of `G x <= h` tight with
/// positive multipliers, the others slack (strictly complementary, unique).
fn planted_lp(seed: u64, n: usize, m: usize) -> ConeProgram {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let g = normal(&mut rng, (m, n));
    let x = normal_vec(&mut rng, n);
    let mut y = Array1::zeros(m);
    let mut slack = Array1::zeros(m);
    for i in 0..m {
        if i < n {
            y[i] = 0.5 + rng.random::<f64>();
        } else {
            slack[i] = 0.5 + rng.random::<f64>();
        }
    }
    let h = g.dot(&x) + &slack;
    let c = -g.t().dot(&y);
    lp(c.view(), Some((g.view(), h.view())), None).unwrap()
}

/// A strictly convex QP with `eq` equalities and `m` inequalities, `active` of them tight
/// with positive multipliers, and (when `weak`) one more tight with a zero multiplier: a
/// kink of the projection.
fn planted_qp(seed: u64, n: usize, eq: usize, m: usize, active: usize, weak: bool) -> ConeProgram {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let l = normal(&mut rng, (n, n));
    let p = l.t().dot(&l) / n as f64 + Array2::<f64>::eye(n) * 0.5;
    let e = normal(&mut rng, (eq, n));
    let g = normal(&mut rng, (m, n));
    let x = normal_vec(&mut rng, n);
    let y_eq = normal_vec(&mut rng, eq);
    let mut y = Array1::zeros(m);
    let mut slack = Array1::zeros(m);
    for i in 0..m {
        if i < active {
            y[i] = 0.5 + rng.random::<f64>();
        } else if !(weak && i == active) {
            slack[i] = 0.5 + rng.random::<f64>();
        }
    }
    let h = g.dot(&x) + &slack;
    let f = e.dot(&x);
    let c = -(p.dot(&x) + e.t().dot(&y_eq) + g.t().dot(&y));
    qp(
        p.view(),
        c.view(),
        Some((g.view(), h.view())),
        Some((e.view(), f.view())),
    )
    .unwrap()
}

/// The projection of `u` onto a second-order cone of dimension 3 and the half-space
/// `x_0 <= 2`: `min 1/2 ||x||^2 - u^T x` s.t. `(b - A x) in NonNeg(1) x Soc(3)`.
fn soc_program() -> ConeProgram {
    let a = array![[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]];
    let b = array![2.0, 0.0, 0.0, 0.0];
    let u = array![0.5, 1.0, -0.8];
    let cones = Cones::new(vec![Cone::NonNeg(1), Cone::Soc(3)]).unwrap();
    ConeProgram::new(a, b, -&u, cones)
        .unwrap()
        .with_quadratic(Array2::eye(3))
        .unwrap()
}

/// Where the kinks of a check are (their margins agree to rounding only).
fn kinks(check: &ConicCheck) -> Vec<(usize, BoundaryKind, bool)> {
    check
        .boundaries
        .iter()
        .map(|b| (b.cone, b.kind.clone(), b.exact))
        .collect()
}

/// Solutions, forward and adjoint derivatives of `dense` and its sparse twin agree to
/// `1e-10`, with the direct solver and with GMRES; the checks agree.
fn assert_agree(dense: &ConeProgram, seed: u64, q: f64) {
    let sparse = to_sparse(dense);
    assert!(sparse.is_sparse() && sparse.a.is_empty() && sparse.p.is_none());
    let opts = SolverOptions::default().with_tolerance(1e-9);
    let sd = solve(dense, &opts, None).unwrap();
    let ss = solve(&sparse, &opts, None).unwrap();
    assert_eq!((sd.status, ss.status), (ConeStatus::Solved, ConeStatus::Solved));
    for (what, a, b) in [("x", &sd.x, &ss.x), ("y", &sd.y, &ss.y), ("s", &sd.s, &ss.s)] {
        let d = max_abs_diff(a, b);
        assert!(d < 1e-10, "{what}: dense and sparse solutions differ by {d:e}");
    }
    assert!(ss.residuals.max() < 1e-9, "{:?}", ss.residuals);

    let (n, m) = (dense.n(), dense.m());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let g = SolutionDirection {
        x: normal_vec(&mut rng, n),
        y: normal_vec(&mut rng, m),
        s: normal_vec(&mut rng, m),
    };
    let da = normal(&mut rng, (m, n));
    let dp = {
        let l = normal(&mut rng, (n, n));
        &l + &l.t()
    };
    let (db, dc) = (normal_vec(&mut rng, m), normal_vec(&mut rng, n));
    let dir = DataDirection {
        p: Some(dp.view()),
        a: da.view(),
        b: db.view(),
        c: dc.view(),
    };
    let (da_s, dp_s) = (
        CscMatrix::from_dense(da.view()).unwrap(),
        CscMatrix::from_dense(dp.view()).unwrap(),
    );
    let sdir = SparseDataDirection {
        p: Some(&dp_s),
        a: &da_s,
        b: db.view(),
        c: dc.view(),
    };
    let gmres = DerivativeOptions::default().with_gmres(SolveOptions {
        tol: 1e-14,
        restart: n + m,
        ..SolveOptions::default()
    });
    let dd = ConeDerivative::new(dense, &sd, q, &DerivativeOptions::default()).unwrap();
    let fwd_d = dd.forward(&dir).unwrap();
    let adj_d = dd.adjoint(&g).unwrap();
    for (label, options) in [("direct", DerivativeOptions::default()), ("gmres", gmres)] {
        let ds = ConeDerivative::new(&sparse, &ss, q, &options).unwrap();
        assert_eq!(ds.check().outcome(), dd.check().outcome(), "{label}");
        assert_eq!(kinks(ds.check()), kinks(dd.check()), "{label}");
        for fwd_s in [ds.forward(&dir).unwrap(), ds.forward_sparse(&sdir).unwrap()] {
            for (what, a, b) in [
                ("dx", &fwd_d.x, &fwd_s.x),
                ("dy", &fwd_d.y, &fwd_s.y),
                ("ds", &fwd_d.s, &fwd_s.s),
            ] {
                let d = max_abs_diff(a, b);
                assert!(d < 1e-10, "{label} forward {what}: dense and sparse differ by {d:e}");
            }
        }
        let adj_s = ds.adjoint(&g).unwrap();
        assert!(adj_s.a.is_empty() && adj_s.p.is_none());
        assert!(max_abs_diff(&adj_d.b, &adj_s.b) < 1e-10, "{label} adjoint b");
        assert!(max_abs_diff(&adj_d.c, &adj_s.c) < 1e-10, "{label} adjoint c");
        // dA on A's pattern: every stored entry, and nothing else.
        let sa = adj_s.sparse_a.as_ref().unwrap();
        assert_eq!(sa.nnz(), sparse.sparse_a().unwrap().nnz());
        for j in 0..n {
            let (rows, vals) = sa.column(j);
            assert_eq!(rows, sparse.sparse_a().unwrap().column(j).0);
            for (&i, &v) in rows.iter().zip(vals) {
                let d = (v - adj_d.a[[i, j]]).abs();
                assert!(d < 1e-10, "{label} adjoint A[{i}, {j}]: {v} vs {}", adj_d.a[[i, j]]);
            }
        }
        match (&adj_d.p, &adj_s.sparse_p) {
            (Some(pd), Some(ps)) => {
                assert_eq!(ps.nnz(), sparse.sparse_p().unwrap().nnz());
                for j in 0..n {
                    let (rows, vals) = ps.column(j);
                    for (&i, &v) in rows.iter().zip(vals) {
                        assert!((v - pd[[i, j]]).abs() < 1e-10, "{label} adjoint P[{i}, {j}]");
                    }
                }
            }
            (None, None) => {}
            other => panic!("{label}: the quadratic gradients differ in kind: {other:?}"),
        }
    }
}

#[test]
fn lp_dense_and_sparse_agree() {
    // A seed the unscaled ADMM solves quickly (random LPs can take it more than its budget,
    // dense or sparse alike).
    let prog = planted_lp(10, 5, 12);
    assert_agree(&prog, 30, 0.0);
}

#[test]
fn qp_with_equalities_and_inequalities_dense_and_sparse_agree() {
    let prog = planted_qp(4, 6, 2, 9, 3, false);
    assert_eq!(prog.cones.list(), &[Cone::Zero(2), Cone::NonNeg(9)]);
    assert_agree(&prog, 40, 0.0);
    // rho adapted during the solve: the sparse KKT factorisation was refactored (values
    // only) and still gives the dense answer.
    let sol = solve(&to_sparse(&prog), &SolverOptions::default().with_tolerance(1e-9), None).unwrap();
    assert!(sol.rho != SolverOptions::default().rho, "rho = {}", sol.rho);
}

#[test]
fn second_order_cone_dense_and_sparse_agree() {
    let prog = soc_program();
    assert_agree(&prog, 50, 0.0);
}

#[test]
fn kinks_are_selected_and_recorded_as_in_the_dense_path() {
    // One weakly active constraint: a kink within tolerance, walked by the check.
    let prog = planted_qp(5, 5, 1, 8, 2, true);
    // Both ends of the selection and one inside it (a finite (1 - q) / q in the reduced
    // system of the sparse factorisation).
    for q in [0.0, 0.5, 1.0] {
        assert_agree(&prog, 60, q);
    }
    let sparse = to_sparse(&prog);
    let sol = solve(&sparse, &SolverOptions::default().with_tolerance(1e-9), None).unwrap();
    let d = ConeDerivative::new(&sparse, &sol, 1.0, &DerivativeOptions::default()).unwrap();
    assert_eq!(d.check().boundaries.len(), 1, "{}", d.check());
    assert_eq!(d.check().outcome(), CheckOutcome::Certified, "{}", d.check());
    assert_eq!(d.check().check.vertices, 2);
}

#[test]
fn matrix_free_check_above_the_dense_limit_walks_the_same_kinks() {
    let prog = planted_qp(5, 5, 1, 8, 2, true);
    let sparse = to_sparse(&prog);
    let sol = solve(&sparse, &SolverOptions::default().with_tolerance(1e-9), None).unwrap();
    let mut small = DerivativeOptions::default();
    small.check.dense_limit = 4;
    let d = ConeDerivative::new(&sparse, &sol, 1.0, &small).unwrap();
    let dense = ConeDerivative::new(&sparse, &sol, 1.0, &DerivativeOptions::default()).unwrap();
    let check = d.check();
    assert_eq!(kinks(check), kinks(dense.check()));
    assert_eq!(check.check.vertices, 2, "{check}");
    assert!(check.check.matrix_free, "{check}");
    assert_eq!(check.outcome(), CheckOutcome::Warning, "{check}");
    let text = check.to_string();
    assert!(text.contains("checked matrix-free"), "{text}");
    assert!(text.contains("an estimate, not a certificate"), "{text}");
    // The estimates are close to the dense singular values.
    let (lo, lo_dense) = (check.check.sigma_min.unwrap(), dense.check().check.sigma_min.unwrap());
    assert!((lo - lo_dense).abs() <= 1e-3 * lo_dense, "{lo} vs {lo_dense}");
    // Without kinks the one element is measured through its sparse LU: a warning with
    // estimates close to the dense singular values.
    let strict = to_sparse(&planted_qp(4, 6, 2, 9, 3, false));
    let sol = solve(&strict, &SolverOptions::default().with_tolerance(1e-9), None).unwrap();
    let d = ConeDerivative::new(&strict, &sol, 0.0, &small).unwrap();
    let dense = ConeDerivative::new(&strict, &sol, 0.0, &DerivativeOptions::default()).unwrap();
    assert!(d.check().boundaries.is_empty());
    assert_eq!(d.check().outcome(), CheckOutcome::Warning, "{}", d.check());
    assert_eq!(dense.check().outcome(), CheckOutcome::Certified, "{}", dense.check());
    let text = d.check().to_string();
    assert!(
        text.contains("its LU exists") && text.contains("an estimate, not a certificate"),
        "{text}"
    );
    let (lo, lo_dense) = (
        d.check().check.sigma_min.unwrap(),
        dense.check().check.sigma_min.unwrap(),
    );
    assert!((lo - lo_dense).abs() <= 1e-3 * lo_dense, "{lo} vs {lo_dense}");
    // A singular program is still refused matrix-free: an LP whose whole edge is optimal.
    let a = array![[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]];
    let tie = lp(
        array![1.0, 0.0].view(),
        Some((a.view(), array![1.0, 1.0, 0.0, 0.0].view())),
        None,
    )
    .unwrap();
    let tie = to_sparse(&tie);
    let sol = solve(&tie, &SolverOptions::default(), None).unwrap();
    let mut tiny = DerivativeOptions::default();
    tiny.check.dense_limit = 2;
    match ConeDerivative::new(&tie, &sol, 0.0, &tiny) {
        Err(Error::HypothesisViolated { detail, .. }) => assert!(detail.contains("singular"), "{detail}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(d) => panic!("a degenerate LP passed the matrix-free check: {}", d.check()),
    }
    // With the check off, the singular M of a small sparse program is solved in the
    // least-squares sense, as the dense path does, and the reasons say so.
    let dense_tie = ConeProgram::new(
        tie.sparse_a().unwrap().to_dense(),
        tie.b.clone(),
        tie.c.clone(),
        tie.cones.clone(),
    )
    .unwrap();
    let dsol = solve(&dense_tie, &SolverOptions::default(), None).unwrap();
    let g = SolutionDirection {
        x: array![1.0, 2.0],
        y: Array1::zeros(4),
        s: Array1::zeros(4),
    };
    let ds = ConeDerivative::new(&tie, &sol, 0.0, &DerivativeOptions::unchecked()).unwrap();
    let dd = ConeDerivative::new(&dense_tie, &dsol, 0.0, &DerivativeOptions::unchecked()).unwrap();
    assert!(ds.check().to_string().contains("least-squares"), "{}", ds.check());
    let (gs, gd) = (ds.adjoint(&g).unwrap(), dd.adjoint(&g).unwrap());
    assert!(max_abs_diff(&gs.c, &gd.c) < 1e-10 && max_abs_diff(&gs.b, &gd.b) < 1e-10);
}

/// A random sparse QP (density about 3%), feasible by construction: the sparse KKT
/// factorisation and the sparse LU give the dense solver's answers.
#[test]
fn random_sparse_qp_matches_dense() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (n, m) = (80, 40);
    let mut triplets = Vec::new();
    for i in 0..m {
        for j in 0..n {
            if rng.random::<f64>() < 0.03 {
                triplets.push((i, j, rng.sample::<f64, _>(StandardNormal)));
            }
        }
        // Every row has an entry.
        let j = rng.random_range(0..n);
        if !triplets.iter().any(|&(r, c, _)| r == i && c == j) {
            triplets.push((i, j, 1.0));
        }
    }
    let a = CscMatrix::from_triplets(m, n, &triplets).unwrap();
    let mut p = Array2::<f64>::eye(n);
    for _ in 0..20 {
        let (i, j) = (rng.random_range(0..n), rng.random_range(0..n));
        let v = 0.3 * rng.sample::<f64, _>(StandardNormal);
        // A PSD rank-one term on the pair (i, j).
        p[[i, i]] += v * v;
        p[[j, j]] += v * v;
        if i != j {
            p[[i, j]] += v * v;
            p[[j, i]] += v * v;
        } else {
            p[[i, i]] += 2.0 * v * v;
        }
    }
    let x0 = normal_vec(&mut rng, n);
    let ad = a.to_dense();
    let b = ad.dot(&x0) + Array1::from_shape_fn(m, |_| rng.random::<f64>());
    let c = normal_vec(&mut rng, n);
    let cones = Cones::new(vec![Cone::NonNeg(m)]).unwrap();
    let dense = ConeProgram::new(ad, b, c, cones).unwrap().with_quadratic(p).unwrap();
    assert_agree(&dense, 70, 0.0);
}

#[test]
fn bad_sparse_input_is_refused_clearly() {
    let a = CscMatrix::from_dense(array![[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]].view()).unwrap();
    let cones = Cones::new(vec![Cone::NonNeg(3)]).unwrap();
    let (b, c) = (array![1.0, 1.0, 1.0], array![-1.0, -2.0]);
    let e = ConeProgram::new_sparse(a.clone(), array![1.0, 1.0], c.clone(), cones.clone()).unwrap_err();
    assert!(
        e.to_string().contains("[2] vs [3]") && e.to_string().contains("b must have one entry per row"),
        "{e}"
    );
    let e = ConeProgram::new_sparse(a.clone(), b.clone(), array![1.0, 1.0, 1.0], cones.clone()).unwrap_err();
    assert!(e.to_string().contains("c must have one entry per column"), "{e}");
    let four = Cones::new(vec![Cone::NonNeg(4)]).unwrap();
    let e = ConeProgram::new_sparse(a.clone(), b.clone(), c.clone(), four).unwrap_err();
    assert!(e.to_string().contains("take 4 rows but A and b have 3"), "{e}");
    let e = ConeProgram::new_sparse(a.clone(), array![1.0, f64::NAN, 1.0], c.clone(), cones.clone()).unwrap_err();
    assert!(
        e.to_string().contains("b has a non-finite entry NaN at flat index 1"),
        "{e}"
    );
    // NaN in a sparse matrix: refused by its constructor, naming the entry.
    let e = CscMatrix::from_triplets(2, 2, &[(0, 0, 1.0), (1, 1, f64::NAN)]).unwrap_err();
    assert!(e.to_string().contains("non-finite value NaN at row 1, column 1"), "{e}");

    let prog = ConeProgram::new_sparse(a, b, c, cones).unwrap();
    let e = prog
        .clone()
        .with_sparse_quadratic(CscMatrix::from_dense(Array2::<f64>::eye(3).view()).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("[3, 3] vs [2, 2]"), "{e}");
    let rect = CscMatrix::from_dense(array![[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]].view()).unwrap();
    let e = prog.clone().with_sparse_quadratic(rect).unwrap_err();
    assert!(
        e.to_string().contains("[2, 3] vs [2, 2]") && e.to_string().contains("n x n"),
        "{e}"
    );
    let asym = CscMatrix::from_dense(array![[1.0, 0.5], [0.0, 1.0]].view()).unwrap();
    let e = prog.clone().with_sparse_quadratic(asym).unwrap_err();
    assert!(
        e.to_string()
            .contains("P is not symmetric: P[0, 1] = 5e-1 but P[1, 0] = 0e0"),
        "{e}"
    );
    let indefinite = CscMatrix::from_dense(array![[1.0, 0.0], [0.0, -1.0]].view()).unwrap();
    let e = prog.clone().with_sparse_quadratic(indefinite).unwrap_err();
    assert!(e.to_string().contains("not positive semidefinite"), "{e}");
    let e = prog.clone().with_quadratic(Array2::eye(2)).unwrap_err();
    assert!(e.to_string().contains("give P as a CscMatrix"), "{e}");
    let dense = ConeProgram::new(
        array![[1.0, 0.0]],
        array![1.0],
        array![1.0, 1.0],
        Cones::new(vec![Cone::NonNeg(1)]).unwrap(),
    )
    .unwrap();
    let e = dense
        .with_sparse_quadratic(CscMatrix::from_dense(Array2::<f64>::eye(2).view()).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("the program has dense data"), "{e}");
    // A struct literal with both storages is refused by the solver.
    let mut both = prog.clone();
    both.a = Array2::eye(2);
    let e = solve(&both, &SolverOptions::default(), None).unwrap_err();
    assert!(e.to_string().contains("both dense and sparse data"), "{e}");
    // A sparse direction of the wrong shape.
    let sol = solve(&prog, &SolverOptions::default(), None).unwrap();
    if sol.status == ConeStatus::Solved {
        let d = ConeDerivative::new(&prog, &sol, 0.0, &DerivativeOptions::unchecked()).unwrap();
        let wrong = CscMatrix::from_dense(Array2::<f64>::eye(2).view()).unwrap();
        let e = d
            .forward_sparse(&SparseDataDirection {
                p: None,
                a: &wrong,
                b: array![0.0, 0.0, 0.0].view(),
                c: array![0.0, 0.0].view(),
            })
            .unwrap_err();
        assert!(e.to_string().contains("must match (A, b, c)"), "{e}");
    }
}
