//! The support-restricted hypergradient of Prop. 5.
//!
//! At a solution `beta_hat` with correlations `c = w X^T (y - X beta_hat)`, the
//! forward-backward map `T(beta) = S_{gamma lambda}(beta - gamma grad f(beta))` has the
//! conservative Jacobian `J_beta = D (I - gamma H)`, `J_theta = -gamma D diag(lambda
//! sign(c))` (with respect to `theta = log lambda`), `H = w X^T diag(s) X + l2 I` the
//! Hessian of the smooth part (`s = 1` for the squared loss, `sigmoid (1 - sigmoid)` for the
//! logistic loss), `D = diag(q)`,
//! `q_j = 1` on the support, the policy's selection on the kinks `E \ S`, `0` elsewhere.
//! The adjoint system `(I - J_beta)^T v = grad C` is the identity off `A = {q > 0}`, so only
//! an `|A| x |A|` system is solved:
//!
//! - `q` in `{0, 1}` everywhere: `H_AA v_A = grad_A C` (Cholesky) and
//!   `dC/dtheta_j = -lambda_j sign(c_j) v_j`. The step cancels.
//! - some `0 < q < 1`: `(I - D_A + gamma D_A H_AA)^T v_A = grad_A C` (LU) and
//!   `dC/dtheta_j = -gamma lambda_j q_j sign(c_j) v_j`.
//!
//! The hypothesis of Prop. 5 (`X_E^T X_E` full rank; with a ridge term it always holds) is
//! checked from the singular values of `w X_E^T X_E + l2 I`. When it fails, the result still
//! comes back if the block actually solved (`A`, smaller than `E` when `q = 0` at kinks) is
//! well conditioned, with the violation in its check; otherwise the call refuses with
//! [`Error::HypothesisViolated`].
//!
//! Up to [`HypergradOptions::dense_support_limit`] features the `|E| x |E|` matrix is formed
//! (one dense column scattered and dotted with the others, so a sparse design costs
//! `O(|E| nnz_E)`) and factored; its spectrum and the certificate come from
//! [`super::hessian`]. Above it nothing `|E| x |E|` is formed: the products `H v = w X_I^T
//! diag(s) X_I v + l2 v` run on the columns, the check is a Lanczos estimate (a warning,
//! not a certificate), and the system is solved by conjugate gradients (GMRES for a
//! fractional selection, whose matrix is not symmetric).

use std::sync::Arc;

use clarke_core::{Error, KinkLedger, KinkScan, Result, Selection};
use clarke_implicit::CheckOutcome;
use clarke_solve::{FnOperator, SolveOptions, cg, cholesky_solve, gmres, lu_solve_transpose};
use ndarray::{Array1, ArrayView1, ArrayViewMut1};

use super::hessian::{MATRIX_FREE_TOL, ShiftedFactor, SpectrumMethod, gram, gram_operator, spectrum, unconverged};

use super::{Criterion, HypergradOptions, Hypergradient, Method, Start, SupportCheck, check_fit};
use crate::cd::Fit;
use crate::model::{LassoModel, Loss, Penalty};

/// The sets of Prop. 5 at a fit, the rank check, and the kink ledger.
///
/// The fit need not have converged (the sets of an iterate are informative too), but it
/// must be one of `model`.
///
/// # Errors
/// Invalid options, a fit of another model (as [`super::hypergradient`]), a failed singular
/// value decomposition.
pub fn analyze(model: &LassoModel, fit: &Fit, options: &HypergradOptions) -> Result<(SupportCheck, KinkLedger)> {
    options.validate()?;
    check_fit(model, fit)?;
    sets(model, fit, options)
}

/// [`analyze`] for checked arguments.
pub(crate) fn sets(model: &LassoModel, fit: &Fit, options: &HypergradOptions) -> Result<(SupportCheck, KinkLedger)> {
    sets_with_factor(model, fit, options).map(|(check, ledger, _)| (check, ledger))
}

/// [`sets`], with the Cholesky factor of the certificate on `E` when there is one (for the
/// support method's solve).
pub(crate) fn sets_with_factor(
    model: &LassoModel,
    fit: &Fit,
    options: &HypergradOptions,
) -> Result<(SupportCheck, KinkLedger, Option<Arc<ShiftedFactor>>)> {
    let q = options.policy.soft_threshold;
    let pen = &fit.penalty;
    let mut support = Vec::new();
    let mut equi = Vec::new();
    let mut kinks = Vec::new();
    for j in 0..model.p() {
        let c = fit.correlations[j].abs();
        let l = pen.at(j);
        if fit.beta[j] != 0.0 {
            support.push(j);
            equi.push(j);
        } else if c >= l * (1.0 - options.kink_tol) {
            equi.push(j);
            kinks.push(j);
        }
    }
    let curvature = curvature_at(model, fit);
    let found = if equi.is_empty() {
        None
    } else {
        Some(spectrum(model, &equi, curvature.as_deref(), options)?)
    };
    let (sigma_min, sigma_max) = found
        .as_ref()
        .map_or((f64::INFINITY, f64::INFINITY), |f| (f.sigma_min, f.sigma_max));
    let method = found.as_ref().map(|f| f.method);
    let factor = found.and_then(|f| f.factor);
    let full_rank = equi.is_empty() || sigma_min > options.rank_tol * sigma_max;
    let how = match method {
        Some(SpectrumMethod::Cholesky { lower }) => {
            format!(" (proven: sigma_min > {lower:.3e} by a Cholesky factorisation; sigma_min by inverse iteration)")
        }
        _ => String::new(),
    };
    let estimated = matches!(method, Some(SpectrumMethod::Lanczos { .. }));
    let (outcome, detail) = if estimated {
        let converged = matches!(method, Some(SpectrumMethod::Lanczos { converged: true }));
        (
            CheckOutcome::Warning,
            format!(
                "|E| = {} is above the dense limit {}: matrix-free Lanczos estimates sigma_min / sigma_max = {:.3e}{}; an estimate is not a certificate",
                equi.len(),
                options.dense_support_limit,
                sigma_min / sigma_max,
                if converged {
                    ""
                } else {
                    " (the estimate did not converge)"
                }
            ),
        )
    } else if full_rank {
        let d = if kinks.is_empty() {
            format!("X_E^T X_E has full rank{how} and no feature sits at a kink: the derivative is unique")
        } else {
            format!(
                "X_E^T X_E has full rank{how}; {} feature(s) sit exactly at the kink (E \\ S = {:?}), so the derivative is a set and the selection q = {q} picks one element",
                kinks.len(),
                kinks
            )
        };
        (CheckOutcome::Certified, d)
    } else {
        (
            CheckOutcome::Violated,
            format!(
                "X_E^T X_E is rank deficient (sigma_min / sigma_max = {:.3e} <= {:e}): the Lasso solution may not be unique and Prop. 5 does not apply",
                sigma_min / sigma_max,
                options.rank_tol
            ),
        )
    };
    // The equicorrelated features off the support sit at the kink (within `kink_tol`, which
    // the analysis treats as on it).
    let mut scan = KinkScan::new(0.0, 0.0);
    scan.skip(model.p() - kinks.len());
    for &j in &kinks {
        scan.visit(j, 0.0);
    }
    let record = scan.finish(
        0,
        "lasso_equicorrelation",
        &[model.p()],
        Selection::Slope(q),
        Some((0.0, 1.0)),
    );
    let ledger = KinkLedger::from_records(options.policy.label(), vec![record]);
    Ok((
        SupportCheck {
            support,
            equicorrelation: equi,
            kinks,
            selection: q,
            sigma_min,
            sigma_max,
            outcome,
            detail,
        },
        ledger,
        factor,
    ))
}

/// The loss curvature at the fit's rows (`None` for the squared loss, where it is 1).
pub(crate) fn curvature_at(model: &LassoModel, fit: &Fit) -> Option<Vec<f64>> {
    match model.loss() {
        Loss::Squared => None,
        Loss::Logistic => Some(model.curvature(fit.residual.as_slice().expect("contiguous"))),
    }
}

/// `A`, the coordinates where the tangent can be non-zero, with their selection `q_a`: the
/// support (`q = 1`) and, when the policy's `q` is positive, the kinks `E \ S` (`q`), in
/// increasing order.
pub(crate) fn active_set(check: &SupportCheck) -> Vec<(usize, f64)> {
    let q = check.selection;
    let mut active: Vec<(usize, f64)> = check.support.iter().map(|&j| (j, 1.0)).collect();
    if q > 0.0 {
        active.extend(check.kinks.iter().map(|&j| (j, q)));
        active.sort_by_key(|a| a.0);
    }
    active
}

/// `sign(c_j)` (0 at 0).
pub(crate) fn sign(c: f64) -> f64 {
    if c > 0.0 {
        1.0
    } else if c < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The Prop. 5 hypergradient (see the module documentation).
///
/// # Errors
/// As [`super::hypergradient`]; [`Error::HypothesisViolated`] when the system to solve is
/// singular.
pub fn hypergradient(
    model: &LassoModel,
    fit: &Fit,
    criterion: &dyn Criterion,
    options: &HypergradOptions,
) -> Result<Hypergradient> {
    let Start {
        clock: start,
        check,
        kinks,
        grad: g,
        factor,
    } = Start::at(model, fit, criterion, options)?;
    let active = active_set(&check);
    let idx: Vec<usize> = active.iter().map(|a| a.0).collect();
    let qa: Vec<f64> = active.iter().map(|a| a.1).collect();
    let fractional = qa.iter().any(|&v| v < 1.0);
    let pen = &fit.penalty;
    let mut grad = Array1::zeros(pen.len());
    if !idx.is_empty() {
        let curvature = curvature_at(model, fit);
        let ga = Array1::from_iter(idx.iter().map(|&j| g[j]));
        // The certificate's factor of H_EE solves the system when it is the one on E.
        let reused = match (&factor, fractional) {
            (Some(f), false) if idx == check.equicorrelation => {
                f.solve(model, &idx, curvature.as_deref(), ga.view(), MATRIX_FREE_TOL)
            }
            _ => None,
        };
        let matrix_free = idx.len() > options.dense_support_limit;
        let h = (!matrix_free && reused.is_none()).then(|| gram(model, &idx, curvature.as_deref()));
        let refuse = |e: Error| Error::HypothesisViolated {
            node: "lasso hypergradient (support)".to_string(),
            detail: format!(
                "the restricted system on {} feature(s) is singular ({e}); {}",
                idx.len(),
                check
            ),
        };
        if check.outcome == CheckOutcome::Violated {
            // The solved system H_AA is a principal block of H_EE: when it is the whole of it
            // (or itself rank deficient) there is no derivative to return.
            let block = spectrum(model, &idx, curvature.as_deref(), options)?;
            let (lo, hi) = (block.sigma_min, block.sigma_max);
            if idx.len() == check.equicorrelation.len() || lo <= options.rank_tol * hi {
                return Err(Error::HypothesisViolated {
                    node: "lasso hypergradient (support)".to_string(),
                    detail: format!(
                        "the system on the {} selected feature(s) is singular (sigma_min / sigma_max = {:.3e}); {}",
                        idx.len(),
                        lo / hi,
                        check
                    ),
                });
            }
        }
        let (v, scale) = match (reused, &h, fractional) {
            (Some(v), _, _) => (v, 1.0),
            (None, Some(h), true) => {
                let gamma = options.step_for(model)?;
                let mut m = h.mapv(|x| gamma * x);
                for (a, &qv) in qa.iter().enumerate() {
                    for b in 0..idx.len() {
                        m[[a, b]] *= qv;
                    }
                    m[[a, a]] += 1.0 - qv;
                }
                (lu_solve_transpose(m.view(), ga.view()).map_err(refuse)?, gamma)
            }
            (None, Some(h), false) => (cholesky_solve(h.view(), ga.view()).map_err(refuse)?, 1.0),
            (None, None, false) => {
                let op = gram_operator(model, &idx, curvature.as_deref());
                let opts = SolveOptions::default()
                    .with_tol(MATRIX_FREE_TOL)
                    .with_max_iter(10 * idx.len());
                let (v, report) = cg(&op, ga.view(), None, &opts)?;
                if !report.is_converged() {
                    return Err(unconverged(
                        "lasso hypergradient (support): conjugate gradients",
                        &report,
                    ));
                }
                (v, 1.0)
            }
            (None, None, true) => {
                // (I - D_A + gamma D_A H_AA)^T v = (I - D_A) v + gamma H_AA (D_A v).
                let gamma = options.step_for(model)?;
                let inner = gram_operator(model, &idx, curvature.as_deref());
                let m = idx.len();
                let apply = |v: ArrayView1<'_, f64>, mut out: ArrayViewMut1<'_, f64>| -> Result<()> {
                    let dv = Array1::from_iter(v.iter().zip(&qa).map(|(x, q)| x * q));
                    let mut hdv = Array1::zeros(m);
                    clarke_solve::LinearOperator::apply(&inner, dv.view(), hdv.view_mut())?;
                    for a in 0..m {
                        out[a] = (1.0 - qa[a]) * v[a] + gamma * hdv[a];
                    }
                    Ok(())
                };
                let op = FnOperator::new(m, m, apply);
                let opts = SolveOptions::default().with_tol(MATRIX_FREE_TOL).with_max_iter(10 * m);
                let (v, report) = gmres(&op, ga.view(), None, &opts)?;
                if !report.is_converged() {
                    return Err(unconverged("lasso hypergradient (support): GMRES", &report));
                }
                (v, gamma)
            }
        };
        for (a, &j) in idx.iter().enumerate() {
            let contrib = -scale * qa[a] * pen.at(j) * sign(fit.correlations[j]) * v[a];
            match pen {
                Penalty::Uniform(_) => grad[0] += contrib,
                Penalty::PerFeature(_) => grad[j] += contrib,
            }
        }
    }
    Ok(Hypergradient {
        method: Method::Support,
        value: criterion.value(fit.beta.view())?,
        gradient: grad,
        check,
        layer_check: None,
        kinks,
        iterations: 0,
        seconds: start.elapsed().as_secs_f64(),
    })
}
