//! Bad input and failing solves get clear errors, never a panic or a silent gradient.

use clarke_core::{Error, Result, Tape, Var};
use clarke_implicit::{
    AdjointSolver, CheckOptions, ForwardSolver, GradientMode, ImplicitLayer, ImplicitOptions, OnAdjointFailure,
};
use clarke_solve::{FixedPointOptions, NewtonKrylovOptions, SolveOptions};
use ndarray::{ArrayD, arr1};

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
    for solver in [
        AdjointSolver::Neumann,
        AdjointSolver::Anderson { memory: 3 },
        AdjointSolver::Gmres,
        AdjointSolver::Bicgstab,
    ] {
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
    assert!(
        layer
            .apply(&vec(&[0.0]), &[])
            .unwrap_err()
            .to_string()
            .contains("at least one parameter")
    );
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

// ---- bad input to the public check engine, the options, and the layer ----

use clarke_core::ElementSelection;
use clarke_implicit::check::{Flippable, Form, Spectrum, WalkInput, block, walk_vertices};
use ndarray::{Array2, arr2};

/// A walk input without kinks, a fixed point with unit 1.
fn walk_input(form: Form, flippable: usize) -> WalkInput {
    WalkInput {
        form,
        flippable: (0..flippable)
            .map(|element| Flippable {
                node: 0,
                element,
                low: 0.0,
                high: 1.0,
            })
            .collect(),
        kink_elements: flippable,
        frozen: 0,
        within_solver_error: 0,
        forward_residual: 0.0,
        unit: 1.0,
    }
}

fn invalid_detail(err: &Error, op_wanted: &str) -> String {
    match err {
        Error::InvalidArgument { op, detail } => {
            assert_eq!(*op, op_wanted, "{err}");
            detail.clone()
        }
        other => panic!("expected InvalidArgument from {op_wanted}, got {other:?}"),
    }
}

#[test]
fn walk_vertices_refuses_a_jacobian_that_is_not_square() {
    for form in [Form::FixedPoint, Form::Root] {
        let err = walk_vertices::<f64>(&walk_input(form, 0), &CheckOptions::default(), |_| {
            Ok(Array2::zeros((3, 2)))
        })
        .unwrap_err();
        match &err {
            Error::ShapeMismatch { op, lhs, .. } => {
                assert_eq!((*op, lhs.as_slice()), ("walk_vertices", &[3, 2][..]), "{err}");
            }
            other => panic!("{form:?}: expected a shape mismatch, got {other:?}"),
        }
        assert!(err.to_string().contains("square"), "{err}");
    }
}

#[test]
fn walk_vertices_refuses_vertex_jacobians_of_another_size() {
    let err = walk_vertices::<f64>(&walk_input(Form::FixedPoint, 1), &CheckOptions::default(), |s| {
        Ok(if s.is_empty() {
            Array2::zeros((1, 1))
        } else {
            Array2::zeros((2, 2))
        })
    })
    .unwrap_err();
    match &err {
        Error::ShapeMismatch { op, lhs, rhs, .. } => {
            assert_eq!(
                (*op, lhs.as_slice(), rhs.as_slice()),
                ("walk_vertices", &[2, 2][..], &[1, 1][..])
            );
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
}

#[test]
fn walk_vertices_refuses_a_non_finite_jacobian() {
    for (form, bad) in [(Form::Root, f64::NAN), (Form::FixedPoint, f64::INFINITY)] {
        let err = walk_vertices::<f64>(&walk_input(form, 0), &CheckOptions::default(), |_| {
            Ok(arr2(&[[0.5, 0.0], [0.0, bad]]))
        })
        .unwrap_err();
        let detail = invalid_detail(&err, "walk_vertices");
        assert!(detail.contains(&format!("{bad}")) && detail.contains("[1, 1]"), "{err}");
    }
}

#[test]
fn walk_vertices_validates_its_options() {
    // A singular 1 x 1 root block: with thresholds that cannot mean anything the walk used to
    // certify it.
    let bad = CheckOptions {
        singular_tol: f64::NAN,
        singular_floor: -1.0,
        warn_tol: -1.0,
        ..CheckOptions::default()
    };
    let mut input = walk_input(Form::Root, 0);
    input.unit = 0.0;
    let err = walk_vertices::<f64>(&input, &bad, |_| Ok(arr2(&[[0.0]]))).unwrap_err();
    let detail = invalid_detail(&err, "CheckOptions");
    assert!(detail.contains("singular_tol") && detail.contains("NaN"), "{err}");

    // No samples for a walk above the exhaustive limit: no vertex would be examined.
    let none = CheckOptions {
        samples: 0,
        exhaustive_limit: 0,
        ..CheckOptions::default()
    };
    let err = walk_vertices::<f64>(&walk_input(Form::FixedPoint, 1), &none, |_| Ok(arr2(&[[0.5]]))).unwrap_err();
    assert!(invalid_detail(&err, "CheckOptions").contains("samples"), "{err}");
}

#[test]
fn walk_vertices_refuses_an_inconsistent_walk_input() {
    let ok = |_: &[ElementSelection]| Ok(arr2(&[[0.5]]));
    let mut input = walk_input(Form::FixedPoint, 1);
    input.flippable[0].low = f64::NAN;
    let err = walk_vertices::<f64>(&input, &CheckOptions::default(), ok).unwrap_err();
    let detail = invalid_detail(&err, "walk_vertices");
    assert!(detail.contains("hull") && detail.contains("NaN"), "{err}");

    let mut input = walk_input(Form::FixedPoint, 0);
    input.forward_residual = -1.0;
    let err = walk_vertices::<f64>(&input, &CheckOptions::default(), ok).unwrap_err();
    let detail = invalid_detail(&err, "walk_vertices");
    assert!(detail.contains("forward_residual") && detail.contains("-1"), "{err}");

    let mut input = walk_input(Form::Root, 0);
    input.unit = f64::INFINITY;
    let err = walk_vertices::<f64>(&input, &CheckOptions::default(), ok).unwrap_err();
    let detail = invalid_detail(&err, "walk_vertices");
    assert!(detail.contains("unit") && detail.contains("inf"), "{err}");
}

#[test]
fn spectrum_and_block_refuse_a_matrix_that_is_not_square() {
    let tall = Array2::<f64>::zeros((3, 2));
    for err in [
        Spectrum::of(tall.view()).unwrap_err(),
        block(Form::FixedPoint, tall.clone()).unwrap_err(),
        block(Form::Root, tall.clone()).unwrap_err(),
    ] {
        match &err {
            Error::ShapeMismatch { op, lhs, .. } => {
                assert!(*op == "Spectrum::of" || *op == "check::block", "{err}");
                assert_eq!(lhs.as_slice(), &[3, 2], "{err}");
            }
            other => panic!("expected a shape mismatch, got {other:?}"),
        }
    }
    let err = Spectrum::of(arr2(&[[1.0, f64::NAN], [0.0, 1.0]]).view()).unwrap_err();
    let detail = invalid_detail(&err, "Spectrum::of");
    assert!(detail.contains("NaN") && detail.contains("[0, 1]"), "{err}");
}

#[test]
fn check_options_refuse_thresholds_and_budgets_that_cannot_mean_anything() {
    let cases = [
        (
            CheckOptions {
                singular_tol: 1.0,
                ..CheckOptions::default()
            },
            "singular_tol",
        ),
        (
            CheckOptions {
                warn_tol: 2.0,
                ..CheckOptions::default()
            },
            "warn_tol",
        ),
        (
            CheckOptions {
                radius_iterations: 0,
                ..CheckOptions::default()
            },
            "radius_iterations",
        ),
        (
            CheckOptions {
                spectral_iterations: 0,
                ..CheckOptions::default()
            },
            "spectral_iterations",
        ),
        (
            CheckOptions {
                spectral_tol: f64::NAN,
                ..CheckOptions::default()
            },
            "spectral_tol",
        ),
        (
            CheckOptions {
                norm_tol: 1.0,
                ..CheckOptions::default()
            },
            "norm_tol",
        ),
    ];
    for (check, field) in cases {
        let err = check.validate().unwrap_err();
        assert!(invalid_detail(&err, "CheckOptions").contains(field), "{err}");
        let err =
            ImplicitLayer::<f64>::fixed_point(|z, _| Ok(z), ImplicitOptions::default().with_check(check)).unwrap_err();
        assert!(err.to_string().contains(field), "{err}");
    }
}

#[test]
fn a_huge_unrolled_budget_runs_without_preallocating_it() {
    use std::cell::Cell;
    use std::rc::Rc;
    let calls = Rc::new(Cell::new(0usize));
    let counter = calls.clone();
    let layer = ImplicitLayer::fixed_point(
        move |z, th| {
            counter.set(counter.get() + 1);
            if counter.get() > 3 {
                return Err(Error::invalid("test map", "stop after three calls"));
            }
            Ok(z * 0.5 + th[0])
        },
        ImplicitOptions::default().with_mode(GradientMode::Unrolled { iterations: usize::MAX }),
    )
    .unwrap();
    let tape = Tape::<f64>::new();
    let theta = tape.param(vec(&[1.0]));
    let err = layer.apply(&vec(&[0.0]), &[theta]).unwrap_err();
    assert!(err.to_string().contains("stop after three calls"), "{err}");
    assert_eq!(calls.get(), 4);
}

#[test]
fn a_non_finite_incoming_gradient_is_refused_by_every_adjoint_mode() {
    for mode in [
        GradientMode::Implicit(AdjointSolver::Dense),
        GradientMode::Implicit(AdjointSolver::Gmres),
        GradientMode::LeastSquaresNoHypothesis,
        GradientMode::TruncatedNeumann { terms: 3 },
    ] {
        let layer = ImplicitLayer::fixed_point(
            |z, th| Ok(z * 0.5 + th[0]),
            ImplicitOptions::default().with_name("nan_seed").with_mode(mode),
        )
        .unwrap();
        let tape = Tape::<f64>::new();
        let theta = tape.param(vec(&[1.0, 2.0]));
        let z = layer.apply(&vec(&[0.0, 0.0]), &[theta]).unwrap().z;
        let err = (z * f64::NAN).sum().backward().unwrap_err();
        match &err {
            Error::InImplicit { node, source, .. } => {
                assert_eq!(node, "nan_seed");
                let detail = invalid_detail(source, "implicit layer");
                assert!(detail.contains("gradient") && detail.contains("NaN"), "{mode:?}: {err}");
            }
            other => panic!("{mode:?}: expected a refused adjoint, got {other:?}"),
        }
    }
}

#[test]
fn an_empty_state_solves_to_an_empty_solution_in_every_mode() {
    for mode in [
        GradientMode::Implicit(AdjointSolver::Dense),
        GradientMode::Implicit(AdjointSolver::Gmres),
        GradientMode::Implicit(AdjointSolver::Neumann),
        GradientMode::LeastSquaresNoHypothesis,
        GradientMode::TruncatedNeumann { terms: 3 },
        GradientMode::Unrolled { iterations: 2 },
        GradientMode::OneStep,
    ] {
        let layer = ImplicitLayer::fixed_point(
            |z, th| Ok(z * 0.5 + th[0].sum()),
            ImplicitOptions::default().with_mode(mode),
        )
        .unwrap();
        let tape = Tape::<f64>::new();
        let theta = tape.param(vec(&[1.0]));
        let z = layer.apply(&vec(&[]), &[theta]).unwrap().z;
        assert_eq!(z.shape(), vec![0], "{mode:?}");
        let g = z.sum().backward().unwrap();
        assert_eq!(g.wrt(theta).unwrap()[0], 0.0, "{mode:?}");
    }
}

#[test]
fn a_non_finite_parameter_is_named() {
    let layer = ImplicitLayer::fixed_point(|z, th| Ok(z * 0.5 + th[1]), ImplicitOptions::default()).unwrap();
    let tape = Tape::<f64>::new();
    let a = tape.param(vec(&[1.0]));
    let b = tape.param(vec(&[2.0, f64::INFINITY]));
    let err = layer.apply(&vec(&[0.0, 0.0]), &[a, b]).unwrap_err();
    match &err {
        Error::InImplicit { node, source, .. } => {
            assert_eq!(node, "fixed_point");
            let detail = invalid_detail(source, "implicit layer");
            assert!(
                detail.contains("theta[1]") && detail.contains("inf") && detail.contains("index 1"),
                "{err}"
            );
        }
        other => panic!("expected a located non-finite parameter, got {other:?}"),
    }
}

#[test]
fn an_unsettled_spectral_estimate_draws_no_conclusion() {
    // z larger than the dense limit: the check estimates sigma_min of I - J_z matrix-free.
    // One iteration cannot settle, and an unsettled estimate must not certify anything.
    let check = CheckOptions {
        dense_limit: 2,
        spectral_iterations: 1,
        ..CheckOptions::default()
    };
    let layer = ImplicitLayer::fixed_point(
        |z, th| Ok((z * 0.5).tanh() + th[0]),
        ImplicitOptions::default().with_check(check),
    )
    .unwrap();
    let tape = Tape::<f64>::new();
    let theta = tape.param(vec(&[0.3, -0.2, 0.1, 0.7]));
    let z = layer.apply(&vec(&[0.0; 4]), &[theta]).unwrap().z;
    z.sum().backward().unwrap();
    let c = layer.reports().last().unwrap().check;
    assert_eq!(c.outcome, clarke_implicit::CheckOutcome::Warning, "{c}");
    assert!(c.matrix_free, "{c}");
    assert!(c.reasons.iter().any(|r| r.contains("not converged")), "{c}");
    assert!(!c.reasons.iter().any(|r| r.contains("invertible")), "{c}");
}

#[test]
fn an_unsettled_spectral_radius_estimate_draws_no_conclusion() {
    // A map without forward-mode products: the check estimates rho(J_z) by power iteration.
    // One iteration cannot settle, and the check used to call the element invertible anyway.
    let check = CheckOptions {
        dense_limit: 2,
        radius_iterations: 1,
        ..CheckOptions::default()
    };
    fn opaque_half_tanh<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
        let value = z.value().mapv(|v| (0.5 * v).tanh());
        let t = z.tape().try_custom_fn("opaque", &[z], value, |_, out, g| {
            Ok(vec![Some(&g * &out.mapv(|t| 0.5 * (1.0 - t * t)))])
        })?;
        Ok(t + th[0])
    }
    let layer = ImplicitLayer::fixed_point(opaque_half_tanh, ImplicitOptions::default().with_check(check)).unwrap();
    let tape = Tape::<f64>::new();
    let theta = tape.param(vec(&[0.3, -0.2, 0.1, 0.7]));
    let z = layer.apply(&vec(&[0.0; 4]), &[theta]).unwrap().z;
    z.sum().backward().unwrap();
    let c = layer.reports().last().unwrap().check;
    assert_eq!(c.outcome, clarke_implicit::CheckOutcome::Warning, "{c}");
    assert!(c.reasons.iter().any(|r| r.contains("not converged")), "{c}");
    assert!(!c.reasons.iter().any(|r| r.contains("is invertible")), "{c}");
}

#[test]
fn solver_options_are_refused_when_the_layer_is_built() {
    fn map<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
        Ok(z * 0.5 + th[0])
    }
    let refused = |options: ImplicitOptions, op: &str, words: &[&str]| {
        let err = ImplicitLayer::fixed_point(map, options).unwrap_err();
        let detail = invalid_detail(&err, op);
        assert!(words.iter().all(|w| detail.contains(w)), "{err}");
    };
    refused(
        ImplicitOptions::default().with_forward(FixedPointOptions::default().with_tol(f64::NAN)),
        "implicit layer (forward options)",
        &["tolerance", "NaN"],
    );
    refused(
        ImplicitOptions::default().with_adjoint(SolveOptions::default().with_tol(-1.0)),
        "implicit layer (adjoint options)",
        &["tolerance", "-1"],
    );
    refused(
        ImplicitOptions::default()
            .with_mode(GradientMode::TruncatedNeumann { terms: 3 })
            .with_adjoint(SolveOptions::default().with_divergence_factor(0.5)),
        "implicit layer (adjoint options)",
        &["divergence factor", "0.5"],
    );
    refused(
        ImplicitOptions::default()
            .with_forward_solver(ForwardSolver::NewtonKrylov)
            .with_newton(NewtonKrylovOptions::default().with_fd_step(0.0)),
        "implicit layer (Newton-Krylov options)",
        &["fd_step", "0"],
    );
    // Options of a part the configuration does not use are not judged: the unrolled mode
    // solves no adjoint.
    let unused = ImplicitOptions::default()
        .with_mode(GradientMode::Unrolled { iterations: 3 })
        .with_adjoint(SolveOptions::default().with_tol(-1.0));
    let layer = ImplicitLayer::fixed_point(map, unused).unwrap();
    let tape = Tape::<f64>::new();
    let theta = tape.param(vec(&[1.0]));
    let z = layer.apply(&vec(&[0.0]), &[theta]).unwrap().z;
    assert!(z.sum().backward().is_ok());
}
