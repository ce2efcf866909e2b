//! Hyperparameter search: gradient steps on `log lambda` against a warm-started grid.
//!
//! [`gradient_search`] minimises `C(beta_hat(lambda))` over `theta = log lambda` (one value,
//! or one per feature) with hypergradients, every inner solve warm-started from the
//! previous one. Two steppers: gradient steps with Barzilai-Borwein lengths (the secant
//! step for one hyperparameter) and Armijo backtracking (for one or a few hyperparameters),
//! and Adam (for many). An optional coarse grid chooses the starting basin. [`grid_search`] solves along a decreasing grid of
//! `lambda`s with warm starts and keeps the best point. Both return their path and wall time.

use std::time::Instant;

use clarke_core::{Error, Result};
use ndarray::Array1;

use crate::cd::{CdOptions, Fit, solve};
use crate::hypergrad::{Criterion, HypergradOptions, Method, hypergradient};
use crate::model::{LassoModel, Penalty};

/// How [`gradient_search`] steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stepper {
    /// Gradient descent with Armijo backtracking. The step length is Barzilai-Borwein's
    /// `s.s / s.y` from the last two points when `s.y > 0` (for one hyperparameter: the
    /// secant step towards a zero of the hypergradient); otherwise a trial that moves
    /// `theta` by `initial_step` in max norm at first and twice the last move after.
    LineSearch {
        /// Size of the first trial step in max norm (in `log lambda`).
        initial_step: f64,
    },
    /// Adam with this learning rate (in `log lambda`), `beta1 = 0.9`, `beta2 = 0.999`.
    Adam {
        /// Learning rate.
        lr: f64,
    },
}

/// Options of [`gradient_search`].
#[derive(Debug, Clone, PartialEq)]
pub struct SearchOptions {
    /// The stepper. Default a line search with initial step 1.
    pub stepper: Stepper,
    /// Largest number of accepted steps (Adam: steps). Default 30.
    pub max_iter: usize,
    /// Line search: stop when an accepted step moves `theta` by less than this (max norm).
    /// Default `1e-3`.
    pub tol: f64,
    /// Points of a coarse warm-started grid (from `lambda_max` down to `lambda_max *
    /// coarse_ratio`) whose best point replaces the start; 0 (default) starts at `init`.
    /// The validation curve of a Lasso is often multimodal; a few grid points pick the basin
    /// and the gradient steps refine inside it.
    pub coarse_grid: usize,
    /// Smallest `lambda / lambda_max` of the coarse grid. Default `0.01`.
    pub coarse_ratio: f64,
    /// Tolerance of the coarse grid's solves (at least `cd.tol`). Default `1e-5`.
    pub coarse_tol: f64,
    /// Line search: largest trial step in max norm (in `log lambda`): trial steps double
    /// after each success up to this. Default `1`.
    pub max_step: f64,
    /// Line search: stop when an accepted step improves the criterion by less than this,
    /// relative. Default `1e-9`.
    pub rel_improvement: f64,
    /// Hypergradient method. Default [`Method::Support`].
    pub method: Method,
    /// Options of the hypergradient.
    pub hypergrad: HypergradOptions,
    /// Options of the inner solves.
    pub cd: CdOptions,
    /// `lambda` stays in `[lambda_max * min_ratio, lambda_max * max_ratio]`. Defaults
    /// `1e-4` and `1` (a per-feature penalty may go to `10 lambda_max`, which removes a
    /// feature).
    pub min_ratio: f64,
}

impl SearchOptions {
    /// Checks the options [`gradient_search`] reads itself (the inner solves and the
    /// hypergradients check theirs): the stepper's step, `tol`, `max_step`,
    /// `rel_improvement`, `min_ratio` and, with a coarse grid, `coarse_ratio` and
    /// `coarse_tol`.
    fn validate(&self, op: &'static str) -> Result<()> {
        let (step_name, step) = match self.stepper {
            Stepper::LineSearch { initial_step } => ("initial_step", initial_step),
            Stepper::Adam { lr } => ("lr", lr),
        };
        positive(op, step_name, step)?;
        positive(op, "max_step", self.max_step)?;
        non_negative(op, "tol", self.tol)?;
        non_negative(op, "rel_improvement", self.rel_improvement)?;
        if !(self.min_ratio > 0.0 && self.min_ratio < 1.0) {
            return Err(Error::invalid(
                op,
                format!("min_ratio must be in (0, 1), got {}", self.min_ratio),
            ));
        }
        if self.coarse_grid > 0 {
            check_ratio(op, "coarse_ratio", self.coarse_ratio)?;
            non_negative(op, "coarse_tol", self.coarse_tol)?;
        }
        Ok(())
    }
}

/// `Ok` when `v` is finite and `> 0`, else an error naming `op` and the option.
fn positive(op: &'static str, name: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(op, format!("{name} must be finite and > 0, got {v}")))
    }
}

/// `Ok` when `v` is finite and `>= 0`, else an error naming `op` and the option.
fn non_negative(op: &'static str, name: &str, v: f64) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(op, format!("{name} must be finite and >= 0, got {v}")))
    }
}

/// `Ok` when `v` is in `(0, 1]`, else an error naming `op` and the option.
fn check_ratio(op: &'static str, name: &str, v: f64) -> Result<()> {
    if v > 0.0 && v <= 1.0 {
        Ok(())
    } else {
        Err(Error::invalid(op, format!("{name} must be in (0, 1], got {v}")))
    }
}

/// `C(beta)`, refused when it is not finite: a NaN value would lose every comparison and
/// leave a search on an arbitrary point.
fn criterion_value(op: &'static str, criterion: &dyn Criterion, fit: &Fit, lambda: f64) -> Result<f64> {
    let v = criterion.value(fit.beta.view())?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(Error::invalid(
            op,
            format!("the criterion is {v} at lambda = {lambda:e}; a search needs finite values"),
        ))
    }
}

/// `lambda_max` of `model`, refused when it is 0: then `beta = 0` for every `lambda > 0`
/// (no feature correlates with the response) and there is nothing to search.
fn positive_lambda_max(op: &'static str, model: &LassoModel) -> Result<f64> {
    let lmax = model.lambda_max();
    if lmax > 0.0 && lmax.is_finite() {
        Ok(lmax)
    } else {
        Err(Error::invalid(
            op,
            format!("lambda_max = {lmax}: no feature correlates with the response, beta = 0 for every lambda > 0"),
        ))
    }
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            stepper: Stepper::LineSearch { initial_step: 1.0 },
            max_iter: 30,
            tol: 1e-3,
            rel_improvement: 1e-9,
            max_step: 1.0,
            coarse_grid: 0,
            coarse_ratio: 0.01,
            coarse_tol: 1e-5,
            method: Method::Support,
            hypergrad: HypergradOptions::default(),
            cd: CdOptions::default(),
            min_ratio: 1e-4,
        }
    }
}

/// One point of a search path.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchStep {
    /// `lambda` (for a per-feature penalty: the geometric mean of the `lambda_j`).
    pub lambda: f64,
    /// The criterion at this point.
    pub value: f64,
    /// Max norm of the hypergradient.
    pub gradient_norm: f64,
    /// Support size.
    pub support: usize,
}

/// What [`gradient_search`] found.
#[derive(Debug, Clone)]
pub struct SearchResult {
    /// Accepted points, in order (the start first).
    pub path: Vec<SearchStep>,
    /// The best penalty found.
    pub best_penalty: Penalty,
    /// The criterion there.
    pub best_value: f64,
    /// The fit there.
    pub best_fit: Fit,
    /// Inner solves run (trial points included).
    pub solves: usize,
    /// Hypergradients computed.
    pub hypergradients: usize,
    /// Why it stopped.
    pub stop: String,
    /// Wall time, seconds.
    pub seconds: f64,
}

fn summary(pen: &Penalty) -> f64 {
    match pen {
        Penalty::Uniform(l) => *l,
        Penalty::PerFeature(l) => (l.iter().map(|v| v.ln()).sum::<f64>() / l.len() as f64).exp(),
    }
}

/// Minimises `criterion(beta_hat(lambda))` over `log lambda` from `init` (its kind sets the
/// hyperparameters: one, or one per feature).
///
/// # Errors
/// An `init` the model refuses ([`Penalty::validate`]), invalid options (a step or
/// `max_step` that is not finite and `> 0`, a negative or non-finite `tol` or
/// `rel_improvement`, `min_ratio` outside `(0, 1)`, with a coarse grid `coarse_ratio`
/// outside `(0, 1]`), a model with `lambda_max = 0`, a criterion value that is not finite;
/// errors of the inner solves (an unconverged one included) and of the hypergradients.
pub fn gradient_search(
    model: &LassoModel,
    criterion: &dyn Criterion,
    init: &Penalty,
    options: &SearchOptions,
) -> Result<SearchResult> {
    const OP: &str = "gradient_search";
    let start = Instant::now();
    init.validate(OP, model.p())?;
    options.validate(OP)?;
    let lmax = positive_lambda_max(OP, model)?;
    let lo = (lmax * options.min_ratio).ln();
    let hi = match init {
        Penalty::Uniform(_) => lmax.ln(),
        Penalty::PerFeature(_) => (10.0 * lmax).ln(),
    };
    let clamp = |t: Array1<f64>| t.mapv(|v| v.clamp(lo, hi));
    let mut solves = 0;
    let mut start_log = init.log();
    let mut start_fit: Option<Fit> = None;
    if options.coarse_grid > 0 {
        // A coarse warm-started grid picks the basin (its solves only need to rank the
        // points, hence `coarse_tol`); gradient steps refine from its best.
        let coarse_cd = CdOptions {
            tol: options.coarse_tol.max(options.cd.tol),
            ..options.cd.clone()
        };
        let mut best = f64::INFINITY;
        let mut warm: Option<Fit> = None;
        for l in try_geometric_grid(lmax, options.coarse_ratio, options.coarse_grid)? {
            let f = solve(
                model,
                &Penalty::Uniform(l),
                warm.as_ref().map(|f| f.beta.view()),
                &coarse_cd,
            )?
            .into_result()?;
            solves += 1;
            let v = criterion_value(OP, criterion, &f, l)?;
            if v < best {
                best = v;
                start_log.fill(l.ln());
                start_fit = Some(f.clone());
            }
            warm = Some(f);
        }
    }
    let mut theta = clamp(start_log);
    let mut pen = init.from_log_like(theta.view())?;
    let mut fit = solve(model, &pen, start_fit.as_ref().map(|f| f.beta.view()), &options.cd)?.into_result()?;
    solves += 1;
    let mut hg = hypergradient(model, &fit, criterion, options.method, &options.hypergrad)?;
    let mut hypergradients = 1;
    let norm = |g: &Array1<f64>| g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut path = vec![SearchStep {
        lambda: summary(&pen),
        value: hg.value,
        gradient_norm: norm(&hg.gradient),
        support: fit.support().len(),
    }];
    let mut stop = format!("{} steps", options.max_iter);
    let (mut m, mut v): (Array1<f64>, Array1<f64>) = (Array1::zeros(theta.len()), Array1::zeros(theta.len()));
    let mut trial = match options.stepper {
        Stepper::LineSearch { initial_step } => initial_step,
        Stepper::Adam { lr } => lr,
    };
    let (mut best_value, mut best_pen, mut best_fit) = (hg.value, pen.clone(), fit.clone());
    let mut last: Option<(Array1<f64>, Array1<f64>)> = None;
    for it in 0..options.max_iter {
        let g = hg.gradient.clone();
        let gn = norm(&g);
        if gn == 0.0 {
            stop = "zero hypergradient".to_string();
            break;
        }
        let (next_theta, next_fit, next_value) = match options.stepper {
            Stepper::LineSearch { .. } => {
                // Barzilai-Borwein step from the last two points (the secant step for one
                // hyperparameter) when the curvature is positive, else the trial step.
                let alpha = match &last {
                    Some((s, y)) if s.dot(y) > 0.0 => s.dot(s) / s.dot(y),
                    _ => trial / gn,
                };
                let mut t = alpha.min(options.max_step / gn);
                if t * gn < options.tol {
                    stop = format!("converged after {it} steps (predicted step {:.2e})", t * gn);
                    break;
                }
                let mut accepted = None;
                for _ in 0..30 {
                    let cand = clamp(&theta - &(&g * t));
                    let d = &cand - &theta;
                    if norm(&d) < options.tol {
                        break;
                    }
                    let cpen = init.from_log_like(cand.view())?;
                    let cfit = solve(model, &cpen, Some(fit.beta.view()), &options.cd)?.into_result()?;
                    solves += 1;
                    let cval = criterion_value(OP, criterion, &cfit, summary(&cpen))?;
                    if cval <= hg.value + 1e-4 * g.dot(&d) {
                        accepted = Some((cand, cfit, cval));
                        break;
                    }
                    t *= 0.5;
                }
                match accepted {
                    Some((cand, cfit, cval)) => {
                        trial = (2.0 * norm(&(&cand - &theta))).min(options.max_step);
                        (cand, cfit, cval)
                    }
                    None => {
                        stop = format!(
                            "converged after {it} steps: no decrease along the hypergradient above a step of {:e}",
                            options.tol
                        );
                        break;
                    }
                }
            }
            Stepper::Adam { lr } => {
                let (b1, b2) = (0.9, 0.999);
                m = &m * b1 + &g * (1.0 - b1);
                v = &v * b2 + &g.mapv(|x| x * x) * (1.0 - b2);
                let k = (it + 1) as i32;
                let mhat = &m / (1.0 - b1.powi(k));
                let vhat = &v / (1.0 - b2.powi(k));
                let step = &mhat / &(vhat.mapv(f64::sqrt) + 1e-8) * lr;
                let cand = clamp(&theta - &step);
                let cpen = init.from_log_like(cand.view())?;
                let cfit = solve(model, &cpen, Some(fit.beta.view()), &options.cd)?.into_result()?;
                solves += 1;
                let cval = criterion_value(OP, criterion, &cfit, summary(&cpen))?;
                (cand, cfit, cval)
            }
        };
        let moved = norm(&(&next_theta - &theta));
        let improvement = hg.value - next_value;
        let theta_before = std::mem::replace(&mut theta, next_theta);
        pen = init.from_log_like(theta.view())?;
        fit = next_fit;
        let previous_theta = theta_before;
        hg = hypergradient(model, &fit, criterion, options.method, &options.hypergrad)?;
        hypergradients += 1;
        last = Some((&theta - &previous_theta, &hg.gradient - &g));
        path.push(SearchStep {
            lambda: summary(&pen),
            value: hg.value,
            gradient_norm: norm(&hg.gradient),
            support: fit.support().len(),
        });
        if hg.value < best_value {
            best_value = hg.value;
            best_pen = pen.clone();
            best_fit = fit.clone();
        }
        let line_search = matches!(options.stepper, Stepper::LineSearch { .. });
        if line_search && (moved < options.tol || improvement.abs() <= options.rel_improvement * next_value.abs()) {
            stop = format!(
                "converged after {} steps (step {moved:.2e}, improvement {improvement:.2e})",
                it + 1
            );
            break;
        }
    }
    Ok(SearchResult {
        path,
        best_penalty: best_pen,
        best_value,
        best_fit,
        solves,
        hypergradients,
        stop,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `num` values from `lambda_max` down to `lambda_max * ratio`, evenly spaced in log
/// (`num == 1`: `lambda_max` alone).
///
/// # Errors
/// `num == 0`, a `lambda_max` that is not finite and `> 0`, a `ratio` outside `(0, 1]`,
/// naming `geometric_grid` and the value.
pub fn try_geometric_grid(lambda_max: f64, ratio: f64, num: usize) -> Result<Vec<f64>> {
    const OP: &str = "geometric_grid";
    if num == 0 {
        return Err(Error::invalid(OP, "num must be >= 1: the grid would be empty"));
    }
    positive(OP, "lambda_max", lambda_max)?;
    check_ratio(OP, "ratio", ratio)?;
    if num == 1 {
        return Ok(vec![lambda_max]);
    }
    Ok((0..num)
        .map(|k| lambda_max * ratio.powf(k as f64 / (num - 1) as f64))
        .collect())
}

/// Panicking form of [`try_geometric_grid`].
///
/// # Panics
/// On the arguments [`try_geometric_grid`] refuses, with its error.
#[track_caller]
pub fn geometric_grid(lambda_max: f64, ratio: f64, num: usize) -> Vec<f64> {
    try_geometric_grid(lambda_max, ratio, num).unwrap_or_else(|e| panic!("{e}"))
}

/// One grid point.
#[derive(Debug, Clone, PartialEq)]
pub struct GridPoint {
    /// `lambda`.
    pub lambda: f64,
    /// The criterion.
    pub value: f64,
    /// Support size.
    pub support: usize,
}

/// What [`grid_search`] found.
#[derive(Debug, Clone)]
pub struct GridResult {
    /// Every point, in the order solved.
    pub points: Vec<GridPoint>,
    /// The best `lambda`.
    pub best_lambda: f64,
    /// The criterion there.
    pub best_value: f64,
    /// The fit there.
    pub best_fit: Fit,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Solves at every `lambda` of `lambdas` (pass them decreasing), each warm-started from
/// the previous solution, and keeps the one with the smallest criterion (the first of
/// equal ones).
///
/// # Errors
/// An empty grid, a `lambda` that is not finite and `> 0` (with its index), a criterion
/// value that is not finite, naming `grid_search`; errors of the inner solves (an
/// unconverged one included).
pub fn grid_search(
    model: &LassoModel,
    criterion: &dyn Criterion,
    lambdas: &[f64],
    cd: &CdOptions,
) -> Result<GridResult> {
    const OP: &str = "grid_search";
    let start = Instant::now();
    if lambdas.is_empty() {
        return Err(Error::invalid(OP, "the grid is empty"));
    }
    if let Some((i, l)) = lambdas.iter().enumerate().find(|(_, l)| !(l.is_finite() && **l > 0.0)) {
        return Err(Error::invalid(
            OP,
            format!("every lambda must be finite and > 0, got lambdas[{i}] = {l}"),
        ));
    }
    let mut points = Vec::with_capacity(lambdas.len());
    let mut best: Option<(f64, f64, Fit)> = None;
    let mut warm: Option<Fit> = None;
    for &l in lambdas {
        let fit = solve(model, &Penalty::Uniform(l), warm.as_ref().map(|f| f.beta.view()), cd)?.into_result()?;
        let value = criterion_value(OP, criterion, &fit, l)?;
        points.push(GridPoint {
            lambda: l,
            value,
            support: fit.support().len(),
        });
        if best.as_ref().is_none_or(|b| value < b.1) {
            best = Some((l, value, fit.clone()));
        }
        warm = Some(fit);
    }
    let (best_lambda, best_value, best_fit) = best.expect("a non-empty grid");
    Ok(GridResult {
        points,
        best_lambda,
        best_value,
        best_fit,
        seconds: start.elapsed().as_secs_f64(),
    })
}
