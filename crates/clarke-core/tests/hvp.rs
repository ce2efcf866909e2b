//! Hessian-vector products (`Tape::hvp`): every op of the shared table against central
//! differences of gradients, symmetry on a smooth network, the gradient it returns, exact
//! values at a relu kink under two policies, and its refusals.

use clarke_core::{BackwardOptions, Error, KinkPolicy, Tape, Var};
use ndarray::{ArrayD, IxDyn, arr1};

use crate::op_cases::{self, Case, F, random};

/// Step of the central differences of gradients.
const H: f64 = 1e-5;

/// The scalar whose Hessian is checked: `sum(tanh(op(x)))`, so that second derivatives are
/// non-trivial even for linear and piecewise-linear ops.
fn scalar_of<'t>(tape: &'t Tape<f64>, f: F, vars: &[Var<'t, f64>]) -> Var<'t, f64> {
    f(tape, vars).unwrap().tanh().sum()
}

/// Gradient of the scalar at `inputs`, by backward.
fn gradient(f: F, inputs: &[ArrayD<f64>]) -> Vec<ArrayD<f64>> {
    let tape = Tape::<f64>::new();
    let vars: Vec<_> = inputs.iter().map(|x| tape.param(x.clone())).collect();
    let grads = scalar_of(&tape, f, &vars).backward().unwrap();
    vars.iter().map(|&v| grads.wrt(v).unwrap().clone()).collect()
}

/// `(gradient, H v)` of the scalar at `inputs` along `v`, checking the gradient against
/// backward's on the same tape.
fn hvp(f: F, inputs: &[ArrayD<f64>], v: &[ArrayD<f64>]) -> (Vec<ArrayD<f64>>, Vec<ArrayD<f64>>) {
    let tape = Tape::<f64>::new();
    let vars: Vec<_> = inputs.iter().map(|x| tape.param(x.clone())).collect();
    let y = scalar_of(&tape, f, &vars);
    let tangents: Vec<_> = vars.iter().copied().zip(v.iter().cloned()).collect();
    let result = tape.hvp(y, &tangents, &BackwardOptions::default()).unwrap();
    let backward = y.backward().unwrap();
    let grads: Vec<_> = vars.iter().map(|&x| result.grads().wrt(x).unwrap().clone()).collect();
    for (&x, g) in vars.iter().zip(&grads) {
        assert_eq!(g, backward.wrt(x).unwrap(), "the gradient is backward's");
    }
    (
        grads,
        vars.iter().map(|&x| result.product(x).unwrap().clone()).collect(),
    )
}

/// `max |a - b| / max(max |b|, 1e-3)` over all arrays.
fn relative_error(a: &[ArrayD<f64>], b: &[ArrayD<f64>]) -> f64 {
    let diff = a
        .iter()
        .zip(b)
        .flat_map(|(a, b)| a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f64::max);
    let scale = b.iter().flat_map(|b| b.iter().map(|y| y.abs())).fold(1e-3, f64::max);
    diff / scale
}

/// Checks `H v` of every case against `(grad(x + h v) - grad(x - h v)) / 2h`; returns the
/// worst relative error.
fn check_all(cases: Vec<Case>) -> f64 {
    let mut worst: f64 = 0.0;
    for (k, (name, f, inputs)) in cases.into_iter().enumerate() {
        let v: Vec<_> = inputs
            .iter()
            .enumerate()
            .map(|(i, x)| random(x.shape(), 1000 + 10 * k as u64 + i as u64, -1.0, 1.0))
            .collect();
        let shifted =
            |sign: f64| -> Vec<ArrayD<f64>> { inputs.iter().zip(&v).map(|(x, v)| x + &(v * (sign * H))).collect() };
        let (plus, minus) = (gradient(f, &shifted(1.0)), gradient(f, &shifted(-1.0)));
        let fd: Vec<_> = plus.iter().zip(&minus).map(|(p, m)| (p - m) / (2.0 * H)).collect();
        let (_, products) = hvp(f, &inputs, &v);
        let err = relative_error(&products, &fd);
        assert!(
            err < 1e-6,
            "{name}: H v {products:?} vs differences {fd:?} (relative error {err:e})"
        );
        worst = worst.max(err);
    }
    eprintln!("worst relative error {worst:e}");
    worst
}

op_cases::test_every_table!(check_all);

/// A smooth two-layer network with a cross-entropy loss; the parameters are `w1, b1, w2, b2`.
fn mlp_loss<'t>(tape: &'t Tape<f64>, params: &[Var<'t, f64>]) -> Var<'t, f64> {
    let x = tape.constant(random(&[4, 3], 7, -1.0, 1.0));
    let hidden = x.matmul(params[0]) + params[1];
    let logits = hidden.tanh().softplus().matmul(params[2]) + params[3];
    logits.log_softmax(1).softmax_cross_entropy(&[0, 2, 1, 2])
}

fn mlp_params() -> Vec<ArrayD<f64>> {
    vec![
        random(&[3, 5], 1, -1.0, 1.0),
        random(&[5], 2, -1.0, 1.0),
        random(&[5, 3], 3, -1.0, 1.0),
        random(&[3], 4, -1.0, 1.0),
    ]
}

/// `H d` of the network loss for the direction `d` (one array per parameter).
fn mlp_hvp(direction: &[ArrayD<f64>]) -> Vec<ArrayD<f64>> {
    let tape = Tape::<f64>::new();
    let params: Vec<_> = mlp_params().into_iter().map(|p| tape.param(p)).collect();
    let loss = mlp_loss(&tape, &params);
    let tangents: Vec<_> = params.iter().copied().zip(direction.iter().cloned()).collect();
    let result = tape.hvp(loss, &tangents, &BackwardOptions::default()).unwrap();
    let backward = loss.backward().unwrap();
    for &p in &params {
        assert_eq!(result.grads().wrt(p).unwrap(), backward.wrt(p).unwrap());
    }
    params.iter().map(|&p| result.product(p).unwrap().clone()).collect()
}

fn dot(a: &[ArrayD<f64>], b: &[ArrayD<f64>]) -> f64 {
    a.iter().zip(b).map(|(a, b)| (a * b).sum()).sum()
}

#[test]
fn the_hessian_of_a_smooth_network_is_symmetric() {
    let direction = |seed: u64| -> Vec<ArrayD<f64>> {
        mlp_params()
            .iter()
            .enumerate()
            .map(|(i, p)| random(p.shape(), seed + i as u64, -1.0, 1.0))
            .collect()
    };
    let (v, w) = (direction(100), direction(200));
    let (hv, hw) = (mlp_hvp(&v), mlp_hvp(&w));
    let (left, right) = (dot(&hv, &w), dot(&v, &hw));
    let err = (left - right).abs() / left.abs().max(right.abs());
    eprintln!("symmetry: <H v, w> = {left}, <v, H w> = {right}, relative error {err:e}");
    assert!(err < 1e-10, "<H v, w> = {left}, <v, H w> = {right}");
    assert!(left.abs() > 1e-3, "a non-trivial curvature");
}

#[test]
fn the_gradient_is_backwards_with_parameters_off_the_direction() {
    // Only w2 moves: the other parameters get H v too, and their gradients are backward's.
    let tape = Tape::<f64>::new();
    let params: Vec<_> = mlp_params().into_iter().map(|p| tape.param(p)).collect();
    let unused = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    let loss = mlp_loss(&tape, &params);
    let v = random(&[5, 3], 9, -1.0, 1.0);
    let result = tape.hvp(loss, &[(params[2], v)], &BackwardOptions::default()).unwrap();
    let backward = loss.backward().unwrap();
    for &p in params.iter().chain([&unused]) {
        assert_eq!(result.grads().wrt(p).unwrap(), backward.wrt(p).unwrap());
    }
    assert!(result.product(params[0]).unwrap().iter().any(|&h| h != 0.0));
    assert!(result.product(unused).unwrap().iter().all(|&h| h == 0.0));
}

#[test]
fn at_a_relu_kink_the_product_is_the_selected_branchs() {
    // y = sum(relu(x)^2 + x relu(x)): at x = 0 with relu'(0) = s the selected gradient is
    // 2 relu(x) s + relu(x) + x s, whose derivative is 2 s^2 + 2 s; at x = 1 it is 4.
    for (policy, s) in [
        (KinkPolicy::pytorch(), 0.0),
        (KinkPolicy::one(), 1.0),
        (KinkPolicy::pytorch().with_relu(0.5), 0.5),
    ] {
        let tape = Tape::<f64>::new();
        let x = tape.param(arr1(&[0.0, 1.0]).into_dyn());
        let r = x.relu();
        let y = (r.powi(2) + x * r).sum();
        let v = arr1(&[1.0, -2.0]).into_dyn();
        let options = BackwardOptions::policy(policy);
        let result = tape.hvp(y, &[(x, v)], &options).unwrap();
        let expected = [2.0 * s * s + 2.0 * s, -2.0 * 4.0];
        assert_eq!(
            result.product(x).unwrap().as_slice().unwrap(),
            &expected,
            "relu'(0) = {s}"
        );
        assert_eq!(
            result.grads().wrt(x).unwrap(),
            y.backward_with(&options).unwrap().wrt(x).unwrap()
        );
        assert_eq!(result.ledger().exact_hits(), 1);
    }
}

#[test]
fn element_selections_apply_as_in_backward() {
    // The same kink with its own selection: relu'(0) = 0.25 at element 0 only.
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[0.0, 0.0]).into_dyn());
    let r = x.relu();
    let y = r.powi(2).sum();
    let options = BackwardOptions::policy(KinkPolicy::one()).with_element_selection(r.id(), 0, 0.25);
    let result = tape.hvp(y, &[(x, arr1(&[1.0, 1.0]).into_dyn())], &options).unwrap();
    // H v = 2 s^2 v per element.
    assert_eq!(result.product(x).unwrap().as_slice().unwrap(), &[0.125, 2.0]);
}

#[test]
fn refuses_a_non_scalar_output() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    let err = tape.hvp(
        x.exp(),
        &[(x, arr1(&[1.0, 0.0]).into_dyn())],
        &BackwardOptions::default(),
    );
    assert!(
        matches!(err, Err(Error::NonScalarOutput { ref shape }) if shape == &[2]),
        "{err:?}"
    );
}

#[test]
fn refuses_a_tangent_of_the_wrong_shape() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    let y = x.exp().sum();
    let err = tape.hvp(y, &[(x, ArrayD::zeros(IxDyn(&[3])))], &BackwardOptions::default());
    assert!(matches!(err, Err(Error::ShapeMismatch { .. })), "{err:?}");
    assert!(err.unwrap_err().to_string().contains("hvp"));
}

#[test]
fn refuses_a_custom_op_by_name() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    let cube = tape
        .try_custom_fn("cube", &[x], x.value().mapv(|v| v * v * v), |i, _, g| {
            Ok(vec![Some(&g * &i[0].mapv(|v| 3.0 * v * v))])
        })
        .unwrap();
    let err = tape
        .hvp(
            cube.sum(),
            &[(x, arr1(&[1.0, 0.0]).into_dyn())],
            &BackwardOptions::default(),
        )
        .unwrap_err();
    let Error::CustomOp { op, detail } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(op, "cube");
    assert!(detail.contains("no second-order rule"), "{detail}");
}
