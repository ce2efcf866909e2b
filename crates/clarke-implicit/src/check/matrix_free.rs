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
    let spectral = SpectralOptions::default()
        .with_tol(opts.spectral_tol)
        .with_max_iter(opts.spectral_iterations)
        .with_seed(opts.seed);
    let norms = SpectralOptions {
        tol: opts.norm_tol,
        ..spectral.clone()
    };
    let want_norm = input.form == Form::FixedPoint && !input.flippable.is_empty();
    let mut check = walk(input, opts, |selections| {
        measure(lin, input.form, selections, &spectral, &norms, want_norm)
    })?;
    check
        .reasons
        .push(format!("{above}: singular values estimated matrix-free"));
    Ok(check)
}

/// One element measured by estimates: `sigma_min` and `sigma_max` of its block, and
/// `||J_z||` when asked.
fn measure<S: Scalar>(
    lin: &Linearization<'_, S>,
    form: Form,
    selections: &[ElementSelection],
    spectral: &SpectralOptions,
    norms: &SpectralOptions,
    want_norm: bool,
) -> Result<Measured> {
    let n = lin.len();
    let product = |transpose: bool, x: ArrayView1<'_, S>, mut y: ArrayViewMut1<'_, S>| -> Result<()> {
        let jx = if transpose {
            lin.vjp(x, selections)?
        } else {
            lin.jvp(x, selections)?
        };
        match form {
            Form::Root => y.assign(&jx),
            Form::FixedPoint => y.assign(&(&x - &jx)),
        }
        Ok(())
    };
    let a = FnOperator::new(n, n, |x, y| product(false, x, y)).with_transpose(|x, y| product(true, x, y));
    let low = finite(smallest_singular_value(&a, spectral)?, selections)?;
    let high = finite(spectral_norm(&a, norms)?, selections)?;
    let norm = if want_norm {
        let j = FnOperator::new(n, n, |x: ArrayView1<'_, S>, mut y: ArrayViewMut1<'_, S>| {
            y.assign(&lin.jvp(x, selections)?);
            Ok(())
        })
        .with_transpose(|x: ArrayView1<'_, S>, mut y: ArrayViewMut1<'_, S>| {
            y.assign(&lin.vjp(x, selections)?);
            Ok(())
        });
        Some(finite(spectral_norm(&j, norms)?, selections)?)
    } else {
        None
    };
    Ok(Measured {
        dim: n,
        sigma_min: low.value,
        // Both are estimates; the largest singular value is at least the smallest.
        sigma_max: high.value.max(low.value),
        det_sign: None,
        jacobian_norm: norm.as_ref().map(|e| e.value),
        converged: low.is_converged() && high.is_converged() && norm.as_ref().is_none_or(|e| e.is_converged()),
        products: low.matvecs + high.matvecs + norm.as_ref().map_or(0, |e| e.matvecs),
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
