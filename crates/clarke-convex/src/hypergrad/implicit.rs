//! The generic hypergradient: a `clarke-implicit` fixed-point layer on the
//! forward-backward map.
//!
//! The map `T(beta, theta) = S_{gamma e^theta}(beta - gamma (w X^T (mu(X beta) - y) + l2
//! beta))` (`mu` the identity, or the sigmoid for the logistic loss) is recorded with tape ops ([`crate::prox::soft_threshold`] for the prox), so nothing here
//! knows about supports: the layer solves the forward problem (from the coordinate-descent
//! solution, so it converges at once), solves the adjoint `(I - J_beta)^T v = grad C` with
//! GMRES (dense LU for small `p`), checks `I - J_beta`, and returns `J_theta^T v`. The kink
//! policy of the backward call reaches the prox's VJP inside the layer.
//!
//! On a sparse design the layer runs on the equicorrelation set `E` only (its columns as a
//! dense `n x |E|` block): off `E` the prox input lies strictly inside the threshold (by
//! more than the kink band), so every selection of the prox's Jacobian is 0 there, `I -
//! J_beta` is block triangular with the identity on the rest, and the restricted layer has
//! the same solution, the same adjoint on `E`, and the same invertibility verdict, without
//! an `n x p` dense copy of `X`. The dense design keeps the full map, so the two routes
//! cross-check each other.

use clarke_core::{BackwardOptions, Error, Result, Tape};
use clarke_implicit::{AdjointSolver, CheckOptions, ForwardSolver, GradientMode, ImplicitLayer, ImplicitOptions};
use clarke_solve::{FixedPointOptions, SolveOptions};
use ndarray::{Array1, ArrayD, IxDyn};

use super::{Criterion, HypergradOptions, Hypergradient, Method, Start};
use crate::cd::Fit;
use crate::model::{LassoModel, Loss, Penalty};
use crate::prox::soft_threshold;

/// Above this many features the adjoint is solved by GMRES instead of dense LU.
const DENSE_ADJOINT_LIMIT: usize = 256;

/// The generic implicit-layer hypergradient (see the module documentation).
///
/// # Errors
/// As [`super::hypergradient`]; the implicit layer's errors (a failed solve, a violated
/// hypothesis).
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
    let gamma = options.step_for(model)?;
    let (w, l2) = (model.weight(), model.l2());
    // The coordinates the layer runs on: every feature, or `E` on a sparse design.
    let coords: Option<Vec<usize>> = model.is_sparse().then(|| check.equicorrelation.clone());
    let p = coords.as_ref().map_or(model.p(), Vec::len);
    if p == 0 {
        // Nothing is active or at a kink: beta = 0 on a neighbourhood of lambda.
        return Ok(Hypergradient {
            method: Method::Implicit,
            value: criterion.value(fit.beta.view())?,
            gradient: Array1::zeros(fit.penalty.len()),
            check,
            layer_check: None,
            kinks,
            iterations: 0,
            seconds: start.elapsed().as_secs_f64(),
        });
    }
    let restrict = |v: &Array1<f64>| -> Array1<f64> {
        match &coords {
            Some(idx) => Array1::from_iter(idx.iter().map(|&j| v[j])),
            None => v.clone(),
        }
    };
    let logistic = model.loss() == Loss::Logistic;
    let solver = if p <= DENSE_ADJOINT_LIMIT {
        AdjointSolver::Dense
    } else {
        AdjointSolver::Gmres
    };
    let layer_options = ImplicitOptions::default()
        .with_name("lasso forward-backward")
        .with_forward_solver(ForwardSolver::Anderson)
        .with_forward(
            FixedPointOptions::default()
                .with_tol(options.implicit_tol)
                .with_max_iter(1_000),
        )
        .with_mode(GradientMode::Implicit(solver))
        .with_adjoint(
            SolveOptions::default()
                .with_tol(options.implicit_tol)
                .with_max_iter(10 * p.max(50)),
        )
        .with_warm_start(false)
        .with_check(CheckOptions::default());
    let layer = ImplicitLayer::fixed_point(
        move |z, th| {
            let (log_lambda, x, y) = (th[0], th[1], th[2]);
            let margin = x.try_matmul(z)?;
            let r = if logistic { margin.sigmoid() } else { margin }.try_sub(y)?;
            let grad = r.try_matmul(x)? * w + z * l2;
            let u = z - grad * gamma;
            Ok(soft_threshold(u, log_lambda.exp() * gamma)?.out)
        },
        layer_options,
    )?;
    let tape = Tape::<f64>::with_policy(options.policy.clone())?;
    let theta = match &fit.penalty {
        Penalty::Uniform(l) => ArrayD::from_elem(IxDyn(&[]), l.ln()),
        Penalty::PerFeature(l) => restrict(&l.mapv(f64::ln)).into_dyn(),
    };
    let log_lambda = tape.param(theta);
    let x_block = match &coords {
        Some(idx) => model.design().columns_dense(idx),
        None => model.x(),
    };
    let x = tape.constant(x_block.into_dyn());
    let y = tape.constant(model.y().to_owned().into_dyn());
    let solution = layer.apply(&restrict(&fit.beta).into_dyn(), &[log_lambda, x, y])?;
    let seed = restrict(&g).into_dyn();
    let grads = solution
        .z
        .backward_with(&BackwardOptions::seed(seed).with_policy(options.policy.clone()))?;
    let layer_gradient = Array1::from_iter(grads.wrt(log_lambda)?.iter().copied());
    let (beta, gradient) = match (&coords, &fit.penalty) {
        (None, _) => (Array1::from_iter(solution.z.value().iter().copied()), layer_gradient),
        (Some(idx), pen) => {
            let mut beta = Array1::zeros(model.p());
            for (&j, &b) in idx.iter().zip(solution.z.value().iter()) {
                beta[j] = b;
            }
            let gradient = match pen {
                Penalty::Uniform(_) => layer_gradient,
                Penalty::PerFeature(_) => {
                    let mut full = Array1::zeros(model.p());
                    for (&j, &d) in idx.iter().zip(layer_gradient.iter()) {
                        full[j] = d;
                    }
                    full
                }
            };
            (beta, gradient)
        }
    };
    let report = layer
        .reports()
        .last()
        .ok_or_else(|| Error::invalid("implicit hypergradient", "the layer logged no backward report"))?;
    let iterations = report.forward.iterations + report.adjoint.as_ref().map_or(0, |a| a.iterations);
    Ok(Hypergradient {
        method: Method::Implicit,
        value: criterion.value(beta.view())?,
        gradient,
        check,
        layer_check: Some(report.check.clone()),
        kinks,
        iterations,
        seconds: start.elapsed().as_secs_f64(),
    })
}
