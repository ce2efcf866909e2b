//! Inexact Newton-Krylov for roots `F(z) = 0`.

use std::cell::RefCell;

use clarke_core::{Error, Result, Scalar};
use ndarray::{Array1, ArrayView1, ArrayViewMut1};

use super::{Evaluator, FixedPointReport, Tracker};
use crate::krylov::gmres;
use crate::linop::LinearOperator;
use crate::report::{SolveOptions, SolveStatus};
use crate::util::{all_finite, f, norm2};

/// Options of [`newton_krylov`] and [`newton_krylov_with_jvp`].
#[derive(Debug, Clone, PartialEq)]
pub struct NewtonKrylovOptions {
    /// Tolerance on the absolute residual `||F(z)||_2`. Default `1e-10`.
    pub tol: f64,
    /// Maximum number of Newton steps. Default 50.
    pub max_iter: usize,
    /// Options of the inner GMRES solves (restart, iteration budget); their tolerance is
    /// replaced at each step by the forcing term. Default: restart 30, 200 iterations.
    pub inner: SolveOptions,
    /// Largest forcing term: the inner solve stops at relative residual
    /// `min(forcing_max, ||F(z)||)`, floored at what the Jacobian-vector products can
    /// resolve. Default `0.1`.
    pub forcing_max: f64,
    /// Halvings of the step allowed by the backtracking line search (sufficient decrease
    /// `||F(z + t d)|| <= (1 - 1e-4 t) ||F(z)||`). Default 30.
    pub max_backtracks: usize,
    /// Relative finite-difference step for [`newton_krylov`]:
    /// `h = fd_step * max(1, ||z||) / ||v||`. Default `sqrt(eps)` of the scalar type.
    pub fd_step: Option<f64>,
    /// Keep `||F(z)||` of every iterate in the trace. Default `true`.
    pub record_trace: bool,
}

impl Default for NewtonKrylovOptions {
    fn default() -> Self {
        NewtonKrylovOptions {
            tol: 1e-10,
            max_iter: 50,
            inner: SolveOptions::default().with_restart(30).with_max_iter(200),
            forcing_max: 0.1,
            max_backtracks: 30,
            fd_step: None,
            record_trace: true,
        }
    }
}

impl NewtonKrylovOptions {
    /// Sets the tolerance.
    pub fn with_tol(mut self, tol: f64) -> Self {
        self.tol = tol;
        self
    }

    /// Sets the Newton iteration budget.
    pub fn with_max_iter(mut self, max_iter: usize) -> Self {
        self.max_iter = max_iter;
        self
    }

    /// Sets the inner GMRES options.
    pub fn with_inner(mut self, inner: SolveOptions) -> Self {
        self.inner = inner;
        self
    }

    /// Sets the finite-difference step.
    pub fn with_fd_step(mut self, step: f64) -> Self {
        self.fd_step = Some(step);
        self
    }

    /// Checks the options, naming `op` in the error: a finite tolerance `>= 0`, `forcing_max`
    /// in `(0, 1)`, a finite positive finite-difference step if one is set, and valid inner
    /// GMRES options (their tolerance is set per step by the forcing term, so only the rest
    /// is checked). [`newton_krylov`] validates on entry; layers call this when built.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        if !(self.tol.is_finite() && self.tol >= 0.0) {
            return Err(Error::invalid(
                op,
                format!("tolerance must be finite and >= 0, got {}", self.tol),
            ));
        }
        if !(self.forcing_max > 0.0 && self.forcing_max < 1.0) {
            return Err(Error::invalid(
                op,
                format!("forcing_max must be in (0, 1), got {}", self.forcing_max),
            ));
        }
        if let Some(h) = self.fd_step {
            if !(h.is_finite() && h > 0.0) {
                return Err(Error::invalid(op, format!("fd_step must be finite and > 0, got {h}")));
            }
        }
        let mut inner = self.inner.clone();
        inner.tol = 0.0;
        inner.validate(op)
    }
}

/// The Jacobian of `F` at `z` as an operator, through a Jacobian-vector product closure.
struct JacobianOp<'c, S: Scalar, E, J> {
    state: &'c RefCell<(E, J)>,
    z: ArrayView1<'c, S>,
    fz: ArrayView1<'c, S>,
}

type JvpFn<'a, S, E> =
    dyn FnMut(&mut E, ArrayView1<'_, S>, ArrayView1<'_, S>, ArrayView1<'_, S>) -> Result<Array1<S>> + 'a;

impl<S, E, J> LinearOperator<S> for JacobianOp<'_, S, E, J>
where
    S: Scalar,
    J: FnMut(&mut E, ArrayView1<'_, S>, ArrayView1<'_, S>, ArrayView1<'_, S>) -> Result<Array1<S>>,
{
    fn nrows(&self) -> usize {
        self.z.len()
    }
    fn ncols(&self) -> usize {
        self.z.len()
    }
    fn apply(&self, x: ArrayView1<'_, S>, mut y: ArrayViewMut1<'_, S>) -> Result<()> {
        let mut st = self.state.borrow_mut();
        let (ev, jvp) = &mut *st;
        let out = jvp(ev, self.z, self.fz, x)?;
        if out.len() != y.len() {
            return Err(Error::shapes(
                "newton_krylov",
                &[out.len()],
                &[y.len()],
                "the Jacobian-vector product must have the length of the state",
            ));
        }
        y.assign(&out);
        Ok(())
    }
}

/// Solves `F(z) = 0` by inexact Newton with GMRES inner solves and a backtracking line
/// search; Jacobian-vector products by forward finite differences of `F`,
/// `J v ~ (F(z + h v) - F(z)) / h`.
///
/// Each Newton step solves `J d = -F(z)` to the relative accuracy
/// `min(opts.forcing_max, ||F(z)||)` (floored at about `10 sqrt(eps)`, the accuracy of the
/// differences), then halves `t` until `||F(z + t d)|| <= (1 - 1e-4 t) ||F(z)||`. If no step
/// is accepted the run ends with [`SolveStatus::Breakdown`]. The residual is the absolute
/// `||F(z)||_2`; the trace holds it for every iterate.
///
/// Errors: invalid options, `F` failing or returning the wrong length. Non-convergence is a
/// status. For a fixed point `z = T(z)`, pass `F(z) = z - T(z)`.
///
/// ```
/// use clarke_solve::fixed_point::{newton_krylov, NewtonKrylovOptions};
/// use ndarray::array;
///
/// // z^2 = [2, 9] componentwise, from z0 = [1, 1]
/// let theta = array![2.0, 9.0];
/// let (z, report) = newton_krylov(|z: ndarray::ArrayView1<f64>| Ok(&z * &z - &theta), array![1.0, 1.0].view(), &NewtonKrylovOptions::default()).unwrap();
/// assert!(report.is_converged());
/// assert!((z[0] - 2f64.sqrt()).abs() < 1e-9 && (z[1] - 3.0).abs() < 1e-9);
/// ```
pub fn newton_krylov<S, F>(
    f: F,
    z0: ArrayView1<'_, S>,
    opts: &NewtonKrylovOptions,
) -> Result<(Array1<S>, FixedPointReport)>
where
    S: Scalar,
    F: FnMut(ArrayView1<'_, S>) -> Result<Array1<S>>,
{
    const NAME: &str = "newton_krylov";
    opts.validate(NAME)?;
    let step_rel = S::from_f64_lossy(opts.fd_step.unwrap_or_else(|| S::epsilon().to_f64_exact().sqrt()));
    let floor = 10.0 * S::epsilon().to_f64_exact().sqrt();
    let mut fd = move |ev: &mut Evaluator<F>, z: ArrayView1<'_, S>, fz: ArrayView1<'_, S>, v: ArrayView1<'_, S>| {
        let vn = norm2(v);
        if vn == S::zero() {
            return Ok(Array1::zeros(v.len()));
        }
        let h = step_rel * norm2(z).max(S::one()) / vn;
        let mut zp = z.to_owned();
        zp.scaled_add(h, &v);
        let fp = ev.eval(zp.view())?;
        Ok((&fp - &fz).mapv(|d| d / h))
    };
    driver(NAME, f, &mut fd, z0, opts, floor)
}

/// [`newton_krylov`] with a user-supplied Jacobian-vector product `jvp(z, v) = J_F(z) v`
/// (for example a forward-mode derivative), instead of finite differences.
///
/// ```
/// use clarke_solve::fixed_point::{newton_krylov_with_jvp, NewtonKrylovOptions};
/// use ndarray::array;
///
/// let theta = array![2.0, 9.0];
/// let (z, report) = newton_krylov_with_jvp(
///     |z: ndarray::ArrayView1<f64>| Ok(&z * &z - &theta),
///     |z: ndarray::ArrayView1<f64>, v: ndarray::ArrayView1<f64>| Ok(2.0 * &z * &v),
///     array![1.0, 1.0].view(),
///     &NewtonKrylovOptions::default(),
/// )
/// .unwrap();
/// assert!(report.is_converged());
/// assert!((z[1] - 3.0).abs() < 1e-12);
/// ```
pub fn newton_krylov_with_jvp<S, F, J>(
    f: F,
    mut jvp: J,
    z0: ArrayView1<'_, S>,
    opts: &NewtonKrylovOptions,
) -> Result<(Array1<S>, FixedPointReport)>
where
    S: Scalar,
    F: FnMut(ArrayView1<'_, S>) -> Result<Array1<S>>,
    J: FnMut(ArrayView1<'_, S>, ArrayView1<'_, S>) -> Result<Array1<S>>,
{
    const NAME: &str = "newton_krylov";
    opts.validate(NAME)?;
    let floor = 100.0 * S::epsilon().to_f64_exact();
    let mut user = |_: &mut Evaluator<F>, z: ArrayView1<'_, S>, _: ArrayView1<'_, S>, v: ArrayView1<'_, S>| jvp(z, v);
    driver(NAME, f, &mut user, z0, opts, floor)
}

fn driver<S, F>(
    name: &'static str,
    root: F,
    jvp: &mut JvpFn<'_, S, Evaluator<F>>,
    z0: ArrayView1<'_, S>,
    opts: &NewtonKrylovOptions,
    forcing_floor: f64,
) -> Result<(Array1<S>, FixedPointReport)>
where
    S: Scalar,
    F: FnMut(ArrayView1<'_, S>) -> Result<Array1<S>>,
{
    let n = z0.len();
    let mut track = Tracker::absolute(name, opts.tol, opts.record_trace);
    if !all_finite(z0) {
        track.push(f64::NAN);
        return Ok((z0.to_owned(), track.report(0, f64::NAN, SolveStatus::NonFinite)));
    }
    let state = RefCell::new((Evaluator::new(name, root, n), jvp));

    let mut z = z0.to_owned();
    let mut fz = state.borrow_mut().0.eval(z.view())?;
    let mut res = track.residual(fz.view());
    loop {
        if let Some(status) = track.check(res, opts.max_iter) {
            return Ok((z, track.report(state.borrow().0.count, res, status)));
        }
        let eta = opts.forcing_max.min(res).max(forcing_floor);
        let inner = opts.inner.clone().with_tol(eta);
        let rhs = fz.mapv(|v| -v);
        let (d, rep) = {
            let op = JacobianOp {
                state: &state,
                z: z.view(),
                fz: fz.view(),
            };
            gmres(&op, rhs.view(), None, &inner)?
        };
        track.inner_iterations += rep.iterations;
        if rep.status == SolveStatus::NonFinite || !all_finite(d.view()) {
            return Ok((z, track.report(state.borrow().0.count, res, SolveStatus::NonFinite)));
        }
        // Backtracking line search on ||F||.
        let mut t = 1.0f64;
        let mut accepted = None;
        for _ in 0..=opts.max_backtracks {
            let mut z_try = z.clone();
            z_try.scaled_add(S::from_f64_lossy(t), &d);
            let f_try = state.borrow_mut().0.eval(z_try.view())?;
            let r_try = f(norm2(f_try.view()));
            if r_try.is_finite() && r_try <= (1.0 - 1e-4 * t) * res {
                accepted = Some((z_try, f_try));
                break;
            }
            t *= 0.5;
        }
        match accepted {
            Some((z_new, f_new)) => {
                z = z_new;
                fz = f_new;
                track.iterations += 1;
                res = track.residual(fz.view());
            }
            None => return Ok((z, track.report(state.borrow().0.count, res, SolveStatus::Breakdown))),
        }
    }
}
