//! Forward mode through the fused DEQ cell: the tangent solve `(I - J_z) v = D t` is the
//! transpose of the adjoint in every gradient mode (dot test), matches central differences
//! off kinks and the closed form at a kink under three policies, reports its kinks in the
//! ledger of the forward-mode call, and is refused where backward is.

use clarke_core::{BackwardOptions, Error, KinkPolicy, Tape, Var};
use clarke_implicit::{AdjointSolver, CheckOutcome, GradientMode, Pass};
use clarke_nn::ParamSet;
use clarke_nn::deq::{Activation, DeqConfig, DeqLayer, ForwardMethod, Parametrization};
use ndarray::{Array2, ArrayD};

use crate::deq::{deq_on_kink, inputs, rng};

fn dot(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A seeded direction of the given shape.
fn direction(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let n: usize = shape.iter().product();
    let flat = clarke_nn::init::normal::<f64>(1, n.max(1), 1.0, &mut rng(seed));
    ArrayD::from_shape_vec(shape.to_vec(), flat.iter().copied().take(n).collect()).unwrap()
}

fn layer(config: DeqConfig, d: usize, n: usize, seed: u64) -> (ParamSet<f64>, DeqLayer<f64>) {
    let mut r = rng(seed);
    let mut params = ParamSet::new();
    let deq = DeqLayer::new(
        &mut params,
        "deq",
        d,
        n,
        config.with_power_iterations(5000, 1e-15),
        &mut r,
    )
    .unwrap();
    let bias = params.id("deq.bias").unwrap();
    *params.get_mut(bias) = clarke_nn::init::normal::<f64>(1, n, 0.5, &mut r)
        .into_shape_with_order(vec![n])
        .unwrap();
    (params, deq)
}

/// `(<J v, w>, <v, J^T w>)` for the layer's output `z(params, x)`, with seeded directions
/// on every parameter and on `x`, under `policy`.
fn dot_test(params: &ParamSet<f64>, deq: &DeqLayer<f64>, x: &Array2<f64>, policy: KinkPolicy, seed: u64) -> (f64, f64) {
    let tape = Tape::<f64>::new();
    let bound = params.bind(&tape);
    let xv = tape.param(x.clone().into_dyn());
    let z = deq.forward(&bound, xv).unwrap();
    let mut pairs: Vec<(Var<'_, f64>, ArrayD<f64>)> = params
        .ids()
        .enumerate()
        .map(|(k, id)| (bound.var(id), direction(params.get(id).shape(), seed + k as u64)))
        .collect();
    pairs.push((xv, direction(x.shape(), seed + 100)));
    let options = BackwardOptions::policy(policy.clone());
    let jvp = tape.jvp(z, &pairs, &options).unwrap();
    assert_eq!(deq.reports().last_pass(), Some(Pass::ForwardMode));
    let w = direction(z.value().shape(), seed + 200);
    let grads = z
        .backward_with(&BackwardOptions::seed(w.clone()).with_policy(policy))
        .unwrap();
    assert_eq!(deq.reports().last_pass(), Some(Pass::Backward));
    let forward = dot(jvp.tangent(), &w);
    let reverse = pairs.iter().map(|(v, t)| dot(t, grads.wrt(*v).unwrap())).sum();
    (forward, reverse)
}

#[test]
fn the_jvp_is_the_transpose_of_the_vjp_in_every_gradient_mode() {
    let x = inputs(4, 3, 21);
    for mode in [
        GradientMode::Implicit(AdjointSolver::Dense),
        GradientMode::Implicit(AdjointSolver::Neumann),
        GradientMode::Implicit(AdjointSolver::Gmres),
        GradientMode::Implicit(AdjointSolver::Bicgstab),
        GradientMode::Implicit(AdjointSolver::Anderson { memory: 4 }),
        GradientMode::TruncatedNeumann { terms: 4 },
        GradientMode::Unrolled { iterations: 12 },
        GradientMode::OneStep,
    ] {
        let config = DeqConfig::default()
            .with_activation(Activation::Tanh)
            .with_forward_tolerance(1e-14, 5000)
            .with_adjoint_tolerance(1e-14, 5000)
            .with_gradient(mode);
        let (params, deq) = layer(config, 3, 6, 22);
        let (forward, reverse) = dot_test(&params, &deq, &x, KinkPolicy::pytorch(), 23);
        let rel = (forward - reverse).abs() / reverse.abs().max(1.0);
        assert!(
            rel <= 1e-12,
            "{mode:?}: <Jv, w> = {forward}, <v, J^T w> = {reverse} ({rel:e})"
        );
    }
}

#[test]
fn the_jvp_matches_central_differences() {
    let config = DeqConfig::default()
        .with_activation(Activation::Tanh)
        .with_forward_tolerance(1e-14, 5000)
        .with_adjoint_tolerance(1e-13, 5000);
    let (mut params, deq) = layer(config, 3, 5, 24);
    let x = inputs(3, 3, 25);
    let ids: Vec<_> = params.ids().collect();
    let dirs: Vec<ArrayD<f64>> = ids
        .iter()
        .enumerate()
        .map(|(k, id)| direction(params.get(*id).shape(), 30 + k as u64))
        .collect();
    let dx: Array2<f64> = direction(x.shape(), 40).into_dimensionality().unwrap();
    let value = |params: &ParamSet<f64>, x: &Array2<f64>| {
        let tape = Tape::<f64>::new();
        let bound = params.bind(&tape);
        deq.forward(&bound, tape.constant(x.clone().into_dyn()))
            .unwrap()
            .value()
    };
    let tape = Tape::<f64>::new();
    let bound = params.bind(&tape);
    let xv = tape.param(x.clone().into_dyn());
    let z = deq.forward(&bound, xv).unwrap();
    let mut pairs: Vec<_> = ids
        .iter()
        .zip(&dirs)
        .map(|(id, d)| (bound.var(*id), d.clone()))
        .collect();
    pairs.push((xv, dx.clone().into_dyn()));
    let jvp = tape.jvp(z, &pairs, &BackwardOptions::default()).unwrap();
    let report = deq.reports().last().unwrap();
    assert_eq!(report.check.outcome, CheckOutcome::Certified, "{}", report.check);
    assert!(report.adjoint.as_ref().unwrap().residual <= 1e-13);
    let h = 1e-6;
    let shifted = |params: &mut ParamSet<f64>, sign: f64| {
        for (id, d) in ids.iter().zip(&dirs) {
            let p = params.get_mut(*id);
            *p = &*p + &(d * (sign * h));
        }
    };
    shifted(&mut params, 1.0);
    let plus = value(&params, &(&x + &(&dx * h)));
    shifted(&mut params, -2.0);
    let minus = value(&params, &(&x - &(&dx * h)));
    let fd = (plus - minus) / (2.0 * h);
    let err = (jvp.tangent() - &fd).iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let scale = fd.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    assert!(
        err <= 1e-7 * scale,
        "JVP against central differences: {err:e} (scale {scale})"
    );
}

#[test]
fn at_a_kink_the_jvp_is_the_policy_element_and_reaches_the_ledger() {
    // `deq_on_kink`: z* = (2, 0) with the second pre-activation on the kink. With
    // D = diag(1, s), (I - D W)^{-1} D (1, 1) = (2, 4s / (1 - s/2)).
    for forward in [ForwardMethod::Picard, ForwardMethod::Anderson { memory: 3 }] {
        let (params, deq) = deq_on_kink(forward);
        for s in [0.0, 0.5, 1.0] {
            let policy = KinkPolicy::pytorch().with_relu(s);
            let tape = Tape::<f64>::new();
            let bound = params.bind(&tape);
            let z = deq.forward(&bound, tape.constant(ArrayD::zeros(vec![1, 1]))).unwrap();
            let bias = bound.var(params.id("deq.bias").unwrap());
            let tangent = ndarray::arr1(&[1.0, 1.0]).into_dyn();
            let jvp = tape
                .jvp(z, &[(bias, tangent)], &BackwardOptions::policy(policy.clone()))
                .unwrap();
            let want = [2.0, 4.0 * s / (1.0 - 0.5 * s)];
            for (got, want) in jvp.tangent().iter().zip(want) {
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{forward:?} s = {s}: {} vs {want:?}",
                    jvp.tangent()
                );
            }
            let records: Vec<_> = jvp.ledger().in_layer("deq").collect();
            assert_eq!(records.len(), 1, "{}", jvp.ledger());
            assert_eq!(records[0].kink_indices, vec![1]);
            assert_eq!(records[0].selection, clarke_core::Selection::Slope(s));
            assert_eq!(deq.reports().last_pass(), Some(Pass::ForwardMode));
            let report = deq.reports().last().unwrap();
            assert_eq!(report.check.outcome, CheckOutcome::Certified, "{}", report.check);
            assert_eq!(report.kinks.records().len(), 1);
            // The same element in both directions: the dot test at the kink.
            let (f, r) = dot_test(&params, &deq, &Array2::zeros((1, 1)), policy, 50);
            assert!((f - r).abs() <= 1e-12 * r.abs().max(1.0), "s = {s}: {f} vs {r}");
        }
    }
}

#[test]
fn forward_mode_refuses_a_singular_selection_as_backward_does() {
    // W = I: every relu at its kink at z* = 0, and some selection makes I - D W singular.
    let config = DeqConfig::default()
        .with_parametrization(Parametrization::Unconstrained)
        .with_forward_tolerance(1e-12, 100);
    let mut params = ParamSet::<f64>::new();
    let deq = DeqLayer::new(&mut params, "deq", 2, 3, config, &mut rng(14)).unwrap();
    *params.get_mut(params.id("deq.w").unwrap()) = Array2::<f64>::eye(3).into_dyn();
    let tape = Tape::<f64>::new();
    let bound = params.bind(&tape);
    let z = deq.forward(&bound, tape.constant(ArrayD::zeros(vec![1, 2]))).unwrap();
    let bias = bound.var(params.id("deq.bias").unwrap());
    let err = tape
        .jvp(z, &[(bias, ArrayD::ones(vec![3]))], &BackwardOptions::default())
        .unwrap_err();
    assert!(
        matches!(&err, Error::HypothesisViolated { node, .. } if node == "deq"),
        "{err}"
    );
    assert_eq!(deq.reports().last_pass(), Some(Pass::ForwardMode));
    let report = deq.reports().last().unwrap();
    assert_eq!(report.check.outcome, CheckOutcome::Violated, "{}", report.check);
    assert!(report.adjoint.is_none(), "refused before any solve");
}

#[test]
fn a_non_finite_tangent_is_refused_by_name() {
    let (params, deq) = layer(DeqConfig::default(), 2, 3, 60);
    let tape = Tape::<f64>::new();
    let bound = params.bind(&tape);
    let xv = tape.param(ArrayD::zeros(vec![1, 2]));
    let z = deq.forward(&bound, xv).unwrap();
    let err = tape
        .jvp(
            z,
            &[(xv, ndarray::arr2(&[[1.0, f64::INFINITY]]).into_dyn())],
            &BackwardOptions::default(),
        )
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("deq") && text.contains("tangent of x") && text.contains("inf"),
        "{text}"
    );
}
