//! Conjugate gradients for symmetric positive definite operators.

use clarke_core::{Result, Scalar};
use ndarray::{Array1, ArrayView1, Zip};

use super::{Start, finish, rel, setup, true_residual};
use crate::linop::LinearOperator;
use crate::report::{SolveOptions, SolveReport, SolveStatus};
use crate::util::{dot, f};

/// Solves `A x = b` by conjugate gradients, for a symmetric positive definite `A`.
///
/// One iteration is one product with `A`. The operator is not checked for symmetry (it is
/// matrix-free); if it is not positive definite along a search direction (`p^T A p <= 0`)
/// the run stops with [`SolveStatus::Breakdown`]. A non-symmetric operator usually ends in
/// [`SolveStatus::MaxIterations`]; whatever happens, the reported residual is that of the
/// returned `x`, and [`SolveStatus::Converged`] is only reported after recomputing
/// `b - A x`. When the recursively updated residual claims convergence but the true one
/// does not (rounding), the iteration restarts from the true residual.
///
/// `x0` is a warm start. Errors: non-square operator, length mismatch, invalid options, or a
/// failing operator.
///
/// ```
/// use clarke_solve::{cg, SolveOptions};
/// use ndarray::array;
///
/// let a = array![[4.0f64, 1.0], [1.0, 3.0]];
/// let b = array![1.0, 2.0];
/// let (x, report) = cg(&a, b.view(), None, &SolveOptions::default()).unwrap();
/// assert!(report.is_converged());
/// assert!((a.dot(&x) - &b).iter().all(|r: &f64| r.abs() < 1e-9));
/// ```
pub fn cg<S: Scalar>(
    op: &impl LinearOperator<S>,
    b: ArrayView1<'_, S>,
    x0: Option<ArrayView1<'_, S>>,
    opts: &SolveOptions,
) -> Result<(Array1<S>, SolveReport)> {
    let (problem, mut run) = match setup("cg", op, b, x0, opts)? {
        Start::Done(x, report) => return Ok((x, report)),
        Start::Iterate(p, run) => (p, run),
    };
    let scale = problem.scale;
    let mut x = problem.x;
    let mut r = if problem.warm {
        true_residual(op, b, x.view(), &mut run)?
    } else {
        b.to_owned()
    };
    let res0 = rel(r.view(), scale);
    run.push(res0);
    if !res0.is_finite() {
        return finish(op, b, x, scale, run, SolveStatus::NonFinite);
    }
    if res0 <= opts.tol {
        return Ok((x, run.report(res0, SolveStatus::Converged)));
    }
    let n = x.len();
    let mut p = r.clone();
    let mut ap = Array1::<S>::zeros(n);
    let mut rr = dot(r.view(), r.view());
    let status = loop {
        if run.iterations >= opts.max_iter {
            break SolveStatus::MaxIterations;
        }
        op.apply(p.view(), ap.view_mut())?;
        run.matvecs += 1;
        let pap = dot(p.view(), ap.view());
        if !pap.is_finite() {
            break SolveStatus::NonFinite;
        }
        if pap <= S::zero() {
            break SolveStatus::Breakdown;
        }
        let alpha = rr / pap;
        x.scaled_add(alpha, &p);
        r.scaled_add(-alpha, &ap);
        run.iterations += 1;
        let rr_new = dot(r.view(), r.view());
        let res = f(rr_new.sqrt()) / f(scale);
        run.push(res);
        if !res.is_finite() {
            break SolveStatus::NonFinite;
        }
        if res <= opts.tol {
            // Confirm with the true residual; restart from it if rounding fooled us.
            r = true_residual(op, b, x.view(), &mut run)?;
            let res_true = rel(r.view(), scale);
            if res_true <= opts.tol {
                return Ok((x, run.report(res_true, SolveStatus::Converged)));
            }
            p.assign(&r);
            rr = dot(r.view(), r.view());
            continue;
        }
        if run.diverged(res) {
            break SolveStatus::Diverged;
        }
        let beta = rr_new / rr;
        rr = rr_new;
        Zip::from(&mut p).and(&r).for_each(|pi, &ri| *pi = ri + beta * *pi);
    };
    finish(op, b, x, scale, run, status)
}
