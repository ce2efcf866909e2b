//! The forward solve of an implicit layer: find `z*` without recording.

use clarke_core::{Error, Result, Scalar};
use clarke_solve::{FixedPointReport, SolveStatus, anderson, broyden, newton_krylov, picard};
use ndarray::{Array1, ArrayView1, ArrayViewD};

use crate::check::Form;
use crate::inner::InnerMap;
use crate::options::{ForwardSolver, ImplicitOptions};

/// The solver used when the options do not name one.
pub(crate) fn default_solver(form: Form) -> ForwardSolver {
    match form {
        Form::FixedPoint => ForwardSolver::Anderson,
        Form::Root => ForwardSolver::NewtonKrylov,
    }
}

/// Solves for `z*` from `z0`. A solve that does not converge is an
/// [`Error::SolveFailed`] with the residual trace, unless the options accept it.
pub(crate) fn solve_forward<S: Scalar>(
    inner: &InnerMap<S>,
    form: Form,
    z0: ArrayView1<'_, S>,
    theta: &[ArrayViewD<'_, S>],
    options: &ImplicitOptions,
) -> Result<(Array1<S>, FixedPointReport)> {
    let scratch = inner.scratch(theta);
    let eval = |z: ArrayView1<'_, S>| inner.eval_in(&scratch, z);
    // A root layer iterates the fixed-point map z - F(z); a fixed-point layer hands
    // Newton-Krylov the residual T(z) - z.
    let as_fixed_point = |z: ArrayView1<'_, S>| Ok(&z - &eval(z)?);
    let as_root = |z: ArrayView1<'_, S>| Ok(&eval(z)? - &z);
    let solver = options.forward_solver.unwrap_or_else(|| default_solver(form));
    let fp = &options.forward;
    let result = match (form, solver) {
        (Form::FixedPoint, ForwardSolver::Picard) => picard(eval, z0, fp),
        (Form::FixedPoint, ForwardSolver::Anderson) => anderson(eval, z0, fp),
        (Form::FixedPoint, ForwardSolver::Broyden) => broyden(eval, z0, fp),
        (Form::FixedPoint, ForwardSolver::NewtonKrylov) => newton_krylov(as_root, z0, &options.newton),
        (Form::Root, ForwardSolver::Picard) => picard(as_fixed_point, z0, fp),
        (Form::Root, ForwardSolver::Anderson) => anderson(as_fixed_point, z0, fp),
        (Form::Root, ForwardSolver::Broyden) => broyden(as_fixed_point, z0, fp),
        (Form::Root, ForwardSolver::NewtonKrylov) => newton_krylov(eval, z0, &options.newton),
    };
    let (z, report) = result.map_err(|e| match e {
        e @ Error::InImplicit { .. } => e,
        e => Error::InImplicit {
            node: inner.name.clone(),
            context: "forward solve",
            source: Box::new(e),
        },
    })?;
    // An exhausted budget may be accepted; divergence, breakdown and non-finite values never.
    let accepted = !options.require_forward_convergence && report.status == SolveStatus::MaxIterations;
    if !report.is_converged() && !accepted {
        return Err(Error::SolveFailed {
            node: inner.name.clone(),
            stage: "forward",
            solver: report.solver,
            status: report.status.as_str(),
            iterations: report.iterations,
            residual: report.residual,
            tolerance: report.tolerance,
            trace: report.trace.clone().into_boxed_slice(),
        });
    }
    Ok((z, report))
}
