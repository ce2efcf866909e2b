//! The DEQ layer: gradients against the generic implicit node and finite differences, every
//! adjoint solver, both parametrisations, exact values at kinks, and bad input.

use clarke_core::{BackwardOptions, Error, KinkPolicy, Tape, Var};
use clarke_implicit::{AdjointSolver, CheckOptions, CheckOutcome, GradientMode, ImplicitOptions};
use clarke_nn::deq::{
    Activation, DeqConfig, DeqLayer, DeqWeights, ForwardMethod, MAX_ANDERSON_MEMORY, Parametrization,
};
use clarke_nn::{Linear, ParamSet};
use clarke_solve::FixedPointOptions;
use ndarray::{Array2, ArrayD};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub(crate) fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub(crate) fn inputs(batch: usize, d: usize, seed: u64) -> Array2<f64> {
    clarke_nn::init::normal(batch, d, 1.0, &mut rng(seed))
}

struct Model {
    params: ParamSet<f64>,
    deq: DeqLayer<f64>,
    head: Linear,
}

fn model(config: DeqConfig, d: usize, n: usize, seed: u64) -> Model {
    let config = config.with_power_iterations(5000, 1e-15);
    let mut r = rng(seed);
    let mut params = ParamSet::new();
    let deq = DeqLayer::new(&mut params, "deq", d, n, config, &mut r).unwrap();
    let head = Linear::new(&mut params, "head", n, 3, &mut r).unwrap();
    // A non-zero bias so that relu cells are not all at their kink.
    let bias = params.id("deq.bias").unwrap();
    *params.get_mut(bias) = clarke_nn::init::normal::<f64>(1, n, 0.5, &mut r)
        .into_shape_with_order(vec![n])
        .unwrap();
    Model { params, deq, head }
}

/// Loss and gradients (all parameters, then x) of cross-entropy(head(deq(x))).
fn loss_and_grads(m: &Model, x: &Array2<f64>, labels: &[usize], policy: KinkPolicy) -> (f64, Vec<ArrayD<f64>>) {
    let tape = Tape::with_policy(policy).unwrap();
    let bound = m.params.bind(&tape);
    let xv = tape.param(x.clone().into_dyn());
    let z = m.deq.forward(&bound, xv).unwrap();
    let loss = m.head.forward(&bound, z).unwrap().softmax_cross_entropy(labels);
    let grads = loss.backward().unwrap();
    let mut out = bound.gradients(&grads, &m.params).unwrap();
    out.push(grads.wrt(xv).unwrap().clone());
    (loss.scalar(), out)
}

fn max_rel_diff(a: &[ArrayD<f64>], b: &[ArrayD<f64>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            let scale = a.iter().map(|v| v.abs()).fold(1e-3, f64::max);
            a.iter().zip(b).map(|(x, y)| (x - y).abs() / scale).fold(0.0, f64::max)
        })
        .fold(0.0, f64::max)
}

/// The DEQ cell `sigma(z W^T + x U^T + b)` recorded on a tape, `th = [x, W, U, b]`.
fn cell<'s>(act: Activation, z: Var<'s, f64>, th: &[Var<'s, f64>]) -> clarke_core::Result<Var<'s, f64>> {
    let pre = z
        .try_matmul(th[1].t())?
        .try_add(th[0].try_matmul(th[2].t())?)?
        .try_add(th[3])?;
    Ok(match act {
        Activation::Relu => pre.relu(),
        Activation::LeakyRelu(a) => pre.leaky_relu(a),
        Activation::Tanh => pre.tanh(),
    })
}

const LABELS: [usize; 5] = [0, 2, 1, 1, 0];

#[test]
fn fused_gradient_equals_the_generic_implicit_node() {
    for act in [Activation::Tanh, Activation::Relu, Activation::LeakyRelu(0.1)] {
        let config = DeqConfig::default()
            .with_activation(act)
            .with_forward_tolerance(1e-13, 2000)
            .with_adjoint_tolerance(1e-13, 2000);
        let m = model(config, 4, 6, 1);
        let x = inputs(5, 4, 2);
        let (_, fused) = loss_and_grads(&m, &x, &LABELS, KinkPolicy::pytorch());

        // The same cell through clarke_implicit::fixed_point, with W from the layer.
        let tape = Tape::<f64>::new();
        let bound = m.params.bind(&tape);
        let xv = tape.param(x.clone().into_dyn());
        let w = m.deq.weight(&bound).unwrap();
        let (u, b) = (
            bound.var(m.params.id("deq.u").unwrap()),
            bound.var(m.params.id("deq.bias").unwrap()),
        );
        let options = ImplicitOptions::default()
            .with_forward(
                FixedPointOptions::for_precision::<f64>()
                    .with_tol(1e-13)
                    .with_max_iter(2000),
            )
            .with_mode(GradientMode::Implicit(AdjointSolver::Gmres));
        let (sol, _) = clarke_implicit::fixed_point(
            move |z, th| cell(act, z, th),
            &ArrayD::zeros(vec![5, 6]),
            &[xv, w, u, b],
            options,
        )
        .unwrap();
        let loss = m.head.forward(&bound, sol.z).unwrap().softmax_cross_entropy(&LABELS);
        let grads = loss.backward().unwrap();
        let mut generic = bound.gradients(&grads, &m.params).unwrap();
        generic.push(grads.wrt(xv).unwrap().clone());
        let diff = max_rel_diff(&fused, &generic);
        assert!(diff < 1e-8, "{act:?}: fused and generic gradients differ by {diff:e}");
    }
}

#[test]
fn gradients_match_central_finite_differences() {
    let config = DeqConfig::default()
        .with_activation(Activation::Tanh)
        .with_forward_tolerance(1e-14, 5000)
        .with_adjoint_tolerance(1e-13, 5000);
    let mut m = model(config, 3, 5, 4);
    let x = inputs(5, 3, 5);
    let (_, grads) = loss_and_grads(&m, &x, &LABELS, KinkPolicy::pytorch());
    let h = 1e-6;
    let ids: Vec<_> = m.params.ids().collect();
    for (k, id) in ids.iter().enumerate() {
        let len = m.params.get(*id).len();
        for e in 0..len {
            let orig = m.params.get(*id).as_slice().unwrap()[e];
            m.params.get_mut(*id).as_slice_mut().unwrap()[e] = orig + h;
            let plus = loss_and_grads(&m, &x, &LABELS, KinkPolicy::pytorch()).0;
            m.params.get_mut(*id).as_slice_mut().unwrap()[e] = orig - h;
            let minus = loss_and_grads(&m, &x, &LABELS, KinkPolicy::pytorch()).0;
            m.params.get_mut(*id).as_slice_mut().unwrap()[e] = orig;
            let fd = (plus - minus) / (2.0 * h);
            let ad = *grads[k].iter().nth(e).unwrap();
            assert!(
                (fd - ad).abs() <= 1e-7 * (1.0 + fd.abs()),
                "{}[{e}]: finite difference {fd}, implicit gradient {ad}",
                m.params.name(*id)
            );
        }
    }
}

#[test]
fn every_adjoint_solver_gives_the_same_gradient() {
    let x = inputs(5, 4, 7);
    let solve = |solver| {
        let config = DeqConfig::default()
            .with_forward_tolerance(1e-13, 2000)
            .with_adjoint_tolerance(1e-12, 2000)
            .with_gradient(GradientMode::Implicit(solver));
        let m = model(config, 4, 8, 8);
        let (_, g) = loss_and_grads(&m, &x, &LABELS, KinkPolicy::pytorch());
        let report = m.deq.reports().last().unwrap();
        assert_eq!(report.check.outcome, CheckOutcome::Certified, "{}", report.check);
        assert!(report.adjoint.as_ref().unwrap().residual <= 1e-11);
        g
    };
    let dense = solve(AdjointSolver::Dense);
    for solver in [
        AdjointSolver::Neumann,
        AdjointSolver::Anderson { memory: 5 },
        AdjointSolver::Gmres,
        AdjointSolver::Bicgstab,
    ] {
        let diff = max_rel_diff(&dense, &solve(solver));
        assert!(diff < 1e-9, "{solver:?} differs from the dense solve by {diff:e}");
    }
}

#[test]
fn unrolled_converges_to_implicit_and_truncated_neumann_is_reported_approximate() {
    let x = inputs(5, 4, 9);
    let grads = |mode| {
        let config = DeqConfig::default()
            .with_activation(Activation::Tanh)
            .with_forward_tolerance(1e-14, 5000)
            .with_adjoint_tolerance(1e-13, 5000)
            .with_gradient(mode);
        let m = model(config, 4, 6, 10);
        let g = loss_and_grads(&m, &x, &LABELS, KinkPolicy::pytorch()).1;
        (g, m.deq.reports().last())
    };
    let (implicit, _) = grads(GradientMode::Implicit(AdjointSolver::Neumann));
    let errors: Vec<f64> = [5, 20, 80, 300]
        .iter()
        .map(|&k| max_rel_diff(&implicit, &grads(GradientMode::Unrolled { iterations: k }).0))
        .collect();
    // Geometric decrease until rounding.
    assert!(
        errors[..3].windows(2).all(|w| w[1] < 1e-2 * w[0]),
        "unrolled errors {errors:?}"
    );
    assert!(errors[2] < 1e-9 && errors[3] < 1e-9, "unrolled errors {errors:?}");
    let (one_step, _) = grads(GradientMode::OneStep);
    assert!(
        max_rel_diff(&implicit, &one_step) > 1e-3,
        "one-step should differ from implicit"
    );
    let (truncated, report) = grads(GradientMode::TruncatedNeumann { terms: 200 });
    assert!(max_rel_diff(&implicit, &truncated) < 1e-7);
    let report = report.unwrap();
    assert!(report.approximate);
    assert_eq!(report.adjoint.unwrap().iterations, 199);
}

#[test]
fn monotone_parametrisation_is_certified_even_when_w_is_not_a_contraction() {
    let config = DeqConfig::default()
        .with_parametrization(Parametrization::Monotone { m: 0.5 })
        .with_gradient(GradientMode::Implicit(AdjointSolver::Gmres))
        .with_forward_tolerance(1e-12, 20000)
        .with_adjoint_tolerance(1e-12, 2000);
    let m = model(config.clone(), 4, 8, 11);
    let tape = Tape::<f64>::new();
    let w = m.deq.weight(&m.params.bind(&tape)).unwrap().value();
    let w = w.into_dimensionality::<ndarray::Ix2>().unwrap();
    let norm = clarke_solve::dense::singular_values(w.view()).unwrap()[0];
    assert!(norm > 1.0, "the test wants ||W|| > 1, got {norm}");
    let x = inputs(5, 4, 12);
    let (_, fused) = loss_and_grads(&m, &x, &LABELS, KinkPolicy::pytorch());
    let report = m.deq.reports().last().unwrap();
    assert_eq!(report.forward.solver, "peaceman_rachford");
    assert_eq!(report.check.outcome, CheckOutcome::Certified);
    assert!(report.forward_residual < 1e-10);
    let pr_iterations = report.forward.iterations;
    // Forward-backward splitting and Anderson on the plain map reach the same fixed point
    // and gradient; forward-backward takes many times Peaceman-Rachford's iterations.
    let fb = model(
        config
            .clone()
            .with_forward(ForwardMethod::ForwardBackward { alpha: None }),
        4,
        8,
        11,
    );
    let (_, fb_grads) = loss_and_grads(&fb, &x, &LABELS, KinkPolicy::pytorch());
    let fb_report = fb.deq.reports().last().unwrap();
    assert_eq!(fb_report.forward.solver, "forward_backward");
    assert!(fb_report.forward_residual < 1e-10);
    assert!(max_rel_diff(&fused, &fb_grads) < 1e-7);
    assert!(
        4 * pr_iterations < fb_report.forward.iterations,
        "Peaceman-Rachford {pr_iterations} iterations, forward-backward {}",
        fb_report.forward.iterations
    );
    let m2 = model(config.with_forward(ForwardMethod::Anderson { memory: 6 }), 4, 8, 11);
    let (_, anderson) = loss_and_grads(&m2, &x, &LABELS, KinkPolicy::pytorch());
    assert!(max_rel_diff(&fused, &anderson) < 1e-7);
    let dense = model(
        DeqConfig::default()
            .with_parametrization(Parametrization::Monotone { m: 0.5 })
            .with_gradient(GradientMode::Implicit(AdjointSolver::Dense))
            .with_forward_tolerance(1e-12, 20000),
        4,
        8,
        11,
    );
    let (_, dense_grads) = loss_and_grads(&dense, &x, &LABELS, KinkPolicy::pytorch());
    assert!(max_rel_diff(&fused, &dense_grads) < 1e-8);
}

/// With x = 0 and b = 0 the fixed point is z* = 0 and every relu sits at its kink: the
/// gradient is exactly the policy's element.
#[test]
fn at_the_kink_the_gradient_is_the_policy_element() {
    let n = 5;
    let config = DeqConfig::default()
        .with_gradient(GradientMode::Implicit(AdjointSolver::Dense))
        .with_forward_tolerance(1e-12, 100)
        .with_power_iterations(5000, 1e-15);
    let mut params = ParamSet::<f64>::new();
    let deq = DeqLayer::new(&mut params, "deq", 3, n, config, &mut rng(13)).unwrap();
    let seed = Array2::from_shape_fn((2, n), |(i, j)| (i * n + j) as f64 * 0.1 - 0.3);
    for slope in [0.0, 0.5, 1.0] {
        let tape = Tape::<f64>::new();
        let bound = params.bind(&tape);
        let x = tape.constant(ArrayD::zeros(vec![2, 3]));
        let z = deq.forward(&bound, x).unwrap();
        assert!(z.value().iter().all(|v| *v == 0.0));
        let policy = KinkPolicy::pytorch().with_relu(slope);
        let grads = z
            .backward_with(&BackwardOptions::seed(seed.clone().into_dyn()).with_policy(policy))
            .unwrap();
        let b_bar = grads.wrt(bound.var(params.id("deq.bias").unwrap())).unwrap();
        // Row form: w (I - d W) = g with d = slope, then b_bar = d * sum_rows(w).
        let w = deq
            .weight(&bound)
            .unwrap()
            .value()
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap();
        let a = Array2::<f64>::eye(n) - &w * slope;
        let rows = clarke_solve::lu_solve_transpose(a.view(), seed.t()).unwrap();
        let expected = rows.sum_axis(ndarray::Axis(1)) * slope;
        for (g, e) in b_bar.iter().zip(expected.iter()) {
            assert!((g - e).abs() < 1e-12, "relu'(0) = {slope}: {g} vs {e}");
        }
        let report = deq.reports().last().unwrap();
        assert_eq!(report.kinks.exact_hits(), 2 * n);
        assert_eq!(report.kinks.records()[0].hull, Some((0.0, 1.0)));
        assert_eq!(report.check.outcome, CheckOutcome::Certified, "{}", report.check);
    }
}

#[test]
fn a_singular_selected_element_is_refused() {
    // W = I (unconstrained): at z* = 0 every relu is at its kink; relu'(0) = 1 makes I - W = 0.
    let n = 3;
    let config = DeqConfig::default()
        .with_parametrization(Parametrization::Unconstrained)
        .with_forward_tolerance(1e-12, 100);
    let mut params = ParamSet::<f64>::new();
    let deq = DeqLayer::new(&mut params, "deq", 2, n, config, &mut rng(14)).unwrap();
    *params.get_mut(params.id("deq.w").unwrap()) = Array2::<f64>::eye(n).into_dyn();
    let tape = Tape::<f64>::new();
    let bound = params.bind(&tape);
    let x = tape.constant(ArrayD::zeros(vec![1, 2]));
    let z = deq.forward(&bound, x).unwrap();
    let err = z
        .sum()
        .backward_with(&BackwardOptions::policy(KinkPolicy::pytorch().with_relu(1.0)))
        .unwrap_err();
    match err {
        Error::HypothesisViolated { node, detail } => {
            assert_eq!(node, "deq");
            assert!(detail.contains("singular"), "{detail}");
        }
        other => panic!("expected a violated hypothesis, got {other}"),
    }
    // relu'(0) = 0 selects d = 0, invertible; but the theorem needs every selection, and the
    // walk over the 2^3 vertices finds the singular ones: refused all the same.
    let err = z.sum().backward().unwrap_err();
    assert!(matches!(err, Error::HypothesisViolated { .. }), "{err}");
    let report = deq.reports().last().unwrap();
    assert_eq!(report.check.outcome, CheckOutcome::Violated, "{}", report.check);
    assert_eq!(report.check.sigma_min, Some(1.0));
    assert_eq!((report.check.vertices, report.check.exhaustive), (8, true));
    assert!(report.adjoint.is_none(), "refused before any solve");
    // Told not to refuse, the selected element's gradient comes back with the verdict.
    let config = DeqConfig::default()
        .with_parametrization(Parametrization::Unconstrained)
        .with_forward_tolerance(1e-12, 100)
        .with_check_options(CheckOptions::default().with_refuse_violated(false));
    let mut params = ParamSet::<f64>::new();
    let deq = DeqLayer::new(&mut params, "deq", 2, n, config, &mut rng(14)).unwrap();
    *params.get_mut(params.id("deq.w").unwrap()) = Array2::<f64>::eye(n).into_dyn();
    let tape = Tape::<f64>::new();
    let bound = params.bind(&tape);
    let x = tape.constant(ArrayD::zeros(vec![1, 2]));
    deq.forward(&bound, x).unwrap().sum().backward().unwrap();
    assert_eq!(deq.reports().last().unwrap().check.outcome, CheckOutcome::Violated);
}

/// `z = relu(W z + b)` with dyadic `W = [[0.5, 0], [1.5, 0.5]]` and `b = (1, -3)`: the exact
/// fixed point `(2, 0)` has the second pre-activation `1.5 * 2 - 3 = 0` on the kink, and
/// every iterate from zero approaches it from below, so the forward stops off the kink.
/// `||W|| > 1`: no certificate from the parametrisation, the check walks the selections.
pub(crate) fn deq_on_kink(forward: ForwardMethod) -> (ParamSet<f64>, DeqLayer<f64>) {
    let config = DeqConfig::default()
        .with_parametrization(Parametrization::Unconstrained)
        .with_forward(forward);
    let mut params = ParamSet::<f64>::new();
    let deq = DeqLayer::new(&mut params, "deq", 1, 2, config, &mut rng(3)).unwrap();
    *params.get_mut(params.id("deq.w").unwrap()) = ndarray::arr2(&[[0.5, 0.0], [1.5, 0.5]]).into_dyn();
    *params.get_mut(params.id("deq.u").unwrap()) = ArrayD::zeros(vec![2, 1]);
    *params.get_mut(params.id("deq.bias").unwrap()) = ndarray::arr1(&[1.0, -3.0]).into_dyn();
    (params, deq)
}

#[test]
fn a_fixed_point_near_a_kink_gets_the_selected_element() {
    for forward in [ForwardMethod::Picard, ForwardMethod::Anderson { memory: 3 }] {
        let (params, deq) = deq_on_kink(forward);
        for s in [0.0, 0.5, 1.0] {
            let tape = Tape::<f64>::new();
            let bound = params.bind(&tape);
            let x = tape.constant(ArrayD::zeros(vec![1, 1]));
            let z = deq.forward(&bound, x).unwrap();
            let grads = z
                .sum()
                .backward_with(&BackwardOptions::policy(KinkPolicy::pytorch().with_relu(s)))
                .unwrap();
            let g = grads.wrt(bound.var(params.id("deq.bias").unwrap())).unwrap();
            // (I - D W)^{-1} D with D = diag(1, s): column sums (2 + 3s/(1 - s/2), s/(1 - s/2)).
            let want = [2.0 + 3.0 * s / (1.0 - 0.5 * s), s / (1.0 - 0.5 * s)];
            for (got, want) in g.iter().zip(want) {
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{forward:?} s = {s}: {g} vs {want:?}"
                );
            }
            // The outer ledger lists the layer's kink; the check walked both selections.
            let records: Vec<_> = grads.ledger().in_layer("deq").collect();
            assert_eq!(records.len(), 1, "{}", grads.ledger());
            assert_eq!(
                (records[0].op, records[0].at_kink(), records[0].kink_indices.clone()),
                ("relu", 1, vec![1])
            );
            assert_eq!(records[0].selection, clarke_core::Selection::Slope(s));
            let report = deq.reports().last().unwrap();
            assert_eq!(report.check.outcome, CheckOutcome::Certified, "{}", report.check);
            assert_eq!(
                (report.check.flippable, report.check.vertices),
                (1, 2),
                "{}",
                report.check
            );
        }
    }
    // Picard never lands on the kink: the unit is within solver error, reported as such.
    let (params, deq) = deq_on_kink(ForwardMethod::Picard);
    let tape = Tape::<f64>::new();
    let bound = params.bind(&tape);
    let z = deq.forward(&bound, tape.constant(ArrayD::zeros(vec![1, 1]))).unwrap();
    let grads = z.sum().backward().unwrap();
    assert_eq!(grads.ledger().solver_error_hits(), 1, "{}", grads.ledger());
    let line = grads.ledger().summary();
    assert!(
        line.contains("deq#") && line.contains("within solver error") && line.contains("at [0, 1]"),
        "{line}"
    );
    // With the exact-only band the selection is ignored off the kink (the old behaviour).
    let config = deq.config().clone().with_kink_band(clarke_implicit::KinkBand::Exact);
    let mut p2 = ParamSet::<f64>::new();
    let exact = DeqLayer::new(&mut p2, "deq", 1, 2, config, &mut rng(3)).unwrap();
    for (name, value) in [
        ("deq.w", params.get(params.id("deq.w").unwrap()).clone()),
        ("deq.u", ArrayD::zeros(vec![2, 1])),
        ("deq.bias", ndarray::arr1(&[1.0, -3.0]).into_dyn()),
    ] {
        *p2.get_mut(p2.id(name).unwrap()) = value;
    }
    let tape = Tape::<f64>::new();
    let bound = p2.bind(&tape);
    let z = exact.forward(&bound, tape.constant(ArrayD::zeros(vec![1, 1]))).unwrap();
    let grads = z
        .sum()
        .backward_with(&BackwardOptions::policy(KinkPolicy::one()))
        .unwrap();
    assert!(grads.ledger().is_clean());
    assert_eq!(grads.wrt(bound.var(p2.id("deq.bias").unwrap())).unwrap()[1], 0.0);
}

#[test]
fn the_unrolled_and_one_step_modes_leave_a_report() {
    let (params, _) = deq_on_kink(ForwardMethod::Picard);
    for (mode, iterations) in [
        (GradientMode::Unrolled { iterations: 40 }, Some(40)),
        (GradientMode::OneStep, None),
    ] {
        let config = DeqConfig::default()
            .with_parametrization(Parametrization::Unconstrained)
            .with_gradient(mode);
        let mut p2 = ParamSet::<f64>::new();
        let deq = DeqLayer::new(&mut p2, "deq", 1, 2, config, &mut rng(3)).unwrap();
        *p2.get_mut(p2.id("deq.w").unwrap()) = params.get(params.id("deq.w").unwrap()).clone();
        let tape = Tape::<f64>::new();
        let bound = p2.bind(&tape);
        let z = deq.forward(&bound, tape.constant(ArrayD::zeros(vec![1, 1]))).unwrap();
        z.sum().backward().unwrap();
        assert_eq!(deq.reports().len(), 1, "{mode:?}");
        let report = deq.reports().last().unwrap();
        assert_eq!(report.check.outcome, CheckOutcome::NotChecked);
        assert!(report.adjoint.is_none());
        if let Some(k) = iterations {
            assert_eq!(report.forward.iterations, k);
        }
    }
}

#[test]
fn bad_input_gets_clear_errors() {
    let m = model(DeqConfig::default(), 4, 6, 15);
    let tape = Tape::<f64>::new();
    let bound = m.params.bind(&tape);
    let wrong = tape.constant(ArrayD::zeros(vec![2, 5]));
    let e = m.deq.forward(&bound, wrong).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let mut bad = Array2::<f64>::zeros((2, 4));
    bad[[1, 2]] = f64::NAN;
    let e = m
        .deq
        .forward(&bound, tape.constant(bad.into_dyn()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("x has a non-finite entry") && e.contains("row 1, column 2"),
        "{e}"
    );

    for (config, needle) in [
        (
            DeqConfig::default().with_parametrization(Parametrization::SpectralNorm { gamma: 1.2 }),
            "gamma",
        ),
        (
            DeqConfig::default().with_parametrization(Parametrization::Monotone { m: 0.0 }),
            "margin",
        ),
        (
            DeqConfig::default().with_activation(Activation::LeakyRelu(1.5)),
            "leaky",
        ),
        (
            DeqConfig::default()
                .with_activation(Activation::Tanh)
                .with_forward(ForwardMethod::ForwardBackward { alpha: None }),
            "relu cell only",
        ),
        (
            DeqConfig::default()
                .with_activation(Activation::Tanh)
                .with_forward(ForwardMethod::PeacemanRachford { alpha: None }),
            "relu cell only",
        ),
        (
            DeqConfig::default().with_forward(ForwardMethod::PeacemanRachford { alpha: Some(-1.0) }),
            "Peaceman-Rachford step",
        ),
        (
            DeqConfig::default().with_gradient(GradientMode::LeastSquaresNoHypothesis),
            "least-squares",
        ),
        (
            DeqConfig::default().with_forward(ForwardMethod::Anderson { memory: 0 }),
            "memory of at least 1",
        ),
        (
            DeqConfig::default().with_forward(ForwardMethod::Anderson {
                memory: MAX_ANDERSON_MEMORY + 1,
            }),
            "forward Anderson memory is 101",
        ),
        (
            DeqConfig::default().with_gradient(GradientMode::Implicit(AdjointSolver::Anderson { memory: usize::MAX })),
            "adjoint Anderson memory",
        ),
    ] {
        let e = DeqLayer::<f64>::new(&mut ParamSet::new(), "deq", 2, 3, config, &mut rng(0)).unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
    }

    // A map that is not a contraction and a tiny budget: the forward says it did not converge.
    let config = DeqConfig::default()
        .with_parametrization(Parametrization::Unconstrained)
        .with_activation(Activation::Tanh)
        .with_forward_tolerance(1e-12, 5);
    let mut params = ParamSet::<f64>::new();
    let deq = DeqLayer::new(&mut params, "deq", 2, 3, config, &mut rng(16)).unwrap();
    *params.get_mut(params.id("deq.w").unwrap()) = (Array2::<f64>::eye(3) * 3.0).into_dyn();
    let tape = Tape::<f64>::new();
    let bound = params.bind(&tape);
    let x = tape.constant(Array2::from_elem((1, 2), 1.0).into_dyn());
    match deq.forward(&bound, x).unwrap_err() {
        Error::SolveFailed {
            stage,
            iterations,
            trace,
            ..
        } => {
            assert_eq!((stage, iterations, trace.len()), ("forward", 5, 5));
        }
        other => panic!("expected SolveFailed, got {other}"),
    }
}

#[test]
fn f32_layer_trains_a_step() {
    let mut r = rng(17);
    let mut params = ParamSet::<f32>::new();
    let deq = DeqLayer::new(
        &mut params,
        "deq",
        4,
        8,
        DeqConfig::default().with_forward_tolerance(1e-5, 500),
        &mut r,
    )
    .unwrap();
    let head = Linear::new(&mut params, "head", 8, 3, &mut r).unwrap();
    let x: Array2<f32> = clarke_nn::init::normal(5, 4, 1.0, &mut r);
    let tape = Tape::<f32>::new();
    let bound = params.bind(&tape);
    let z = deq.forward(&bound, tape.constant(x.into_dyn())).unwrap();
    let loss = head.forward(&bound, z).unwrap().softmax_cross_entropy(&LABELS);
    let grads = bound.gradients(&loss.backward().unwrap(), &params).unwrap();
    assert!(grads.iter().all(|g| g.iter().all(|v| v.is_finite())));
    assert!(grads[0].iter().any(|v| *v != 0.0));
}

/// `z*` and the input gradient of `sum(z*)` for a layer built from given weights.
fn solve_with(config: DeqConfig, weights: &DeqWeights<f64>, x: &Array2<f64>) -> (Array2<f64>, ArrayD<f64>) {
    let config = config
        .with_power_iterations(5000, 1e-15)
        .with_forward_tolerance(1e-12, 5000);
    let config = config.with_adjoint_tolerance(1e-12, 5000);
    let mut params = ParamSet::new();
    let deq = DeqLayer::with_weights(&mut params, "deq", config, weights).unwrap();
    let tape = Tape::new();
    let bound = params.bind(&tape);
    let xv = tape.param(x.clone().into_dyn());
    let z = deq.forward(&bound, xv).unwrap();
    let grads = z.sum().backward().unwrap();
    let zv = z.value().into_dimensionality().unwrap();
    (zv, grads.wrt(xv).unwrap().clone())
}

#[test]
fn given_weights_give_the_same_cell_in_every_parametrisation() {
    // W with spectral norm exactly 0.9 and sym(I - W) >= 0.25 I: every form can hold it.
    let w = ndarray::array![[0.45, 0.3, 0.0], [-0.3, 0.45, 0.0], [0.0, 0.0, -0.3]];
    let sigma = clarke_solve::spectral_norm_dense(w.view()).unwrap();
    let w = w * (0.9 / sigma);
    let weights = DeqWeights {
        w,
        u: inputs(3, 2, 1),
        bias: ndarray::array![0.2, -0.1, 0.3],
    };
    let x = inputs(4, 2, 2);
    let base = DeqConfig::default();
    let (z_free, g_free) = solve_with(
        base.clone().with_parametrization(Parametrization::Unconstrained),
        &weights,
        &x,
    );
    for form in [
        Parametrization::SpectralNorm { gamma: 0.9 },
        Parametrization::Monotone { m: 0.2 },
    ] {
        let (z, g) = solve_with(base.clone().with_parametrization(form), &weights, &x);
        let dz = (&z - &z_free).mapv(f64::abs).fold(0.0f64, |a, &v| a.max(v));
        let dg = (&g - &g_free).mapv(f64::abs).fold(0.0f64, |a, &v| a.max(v));
        assert!(dz < 1e-9 && dg < 1e-8, "{form:?}: z differs by {dz}, dx by {dg}");
    }
    // A W outside a form is refused with the measured quantity, and nothing is added.
    let mut params = ParamSet::new();
    let spectral = base
        .clone()
        .with_parametrization(Parametrization::SpectralNorm { gamma: 0.5 });
    let err = DeqLayer::with_weights(&mut params, "deq", spectral, &weights).unwrap_err();
    assert!(err.to_string().contains("sigma_max 9.0"), "{err}");
    assert!(params.is_empty());
    let mut bad = weights.clone();
    bad.bias = ndarray::array![0.0, 1.0];
    let err = DeqLayer::with_weights(&mut params, "deq", base.clone(), &bad).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    bad.bias = ndarray::array![0.0, f64::NAN, 0.0];
    let err = DeqLayer::with_weights(&mut params, "deq", base, &bad).unwrap_err();
    assert!(
        err.to_string()
            .contains("bias has a non-finite entry NaN at flat index 1"),
        "{err}"
    );
}

#[test]
fn set_weights_replaces_every_parameter_or_nothing() {
    let config = DeqConfig::default().with_parametrization(Parametrization::Monotone { m: 0.5 });
    let m = model(config, 2, 3, 5);
    let mut params = m.params.clone();
    let weights = DeqWeights {
        w: ndarray::array![[0.2, 0.1, 0.0], [-0.1, 0.2, 0.0], [0.0, 0.0, 0.1]],
        u: inputs(3, 2, 6),
        bias: ndarray::Array1::zeros(3),
    };
    m.deq.set_weights(&mut params, &weights).unwrap();
    let tape = Tape::new();
    let bound = params.bind(&tape);
    let w = m.deq.weight(&bound).unwrap().value();
    let diff = (&w - &weights.w.clone().into_dyn())
        .mapv(f64::abs)
        .fold(0.0f64, |a, &v| a.max(v));
    assert!(diff < 1e-12, "W differs by {diff}");
    // Not monotone enough: refused, and the set is left as it was.
    let mut steep = weights.clone();
    steep.w[[0, 0]] = 0.9;
    let before = params.values().to_vec();
    assert!(m.deq.set_weights(&mut params, &steep).is_err());
    assert_eq!(params.values(), &before[..]);
    // Another layer's set or other dimensions: refused.
    let mut other = ParamSet::<f64>::new();
    assert!(m.deq.set_weights(&mut other, &weights).is_err());
    let mut wide = weights.clone();
    wide.u = inputs(3, 5, 7);
    let err = m.deq.set_weights(&mut params, &wide).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

#[test]
fn a_warm_start_saves_iterations_and_leaves_the_gradient() {
    let m = model(DeqConfig::default().with_forward_tolerance(1e-10, 1000), 4, 8, 9);
    let x = inputs(5, 4, 10);
    let run = |start: Option<&Array2<f64>>| {
        let tape = Tape::new();
        let bound = m.params.bind(&tape);
        let xv = tape.param(x.clone().into_dyn());
        let z = match start {
            Some(s) => m.deq.forward_from(&bound, xv, s.view()).unwrap(),
            None => m.deq.forward(&bound, xv).unwrap(),
        };
        let grads = z.sum().backward().unwrap();
        let iterations = m.deq.last_forward().unwrap().iterations;
        let zv: Array2<f64> = z.value().into_dimensionality().unwrap();
        (zv, grads.wrt(xv).unwrap().clone(), iterations)
    };
    let (z0, g0, cold) = run(None);
    let (z1, g1, warm) = run(Some(&z0));
    assert!(warm < cold / 4, "warm start took {warm} iterations, cold {cold}");
    let dz = (&z1 - &z0).mapv(f64::abs).fold(0.0f64, |a, &v| a.max(v));
    let dg = (&g1 - &g0).mapv(f64::abs).fold(0.0f64, |a, &v| a.max(v));
    assert!(dz < 1e-9 && dg < 1e-7, "z differs by {dz}, dx by {dg}");
    // A start of the wrong shape or with NaN is refused.
    let tape = Tape::new();
    let bound = m.params.bind(&tape);
    let xv = tape.param(x.clone().into_dyn());
    let err = m
        .deq
        .forward_from(&bound, xv, Array2::zeros((4, 8)).view())
        .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    let mut nan = z0.clone();
    nan[[2, 3]] = f64::NAN;
    let err = m.deq.forward_from(&bound, xv, nan.view()).unwrap_err();
    assert!(err.to_string().contains("row 2, column 3"), "{err}");
}

#[test]
fn a_parameter_replaced_by_another_shape_is_an_error_not_a_panic() {
    for form in [
        Parametrization::SpectralNorm { gamma: 0.9 },
        Parametrization::Monotone { m: 0.5 },
        Parametrization::Unconstrained,
    ] {
        let m = model(DeqConfig::default().with_parametrization(form), 2, 3, 11);
        for name in ["deq.u", "deq.bias", "deq.w", "deq.v", "deq.a"] {
            let Some(id) = m.params.id(name) else { continue };
            let mut params = m.params.clone();
            *params.get_mut(id) = ArrayD::zeros(vec![2, 2]);
            let tape = Tape::new();
            let bound = params.bind(&tape);
            let x = tape.constant(inputs(1, 2, 12).into_dyn());
            let err = m.deq.forward(&bound, x).unwrap_err();
            assert!(
                matches!(&err, Error::ShapeMismatch { detail, .. } if detail.contains(name)),
                "{form:?} {name}: {err}"
            );
        }
    }
}

/// A relu cell of width `n` (input dimension `n`, `U = I`, no bias) whose fixed point for
/// each of `batch` samples is planted: units `i % 4 == 3` inactive (`p* = -1/2`), units 0,
/// `4b + 20` and `4b + 60` of sample `b` on the kink (`p* = 0`), the others active. `W` is
/// seeded with norm 0.7 and its inactive rows scaled by 4, so `||W|| > 1` while
/// `||diag(d) W|| < 1` for every selection. With `singular`, row 0 of `W` is `e_0`, so
/// `I - diag(d) W` is singular when the kink at unit 0 selects 1. Returns the weights, the
/// inputs and `z*`.
fn planted_cell(n: usize, batch: usize, singular: bool) -> (DeqWeights<f64>, Array2<f64>, Array2<f64>) {
    use rand::Rng;
    let mut r = rng(41);
    let base = Array2::from_shape_fn((n, n), |_| r.random_range(-1.0..1.0));
    let mut w = &base * (0.7 / clarke_solve::spectral_norm_dense(base.view()).unwrap());
    for (i, mut row) in w.outer_iter_mut().enumerate() {
        if i % 4 == 3 {
            row *= 4.0;
        }
    }
    if singular {
        w.row_mut(0).fill(0.0);
        w[[0, 0]] = 1.0;
    }
    let mut z = Array2::zeros((batch, n));
    let mut p = Array2::zeros((batch, n));
    for b in 0..batch {
        for i in 0..n {
            let kink = i == 0 || i == 4 * b + 4 * (n / 20) || i == 4 * b + 4 * (3 * n / 20);
            (z[[b, i]], p[[b, i]]) = match (kink, i % 4 == 3) {
                (true, _) => (0.0, 0.0),
                (false, true) => (0.0, -0.5),
                (false, false) => {
                    let v = r.random_range(0.1..1.0);
                    (v, v)
                }
            };
        }
    }
    let x = &p - &z.dot(&w.t());
    let weights = DeqWeights {
        w,
        u: Array2::eye(n),
        bias: ndarray::Array1::zeros(n),
    };
    (weights, x, z)
}

/// The check of one backward of `sum(z*)` started at `z_start`, with `dense_limit`.
fn check_at(
    config: DeqConfig,
    weights: &DeqWeights<f64>,
    x: &Array2<f64>,
    z_start: &Array2<f64>,
    options: CheckOptions,
) -> clarke_implicit::HypothesisCheck {
    let config = config.with_check_options(options.with_refuse_violated(false));
    let mut params = ParamSet::new();
    let deq = DeqLayer::with_weights(&mut params, "deq", config, weights).unwrap();
    let tape = Tape::new();
    let bound = params.bind(&tape);
    let z = deq
        .forward_from(&bound, tape.constant(x.clone().into_dyn()), z_start.view())
        .unwrap();
    z.sum().backward().unwrap();
    deq.reports().last().unwrap().check
}

/// Asserts one verdict, a dense and a matrix-free check, and `sigma_min` (selected, and over
/// the vertices when `vertices`) within 1e-6 relative; returns the largest relative
/// difference.
fn same_check(
    dense: &clarke_implicit::HypothesisCheck,
    free: &clarke_implicit::HypothesisCheck,
    vertices: bool,
) -> f64 {
    assert_eq!(dense.outcome, free.outcome, "dense: {dense}\nmatrix-free: {free}");
    assert!(
        !dense.matrix_free && free.matrix_free,
        "dense: {dense}\nmatrix-free: {free}"
    );
    let rel = |a: f64, b: f64| (a - b).abs() / a.abs().max(b.abs());
    let mut worst = rel(dense.sigma_min.unwrap(), free.sigma_min.unwrap());
    if let (true, Some(a), Some(b)) = (vertices, dense.min_vertex_sigma, free.min_vertex_sigma) {
        worst = worst.max(rel(a, b));
    }
    assert!(
        worst <= 1e-6,
        "relative difference {worst:e}\ndense: {dense}\nmatrix-free: {free}"
    );
    worst
}

#[test]
fn above_the_dense_limit_the_walk_is_matrix_free_with_the_same_verdicts() {
    let (n, batch) = (48, 2);
    let config = DeqConfig::default()
        .with_parametrization(Parametrization::Unconstrained)
        .with_forward_tolerance(1e-12, 100);
    let run = |singular: bool, limit: usize| {
        let (weights, x, z) = planted_cell(n, batch, singular);
        assert!(clarke_solve::spectral_norm_dense(weights.w.view()).unwrap() > 1.0);
        check_at(
            config.clone(),
            &weights,
            &x,
            &z,
            CheckOptions::default().with_dense_limit(limit),
        )
    };
    // Every selection a contraction: certified both ways, three kinks walked per sample.
    let (dense, free) = (run(false, n + 1), run(false, n / 2));
    assert_eq!(dense.outcome, CheckOutcome::Certified, "{dense}");
    assert_eq!((free.kink_elements, free.vertices), (3 * batch, 8 * batch), "{free}");
    let certified = same_check(&dense, &free, true);
    // A singular vertex in every sample: violated both ways (the singular vertices' sigma_min
    // are rounding errors; the selected element's agree).
    let (dense, free) = (run(true, n + 1), run(true, n / 2));
    assert_eq!(dense.outcome, CheckOutcome::Violated, "{dense}");
    let violated = same_check(&dense, &free, false);
    println!("dense against matrix-free sigma_min: certified {certified:.1e}, violated {violated:.1e} (relative)");
}

#[test]
fn above_the_dense_limit_the_spectral_certificate_rests_on_an_estimate_with_a_margin() {
    use rand::Rng;
    let n = 40;
    let mut r = rng(43);
    let base = Array2::from_shape_fn((n, n), |_| r.random_range(-1.0..1.0));
    let weights = DeqWeights {
        w: &base * (0.9 / clarke_solve::spectral_norm_dense(base.view()).unwrap()),
        u: Array2::from_shape_fn((n, 3), |_| r.random_range(-1.0..1.0)),
        bias: ndarray::Array1::zeros(n),
    };
    let x = inputs(5, 3, 44);
    let config = DeqConfig::default()
        .with_parametrization(Parametrization::SpectralNorm { gamma: 0.9 })
        .with_power_iterations(5000, 1e-15)
        .with_forward_tolerance(1e-12, 5000);
    let z0 = Array2::zeros((5, n));
    let run = |options: CheckOptions| check_at(config.clone(), &weights, &x, &z0, options);
    let dense = run(CheckOptions::default());
    let tight = run(CheckOptions {
        norm_tol: 1e-10,
        spectral_iterations: 5000,
        ..CheckOptions::default().with_dense_limit(n / 2)
    });
    let loose = run(CheckOptions::default().with_dense_limit(n / 2));
    for c in [&dense, &tight, &loose] {
        assert_eq!(c.outcome, CheckOutcome::Certified, "{c}");
    }
    assert!(!dense.matrix_free && tight.matrix_free && tight.products > 0, "{tight}");
    // ||W|| = 0.9 by construction (W scaled by its SVD norm): the tight matrix-free estimate
    // is within 1e-6 of it, the dense bound is proven (never below, at most 1% above: a cold
    // start of its power iteration on a crowded spectrum).
    let rel = |a: f64, b: f64| (a - b).abs() / a.abs().max(b.abs());
    let norm = rel(0.9, tight.max_vertex_norm.unwrap());
    let bound = rel(0.9, tight.contraction_bound.unwrap());
    assert!(norm <= 1e-6 && bound <= 1e-6, "norm {norm:e}, bound {bound:e}\n{tight}");
    let dense_bound = dense.contraction_bound.unwrap();
    assert!((0.9..=0.9 * 1.01).contains(&dense_bound), "{dense}");
    // The default options estimate ||W|| to 1e-9 whatever their norm_tol (1e-3 fell 5.6%
    // short at this width) and certify with a margin of 50 times that: never below the
    // exact bound, and within 1e-6 of it.
    let margin = loose.contraction_bound.unwrap() / loose.max_vertex_norm.unwrap() - 1.0;
    assert!((margin - 5e-8).abs() < 1e-12, "margin {margin:e}\n{loose}");
    let (estimated, exact) = (loose.contraction_bound.unwrap(), 0.9 * (1.0 - 1e-15));
    assert!(
        estimated >= exact && estimated <= exact * (1.0 + 1e-6),
        "{loose}\n{dense}"
    );
    println!(
        "spectral certificate: ||W|| {norm:.1e}, bound {bound:.1e} relative; loose bound {:.6}",
        loose.contraction_bound.unwrap()
    );
}
