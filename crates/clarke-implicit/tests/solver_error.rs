//! Kinks met within the forward solver's error are kinks: selected, reported in the outer
//! ledger, walked by the check. And the check's verdicts where a naive walk goes wrong.

use clarke_core::{BackwardOptions, KinkPolicy, Result, Tape, Var};
use clarke_implicit::{CheckOptions, CheckOutcome, ForwardSolver, ImplicitLayer, ImplicitOptions, KinkBand};
use ndarray::{Array1, ArrayD, arr1, arr2};

fn vec(v: &[f64]) -> ArrayD<f64> {
    arr1(v).into_dyn()
}

/// `z = relu(W z + b)` with dyadic `W`, `b`: the exact fixed point is `z* = (2, 0)` with the
/// second pre-activation `0.25 * 2 + 0.5 * 0 - 0.5 = 0` exactly on the kink, approached from
/// below by every iterate of Picard from zero (so a solver never lands on it).
fn deq_on_kink<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    let w = z.tape().constant(arr2(&[[0.5, 0.0], [0.25, 0.5]]).into_dyn());
    Ok((w.matmul(z) + th[0]).relu())
}

/// d(sum z*)/db for relu'(0) = s at the second unit: `D = diag(1, s)`,
/// `dz/db = (I - D W)^{-1} D`, column sums `(2 + 0.5 s / (1 - 0.5 s), s / (1 - 0.5 s))`.
fn exact_gradient(s: f64) -> [f64; 2] {
    [2.0 + 0.5 * s / (1.0 - 0.5 * s), s / (1.0 - 0.5 * s)]
}

fn gradient(layer: &ImplicitLayer<f64>, s: f64) -> (Array1<f64>, clarke_core::KinkLedger) {
    let tape = Tape::<f64>::new();
    let b = tape.param(vec(&[1.0, -0.5]));
    let z = layer.apply(&vec(&[0.0, 0.0]), &[b]).unwrap().z;
    let options = BackwardOptions::policy(KinkPolicy::pytorch().with_relu(s));
    let grads = z.sum().backward_with(&options).unwrap();
    let g = grads.wrt(b).unwrap().iter().copied().collect();
    (g, grads.ledger().clone())
}

#[test]
fn a_fixed_point_near_a_kink_gets_the_selected_element_with_picard_and_anderson() {
    for solver in [ForwardSolver::Picard, ForwardSolver::Anderson] {
        let options = ImplicitOptions::default().with_forward_solver(solver).with_name("deq");
        let layer = ImplicitLayer::fixed_point(deq_on_kink, options).unwrap();
        for s in [0.0, 0.5, 1.0] {
            let (g, ledger) = gradient(&layer, s);
            let want = exact_gradient(s);
            for (got, want) in g.iter().zip(want) {
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{solver:?}, relu'(0) = {s}: {g} vs {want:?}"
                );
            }
            // The outer ledger holds the layer's kink, attributed to it.
            let records: Vec<_> = ledger.in_layer("deq").collect();
            assert_eq!(records.len(), 1, "{ledger}");
            assert_eq!((records[0].op, records[0].at_kink()), ("relu", 1), "{ledger}");
            assert_eq!(records[0].kink_indices, vec![1]);
            let report = layer.reports().last().unwrap();
            assert_eq!(report.check.outcome, CheckOutcome::Certified, "{report}");
            assert_eq!((report.check.flippable, report.check.vertices), (1, 2), "{report}");
            assert!(report.check.exhaustive);
        }
    }
    // Picard never lands on the kink: the element is within solver error, not exact.
    let layer = ImplicitLayer::fixed_point(
        deq_on_kink,
        ImplicitOptions::default().with_forward_solver(ForwardSolver::Picard),
    )
    .unwrap();
    let (_, ledger) = gradient(&layer, 1.0);
    assert_eq!((ledger.exact_hits(), ledger.solver_error_hits()), (0, 1), "{ledger}");
    let record = ledger.in_layer("fixed_point").next().unwrap();
    assert!(
        record.max_distance > 0.0 && record.max_distance <= record.solver_band,
        "{record}"
    );
    assert!(ledger.summary().contains("within solver error"), "{ledger}");
}

#[test]
fn the_exact_only_band_ignores_the_selection_at_a_point_off_the_kink() {
    let options = ImplicitOptions::default()
        .with_forward_solver(ForwardSolver::Picard)
        .with_kink_band(KinkBand::Exact);
    let layer = ImplicitLayer::fixed_point(deq_on_kink, options).unwrap();
    // The iterate's pre-activation is slightly negative: relu' = 0 whatever the policy says.
    let (g, ledger) = gradient(&layer, 1.0);
    assert!((g[0] - 2.0).abs() < 1e-9 && g[1].abs() < 1e-12, "{g}");
    assert!(ledger.is_clean());
}

/// `y_i = relu(2 y_i + theta_i)` for 64 independent elements at `theta = 0`: every element
/// sits on a kink where `1 - 2 d_i` changes sign.
fn steep<'s>(y: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    Ok((y * 2.0 + th[0]).relu())
}

#[test]
fn an_exhaustive_limit_beyond_the_cap_samples_and_never_certifies() {
    // 24 kink elements: beyond the cap of 20 (MAX_EXHAUSTIVE) however high the limit is set.
    let n = 24;
    for limit in [12, n] {
        let options = ImplicitOptions::default().with_check(
            CheckOptions::default()
                .with_exhaustive_limit(limit)
                .with_refuse_violated(false),
        );
        let layer = ImplicitLayer::fixed_point(steep, options).unwrap();
        let tape = Tape::<f64>::new();
        let theta = tape.param(ArrayD::zeros(vec![n]));
        let y = layer.apply(&ArrayD::zeros(vec![n]), &[theta]).unwrap().z;
        y.sum().backward().unwrap();
        let check = layer.reports().last().unwrap().check;
        assert_eq!(check.flippable, n);
        assert!(!check.exhaustive, "limit {limit}: {check}");
        assert_eq!(check.outcome, CheckOutcome::Violated, "limit {limit}: {check}");
        assert!(check.determinant_sign_change);
    }
}

#[test]
fn a_root_with_a_vanishing_derivative_is_never_certified() {
    // F(z, theta) = z^3 - theta at theta = 0: the root 0 has J_F = 0, and Newton stops at a
    // small z where J_F = 3 z^2 is tiny but a 1 x 1 block is always "well conditioned" relative
    // to itself.
    let layer = ImplicitLayer::root(|z, th| Ok(z * z * z - th[0]), ImplicitOptions::default()).unwrap();
    let tape = Tape::<f64>::new();
    let theta = tape.param(vec(&[0.0]));
    let z = layer.apply(&vec(&[1.0]), &[theta]).unwrap().z;
    let result = z.sum().backward();
    let check = layer.reports().last().unwrap().check;
    assert_ne!(check.outcome, CheckOutcome::Certified, "{check}");
    assert!(result.is_err() || check.outcome == CheckOutcome::Warning, "{check}");
    // An absolute floor makes it a violation, refused.
    let options = ImplicitOptions::default().with_check(CheckOptions::default().with_singular_floor(1e-3));
    let layer = ImplicitLayer::root(|z, th| Ok(z * z * z - th[0]), options).unwrap();
    let z = layer.apply(&vec(&[1.0]), &[theta]).unwrap().z;
    assert!(z.sum().backward().is_err());
    assert_eq!(layer.reports().last().unwrap().check.outcome, CheckOutcome::Violated);
    // A well-posed root is still certified: z^3 - theta at theta = 8 (J_F = 12).
    let layer = ImplicitLayer::root(|z, th| Ok(z * z * z - th[0]), ImplicitOptions::default()).unwrap();
    let theta = tape.param(vec(&[8.0]));
    let z = layer.apply(&vec(&[1.0]), &[theta]).unwrap().z;
    let g = z.sum().backward().unwrap();
    assert!((g.wrt(theta).unwrap()[0] - 1.0 / 12.0).abs() < 1e-8);
    assert_eq!(layer.reports().last().unwrap().check.outcome, CheckOutcome::Certified);
}

#[test]
fn an_empty_layer_is_certified_with_an_empty_gradient() {
    let layer = ImplicitLayer::fixed_point(|z, th| Ok(z * 0.5 + th[0]), ImplicitOptions::default()).unwrap();
    let tape = Tape::<f64>::new();
    let theta = tape.param(ArrayD::zeros(vec![0]));
    let z = layer.apply(&ArrayD::zeros(vec![0]), &[theta]).unwrap().z;
    let grads = z.sum().backward().unwrap();
    assert_eq!(grads.wrt(theta).unwrap().len(), 0);
    let check = layer.reports().last().unwrap().check;
    assert_eq!(check.outcome, CheckOutcome::Certified, "{check}");
}
