//! The check for a `z` too large to densify.
//!
//! When the map has forward-mode products, the inverted block `A = I - J_z` (or `J_F`) is an
//! operator whose product is a JVP replay of the linearization and whose transpose is a VJP
//! replay, each with the element's selections. Each element the walk visits is measured by
//! estimates: `sigma_min(A)` by Golub-Kahan-Lanczos ([`smallest_singular_value`]),
//! `sigma_max(A)` and, for a fixed point with kinks, `||J_z||` by power iteration
//! ([`spectral_norm`]). The verdict is the dense walk's, except that an estimate has no
//! determinant sign: with kinks, an exhaustive walk certifies only through `||J_z|| < 1` at
//! every vertex.
//!
//! A map with a custom op that has no forward-mode rule has no products with `J_z`; the
//! check then falls back to a power-iteration estimate of the spectral radius of `J_z`
//! (transposed products suffice), which speaks only for the selected element.

use clarke_core::{ElementSelection, Error, Result, Scalar};
use clarke_solve::{
    FnOperator, SpectralEstimate, SpectralOptions, smallest_singular_value, spectral_norm, spectral_radius,
};
use ndarray::{ArrayView1, ArrayViewMut1};

use super::walk::{Measured, walk};
use super::{Form, WalkInput};
use crate::inner::Linearization;
use crate::options::CheckOptions;
use crate::report::{CheckOutcome, HypothesisCheck};

/// The walk of [`super::walk_vertices`] with every element measured matrix-free, or the
/// spectral-radius estimate when the map has no forward-mode rule. `input` has the unit of
/// the form already.
pub(crate) fn check<S: Scalar>(
    lin: &Linearization<'_, S>,
    input: &WalkInput,
    opts: &CheckOptions,
) -> Result<HypothesisCheck> {
    let n = lin.len();
    let above = format!("z has {n} elements > dense limit {}", opts.dense_limit);
    if let Some(refusal) = lin.forward_mode_refusal()? {
        let mut check = HypothesisCheck {
            outcome: CheckOutcome::Warning,
            kink_elements: input.kink_elements,
            flippable: input.flippable.len(),
            reasons: vec![
                format!("{above}: other selections not explored"),
                format!(
                    "no products with J_z, so no matrix-free sigma_min: the map has no forward-mode rule ({refusal})"
                ),
            ],
            ..HypothesisCheck::not_checked("")
        };
        spectral_radius_estimate(lin, input.form, opts, &mut check)?;
        return Ok(check);
    }
    let mut check = walk_vertices_matrix_free(input, opts, n, |selections, transpose, x, mut y| {
        let jx = if transpose {
            lin.vjp(x, selections)?
        } else {
            lin.jvp(x, selections)?
        };
        y.assign(&jx);
        Ok(())
    })?;
    check
        .reasons
        .push(format!("{above}: singular values estimated matrix-free"));
    Ok(check)
}

/// The vertex walk of [`super::walk_vertices`] for a caller that has its own products with
/// the Jacobian of its map instead of the Jacobian itself: the check of a block too large to
/// densify.
///
/// `products(selections, transpose, x, y)` writes `J x` into `y` (`J^T x` when `transpose`),
/// where `J` is the map's Jacobian in `z` (`J_z` of `T`, or `J_F`) of size `dim x dim` with
/// the given selections at single kink elements (an empty slice: the policy's). The
/// function builds the inverted block `A` from the form (`I - J` or `J`) and measures every
/// element the walk visits by estimates: `sigma_min(A)` by Golub-Kahan-Lanczos (tolerance
/// [`CheckOptions::spectral_tol`]), `sigma_max(A)` and, for a fixed point with kinks,
/// `||J||` by power iteration ([`CheckOptions::norm_tol`]), each within
/// [`CheckOptions::spectral_iterations`]. The thresholds and verdicts are those of the dense
/// walk, except that an estimate has no determinant sign: with kinks, an exhaustive walk
/// certifies only when `||J|| < 1` at every vertex, and an unconverged estimate is a
/// warning (a `sigma_min` estimate never lies below the true value, so a singular estimate
/// is still a violation).
///
/// Refused, before any verdict: options that fail [`CheckOptions::validate`] and an input
/// that fails [`WalkInput::validate`]; during the walk, an estimate that meets a non-finite
/// value and any error of `products`. `dim = 0` is certified: there is nothing to invert.
pub fn walk_vertices_matrix_free<S: Scalar>(
    input: &WalkInput,
    options: &CheckOptions,
    dim: usize,
    products: impl Fn(&[ElementSelection], bool, ArrayView1<'_, S>, ArrayViewMut1<'_, S>) -> Result<()>,
) -> Result<HypothesisCheck> {
    options.validate()?;
    input.validate()?;
    let estimates = Estimates::new(input, options);
    walk(input, options, |selections| {
        if dim == 0 {
            return Ok(Measured::EMPTY);
        }
        measure(dim, input.form, &estimates, |transpose, x, y| {
            products(selections, transpose, x, y)
        })?
        .finite(selections)
    })
}

/// The options of the estimates of one walk.
struct Estimates {
    /// For `sigma_min` (Golub-Kahan-Lanczos).
    spectral: SpectralOptions,
    /// For `sigma_max` and `||J||` (power iteration).
    norms: SpectralOptions,
    /// Whether `||J||` is wanted: a fixed point with kinks, where it is the only route to a
    /// certificate.
    want_norm: bool,
}

impl Estimates {
    fn new(input: &WalkInput, opts: &CheckOptions) -> Self {
        let spectral = SpectralOptions::default()
            .with_tol(opts.spectral_tol)
            .with_max_iter(opts.spectral_iterations)
            .with_seed(opts.seed);
        let norms = SpectralOptions {
            tol: opts.norm_tol,
            ..spectral.clone()
        };
        Estimates {
            spectral,
            norms,
            want_norm: input.form == Form::FixedPoint && !input.flippable.is_empty(),
        }
    }
}

/// The estimates of one element, before they are checked finite.
struct Raw {
    dim: usize,
    low: SpectralEstimate,
    high: SpectralEstimate,
    norm: Option<SpectralEstimate>,
}

impl Raw {
    /// The element as the walk sees it, or an error naming the selections when an estimate
    /// met a non-finite value.
    fn finite(self, selections: &[ElementSelection]) -> Result<Measured> {
        let low = finite(self.low, selections)?;
        let high = finite(self.high, selections)?;
        let norm = self.norm.map(|e| finite(e, selections)).transpose()?;
        Ok(Measured {
            dim: self.dim,
            sigma_min: low.value,
            // Both are estimates; the largest singular value is at least the smallest.
            sigma_max: high.value.max(low.value),
            det_sign: None,
            jacobian_norm: norm.as_ref().map(|e| e.value),
            converged: low.is_converged() && high.is_converged() && norm.as_ref().is_none_or(|e| e.is_converged()),
            products: low.matvecs + high.matvecs + norm.as_ref().map_or(0, |e| e.matvecs),
        })
    }
}

/// One element measured by estimates from `jacobian(transpose, x, y)` (`y = J x` or
/// `J^T x`): `sigma_min` and `sigma_max` of its block, and `||J||` when asked.
fn measure<S: Scalar>(
    n: usize,
    form: Form,
    estimates: &Estimates,
    jacobian: impl Fn(bool, ArrayView1<'_, S>, ArrayViewMut1<'_, S>) -> Result<()>,
) -> Result<Raw> {
    let block = |transpose: bool, x: ArrayView1<'_, S>, mut y: ArrayViewMut1<'_, S>| -> Result<()> {
        jacobian(transpose, x, y.view_mut())?;
        if form == Form::FixedPoint {
            y.zip_mut_with(&x, |yi, &xi| *yi = xi - *yi);
        }
        Ok(())
    };
    let a = FnOperator::new(n, n, |x, y| block(false, x, y)).with_transpose(|x, y| block(true, x, y));
    let low = smallest_singular_value(&a, &estimates.spectral)?;
    let high = spectral_norm(&a, &estimates.norms)?;
    let norm = if estimates.want_norm {
        let j = FnOperator::new(n, n, |x, y| jacobian(false, x, y)).with_transpose(|x, y| jacobian(true, x, y));
        Some(spectral_norm(&j, &estimates.norms)?)
    } else {
        None
    };
    Ok(Raw {
        dim: n,
        low,
        high,
        norm,
    })
}

/// Refuses an estimate that met a non-finite value: the map's derivative is not finite at
/// `z*` under these selections.
fn finite(est: SpectralEstimate, selections: &[ElementSelection]) -> Result<SpectralEstimate> {
    if est.value.is_finite() {
        return Ok(est);
    }
    let at = if selections.is_empty() {
        "the selected element".to_string()
    } else {
        format!("the vertex with selections {}", super::walk::describe(selections))
    };
    Err(Error::invalid(
        "hypothesis check",
        format!(
            "the {} of {at} met a non-finite value {} after {} products",
            est.estimator, est.value, est.matvecs
        ),
    ))
}

/// A power-iteration estimate of the spectral radius of `J_z` (fixed-point layers): the
/// selected element is invertible when it is below one.
fn spectral_radius_estimate<S: Scalar>(
    lin: &Linearization<'_, S>,
    form: Form,
    opts: &CheckOptions,
    check: &mut HypothesisCheck,
) -> Result<()> {
    if form == Form::Root {
        check
            .reasons
            .push("no spectral-radius estimate for root layers".to_string());
        return Ok(());
    }
    let n = lin.len();
    let op = FnOperator::new(n, n, |x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>| lin.vjp_into(x, y));
    let spectral = SpectralOptions::default()
        .with_max_iter(opts.radius_iterations)
        .with_tol(1e-3)
        .with_seed(opts.seed);
    let est = spectral_radius(&op, &spectral)?;
    if !est.value.is_finite() {
        return Err(Error::invalid(
            "hypothesis check",
            format!(
                "the power iteration on J_z met a non-finite value {} after {} products",
                est.value, est.matvecs
            ),
        ));
    }
    check.spectral_radius = Some(est.value);
    check.products = est.matvecs;
    if !est.is_converged() {
        // An estimate that has not settled may lie on either side of the radius.
        check.reasons.push(format!(
            "spectral radius of J_z ~ {:.3e}, not converged after {} power iterations (relative change {:.3e}): no conclusion",
            est.value, est.iterations, est.change
        ));
    } else if est.value < 1.0 {
        check.reasons.push(format!(
            "spectral radius of J_z ~ {:.3e} < 1: the selected element is invertible (estimate)",
            est.value
        ));
    } else {
        check.reasons.push(format!(
            "spectral radius of J_z ~ {:.3e} >= 1: the selected element may be singular",
            est.value
        ));
    }
    Ok(())
}
