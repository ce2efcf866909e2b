//! Forward-mode differentiation of unrolled ISTA (the piggyback recursion).
//!
//! ISTA is the forward-backward map iterated: `u_k = beta_k - gamma grad f(beta_k)`,
//! `beta_{k+1} = S_{gamma lambda}(u_k)`. Differentiating each step with respect to
//! `theta = log lambda` gives the recursion
//!
//! `J_{k+1} = D_k (I - gamma H_k) J_k - gamma D_k diag(lambda sign(u_k)) E`,
//!
//! `H_k` the Hessian of the smooth part at `beta_k` (constant for the squared loss),
//!
//! `D_k = diag(q_k)` the derivative of soft-thresholding at `u_k` (1 active, 0 inactive,
//! the policy's `soft_threshold` exactly at the threshold), `E` the identity for a
//! per-feature penalty and the ones vector for a uniform one. Rows of `J_k` outside the
//! active set are zero, so a step costs `O(n |A|)` per Jacobian column besides the gradient
//! of `f`. This is the method of the follow-up literature on iterative differentiation; it
//! converges to the implicit derivative at the linear rate of ISTA on the support.

use std::time::Instant;

use clarke_core::{Error, Result};
use ndarray::{Array1, ArrayView1};

use super::support::sets;
use super::{Criterion, HypergradOptions, Hypergradient, Method, check_criterion, prepare};
use crate::cd::Fit;
use crate::model::{LassoModel, Loss, Penalty};
use crate::prox::soft_threshold_scalar;

/// The state after some ISTA steps with their forward-mode derivative.
#[derive(Debug, Clone)]
pub struct UnrolledRun {
    /// `beta_K`.
    pub beta: Array1<f64>,
    /// `d beta_K / d theta`: `p x 1` for a uniform penalty, `p x p` (as columns that are
    /// not identically zero) for a per-feature one: `(hyperparameter index, column)`.
    pub columns: Vec<(usize, Array1<f64>)>,
    /// Steps run.
    pub iterations: usize,
    /// Largest change of the Jacobian in the last step, relative to its size.
    pub last_change: f64,
    /// Whether the stopping rule was met (`false`: a fixed number of steps, or the budget
    /// ran out).
    pub converged: bool,
}

impl UnrolledRun {
    /// `J^T g` for a vector `g` with one entry per feature (a gradient with respect to
    /// `beta`), as a vector with one entry per hyperparameter.
    ///
    /// # Errors
    /// A `g` of another length than `beta`, or a `hyperparameters` count that does not hold
    /// the run's columns (1 for a uniform penalty, `p` for a per-feature one).
    pub fn vjp(&self, g: ArrayView1<'_, f64>, hyperparameters: usize) -> Result<Array1<f64>> {
        const OP: &str = "UnrolledRun::vjp";
        if g.len() != self.beta.len() {
            return Err(Error::shapes(
                OP,
                &[g.len()],
                &[self.beta.len()],
                "g needs one entry per feature",
            ));
        }
        if let Some((k, _)) = self.columns.iter().find(|(k, _)| *k >= hyperparameters) {
            return Err(Error::invalid(
                OP,
                format!("the run has a column for hyperparameter {k}, but hyperparameters = {hyperparameters}"),
            ));
        }
        let mut out = Array1::zeros(hyperparameters);
        for (k, col) in &self.columns {
            out[*k] += col.iter().zip(g.iter()).map(|(a, b)| a * b).sum::<f64>();
        }
        Ok(out)
    }
}

/// Runs ISTA with step `gamma` from `beta0` (zero when `None`) for at most `max_iter` steps
/// with the forward-mode recursion, starting from `J_0 = 0`, and `q` the derivative at the
/// threshold. With `tol > 0` it stops once a step changes `J` by at most `tol` (relative,
/// max norm) and `beta` by at most `tol` relative to its size; with `tol = 0` it runs
/// exactly `max_iter` steps.
///
/// # Errors
/// A penalty the model refuses, a `gamma` that is not finite and `> 0`, a `q` that is not
/// finite (it may lie outside `[0, 1]` only as a policy allowing it would), a `tol` that is
/// not finite and `>= 0`, a start of another length or with non-finite values.
pub fn ista_forward(
    model: &LassoModel,
    penalty: &Penalty,
    beta0: Option<ArrayView1<'_, f64>>,
    gamma: f64,
    q: f64,
    max_iter: usize,
    tol: f64,
) -> Result<UnrolledRun> {
    const OP: &str = "unrolled ISTA";
    let p = model.p();
    penalty.validate(OP, p)?;
    if !(gamma.is_finite() && gamma > 0.0) {
        return Err(Error::invalid(
            OP,
            format!("the step must be finite and > 0, got {gamma}"),
        ));
    }
    if !q.is_finite() {
        return Err(Error::invalid(
            OP,
            format!("the selection q at the threshold must be finite, got {q}"),
        ));
    }
    if !(tol.is_finite() && tol >= 0.0) {
        return Err(Error::invalid(OP, format!("tol must be finite and >= 0, got {tol}")));
    }
    if let Some((j, v)) = beta0.iter().flatten().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::invalid(
            OP,
            format!("the start has a non-finite value {v} at index {j}"),
        ));
    }
    let mut beta = match beta0 {
        Some(b) if b.len() != p => {
            return Err(Error::shapes(
                OP,
                &[b.len()],
                &[p],
                "the start needs one coefficient per feature",
            ));
        }
        Some(b) => b.to_vec(),
        None => vec![0.0; p],
    };
    let (w, l2) = (model.weight(), model.l2());
    let mut r: Vec<f64> = model.y().to_vec();
    for (j, &b) in beta.iter().enumerate() {
        if b != 0.0 {
            model.col(j).axpy(-b, &mut r);
        }
    }
    let per_feature = matches!(penalty, Penalty::PerFeature(_));
    let logistic = model.loss() == Loss::Logistic;
    // Columns of J (dense, rows outside `rows` are zero) and which hyperparameter each is.
    let mut keys: Vec<usize> = Vec::new();
    let mut cols: Vec<Vec<f64>> = Vec::new();
    let mut slot = vec![usize::MAX; if per_feature { p } else { 1 }];
    if !per_feature {
        keys.push(0);
        cols.push(vec![0.0; p]);
        slot[0] = 0;
    }
    let mut rows: Vec<usize> = Vec::new();
    let mut d = vec![0.0; p];
    let mut su = vec![0.0; p];
    let mut xj = vec![0.0; model.n()];
    let mut new_rows: Vec<usize> = Vec::new();
    let mut iterations = 0;
    let mut last_change = f64::INFINITY;
    let mut converged = false;
    while iterations < max_iter {
        let rho = model.generalized_residual(&r);
        let c = model.correlations(&rho);
        let curv = if logistic { Some(model.curvature(&r)) } else { None };
        let mut beta_change: f64 = 0.0;
        let mut beta_size: f64 = 0.0;
        new_rows.clear();
        for i in 0..p {
            let u = beta[i] + gamma * (c[i] - l2 * beta[i]);
            let t = gamma * penalty.at(i);
            d[i] = if u.abs() > t {
                1.0
            } else if u.abs() == t {
                q
            } else {
                0.0
            };
            su[i] = if u > 0.0 {
                1.0
            } else if u < 0.0 {
                -1.0
            } else {
                0.0
            };
            if d[i] > 0.0 {
                new_rows.push(i);
            }
            let nb = soft_threshold_scalar(u, t);
            if nb != beta[i] {
                model.col(i).axpy(beta[i] - nb, &mut r);
                beta_change = beta_change.max((nb - beta[i]).abs());
                beta[i] = nb;
            }
            beta_size = beta_size.max(nb.abs());
        }
        // Propagate every column: J <- D (J - gamma (w X^T X J + l2 J)).
        let mut previous: Vec<Vec<f64>> = Vec::with_capacity(cols.len());
        for col in cols.iter_mut() {
            xj.iter_mut().for_each(|v| *v = 0.0);
            for &i in &rows {
                if col[i] != 0.0 {
                    model.col(i).axpy(col[i], &mut xj);
                }
            }
            if let Some(cv) = &curv {
                xj.iter_mut().zip(cv).for_each(|(v, c)| *v *= c);
            }
            let mut next = vec![0.0; p];
            for &i in &new_rows {
                next[i] = d[i] * (col[i] - gamma * (w * model.col(i).dot(&xj) + l2 * col[i]));
            }
            std::mem::swap(col, &mut next);
            previous.push(next);
        }
        // Sources: -gamma lambda_i d_i sign(u_i), into column 0 or column i.
        for &i in &new_rows {
            let s = -gamma * penalty.at(i) * d[i] * su[i];
            let k = if per_feature { i } else { 0 };
            if slot[k] == usize::MAX {
                slot[k] = cols.len();
                keys.push(k);
                cols.push(vec![0.0; p]);
            }
            cols[slot[k]][i] += s;
        }
        let mut change: f64 = 0.0;
        let mut size: f64 = 0.0;
        for (c, col) in cols.iter().enumerate() {
            for &i in rows.iter().chain(new_rows.iter()) {
                let old = previous.get(c).map_or(0.0, |o| o[i]);
                change = change.max((col[i] - old).abs());
                size = size.max(col[i].abs());
            }
        }
        std::mem::swap(&mut rows, &mut new_rows);
        iterations += 1;
        last_change = if size > 0.0 { change / size } else { change };
        if tol > 0.0 && last_change <= tol && beta_change <= tol * beta_size.max(f64::MIN_POSITIVE) {
            converged = true;
            break;
        }
    }
    Ok(UnrolledRun {
        beta: Array1::from(beta),
        columns: keys.into_iter().zip(cols.into_iter().map(Array1::from)).collect(),
        iterations,
        last_change,
        converged,
    })
}

/// The unrolled hypergradient: ISTA from the fit's solution (or from zero, see
/// [`HypergradOptions::unrolled_warm`]) until the Jacobian settles, then `J^T grad C`.
/// Errors with [`Error::NotConverged`] when the budget runs out first, and as
/// [`super::hypergradient`].
pub fn hypergradient(
    model: &LassoModel,
    fit: &Fit,
    criterion: &dyn Criterion,
    options: &HypergradOptions,
) -> Result<Hypergradient> {
    let start = Instant::now();
    prepare(model, fit, options)?;
    let (check, kinks) = sets(model, fit, options)?;
    let gamma = options.step_for(model)?;
    let beta0 = options.unrolled_warm.then(|| fit.beta.view());
    let run = ista_forward(
        model,
        &fit.penalty,
        beta0,
        gamma,
        options.policy.soft_threshold,
        options.unrolled_max_iter,
        options.unrolled_tol,
    )?;
    if !run.converged {
        return Err(Error::NotConverged {
            solver: "unrolled ISTA (forward mode)",
            iterations: run.iterations,
            residual: run.last_change,
            tolerance: options.unrolled_tol,
        });
    }
    let g = criterion.gradient(run.beta.view())?;
    check_criterion(model, &g)?;
    let gradient = run.vjp(g.view(), fit.penalty.len())?;
    Ok(Hypergradient {
        method: Method::Unrolled,
        value: criterion.value(run.beta.view())?,
        gradient,
        check,
        layer_check: None,
        kinks,
        iterations: run.iterations,
        seconds: start.elapsed().as_secs_f64(),
    })
}
