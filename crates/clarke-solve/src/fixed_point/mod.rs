//! Forward solvers for fixed points `z = T(z)` and roots `F(z) = 0`.
//!
//! The map is a closure `FnMut(ArrayView1<S>) -> Result<Array1<S>>` over a flat state vector
//! (use [`flattened`] to wrap a map over matrices or higher-dimensional arrays). It may fail
//! (the error is passed on) and it may be expensive, so every solver counts its evaluations.
//!
//! - [`picard`]: damped fixed-point iteration, `z <- (1 - beta) z + beta T(z)`;
//! - [`anderson`]: Anderson acceleration (type II) with memory, Tikhonov regularisation and
//!   damping; the small least-squares problem goes through an SVD, so rank deficiency is
//!   handled;
//! - [`broyden`]: limited-memory "good" Broyden on `z - T(z) = 0`;
//! - [`newton_krylov`] / [`newton_krylov_with_jvp`]: inexact Newton for `F(z) = 0` with
//!   GMRES inner solves and a backtracking line search.
//!
//! **Residual of the fixed-point solvers:** `||T(z) - z||_2 / s` with the scale
//! `s = ||T(z0)||_2` fixed at the start (`s = 1` when `T(z0) = 0`, so the residual is
//! absolute then). For an affine map `T(z) = A z + c` started at `z0 = 0` this is exactly the
//! relative residual `||c - (I - A) z|| / ||c||` of the linear solvers. The returned `z` is
//! the iterate whose residual was measured (not one more application of `T`), so the
//! reported residual is that of the returned vector.
//!
//! **Residual of the root solvers:** the absolute `||F(z)||_2`.
//!
//! Non-convergence is a status, never a panic: a residual growing past
//! [`FixedPointOptions::divergence_factor`] times the initial one gives
//! [`SolveStatus::Diverged`], a NaN or infinity gives [`SolveStatus::NonFinite`], and the
//! trace of residuals is kept in both cases.

pub(crate) mod anderson;
mod broyden;
mod newton;
mod picard;

pub use anderson::anderson;
pub use broyden::broyden;
pub use newton::{NewtonKrylovOptions, newton_krylov, newton_krylov_with_jvp};
pub use picard::picard;

use std::fmt;

use clarke_core::{Error, Result, Scalar};
use ndarray::{Array, Array1, ArrayView, ArrayView1, Dimension};

use crate::report::SolveStatus;
use crate::util::{f, norm2};

/// Options of the fixed-point solvers ([`picard`], [`anderson`], [`broyden`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FixedPointOptions {
    /// Tolerance on the residual `||T(z) - z|| / ||T(z0)||` (see the module docs).
    /// Default `1e-10`.
    pub tol: f64,
    /// Maximum number of iterations (updates of `z`). Default 500.
    pub max_iter: usize,
    /// Damping (mixing) `beta` in `(0, 1]`: Picard takes `z + beta (T(z) - z)`, Anderson mixes
    /// with it, Broyden starts from the inverse-Jacobian guess `beta I`. Default 1.
    pub damping: f64,
    /// Anderson memory `m` (number of previous differences kept). Default 5.
    pub anderson_memory: usize,
    /// Relative Tikhonov regularisation of Anderson's least-squares problem (times the
    /// largest squared column norm). Default `1e-10`.
    pub regularization: f64,
    /// Broyden memory: rank-one updates kept before the inverse-Jacobian estimate restarts
    /// from `beta I`. Default 30.
    pub broyden_memory: usize,
    /// The run is declared [`SolveStatus::Diverged`] when the residual exceeds this factor
    /// times the initial residual. Default `1e6`.
    pub divergence_factor: f64,
    /// Keep the residual of every iterate in [`FixedPointReport::trace`]. Default `true`.
    pub record_trace: bool,
}

impl Default for FixedPointOptions {
    fn default() -> Self {
        FixedPointOptions {
            tol: 1e-10,
            max_iter: 500,
            damping: 1.0,
            anderson_memory: 5,
            regularization: 1e-10,
            broyden_memory: 30,
            divergence_factor: 1e6,
            record_trace: true,
        }
    }
}

impl FixedPointOptions {
    /// The defaults, with a tolerance suited to the scalar type: `1e-10` for `f64`, `1e-5`
    /// for `f32`.
    pub fn for_precision<S: Scalar>() -> Self {
        let tol = if S::epsilon().to_f64_exact() > 1e-10 {
            1e-5
        } else {
            1e-10
        };
        FixedPointOptions {
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

    /// Sets the damping `beta`.
    pub fn with_damping(mut self, beta: f64) -> Self {
        self.damping = beta;
        self
    }

    /// Sets the Anderson memory.
    pub fn with_anderson_memory(mut self, m: usize) -> Self {
        self.anderson_memory = m;
        self
    }

    /// Sets Anderson's relative regularisation.
    pub fn with_regularization(mut self, lambda: f64) -> Self {
        self.regularization = lambda;
        self
    }

    /// Sets the Broyden memory.
    pub fn with_broyden_memory(mut self, m: usize) -> Self {
        self.broyden_memory = m;
        self
    }

    /// Sets the divergence factor.
    pub fn with_divergence_factor(mut self, factor: f64) -> Self {
        self.divergence_factor = factor;
        self
    }

    /// Turns the trace on or off.
    pub fn with_trace(mut self, record: bool) -> Self {
        self.record_trace = record;
        self
    }

    /// Checks the options, naming `op` in the error: a finite tolerance `>= 0`, damping in
    /// `(0, 1]`, a finite regularization `>= 0`, a divergence factor above 1. Every solver
    /// validates its options on entry; layers call this when they are built.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        if !(self.tol.is_finite() && self.tol >= 0.0) {
            return Err(Error::invalid(
                op,
                format!("tolerance must be finite and >= 0, got {}", self.tol),
            ));
        }
        if !(self.damping > 0.0 && self.damping <= 1.0) {
            return Err(Error::invalid(
                op,
                format!("damping must be in (0, 1], got {}", self.damping),
            ));
        }
        if !(self.regularization.is_finite() && self.regularization >= 0.0) {
            return Err(Error::invalid(
                op,
                format!("regularization must be finite and >= 0, got {}", self.regularization),
            ));
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

/// What a fixed-point or root solve did.
#[derive(Debug, Clone, PartialEq)]
pub struct FixedPointReport {
    /// Name of the solver (`"picard"`, `"anderson"`, `"broyden"`, `"newton_krylov"`).
    pub solver: &'static str,
    /// Iterations run (updates of `z`).
    pub iterations: usize,
    /// Evaluations of the map (`T` or `F`), including those of line searches and of
    /// finite-difference Jacobian-vector products.
    pub evaluations: usize,
    /// Inner linear iterations (GMRES steps of Newton-Krylov; 0 for the other solvers).
    pub inner_iterations: usize,
    /// Residual of the returned `z` (see the module docs for its definition per solver).
    pub residual: f64,
    /// The tolerance that was asked for.
    pub tolerance: f64,
    /// How the run ended.
    pub status: SolveStatus,
    /// Residual of every iterate, starting with `z0`, when tracing is on (default).
    pub trace: Vec<f64>,
}

impl FixedPointReport {
    /// `true` when the status is [`SolveStatus::Converged`].
    pub fn is_converged(&self) -> bool {
        self.status.is_converged()
    }

    /// `Ok(self)` if converged, otherwise [`Error::NotConverged`] with the numbers.
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

impl fmt::Display for FixedPointReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} after {} iterations ({} evaluations), residual {:e} (tolerance {:e})",
            self.solver, self.status, self.iterations, self.evaluations, self.residual, self.tolerance
        )
    }
}

/// Calls the map, checks the output length and counts evaluations.
pub(crate) struct Evaluator<F> {
    solver: &'static str,
    map: F,
    n: usize,
    pub(crate) count: usize,
}

impl<F> Evaluator<F> {
    pub(crate) fn new(solver: &'static str, map: F, n: usize) -> Self {
        Evaluator {
            solver,
            map,
            n,
            count: 0,
        }
    }

    pub(crate) fn eval<S: Scalar>(&mut self, z: ArrayView1<'_, S>) -> Result<Array1<S>>
    where
        F: FnMut(ArrayView1<'_, S>) -> Result<Array1<S>>,
    {
        self.count += 1;
        let out = (self.map)(z)?;
        if out.len() != self.n {
            return Err(Error::shapes(
                self.solver,
                &[out.len()],
                &[self.n],
                "the map must return a vector of the same length as its input",
            ));
        }
        Ok(out)
    }
}

/// Residual bookkeeping: scale, trace, divergence, report.
pub(crate) struct Tracker {
    solver: &'static str,
    tol: f64,
    record: bool,
    trace: Vec<f64>,
    scale: f64,
    initial: f64,
    divergence_factor: f64,
    /// Rounding resolution of the last residual: `eps * ||z|| / scale`. A residual below it
    /// says nothing (for huge `z`, `T(z) - z` rounds to zero whatever `T` is).
    floor: f64,
    pub(crate) iterations: usize,
    pub(crate) inner_iterations: usize,
}

impl Tracker {
    pub(crate) fn new(solver: &'static str, opts: &FixedPointOptions) -> Self {
        Tracker {
            solver,
            tol: opts.tol,
            record: opts.record_trace,
            trace: Vec::new(),
            scale: f64::NAN,
            initial: f64::NAN,
            divergence_factor: opts.divergence_factor,
            floor: 0.0,
            iterations: 0,
            inner_iterations: 0,
        }
    }

    /// A tracker for root solvers (absolute residual, no divergence factor).
    pub(crate) fn absolute(solver: &'static str, tol: f64, record: bool) -> Self {
        Tracker {
            solver,
            tol,
            record,
            trace: Vec::new(),
            scale: 1.0,
            initial: f64::NAN,
            divergence_factor: f64::INFINITY,
            floor: 0.0,
            iterations: 0,
            inner_iterations: 0,
        }
    }

    /// Sets the scale from the first map value `T(z0)` (only once).
    pub(crate) fn set_scale<S: Scalar>(&mut self, tz0: ArrayView1<'_, S>) {
        if self.scale.is_nan() {
            let s = f(norm2(tz0));
            self.scale = if s > 0.0 && s.is_finite() { s } else { 1.0 };
        }
    }

    /// Records a residual computed elsewhere (or NaN for a non-finite start).
    pub(crate) fn push(&mut self, r: f64) {
        if self.initial.is_nan() {
            self.initial = r;
        }
        if self.record {
            self.trace.push(r);
        }
    }

    /// Scaled residual of a difference vector `T(z) - z` (or of `F(z)`), recorded.
    pub(crate) fn residual<S: Scalar>(&mut self, g: ArrayView1<'_, S>) -> f64 {
        let r = f(norm2(g)) / self.scale;
        self.push(r);
        r
    }

    /// Scaled residual of `g = T(z) - z` at the iterate `z`, recorded, with the rounding
    /// resolution at `z` noted for [`Tracker::check`].
    /// The resolution only matters once the residual meets the tolerance, so `||z||` is
    /// computed only then, not on every iteration.
    pub(crate) fn residual_at<S: Scalar>(&mut self, g: ArrayView1<'_, S>, z: ArrayView1<'_, S>) -> f64 {
        let r = self.residual(g);
        if r <= self.tol {
            self.floor = S::epsilon().to_f64_exact() * f(norm2(z)) / self.scale;
        }
        r
    }

    /// The status implied by a residual, if the run should stop. A residual at the tolerance
    /// from an iterate whose rounding resolution `eps ||z|| / scale` is above both ten times
    /// the tolerance and `1e-8` is a breakdown, not convergence: such an iterate ran away,
    /// and there `T(z) - z` rounds to zero for any map, including one without a fixed point.
    pub(crate) fn check(&self, residual: f64, max_iter: usize) -> Option<SolveStatus> {
        if !residual.is_finite() {
            Some(SolveStatus::NonFinite)
        } else if residual <= self.tol && self.floor > (10.0 * self.tol).max(1e-8) {
            Some(SolveStatus::Breakdown)
        } else if residual <= self.tol {
            Some(SolveStatus::Converged)
        } else if self.initial > 0.0 && residual > self.divergence_factor * self.initial {
            Some(SolveStatus::Diverged)
        } else if self.iterations >= max_iter {
            Some(SolveStatus::MaxIterations)
        } else {
            None
        }
    }

    pub(crate) fn report(self, evaluations: usize, residual: f64, status: SolveStatus) -> FixedPointReport {
        FixedPointReport {
            solver: self.solver,
            iterations: self.iterations,
            evaluations,
            inner_iterations: self.inner_iterations,
            residual,
            tolerance: self.tol,
            status,
            trace: self.trace,
        }
    }
}

/// Common input checks; returns the report to give back at once when `z0` is not finite.
pub(crate) fn start<S: Scalar>(
    solver: &'static str,
    z0: ArrayView1<'_, S>,
    opts: &FixedPointOptions,
) -> Result<Option<(Array1<S>, FixedPointReport)>> {
    opts.validate(solver)?;
    if z0.iter().any(|v| !v.is_finite()) {
        let mut t = Tracker::new(solver, opts);
        t.push(f64::NAN);
        return Ok(Some((z0.to_owned(), t.report(0, f64::NAN, SolveStatus::NonFinite))));
    }
    Ok(None)
}

/// Wraps a map over arrays of shape `shape` into a map over the flat (row-major) state, for
/// the solvers of this module.
///
/// The wrapped map refuses a flat state whose length is not the number of elements of
/// `shape` ([`Error::ShapeMismatch`]), a shape whose element count overflows `usize`
/// ([`Error::InvalidArgument`]) and an output of another shape than its input.
///
/// ```
/// use clarke_solve::fixed_point::{flattened, picard, FixedPointOptions};
/// use ndarray::{Array1, Array2, Ix2};
///
/// // Z = 0.5 Z + 1 on 2x3 matrices.
/// let map = flattened(Ix2(2, 3), |z: ndarray::ArrayView2<f64>| Ok(z.mapv(|v| 0.5 * v + 1.0)));
/// let (z, report) = picard(map, Array1::zeros(6).view(), &FixedPointOptions::default()).unwrap();
/// assert!(report.is_converged());
/// let z: Array2<f64> = z.into_shape_with_order((2, 3)).unwrap();
/// assert!((z[[1, 2]] - 2.0).abs() < 1e-8);
/// ```
pub fn flattened<S, D, F>(shape: D, mut map: F) -> impl FnMut(ArrayView1<'_, S>) -> Result<Array1<S>>
where
    S: Scalar,
    D: Dimension,
    F: FnMut(ArrayView<'_, S, D>) -> Result<Array<S, D>>,
{
    move |z: ArrayView1<'_, S>| {
        let want = shape.size_checked().ok_or_else(|| {
            Error::invalid(
                "flattened",
                format!("shape {:?} has more elements than a usize can count", shape.slice()),
            )
        })?;
        if z.len() != want {
            return Err(Error::shapes(
                "flattened",
                &[z.len()],
                shape.slice(),
                format!("the flat state must have {want} entries"),
            ));
        }
        let zd = z
            .to_shape(shape.clone())
            .map_err(|e| Error::invalid("flattened", e.to_string()))?;
        let out = map(zd.view())?;
        if out.raw_dim() != shape {
            return Err(Error::shapes(
                "flattened",
                out.shape(),
                shape.slice(),
                "the map must return an array of the shape of its input",
            ));
        }
        Ok(out.iter().cloned().collect())
    }
}
