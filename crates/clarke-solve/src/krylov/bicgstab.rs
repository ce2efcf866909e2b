//! BiCGSTAB (van der Vorst) with breakdown detection.

use clarke_core::{Result, Scalar};
use ndarray::{Array1, ArrayView1, Zip};

use super::{Start, finish, rel, setup, true_residual};
use crate::linop::LinearOperator;
use crate::report::{SolveOptions, SolveReport, SolveStatus};
use crate::util::{dot, norm2};

/// Solves `A x = b` by BiCGSTAB.
///
/// One iteration is two products with `A`. The method divides by `(r_hat, r)`,
/// `(r_hat, A p)` and `(A s, A s)`; when one of them vanishes (relative to the norms
/// involved), the iteration restarts once from the true residual with a fresh shadow vector
/// `r_hat = r`; a second breakdown with no successful iteration in between ends the run with
/// [`SolveStatus::Breakdown`]. When the recursively updated residual meets the tolerance,
/// the true residual `b - A x` is recomputed; [`SolveStatus::Converged`] is reported only if
/// it meets the tolerance too (otherwise the iteration restarts from it).
///
/// `x0` is a warm start. Errors: non-square operator, length mismatch, invalid options, or a
/// failing operator.
///
/// ```
/// use clarke_solve::{bicgstab, SolveOptions};
/// use ndarray::array;
///
/// let a = array![[3.0f64, 1.0], [-1.0, 2.0]];
/// let b = array![1.0, 1.0];
/// let (x, report) = bicgstab(&a, b.view(), None, &SolveOptions::default()).unwrap();
/// assert!(report.is_converged());
/// assert!((a.dot(&x) - &b).iter().all(|r: &f64| r.abs() < 1e-9));
/// ```
pub fn bicgstab<S: Scalar>(
    op: &impl LinearOperator<S>,
    b: ArrayView1<'_, S>,
    x0: Option<ArrayView1<'_, S>>,
    opts: &SolveOptions,
) -> Result<(Array1<S>, SolveReport)> {
    let (problem, mut run) = match setup("bicgstab", op, b, x0, opts)? {
        Start::Done(x, report) => return Ok((x, report)),
        Start::Iterate(p, run) => (p, run),
    };
    let scale = problem.scale;
    let mut x = problem.x;
    let n = x.len();
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

    let tiny = S::epsilon() * S::epsilon();
    let mut r_hat = r.clone();
    let mut p = Array1::<S>::zeros(n);
    let mut v = Array1::<S>::zeros(n);
    let mut s = Array1::<S>::zeros(n);
    let mut t = Array1::<S>::zeros(n);
    let (mut rho_old, mut alpha, mut omega) = (S::one(), S::one(), S::one());
    // True after a restart until one iteration completes.
    let mut just_restarted = false;

    let status = loop {
        if run.iterations >= opts.max_iter {
            break SolveStatus::MaxIterations;
        }
        let rho = dot(r_hat.view(), r.view());
        let rn = norm2(r.view());
        let rhn = norm2(r_hat.view());
        let mut broke = !rho.is_finite() || rho.abs() <= tiny * rn * rhn;
        if !broke {
            let beta = (rho / rho_old) * (alpha / omega);
            Zip::from(&mut p)
                .and(&r)
                .and(&v)
                .for_each(|pi, &ri, &vi| *pi = ri + beta * (*pi - omega * vi));
            op.apply(p.view(), v.view_mut())?;
            run.matvecs += 1;
            let rv = dot(r_hat.view(), v.view());
            broke = !rv.is_finite() || rv.abs() <= tiny * rhn * norm2(v.view());
            if !broke {
                alpha = rho / rv;
                Zip::from(&mut s)
                    .and(&r)
                    .and(&v)
                    .for_each(|si, &ri, &vi| *si = ri - alpha * vi);
                let res_half = rel(s.view(), scale);
                if !res_half.is_finite() {
                    break SolveStatus::NonFinite;
                }
                if res_half <= opts.tol {
                    x.scaled_add(alpha, &p);
                    run.iterations += 1;
                    run.push(res_half);
                    r = true_residual(op, b, x.view(), &mut run)?;
                    let res_true = rel(r.view(), scale);
                    if res_true <= opts.tol {
                        return Ok((x, run.report(res_true, SolveStatus::Converged)));
                    }
                    // Restart from the true residual.
                    r_hat.assign(&r);
                    p.fill(S::zero());
                    v.fill(S::zero());
                    (rho_old, alpha, omega) = (S::one(), S::one(), S::one());
                    just_restarted = false;
                    continue;
                }
                op.apply(s.view(), t.view_mut())?;
                run.matvecs += 1;
                let tt = dot(t.view(), t.view());
                broke = !tt.is_finite() || tt <= tiny * tiny * dot(s.view(), s.view());
                if !broke {
                    omega = dot(t.view(), s.view()) / tt;
                    x.scaled_add(alpha, &p);
                    x.scaled_add(omega, &s);
                    Zip::from(&mut r)
                        .and(&s)
                        .and(&t)
                        .for_each(|ri, &si, &ti| *ri = si - omega * ti);
                    rho_old = rho;
                    run.iterations += 1;
                    let res = rel(r.view(), scale);
                    run.push(res);
                    if !res.is_finite() {
                        break SolveStatus::NonFinite;
                    }
                    if res <= opts.tol {
                        r = true_residual(op, b, x.view(), &mut run)?;
                        let res_true = rel(r.view(), scale);
                        if res_true <= opts.tol {
                            return Ok((x, run.report(res_true, SolveStatus::Converged)));
                        }
                        broke = true; // restart from the true residual
                    } else if run.diverged(res) {
                        break SolveStatus::Diverged;
                    } else if omega == S::zero() {
                        broke = true;
                    } else {
                        just_restarted = false;
                    }
                }
            }
        }
        if broke {
            if just_restarted {
                break SolveStatus::Breakdown;
            }
            r = true_residual(op, b, x.view(), &mut run)?;
            if !rel(r.view(), scale).is_finite() {
                break SolveStatus::NonFinite;
            }
            r_hat.assign(&r);
            p.fill(S::zero());
            v.fill(S::zero());
            (rho_old, alpha, omega) = (S::one(), S::one(), S::one());
            just_restarted = true;
        }
    };
    finish(op, b, x, scale, run, status)
}
