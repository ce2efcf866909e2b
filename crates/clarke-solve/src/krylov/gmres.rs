//! Restarted GMRES(m) with modified Gram-Schmidt and Givens rotations.

use clarke_core::{Result, Scalar};
use ndarray::{Array1, Array2, ArrayView1};

use super::{Start, finish, rel, setup, true_residual};
use crate::linop::LinearOperator;
use crate::report::{SolveOptions, SolveReport, SolveStatus};
use crate::util::{dot, f, norm2};

/// Solves `A x = b` by restarted GMRES(m), `m = opts.restart`.
///
/// Each cycle builds an orthonormal Krylov basis by modified Gram-Schmidt (with a second
/// pass when the first one cancels most of the vector, which keeps the basis orthogonal for
/// ill-conditioned operators), reduces the Hessenberg matrix with Givens rotations and
/// minimises the residual over the basis. One iteration is one Arnoldi step (one product
/// with `A`); a restart recomputes the true residual `b - A x`.
///
/// - *Happy breakdown* (the Krylov space is invariant, the next basis vector vanishes): the
///   least-squares solution is exact in that space; the cycle ends and the true residual
///   decides.
/// - A singular Hessenberg matrix (the operator is singular on the Krylov space) or a whole
///   cycle without any decrease of the residual (stagnation, which would repeat forever)
///   ends the run with [`SolveStatus::Breakdown`].
///
/// [`SolveStatus::Converged`] is only reported after checking the true residual of the
/// returned `x`. `x0` is a warm start. Errors: non-square operator, length mismatch, invalid
/// options, or a failing operator.
///
/// ```
/// use clarke_solve::{gmres, SolveOptions};
/// use ndarray::array;
///
/// let a = array![[2.0f64, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 4.0]];
/// let b = array![1.0, 2.0, 3.0];
/// let (x, report) = gmres(&a, b.view(), None, &SolveOptions::default()).unwrap();
/// assert!(report.is_converged());
/// assert!((a.dot(&x) - &b).iter().all(|r: &f64| r.abs() < 1e-9));
/// ```
pub fn gmres<S: Scalar>(
    op: &impl LinearOperator<S>,
    b: ArrayView1<'_, S>,
    x0: Option<ArrayView1<'_, S>>,
    opts: &SolveOptions,
) -> Result<(Array1<S>, SolveReport)> {
    let (problem, mut run) = match setup("gmres", op, b, x0, opts)? {
        Start::Done(x, report) => return Ok((x, report)),
        Start::Iterate(p, run) => (p, run),
    };
    let scale = problem.scale;
    let mut x = problem.x;
    let n = x.len();
    let m = opts.restart.min(n.max(1));

    let mut r = if problem.warm {
        true_residual(op, b, x.view(), &mut run)?
    } else {
        b.to_owned()
    };
    let mut res = rel(r.view(), scale);
    run.push(res);
    if !res.is_finite() {
        return finish(op, b, x, scale, run, SolveStatus::NonFinite);
    }
    if res <= opts.tol {
        return Ok((x, run.report(res, SolveStatus::Converged)));
    }

    // Krylov basis (rows), Hessenberg matrix reduced in place to R, rotations, rhs g.
    let mut v = Array2::<S>::zeros((m + 1, n));
    let mut h = Array2::<S>::zeros((m + 1, m));
    let mut cs = vec![S::zero(); m];
    let mut sn = vec![S::zero(); m];
    let mut g = vec![S::zero(); m + 1];
    let mut w = Array1::<S>::zeros(n);
    let eps = S::epsilon();
    let ten_eps = eps * S::from_f64_lossy(10.0);
    let reorth = S::from_f64_lossy(0.7);

    let status = loop {
        if run.iterations >= opts.max_iter {
            break SolveStatus::MaxIterations;
        }
        let beta = norm2(r.view());
        v.row_mut(0).assign(&r.mapv(|ri| ri / beta));
        g.iter_mut().for_each(|gi| *gi = S::zero());
        g[0] = beta;

        let mut k = 0; // columns of the basis used in this cycle
        let mut singular = false;
        let mut non_finite = false;
        for j in 0..m {
            if run.iterations >= opts.max_iter {
                break;
            }
            op.apply(v.row(j), w.view_mut())?;
            run.matvecs += 1;
            run.iterations += 1;
            let wnorm0 = norm2(w.view());
            if !wnorm0.is_finite() {
                non_finite = true;
                break;
            }
            // Modified Gram-Schmidt, with a second pass if the first one cancelled a lot.
            for i in 0..=j {
                let hij = dot(w.view(), v.row(i));
                h[[i, j]] = hij;
                w.scaled_add(-hij, &v.row(i));
            }
            let mut wnorm = norm2(w.view());
            if wnorm < reorth * wnorm0 {
                for i in 0..=j {
                    let c = dot(w.view(), v.row(i));
                    h[[i, j]] += c;
                    w.scaled_add(-c, &v.row(i));
                }
                wnorm = norm2(w.view());
            }
            h[[j + 1, j]] = wnorm;
            // Apply the previous rotations to the new column.
            for i in 0..j {
                let (a, bb) = (h[[i, j]], h[[i + 1, j]]);
                h[[i, j]] = cs[i] * a + sn[i] * bb;
                h[[i + 1, j]] = -sn[i] * a + cs[i] * bb;
            }
            // New rotation zeroing h[j + 1, j].
            let (a, bb) = (h[[j, j]], h[[j + 1, j]]);
            let d = a.hypot(bb);
            if d <= ten_eps * wnorm0 || !d.is_finite() {
                // A (numerically) zero diagonal entry of R: the operator is singular on the
                // Krylov space. Keep the first j columns (the optimum over that space).
                singular = d.is_finite();
                non_finite = !d.is_finite();
                break;
            }
            cs[j] = a / d;
            sn[j] = bb / d;
            h[[j, j]] = d;
            h[[j + 1, j]] = S::zero();
            g[j + 1] = -sn[j] * g[j];
            g[j] = cs[j] * g[j];
            k = j + 1;
            let est = f(g[j + 1].abs()) / f(scale);
            run.push(est);
            if est <= opts.tol {
                break;
            }
            // Happy breakdown: the next basis vector is (numerically) zero.
            if wnorm <= eps * wnorm0 {
                break;
            }
            v.row_mut(j + 1).assign(&w.mapv(|wi| wi / wnorm));
        }
        if non_finite {
            break SolveStatus::NonFinite;
        }
        // Back substitution R y = g[..k], then x += V[..k]^T y.
        if k > 0 {
            let mut y = vec![S::zero(); k];
            for i in (0..k).rev() {
                let mut s = g[i];
                for (l, yl) in y.iter().enumerate().take(k).skip(i + 1) {
                    s -= h[[i, l]] * *yl;
                }
                y[i] = s / h[[i, i]];
            }
            for (i, yi) in y.iter().enumerate() {
                x.scaled_add(*yi, &v.row(i));
            }
        }
        r = true_residual(op, b, x.view(), &mut run)?;
        let new_res = rel(r.view(), scale);
        if !new_res.is_finite() {
            break SolveStatus::NonFinite;
        }
        if new_res <= opts.tol {
            res = new_res;
            return Ok((x, run.report(res, SolveStatus::Converged)));
        }
        if singular {
            break SolveStatus::Breakdown;
        }
        if run.diverged(new_res) {
            break SolveStatus::Diverged;
        }
        if k > 0 && new_res >= res && run.iterations < opts.max_iter {
            // A full cycle without progress: restarting would repeat it.
            break SolveStatus::Breakdown;
        }
        res = new_res;
    };
    finish(op, b, x, scale, run, status)
}
