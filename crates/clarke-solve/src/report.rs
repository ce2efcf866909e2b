//! Options and reports shared by the iterative linear solvers.
//!
//! Every iterative solver returns its answer together with a [`SolveReport`] whose
//! [`SolveStatus`] says, honestly, how the run ended. Non-convergence is not an error at the
//! call site (the caller may accept an approximate answer, for example in a truncated
//! backward pass), but [`SolveReport::into_result`] turns any status other than
//! [`SolveStatus::Converged`] into [`Error::NotConverged`] with the numbers.

use std::fmt;

use clarke_core::{Error, Result};

/// How an iterative solve ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SolveStatus {
    /// The residual reached the tolerance. For the Krylov solvers this is the *true*
    /// residual `b - A x`, recomputed from the returned `x`, not a recursively updated one.
    Converged,
    /// The iteration budget ran out before the tolerance was reached.
    MaxIterations,
    /// The method could not continue: a division by (numerically) zero such as
    /// `p^T A p <= 0` in CG (the operator is not symmetric positive definite), `(r_hat, r) = 0`
    /// in BiCGSTAB, a singular Hessenberg matrix in GMRES, a failed line search in Newton.
    Breakdown,
    /// The residual grew past the divergence factor times the initial residual.
    Diverged,
    /// A NaN or an infinity appeared in the right-hand side, the warm start, the operator's
    /// output or an iterate.
    NonFinite,
}

impl SolveStatus {
    /// `true` for [`SolveStatus::Converged`].
    pub fn is_converged(self) -> bool {
        self == SolveStatus::Converged
    }

    /// The status in words.
    pub fn as_str(self) -> &'static str {
        match self {
            SolveStatus::Converged => "converged",
            SolveStatus::MaxIterations => "maximum iterations reached",
            SolveStatus::Breakdown => "breakdown",
            SolveStatus::Diverged => "diverged",
            SolveStatus::NonFinite => "non-finite value",
        }
    }
}

impl fmt::Display for SolveStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an iterative linear solve did.
#[derive(Debug, Clone, PartialEq)]
pub struct SolveReport {
    /// Name of the solver (`"cg"`, `"gmres"`, `"bicgstab"`, `"neumann"`).
    pub solver: &'static str,
    /// Iterations run (see each solver for what one iteration is).
    pub iterations: usize,
    /// Applications of the operator (matrix-vector products), including the ones used to
    /// compute true residuals.
    pub matvecs: usize,
    /// Final residual of the returned `x`: `||b - A x||_2 / ||b||_2`, or the absolute
    /// `||b - A x||_2` when `b = 0`. NaN when the status is [`SolveStatus::NonFinite`] and the
    /// residual could not be computed.
    pub residual: f64,
    /// The tolerance that was asked for.
    pub tolerance: f64,
    /// How the run ended.
    pub status: SolveStatus,
    /// Residual after each iteration (same scale as `residual`, starting with the initial
    /// one), when [`SolveOptions::record_history`] is set; empty otherwise. For GMRES the inner
    /// entries are the residual estimates of the least-squares problem.
    pub residual_history: Vec<f64>,
}

impl SolveReport {
    /// `true` when the status is [`SolveStatus::Converged`].
    pub fn is_converged(&self) -> bool {
        self.status.is_converged()
    }

    /// `Ok(self)` if converged, otherwise [`Error::NotConverged`] carrying the solver name,
    /// iterations, final residual and tolerance.
    pub fn into_result(self) -> Result<Self> {
        if self.is_converged() {
            Ok(self)
        } else {
            Err(Error::NotConverged {
                solver: self.solver,
                iterations: self.iterations,
                residual: self.residual,
                tolerance: self.tolerance,
            })
        }
    }
}

impl SolveReport {
    /// The error of a layer whose `stage` (`"forward"` or `"adjoint"`) solve ended like
    /// this without converging: [`Error::SolveFailed`] with the numbers and the residual trace.
    pub fn failure(&self, node: &str, stage: &'static str) -> Error {
        Error::SolveFailed {
            node: node.to_string(),
            stage,
            solver: self.solver,
            status: self.status.as_str(),
            iterations: self.iterations,
            residual: self.residual,
            tolerance: self.tolerance,
            trace: self.residual_history.clone().into_boxed_slice(),
        }
    }
}

impl fmt::Display for SolveReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} after {} iterations ({} matvecs), residual {:e} (tolerance {:e})",
            self.solver, self.status, self.iterations, self.matvecs, self.residual, self.tolerance
        )
    }
}

/// Options of the iterative linear solvers.
///
/// The defaults suit `f64`; for `f32` use [`SolveOptions::for_precision`] or a tolerance
/// around `1e-5`, since a residual below the precision of the type cannot be reached (the
/// solver would then honestly stop at [`SolveStatus::MaxIterations`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SolveOptions {
    /// Tolerance on the relative residual `||b - A x|| / ||b||` (absolute when `b = 0`).
    /// Default `1e-10`.
    pub tol: f64,
    /// Maximum number of iterations. Default 1000.
    pub max_iter: usize,
    /// Krylov subspace dimension between GMRES restarts (the `m` of GMRES(m)). Default 30.
    pub restart: usize,
    /// Record the residual after every iteration in [`SolveReport::residual_history`].
    /// Default `false`.
    pub record_history: bool,
    /// The run is declared [`SolveStatus::Diverged`] when the residual exceeds this factor
    /// times the initial residual. Default `1e8`.
    pub divergence_factor: f64,
}

impl Default for SolveOptions {
    fn default() -> Self {
        SolveOptions {
            tol: 1e-10,
            max_iter: 1000,
            restart: 30,
            record_history: false,
            divergence_factor: 1e8,
        }
    }
}

impl SolveOptions {
    /// The defaults, with a tolerance suited to the scalar type: `1e-10` for `f64`, `1e-5`
    /// for `f32`.
    pub fn for_precision<S: clarke_core::Scalar>() -> Self {
        let tol = if S::epsilon().to_f64_exact() > 1e-10 {
            1e-5
        } else {
            1e-10
        };
        SolveOptions {
            tol,
            ..Default::default()
        }
    }

    /// Sets the tolerance.
    pub fn with_tol(mut self, tol: f64) -> Self {
        self.tol = tol;
        self
    }

    /// Sets the iteration budget.
    pub fn with_max_iter(mut self, max_iter: usize) -> Self {
        self.max_iter = max_iter;
        self
    }

    /// Sets the GMRES restart length.
    pub fn with_restart(mut self, restart: usize) -> Self {
        self.restart = restart;
        self
    }

    /// Turns the residual history on or off.
    pub fn with_history(mut self, record: bool) -> Self {
        self.record_history = record;
        self
    }

    /// Sets the divergence factor.
    pub fn with_divergence_factor(mut self, factor: f64) -> Self {
        self.divergence_factor = factor;
        self
    }

    /// Checks the options, naming `op` in the error: a finite tolerance `>= 0`, a restart
    /// length of at least 1, a divergence factor above 1. Every solver validates its options
    /// on entry; layers call this when they are built, so bad options are refused before
    /// the first solve.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        if !(self.tol.is_finite() && self.tol >= 0.0) {
            return Err(Error::invalid(
                op,
                format!("tolerance must be finite and >= 0, got {}", self.tol),
            ));
        }
        if self.restart == 0 {
            return Err(Error::invalid(op, "restart length must be at least 1, got 0"));
        }
        if self.divergence_factor.is_nan() || self.divergence_factor <= 1.0 {
            return Err(Error::invalid(
                op,
                format!("divergence factor must be > 1, got {}", self.divergence_factor),
            ));
        }
        Ok(())
    }
}
