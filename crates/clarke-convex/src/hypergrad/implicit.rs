//! The generic hypergradient: a `clarke-implicit` fixed-point layer on the
//! forward-backward map.
//!
//! The map `T(beta, theta) = S_{gamma e^theta}(beta - gamma (w X^T (mu(X beta) - y) + l2
//! beta))` (`mu` the identity, or the sigmoid for the logistic loss) is recorded with tape ops ([`crate::prox::soft_threshold`] for the prox), so nothing here
//! knows about supports: the layer solves the forward problem (from the coordinate-descent
//! solution, so it converges at once), solves the adjoint `(I - J_beta)^T v = grad C` with
//! GMRES (dense LU for small `p`), checks `I - J_beta`, and returns `J_theta^T v`. The kink
//! policy of the backward call reaches the prox's VJP inside the layer.

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
    } = Start::at(model, fit, criterion, options)?;
    let gamma = options.step_for(model)?;
    let (w, l2, p) = (model.weight(), model.l2(), model.p());
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
        Penalty::PerFeature(l) => l.mapv(f64::ln).into_dyn(),
    };
    let log_lambda = tape.param(theta);
    let x = tape.constant(model.x().into_dyn());
    let y = tape.constant(model.y().to_owned().into_dyn());
    let solution = layer.apply(&fit.beta.clone().into_dyn(), &[log_lambda, x, y])?;
    let beta = solution.z.value();
    let seed = g.into_dyn();
    let grads = solution
        .z
        .backward_with(&BackwardOptions::seed(seed).with_policy(options.policy.clone()))?;
    let gradient = Array1::from_iter(grads.wrt(log_lambda)?.iter().copied());
    let report = layer
        .reports()
        .last()
        .ok_or_else(|| Error::invalid("implicit hypergradient", "the layer logged no backward report"))?;
    let beta = Array1::from_iter(beta.iter().copied());
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
