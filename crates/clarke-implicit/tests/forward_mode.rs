//! Forward mode (`Tape::jvp`) through implicit layers: `dz = (I - J_z)^{-1} J_theta dtheta`
//! (root: `-J_F^{-1} J_theta dtheta`) with the backward pass's check, solver and report.

use clarke_core::{BackwardOptions, Error, KinkPolicy, Result, Tape, Var};
use clarke_implicit::{AdjointSolver, CheckOutcome, GradientMode, ImplicitLayer, ImplicitOptions, Pass};
use clarke_solve::SolveOptions;
use ndarray::{Array1, Array2, ArrayD, arr1, arr2};

fn vec(v: &[f64]) -> ArrayD<f64> {
    arr1(v).into_dyn()
}

fn dot(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn deq<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    Ok((th[0].matmul(z) + th[1]).tanh())
}

fn relu_deq<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    Ok((th[0].matmul(z) + th[1]).relu())
}

/// Root form: `F(z) = z + tanh(W z) / 2 - x`.
fn root_map<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    Ok(z + th[0].matmul(z).tanh() * 0.5 - th[1])
}

fn weight(n: usize, scale: f64) -> ArrayD<f64> {
    Array2::from_shape_fn((n, n), |(i, j)| {
        scale * (((3 * i + 5 * j) % 7) as f64 - 3.0) / (3.0 * n as f64)
    })
    .into_dyn()
}

/// A map as a plain function.
type Map = for<'s> fn(Var<'s, f64>, &[Var<'s, f64>]) -> Result<Var<'s, f64>>;

fn tight() -> ImplicitOptions {
    ImplicitOptions::default().with_adjoint(SolveOptions::default().with_tol(1e-13))
}

/// A root layer (`F(z) = 0`) or a fixed-point layer (`z = T(z)`) of `map`.
fn layer_of(map: Map, root: bool, options: ImplicitOptions) -> ImplicitLayer<f64> {
    if root {
        ImplicitLayer::root(map, options)
    } else {
        ImplicitLayer::fixed_point(map, options)
    }
    .unwrap()
}

/// `z*(W, x)` of a fresh layer, as a value.
fn solve(map: Map, root: bool, w: &ArrayD<f64>, x: &ArrayD<f64>) -> ArrayD<f64> {
    let layer = layer_of(map, root, tight());
    let tape = Tape::<f64>::new();
    let th = [tape.constant(w.clone()), tape.constant(x.clone())];
    layer.apply(&ArrayD::zeros(x.raw_dim()), &th).unwrap().z.value()
}

#[test]
fn the_jvp_of_a_layer_matches_central_differences() {
    let n = 4;
    let (w, x) = (weight(n, 0.9), vec(&[0.3, -0.7, 1.1, 0.2]));
    let (dw, dx) = (weight(n, 1.0).mapv(|v| v.sin()), vec(&[0.5, 0.1, -0.4, 0.9]));
    for (map, root) in [(deq as Map, false), (root_map as Map, true)] {
        let layer = layer_of(map, root, tight());
        let tape = Tape::<f64>::new();
        let (wv, xv) = (tape.param(w.clone()), tape.param(x.clone()));
        let z = layer.apply(&ArrayD::zeros(vec![n]), &[wv, xv]).unwrap().z;
        let jvp = tape
            .jvp(z, &[(wv, dw.clone()), (xv, dx.clone())], &BackwardOptions::default())
            .unwrap();
        let h = 1e-5;
        let plus = solve(map, root, &(&w + &(&dw * h)), &(&x + &(&dx * h)));
        let minus = solve(map, root, &(&w - &(&dw * h)), &(&x - &(&dx * h)));
        let fd = (&plus - &minus) / (2.0 * h);
        let err = (jvp.tangent() - &fd).iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(
            err < 1e-7,
            "root {root}: jvp {} vs differences {fd} ({err:e})",
            jvp.tangent()
        );
        assert_eq!(layer.reports().last_pass(), Some(Pass::ForwardMode));
        let report = layer.reports().last().unwrap();
        assert!(report.adjoint.as_ref().unwrap().is_converged(), "{report}");
        assert_eq!(report.check.outcome, CheckOutcome::Certified, "{report}");
    }
}

#[test]
fn t3_forward_mode_gives_the_selected_element_of_each_policy() {
    // y = relu(0.5 y + theta) at theta = 0: d/(1 - 0.5 d) for relu'(0) = d.
    let layer = ImplicitLayer::fixed_point(|y, th| Ok((y * 0.5 + th[0]).relu()), ImplicitOptions::default()).unwrap();
    for (slope, expected) in [(0.0, 0.0), (0.5, 2.0 / 3.0), (1.0, 2.0)] {
        let tape = Tape::<f64>::with_policy(KinkPolicy::pytorch().with_relu(slope)).unwrap();
        let theta = tape.param(vec(&[0.0]));
        let y = layer.apply(&vec(&[0.0]), &[theta]).unwrap().z;
        let jvp = tape
            .jvp(y, &[(theta, vec(&[1.0]))], &BackwardOptions::default())
            .unwrap();
        assert!(
            (jvp.tangent()[0] - expected).abs() < 1e-12,
            "slope {slope}: {}",
            jvp.tangent()
        );
        // The kink inside the layer is in the forward-mode call's ledger, as in backward's.
        assert_eq!(jvp.ledger().kink_elements(), 1, "{:?}", jvp.ledger());
        assert_eq!(layer.reports().last_pass(), Some(Pass::ForwardMode));
    }
    // Away from the kink: y = 2 theta.
    let tape = Tape::<f64>::new();
    let theta = tape.param(vec(&[1.0]));
    let y = layer.apply(&vec(&[0.0]), &[theta]).unwrap().z;
    let jvp = tape
        .jvp(y, &[(theta, vec(&[1.0]))], &BackwardOptions::default())
        .unwrap();
    assert!((jvp.tangent()[0] - 2.0).abs() < 1e-9, "{}", jvp.tangent());
}

/// The columns of `dz/dx` of T5 by forward mode at input `x` under `policy`.
fn t5_jacobian(x: &[f64], policy: KinkPolicy, solver: AdjointSolver) -> Array2<f64> {
    let w = arr2(&[[0.5, -0.2], [0.1, 0.3]]).into_dyn();
    let options = ImplicitOptions::default().with_mode(GradientMode::Implicit(solver));
    let layer = ImplicitLayer::fixed_point(relu_deq, options).unwrap();
    let tape = Tape::<f64>::with_policy(policy).unwrap();
    let (wv, xv) = (tape.constant(w), tape.param(vec(x)));
    // Start at z* = (2, 0) so that the kink of T5's second case is met exactly.
    let z = layer.apply(&vec(&[2.0, 0.0]), &[wv, xv]).unwrap().z;
    let mut j = Array2::zeros((2, 2));
    for k in 0..2 {
        let mut e = Array1::zeros(2);
        e[k] = 1.0;
        let jvp = tape.jvp(z, &[(xv, e.into_dyn())], &BackwardOptions::default()).unwrap();
        j.column_mut(k)
            .assign(&Array1::from_iter(jvp.tangent().iter().copied()));
    }
    j
}

#[test]
fn t5_forward_mode_matches_the_closed_form_of_each_case() {
    let close = |a: &Array2<f64>, b: &Array2<f64>, tol: f64| (a - b).iter().all(|v| v.abs() < tol);
    let off_kink = arr2(&[[2.0, 0.0], [0.0, 0.0]]);
    let right = arr2(&[[0.7, -0.2], [0.1, 0.5]]) / 0.37;
    for solver in [
        AdjointSolver::Dense,
        AdjointSolver::Gmres,
        AdjointSolver::Bicgstab,
        AdjointSolver::Neumann,
    ] {
        let j = t5_jacobian(&[1.0, -1.0], KinkPolicy::pytorch(), solver);
        assert!(close(&j, &off_kink, 1e-9), "{solver:?}: {j}");
        let j = t5_jacobian(&[1.0, -0.2], KinkPolicy::pytorch(), solver);
        assert!(close(&j, &off_kink, 1e-9), "{solver:?} s = 0: {j}");
        let j = t5_jacobian(&[1.0, -0.2], KinkPolicy::pytorch().with_relu(1.0), solver);
        assert!(close(&j, &right, 1e-9), "{solver:?} s = 1: {j}");
        // General d: [[1 - 0.3d, -0.2d], [0.1d, 0.5d]] / (0.5 - 0.13d).
        let d = 0.25;
        let general = arr2(&[[1.0 - 0.3 * d, -0.2 * d], [0.1 * d, 0.5 * d]]) / (0.5 - 0.13 * d);
        let j = t5_jacobian(&[1.0, -0.2], KinkPolicy::pytorch().with_relu(d), solver);
        assert!(close(&j, &general, 1e-9), "{solver:?} d = {d}: {j}");
    }
}

/// T9: gradient descent on `h/2 (x - theta)^2` as the fixed point `x = x - alpha h (x - theta)`.
fn gd<'s>(x: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    Ok(x - (x - th[0]) * 0.6)
}

fn t9_jvp(mode: GradientMode) -> (f64, f64) {
    let layer = ImplicitLayer::fixed_point(gd, ImplicitOptions::default().with_mode(mode)).unwrap();
    let tape = Tape::<f64>::new();
    let theta = tape.param(vec(&[1.0]));
    let x = layer.apply(&vec(&[0.0]), &[theta]).unwrap().z;
    let jvp = tape
        .jvp(x, &[(theta, vec(&[1.0]))], &BackwardOptions::default())
        .unwrap();
    assert_eq!(layer.reports().last_pass(), Some(Pass::ForwardMode), "{mode:?}");
    let grad = x.sum().backward().unwrap().wrt(theta).unwrap()[0];
    assert_eq!(layer.reports().last_pass(), Some(Pass::Backward), "{mode:?}");
    (jvp.tangent()[0], grad)
}

#[test]
fn t9_every_mode_has_its_known_forward_derivative() {
    let cases = [
        (GradientMode::Implicit(AdjointSolver::Gmres), 1.0),
        (GradientMode::Implicit(AdjointSolver::Dense), 1.0),
        (GradientMode::Unrolled { iterations: 1 }, 0.6),
        (GradientMode::Unrolled { iterations: 2 }, 0.84),
        (GradientMode::Unrolled { iterations: 5 }, 0.98976),
        (GradientMode::OneStep, 0.6),
        // k Neumann terms: sum_{i<k} 0.4^i 0.6 = 1 - 0.4^k, as unrolled from zero.
        (GradientMode::TruncatedNeumann { terms: 2 }, 0.84),
        (GradientMode::LeastSquaresNoHypothesis, 1.0),
    ];
    for (mode, expected) in cases {
        let (forward, backward) = t9_jvp(mode);
        assert!((forward - expected).abs() < 1e-9, "{mode:?}: {forward} vs {expected}");
        assert!(
            (forward - backward).abs() < 1e-9,
            "{mode:?}: forward {forward}, backward {backward}"
        );
    }
}

/// `<jvp(v), w> = <v, vjp(w)>` through `tanh(V z*(W, x))`.
fn dot_test(root: bool, mode: GradientMode) {
    let n = 6;
    let (w, x) = (weight(n, 0.8), Array1::linspace(-1.0, 1.0, n).into_dyn());
    let v_out = weight(n, 1.3).mapv(|v| v + 0.1);
    let map: Map = if root { root_map } else { deq };
    let options = tight().with_mode(mode);
    let layer = layer_of(map, root, options);
    let tape = Tape::<f64>::new();
    let (wv, xv, vv) = (tape.param(w.clone()), tape.param(x.clone()), tape.param(v_out.clone()));
    let z = layer.apply(&ArrayD::zeros(vec![n]), &[wv, xv]).unwrap().z;
    let out = vv.matmul(z).tanh();
    let tangents = [
        (wv, weight(n, 1.0).mapv(|v| v.cos())),
        (xv, Array1::linspace(0.5, -0.3, n).into_dyn()),
        (vv, weight(n, 0.7).mapv(|v| v * v - 0.1)),
    ];
    let jvp = tape.jvp(out, &tangents, &BackwardOptions::default()).unwrap();
    let seed = Array1::linspace(-0.4, 1.2, n).into_dyn();
    let grads = out.backward_with(&BackwardOptions::seed(seed.clone())).unwrap();
    let lhs = dot(jvp.tangent(), &seed);
    let rhs: f64 = tangents.iter().map(|(p, t)| dot(t, grads.wrt(*p).unwrap())).sum();
    let rel = (lhs - rhs).abs() / lhs.abs().max(rhs.abs());
    assert!(
        rel <= 1e-10,
        "root {root}, {mode:?}: <J v, w> = {lhs}, <v, J^T w> = {rhs} ({rel:e})"
    );
    let passes = layer.reports().passes();
    assert_eq!(passes, vec![Pass::ForwardMode, Pass::Backward]);
}

#[test]
fn forward_and_reverse_mode_agree_through_a_network_with_a_layer() {
    for mode in [
        GradientMode::Implicit(AdjointSolver::Dense),
        GradientMode::Implicit(AdjointSolver::Gmres),
        GradientMode::Implicit(AdjointSolver::Bicgstab),
    ] {
        dot_test(false, mode);
        dot_test(true, mode);
    }
    dot_test(false, GradientMode::Implicit(AdjointSolver::Neumann));
    dot_test(false, GradientMode::TruncatedNeumann { terms: 3 });
}

#[test]
fn a_violated_hypothesis_is_refused_in_forward_mode_as_in_backward() {
    // y = relu(2 y + theta) at theta = 0: 1 - 2d vanishes at d = 1/2.
    let layer = ImplicitLayer::fixed_point(|y, th| Ok((y * 2.0 + th[0]).relu()), ImplicitOptions::default()).unwrap();
    let tape = Tape::<f64>::with_policy(KinkPolicy::pytorch()).unwrap();
    let theta = tape.param(vec(&[0.0]));
    let y = layer.apply(&vec(&[0.0]), &[theta]).unwrap().z;
    let err = tape
        .jvp(y, &[(theta, vec(&[1.0]))], &BackwardOptions::default())
        .unwrap_err();
    assert!(
        matches!(&err, Error::HypothesisViolated { node, .. } if node == "fixed_point"),
        "{err}"
    );
    assert_eq!(layer.reports().last_pass(), Some(Pass::ForwardMode));
    let report = layer.reports().last().unwrap();
    assert_eq!(report.check.outcome, CheckOutcome::Violated);
    assert!(report.adjoint.is_none(), "refused before any solve");
    let err = y.sum().backward().unwrap_err();
    assert!(matches!(err, Error::HypothesisViolated { .. }), "{err}");
    assert_eq!(layer.reports().last_pass(), Some(Pass::Backward));
}

#[test]
fn a_map_without_a_forward_mode_rule_is_refused_by_name() {
    fn opaque<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
        let value = z.value().mapv(|v| 0.5 * v);
        let half = z.tape().try_custom_fn("opaque_half", &[z], value, |_, _, g| {
            Ok(vec![Some(g.mapv(|v| 0.5 * v))])
        })?;
        Ok(half + th[0])
    }
    let layer = ImplicitLayer::fixed_point(opaque, ImplicitOptions::default()).unwrap();
    let tape = Tape::<f64>::new();
    let theta = tape.param(vec(&[1.0, 2.0]));
    let z = layer.apply(&vec(&[0.0, 0.0]), &[theta]).unwrap().z;
    let err = tape
        .jvp(z, &[(theta, vec(&[1.0, 0.0]))], &BackwardOptions::default())
        .unwrap_err();
    let Error::InImplicit { node, source, .. } = &err else {
        panic!("expected an error inside the layer, got {err}");
    };
    assert_eq!(node, "fixed_point");
    assert!(
        matches!(&**source, Error::CustomOp { op, .. } if op == "opaque_half"),
        "{err}"
    );
    // Backward does not need forward-mode products.
    let g = z.sum().backward().unwrap();
    assert!((g.wrt(theta).unwrap()[0] - 2.0).abs() < 1e-9);
}
