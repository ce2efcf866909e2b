//! Bad input to the public functions of the crate: each is refused with a typed error that
//! names the function and the offending value, instead of a panic, a NaN or a wrong result.

use clarke_convex::cd::{CdOptions, Fit, solve};
use clarke_convex::cone::{
    self, Cone, ConeDerivative, ConeProgram, Cones, DataDirection, DerivativeOptions, Residuals, SolverOptions,
    WarmStart, box_projection, lp, polytope_projection, simplex_projection,
};
use clarke_convex::data::{read_csv, try_synthetic};
use clarke_convex::hypergrad::support::analyze;
use clarke_convex::hypergrad::unrolled::ista_forward;
use clarke_convex::hypergrad::{HypergradOptions, Method, ValidationMse, hypergradient};
use clarke_convex::model::{LassoModel, LossScale, Penalty};
use clarke_convex::project::{project_box, project_l1_ball, project_simplex, simplex_threshold};
use clarke_convex::prox::soft_threshold_scalar;
use clarke_convex::search::{SearchOptions, Stepper, gradient_search, grid_search, try_geometric_grid};
use clarke_core::{Error, Tape};
use ndarray::{Array1, Array2, array};

/// Asserts an `InvalidArgument` from `op` whose detail contains every one of `needles`.
#[track_caller]
fn assert_invalid(e: Error, op: &str, needles: &[&str]) {
    match &e {
        Error::InvalidArgument { op: found, detail } => {
            assert_eq!(*found, op, "{e}");
            for n in needles {
                assert!(detail.contains(n), "{n:?} not in: {e}");
            }
        }
        _ => panic!("expected InvalidArgument from {op}, got: {e}"),
    }
}

/// Asserts a `ShapeMismatch` from `op` between the shapes `found` and `expected`.
#[track_caller]
fn assert_shapes(e: Error, op: &str, found: &[usize], expected: &[usize]) {
    match &e {
        Error::ShapeMismatch { op: o, lhs, rhs, .. } => {
            assert_eq!(*o, op, "{e}");
            assert_eq!((&lhs[..], &rhs[..]), (found, expected), "{e}");
        }
        _ => panic!("expected ShapeMismatch from {op}, got: {e}"),
    }
}

fn small_model() -> LassoModel {
    let x = array![[1.0, 0.5], [0.3, 1.0], [0.2, -0.4]];
    let y = array![2.0, 0.5, -0.3];
    LassoModel::new(x.view(), y.view()).unwrap()
}

fn small_fit(model: &LassoModel) -> Fit {
    solve(
        model,
        &Penalty::Uniform(0.1),
        None,
        &CdOptions::default().with_tol(1e-14),
    )
    .unwrap()
}

fn validation() -> ValidationMse {
    ValidationMse::new(Array2::eye(2).view(), array![1.0, 0.0].view()).unwrap()
}

// ---- project ----

#[test]
fn simplex_threshold_refuses_bad_radii_empty_and_non_finite_input() {
    for radius in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let e = simplex_threshold(&[0.5, 0.2], radius).unwrap_err();
        assert_invalid(
            e,
            "simplex_threshold",
            &["radius must be finite and > 0", &radius.to_string()],
        );
    }
    assert_invalid(
        simplex_threshold(&[], 1.0).unwrap_err(),
        "simplex_threshold",
        &["empty"],
    );
    let e = simplex_threshold(&[0.5, f64::NAN], 1.0).unwrap_err();
    assert_invalid(e, "simplex_threshold", &["NaN at index 1"]);
    // A valid call: sum max(a - tau, 0) = 1 with a = (0.9, 0.4, -0.5) at tau = 0.15.
    let tau = simplex_threshold(&[0.9, 0.4, -0.5], 1.0).unwrap();
    assert!((tau - 0.15).abs() < 1e-15, "{tau}");
}

#[test]
fn projections_refuse_empty_sets_and_nan_bounds() {
    let tape = Tape::<f64>::new();
    let u = tape.param(array![1.0, -2.0].into_dyn());
    for (lo, hi) in [(1.0, 0.0), (f64::NAN, 1.0), (0.0, f64::NAN)] {
        let e = project_box(u, lo, hi).unwrap_err();
        assert_invalid(e, "project_box", &["lo <= hi", &format!("lo = {lo}, hi = {hi}")]);
    }
    // An open side is a valid (unbounded) box; a degenerate one is the single point.
    let half = project_box(u, 0.0, f64::INFINITY).unwrap();
    assert_eq!(half.value().as_slice().unwrap(), &[1.0, 0.0]);
    let point = project_box(u, 0.5, 0.5).unwrap();
    assert_eq!(point.value().as_slice().unwrap(), &[0.5, 0.5]);
    for radius in [-1.0, f64::NAN, f64::INFINITY] {
        let e = project_simplex(u, radius).unwrap_err();
        assert_invalid(e, "project_simplex", &["radius", &radius.to_string()]);
        let e = project_l1_ball(u, radius).unwrap_err();
        assert_invalid(e, "project_l1_ball", &["radius", &radius.to_string()]);
    }
}

#[test]
fn conic_projection_constructors_refuse_empty_sets_and_bad_points() {
    let u = array![0.3, -0.2];
    for (lo, hi) in [(1.0, 0.0), (f64::NEG_INFINITY, 1.0), (0.0, f64::NAN)] {
        let e = box_projection(u.view(), lo, hi).unwrap_err();
        assert_invalid(e, "box_projection", &["lo <= hi", &format!("lo = {lo}")]);
    }
    let e = box_projection(array![0.0, f64::NAN].view(), 0.0, 1.0).unwrap_err();
    assert_invalid(e, "box_projection", &["u has a non-finite entry NaN at flat index 1"]);
    let e = simplex_projection(Array1::zeros(0).view(), 1.0).unwrap_err();
    assert_invalid(e, "simplex_projection", &["u is empty"]);
    let e = simplex_projection(u.view(), -1.0).unwrap_err();
    assert_invalid(e, "simplex_projection", &["radius", "-1"]);
    let g = array![[1.0, 1.0]];
    let e = polytope_projection(array![f64::INFINITY, 0.0].view(), g.view(), array![1.0].view()).unwrap_err();
    assert_invalid(e, "polytope_projection", &["inf at flat index 0"]);
}

// ---- data ----

#[test]
fn synthetic_refuses_bad_noise_and_sizes_naming_itself() {
    for noise in [f64::NAN, -1.0, f64::INFINITY] {
        let e = try_synthetic(10, 3, 2, noise, 0).unwrap_err();
        assert_invalid(e, "synthetic", &["noise", &noise.to_string()]);
    }
    assert_invalid(try_synthetic(0, 3, 2, 0.1, 0).unwrap_err(), "synthetic", &["0 rows"]);
    let e = try_synthetic(10, 3, 4, 0.1, 0).unwrap_err();
    assert_invalid(e, "synthetic", &["4 informative", "p = 3"]);
    let ok = try_synthetic(10, 3, 3, 0.0, 0).unwrap();
    assert_eq!(ok.x.dim(), (10, 3));
}

#[test]
fn read_csv_refuses_non_finite_fields_and_a_header_alone() {
    let dir = std::env::temp_dir().join(format!("clarke-convex-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let nan = dir.join("nan.csv");
    std::fs::write(&nan, "a,b,y\n1,2,3\n4,NaN,6\n").unwrap();
    let e = read_csv(&nan).unwrap_err();
    assert!(
        matches!(&e, Error::Data(d) if d.contains("line 3") && d.contains("\"b\"") && d.contains("NaN is not finite")),
        "{e}"
    );
    let header = dir.join("header.csv");
    std::fs::write(&header, "a,y\n").unwrap();
    let e = read_csv(&header).unwrap_err();
    assert!(matches!(&e, Error::Data(d) if d.contains("no data line")), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- model, prox kernels ----

#[test]
fn penalty_get_is_the_checked_form_of_at() {
    let per = Penalty::PerFeature(array![0.1, 0.2]);
    assert_eq!(per.get(1), Some(0.2));
    assert_eq!(per.get(2), None);
    assert_eq!(Penalty::Uniform(0.3).get(7), Some(0.3));
    let caught = std::panic::catch_unwind(|| per.at(2));
    assert!(caught.is_err(), "at is documented to panic out of range");
}

#[test]
fn soft_threshold_scalar_propagates_nan() {
    assert!(soft_threshold_scalar(f64::NAN, 1.0).is_nan());
    assert!(soft_threshold_scalar(0.5, f64::NAN).is_nan());
    assert_eq!(soft_threshold_scalar(0.5, 1.0), 0.0);
    assert_eq!(soft_threshold_scalar(-3.0, 1.0), -2.0);
}

// ---- coordinate descent ----

#[test]
fn cd_refuses_gap_every_zero_and_bad_tolerances() {
    let model = small_model();
    let opts = CdOptions {
        gap_every: 0,
        ..Default::default()
    };
    let e = solve(&model, &Penalty::Uniform(0.1), None, &opts).unwrap_err();
    assert_invalid(e, "coordinate descent", &["gap_every must be >= 1"]);
    let e = solve(
        &model,
        &Penalty::Uniform(0.1),
        None,
        &CdOptions::default().with_tol(f64::NAN),
    )
    .unwrap_err();
    assert_invalid(e, "coordinate descent", &["tol", "NaN"]);
    let e = solve(
        &model,
        &Penalty::PerFeature(array![0.1, f64::NAN]),
        None,
        &CdOptions::default(),
    )
    .unwrap_err();
    assert_invalid(e, "coordinate descent", &["lambda[1] = NaN"]);
    // No epochs: the start, with its gap, as an unconverged fit.
    let zero = solve(
        &model,
        &Penalty::Uniform(0.1),
        None,
        &CdOptions::default().with_max_epochs(0),
    )
    .unwrap();
    assert!(!zero.is_converged() && zero.epochs == 0 && zero.beta.iter().all(|b| *b == 0.0));
}

// ---- hypergradients ----

#[test]
fn hypergradient_refuses_an_unconverged_fit() {
    let model = small_model();
    let short = solve(
        &model,
        &Penalty::Uniform(0.01),
        None,
        &CdOptions::default().with_max_epochs(1),
    )
    .unwrap();
    assert!(!short.is_converged());
    for method in Method::ALL {
        let e = hypergradient(&model, &short, &validation(), method, &HypergradOptions::default()).unwrap_err();
        assert_invalid(e, "hypergradient", &["did not converge", "epochs"]);
    }
    // The sets of an iterate can still be analysed.
    assert!(analyze(&model, &short, &HypergradOptions::default()).is_ok());
}

#[test]
fn hypergradient_refuses_the_fit_of_another_model_of_the_same_shape() {
    let model = small_model();
    let fit = small_fit(&model);
    // Same X, another response.
    let x = model.x();
    let other = LassoModel::new(x.view(), array![1.0, -0.5, 0.7].view()).unwrap();
    let e = hypergradient(
        &other,
        &fit,
        &validation(),
        Method::Support,
        &HypergradOptions::default(),
    )
    .unwrap_err();
    assert_invalid(e, "hypergradient", &["residual y - X beta", "not one of this model"]);
    // Same data, another loss scale: the residual agrees, the correlations do not.
    let summed = small_model().with_loss_scale(LossScale::Sum);
    let e = hypergradient(
        &summed,
        &fit,
        &validation(),
        Method::Implicit,
        &HypergradOptions::default(),
    )
    .unwrap_err();
    assert_invalid(e, "hypergradient", &["correlations w X^T rho"]);
    let e = analyze(&summed, &fit, &HypergradOptions::default()).unwrap_err();
    assert_invalid(e, "hypergradient", &["correlations"]);
    // Fields edited to another length: an error, not an index panic.
    let mut cut = fit.clone();
    cut.correlations = array![0.1];
    let e = hypergradient(
        &model,
        &cut,
        &validation(),
        Method::Support,
        &HypergradOptions::default(),
    )
    .unwrap_err();
    assert_shapes(e, "hypergradient", &[1], &[2]);
    let mut cut = fit.clone();
    cut.residual = array![0.1, 0.2];
    let e = analyze(&model, &cut, &HypergradOptions::default()).unwrap_err();
    assert_shapes(e, "hypergradient", &[2], &[3]);
    // The fit of this model passes.
    assert!(
        hypergradient(
            &model,
            &fit,
            &validation(),
            Method::Support,
            &HypergradOptions::default()
        )
        .is_ok()
    );
}

#[test]
fn hypergradient_options_are_checked() {
    let model = small_model();
    let fit = small_fit(&model);
    let cases: [(HypergradOptions, &str); 4] = [
        (
            HypergradOptions {
                kink_tol: f64::NAN,
                ..Default::default()
            },
            "kink_tol must be in [0, 1), got NaN",
        ),
        (
            HypergradOptions {
                rank_tol: -1.0,
                ..Default::default()
            },
            "rank_tol must be in [0, 1), got -1",
        ),
        (
            HypergradOptions {
                implicit_tol: 0.0,
                ..Default::default()
            },
            "implicit_tol must be finite and > 0, got 0",
        ),
        (
            HypergradOptions {
                unrolled_tol: f64::INFINITY,
                ..Default::default()
            },
            "unrolled_tol must be finite and >= 0, got inf",
        ),
    ];
    for (options, message) in cases {
        for method in Method::ALL {
            let e = hypergradient(&model, &fit, &validation(), method, &options).unwrap_err();
            assert_invalid(e, "hypergradient", &[message]);
        }
    }
}

#[test]
fn ista_forward_and_its_vjp_check_their_arguments() {
    let model = small_model();
    let pen = Penalty::Uniform(0.1);
    let e = ista_forward(&model, &pen, None, 0.1, f64::NAN, 10, 0.0).unwrap_err();
    assert_invalid(e, "unrolled ISTA", &["selection q", "NaN"]);
    let e = ista_forward(&model, &pen, None, 0.1, 0.0, 10, -1.0).unwrap_err();
    assert_invalid(e, "unrolled ISTA", &["tol must be finite and >= 0, got -1"]);
    let start = array![0.0, f64::INFINITY];
    let e = ista_forward(&model, &pen, Some(start.view()), 0.1, 0.0, 10, 0.0).unwrap_err();
    assert_invalid(e, "unrolled ISTA", &["inf at index 1"]);
    let run = ista_forward(&model, &pen, None, 0.1, 0.0, 10, 0.0).unwrap();
    let e = run.vjp(array![1.0].view(), 1).unwrap_err();
    assert_shapes(e, "UnrolledRun::vjp", &[1], &[2]);
    let e = run.vjp(array![1.0, 0.0].view(), 0).unwrap_err();
    assert_invalid(e, "UnrolledRun::vjp", &["hyperparameter 0", "hyperparameters = 0"]);
    assert_eq!(run.vjp(array![1.0, 0.0].view(), 1).unwrap().len(), 1);
}

// ---- search ----

#[test]
fn grids_refuse_bad_lambdas_and_ratios() {
    let e = try_geometric_grid(1.0, 0.01, 0).unwrap_err();
    assert_invalid(e, "geometric_grid", &["num must be >= 1"]);
    let e = try_geometric_grid(1.0, f64::NAN, 5).unwrap_err();
    assert_invalid(e, "geometric_grid", &["ratio must be in (0, 1], got NaN"]);
    let e = try_geometric_grid(-1.0, 0.1, 5).unwrap_err();
    assert_invalid(e, "geometric_grid", &["lambda_max must be finite and > 0, got -1"]);
    assert_eq!(try_geometric_grid(2.0, 0.5, 2).unwrap(), vec![2.0, 1.0]);
    let model = small_model();
    let e = grid_search(&model, &validation(), &[0.1, f64::NAN], &CdOptions::default()).unwrap_err();
    assert_invalid(e, "grid_search", &["lambdas[1] = NaN"]);
    let e = grid_search(&model, &validation(), &[0.1, -0.1], &CdOptions::default()).unwrap_err();
    assert_invalid(e, "grid_search", &["lambdas[1] = -0.1"]);
}

/// A criterion that is NaN everywhere.
struct Nan;

impl clarke_convex::hypergrad::Criterion for Nan {
    fn value(&self, _: ndarray::ArrayView1<'_, f64>) -> clarke_core::Result<f64> {
        Ok(f64::NAN)
    }
    fn gradient(&self, beta: ndarray::ArrayView1<'_, f64>) -> clarke_core::Result<Array1<f64>> {
        Ok(Array1::from_elem(beta.len(), f64::NAN))
    }
}

#[test]
fn searches_refuse_a_non_finite_criterion() {
    let model = small_model();
    let e = grid_search(&model, &Nan, &[0.1, 0.05], &CdOptions::default()).unwrap_err();
    assert_invalid(e, "grid_search", &["criterion is NaN"]);
    let coarse = SearchOptions {
        coarse_grid: 3,
        ..Default::default()
    };
    let e = gradient_search(&model, &Nan, &Penalty::Uniform(0.1), &coarse).unwrap_err();
    assert_invalid(e, "gradient_search", &["criterion is NaN"]);
}

#[test]
fn gradient_search_checks_its_options_and_lambda_max() {
    let model = small_model();
    let init = Penalty::Uniform(0.1);
    let cases: [(SearchOptions, &str); 5] = [
        (
            SearchOptions {
                stepper: Stepper::LineSearch { initial_step: f64::NAN },
                ..Default::default()
            },
            "initial_step must be finite and > 0, got NaN",
        ),
        (
            SearchOptions {
                stepper: Stepper::Adam { lr: 0.0 },
                ..Default::default()
            },
            "lr must be finite and > 0, got 0",
        ),
        (
            SearchOptions {
                tol: -1.0,
                ..Default::default()
            },
            "tol must be finite and >= 0, got -1",
        ),
        (
            SearchOptions {
                max_step: f64::INFINITY,
                ..Default::default()
            },
            "max_step must be finite and > 0, got inf",
        ),
        (
            SearchOptions {
                coarse_grid: 4,
                coarse_ratio: 0.0,
                ..Default::default()
            },
            "coarse_ratio must be in (0, 1], got 0",
        ),
    ];
    for (options, message) in cases {
        let e = gradient_search(&model, &validation(), &init, &options).unwrap_err();
        assert_invalid(e, "gradient_search", &[message]);
    }
    // y orthogonal to every column: lambda_max = 0, beta = 0 for every lambda.
    let flat = LassoModel::new(
        array![[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]].view(),
        array![1.0, 1.0, 1.0].view(),
    )
    .unwrap();
    assert_eq!(flat.lambda_max(), 0.0);
    let e = gradient_search(&flat, &validation(), &init, &SearchOptions::default()).unwrap_err();
    assert_invalid(e, "gradient_search", &["lambda_max = 0"]);
}

// ---- cone programs ----

fn small_lp() -> ConeProgram {
    let g = array![[1.0, 1.0], [-1.0, 0.0], [0.0, -1.0]];
    let h = array![1.0, 0.0, 0.0];
    lp(array![-1.0, -0.5].view(), Some((g.view(), h.view())), None).unwrap()
}

#[test]
fn solve_revalidates_a_program_built_from_its_fields() {
    let good = small_lp();
    let opts = SolverOptions::default();
    let mut short_b = good.clone();
    short_b.b = array![1.0, 0.0];
    assert_shapes(
        cone::solve(&short_b, &opts, None).unwrap_err(),
        "cone::solve",
        &[2],
        &[3],
    );
    let mut cones = good.clone();
    cones.cones = Cones::new(vec![Cone::NonNeg(2)]).unwrap();
    let e = cone::solve(&cones, &opts, None).unwrap_err();
    assert!(e.to_string().contains("take 2 rows but A and b have 3"), "{e}");
    assert_shapes(e, "cone::solve", &[2], &[3]);
    let mut nan = good.clone();
    nan.a[[1, 1]] = f64::NAN;
    let e = cone::solve(&nan, &opts, None).unwrap_err();
    assert_invalid(e, "cone::solve", &["A has a non-finite entry NaN at flat index 3"]);
    let mut p = good.clone();
    p.p = Some(Array2::eye(3));
    assert_shapes(
        cone::solve(&p, &opts, None).unwrap_err(),
        "cone::solve",
        &[3, 3],
        &[2, 2],
    );
    let mut asym = good.clone();
    asym.p = Some(array![[1.0, 1.0], [0.0, 1.0]]);
    let e = cone::solve(&asym, &opts, None).unwrap_err();
    assert_invalid(e, "cone::solve", &["P is not symmetric"]);
    // The derivative refuses the same program (its solution has the right shape).
    let sol = cone::solve(&good, &opts, None).unwrap();
    let e = ConeDerivative::new(&nan, &sol, 0.5, &DerivativeOptions::default())
        .err()
        .unwrap();
    assert_invalid(e, "cone_program derivative", &["A has a non-finite entry"]);
}

#[test]
fn solver_options_and_warm_starts_are_checked() {
    let prog = small_lp();
    for (eps_abs, eps_rel, message) in [
        (f64::NAN, 1e-7, "eps_abs must be finite and >= 0, got NaN"),
        (1e-7, -1.0, "eps_rel must be finite and >= 0, got -1"),
        (0.0, 0.0, "both 0"),
    ] {
        let opts = SolverOptions {
            eps_abs,
            eps_rel,
            ..Default::default()
        };
        assert_invalid(cone::solve(&prog, &opts, None).unwrap_err(), "cone::solve", &[message]);
    }
    for (rho, max_iter) in [(0.0, 10), (f64::NAN, 10), (0.1, 0)] {
        let opts = SolverOptions {
            rho,
            max_iter,
            ..Default::default()
        };
        assert!(matches!(
            cone::solve(&prog, &opts, None).unwrap_err(),
            Error::InvalidArgument { op: "cone::solve", .. }
        ));
    }
    let (x, y, s) = (array![0.0, f64::NAN], Array1::zeros(3), Array1::zeros(3));
    let warm = WarmStart {
        x: x.view(),
        y: y.view(),
        s: s.view(),
    };
    let e = cone::solve(&prog, &SolverOptions::default(), Some(warm)).unwrap_err();
    assert_invalid(
        e,
        "cone::solve",
        &["warm start x has a non-finite entry NaN at flat index 1"],
    );
}

#[test]
fn cone_helpers_check_the_program_they_are_given() {
    let prog = small_lp();
    let sol = cone::solve(&prog, &SolverOptions::default(), None).unwrap();
    let other = simplex_projection(array![0.2, 0.1, 0.0].view(), 1.0).unwrap();
    let e = sol.objective(&other).unwrap_err();
    assert_shapes(e, "ConeSolution::objective", &[2, 3, 3], &[3, 4, 4]);
    assert!((sol.objective(&prog).unwrap() - -1.0).abs() < 1e-6);
    let e = Residuals::of(&other, sol.x.view(), sol.y.view(), sol.s.view()).unwrap_err();
    assert_shapes(e, "Residuals::of", &[2, 3, 3], &[3, 4, 4]);
    let e = prog.p_times(array![1.0].view()).unwrap_err();
    assert_shapes(e, "ConeProgram::p_times", &[1], &[2]);
    assert_eq!(prog.p_times(array![1.0, 2.0].view()).unwrap(), array![0.0, 0.0]);
}

#[test]
fn cone_derivative_checks_the_selection_and_directions() {
    let prog = small_lp();
    let sol = cone::solve(&prog, &SolverOptions::default(), None).unwrap();
    let e = ConeDerivative::new(&prog, &sol, f64::NAN, &DerivativeOptions::default())
        .err()
        .unwrap();
    assert_invalid(e, "cone_program derivative", &["selection q", "NaN"]);
    let opts = DerivativeOptions {
        boundary_tol: f64::INFINITY,
        ..DerivativeOptions::unchecked()
    };
    let e = ConeDerivative::new(&prog, &sol, 0.5, &opts).err().unwrap();
    assert_invalid(
        e,
        "cone_program derivative",
        &["boundary_tol must be finite and >= 0, got inf"],
    );
    let d = ConeDerivative::new(&prog, &sol, 0.5, &DerivativeOptions::unchecked()).unwrap();
    let (da, db, dc) = (Array2::zeros((3, 2)), array![0.0, f64::NAN, 0.0], Array1::zeros(2));
    let dir = DataDirection {
        p: None,
        a: da.view(),
        b: db.view(),
        c: dc.view(),
    };
    let e = d.forward(&dir).unwrap_err();
    assert_invalid(
        e,
        "cone_program forward",
        &["db has a non-finite entry NaN at flat index 1"],
    );
}
