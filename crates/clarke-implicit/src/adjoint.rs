//! The adjoint solve of an implicit layer, per gradient mode, with its failure policy.

use clarke_core::{Error, Result, Scalar};
use clarke_solve::dense::{DenseLu, lstsq};
use clarke_solve::{FnOperator, IdentityMinus, SolveOptions, SolveReport, SolveStatus, bicgstab, gmres, neumann};
use ndarray::{Array1, Array2, ArrayView1, ArrayViewMut1};

use crate::check::{Form, block};
use crate::inner::Linearization;
use crate::options::{AdjointSolver, GradientMode, ImplicitOptions, OnAdjointFailure};

/// The adjoint `w` and how it was obtained.
pub(crate) struct Adjoint<S: Scalar> {
    pub w: Array1<S>,
    pub report: SolveReport,
    pub fallback: Option<String>,
    pub approximate: bool,
}

/// Solves `A^T w = g` with `A = I - J_z` (fixed point) or `A = J_F` (root) as `mode` says.
/// `dense` is the block `A` when the check already built it.
///
/// `g` must have `z`'s length and be finite: a NaN or an infinity arriving from the loss
/// is refused here, the same way by every adjoint solver, rather than turned into a NaN
/// gradient that a direct solve would report as converged.
pub(crate) fn solve_adjoint<S: Scalar>(
    name: &str,
    lin: &Linearization<'_, S>,
    form: Form,
    g: ArrayView1<'_, S>,
    warm: Option<ArrayView1<'_, S>>,
    dense: Option<Array2<S>>,
    options: &ImplicitOptions,
) -> Result<Adjoint<S>> {
    let n = lin.len();
    if g.len() != n {
        return Err(Error::shapes(
            "implicit layer",
            &[g.len()],
            &[n],
            format!("{name}: the incoming gradient must have one element per element of z"),
        ));
    }
    if let Some((i, v)) = g.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::invalid(
            "implicit layer",
            format!(
                "{name}: the incoming gradient has a non-finite value {v} at flat index {i}; the adjoint system needs a finite right-hand side"
            ),
        ));
    }
    let jt = FnOperator::new(n, n, |x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>| lin.vjp_into(x, y));
    let iterative = |solver: AdjointSolver, opts: &SolveOptions| -> Result<(Array1<S>, SolveReport)> {
        match (solver, form) {
            (AdjointSolver::Neumann, Form::FixedPoint) => neumann(&jt, g, warm, opts),
            (AdjointSolver::Gmres, Form::FixedPoint) => gmres(&IdentityMinus::new(&jt), g, warm, opts),
            (AdjointSolver::Bicgstab, Form::FixedPoint) => bicgstab(&IdentityMinus::new(&jt), g, warm, opts),
            (AdjointSolver::Gmres, Form::Root) => gmres(&jt, g, warm, opts),
            (AdjointSolver::Bicgstab, Form::Root) => bicgstab(&jt, g, warm, opts),
            (AdjointSolver::Neumann, Form::Root) => Err(Error::invalid(
                "implicit layer",
                format!("{name}: the Neumann adjoint needs a fixed-point layer"),
            )),
            (AdjointSolver::Dense, _) => Err(Error::invalid(
                "implicit layer",
                format!("{name}: the dense adjoint is a direct solve, not an iterative one"),
            )),
        }
    };
    let dense_block = |dense: Option<Array2<S>>| -> Result<Array2<S>> {
        let a = match dense {
            Some(a) => a,
            None => block(form, lin.jacobian(&[])?)?,
        };
        if a.dim() != (n, n) {
            return Err(Error::shapes(
                "implicit layer",
                a.shape(),
                &[n, n],
                format!("{name}: the dense adjoint block must be n x n for z of {n} elements"),
            ));
        }
        Ok(a)
    };

    match options.mode {
        GradientMode::Implicit(AdjointSolver::Dense) => {
            dense_solve(name, &dense_block(dense)?, g).map(|(w, report)| Adjoint {
                w,
                report,
                fallback: None,
                approximate: false,
            })
        }
        GradientMode::LeastSquaresNoHypothesis => {
            let a = dense_block(dense)?;
            let at = a.t().to_owned();
            let ls = lstsq(at.view(), g)?;
            let w = ls.solution;
            let mut report = dense_report("lstsq", &a, &w, g, n);
            let unsolved = report.residual.is_nan() || report.residual > 1e-6;
            if unsolved {
                report.status = SolveStatus::Breakdown;
            }
            Ok(Adjoint {
                w,
                fallback: unsolved.then(|| {
                    format!(
                        "least squares: the adjoint system has no solution (rank {} of {n}, residual {:.3e}); the gradient ignores the hypothesis",
                        ls.rank, report.residual
                    )
                }),
                report,
                approximate: unsolved,
            })
        }
        GradientMode::TruncatedNeumann { terms } => {
            let opts = SolveOptions {
                tol: 0.0,
                max_iter: terms,
                ..options.adjoint.clone()
            };
            let (w, report) = neumann(&jt, g, None, &opts)?;
            if report.status == SolveStatus::NonFinite || report.status == SolveStatus::Diverged {
                return Err(report.failure(name, "adjoint"));
            }
            Ok(Adjoint {
                w,
                report,
                fallback: None,
                approximate: true,
            })
        }
        GradientMode::Implicit(solver) => {
            let (w, report) = iterative(solver, &options.adjoint)?;
            if report.is_converged() {
                return Ok(Adjoint {
                    w,
                    report,
                    fallback: None,
                    approximate: false,
                });
            }
            match options.on_adjoint_failure {
                OnAdjointFailure::Error => Err(report.failure(name, "adjoint")),
                OnAdjointFailure::Dense => {
                    let (w, dense_report) = dense_solve(name, &dense_block(dense)?, g)?;
                    Ok(Adjoint {
                        w,
                        report: dense_report,
                        fallback: Some(format!(
                            "{} {} after {} iterations (residual {:.3e}); solved densely by LU instead",
                            report.solver, report.status, report.iterations, report.residual
                        )),
                        approximate: false,
                    })
                }
                OnAdjointFailure::AcceptApproximate if report.status == SolveStatus::MaxIterations => Ok(Adjoint {
                    fallback: Some(format!(
                        "{} {}: approximate adjoint accepted (residual {:.3e} > tolerance {:.3e})",
                        report.solver, report.status, report.residual, report.tolerance
                    )),
                    w,
                    report,
                    approximate: true,
                }),
                OnAdjointFailure::AcceptApproximate => Err(report.failure(name, "adjoint")),
            }
        }
        GradientMode::Unrolled { .. } | GradientMode::OneStep => Err(Error::invalid(
            "implicit layer",
            format!("{name}: the {} mode solves no adjoint system", options.mode.name()),
        )),
    }
}

/// `A^T w = g` by LU; a singular `A` is refused.
fn dense_solve<S: Scalar>(name: &str, a: &Array2<S>, g: ArrayView1<'_, S>) -> Result<(Array1<S>, SolveReport)> {
    let lu = DenseLu::new(a.view()).map_err(|e| Error::InImplicit {
        node: name.to_string(),
        context: "dense adjoint solve refused",
        source: Box::new(e),
    })?;
    let w = lu.solve_transpose(g)?;
    let report = dense_report("dense_lu", a, &w, g, a.nrows());
    Ok((w, report))
}

/// A report for a direct solve: the true relative residual of `A^T w = g` (the tolerance
/// field is 0: a direct solve has none).
fn dense_report<S: Scalar>(
    solver: &'static str,
    a: &Array2<S>,
    w: &Array1<S>,
    g: ArrayView1<'_, S>,
    n: usize,
) -> SolveReport {
    let r = &a.t().dot(w) - &g;
    let norm = |v: ArrayView1<'_, S>| v.iter().map(|x| x.to_f64_exact().powi(2)).sum::<f64>().sqrt();
    let gn = norm(g);
    let rn = norm(r.view());
    SolveReport {
        solver,
        iterations: 0,
        matvecs: n,
        residual: if gn > 0.0 { rn / gn } else { rn },
        tolerance: 0.0,
        status: SolveStatus::Converged,
        residual_history: Vec::new(),
    }
}
