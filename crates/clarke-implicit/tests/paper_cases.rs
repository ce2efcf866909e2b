//! The implicit-layer cases of the paper digest (T3, T4, T5, T9, T10, T11) with their exact
//! values.

use clarke_core::{BackwardOptions, Error, KinkPolicy, Result, Tape, Var};
use clarke_implicit::{AdjointSolver, CheckOutcome, GradientMode, ImplicitLayer, ImplicitOptions, OnAdjointFailure};
use ndarray::{Array2, ArrayD, arr1, arr2};

fn vec(v: &[f64]) -> ArrayD<f64> {
    arr1(v).into_dyn()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

/// d z / d theta[k] of a layer output `z` (all of it), by one seeded backward per row.
fn jacobian<'t>(z: Var<'t, f64>, theta: Var<'t, f64>, policy: Option<KinkPolicy>) -> Result<Array2<f64>> {
    let (m, n) = (z.len(), theta.len());
    let mut j = Array2::zeros((m, n));
    for i in 0..m {
        let mut seed = ArrayD::zeros(z.value().raw_dim());
        seed[[i]] = 1.0;
        let mut options = BackwardOptions::seed(seed);
        options.policy = policy.clone();
        let grads = z.backward_with(&options)?;
        j.row_mut(i)
            .assign(&grads.wrt(theta)?.view().into_shape_with_order(n).unwrap());
    }
    Ok(j)
}

fn assert_matrix(got: &Array2<f64>, want: &Array2<f64>, tol: f64, what: &str) {
    assert_eq!(got.dim(), want.dim(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!(close(*g, *w, tol), "{what}: got\n{got}\nwant\n{want}");
    }
}

#[test]
fn t3_scalar_fixed_point_at_the_kink_follows_the_selection() {
    let layer = ImplicitLayer::fixed_point(
        |y, th| Ok((y * 0.5 + th[0]).relu()),
        ImplicitOptions::default().with_mode(GradientMode::Implicit(AdjointSolver::Dense)),
    )
    .unwrap();
    // At theta = 0 the conservative set is [0, 2]: d / (1 - 0.5 d).
    for (s, want) in [(0.0, 0.0), (0.5, 2.0 / 3.0), (1.0, 2.0)] {
        let tape = Tape::<f64>::with_policy(KinkPolicy::pytorch().with_relu(s)).unwrap();
        let theta = tape.param(vec(&[0.0]));
        let y = layer.apply(&vec(&[0.0]), &[theta]).unwrap().z;
        let g = y.sum().backward().unwrap();
        assert!(close(g.wrt(theta).unwrap()[0], want, 1e-14), "s = {s}");
        let report = layer.reports().last().unwrap();
        assert_eq!(report.kinks.exact_hits(), 1, "{report}");
        // Both vertices (d = 0: 1 - 0 = 1; d = 1: 0.5) are invertible, same sign.
        assert_eq!(report.check.outcome, CheckOutcome::Certified, "{report}");
        assert!(report.check.exhaustive && report.check.vertices == 2);
        assert!(close(report.check.min_vertex_sigma.unwrap(), 0.5, 1e-14));
    }
    // Away from the kink: theta = 1 gives y = 2 and dy/dtheta = 2 under every policy.
    for policy in [KinkPolicy::pytorch(), KinkPolicy::one()] {
        let tape = Tape::<f64>::with_policy(policy).unwrap();
        let theta = tape.param(vec(&[1.0]));
        let y = layer.apply(&vec(&[0.0]), &[theta]).unwrap().z;
        assert!(close(y.value()[0], 2.0, 1e-9));
        let g = y.sum().backward().unwrap();
        assert!(close(g.wrt(theta).unwrap()[0], 2.0, 1e-9));
        assert!(layer.reports().last().unwrap().kinks.is_clean());
    }
}

#[test]
fn t4_forward_backward_projection_recovers_the_relu_set() {
    let gamma = 0.3;
    let layer = ImplicitLayer::fixed_point(
        move |x, th| Ok((x * (1.0 - gamma) + th[0] * gamma).relu()),
        ImplicitOptions::default().with_mode(GradientMode::Implicit(AdjointSolver::Gmres)),
    )
    .unwrap();
    let tape = Tape::<f64>::new();
    let theta = tape.param(vec(&[0.0]));
    let x = layer.apply(&vec(&[0.0]), &[theta]).unwrap().z;
    let loss = x.sum();
    // dx/dtheta = d gamma / (1 - d (1 - gamma)); the selection is chosen per backward call.
    for (d, want) in [(0.0, 0.0), (0.25, 0.0909091), (0.5, 0.2307692), (1.0, 1.0)] {
        let g = loss
            .backward_with(&BackwardOptions::policy(KinkPolicy::pytorch().with_relu(d)))
            .unwrap();
        let got = g.wrt(theta).unwrap()[0];
        assert!(close(got, want, 5e-8), "d = {d}: {got}");
        assert!(close(got, d * gamma / (1.0 - d * (1.0 - gamma)), 1e-12));
    }
    assert_eq!(layer.reports().len(), 4);
}

fn t5_layer(mode: GradientMode) -> ImplicitLayer<f64> {
    // z = relu(W z + U x + b) with U = I, b = 0; theta = [W, x].
    ImplicitLayer::fixed_point(
        |z, th| Ok((th[0].matmul(z) + th[1]).relu()),
        ImplicitOptions::default().with_mode(mode),
    )
    .unwrap()
}

#[test]
fn t5_two_unit_deq_jacobians_for_each_selection() {
    let w = arr2(&[[0.5, -0.2], [0.1, 0.3]]).into_dyn();
    for mode in [
        GradientMode::Implicit(AdjointSolver::Dense),
        GradientMode::Implicit(AdjointSolver::Gmres),
        GradientMode::Implicit(AdjointSolver::Bicgstab),
        GradientMode::Implicit(AdjointSolver::Neumann),
    ] {
        let layer = t5_layer(mode);
        // Away from the kink: x = (1, -1), z* = (2, 0), pre-activation (2, -0.8).
        let tape = Tape::<f64>::new();
        let (wv, x) = (tape.constant(w.clone()), tape.param(vec(&[1.0, -1.0])));
        let z = layer.apply(&vec(&[0.0, 0.0]), &[wv, x]).unwrap().z;
        assert!(close(z.value()[0], 2.0, 1e-9) && close(z.value()[1], 0.0, 1e-12));
        let j = jacobian(z, x, None).unwrap();
        assert_matrix(&j, &arr2(&[[2.0, 0.0], [0.0, 0.0]]), 1e-9, "x = (1, -1)");

        // On the kink: x = (1, -0.2), z* = (2, 0) exactly, pre-activation (2, 0).
        let tape = Tape::<f64>::new();
        let (wv, x) = (tape.constant(w.clone()), tape.param(vec(&[1.0, -0.2])));
        let z = layer.apply(&vec(&[2.0, 0.0]), &[wv, x]).unwrap().z;
        for d in [0.0, 0.25, 0.5, 1.0] {
            let j = jacobian(z, x, Some(KinkPolicy::pytorch().with_relu(d))).unwrap();
            let want = arr2(&[[1.0 - 0.3 * d, -0.2 * d], [0.1 * d, 0.5 * d]]) / (0.5 - 0.13 * d);
            let want = if d == 0.0 {
                arr2(&[[2.0, 0.0], [0.0, 0.0]])
            } else {
                want
            };
            assert_matrix(&j, &want, 1e-9, &format!("{} at d = {d}", mode.name()));
        }
        let want_s1 = arr2(&[[1.891892, -0.540541], [0.270270, 1.351351]]);
        let j1 = jacobian(z, x, Some(KinkPolicy::one())).unwrap();
        assert_matrix(&j1, &want_s1, 1e-6, "digest's rounded s = 1 matrix");
        let report = layer.reports().last().unwrap();
        assert_eq!(report.kinks.exact_hits(), 1, "{report}");
        assert_eq!(report.check.outcome, CheckOutcome::Certified, "{report}");
    }
}

#[test]
fn t5_check_certifies_contraction_with_the_spectral_norm() {
    let layer = t5_layer(GradientMode::Implicit(AdjointSolver::Dense));
    let tape = Tape::<f64>::new();
    let w = tape.constant(arr2(&[[0.5, -0.2], [0.1, 0.3]]).into_dyn());
    let x = tape.param(vec(&[1.0, -0.2]));
    let z = layer.apply(&vec(&[2.0, 0.0]), &[w, x]).unwrap().z;
    z.sum().backward().unwrap();
    let check = layer.reports().last().unwrap().check;
    // ||D W|| <= ||W|| = 0.5390 at both vertices (D = diag(1, 0) and I).
    let max_norm = check.max_vertex_norm.unwrap();
    assert!(close(max_norm, 0.5390, 1e-4), "{check}");
    assert!(check.reasons.iter().any(|r| r.contains("contraction")), "{check}");
}

#[test]
fn t9_unrolled_one_step_and_implicit_gradient_descent() {
    // x <- x - alpha h (x - theta), h = 2, alpha = 0.3, x0 = 0.
    fn step<'s>(x: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
        Ok(x - (x - th[0]) * 0.6)
    }
    let run = |mode: GradientMode| {
        let layer = ImplicitLayer::fixed_point(step, ImplicitOptions::default().with_mode(mode)).unwrap();
        let tape = Tape::<f64>::new();
        let theta = tape.param(vec(&[1.5]));
        let x = layer.apply(&vec(&[0.0]), &[theta]).unwrap().z;
        let g = x.sum().backward().unwrap().wrt(theta).unwrap()[0];
        (g, layer)
    };
    for (k, want) in [(1, 0.6), (2, 0.84), (5, 0.98976)] {
        let (g, layer) = run(GradientMode::Unrolled { iterations: k });
        assert!(close(g, want, 1e-14), "unrolled k = {k}: {g}");
        let report = layer.reports().last().unwrap();
        assert_eq!(report.forward.iterations, k);
        assert!(report.adjoint.is_none());
    }
    let (g, layer) = run(GradientMode::OneStep);
    assert!(close(g, 0.6, 1e-14), "one-step: {g}");
    assert!(layer.reports().last().unwrap().approximate);
    for solver in [
        AdjointSolver::Dense,
        AdjointSolver::Neumann,
        AdjointSolver::Gmres,
        AdjointSolver::Bicgstab,
    ] {
        let (g, _) = run(GradientMode::Implicit(solver));
        assert!(close(g, 1.0, 1e-10), "implicit {solver:?}: {g}");
    }
    // Truncated Neumann with k terms equals the unrolled gradient with k iterations here.
    for k in [1, 2, 5] {
        let (g, layer) = run(GradientMode::TruncatedNeumann { terms: k });
        assert!(close(g, 1.0 - 0.4f64.powi(k as i32), 1e-14), "truncated k = {k}: {g}");
        assert!(layer.reports().last().unwrap().approximate);
    }
}

/// F(z, theta) = (|z1| + z2, 2 z1 + |z2|) - theta with each abs's selection given.
fn t10_map(a: f64, b: f64) -> impl for<'s> Fn(Var<'s, f64>, &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    move |z, th| {
        let (z1, z2) = (z.slice_axis(0, 0..1), z.slice_axis(0, 1..2));
        let f1 = z1.abs_with(a) + z2;
        let f2 = z1 * 2.0 + z2.abs_with(b);
        Ok(z.tape().concat(&[f1, f2], 0) - th[0])
    }
}

#[test]
fn t10_inverse_of_each_corner_jacobian_and_the_failure_of_clarke_calculus() {
    let mut inverses = Vec::new();
    for (a, b) in [(1.0, 1.0), (1.0, -1.0), (-1.0, 1.0), (-1.0, -1.0)] {
        let layer = ImplicitLayer::root(
            t10_map(a, b),
            ImplicitOptions::default().with_mode(GradientMode::Implicit(AdjointSolver::Dense)),
        )
        .unwrap();
        let tape = Tape::<f64>::new();
        let theta = tape.param(vec(&[0.0, 0.0]));
        let z = layer.apply(&vec(&[0.0, 0.0]), &[theta]).unwrap().z;
        let j = jacobian(z, theta, None).unwrap();
        let m = arr2(&[[a, 1.0], [2.0, b]]);
        let det = a * b - 2.0;
        let inv = arr2(&[[b, -1.0], [-2.0, a]]) / det;
        assert_matrix(&j, &inv, 1e-14, &format!("corner ({a}, {b})"));
        assert_matrix(&m.dot(&j), &Array2::eye(2), 1e-14, "J_F dz/dtheta = I");
        let report = layer.reports().last().unwrap();
        // Both abs nodes sit at their kink; det(J_F) = ab - 2 < 0 at all four vertices.
        assert_eq!(report.kinks.exact_hits(), 2, "{report}");
        assert_eq!(report.check.vertices, 4);
        assert_eq!(report.check.outcome, CheckOutcome::Certified, "{report}");
        inverses.push(inv);
    }
    // The mean N of the four inverses is a Clarke element of the inverse map, but N^-1 is not
    // of the form [[a, 1], [2, b]]: Clarke calculus fails, the conservative set is valid.
    let n = inverses.iter().fold(Array2::zeros((2, 2)), |acc, m| acc + m) / 4.0;
    assert_matrix(&n, &arr2(&[[0.0, 2.0 / 3.0], [4.0 / 3.0, 0.0]]), 1e-14, "N");
    let n_inv = arr2(&[[0.0, 0.75], [1.5, 0.0]]);
    assert_matrix(&n.dot(&n_inv), &Array2::eye(2), 1e-14, "N^-1");
    assert!(!close(n_inv[[0, 1]], 1.0, 0.1) && !close(n_inv[[1, 0]], 2.0, 0.1));
}

/// The Lorenz vector field L(u).
fn lorenz<'s>(u: Var<'s, f64>) -> Var<'s, f64> {
    let (x, y, z) = (u.slice_axis(0, 0..1), u.slice_axis(0, 1..2), u.slice_axis(0, 2..3));
    let l1 = (y - x) * 10.0;
    let l2 = x * (z * -1.0 + 28.0) - y;
    let l3 = x * y - z * (8.0 / 3.0);
    u.tape().concat(&[l1, l2, l3], 0)
}

/// The inner problem s in argmin ||s - L(u)||^4 as a root: 4 ||s - L||^2 (s - L) = 0.
fn lorenz_inner<'s>(s: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    let d = s - lorenz(th[0]);
    Ok(d * (d * d).sum() * 4.0)
}

fn lorenz_objective(mode: GradientMode, refuse: bool) -> Result<(ArrayD<f64>, ImplicitLayer<f64>)> {
    let mut options = ImplicitOptions::default().with_mode(mode);
    options.check.refuse_violated = refuse;
    let layer = ImplicitLayer::root(lorenz_inner, options)?;
    let tape = Tape::<f64>::new();
    let u = tape.param(vec(&[1.0, 1.0, 1.0]));
    // The inner solver is exact: start at s = L(u).
    let s0 = lorenz(tape.constant(vec(&[1.0, 1.0, 1.0]))).value();
    let s = layer.apply(&s0, &[u])?.z;
    let objective = (u * s).sum();
    assert!(close(objective.scalar(), 73.0 / 3.0, 1e-12));
    let g = objective.backward()?;
    Ok((g.wrt(u)?.clone(), layer))
}

#[test]
fn t11_lorenz_degenerate_inner_problem_is_refused() {
    // The check sees J_F = 0 and refuses.
    match lorenz_objective(GradientMode::Implicit(AdjointSolver::Dense), true) {
        Err(Error::HypothesisViolated { node, detail }) => {
            assert_eq!(node, "root");
            assert!(detail.contains("violated") && detail.contains("singular"), "{detail}");
        }
        other => panic!("expected a violated hypothesis, got {other:?}"),
    }
    // With the check told not to refuse, the dense solve refuses by itself.
    match lorenz_objective(GradientMode::Implicit(AdjointSolver::Dense), false) {
        Err(Error::InImplicit { source, .. }) => assert!(matches!(*source, Error::Singular { .. }), "{source}"),
        other => panic!("expected a singular dense solve, got {other:?}"),
    }
    // Only the opt-in least-squares mode returns the spurious "J_z = 0" gradient L(u).
    let (g, layer) = lorenz_objective(GradientMode::LeastSquaresNoHypothesis, true).unwrap();
    for (got, want) in g.iter().zip([0.0, 26.0, -5.0 / 3.0]) {
        assert!(close(*got, want, 1e-12), "{g}");
    }
    let report = layer.reports().last().unwrap();
    assert_eq!(report.check.outcome, CheckOutcome::Violated);
    assert!(report.approximate && report.fallback.is_some(), "{report}");
    // The true gradient L(u) + J_L(u)^T u = (18, 36, -16/3) differs.
    assert!(!close(g[0], 18.0, 1.0));
}

#[test]
fn t11_iterative_adjoint_on_the_degenerate_problem_fails_loudly() {
    for solver in [AdjointSolver::Gmres, AdjointSolver::Bicgstab] {
        let mut options = ImplicitOptions::default().with_mode(GradientMode::Implicit(solver));
        options.check.enabled = false;
        options.on_adjoint_failure = OnAdjointFailure::Error;
        let layer = ImplicitLayer::root(lorenz_inner, options).unwrap();
        let tape = Tape::<f64>::new();
        let u = tape.param(vec(&[1.0, 1.0, 1.0]));
        let s0 = lorenz(tape.constant(vec(&[1.0, 1.0, 1.0]))).value();
        let s = layer.apply(&s0, &[u]).unwrap().z;
        let err = (u * s).sum().backward().unwrap_err();
        assert!(
            matches!(err, Error::SolveFailed { stage: "adjoint", .. }),
            "{solver:?}: {err}"
        );
    }
}
