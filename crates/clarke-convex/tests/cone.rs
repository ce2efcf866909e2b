//! Cone programs: solutions with known answers, derivatives against closed forms, finite
//! differences and each other (dot test, dense vs GMRES, raw API vs tape), the hypothesis
//! check on degenerate programs, infeasible and unbounded programs, bad input.

use clarke_convex::cone::*;
use clarke_core::{BackwardOptions, Error, KinkPolicy, Tape};
use clarke_implicit::CheckOutcome;
use clarke_solve::SolveOptions;
use ndarray::{Array1, Array2, ArrayD, Axis, array, s};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// A matrix of standard normal draws (shared by the cone, sparse-cone and QP-layer tests).
pub(crate) fn normal(rng: &mut ChaCha8Rng, shape: (usize, usize)) -> Array2<f64> {
    Array2::from_shape_fn(shape, |_| rng.sample::<f64, _>(StandardNormal))
}

/// A vector of standard normal draws.
pub(crate) fn normal_vec(rng: &mut ChaCha8Rng, n: usize) -> Array1<f64> {
    Array1::from_shape_fn(n, |_| rng.sample::<f64, _>(StandardNormal))
}

/// The largest entry of `|a - b|`.
pub(crate) fn max_abs_diff(a: &Array1<f64>, b: &Array1<f64>) -> f64 {
    (a - b).iter().fold(0.0f64, |m, d| m.max(d.abs()))
}

pub(crate) fn tight() -> SolverOptions {
    SolverOptions::default().with_tolerance(1e-9)
}

/// A strictly convex QP with a planted solution: `x0`, with constraints `0..active` tight
/// (`s = 0`, `y > 0`) and the others slack (`s > 0`, `y = 0`), so strict complementarity
/// holds and `(x0, y0, s0)` is the exact solution.
pub(crate) struct Planted {
    pub(crate) prog: ConeProgram,
    x: Array1<f64>,
    y: Array1<f64>,
    s: Array1<f64>,
}

pub(crate) fn planted_qp(seed: u64, n: usize, m: usize, active: usize) -> Planted {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let l = normal(&mut rng, (n, n));
    let p = l.t().dot(&l) / n as f64 + Array2::<f64>::eye(n) * 0.5;
    let g = normal(&mut rng, (m, n));
    let x = normal_vec(&mut rng, n);
    let mut y = Array1::zeros(m);
    let mut slack = Array1::zeros(m);
    for i in 0..m {
        if i < active {
            y[i] = 0.5 + rng.random::<f64>();
        } else {
            slack[i] = 0.5 + rng.random::<f64>();
        }
    }
    let h = g.dot(&x) + &slack;
    let c = -(p.dot(&x) + g.t().dot(&y));
    let prog = qp(p.view(), c.view(), Some((g.view(), h.view())), None).unwrap();
    Planted { prog, x, y, s: slack }
}

/// `L = w_x . x + w_y . y + w_s . s` at the solution of `prog`.
fn linear_loss(prog: &ConeProgram, w: &SolutionDirection) -> f64 {
    let sol = solve(prog, &tight(), None).unwrap();
    assert_eq!(sol.status, ConeStatus::Solved);
    w.x.dot(&sol.x) + w.y.dot(&sol.y) + w.s.dot(&sol.s)
}

fn random_direction(rng: &mut ChaCha8Rng, n: usize, m: usize) -> SolutionDirection {
    SolutionDirection {
        x: normal_vec(rng, n),
        y: normal_vec(rng, m),
        s: normal_vec(rng, m),
    }
}

#[test]
fn planted_qp_is_solved_exactly_and_certified() {
    let pl = planted_qp(1, 6, 9, 3);
    let sol = solve(&pl.prog, &SolverOptions::default(), None).unwrap();
    assert_eq!(sol.status, ConeStatus::Solved);
    assert!(max_abs_diff(&sol.x, &pl.x) < 1e-12, "x {} vs {}", sol.x, pl.x);
    assert!(max_abs_diff(&sol.y, &pl.y) < 1e-12, "y {} vs {}", sol.y, pl.y);
    assert!(max_abs_diff(&sol.s, &pl.s) < 1e-12);
    assert!(sol.residuals.max() < 1e-12, "{:?}", sol.residuals);
    // Refinement lands on the exact solution from a loose ADMM point.
    assert!(sol.admm_residuals.max() > 1e3 * sol.residuals.max().max(1e-16));
    assert!(sol.refinement.steps >= 1);
    let d = ConeDerivative::new(&pl.prog, &sol, 0.5, &DerivativeOptions::default()).unwrap();
    assert_eq!(d.check().outcome(), CheckOutcome::Certified);
    assert!(d.check().strictly_complementary());
    assert!(d.check().boundaries.is_empty());
}

#[test]
fn adjoint_matches_central_finite_differences_for_every_data_entry() {
    let pl = planted_qp(2, 4, 6, 2);
    let (n, m) = (4, 6);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let w = random_direction(&mut rng, n, m);
    let sol = solve(&pl.prog, &tight(), None).unwrap();
    let d = ConeDerivative::new(&pl.prog, &sol, 0.5, &DerivativeOptions::default()).unwrap();
    let g = d.adjoint(&w).unwrap();
    let h = 1e-6;
    let fd = |perturb: &dyn Fn(&mut ConeProgram, f64)| {
        let (mut plus, mut minus) = (pl.prog.clone(), pl.prog.clone());
        perturb(&mut plus, h);
        perturb(&mut minus, -h);
        (linear_loss(&plus, &w) - linear_loss(&minus, &w)) / (2.0 * h)
    };
    let mut worst = 0.0f64;
    for i in 0..m {
        for j in 0..n {
            let num = fd(&|p, e| p.a[[i, j]] += e);
            worst = worst.max((num - g.a[[i, j]]).abs());
        }
        let num = fd(&|p, e| p.b[i] += e);
        worst = worst.max((num - g.b[i]).abs());
    }
    for j in 0..n {
        let num = fd(&|p, e| p.c[j] += e);
        worst = worst.max((num - g.c[j]).abs());
        for k in 0..n {
            // Symmetric perturbation of P: the gradient is symmetric, so d/dP_jk + d/dP_kj.
            let num = fd(&|p, e| {
                let pm = p.p.as_mut().unwrap();
                pm[[j, k]] += e / 2.0;
                pm[[k, j]] += e / 2.0;
            });
            let gp = g.p.as_ref().unwrap();
            worst = worst.max((num - 0.5 * (gp[[j, k]] + gp[[k, j]])).abs());
        }
    }
    assert!(worst < 1e-6, "worst finite-difference error {worst:e}");
}

#[test]
fn forward_and_adjoint_pass_the_dot_test_on_every_cone() {
    // A program with all four cones: min c^T x + 1/2 ||x||^2 subject to
    // x_0 + x_1 = 1 (zero), x >= -1 (nonneg), ||x_1.. x_3|| <= 3 + x_0 (soc),
    // [[x_0 + 2, x_1], [x_1, x_2 + 2]] PSD.
    let n = 4;
    let mut rows: Vec<Array1<f64>> = Vec::new();
    let mut rhs = Vec::new();
    rows.push(array![1.0, 1.0, 0.0, 0.0]);
    rhs.push(1.0);
    for i in 0..n {
        let mut r = Array1::zeros(n);
        r[i] = -1.0;
        rows.push(r);
        rhs.push(1.0);
    }
    // soc: s = (3 + x_0, x_1, x_2, x_3) = b - A x
    rows.push(array![-1.0, 0.0, 0.0, 0.0]);
    rhs.push(3.0);
    for i in 1..n {
        let mut r = Array1::zeros(n);
        r[i] = -1.0;
        rows.push(r);
        rhs.push(0.0);
    }
    // psd (svec of [[x0 + 2, x1], [x1, x2 + 2]]): (x0 + 2, sqrt2 x1, x2 + 2)
    rows.push(array![-1.0, 0.0, 0.0, 0.0]);
    rhs.push(2.0);
    rows.push(array![0.0, -std::f64::consts::SQRT_2, 0.0, 0.0]);
    rhs.push(0.0);
    rows.push(array![0.0, 0.0, -1.0, 0.0]);
    rhs.push(2.0);
    let views: Vec<_> = rows.iter().map(|r| r.view().insert_axis(Axis(0))).collect();
    let a = ndarray::concatenate(Axis(0), &views).unwrap();
    let b = Array1::from(rhs);
    let cones = Cones::new(vec![Cone::Zero(1), Cone::NonNeg(4), Cone::Soc(4), Cone::Psd(2)]).unwrap();
    let c = array![0.3, -2.5, 1.7, -0.4];
    let prog = ConeProgram::new(a, b, c, cones)
        .unwrap()
        .with_quadratic(Array2::eye(n))
        .unwrap();
    let sol = solve(&prog, &tight(), None).unwrap();
    assert_eq!(sol.status, ConeStatus::Solved);
    assert!(sol.residuals.max() < 1e-9, "{:?}", sol.residuals);
    let m = prog.m();
    let d = ConeDerivative::new(&prog, &sol, 0.5, &DerivativeOptions::default()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..3 {
        let dp = {
            let r = normal(&mut rng, (n, n));
            &r + &r.t()
        };
        let (da, db, dc) = (
            normal(&mut rng, (m, n)),
            normal_vec(&mut rng, m),
            normal_vec(&mut rng, n),
        );
        let fwd = d
            .forward(&DataDirection {
                p: Some(dp.view()),
                a: da.view(),
                b: db.view(),
                c: dc.view(),
            })
            .unwrap();
        let g = random_direction(&mut rng, n, m);
        let adj = d.adjoint(&g).unwrap();
        let lhs = g.x.dot(&fwd.x) + g.y.dot(&fwd.y) + g.s.dot(&fwd.s);
        let rhs = (&adj.a * &da).sum() + adj.b.dot(&db) + adj.c.dot(&dc) + (adj.p.as_ref().unwrap() * &dp).sum();
        assert!((lhs - rhs).abs() < 1e-10 * (1.0 + lhs.abs()), "dot test {lhs} vs {rhs}");
        // The forward map against a central difference along the same direction.
        let h = 1e-6;
        let shifted = |e: f64| {
            let mut p = prog.clone();
            p.a = &p.a + &(&da * e);
            p.b = &p.b + &(&db * e);
            p.c = &p.c + &(&dc * e);
            p.p = Some(p.p.unwrap() + &(&dp * e));
            solve(&p, &tight(), None).unwrap()
        };
        let (plus, minus) = (shifted(h), shifted(-h));
        let fd_x = (&plus.x - &minus.x) / (2.0 * h);
        assert!(max_abs_diff(&fd_x, &fwd.x) < 1e-5, "forward x {} vs fd {}", fwd.x, fd_x);
    }
}

#[test]
fn gmres_and_dense_derivatives_agree() {
    let pl = planted_qp(4, 8, 12, 5);
    let sol = solve(&pl.prog, &tight(), None).unwrap();
    let dense = ConeDerivative::new(&pl.prog, &sol, 0.5, &DerivativeOptions::default()).unwrap();
    let opts = DerivativeOptions::default().with_gmres(SolveOptions::default().with_tol(1e-13));
    let free = ConeDerivative::new(&pl.prog, &sol, 0.5, &opts).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let w = random_direction(&mut rng, 8, 12);
    let (g1, g2) = (dense.adjoint(&w).unwrap(), free.adjoint(&w).unwrap());
    assert!(max_abs_diff(&g1.c, &g2.c) < 1e-9);
    assert!(max_abs_diff(&g1.b, &g2.b) < 1e-9);
    assert!((&g1.a - &g2.a).iter().all(|d| d.abs() < 1e-9));
    assert!(free.last_solve().unwrap().is_converged());
    assert!(dense.last_solve().is_none());
}

#[test]
fn box_and_simplex_projections_as_qps_match_the_direct_ops_and_their_jacobians() {
    let u = array![1.7, -0.3, 0.4, -2.0, 0.95];
    // Box [-1, 1]: x = clamp(u), J = diag(inside).
    let prog = box_projection(u.view(), -1.0, 1.0).unwrap();
    let sol = solve(&prog, &SolverOptions::default(), None).unwrap();
    let clamp = u.mapv(|v: f64| v.clamp(-1.0, 1.0));
    assert!(max_abs_diff(&sol.x, &clamp) < 1e-12, "{} vs {}", sol.x, clamp);
    let d = ConeDerivative::new(&prog, &sol, 0.5, &DerivativeOptions::default()).unwrap();
    assert_eq!(d.check().outcome(), CheckOutcome::Certified);
    for k in 0..u.len() {
        let mut e = Array1::zeros(u.len());
        e[k] = 1.0;
        let g = d
            .adjoint(&SolutionDirection {
                x: e,
                y: Array1::zeros(prog.m()),
                s: Array1::zeros(prog.m()),
            })
            .unwrap();
        // c = -u, so d x_k / d u = -d x_k / d c.
        let row = -&g.c;
        let inside = if u[k].abs() < 1.0 { 1.0 } else { 0.0 };
        for j in 0..u.len() {
            let expect = if j == k { inside } else { 0.0 };
            assert!(
                (row[j] - expect).abs() < 1e-12,
                "d x_{k} / d u_{j} = {} vs {expect}",
                row[j]
            );
        }
    }

    // Simplex: against the fused projection op of this crate, value and Jacobian rows.
    let u = array![0.9, 0.4, -0.5, 0.35, 0.1];
    let prog = simplex_projection(u.view(), 1.0).unwrap();
    let sol = solve(&prog, &SolverOptions::default(), None).unwrap();
    let tape = Tape::<f64>::new();
    let uv = tape.param(u.clone().into_dyn());
    let direct = clarke_convex::project::project_simplex(uv, 1.0).unwrap();
    let dv: Array1<f64> = direct.out.value().into_dimensionality().unwrap();
    assert!(max_abs_diff(&sol.x, &dv) < 1e-12, "{} vs {}", sol.x, dv);
    let d = ConeDerivative::new(&prog, &sol, 0.5, &DerivativeOptions::default()).unwrap();
    assert_eq!(d.check().outcome(), CheckOutcome::Certified);
    for k in 0..u.len() {
        let mut e = Array1::zeros(u.len());
        e[k] = 1.0;
        let seed: ArrayD<f64> = e.clone().into_dyn();
        let gd = direct.out.backward_with(&BackwardOptions::seed(seed)).unwrap();
        let row_direct: Array1<f64> = gd.wrt(uv).unwrap().clone().into_dimensionality().unwrap();
        let g = d
            .adjoint(&SolutionDirection {
                x: e,
                y: Array1::zeros(prog.m()),
                s: Array1::zeros(prog.m()),
            })
            .unwrap();
        assert!(
            max_abs_diff(&-&g.c, &row_direct) < 1e-10,
            "row {k}: {} vs {}",
            -&g.c,
            row_direct
        );
    }
}

#[test]
fn halfspace_projection_has_its_closed_form_derivative() {
    // Projection onto {a^T x <= beta} from outside: x = u - (a^T u - beta) a / ||a||^2,
    // J = I - a a^T / ||a||^2, dx/dbeta = a / ||a||^2.
    let a = array![1.0, 2.0, -2.0];
    let beta = 0.5;
    let u = array![2.0, 1.0, 0.0];
    let g = a.clone().insert_axis(Axis(0));
    let prog = polytope_projection(u.view(), g.view(), array![beta].view()).unwrap();
    let sol = solve(&prog, &SolverOptions::default(), None).unwrap();
    let na2 = a.dot(&a);
    let expect = &u - &(&a * ((a.dot(&u) - beta) / na2));
    assert!(max_abs_diff(&sol.x, &expect) < 1e-12);
    assert!((sol.y[0] - (a.dot(&u) - beta) / na2).abs() < 1e-12);
    let d = ConeDerivative::new(&prog, &sol, 0.5, &DerivativeOptions::default()).unwrap();
    let w = array![0.3, -1.0, 0.7];
    let gr = d
        .adjoint(&SolutionDirection {
            x: w.clone(),
            y: array![0.0],
            s: array![0.0],
        })
        .unwrap();
    let j = Array2::<f64>::eye(3) - &(a.clone().insert_axis(Axis(1)).dot(&a.clone().insert_axis(Axis(0))) / na2);
    assert!(max_abs_diff(&-&gr.c, &j.t().dot(&w)) < 1e-12);
    assert!((gr.b[0] - a.dot(&w) / na2).abs() < 1e-12);
}

#[test]
fn soc_and_psd_projections_as_cone_programs_match_the_projection_jacobians() {
    // min 1/2 ||x - u||^2 s.t. -x + s = 0, s in K  =>  x = Pi_K(u), dx/du = J_K(u).
    for (cones, u) in [
        (Cones::new(vec![Cone::Soc(4)]).unwrap(), array![0.5, 1.0, -0.8, 0.6]),
        (
            Cones::new(vec![Cone::Psd(3)]).unwrap(),
            array![1.0, 0.8, -0.5, -0.7, 0.3, 0.2],
        ),
    ] {
        let n = u.len();
        let prog = ConeProgram::new(-Array2::<f64>::eye(n), Array1::zeros(n), -&u, cones.clone())
            .unwrap()
            .with_quadratic(Array2::eye(n))
            .unwrap();
        let sol = solve(&prog, &tight(), None).unwrap();
        let mut proj = Array1::zeros(n);
        cones.project(u.view(), proj.view_mut());
        assert!(
            max_abs_diff(&sol.x, &proj) < 1e-9,
            "{:?}: {} vs {}",
            cones.list(),
            sol.x,
            proj
        );
        let d = ConeDerivative::new(&prog, &sol, 0.5, &DerivativeOptions::default()).unwrap();
        assert_eq!(d.check().outcome(), CheckOutcome::Certified, "{}", d.check());
        let jac = cones.dual_jacobian(u.view(), &[], &[], 0.5).to_dense();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let w = normal_vec(&mut rng, n);
        let g = d
            .adjoint(&SolutionDirection {
                x: w.clone(),
                y: Array1::zeros(n),
                s: Array1::zeros(n),
            })
            .unwrap();
        assert!(
            max_abs_diff(&-&g.c, &jac.t().dot(&w)) < 1e-7,
            "{} vs {}",
            -&g.c,
            jac.t().dot(&w)
        );
    }
}

/// `min -(x_1 + x_2)` over `x_1 + x_2 <= 1, x >= 0`: a whole edge is optimal.
fn tied_lp() -> ConeProgram {
    let g = array![[1.0, 1.0], [-1.0, 0.0], [0.0, -1.0]];
    let h = array![1.0, 0.0, 0.0];
    lp(array![-1.0, -1.0].view(), Some((g.view(), h.view())), None).unwrap()
}

#[test]
fn a_tie_between_two_vertices_is_reported_violated_never_silently_differentiated() {
    let prog = tied_lp();
    let sol = solve(&prog, &SolverOptions::default(), None).unwrap();
    assert_eq!(sol.status, ConeStatus::Solved);
    assert!((sol.x.sum() - 1.0).abs() < 1e-6);
    let err = ConeDerivative::new(&prog, &sol, 0.5, &DerivativeOptions::default())
        .err()
        .expect("must refuse");
    match &err {
        Error::HypothesisViolated { node, detail } => {
            assert_eq!(node, "cone_program");
            assert!(detail.contains("violated"), "{detail}");
        }
        other => panic!("expected a violated hypothesis, got {other}"),
    }
    // Not refusing: the verdict is still violated and the derivative says what it is.
    let mut opts = DerivativeOptions::default();
    opts.check.refuse_violated = false;
    let d = ConeDerivative::new(&prog, &sol, 0.5, &opts).unwrap();
    assert_eq!(d.check().outcome(), CheckOutcome::Violated);
    assert!(
        d.check().check.reasons.iter().any(|r| r.contains("least-squares")),
        "{}",
        d.check()
    );

    // A vertex where a third constraint is weakly active (primal degeneracy): x = 0 for
    // min x_1 + x_2 over x >= 0, x_1 + x_2 >= 0. Its multipliers are not unique.
    let g = array![[-1.0, 0.0], [0.0, -1.0], [-1.0, -1.0]];
    let prog = lp(
        array![1.0, 1.0].view(),
        Some((g.view(), array![0.0, 0.0, 0.0].view())),
        None,
    )
    .unwrap();
    let sol = solve(&prog, &SolverOptions::default(), None).unwrap();
    let err = ConeDerivative::new(&prog, &sol, 0.5, &DerivativeOptions::default())
        .err()
        .expect("must refuse");
    assert!(matches!(err, Error::HypothesisViolated { .. }), "{err}");
}

#[test]
fn a_weakly_active_qp_constraint_is_a_kink_but_the_hypothesis_holds() {
    // Box projection with u_0 exactly on the upper bound: y_0 = s_0 = 0. Both one-sided
    // derivatives exist (0 and 1) and every selection in between gives an invertible M.
    let u = array![1.0, 0.2];
    let prog = box_projection(u.view(), -1.0, 1.0).unwrap();
    let sol = solve(&prog, &SolverOptions::default(), None).unwrap();
    let d = ConeDerivative::new(&prog, &sol, 0.5, &DerivativeOptions::default()).unwrap();
    let check = d.check();
    assert_eq!(check.outcome(), CheckOutcome::Certified, "{check}");
    assert!(!check.strictly_complementary());
    assert_eq!(check.boundaries.len(), 1);
    assert_eq!(check.check.vertices, 2);
    let g = d
        .adjoint(&SolutionDirection {
            x: array![1.0, 0.0],
            y: Array1::zeros(4),
            s: Array1::zeros(4),
        })
        .unwrap();
    let dx0 = -g.c[0];
    assert!(
        dx0.abs() < 1e-12 || (dx0 - 1.0).abs() < 1e-12 || (dx0 - 0.5).abs() < 1e-12,
        "{dx0}"
    );
}

#[test]
fn infeasible_and_unbounded_programs_return_those_statuses_with_certificates() {
    // x >= 1 and x <= 0.
    let prog = lp(
        array![1.0, 0.0].view(),
        Some((
            array![[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0]].view(),
            array![-1.0, 0.0, 0.0].view(),
        )),
        None,
    )
    .unwrap();
    let sol = solve(&prog, &SolverOptions::default(), None).unwrap();
    assert_eq!(sol.status, ConeStatus::Infeasible);
    let y = sol.certificate.clone().unwrap();
    assert!(prog.a.t().dot(&y).iter().all(|v| v.abs() < 1e-6));
    assert!(prog.b.dot(&y) < 0.0 && y.iter().all(|&v| v >= -1e-6));
    let err = sol.ensure_solved("test").unwrap_err();
    assert!(err.to_string().contains("infeasible"), "{err}");

    // min -x_1 over x >= 0 (x_2 free but bounded by x_2 = 0).
    let prog = lp(
        array![-1.0, 0.0].view(),
        Some((array![[-1.0, 0.0]].view(), array![0.0].view())),
        Some((array![[0.0, 1.0]].view(), array![0.0].view())),
    )
    .unwrap();
    let sol = solve(&prog, &SolverOptions::default(), None).unwrap();
    assert_eq!(sol.status, ConeStatus::Unbounded);
    let dx = sol.certificate.clone().unwrap();
    assert!(prog.c.dot(&dx) < 0.0 && dx[0] > 0.0 && dx[1].abs() < 1e-6);

    // An infeasible second-order-cone program: ||x|| <= -1 written as s = (-1, x).
    let a = -Array2::<f64>::eye(3).slice(s![.., 1..]).to_owned();
    let prog = ConeProgram::new(
        a,
        array![-1.0, 0.0, 0.0],
        array![1.0, 1.0],
        Cones::new(vec![Cone::Soc(3)]).unwrap(),
    )
    .unwrap();
    let sol = solve(&prog, &SolverOptions::default(), None).unwrap();
    assert_eq!(sol.status, ConeStatus::Infeasible);

    // The tape node refuses to differentiate what has no solution, naming the status.
    let tape = Tape::<f64>::new();
    let a = tape.constant(array![[-1.0], [1.0]].into_dyn());
    let b = tape.param(array![-1.0, 0.0].into_dyn());
    let c = tape.param(array![1.0].into_dyn());
    let cones = Cones::new(vec![Cone::NonNeg(2)]).unwrap();
    let err = cone_program(a, b, c, &cones, &ConicLayerOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("infeasible"), "{err}");
}

#[test]
fn an_unfinished_solve_says_so() {
    let pl = planted_qp(6, 10, 15, 4);
    let sol = solve(&pl.prog, &SolverOptions::default().with_max_iter(3), None).unwrap();
    assert_eq!(sol.status, ConeStatus::MaxIterations);
    assert_eq!(sol.iterations, 3);
    let err = ConeDerivative::new(&pl.prog, &sol, 0.5, &DerivativeOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, Error::NotConverged { iterations: 3, .. }), "{err}");
}

#[test]
fn warm_starts_reuse_a_nearby_solution() {
    let pl = planted_qp(8, 10, 15, 4);
    let cold = solve(&pl.prog, &SolverOptions::default(), None).unwrap();
    let shifted = pl.prog.with_cost((&pl.prog.c * 1.01).view()).unwrap();
    let warm = solve(&shifted, &SolverOptions::default(), Some((&cold).into())).unwrap();
    let again_cold = solve(&shifted, &SolverOptions::default(), None).unwrap();
    assert_eq!(warm.status, ConeStatus::Solved);
    assert!(max_abs_diff(&warm.x, &again_cold.x) < 1e-10);
    assert!(
        warm.iterations < again_cold.iterations,
        "{} vs {}",
        warm.iterations,
        again_cold.iterations
    );
    let bad = WarmStart {
        x: cold.x.view(),
        y: cold.y.slice(s![..3]),
        s: cold.s.view(),
    };
    assert!(solve(&shifted, &SolverOptions::default(), Some(bad)).is_err());
}

#[test]
fn the_tape_node_matches_the_raw_derivative_and_batches_share_inputs() {
    let pl = planted_qp(9, 5, 7, 3);
    let (n, m) = (5, 7);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let w = random_direction(&mut rng, n, m);
    let sol = solve(&pl.prog, &tight(), None).unwrap();
    let raw = ConeDerivative::new(&pl.prog, &sol, 0.0, &DerivativeOptions::default())
        .unwrap()
        .adjoint(&w)
        .unwrap();

    let tape = Tape::<f64>::new();
    let p = tape.param(pl.prog.p.clone().unwrap().into_dyn());
    let a = tape.param(pl.prog.a.clone().into_dyn());
    let b = tape.param(pl.prog.b.clone().into_dyn());
    let c = tape.param(pl.prog.c.clone().into_dyn());
    let out = quadratic_cone_program(p, a, b, c, &pl.prog.cones, &ConicLayerOptions::default()).unwrap();
    let xv: Array1<f64> = out.x.value().into_dimensionality().unwrap();
    assert!(max_abs_diff(&xv, &pl.x) < 1e-10);
    let wx = tape.constant(w.x.clone().into_dyn());
    let wy = tape.constant(w.y.clone().into_dyn());
    let ws = tape.constant(w.s.clone().into_dyn());
    let loss = (out.x * wx).sum() + (out.y * wy).sum() + (out.s * ws).sum();
    let grads = loss.backward().unwrap();
    let close = |g: &ArrayD<f64>, r: ArrayD<f64>| g.iter().zip(r.iter()).all(|(x, y)| (x - y).abs() < 1e-9);
    assert!(close(grads.wrt(c).unwrap(), raw.c.clone().into_dyn()));
    assert!(close(grads.wrt(b).unwrap(), raw.b.clone().into_dyn()));
    assert!(close(grads.wrt(a).unwrap(), raw.a.clone().into_dyn()));
    assert!(close(grads.wrt(p).unwrap(), raw.p.clone().unwrap().into_dyn()));
    let report = out.log.last().unwrap();
    assert_eq!((report.samples, report.certified), (1, 1));

    // A batch of three costs with shared P, A, b: each row equals its own solve, the
    // shared gradients are the sums of the per-sample ones.
    let costs = ndarray::stack![Axis(0), pl.prog.c, &pl.prog.c * 0.5, &pl.prog.c * -1.0];
    let tape = Tape::<f64>::new();
    let p = tape.constant(pl.prog.p.clone().unwrap().into_dyn());
    let a = tape.param(pl.prog.a.clone().into_dyn());
    let b = tape.param(pl.prog.b.clone().into_dyn());
    let c = tape.param(costs.clone().into_dyn());
    let out = quadratic_cone_program(p, a, b, c, &pl.prog.cones, &ConicLayerOptions::default()).unwrap();
    assert_eq!(out.x.shape(), vec![3, n]);
    assert_eq!(out.y.shape(), vec![3, m]);
    let wx = tape.constant(w.x.clone().into_dyn());
    let grads = (out.x * wx).sum().backward().unwrap();
    let mut sum_b = Array1::zeros(m);
    for (i, row) in costs.rows().into_iter().enumerate() {
        let prog = pl.prog.with_cost(row).unwrap();
        let sol = solve(&prog, &tight(), None).unwrap();
        let xi: Array1<f64> = out
            .x
            .value()
            .index_axis(Axis(0), i)
            .to_owned()
            .into_dimensionality()
            .unwrap();
        assert!(max_abs_diff(&xi, &sol.x) < 1e-9);
        let wi = SolutionDirection {
            x: w.x.clone(),
            y: Array1::zeros(m),
            s: Array1::zeros(m),
        };
        let g = ConeDerivative::new(&prog, &sol, 0.0, &DerivativeOptions::default())
            .unwrap()
            .adjoint(&wi)
            .unwrap();
        sum_b += &g.b;
        let gc: Array1<f64> = grads
            .wrt(c)
            .unwrap()
            .index_axis(Axis(0), i)
            .to_owned()
            .into_dimensionality()
            .unwrap();
        assert!(max_abs_diff(&gc, &g.c) < 1e-9);
    }
    let gb: Array1<f64> = grads.wrt(b).unwrap().clone().into_dimensionality().unwrap();
    assert!(max_abs_diff(&gb, &sum_b) < 1e-9);
    assert_eq!(out.log.last().unwrap().samples, 3);
}

#[test]
fn the_tape_node_refuses_on_the_degenerate_line_and_names_the_sample() {
    // The LP of the paper's cycle example at c = 0 inside a batch of three costs.
    let g = array![[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]];
    let h = array![3.0, 5.0, 0.0, 0.0];
    let cones = Cones::new(vec![Cone::NonNeg(4)]).unwrap();
    let tape = Tape::<f64>::new();
    let a = tape.constant(g.into_dyn());
    let b = tape.constant(h.into_dyn());
    let c = tape.param(array![[-1.0, -1.0], [0.0, 0.0], [6.0, 6.0]].into_dyn());
    let out = cone_program(a, b, c, &cones, &ConicLayerOptions::default()).unwrap();
    let x: Array2<f64> = out.x.value().into_dimensionality().unwrap();
    assert!(max_abs_diff(&x.row(0).to_owned(), &array![3.0, 5.0]) < 1e-12);
    assert!(max_abs_diff(&x.row(2).to_owned(), &array![0.0, 0.0]) < 1e-12);
    let err = out.x.sum().backward().unwrap_err();
    match &err {
        Error::HypothesisViolated { node, .. } => assert!(node.contains("sample 1 of 3"), "{node}"),
        other => panic!("expected a violated hypothesis, got {other}"),
    }
    let report = out.log.last().unwrap();
    assert_eq!((report.certified, report.violated), (2, 1));
    let (sample, check) = report.first_uncertified().unwrap();
    assert_eq!(sample, 1);
    assert_eq!(check.outcome(), CheckOutcome::Violated);
    assert!(check.check.sigma_min.unwrap() < 1e-12);

    // With the check off the same backward goes through (least squares on the line).
    let tape = Tape::<f64>::new();
    let a = tape.constant(array![[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]].into_dyn());
    let b = tape.constant(array![3.0, 5.0, 0.0, 0.0].into_dyn());
    let c = tape.param(array![0.0, 0.0].into_dyn());
    let opts = ConicLayerOptions::default().with_derivative(DerivativeOptions::unchecked());
    let out = cone_program(a, b, c, &cones, &opts).unwrap();
    let grads = out.x.sum().backward().unwrap();
    assert!(grads.wrt(c).unwrap().iter().all(|v| v.is_finite()));
    assert_eq!(out.log.last().unwrap().not_checked, 1);
}

#[test]
fn f32_tapes_work_and_the_policy_selects_at_exact_kinks() {
    // f32 data, f64 solve, f32 outputs and gradients.
    let tape = Tape::<f32>::new();
    let eye = Array2::<f32>::eye(2);
    let g = ndarray::concatenate(Axis(0), &[eye.view(), (-&eye).view()]).unwrap();
    let p = tape.constant(eye.clone().into_dyn());
    let a = tape.constant(g.into_dyn());
    let b = tape.constant(array![1.0f32, 1.0, 1.0, 1.0].into_dyn());
    let c = tape.param(array![-0.25f32, 0.5].into_dyn());
    let cones = Cones::new(vec![Cone::NonNeg(4)]).unwrap();
    let out = quadratic_cone_program(p, a, b, c, &cones, &ConicLayerOptions::default()).unwrap();
    let x = out.x.value();
    assert!((x[0] - 0.25).abs() < 1e-6 && (x[1] + 0.5).abs() < 1e-6);
    let g = out.x.sum().backward().unwrap();
    assert!(g.wrt(c).unwrap().iter().all(|v| (v + 1.0).abs() < 1e-6));
    for (policy, expect) in [(KinkPolicy::pytorch(), 0.0), (KinkPolicy::one(), 1.0)] {
        let tape = Tape::<f64>::new();
        let p = tape.constant(Array2::<f64>::eye(1).into_dyn());
        let a = tape.constant(array![[1.0]].into_dyn());
        let b = tape.constant(array![1.0].into_dyn());
        let c = tape.param(array![-1.0].into_dyn());
        let cones = Cones::new(vec![Cone::NonNeg(1)]).unwrap();
        let out = quadratic_cone_program(p, a, b, c, &cones, &ConicLayerOptions::default()).unwrap();
        // The constraint x <= 1 is weakly active (y = s = 0 up to rounding): a kink, where
        // the policy's relu'(0) selects, not the sign of the rounding error.
        let sol = &out.solutions[0];
        assert!((sol.x[0] - 1.0).abs() < 1e-14 && sol.y[0].abs() < 1e-14 && sol.s[0].abs() < 1e-14);
        let seed = ArrayD::from_elem(vec![1], 1.0);
        let g = out
            .x
            .backward_with(&BackwardOptions::seed(seed).with_policy(policy))
            .unwrap();
        // x = min(-c, 1): dx/dc = -1 inside, 0 on the bound; relu'(0) = q picks -(1 - q).
        assert_eq!(g.wrt(c).unwrap()[[0]], -(1.0 - expect));
        // The backward ledger holds the layer's kink, attributed to it.
        let rec = g.ledger().hits().next().unwrap();
        assert_eq!((rec.op, rec.at_kink()), ("cone_projection", 1));
        assert!(rec.node <= out.x.id());
        assert!(rec.layer.is_some(), "{rec}");
        assert_eq!(rec.selection, clarke_core::Selection::Slope(expect));
    }
}

#[test]
fn a_constant_quadratic_term_and_the_margins_in_the_log() {
    // x = argmin 1/2 x^2 + c x s.t. x <= 1, batched over three costs; P as a plain array.
    let cones = Cones::new(vec![Cone::NonNeg(1)]).unwrap();
    let run = |fixed: bool| {
        let tape = Tape::<f64>::new();
        let a = tape.constant(array![[1.0]].into_dyn());
        let b = tape.constant(array![1.0].into_dyn());
        let c = tape.param(array![[-1.0], [-3.0], [0.5]].into_dyn());
        let opts = ConicLayerOptions::default();
        let out = if fixed {
            quadratic_cone_program(Array2::<f64>::eye(1), a, b, c, &cones, &opts).unwrap()
        } else {
            let p = tape.constant(Array2::<f64>::eye(1).into_dyn());
            quadratic_cone_program(p, a, b, c, &cones, &opts).unwrap()
        };
        let g = out.x.sum().backward().unwrap();
        (out.x.value(), g.wrt(c).unwrap().clone(), out.log.last().unwrap())
    };
    let (x_fixed, g_fixed, report) = run(true);
    let (x_var, g_var, _) = run(false);
    assert_eq!(x_fixed, x_var);
    assert_eq!(g_fixed, g_var);
    // x = min(-c, 1): 1 (weakly active, a kink), 1 (active, margin 2), -0.5 (inactive, margin 1.5).
    assert_eq!(
        x_fixed.iter().map(|v| (v * 1e9).round() / 1e9).collect::<Vec<_>>(),
        vec![1.0, 1.0, -0.5]
    );
    assert_eq!(report.checks.len(), 3);
    let margins: Vec<f64> = report
        .checks
        .iter()
        .map(|c| c.as_ref().unwrap().margins[0].margin)
        .collect();
    assert!(
        margins[0] < 1e-9 && (margins[1] - 2.0).abs() < 1e-9 && (margins[2] - 1.5).abs() < 1e-9,
        "{margins:?}"
    );
    let (sample, low) = report.min_margin().unwrap();
    assert_eq!(sample, 0);
    assert!(!low.strict, "{low:?}");
}

#[test]
fn bad_shapes_and_values_get_clear_errors() {
    let tape = Tape::<f64>::new();
    let cones = Cones::new(vec![Cone::NonNeg(2)]).unwrap();
    let a = tape.param(Array2::<f64>::eye(2).into_dyn());
    let b = tape.param(array![1.0, 1.0, 1.0].into_dyn());
    let c = tape.param(array![1.0, 1.0].into_dyn());
    let err = cone_program(a, b, c, &cones, &ConicLayerOptions::default())
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("b has shape [3], expected [2] or [B, 2]"),
        "{err}"
    );

    let b = tape.param(array![1.0, 1.0].into_dyn());
    let wrong = Cones::new(vec![Cone::NonNeg(1), Cone::Soc(2)]).unwrap();
    let err = cone_program(a, b, c, &wrong, &ConicLayerOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("take 3 rows but A has 2"), "{err}");

    let cb = tape.param(Array2::<f64>::ones((3, 2)).into_dyn());
    let bb = tape.param(Array2::<f64>::ones((4, 2)).into_dyn());
    let err = cone_program(a, bb, cb, &cones, &ConicLayerOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("batch size"), "{err}");

    let nan = tape.param(array![1.0, f64::NAN].into_dyn());
    let err = cone_program(a, b, nan, &cones, &ConicLayerOptions::default())
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("c has a non-finite entry NaN at flat index 1"),
        "{err}"
    );

    let p = tape.param(array![[1.0, 0.0], [0.0, -2.0]].into_dyn());
    let err = quadratic_cone_program(p, a, b, c, &cones, &ConicLayerOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("not positive semidefinite"), "{err}");

    let bad = SolverOptions {
        alpha: 2.5,
        ..Default::default()
    };
    let prog = tied_lp();
    let err = solve(&prog, &bad, None).unwrap_err();
    assert!(err.to_string().contains("alpha must be in (0, 2)"), "{err}");

    // A solution of another program.
    let sol = solve(&planted_qp(1, 3, 4, 1).prog, &SolverOptions::default(), None).unwrap();
    let err = ConeDerivative::new(&prog, &sol, 0.5, &DerivativeOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("not one of this program"), "{err}");
}

#[test]
fn a_solution_of_another_program_of_the_same_size_is_refused() {
    // The nondegenerate LP vertex below, and the same LP with its right-hand side moved.
    let g = array![[1.0, 1.0], [1.0, 3.0], [-1.0, 0.0], [0.0, -1.0]];
    let h = array![4.0, 6.0, 0.0, 0.0];
    let prog = lp(array![-1.0, -2.0].view(), Some((g.view(), h.view())), None).unwrap();
    let mut other = prog.clone();
    other.b[0] += 0.5;
    let sol = solve(&other, &SolverOptions::default(), None).unwrap();
    // Its own program accepts it.
    assert!(ConeDerivative::new(&other, &sol, 0.5, &DerivativeOptions::default()).is_ok());
    let err = ConeDerivative::new(&prog, &sol, 0.5, &DerivativeOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("does not solve this program"), "{err}");
    // A v changed after the solve.
    let mut changed = solve(&prog, &SolverOptions::default(), None).unwrap();
    changed.v[0] += 1e-3;
    let err = ConeDerivative::new(&prog, &changed, 0.5, &DerivativeOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("v is not y - s"), "{err}");
}

#[test]
fn a_nondegenerate_lp_vertex_has_the_basis_inverse_as_derivative() {
    // min -x_1 - 2 x_2 s.t. x_1 + x_2 <= 4, x_1 + 3 x_2 <= 6, x >= 0: vertex (3, 1) where the
    // first two rows are active, with multipliers (1/2, 1/2) > 0.
    let g = array![[1.0, 1.0], [1.0, 3.0], [-1.0, 0.0], [0.0, -1.0]];
    let h = array![4.0, 6.0, 0.0, 0.0];
    let prog = lp(array![-1.0, -2.0].view(), Some((g.view(), h.view())), None).unwrap();
    let sol = solve(&prog, &SolverOptions::default(), None).unwrap();
    assert!(max_abs_diff(&sol.x, &array![3.0, 1.0]) < 1e-12, "{}", sol.x);
    assert!(max_abs_diff(&sol.y, &array![0.5, 0.5, 0.0, 0.0]) < 1e-12, "{}", sol.y);
    let d = ConeDerivative::new(&prog, &sol, 0.5, &DerivativeOptions::default()).unwrap();
    assert_eq!(d.check().outcome(), CheckOutcome::Certified);
    // x = B^{-1} h_B with B the active rows, so dx/dh_B = B^{-1} = [[1.5, -0.5], [-0.5, 0.5]]
    // and dx/dc = 0 (the vertex does not move for small cost changes).
    let binv = array![[1.5, -0.5], [-0.5, 0.5]];
    for k in 0..2 {
        let mut e = Array1::zeros(2);
        e[k] = 1.0;
        let grad = d
            .adjoint(&SolutionDirection {
                x: e,
                y: Array1::zeros(4),
                s: Array1::zeros(4),
            })
            .unwrap();
        assert!(max_abs_diff(&grad.b.slice(s![..2]).to_owned(), &binv.row(k).to_owned()) < 1e-12);
        assert!(grad.b.slice(s![2..]).iter().all(|v| v.abs() < 1e-12));
        assert!(grad.c.iter().all(|v| v.abs() < 1e-12));
    }
}
