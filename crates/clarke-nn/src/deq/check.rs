//! The hypothesis check of a DEQ cell: is `I - diag(d) W` invertible for every `d` the
//! conservative Jacobian allows at the solution?
//!
//! The parametrisations carry certificates (monotone: every `d` in `[0, 1]^n`; a spectral
//! bound below one: a contraction for every `d`). Without one, each sample's block goes
//! through the vertex walk of `clarke-implicit` (one engine for every layer), with the
//! selections at the sample's kink units flipped over their hull.

use clarke_core::{ElementSelection, Result, Scalar};
use clarke_implicit::check::{Flippable, Form, WalkInput, merge_samples, walk_vertices};
use clarke_implicit::{CheckOptions, CheckOutcome, HypothesisCheck};
use clarke_solve::dense::singular_values;
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use super::Parametrization;

/// The kinks of a batch at the solution: per sample, the units treated as at a kink.
pub(crate) struct SampleKinks {
    /// Unit indices per sample (row).
    pub units: Vec<Vec<usize>>,
    /// The hull of the activation's derivative at its kink.
    pub hull: (f64, f64),
    /// How many of the kinks are within the forward solver's error (not exact or near).
    pub within_solver_error: usize,
}

impl SampleKinks {
    fn total(&self) -> usize {
        self.units.iter().map(Vec::len).sum()
    }
}

/// Runs the check. `d` is the selected derivative at the solution (rows are samples) and
/// `residuals` the forward residual `||sigma(p) - z||` of each sample.
pub(crate) fn run<S: Scalar>(
    parametrization: Parametrization,
    lipschitz: f64,
    w: ArrayView2<'_, S>,
    d: ArrayView2<'_, S>,
    kinks: &SampleKinks,
    residuals: &[f64],
    options: &CheckOptions,
) -> Result<HypothesisCheck> {
    let total = kinks.total();
    let worst_residual = residuals.iter().copied().fold(0.0, f64::max);
    let mut check = HypothesisCheck::not_checked("");
    check.reasons.clear();
    check.kink_elements = total;
    if let Parametrization::Monotone { m } = parametrization {
        check.outcome = CheckOutcome::Certified;
        check.reasons.push(format!(
            "monotone parametrisation: the symmetric part of I - W is at least m I (m = {m}), so I - diag(d) W \
             is invertible for every d in [0, 1]^n, whatever the selections at the {total} kink element(s)"
        ));
        return Ok(check);
    }
    let norm = singular_values(w)?.first().map_or(0.0, |s| s.to_f64_exact());
    let bound = norm * lipschitz;
    if bound < 1.0 {
        check.outcome = CheckOutcome::Certified;
        check.contraction_bound = Some(bound);
        check.max_vertex_norm = Some(bound);
        check.sigma_min = Some(1.0 - bound);
        check.error_bound = Some(worst_residual / (1.0 - bound));
        check.reasons.push(format!(
            "||diag(d) W|| <= ||W|| = {norm:.6} < 1 for every d in [0, 1]^n: a contraction for every selection"
        ));
        return Ok(check);
    }
    // No certificate from the parametrisation: walk each sample's block.
    let n = w.nrows();
    let (low, high) = kinks.hull;
    let samples: Vec<Result<HypothesisCheck>> = d
        .outer_iter()
        .into_par_iter()
        .zip(kinks.units.par_iter())
        .zip(residuals.par_iter())
        .map(|((di, units), &residual)| {
            let input = WalkInput {
                form: Form::FixedPoint,
                flippable: units
                    .iter()
                    .map(|&element| Flippable {
                        node: 0,
                        element,
                        low,
                        high,
                    })
                    .collect(),
                kink_elements: units.len(),
                frozen: 0,
                within_solver_error: 0,
                forward_residual: residual,
                unit: 1.0,
            };
            // J_z = diag(d) W with the selections at the flipped units.
            let jacobian = |selections: &[ElementSelection]| -> Result<Array2<S>> {
                let mut dsel = di.to_owned();
                for s in selections {
                    dsel[s.element] = S::from_f64_lossy(s.value);
                }
                let mut j = Array2::<S>::zeros((n, n));
                for (i, (mut row, wr)) in j.outer_iter_mut().zip(w.outer_iter()).enumerate() {
                    row.zip_mut_with(&wr, |o, &wv| *o = dsel[i] * wv);
                }
                Ok(j)
            };
            Ok(walk_vertices(&input, options, jacobian)?.check)
        })
        .collect();
    let mut merged = merge_samples(samples.into_iter().collect::<Result<Vec<_>>>()?);
    if kinks.within_solver_error > 0 {
        merged.reasons.push(format!(
            "{} unit(s) within the forward solver's error bound of the kink are treated as at it and walked",
            kinks.within_solver_error
        ));
    }
    if merged.outcome == CheckOutcome::Certified || merged.outcome == CheckOutcome::Warning {
        merged.reasons.push(format!(
            "||W|| = {norm:.4} >= 1: no certificate from the parametrisation; each sample's block was walked"
        ));
    }
    Ok(merged)
}
