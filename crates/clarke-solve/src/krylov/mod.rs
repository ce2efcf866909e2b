//! Matrix-free iterative solvers for `A x = b` on a [`LinearOperator`].
//!
//! All have the same shape:
//!
//! ```text
//! fn solver<S: Scalar>(op: &impl LinearOperator<S>, b, x0: Option<warm start>, opts: &SolveOptions)
//!     -> Result<(Array1<S>, SolveReport)>
//! ```
//!
//! `Err` is returned only for bad input (a non-square operator, a length mismatch, invalid
//! options) or when the operator itself fails; non-convergence is a [`SolveStatus`] in the
//! report. NaN or infinity in `b`, in the warm start or in an iterate gives
//! [`SolveStatus::NonFinite`]. When a solver says [`SolveStatus::Converged`], the residual was
//! recomputed as `b - A x` from the returned `x`.
//!
//! Which one to use:
//! - [`neumann`]: `(I - A) x = b` by `x <- A x + b`; needs a contraction (`rho(A) < 1`), which
//!   is the "AID-FP" adjoint of a contractive fixed-point layer. Takes `A`, not `I - A`.
//! - [`anderson_neumann`]: the same system and operator, with Anderson mixing of the
//!   iterates: a Krylov method in disguise, far fewer products for slow contractions.
//! - [`cg`]: symmetric positive definite operators.
//! - [`gmres`]: any nonsingular operator (restarted, so convergence is not guaranteed for
//!   hard problems, but the residual never increases).
//! - [`bicgstab`]: any nonsingular operator, short recurrences (less memory than GMRES),
//!   irregular convergence, may break down.

mod anderson_neumann;
mod bicgstab;
mod cg;
mod gmres;
mod neumann;

pub use anderson_neumann::anderson_neumann;
pub use bicgstab::bicgstab;
pub use cg::cg;
pub use gmres::gmres;
pub use neumann::neumann;

use clarke_core::{Result, Scalar};
use ndarray::{Array1, ArrayView1};

use crate::linop::LinearOperator;
use crate::report::{SolveOptions, SolveReport, SolveStatus};
use crate::util::{all_finite, check_len, f, initial_guess, norm2};

/// Bookkeeping shared by the Krylov solvers: counts, history, the residual scale.
pub(crate) struct Run {
    solver: &'static str,
    tol: f64,
    record: bool,
    history: Vec<f64>,
    pub(crate) matvecs: usize,
    pub(crate) iterations: usize,
    divergence_factor: f64,
    initial: f64,
}

impl Run {
    fn new(solver: &'static str, opts: &SolveOptions) -> Self {
        Run {
            solver,
            tol: opts.tol,
            record: opts.record_history,
            history: Vec::new(),
            matvecs: 0,
            iterations: 0,
            divergence_factor: opts.divergence_factor,
            initial: f64::NAN,
        }
    }

    /// Records a residual (the first call sets the reference for divergence).
    fn push(&mut self, residual: f64) {
        if self.initial.is_nan() {
            self.initial = residual;
        }
        if self.record {
            self.history.push(residual);
        }
    }

    fn diverged(&self, residual: f64) -> bool {
        self.initial > 0.0 && residual > self.divergence_factor * self.initial
    }

    /// How a fixed-point style iteration ends at `residual` (recorded already), if it ends
    /// here: a non-finite residual, the tolerance met, divergence, or the iteration budget.
    fn end(&self, residual: f64, opts: &SolveOptions) -> Option<SolveStatus> {
        if !residual.is_finite() {
            Some(SolveStatus::NonFinite)
        } else if residual <= opts.tol {
            Some(SolveStatus::Converged)
        } else if self.diverged(residual) {
            Some(SolveStatus::Diverged)
        } else if self.iterations >= opts.max_iter {
            Some(SolveStatus::MaxIterations)
        } else {
            None
        }
    }

    fn report(self, residual: f64, status: SolveStatus) -> SolveReport {
        SolveReport {
            solver: self.solver,
            iterations: self.iterations,
            matvecs: self.matvecs,
            residual,
            tolerance: self.tol,
            status,
            residual_history: self.history,
        }
    }
}

/// The validated problem: dimension, starting point, `||b||` scale.
pub(crate) struct Problem<S: Scalar> {
    pub(crate) x: Array1<S>,
    /// `||b||`, or one when `b = 0` (so residuals are absolute then).
    pub(crate) scale: S,
    pub(crate) warm: bool,
}

/// What [`setup`] decided.
pub(crate) enum Start<S: Scalar> {
    /// Iterate from here.
    Iterate(Problem<S>, Run),
    /// Nothing to iterate: the answer (exact, or non-finite input) is already known.
    Done(Array1<S>, SolveReport),
}

/// Validates the inputs and handles the trivial cases (non-finite input, `b = 0` without
/// warm start).
pub(crate) fn setup<S: Scalar>(
    solver: &'static str,
    op: &impl LinearOperator<S>,
    b: ArrayView1<'_, S>,
    x0: Option<ArrayView1<'_, S>>,
    opts: &SolveOptions,
) -> Result<Start<S>> {
    opts.validate(solver)?;
    let n = op.square_dim(solver)?;
    check_len(solver, "the right-hand side b", b.len(), n)?;
    let warm = x0.is_some();
    let x = initial_guess(solver, x0, n)?;
    let mut run = Run::new(solver, opts);
    if !all_finite(b) || !all_finite(x.view()) {
        run.push(f64::NAN);
        return Ok(Start::Done(x, run.report(f64::NAN, SolveStatus::NonFinite)));
    }
    let bnorm = norm2(b);
    if bnorm == S::zero() && !warm {
        run.push(0.0);
        return Ok(Start::Done(x, run.report(0.0, SolveStatus::Converged)));
    }
    let scale = if bnorm > S::zero() { bnorm } else { S::one() };
    Ok(Start::Iterate(Problem { x, scale, warm }, run))
}

/// `r = A x + b - x`: the residual of `x` for `(I - A) x = b`, and the plain step of the
/// Neumann iteration from it. `cold` says `x` is the zero start, where it is `b` without a
/// product.
pub(crate) fn neumann_residual<S: Scalar>(
    a: &impl LinearOperator<S>,
    b: ArrayView1<'_, S>,
    x: ArrayView1<'_, S>,
    cold: bool,
    r: &mut Array1<S>,
    run: &mut Run,
) -> Result<()> {
    if cold {
        r.assign(&b);
        return Ok(());
    }
    a.apply(x, r.view_mut())?;
    run.matvecs += 1;
    ndarray::Zip::from(r)
        .and(&b)
        .and(&x)
        .for_each(|ri, &bi, &xi| *ri = *ri + bi - xi);
    Ok(())
}

/// `r = b - A x`, counting the product.
pub(crate) fn true_residual<S: Scalar>(
    op: &impl LinearOperator<S>,
    b: ArrayView1<'_, S>,
    x: ArrayView1<'_, S>,
    run: &mut Run,
) -> Result<Array1<S>> {
    let mut r = Array1::zeros(b.len());
    op.apply(x, r.view_mut())?;
    run.matvecs += 1;
    r.zip_mut_with(&b, |ri, &bi| *ri = bi - *ri);
    Ok(r)
}

/// `||r|| / scale` in `f64`.
pub(crate) fn rel<S: Scalar>(r: ArrayView1<'_, S>, scale: S) -> f64 {
    f(norm2(r)) / f(scale)
}

/// Finishes a run that stopped without converging: recomputes the true residual of `x` so
/// that the report describes the returned vector, and keeps `status` unless that residual
/// turns out to meet the tolerance (then the answer is good and says so).
pub(crate) fn finish<S: Scalar>(
    op: &impl LinearOperator<S>,
    b: ArrayView1<'_, S>,
    x: Array1<S>,
    scale: S,
    mut run: Run,
    status: SolveStatus,
) -> Result<(Array1<S>, SolveReport)> {
    if status == SolveStatus::NonFinite || !all_finite(x.view()) {
        return Ok((x, run.report(f64::NAN, SolveStatus::NonFinite)));
    }
    let r = true_residual(op, b, x.view(), &mut run)?;
    let res = rel(r.view(), scale);
    let status = if !res.is_finite() {
        SolveStatus::NonFinite
    } else if res <= run.tol {
        SolveStatus::Converged
    } else {
        status
    };
    Ok((x, run.report(res, status)))
}
