//! The invertibility check: certified, warning and violated, with the numbers.

use clarke_core::{Error, KinkPolicy, Result, Tape, Var};
use clarke_implicit::{AdjointSolver, CheckOptions, CheckOutcome, GradientMode, ImplicitLayer, ImplicitOptions};
use ndarray::{Array1, Array2, ArrayD, arr1};

fn vec(v: &[f64]) -> ArrayD<f64> {
    arr1(v).into_dyn()
}

/// y = relu(2 y + theta): at theta = 0, y = 0 sits on the kink and 1 - 2d vanishes at d = 1/2.
fn steep<'s>(y: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    Ok((y * 2.0 + th[0]).relu())
}

#[test]
fn a_sign_change_over_the_selections_is_a_violation_even_when_the_selected_element_is_fine() {
    let layer = ImplicitLayer::fixed_point(steep, ImplicitOptions::default()).unwrap();
    let tape = Tape::<f64>::with_policy(KinkPolicy::pytorch()).unwrap();
    let theta = tape.param(vec(&[0.0]));
    let y = layer.apply(&vec(&[0.0]), &[theta]).unwrap().z;
    // relu'(0) = 0 selects I - J = 1, invertible; d = 1 gives -1: det changes sign.
    let err = y.sum().backward().unwrap_err();
    match &err {
        Error::HypothesisViolated { node, detail } => {
            assert_eq!(node, "fixed_point");
            assert!(detail.contains("changes sign"), "{detail}");
        }
        other => panic!("expected a violation, got {other}"),
    }
    let report = layer.reports().last().unwrap();
    assert_eq!(report.check.outcome, CheckOutcome::Violated);
    assert_eq!(report.check.sigma_min, Some(1.0));
    assert!(report.check.determinant_sign_change && report.check.exhaustive);
    assert!(report.adjoint.is_none(), "refused before any solve");

    // Told not to refuse, the gradient of the selected element comes back, flagged.
    let options = ImplicitOptions::default().with_check(CheckOptions::default().with_refuse_violated(false));
    let layer = ImplicitLayer::fixed_point(steep, options).unwrap();
    let y = layer.apply(&vec(&[0.0]), &[theta]).unwrap().z;
    let g = y.sum().backward().unwrap();
    assert_eq!(g.wrt(theta).unwrap()[0], 0.0);
    assert_eq!(layer.reports().last().unwrap().check.outcome, CheckOutcome::Violated);
}

fn relu_deq<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    Ok((th[0].matmul(z) + th[1]).relu())
}

fn scaled_identity_like(n: usize, scale: f64) -> ArrayD<f64> {
    // A fixed non-symmetric matrix with spectral norm below `scale`.
    Array2::from_shape_fn((n, n), |(i, j)| {
        if i == j {
            0.5 * scale
        } else if j == (i + 1) % n {
            -0.4 * scale
        } else {
            0.0
        }
    })
    .into_dyn()
}

fn deq_report(n: usize, options: ImplicitOptions) -> clarke_implicit::BackwardReport {
    let layer = ImplicitLayer::fixed_point(relu_deq, options).unwrap();
    let tape = Tape::<f64>::new();
    let w = tape.constant(scaled_identity_like(n, 1.0));
    // x = 0: z* = 0 and every unit sits at its kink.
    let x = tape.param(ArrayD::zeros(ndarray::IxDyn(&[n])));
    let z = layer.apply(&ArrayD::zeros(ndarray::IxDyn(&[n])), &[w, x]).unwrap().z;
    z.sum().backward().unwrap();
    layer.reports().last().unwrap()
}

#[test]
fn few_kinks_are_walked_exhaustively_and_certified() {
    let report = deq_report(6, ImplicitOptions::default());
    let c = &report.check;
    assert_eq!((c.kink_elements, c.flippable, c.vertices), (6, 6, 64));
    assert!(c.exhaustive && !c.determinant_sign_change);
    assert_eq!(c.outcome, CheckOutcome::Certified, "{c}");
    // ||D W|| <= ||W|| = 0.9 < 1 at every vertex.
    assert!(c.max_vertex_norm.unwrap() < 0.91, "{c}");
}

#[test]
fn many_kinks_are_sampled_and_give_a_warning() {
    let report = deq_report(14, ImplicitOptions::default());
    let c = &report.check;
    assert_eq!(c.kink_elements, 14);
    assert!(!c.exhaustive && c.vertices == 64, "{c}");
    assert_eq!(c.outcome, CheckOutcome::Warning, "{c}");
    assert!(c.reasons.iter().any(|r| r.contains("random vertices")), "{c}");
}

#[test]
fn a_declared_contraction_bound_certifies_without_computing() {
    let options = ImplicitOptions::default().with_check(CheckOptions::default().with_contraction_bound(0.9));
    let report = deq_report(14, options);
    let c = &report.check;
    assert_eq!(c.outcome, CheckOutcome::Certified, "{c}");
    assert!((c.sigma_min.unwrap() - 0.1).abs() < 1e-15 && c.vertices == 0);
}

/// `tanh(W z + x)` through a custom op that has no forward-mode rule.
fn opaque_tanh<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    let pre = th[0].matmul(z) + th[1];
    let value = pre.value().mapv(f64::tanh);
    pre.tape().try_custom_fn("opaque_tanh", &[pre], value, |_, out, g| {
        Ok(vec![Some(&g * &out.mapv(|t| 1.0 - t * t))])
    })
}

#[test]
fn large_layers_without_forward_mode_get_a_spectral_radius_estimate() {
    let options = ImplicitOptions::default().with_check(CheckOptions::default().with_dense_limit(4));
    let layer = ImplicitLayer::fixed_point(opaque_tanh, options).unwrap();
    let tape = Tape::<f64>::new();
    let w = tape.constant(scaled_identity_like(10, 1.0));
    let x = tape.param(Array1::linspace(-1.0, 1.0, 10).into_dyn());
    let z = layer.apply(&ArrayD::zeros(ndarray::IxDyn(&[10])), &[w, x]).unwrap().z;
    z.sum().backward().unwrap();
    let c = layer.reports().last().unwrap().check;
    assert_eq!(c.outcome, CheckOutcome::Warning, "{c}");
    // rho(D W) <= ||W|| <= 0.9, and rho(W) = 0.5 already bounds the diagonal part.
    let rho = c.spectral_radius.unwrap();
    assert!(rho > 0.0 && rho < 0.9, "{c}");
    assert!(c.reasons.iter().any(|r| r.contains("dense limit")), "{c}");
    assert!(
        c.reasons
            .iter()
            .any(|r| r.contains("no forward-mode rule") && r.contains("opaque_tanh")),
        "{c}"
    );
    assert!(!c.matrix_free && c.sigma_min.is_none(), "{c}");
}

#[test]
fn reduction_ties_cannot_be_flipped_and_are_reported() {
    // z = 0.5 * max over a pair that ties at z* = 0, plus theta.
    let layer = ImplicitLayer::fixed_point(
        |z, th| {
            let pair = z.tape().stack(&[z, z * 0.5], 0);
            Ok(pair.max_axis(0, false) * 0.5 + th[0])
        },
        ImplicitOptions::default().with_mode(GradientMode::Implicit(AdjointSolver::Dense)),
    )
    .unwrap();
    let tape = Tape::<f64>::new();
    let theta = tape.param(vec(&[0.0]));
    let z = layer.apply(&vec(&[0.0]), &[theta]).unwrap().z;
    z.sum().backward().unwrap();
    let c = layer.reports().last().unwrap().check;
    assert_eq!((c.kink_elements, c.flippable), (1, 0), "{c}");
    assert_eq!(c.outcome, CheckOutcome::Warning, "{c}");
    assert!(c.reasons.iter().any(|r| r.contains("tie rule")), "{c}");
}

#[test]
fn the_report_prints_every_part() {
    let report = deq_report(3, ImplicitOptions::default());
    let text = report.to_string();
    for part in [
        "fixed_point [implicit (GMRES)]",
        "forward:",
        "adjoint: gmres",
        "kinks at z*",
        "check: certified",
    ] {
        assert!(text.contains(part), "missing {part:?} in\n{text}");
    }
}
