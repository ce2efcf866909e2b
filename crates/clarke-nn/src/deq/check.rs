//! The hypothesis check of a DEQ cell: is `I - diag(d) W` invertible for every `d` the
//! conservative Jacobian allows at the solution?
//!
//! The parametrisations carry certificates (monotone: every `d` in `[0, 1]^n`; a spectral
//! bound below one: a contraction for every `d`). Without one, each sample's block goes
//! through the vertex walk of `clarke-implicit` (one engine for every layer), with the
//! selections at the sample's kink units flipped over their hull.
//!
//! Up to [`CheckOptions::dense_limit`] units the norm of `W` is exact (an SVD) and each
//! sample's block is dense. Above it nothing `n x n` is built or factored: the norm of `W` is
//! a power-iteration estimate with a safety margin (see [`NORM_MARGIN_PER_TOL`]) and each
//! sample is walked matrix-free with the products `J_z v = d o (W v)` and
//! `J_z^T w = W^T (d o w)` ([`cell_jacobian_product`]).

use clarke_core::{ElementSelection, Error, Result, Scalar};
use clarke_implicit::check::{Flippable, Form, WalkInput, merge_samples, walk_vertices, walk_vertices_matrix_free};
use clarke_implicit::{CheckOptions, CheckOutcome, HypothesisCheck};
use clarke_solve::dense::singular_values;
use clarke_solve::{FnOperator, SpectralOptions, spectral_norm};
use ndarray::linalg::general_mat_vec_mul;
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut1};
use rayon::prelude::*;

use super::Parametrization;

/// The relative tolerance of the power iteration that estimates `||W||` for a certificate
/// (or [`CheckOptions::norm_tol`] when that is tighter).
///
/// The estimate `||W v||` never exceeds `||W||`; it rises towards it at the rate
/// `r = (s_2 / s_1)^2` per iteration and stops when its relative change is at most the
/// tolerance, when its deficit is about `tol * r / (1 - r)`. With the loose `norm_tol` of
/// the other estimates (1e-3) the deficit of a random `W`, whose top singular values
/// crowd together, reaches several percent (5.6% at width 40: an estimate of 0.850 for a
/// norm of 0.900). At 1e-9 a deficit of 1% needs `s_2` within 1e-7 of `s_1`; an estimate
/// that does not settle within the options' budget is not used.
pub(crate) const NORM_TOL: f64 = 1e-9;

/// How far above its estimate `||W||` is taken to be, per unit of the tolerance used: a
/// margin of `50 tol` covers every `r` up to `50 / 51`.
pub(crate) const NORM_MARGIN_PER_TOL: f64 = 50.0;

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
    let matrix_free = w.nrows() > options.dense_limit;
    let norm = if matrix_free {
        WeightNorm::estimate(w, options)?
    } else {
        WeightNorm::exact(w)?
    };
    if let Some(bound) = norm.certified_bound(lipschitz) {
        check.outcome = CheckOutcome::Certified;
        check.contraction_bound = Some(bound);
        check.max_vertex_norm = Some(norm.value * lipschitz);
        check.sigma_min = Some(1.0 - bound);
        check.error_bound = Some(worst_residual / (1.0 - bound));
        check.matrix_free = matrix_free;
        check.products = norm.products;
        check.reasons.push(format!(
            "||diag(d) W|| <= {bound:.6} < 1 for every d in [0, 1]^n ({}): a contraction for every selection",
            norm.describe()
        ));
        return Ok(check);
    }
    // No certificate from the parametrisation: walk each sample's block.
    let samples: Vec<Result<HypothesisCheck>> = d
        .outer_iter()
        .into_par_iter()
        .zip(kinks.units.par_iter())
        .zip(residuals.par_iter())
        .map(|((di, units), &residual)| {
            let input = sample_input(units, kinks.hull, residual);
            if matrix_free {
                walk_vertices_matrix_free(&input, options, w.nrows(), |selections, transpose, x, y| {
                    cell_jacobian_product(w, di, selections, transpose, x, y)
                })
            } else {
                Ok(walk_vertices(&input, options, |selections| Ok(dense_jacobian(w, di, selections)))?.check)
            }
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
            "{}: no certificate from the parametrisation; each sample's block was walked{}",
            norm.describe(),
            if matrix_free { " matrix-free" } else { "" }
        ));
    }
    Ok(merged)
}

/// The walk's input for one sample: its kink units, flippable over the activation's hull.
fn sample_input(units: &[usize], (low, high): (f64, f64), residual: f64) -> WalkInput {
    WalkInput {
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
    }
}

/// `d` with the selections' values at their units.
fn selected_derivative<S: Scalar>(d: ArrayView1<'_, S>, selections: &[ElementSelection]) -> Array1<S> {
    let mut selected = d.to_owned();
    for s in selections {
        selected[s.element] = S::from_f64_lossy(s.value);
    }
    selected
}

/// `J_z = diag(d) W` of one sample, dense, with the selections at the flipped units.
fn dense_jacobian<S: Scalar>(w: ArrayView2<'_, S>, d: ArrayView1<'_, S>, selections: &[ElementSelection]) -> Array2<S> {
    let d = selected_derivative(d, selections);
    let mut j = w.to_owned();
    for (mut row, &di) in j.outer_iter_mut().zip(&d) {
        row.mapv_inplace(|v| di * v);
    }
    j
}

/// One product with the Jacobian of the DEQ cell for one sample, `J_z = diag(d) W`, without
/// forming it: `y = d o (W x)`, or with `transpose`, `y = W^T (d o x)`. `d` is the selected
/// derivative `sigma'(p*)` of the sample; `selections` override it at their units (the
/// element of the conservative Jacobian the hypothesis check measures).
///
/// The cost is one matrix-vector product with `W` (`n x n`).
///
/// # Errors
/// A `W` that is not square, or `d`, `x`, `y` not of its size.
pub fn cell_jacobian_product<S: Scalar>(
    w: ArrayView2<'_, S>,
    d: ArrayView1<'_, S>,
    selections: &[ElementSelection],
    transpose: bool,
    x: ArrayView1<'_, S>,
    mut y: ArrayViewMut1<'_, S>,
) -> Result<()> {
    let n = w.nrows();
    if w.ncols() != n || [d.len(), x.len(), y.len()].iter().any(|&len| len != n) {
        return Err(Error::shapes(
            "cell_jacobian_product",
            &[w.nrows(), w.ncols(), d.len(), x.len(), y.len()],
            &[n, n, n, n, n],
            "W must be square and d, x, y of its size",
        ));
    }
    let d = selected_derivative(d, selections);
    if transpose {
        general_mat_vec_mul(S::one(), &w.t(), &(&d * &x), S::zero(), &mut y);
    } else {
        general_mat_vec_mul(S::one(), &w, &x, S::zero(), &mut y);
        y *= &d;
    }
    Ok(())
}

/// `||W||_2` as a certificate `||W|| L < 1` may use it.
#[derive(Debug, Clone, Copy)]
struct WeightNorm {
    /// The exact norm (SVD) or the power-iteration estimate, which never lies above it.
    value: f64,
    /// A bound certainly at least `||W||`: the value itself when exact, else
    /// [`entry_bound`].
    upper: f64,
    /// The relative margin added to the value (0 when exact), or `None` for an estimate that
    /// did not converge, which certifies nothing.
    margin: Option<f64>,
    /// Products with `W` or `W^T` the estimate used (0 when exact).
    products: usize,
}

impl WeightNorm {
    /// The norm by a full SVD.
    fn exact<S: Scalar>(w: ArrayView2<'_, S>) -> Result<Self> {
        let value = singular_values(w)?.first().map_or(0.0, |s| s.to_f64_exact());
        Ok(WeightNorm {
            value,
            upper: value,
            margin: Some(0.0),
            products: 0,
        })
    }

    /// The norm by power iteration on `W^T W` (tolerance [`NORM_TOL`] or a tighter
    /// `norm_tol`, budget `spectral_iterations`, the options' seed), with the margin of
    /// [`NORM_MARGIN_PER_TOL`] and the bound from the entries.
    fn estimate<S: Scalar>(w: ArrayView2<'_, S>, options: &CheckOptions) -> Result<Self> {
        let op = FnOperator::new(w.nrows(), w.ncols(), |x, mut y| {
            general_mat_vec_mul(S::one(), &w, &x, S::zero(), &mut y);
            Ok(())
        })
        .with_transpose(|x, mut y| {
            general_mat_vec_mul(S::one(), &w.t(), &x, S::zero(), &mut y);
            Ok(())
        });
        let tol = options.norm_tol.min(NORM_TOL);
        let spectral = SpectralOptions::default()
            .with_tol(tol)
            .with_max_iter(options.spectral_iterations)
            .with_seed(options.seed);
        let est = spectral_norm(&op, &spectral)?;
        let usable = est.is_converged() && est.value.is_finite();
        Ok(WeightNorm {
            value: est.value,
            upper: entry_bound(w),
            margin: usable.then_some(NORM_MARGIN_PER_TOL * tol),
            products: est.matvecs,
        })
    }

    /// The bound on `||diag(d) W||` over every `d` in `[0, lipschitz]^n` when it is below
    /// one: the smaller of the bound from the entries and the value with its margin.
    fn certified_bound(&self, lipschitz: f64) -> Option<f64> {
        let with_margin = self.margin.map(|m| self.value * (1.0 + m));
        let bound = with_margin.map_or(self.upper, |v| v.min(self.upper)) * lipschitz;
        (bound < 1.0).then_some(bound)
    }

    /// `||W|| = ...` and how it was obtained, for the reasons.
    fn describe(&self) -> String {
        match self.margin {
            Some(_) if self.products == 0 => format!("||W|| = {:.6}", self.value),
            Some(m) => format!(
                "||W|| ~ {:.6} by power iteration ({} products), taken as {:.6} with a {:.2}% margin; bound from the entries {:.6}",
                self.value,
                self.products,
                self.value * (1.0 + m),
                100.0 * m,
                self.upper
            ),
            None => format!(
                "||W|| ~ {:.6} by power iteration, not converged after {} products; bound from the entries {:.6}",
                self.value, self.products, self.upper
            ),
        }
    }
}

/// `min(||W||_F, sqrt(||W||_1 ||W||_inf))`: a bound on `||W||_2` from the entries, in
/// `O(n^2)` and without iteration (loose for a dense random `W`, exact for a diagonal one).
fn entry_bound<S: Scalar>(w: ArrayView2<'_, S>) -> f64 {
    let abs = |v: &S| v.to_f64_exact().abs();
    let frobenius = w.iter().map(|v| abs(v) * abs(v)).sum::<f64>().sqrt();
    let max_row = w
        .rows()
        .into_iter()
        .map(|r| r.iter().map(abs).sum::<f64>())
        .fold(0.0, f64::max);
    let max_col = w
        .columns()
        .into_iter()
        .map(|c| c.iter().map(abs).sum::<f64>())
        .fold(0.0, f64::max);
    frobenius.min((max_row * max_col).sqrt())
}
