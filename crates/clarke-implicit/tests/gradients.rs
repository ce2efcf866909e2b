//! Implicit gradients against closed forms, against each other, against unrolling and
//! against finite differences.

use clarke_core::{GradcheckOptions, KinkPolicy, Result, Tape, Var, gradcheck};
use clarke_implicit::{AdjointSolver, ForwardSolver, GradientMode, ImplicitLayer, ImplicitOptions};
use clarke_solve::{FixedPointOptions, SolveOptions};
use ndarray::{Array1, Array2, ArrayD, arr1};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

const ADJOINTS: [AdjointSolver; 4] = [
    AdjointSolver::Dense,
    AdjointSolver::Neumann,
    AdjointSolver::Gmres,
    AdjointSolver::Bicgstab,
];

fn random(rows: usize, cols: usize, seed: u64) -> Array2<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Array2::from_shape_fn((rows, cols), |_| StandardNormal.sample(&mut rng))
}

/// Scales `a` to spectral norm `target` (power iteration on a^T a to convergence).
fn with_norm(a: Array2<f64>, target: f64) -> Array2<f64> {
    let mut v = Array1::from_elem(a.ncols(), 1.0);
    for _ in 0..500 {
        let w = a.t().dot(&a.dot(&v));
        v = &w / w.dot(&w).sqrt();
    }
    let norm = a.dot(&v).dot(&a.dot(&v)).sqrt();
    a * (target / norm)
}

fn tight(mode: GradientMode) -> ImplicitOptions {
    ImplicitOptions::default()
        .with_mode(mode)
        .with_forward(FixedPointOptions::default().with_tol(1e-14))
        .with_adjoint(SolveOptions {
            tol: 1e-14,
            ..Default::default()
        })
}

/// d z*/d theta of a layer, one seeded backward per output element.
fn layer_jacobian(
    layer: &ImplicitLayer<f64>,
    z0: &ArrayD<f64>,
    theta_value: ArrayD<f64>,
    extra: &[ArrayD<f64>],
) -> Array2<f64> {
    let tape = Tape::<f64>::new();
    let theta = tape.param(theta_value);
    let mut inputs = vec![theta];
    inputs.extend(extra.iter().map(|e| tape.constant(e.clone())));
    let z = layer.apply(z0, &inputs).unwrap().z;
    let (m, n) = (z.len(), theta.len());
    let mut j = Array2::zeros((m, n));
    for i in 0..m {
        let mut seed = ArrayD::zeros(z.value().raw_dim());
        seed[[i]] = 1.0;
        let g = z.backward_seeded(seed).unwrap();
        j.row_mut(i)
            .assign(&g.wrt(theta).unwrap().iter().copied().collect::<Array1<f64>>());
    }
    j
}

#[test]
fn linear_fixed_point_matches_the_closed_form_with_every_adjoint_solver() {
    // z = A z + B theta: dz/dtheta = (I - A)^-1 B.
    let a = with_norm(random(6, 6, 1), 0.8);
    let b = random(6, 4, 2);
    let closed = {
        let i_minus_a = Array2::eye(6) - &a;
        clarke_solve::lu_solve(i_minus_a.view(), b.view()).unwrap()
    };
    for solver in ADJOINTS {
        let (a2, b2) = (a.clone().into_dyn(), b.clone().into_dyn());
        let layer = ImplicitLayer::fixed_point(
            |z, th| Ok(th[1].matmul(z) + th[2].matmul(th[0])),
            tight(GradientMode::Implicit(solver)),
        )
        .unwrap();
        let j = layer_jacobian(
            &layer,
            &ArrayD::zeros(ndarray::IxDyn(&[6])),
            arr1(&[0.3, -1.0, 2.0, 0.5]).into_dyn(),
            &[a2, b2],
        );
        let err = (&j - &closed).iter().fold(0.0f64, |m, e| m.max(e.abs()));
        assert!(err <= 1e-10, "{solver:?}: max error {err:e}");
        let report = layer.reports().last().unwrap();
        assert!(report.adjoint.as_ref().unwrap().is_converged(), "{report}");
    }
}

#[test]
fn scalar_root_z_squared_equals_theta() {
    for solver in [AdjointSolver::Dense, AdjointSolver::Gmres, AdjointSolver::Bicgstab] {
        for forward in [ForwardSolver::NewtonKrylov, ForwardSolver::Broyden] {
            let layer = ImplicitLayer::root(
                |z, th| Ok(z * z - th[0]),
                ImplicitOptions::default()
                    .with_mode(GradientMode::Implicit(solver))
                    .with_forward_solver(forward),
            )
            .unwrap();
            let theta = [4.0, 9.0, 2.0];
            let j = layer_jacobian(&layer, &arr1(&[1.0, 1.0, 1.0]).into_dyn(), arr1(&theta).into_dyn(), &[]);
            for (i, t) in theta.iter().enumerate() {
                let z = t.sqrt();
                for k in 0..3 {
                    let want = if i == k { 1.0 / (2.0 * z) } else { 0.0 };
                    assert!((j[[i, k]] - want).abs() < 1e-9, "{solver:?}/{forward:?}: {j}");
                }
            }
        }
    }
}

/// A nonlinear DEQ z = tanh(W z + U x + b), well conditioned (||W|| = 0.5).
fn deq_inputs() -> (ArrayD<f64>, ArrayD<f64>, ArrayD<f64>, ArrayD<f64>) {
    deq_inputs_of_width(12)
}

fn deq_inputs_of_width(n: usize) -> (ArrayD<f64>, ArrayD<f64>, ArrayD<f64>, ArrayD<f64>) {
    let w = with_norm(random(n, n, 3), 0.5).into_dyn();
    let u = (random(n, 5, 4) * 0.5).into_dyn();
    let b = (random(n, 1, 5).into_shape_with_order(n).unwrap() * 0.1).into_dyn();
    let x = random(5, 1, 6).into_shape_with_order(5).unwrap().into_dyn();
    (w, u, b, x)
}

fn deq_map<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    Ok((th[0].matmul(z) + th[1].matmul(th[3]) + th[2]).tanh())
}

fn deq_gradients(mode: GradientMode) -> Vec<ArrayD<f64>> {
    let (w, u, b, x) = deq_inputs();
    let layer = ImplicitLayer::fixed_point(deq_map, tight(mode)).unwrap();
    let tape = Tape::<f64>::new();
    let theta: Vec<Var<'_, f64>> = [w, u, b, x].into_iter().map(|v| tape.param(v)).collect();
    let z = layer.apply(&ArrayD::zeros(ndarray::IxDyn(&[12])), &theta).unwrap().z;
    let target = tape.constant(Array1::linspace(-1.0, 1.0, 12).into_dyn());
    let loss = (z * target).sum();
    let g = loss.backward().unwrap();
    theta.iter().map(|t| g.wrt(*t).unwrap().clone()).collect()
}

fn max_diff(a: &[ArrayD<f64>], b: &[ArrayD<f64>]) -> f64 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f64::max)
}

#[test]
fn adjoint_solvers_agree_on_a_well_conditioned_deq() {
    let reference = deq_gradients(GradientMode::Implicit(AdjointSolver::Dense));
    for solver in [
        AdjointSolver::Neumann,
        AdjointSolver::Anderson { memory: 5 },
        AdjointSolver::Gmres,
        AdjointSolver::Bicgstab,
    ] {
        let g = deq_gradients(GradientMode::Implicit(solver));
        let d = max_diff(&g, &reference);
        assert!(d <= 1e-8, "{solver:?} differs from dense by {d:e}");
    }
}

#[test]
fn unrolled_gradients_converge_to_the_implicit_one() {
    let implicit = deq_gradients(GradientMode::Implicit(AdjointSolver::Dense));
    let errors: Vec<f64> = [2, 5, 10, 20, 40]
        .iter()
        .map(|&k| max_diff(&deq_gradients(GradientMode::Unrolled { iterations: k }), &implicit))
        .collect();
    for w in errors.windows(2) {
        assert!(w[1] < w[0], "not decreasing: {errors:?}");
    }
    // Contraction factor at most 0.5: 40 iterations leave about 0.5^40 of the error.
    assert!(errors[4] < 1e-9, "{errors:?}");
    assert!(errors[0] > 1e-3, "2 iterations should be visibly off: {errors:?}");
}

#[test]
fn gradcheck_of_a_network_with_a_deq_layer() {
    // x -> DEQ(tanh) -> linear readout -> softplus -> mean; every input differentiated
    // (8 units: 153 entries, each differenced through two tight forward solves).
    let n = 8;
    let (w, u, b, x) = deq_inputs_of_width(n);
    let readout = random(3, n, 7).into_dyn();
    let layer = std::rc::Rc::new(
        ImplicitLayer::fixed_point(deq_map, tight(GradientMode::Implicit(AdjointSolver::Gmres))).unwrap(),
    );
    let report = gradcheck(
        move |_, v| {
            let z = layer
                .apply(&ArrayD::zeros(ndarray::IxDyn(&[n])), &[v[0], v[1], v[2], v[3]])?
                .z;
            Ok(v[4].matmul(z).softplus().mean())
        },
        &[w, u, b, x, readout],
        &GradcheckOptions {
            rtol: 1e-6,
            atol: 1e-9,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(report.compared, n * n + 5 * n + n + 5 + 3 * n, "{report:?}");
}

#[test]
fn adjoint_warm_start_carries_across_calls() {
    let (w, u, b, x) = deq_inputs();
    let layer = ImplicitLayer::fixed_point(deq_map, tight(GradientMode::Implicit(AdjointSolver::Gmres))).unwrap();
    let mut iterations = Vec::new();
    for step in 0..3 {
        let tape = Tape::<f64>::new();
        let theta: Vec<Var<'_, f64>> = [w.clone(), u.clone(), b.clone(), &x + 1e-6 * step as f64]
            .into_iter()
            .map(|v| tape.param(v))
            .collect();
        let z = layer.apply(&ArrayD::zeros(ndarray::IxDyn(&[12])), &theta).unwrap().z;
        z.sum().backward().unwrap();
        iterations.push(layer.reports().last().unwrap().adjoint.unwrap().iterations);
    }
    assert!(
        iterations[1] < iterations[0] && iterations[2] < iterations[0],
        "{iterations:?}"
    );
    assert_eq!(layer.reports().len(), 3);
}

#[test]
fn the_implicit_node_memory_does_not_grow_with_iterations_but_unrolled_does() {
    let (w, u, b, x) = deq_inputs();
    let bytes = |mode: GradientMode, iterations: usize| {
        let options = ImplicitOptions::default()
            .with_mode(mode)
            .with_fixed_forward_iterations(iterations);
        let layer = ImplicitLayer::fixed_point(deq_map, options).unwrap();
        let tape = Tape::<f64>::new();
        let theta: Vec<Var<'_, f64>> = [&w, &u, &b, &x].into_iter().map(|v| tape.param(v.clone())).collect();
        let before = tape.value_bytes();
        layer.apply(&ArrayD::zeros(ndarray::IxDyn(&[12])), &theta).unwrap();
        tape.value_bytes() - before
    };
    let implicit: Vec<usize> = [10, 30, 100]
        .iter()
        .map(|&k| bytes(GradientMode::Implicit(AdjointSolver::Gmres), k))
        .collect();
    assert!(implicit.iter().all(|&b| b == implicit[0]), "{implicit:?}");
    assert_eq!(implicit[0], 12 * 8, "one node holding z*");
    let unrolled: Vec<usize> = [10, 30, 100]
        .iter()
        .map(|&k| bytes(GradientMode::Unrolled { iterations: k }, k))
        .collect();
    assert!(
        unrolled[1] > 2 * unrolled[0] && unrolled[2] > 3 * unrolled[1],
        "{unrolled:?}"
    );
}

#[test]
fn f32_layers_work_at_f32_tolerances() {
    let layer = ImplicitLayer::fixed_point(
        |z, th| Ok((z * 0.5 + th[0]).tanh()),
        ImplicitOptions::for_precision::<f32>(),
    )
    .unwrap();
    let tape = Tape::<f32>::with_policy(KinkPolicy::pytorch()).unwrap();
    let theta = tape.param(arr1(&[0.3f32, -0.7]).into_dyn());
    let z = layer.apply(&ArrayD::zeros(ndarray::IxDyn(&[2])), &[theta]).unwrap().z;
    let g = z.sum().backward().unwrap();
    // dz/dtheta = s / (1 - 0.5 s) elementwise, s = 1 - z^2.
    for (zi, gi) in z.value().iter().zip(g.wrt(theta).unwrap()) {
        let s = 1.0 - zi * zi;
        assert!((gi - s / (1.0 - 0.5 * s)).abs() < 1e-4, "{gi}");
    }
}
