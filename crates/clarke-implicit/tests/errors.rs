//! Bad input and failing solves get clear errors, never a panic or a silent gradient.

use clarke_core::{Error, Result, Tape, Var};
use clarke_implicit::{
    AdjointSolver, CheckOptions, ForwardSolver, GradientMode, ImplicitLayer, ImplicitOptions, OnAdjointFailure,
};
use clarke_solve::{FixedPointOptions, SolveOptions};
use ndarray::{arr1, ArrayD};

fn vec(v: &[f64]) -> ArrayD<f64> {
    arr1(v).into_dyn()
}

#[test]
fn a_map_that_changes_the_shape_is_refused() {
    let layer = ImplicitLayer::fixed_point(|z, th| Ok(z.sum() + th[0].sum()), ImplicitOptions::default()).unwrap();
    let tape = Tape::<f64>::new();
    let theta = tape.param(vec(&[1.0, 2.0]));
    let err = layer.apply(&vec(&[0.0, 0.0]), &[theta]).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("fixed_point") && text.contains("[2]") && text.contains("shape"),
        "{text}"
    );
}

fn expanding<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    Ok(z * 2.0 + th[0])
}

/// No fixed point at all: every step moves by exp(theta).
fn drifting<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    Ok(z + th[0].exp())
}

#[test]
fn a_non_contractive_map_fails_with_its_residual_trace() {
    type Map = for<'s> fn(Var<'s, f64>, &[Var<'s, f64>]) -> Result<Var<'s, f64>>;
    let cases: [(Map, ForwardSolver); 3] = [
        (expanding, ForwardSolver::Picard),
        (drifting, ForwardSolver::Anderson),
        (drifting, ForwardSolver::Broyden),
    ];
    for (map, solver) in cases {
        let layer = ImplicitLayer::fixed_point(
            map,
            ImplicitOptions::default()
                .with_name("expanding")
                .with_forward_solver(solver)
                .with_forward(FixedPointOptions::default().with_max_iter(200)),
        )
        .unwrap();
        let tape = Tape::<f64>::new();
        let theta = tape.param(vec(&[1.0]));
        let err = layer.apply(&vec(&[0.0]), &[theta]).unwrap_err();
        match &err {
            Error::SolveFailed { node, stage, trace, .. } => {
                assert_eq!((node.as_str(), *stage), ("expanding", "forward"));
                assert!(trace.len() > 2, "{trace:?}");
                if solver == ForwardSolver::Picard {
                    assert!(trace.last() > trace.first(), "{trace:?}");
                }
            }
            other => panic!("{solver:?}: expected a failed forward solve, got {other}"),
        }
        assert!(err.to_string().contains("residual trace ["), "{err}");
    }
}

#[test]
fn an_unconverged_forward_budget_is_an_error_unless_accepted() {
    fn map<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
        Ok(z * 0.9 + th[0])
    }
    let strict = ImplicitOptions::default()
        .with_forward_solver(ForwardSolver::Picard)
        .with_forward(FixedPointOptions::default().with_max_iter(5));
    let tape = Tape::<f64>::new();
    let theta = tape.param(vec(&[1.0]));
    let layer = ImplicitLayer::fixed_point(map, strict).unwrap();
    assert!(matches!(
        layer.apply(&vec(&[0.0]), &[theta]),
        Err(Error::SolveFailed { stage: "forward", .. })
    ));
    let budget = ImplicitOptions::default()
        .with_forward_solver(ForwardSolver::Picard)
        .with_fixed_forward_iterations(5);
    let layer = ImplicitLayer::fixed_point(map, budget).unwrap();
    let z = layer.apply(&vec(&[0.0]), &[theta]).unwrap().z;
    z.sum().backward().unwrap();
    let report = layer.reports().last().unwrap();
    assert!(report.approximate && !report.forward.is_converged(), "{report}");
    // The error bound accounts for the unconverged forward: residual / (1 - 0.9).
    let bound = report.check.error_bound.unwrap();
    assert!((bound - report.forward_residual / 0.1).abs() < 1e-9 * bound, "{report}");
}

/// T(z, theta) = z + (theta - z)^3: at z = theta, J_z = I and I - J_z = 0.
fn degenerate<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    let d = th[0] - z;
    Ok(z + d * d * d)
}

fn degenerate_backward(options: ImplicitOptions) -> Result<ArrayD<f64>> {
    let layer = ImplicitLayer::fixed_point(degenerate, options)?;
    let tape = Tape::<f64>::new();
    let theta = tape.param(vec(&[0.5, -0.5]));
    let z = layer.apply(&vec(&[0.5, -0.5]), &[theta])?.z;
    let g = z.sum().backward()?;
    Ok(g.wrt(theta)?.clone())
}

#[test]
fn a_singular_adjoint_is_refused_by_the_check_and_by_every_solver() {
    let dense = GradientMode::Implicit(AdjointSolver::Dense);
    let err = degenerate_backward(ImplicitOptions::default().with_mode(dense)).unwrap_err();
    assert!(matches!(err, Error::HypothesisViolated { .. }), "{err}");
    assert!(err.to_string().contains("singular"), "{err}");

    let unchecked = |mode| {
        ImplicitOptions::default()
            .with_mode(mode)
            .with_check(CheckOptions::off())
    };
    let err = degenerate_backward(unchecked(dense)).unwrap_err();
    match err {
        Error::InImplicit { node, source, .. } => {
            assert_eq!(node, "fixed_point");
            assert!(matches!(*source, Error::Singular { .. }), "{source}");
        }
        other => panic!("expected a refused dense solve, got {other}"),
    }
    for solver in [AdjointSolver::Neumann, AdjointSolver::Gmres, AdjointSolver::Bicgstab] {
        let err = degenerate_backward(unchecked(GradientMode::Implicit(solver))).unwrap_err();
        assert!(
            matches!(err, Error::SolveFailed { stage: "adjoint", .. }),
            "{solver:?}: {err}"
        );
    }
    // The dense fallback is singular too: still an error.
    let err = degenerate_backward(
        unchecked(GradientMode::Implicit(AdjointSolver::Gmres)).with_on_adjoint_failure(OnAdjointFailure::Dense),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InImplicit { .. }), "{err}");
}

#[test]
fn nan_inside_the_map_names_the_inner_op() {
    let layer = ImplicitLayer::fixed_point(|z, th| Ok((z - 5.0).log() + th[0]), ImplicitOptions::default()).unwrap();
    let tape = Tape::<f64>::new();
    let theta = tape.param(vec(&[1.0]));
    let err = layer.apply(&vec(&[0.0]), &[theta]).unwrap_err();
    match &err {
        Error::InImplicit { node, source, .. } => {
            assert_eq!(node, "fixed_point");
            assert!(matches!(**source, Error::NonFinite { op: "log", .. }), "{source}");
        }
        other => panic!("expected a located NaN, got {other}"),
    }
}

#[test]
fn options_that_do_not_fit_the_layer_are_refused() {
    for mode in [
        GradientMode::Implicit(AdjointSolver::Neumann),
        GradientMode::TruncatedNeumann { terms: 5 },
        GradientMode::Unrolled { iterations: 5 },
        GradientMode::OneStep,
    ] {
        let err =
            ImplicitLayer::<f64>::root(|z, th| Ok(z - th[0]), ImplicitOptions::default().with_mode(mode)).unwrap_err();
        assert!(err.to_string().contains("root layer"), "{err}");
    }
    let err = ImplicitLayer::<f64>::fixed_point(
        |z, _| Ok(z),
        ImplicitOptions::default().with_mode(GradientMode::Unrolled { iterations: 0 }),
    )
    .unwrap_err();
    assert!(err.to_string().contains("at least one iteration"), "{err}");
    let err = ImplicitLayer::<f64>::fixed_point(
        |z, _| Ok(z),
        ImplicitOptions::default().with_check(CheckOptions::default().with_contraction_bound(f64::NAN)),
    )
    .unwrap_err();
    assert!(err.to_string().contains("contraction bound"), "{err}");
}

#[test]
fn bad_parameters_and_starting_points_are_refused() {
    let layer = ImplicitLayer::fixed_point(|z, th| Ok(z * 0.5 + th[0]), ImplicitOptions::default()).unwrap();
    let tape = Tape::<f64>::new();
    let other = Tape::<f64>::new();
    let theta = tape.param(vec(&[1.0]));
    let foreign = other.param(vec(&[1.0]));
    assert!(layer
        .apply(&vec(&[0.0]), &[])
        .unwrap_err()
        .to_string()
        .contains("at least one parameter"));
    assert!(matches!(
        layer.apply(&vec(&[0.0]), &[theta, foreign]),
        Err(Error::ForeignVar { .. })
    ));
    let err = layer.apply(&vec(&[f64::NAN]), &[theta]).unwrap_err();
    assert!(err.to_string().contains("non-finite"), "{err}");
}

#[test]
fn adjoint_failure_policies_are_explicit_and_reported() {
    // T(z) = -1.5 z + theta: z* = theta / 2.5, dz/dtheta = 0.4; the Neumann adjoint diverges.
    let base = || {
        ImplicitOptions::default()
            .with_forward_solver(ForwardSolver::NewtonKrylov)
            .with_mode(GradientMode::Implicit(AdjointSolver::Neumann))
    };
    let run = |options: ImplicitOptions| -> Result<(f64, ImplicitLayer<f64>)> {
        let layer = ImplicitLayer::fixed_point(|z, th| Ok(z * -1.5 + th[0]), options)?;
        let tape = Tape::<f64>::new();
        let theta = tape.param(vec(&[1.0]));
        let z = layer.apply(&vec(&[0.0]), &[theta])?.z;
        let g = z.sum().backward()?.wrt(theta)?[0];
        Ok((g, layer))
    };
    let err = run(base()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::SolveFailed {
                stage: "adjoint",
                solver: "neumann",
                ..
            }
        ),
        "{err}"
    );
    let (g, layer) = run(base().with_on_adjoint_failure(OnAdjointFailure::Dense)).unwrap();
    assert!((g - 0.4).abs() < 1e-12);
    let report = layer.reports().last().unwrap();
    assert!(report.fallback.as_ref().unwrap().contains("solved densely"), "{report}");
    assert!(!report.approximate);
    // A diverged solve is not accepted even when approximations are.
    assert!(run(base().with_on_adjoint_failure(OnAdjointFailure::AcceptApproximate)).is_err());
    // An exhausted budget is, and the report says so.
    let short = ImplicitOptions::default()
        .with_mode(GradientMode::Implicit(AdjointSolver::Gmres))
        .with_adjoint(SolveOptions {
            max_iter: 1,
            restart: 1,
            ..Default::default()
        })
        .with_on_adjoint_failure(OnAdjointFailure::AcceptApproximate);
    let layer = ImplicitLayer::fixed_point(|z, th| Ok((z * 0.5).tanh() + th[0]), short).unwrap();
    let tape = Tape::<f64>::new();
    let theta = tape.param(vec(&[1.0, -2.0, 0.5]));
    let z = layer.apply(&vec(&[0.0, 0.0, 0.0]), &[theta]).unwrap().z;
    (z * z).sum().backward().unwrap();
    let report = layer.reports().last().unwrap();
    assert!(
        report.approximate && report.fallback.as_ref().unwrap().contains("accepted"),
        "{report}"
    );
}
