//! Lasso-type models: the digest's T6, T7, T8; coordinate descent against forward-backward;
//! hypergradients against finite differences and against each other; kinks per policy;
//! bad input.

use clarke_convex::cd::{CdOptions, solve};
use clarke_convex::data::{read_csv, split_centred, synthetic};
use clarke_convex::hypergrad::unrolled::ista_forward;
use clarke_convex::hypergrad::{Criterion, HypergradOptions, Method, ValidationMse, hypergradient};
use clarke_convex::model::{LassoModel, LossScale, Penalty};
use clarke_convex::search::{SearchOptions, Stepper, geometric_grid, gradient_search, grid_search};
use clarke_core::{Error, KinkPolicy};
use clarke_implicit::CheckOutcome;
use ndarray::{Array1, Array2, ArrayView1, array};

fn tight() -> CdOptions {
    CdOptions::default().with_tol(1e-15).with_max_epochs(1_000_000)
}

/// `C(x) = 1/2 ||x - target||^2`.
struct HalfSquared(Array1<f64>);

impl Criterion for HalfSquared {
    fn value(&self, beta: ArrayView1<'_, f64>) -> clarke_core::Result<f64> {
        Ok(0.5 * (&beta - &self.0).mapv(|v| v * v).sum())
    }
    fn gradient(&self, beta: ArrayView1<'_, f64>) -> clarke_core::Result<Array1<f64>> {
        Ok(&beta - &self.0)
    }
}

fn t6_model() -> LassoModel {
    LassoModel::new(array![[2.0]].view(), array![3.0].view())
        .unwrap()
        .with_loss_scale(LossScale::Sum)
}

#[test]
fn t6_one_dimensional_lasso() {
    let model = t6_model();
    let fit = solve(&model, &Penalty::Uniform(1.0), None, &tight()).unwrap();
    assert!((fit.beta[0] - 1.25).abs() < 1e-14);
    // dC/dtheta with C(x) = x is dx/dtheta = -lambda / a^2 = -0.25, for every method.
    let c = HalfSquared(array![fit.beta[0] - 1.0]);
    for m in Method::ALL {
        let hg = hypergradient(&model, &fit, &c, m, &HypergradOptions::default()).unwrap();
        assert!((hg.gradient[0] - -0.25).abs() < 1e-9, "{m}: {}", hg.gradient[0]);
        assert_eq!(hg.check.outcome, CheckOutcome::Certified);
    }
}

#[test]
fn t6_at_the_kink_each_policy_selects_its_element() {
    // |ab| = 6 = lambda: beta = 0 sits at the kink. The set is
    // { -lambda q sign(ab) / (1 - q + q a^2) : q in [0, 1] } (forward-backward step 1).
    let model = t6_model();
    let fit = solve(&model, &Penalty::Uniform(6.0), None, &tight()).unwrap();
    assert_eq!(fit.beta[0], 0.0);
    let c = HalfSquared(array![-1.0]); // grad C = 1: the hypergradient is dx/dtheta
    for q in [0.0, 0.5, 1.0] {
        let expected = -6.0 * q / (1.0 - q + 4.0 * q);
        let options = HypergradOptions::default()
            .with_policy(KinkPolicy::pytorch().with_soft_threshold(q))
            .with_step(1.0);
        for m in [Method::Support, Method::Implicit, Method::Forward] {
            let hg = hypergradient(&model, &fit, &c, m, &options).unwrap();
            assert!(
                (hg.gradient[0] - expected).abs() < 1e-12,
                "{m} q {q}: {} vs {expected}",
                hg.gradient[0]
            );
            assert_eq!(hg.check.kinks, vec![0]);
            assert_eq!(hg.check.equicorrelation, vec![0]);
            assert!(hg.check.support.is_empty());
            let rec = &hg.kinks.records()[0];
            assert_eq!(rec.kink_indices, vec![0]);
            assert_eq!(rec.selection, clarke_core::Selection::Slope(q));
            if m == Method::Implicit {
                // The generic layer's own check sees the prox's kink and walks both of its
                // selections: I - J = 1 + 3 d > 0 for d in [0, 1].
                let layer = hg.layer_check.as_ref().unwrap();
                assert_eq!(layer.outcome, CheckOutcome::Certified, "{layer}");
                assert_eq!(
                    (layer.kink_elements, layer.flippable, layer.vertices),
                    (1, 1, 2),
                    "{layer}"
                );
                assert!(layer.exhaustive);
            }
        }
    }
}

#[test]
fn t7_two_dimensional_lasso_prop5() {
    let a = array![[1.0, 0.5], [0.3, 1.0], [0.2, -0.4]];
    let b = array![2.0, 0.5, -0.3];
    let model = LassoModel::new(a.view(), b.view())
        .unwrap()
        .with_loss_scale(LossScale::Sum);
    let fit = solve(&model, &Penalty::Uniform(0.5), None, &tight()).unwrap();
    assert!((fit.beta[0] - 1.4355 / 1.0749).abs() < 1e-12);
    assert!((fit.beta[1] - 0.1208 / 1.0749).abs() < 1e-12);
    for c in fit.correlations.iter() {
        assert!((c.abs() - 0.5).abs() < 1e-12);
    }
    // dx/dtheta = -0.5 (A^T A)^{-1} (1, 1): each component by a unit criterion.
    let dx = [-0.320960, -0.190715];
    for (k, &d) in dx.iter().enumerate() {
        let mut t = fit.beta.clone();
        t[k] -= 1.0;
        let c = HalfSquared(t);
        let hg = hypergradient(&model, &fit, &c, Method::Support, &HypergradOptions::default()).unwrap();
        // grad C = e_k, so the hypergradient is dx_k/dtheta.
        assert!((hg.gradient[0] - d).abs() < 1e-6, "{k}: {}", hg.gradient[0]);
    }
    let c = HalfSquared(array![1.0, 0.0]);
    for m in Method::ALL {
        let hg = hypergradient(&model, &fit, &c, m, &HypergradOptions::default()).unwrap();
        assert!((hg.gradient[0] - -0.1291065).abs() < 1e-7, "{m}: {}", hg.gradient[0]);
        assert_eq!(hg.check.support, vec![0, 1]);
    }
    // And central finite differences of C(x_hat(theta)).
    let h = 1e-5;
    let cval = |theta: f64| {
        let f = solve(&model, &Penalty::Uniform(theta.exp()), None, &tight()).unwrap();
        c.value(f.beta.view()).unwrap()
    };
    let fd = (cval(0.5f64.ln() + h) - cval(0.5f64.ln() - h)) / (2.0 * h);
    assert!((fd - -0.1291065).abs() < 1e-7, "{fd}");
}

#[test]
fn t8_piggyback_on_ista() {
    let model = t6_model();
    for k in 1..=4 {
        let run = ista_forward(&model, &Penalty::Uniform(1.0), None, 0.2, 0.0, k, 0.0).unwrap();
        let f = 1.0 - 0.2f64.powi(k as i32);
        assert!((run.beta[0] - 1.25 * f).abs() < 1e-14, "x_{k} = {}", run.beta[0]);
        assert!(
            (run.columns[0].1[0] - -0.25 * f).abs() < 1e-14,
            "J_{k} = {}",
            run.columns[0].1[0]
        );
        assert_eq!(run.iterations, k);
    }
}

/// Synthetic train and validation sets (different seeds, same coefficients).
fn problem(n: usize, p: usize, k: usize) -> (LassoModel, ValidationMse) {
    let train = synthetic(n, p, k, 0.5, 1);
    let val = synthetic(n, p, k, 0.5, 2);
    let model = LassoModel::new(train.x.view(), train.y.view()).unwrap();
    let crit = ValidationMse::new(val.x.view(), val.y.view()).unwrap();
    (model, crit)
}

fn central_difference(model: &LassoModel, crit: &ValidationMse, pen: &Penalty, index: usize, h: f64) -> f64 {
    let eval = |delta: f64| {
        let mut theta = pen.log();
        theta[index] += delta;
        let p = pen.from_log_like(theta.view()).unwrap();
        let f = solve(model, &p, None, &tight()).unwrap();
        assert!(f.gap <= 1e-12, "gap {}", f.gap);
        crit.value(f.beta.view()).unwrap()
    };
    (eval(h) - eval(-h)) / (2.0 * h)
}

fn assert_rel(a: f64, b: f64, tol: f64, what: &str) {
    let scale = a.abs().max(b.abs()).max(1e-300);
    assert!(
        (a - b).abs() <= tol * scale,
        "{what}: {a} vs {b} (rel {:e})",
        (a - b).abs() / scale
    );
}

#[test]
fn hypergradients_match_finite_differences_and_each_other() {
    let (model, crit) = problem(60, 25, 5);
    let lmax = model.lambda_max();
    for f in [0.5, 0.2, 0.05] {
        let pen = Penalty::Uniform(f * lmax);
        let fit = solve(&model, &pen, None, &tight()).unwrap();
        let fd = central_difference(&model, &crit, &pen, 0, 1e-6);
        let mut grads = Vec::new();
        for m in Method::ALL {
            let hg = hypergradient(&model, &fit, &crit, m, &HypergradOptions::default()).unwrap();
            assert_eq!(hg.check.outcome, CheckOutcome::Certified);
            assert!(hg.check.kinks.is_empty());
            assert_rel(hg.gradient[0], fd, 1e-5, &format!("{m} vs FD at {f} lambda_max"));
            grads.push(hg.gradient[0]);
        }
        assert_rel(grads[0], grads[1], 1e-6, "implicit vs support");
        assert_rel(grads[2], grads[1], 1e-6, "unrolled vs support");
    }
}

#[test]
fn weighted_lasso_hypergradient_matches_finite_differences() {
    let (model, crit) = problem(50, 12, 4);
    let lmax = model.lambda_max();
    let lambdas = Array1::from_iter((0..12).map(|j| lmax * (0.05 + 0.02 * j as f64)));
    let pen = Penalty::PerFeature(lambdas);
    let fit = solve(&model, &pen, None, &tight()).unwrap();
    let support = fit.support();
    assert!(support.len() >= 2);
    let hgs: Vec<_> = Method::ALL
        .iter()
        .map(|&m| hypergradient(&model, &fit, &crit, m, &HypergradOptions::default()).unwrap())
        .collect();
    for j in 0..12 {
        let fd = central_difference(&model, &crit, &pen, j, 1e-6);
        if support.contains(&j) {
            assert_rel(hgs[1].gradient[j], fd, 1e-5, &format!("feature {j}"));
        } else {
            assert_eq!(hgs[1].gradient[j], 0.0);
            assert!(fd.abs() < 1e-9, "feature {j} off the support: FD {fd}");
        }
        assert!((hgs[0].gradient[j] - hgs[1].gradient[j]).abs() <= 1e-6 * hgs[1].gradient[j].abs().max(1e-9));
        assert!((hgs[2].gradient[j] - hgs[1].gradient[j]).abs() <= 1e-6 * hgs[1].gradient[j].abs().max(1e-9));
    }
}

#[test]
fn elastic_net_hypergradient_matches_finite_differences() {
    let train = synthetic(40, 30, 5, 0.5, 3);
    let val = synthetic(40, 30, 5, 0.5, 4);
    let model = LassoModel::new(train.x.view(), train.y.view())
        .unwrap()
        .with_l2(0.3)
        .unwrap();
    let crit = ValidationMse::new(val.x.view(), val.y.view()).unwrap();
    let pen = Penalty::Uniform(0.1 * model.lambda_max());
    let fit = solve(&model, &pen, None, &tight()).unwrap();
    let fd = central_difference(&model, &crit, &pen, 0, 1e-6);
    for m in Method::ALL {
        let hg = hypergradient(&model, &fit, &crit, m, &HypergradOptions::default()).unwrap();
        assert_rel(hg.gradient[0], fd, 1e-5, &format!("{m}"));
    }
}

#[test]
fn coordinate_descent_agrees_with_forward_backward() {
    let (model, _) = problem(40, 60, 6);
    for &(f, l2) in &[(0.3, 0.0), (0.05, 0.0), (0.1, 0.5)] {
        let model = model.clone().with_l2(l2).unwrap();
        let pen = Penalty::Uniform(f * model.lambda_max());
        let fit = solve(&model, &pen, None, &tight()).unwrap();
        assert!(fit.is_converged());
        let fb = ista_forward(&model, &pen, None, 1.0 / model.lipschitz(), 0.0, 2_000_000, 1e-14).unwrap();
        assert!(fb.converged);
        let diff = (&fit.beta - &fb.beta).iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(diff < 1e-8, "f {f} l2 {l2}: max diff {diff}");
        // Working sets and plain cyclic descent reach the same point.
        let plain = solve(&model, &pen, None, &tight().with_working_set(false)).unwrap();
        // (Both are certified to a gap of 1e-15 ||y||^2 / n; coefficients agree to about
        // the square root of that.)
        let diff = (&fit.beta - &plain.beta).iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(diff < 1e-6, "working set vs cyclic: {diff}");
        assert!((fit.objective - plain.objective).abs() <= fit.gap + plain.gap + 1e-15);
    }
}

#[test]
fn duality_gap_certifies_and_budget_is_reported() {
    let (model, _) = problem(40, 60, 6);
    let pen = Penalty::Uniform(0.05 * model.lambda_max());
    let fit = solve(&model, &pen, None, &CdOptions::default()).unwrap();
    assert!(fit.is_converged() && fit.gap <= fit.tolerance);
    let short = solve(&model, &pen, None, &tight().with_max_epochs(2)).unwrap();
    assert!(!short.is_converged());
    let e = short.into_result().unwrap_err();
    assert!(matches!(e, Error::NotConverged { iterations: 2, .. }), "{e}");
    assert!(e.to_string().contains("coordinate descent"));
    // Warm start from the solution: converged without a single epoch.
    let warm = solve(&model, &pen, Some(fit.beta.view()), &CdOptions::default()).unwrap();
    assert_eq!(warm.epochs, 0);
}

#[test]
fn rank_deficient_equicorrelation_set_is_reported() {
    // Two identical columns: X_E^T X_E is singular, so the Lasso solution is not unique.
    let x = array![[1.0, 1.0, 0.3], [2.0, 2.0, -1.0], [0.5, 0.5, 0.4], [-1.0, -1.0, 2.0]];
    let y = array![1.0, 3.0, 0.2, -1.5];
    let model = LassoModel::new(x.view(), y.view()).unwrap();
    let fit = solve(&model, &Penalty::Uniform(0.1), None, &tight()).unwrap();
    let (check, _) = clarke_convex::hypergrad::support::analyze(&model, &fit, &HypergradOptions::default()).unwrap();
    assert_eq!(check.outcome, CheckOutcome::Violated, "{check}");
    assert!(check.detail.contains("rank deficient"));
    assert!(check.equicorrelation.contains(&0) && check.equicorrelation.contains(&1));
    let c = HalfSquared(Array1::zeros(3));
    match hypergradient(&model, &fit, &c, Method::Support, &HypergradOptions::default()) {
        // Only one of the twin columns is in the support: the solved block is regular, the
        // answer comes back with the violation in its check.
        Ok(hg) => {
            assert!(hg.check.support.len() < hg.check.equicorrelation.len());
            assert_eq!(hg.check.outcome, CheckOutcome::Violated);
        }
        // Both twins are in the support: the solved block is singular, the call refuses.
        Err(e) => {
            assert!(matches!(e, Error::HypothesisViolated { .. }), "{e}");
            assert!(e.to_string().contains("singular"), "{e}");
        }
    }
}

fn small_model() -> LassoModel {
    let x = array![[1.0, 0.5], [0.3, 1.0], [0.2, -0.4]];
    let y = array![2.0, 0.5, -0.3];
    LassoModel::new(x.view(), y.view()).unwrap()
}

#[test]
fn bad_input_lambda_not_positive() {
    let model = small_model();
    for bad in [0.0, -1.0, f64::NAN] {
        let e = solve(&model, &Penalty::Uniform(bad), None, &CdOptions::default()).unwrap_err();
        assert!(e.to_string().contains("coordinate descent"), "{e}");
        assert!(e.to_string().contains("lambda must be finite and > 0"), "{e}");
    }
    let e = solve(
        &model,
        &Penalty::PerFeature(array![1.0, 0.0]),
        None,
        &CdOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("lambda[1] = 0"), "{e}");
    let e = gradient_search(
        &model,
        &HalfSquared(Array1::zeros(2)),
        &Penalty::Uniform(-2.0),
        &SearchOptions::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("gradient_search") && e.to_string().contains("-2"),
        "{e}"
    );
}

#[test]
fn bad_input_nan_in_data() {
    let x = array![[1.0, 0.5], [0.3, f64::NAN], [0.2, -0.4]];
    let e = LassoModel::new(x.view(), array![2.0, 0.5, -0.3].view()).unwrap_err();
    assert!(e.to_string().contains("LassoModel::new"), "{e}");
    assert!(
        e.to_string().contains("NaN") && e.to_string().contains("row 1, column 1"),
        "{e}"
    );
    let x = array![[1.0, 0.5], [0.3, 1.0], [0.2, -0.4]];
    let e = LassoModel::new(x.view(), array![2.0, f64::INFINITY, -0.3].view()).unwrap_err();
    assert!(e.to_string().contains("y has a non-finite value inf at row 1"), "{e}");
    let e = ValidationMse::new(x.view(), array![f64::NAN, 0.0, 1.0].view()).unwrap_err();
    assert!(
        e.to_string().contains("ValidationMse::new") && e.to_string().contains("NaN"),
        "{e}"
    );
}

#[test]
fn bad_input_mismatched_lengths() {
    let x = array![[1.0, 0.5], [0.3, 1.0], [0.2, -0.4]];
    let e = LassoModel::new(x.view(), array![1.0, 2.0].view()).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert!(e.to_string().contains("3 rows but y has 2"), "{e}");
    let model = small_model();
    let e = solve(&model, &Penalty::PerFeature(array![1.0]), None, &CdOptions::default()).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { .. }) && e.to_string().contains("[1] vs [2]"),
        "{e}"
    );
    let e = solve(
        &model,
        &Penalty::Uniform(0.1),
        Some(array![0.0, 0.0, 0.0].view()),
        &CdOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("warm start"), "{e}");
    // A criterion over another number of features.
    let fit = solve(&model, &Penalty::Uniform(0.1), None, &CdOptions::default()).unwrap();
    let val = ValidationMse::new(Array2::eye(3).view(), array![1.0, 0.0, 0.0].view()).unwrap();
    let e = hypergradient(&model, &fit, &val, Method::Support, &HypergradOptions::default()).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    // Fewer validation features than the model's: an error, not an index out of bounds; the
    // criterion's own methods (no trait import needed) say the same.
    let narrow = ValidationMse::new(array![[1.0], [2.0]].view(), array![1.0, 0.0].view()).unwrap();
    for method in Method::ALL {
        let e = hypergradient(&model, &fit, &narrow, method, &HypergradOptions::default()).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{method}: {e}");
    }
    // Vectors of another length to the model's helpers: errors, not index panics.
    let e = model.predict(array![1.0, 2.0, 3.0].view()).unwrap_err();
    assert!(e.to_string().contains("LassoModel::predict"), "{e}");
    assert_eq!(model.predict(array![0.0, 0.0].view()).unwrap().len(), model.n());
    let at_fit = model.objective(fit.beta.view(), &Penalty::Uniform(0.1)).unwrap();
    let at_zero = model
        .objective(array![0.0, 0.0].view(), &Penalty::Uniform(0.1))
        .unwrap();
    assert!(at_fit < at_zero, "the fit minimises P: {at_fit} vs {at_zero} at zero");
    let e = model.objective(array![1.0].view(), &Penalty::Uniform(0.1)).unwrap_err();
    assert!(e.to_string().contains("LassoModel::predict"), "{e}");
    let e = model.objective(fit.beta.view(), &Penalty::Uniform(-1.0)).unwrap_err();
    assert!(e.to_string().contains("LassoModel::objective"), "{e}");
    let e = Penalty::Uniform(1.0)
        .from_log_like(ndarray::Array1::<f64>::zeros(0).view())
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let e = Penalty::PerFeature(array![1.0, 1.0])
        .from_log_like(array![0.0].view())
        .unwrap_err();
    assert!(e.to_string().contains("one entry per hyperparameter"), "{e}");
    let e = narrow.value(fit.beta.view()).unwrap_err();
    assert!(e.to_string().contains("one entry per validation feature"), "{e}");
    assert!(narrow.gradient(array![0.5].view()).is_ok());
}

#[test]
fn bad_input_constant_column() {
    let x = array![[1.0, 0.5], [1.0, 1.0], [1.0, -0.4]];
    let e = LassoModel::new(x.view(), array![2.0, 0.5, -0.3].view()).unwrap_err();
    assert!(
        e.to_string().contains("column 0 of X is constant (every row is 1)"),
        "{e}"
    );
}

#[test]
fn bad_input_empty_validation_set() {
    let empty = Array2::<f64>::zeros((0, 2));
    let e = ValidationMse::new(empty.view(), Array1::zeros(0).view()).unwrap_err();
    assert!(e.to_string().contains("validation set is empty"), "{e}");
    assert!(e.to_string().contains("0 x 2"), "{e}");
}

#[test]
fn bad_input_other_settings() {
    let e = small_model().with_l2(-1.0).unwrap_err();
    assert!(e.to_string().contains("l2 must be finite and >= 0, got -1"), "{e}");
    let model = small_model();
    let fit = solve(&model, &Penalty::Uniform(0.1), None, &CdOptions::default()).unwrap();
    let e = hypergradient(
        &model,
        &fit,
        &HalfSquared(Array1::zeros(2)),
        Method::Unrolled,
        &HypergradOptions::default().with_step(-1.0),
    )
    .unwrap_err();
    assert!(e.to_string().contains("step must be finite and > 0, got -1"), "{e}");
}

#[test]
fn unrolled_budget_exhaustion_is_an_error_with_the_change() {
    let (model, crit) = problem(60, 25, 5);
    let fit = solve(&model, &Penalty::Uniform(0.05 * model.lambda_max()), None, &tight()).unwrap();
    let options = HypergradOptions {
        unrolled_max_iter: 3,
        unrolled_warm: false,
        ..Default::default()
    };
    let e = hypergradient(&model, &fit, &crit, Method::Unrolled, &options).unwrap_err();
    assert!(matches!(e, Error::NotConverged { iterations: 3, .. }), "{e}");
    assert!(e.to_string().contains("unrolled ISTA"), "{e}");
}

#[test]
fn implicit_layer_reports_its_own_check() {
    let (model, crit) = problem(60, 25, 5);
    let fit = solve(&model, &Penalty::Uniform(0.2 * model.lambda_max()), None, &tight()).unwrap();
    let hg = hypergradient(&model, &fit, &crit, Method::Implicit, &HypergradOptions::default()).unwrap();
    let layer = hg.layer_check.expect("the generic method carries the layer's check");
    assert_eq!(layer.outcome, CheckOutcome::Certified, "{layer}");
    // I - J_beta restricted to the support has the singular values of gamma H_SS: positive.
    assert!(layer.sigma_min.unwrap() > 0.0);
}

#[test]
fn gradient_search_improves_on_its_start_and_grid_keeps_its_best() {
    let (model, crit) = problem(80, 200, 8);
    let lmax = model.lambda_max();
    let grid = grid_search(&model, &crit, &geometric_grid(lmax, 0.01, 15), &CdOptions::default()).unwrap();
    assert!(grid.points.iter().all(|p| p.value >= grid.best_value));
    let init = Penalty::Uniform(0.5 * lmax);
    let start = crit
        .value(solve(&model, &init, None, &CdOptions::default()).unwrap().beta.view())
        .unwrap();
    let res = gradient_search(&model, &crit, &init, &SearchOptions::default()).unwrap();
    assert!(res.best_value < start, "{} vs {start}", res.best_value);
    // The search ends near a stationary point that is at least as good as the grid (the
    // grid's spacing is coarse), up to a small margin.
    assert!(
        res.best_value <= grid.best_value * 1.01,
        "{} vs {}",
        res.best_value,
        grid.best_value
    );
    let adam = SearchOptions {
        stepper: Stepper::Adam { lr: 0.2 },
        ..Default::default()
    };
    let res = gradient_search(
        &model,
        &crit,
        &Penalty::PerFeature(Array1::from_elem(200, 0.5 * lmax)),
        &adam,
    )
    .unwrap();
    assert!(res.best_value < start);
}

/// A seeded classification problem: labels from a sparse logistic model.
fn logistic_problem(n: usize, p: usize, seed: u64) -> (Array2<f64>, Array1<f64>) {
    let reg = synthetic(n, p, 4, 0.0, seed);
    let y = reg.y.mapv(|m| if m + 0.3 * (m * 7.0).sin() > 0.0 { 1.0 } else { 0.0 });
    (reg.x, y)
}

#[test]
fn sparse_logistic_regression_hypergradients_match_finite_differences() {
    use clarke_convex::hypergrad::ValidationLogLoss;
    let (xt, yt) = logistic_problem(80, 20, 5);
    let (xv, yv) = logistic_problem(60, 20, 6);
    let model = LassoModel::logistic(xt.view(), yt.view()).unwrap();
    let crit = ValidationLogLoss::new(xv.view(), yv.view()).unwrap();
    let lmax = model.lambda_max();
    // beta = 0 just above lambda_max, non-zero below it.
    let above = solve(&model, &Penalty::Uniform(1.01 * lmax), None, &tight()).unwrap();
    assert!(above.support().is_empty());
    for f in [0.3, 0.1] {
        let pen = Penalty::Uniform(f * lmax);
        let fit = solve(&model, &pen, None, &tight()).unwrap();
        assert!(fit.is_converged() && fit.gap <= 1e-12, "gap {}", fit.gap);
        // Coordinate descent and proximal gradient reach the same point.
        let fb = ista_forward(&model, &pen, None, 1.0 / model.lipschitz(), 0.0, 2_000_000, 1e-14).unwrap();
        let diff = (&fit.beta - &fb.beta).iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(diff < 1e-7, "CD vs FB: {diff}");
        let eval = |h: f64| {
            let p = Penalty::Uniform((f * lmax).ln().exp() * h.exp());
            crit.value(solve(&model, &p, None, &tight()).unwrap().beta.view())
                .unwrap()
        };
        let fd = (eval(1e-6) - eval(-1e-6)) / 2e-6;
        let mut grads = Vec::new();
        for m in Method::ALL {
            let hg = hypergradient(&model, &fit, &crit, m, &HypergradOptions::default()).unwrap();
            assert_rel(hg.gradient[0], fd, 1e-5, &format!("logistic {m} at {f} lambda_max"));
            grads.push(hg.gradient[0]);
        }
        assert_rel(grads[0], grads[1], 1e-6, "logistic implicit vs support");
        assert_rel(grads[2], grads[1], 1e-6, "logistic unrolled vs support");
    }
    let e = LassoModel::logistic(xt.view(), yt.mapv(|v| 2.0 * v).view()).unwrap_err();
    assert!(e.to_string().contains("labels must be 0 or 1, got 2"), "{e}");
    let e = LassoModel::logistic(xt.view(), Array1::zeros(80).view()).unwrap_err();
    assert!(e.to_string().contains("both classes"), "{e}");
}

#[test]
fn the_forward_method_agrees_with_the_others_on_diabetes() {
    // The example's split: 300 training rows, the rest for validation, centred.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/diabetes.csv");
    let data = read_csv(path).unwrap();
    let n = data.x.nrows();
    let split = split_centred(&data, 0..300, 300..n).unwrap();
    let model = LassoModel::new(split.x_train.view(), split.y_train.view()).unwrap();
    let crit = ValidationMse::new(split.x_val.view(), split.y_val.view()).unwrap();
    let lmax = model.lambda_max();
    let p = model.p();
    let per_feature = Penalty::PerFeature(Array1::from_iter((0..p).map(|j| lmax * (0.01 + 0.004 * j as f64))));
    for pen in [
        Penalty::Uniform(0.1 * lmax),
        Penalty::Uniform(0.01 * lmax),
        Penalty::Uniform(0.001 * lmax),
        per_feature,
    ] {
        let fit = solve(&model, &pen, None, &tight()).unwrap();
        let forward = hypergradient(&model, &fit, &crit, Method::Forward, &HypergradOptions::default()).unwrap();
        assert!(forward.iterations > 0, "{pen:?}: no sweep ran");
        // Unrolled forward mode carries p tangents for a per-feature penalty: seconds in a
        // debug build, and nothing the uniform cases do not already compare.
        let others: &[Method] = match pen {
            Penalty::Uniform(_) => &[Method::Support, Method::Implicit, Method::Unrolled],
            Penalty::PerFeature(_) => &[Method::Support, Method::Implicit],
        };
        for &m in others {
            let other = hypergradient(&model, &fit, &crit, m, &HypergradOptions::default()).unwrap();
            for (a, b) in forward.gradient.iter().zip(&other.gradient) {
                assert_rel(*a, *b, 1e-8, &format!("forward vs {m} at {pen:?}"));
            }
        }
    }
}

#[test]
fn the_forward_method_reports_sweeps_that_do_not_converge() {
    let (model, crit) = problem(60, 25, 5);
    let pen = Penalty::Uniform(0.05 * model.lambda_max());
    let fit = solve(&model, &pen, None, &tight()).unwrap();
    let options = HypergradOptions {
        forward_max_sweeps: 1,
        ..HypergradOptions::default()
    };
    let err = hypergradient(&model, &fit, &crit, Method::Forward, &options).unwrap_err();
    match err {
        Error::NotConverged { solver, iterations, .. } => {
            assert!(solver.contains("forward"), "{solver}");
            assert_eq!(iterations, 1);
        }
        other => panic!("expected NotConverged, got {other}"),
    }
    let bad = HypergradOptions {
        forward_tol: 0.0,
        ..HypergradOptions::default()
    };
    let err = hypergradient(&model, &fit, &crit, Method::Forward, &bad).unwrap_err();
    assert!(err.to_string().contains("forward_tol"), "{err}");
}
