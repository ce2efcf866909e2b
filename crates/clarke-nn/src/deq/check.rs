//! The hypothesis check of a DEQ cell: is `I - diag(d) W` invertible for every `d` the
//! conservative Jacobian allows at the solution?

use clarke_core::{Result, Scalar};
use clarke_implicit::{CheckOutcome, HypothesisCheck};
use clarke_solve::dense::singular_values;
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use super::kernel::identity_minus_scaled;
use super::Parametrization;

/// Relative size of a singular value below which a selected block counts as singular.
fn singular_tol<S: Scalar>() -> f64 {
    1e3 * S::epsilon().to_f64_exact()
}

/// Runs the check. `d` is the selected derivative at the solution (rows are samples) and
/// `kinks` the number of elements at a kink.
pub(crate) fn run<S: Scalar>(
    parametrization: Parametrization,
    lipschitz: f64,
    w: ArrayView2<'_, S>,
    d: ArrayView2<'_, S>,
    kinks: usize,
    forward_residual: f64,
) -> Result<HypothesisCheck> {
    let mut check = HypothesisCheck::not_checked("");
    check.reasons.clear();
    check.kink_elements = kinks;
    if let Parametrization::Monotone { m } = parametrization {
        check.outcome = CheckOutcome::Certified;
        check.reasons.push(format!(
            "monotone parametrisation: the symmetric part of I - W is at least m I (m = {m}), so I - diag(d) W \
             is invertible for every d in [0, 1]^n, whatever the selections at the {kinks} kink element(s)"
        ));
        return Ok(check);
    }
    let norm = singular_values(w)?.first().map_or(0.0, |s| s.to_f64_exact());
    let bound = norm * lipschitz;
    check.contraction_bound = Some(bound);
    check.max_vertex_norm = Some(bound);
    if bound < 1.0 {
        check.outcome = CheckOutcome::Certified;
        check.sigma_min = Some(1.0 - bound);
        check.error_bound = Some(forward_residual / (1.0 - bound));
        check.reasons.push(format!(
            "||diag(d) W|| <= ||W|| = {norm:.6} < 1 for every d in [0, 1]^n: a contraction for every selection"
        ));
        return Ok(check);
    }
    // No certificate: measure the selected element sample by sample.
    let n = w.nrows();
    let sigmas: Vec<Result<(f64, f64)>> = d
        .outer_iter()
        .into_par_iter()
        .map(|di| {
            let mut a = Array2::<S>::zeros((n, n));
            identity_minus_scaled(di, w, a.view_mut());
            let s = singular_values(a.view())?;
            let max = s.first().map_or(0.0, |v| v.to_f64_exact());
            let min = s.last().map_or(0.0, |v| v.to_f64_exact());
            Ok((min, max))
        })
        .collect();
    let mut worst = (f64::INFINITY, 0.0f64);
    for s in sigmas {
        let (min, max) = s?;
        if min / max.max(f64::MIN_POSITIVE) < worst.0 / worst.1.max(f64::MIN_POSITIVE) {
            worst = (min, max);
        }
    }
    check.sigma_min = Some(worst.0);
    check.sigma_max = Some(worst.1);
    check.min_vertex_sigma = Some(worst.0);
    check.error_bound = Some(forward_residual / worst.0);
    if worst.0 <= singular_tol::<S>() * worst.1 {
        check.outcome = CheckOutcome::Violated;
        check.reasons.push(format!(
            "the selected element I - diag(d) W is singular for some sample (sigma_min {:.3e}, sigma_max {:.3e})",
            worst.0, worst.1
        ));
    } else {
        check.outcome = CheckOutcome::Warning;
        check.reasons.push(format!(
            "||W|| = {norm:.4} >= 1: no certificate for every selection; the selected elements are invertible \
             (smallest sigma_min {:.3e}); the other selections at the {kinks} kink element(s) were not walked",
            worst.0
        ));
    }
    Ok(check)
}
