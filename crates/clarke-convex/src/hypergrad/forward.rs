//! The implicit forward hypergradient (Bertrand et al. 2020): forward-mode differentiation
//! of coordinate descent, restricted to the active set at the solution.
//!
//! At a solution the forward-backward map's conservative Jacobian (see [`super::support`])
//! makes the tangent `J = d beta / d theta` (with `theta = log lambda`) the fixed point of
//! `J = D (I - gamma H) J - gamma D Lambda s`, zero off `A = {q > 0}`. On `A`, divided by
//! `gamma D`, that is the symmetric positive definite system
//!
//! ```text
//! K J_A = -Lambda_A s_A,    K = H_AA + diag((1/q_a - 1) / gamma)
//! ```
//!
//! (`Lambda = diag(lambda)`, `s = sign(c)`), which reduces to `H_AA J_A = -Lambda_A s_A` when
//! every `q` is 1. It is solved by the iteration coordinate descent would run on the
//! tangents, Gauss-Seidel sweeps over `A` that keep `u = X_A J_A` up to date, so one sweep
//! costs `O(n |A|)` and `X^T X` is never formed. The hypergradient is `J^T grad C`.
//!
//! Forward mode carries one tangent per hyperparameter: one for a uniform penalty, one per
//! active feature for a per-feature penalty (each column a separate solve). For a
//! per-feature penalty the adjoint methods ([`super::support`], [`super::implicit`]) do the
//! same work in one solve.

use clarke_core::{Error, Result};
use clarke_implicit::CheckOutcome;
use ndarray::Array1;

use super::support::{active_set, curvature_at, sign};
use super::{Criterion, HypergradOptions, Hypergradient, Method, Start};
use crate::cd::Fit;
use crate::model::{LassoModel, Penalty};

/// The implicit forward hypergradient (see the module documentation).
///
/// # Errors
/// As [`super::hypergradient`]; [`Error::HypothesisViolated`] when the Prop. 5 check finds
/// `X_E^T X_E` rank deficient (the tangent system may be singular and the sweeps would not
/// converge); [`Error::NotConverged`] when the sweeps do not bring the residual to
/// [`HypergradOptions::forward_tol`] times `max |lambda_j|` within
/// [`HypergradOptions::forward_max_sweeps`].
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
        ..
    } = Start::at(model, fit, criterion, options)?;
    if check.outcome == CheckOutcome::Violated {
        return Err(Error::HypothesisViolated {
            node: "lasso hypergradient (forward)".to_string(),
            detail: check.to_string(),
        });
    }
    let active = active_set(&check);
    let pen = &fit.penalty;
    let mut gradient = Array1::zeros(pen.len());
    let mut sweeps = 0;
    if !active.is_empty() {
        let gamma = options.step_for(model)?;
        let system = TangentSystem::new(model, fit, &active, gamma);
        let signed_lambda: Vec<f64> = active
            .iter()
            .map(|&(j, _)| pen.at(j) * sign(fit.correlations[j]))
            .collect();
        match pen {
            Penalty::Uniform(_) => {
                let rhs: Vec<f64> = signed_lambda.iter().map(|v| -v).collect();
                let (tangent, used) = system.solve(&rhs, options)?;
                sweeps += used;
                gradient[0] = active.iter().zip(&tangent).map(|(&(j, _), t)| g[j] * t).sum();
            }
            Penalty::PerFeature(_) => {
                let mut rhs = vec![0.0; active.len()];
                for (k, &(j, _)) in active.iter().enumerate() {
                    rhs[k] = -signed_lambda[k];
                    let (tangent, used) = system.solve(&rhs, options)?;
                    rhs[k] = 0.0;
                    sweeps += used;
                    gradient[j] = active.iter().zip(&tangent).map(|(&(i, _), t)| g[i] * t).sum();
                }
            }
        }
    }
    Ok(Hypergradient {
        method: Method::Forward,
        value: criterion.value(fit.beta.view())?,
        gradient,
        check,
        layer_check: None,
        kinks,
        iterations: sweeps,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `K J_A = rhs` on the active set, solved by Gauss-Seidel sweeps on the columns of `X`.
struct TangentSystem<'m> {
    model: &'m LassoModel,
    /// Active features.
    features: Vec<usize>,
    /// `K_aa`: `w x_j^T diag(s) x_j + l2 + (1/q_a - 1) / gamma`.
    diagonal: Vec<f64>,
    /// `(1/q_a - 1) / gamma`, the shift of a fractional selection.
    shift: Vec<f64>,
    /// The loss curvature per row (`None`: squared loss, 1).
    curvature: Option<Vec<f64>>,
}

impl<'m> TangentSystem<'m> {
    fn new(model: &'m LassoModel, fit: &Fit, active: &[(usize, f64)], gamma: f64) -> Self {
        let curvature = curvature_at(model, fit);
        let shift: Vec<f64> = active.iter().map(|&(_, q)| (1.0 / q - 1.0) / gamma).collect();
        let diagonal = active
            .iter()
            .zip(&shift)
            .map(|(&(j, _), &sh)| {
                let weighted = model.col(j).weighted_square(curvature.as_deref());
                model.weight() * weighted + model.l2() + sh
            })
            .collect();
        TangentSystem {
            model,
            features: active.iter().map(|a| a.0).collect(),
            diagonal,
            shift,
            curvature,
        }
    }

    /// `w x_j^T diag(s) u`: the row of `H_AA J_A` for feature `j`, without the ridge.
    fn curvature_product(&self, j: usize, u: &[f64]) -> f64 {
        let col = self.model.col(j);
        let product = match &self.curvature {
            Some(s) => col.weighted_dot(s, u),
            None => col.dot(u),
        };
        self.model.weight() * product
    }

    /// Sweeps until the largest residual `|(K J - rhs)_a|` met in a sweep is at most
    /// `forward_tol` times `max |rhs|`; returns the tangent and the number of sweeps.
    fn solve(&self, rhs: &[f64], options: &HypergradOptions) -> Result<(Vec<f64>, usize)> {
        let m = self.features.len();
        let scale = rhs.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        let mut tangent = vec![0.0; m];
        if scale == 0.0 {
            return Ok((tangent, 0));
        }
        let mut u = vec![0.0; self.model.n()];
        let l2 = self.model.l2();
        let mut worst = f64::INFINITY;
        for sweep in 1..=options.forward_max_sweeps {
            worst = 0.0;
            for a in 0..m {
                let j = self.features[a];
                let residual = self.curvature_product(j, &u) + (l2 + self.shift[a]) * tangent[a] - rhs[a];
                worst = worst.max(residual.abs());
                let step = -residual / self.diagonal[a];
                if step != 0.0 {
                    tangent[a] += step;
                    self.model.col(j).axpy(step, &mut u);
                }
            }
            if !worst.is_finite() {
                break;
            }
            if worst <= options.forward_tol * scale {
                return Ok((tangent, sweep));
            }
        }
        Err(Error::NotConverged {
            solver: "lasso hypergradient (forward): tangent sweeps",
            iterations: options.forward_max_sweeps,
            residual: worst,
            tolerance: options.forward_tol * scale,
        })
    }
}
