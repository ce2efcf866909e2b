//! The linear solves of an implicit layer, per gradient mode, with their failure policy:
//! the adjoint `A^T w = g` of a backward pass and the tangent `A dz = r` of a forward-mode
//! product, with `A = I - J_z` (fixed point) or `A = J_F` (root).

use clarke_core::{Error, Result, Scalar};
use clarke_solve::dense::{DenseLu, lstsq};
use clarke_solve::{
    FnOperator, IdentityMinus, SolveOptions, SolveReport, SolveStatus, anderson_neumann, bicgstab, gmres, neumann,
};
use ndarray::{Array1, Array2, ArrayView1, ArrayViewMut1};

use crate::check::{Form, block};
use crate::inner::Linearization;
use crate::options::{AdjointSolver, GradientMode, ImplicitOptions, OnAdjointFailure};

/// Which system with the block `A` a solve is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum System {
    /// `A^T w = g`: the adjoint of a backward pass.
    Adjoint,
    /// `A dz = r`: the tangent of a forward-mode product.
    Tangent,
}

impl System {
    /// The stage named in errors.
    fn stage(self) -> &'static str {
        match self {
            System::Adjoint => "adjoint",
            System::Tangent => "tangent",
        }
    }

    /// What its right-hand side is, in errors.
    fn rhs(self) -> &'static str {
        match self {
            System::Adjoint => "the incoming gradient",
            System::Tangent => "the parameters' tangent J_theta dtheta",
        }
    }
}

/// The solution (`w` or `dz`) and how it was obtained.
pub(crate) struct Adjoint<S: Scalar> {
    pub w: Array1<S>,
    pub report: SolveReport,
    pub fallback: Option<String>,
    pub approximate: bool,
}

/// Solves `A^T w = g` ([`System::Adjoint`]) or `A w = g` ([`System::Tangent`]) with
/// `A = I - J_z` (fixed point) or `A = J_F` (root) as `mode` says: the products with `A`
/// are forward-mode replays of the linearization, those with `A^T` backward ones. `dense` is
/// the block `A` when the check already built it.
///
/// `g` must have `z`'s length and be finite: a NaN or an infinity arriving from the loss
/// (or the tangent of a parameter) is refused here, the same way by every solver, rather
/// than turned into a NaN that a direct solve would report as converged.
#[allow(clippy::too_many_arguments)]
pub(crate) fn solve_adjoint<S: Scalar>(
    name: &str,
    lin: &Linearization<'_, S>,
    form: Form,
    system: System,
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
            format!("{name}: {} must have one element per element of z", system.rhs()),
        ));
    }
    if let Some((i, v)) = g.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::invalid(
            "implicit layer",
            format!(
                "{name}: {} has a non-finite value {v} at flat index {i}; the {} system needs a finite right-hand side",
                system.rhs(),
                system.stage()
            ),
        ));
    }
    let jt = FnOperator::new(n, n, |x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>| match system {
        System::Adjoint => lin.vjp_into(x, y),
        System::Tangent => lin.jvp_into(x, y),
    });
    let iterative = |solver: AdjointSolver, opts: &SolveOptions| -> Result<(Array1<S>, SolveReport)> {
        match (solver, form) {
            (AdjointSolver::Neumann, Form::FixedPoint) => neumann(&jt, g, warm, opts),
            (AdjointSolver::Gmres, Form::FixedPoint) => gmres(&IdentityMinus::new(&jt), g, warm, opts),
            (AdjointSolver::Bicgstab, Form::FixedPoint) => bicgstab(&IdentityMinus::new(&jt), g, warm, opts),
            (AdjointSolver::Gmres, Form::Root) => gmres(&jt, g, warm, opts),
            (AdjointSolver::Bicgstab, Form::Root) => bicgstab(&jt, g, warm, opts),
            (AdjointSolver::Anderson { memory }, Form::FixedPoint) => anderson_neumann(&jt, g, warm, memory, opts),
            (AdjointSolver::Neumann | AdjointSolver::Anderson { .. }, Form::Root) => Err(Error::invalid(
                "implicit layer",
                format!("{name}: the Neumann and Anderson adjoints need a fixed-point layer"),
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
            dense_solve(name, &dense_block(dense)?, g, system).map(|(w, report)| Adjoint {
                w,
                report,
                fallback: None,
                approximate: false,
            })
        }
        GradientMode::LeastSquaresNoHypothesis => {
            let a = dense_block(dense)?;
            let ls = match system {
                System::Adjoint => lstsq(a.t(), g)?,
                System::Tangent => lstsq(a.view(), g)?,
            };
            let w = ls.solution;
            let mut report = dense_report("lstsq", &a, &w, g, system);
            let unsolved = report.residual.is_nan() || report.residual > 1e-6;
            if unsolved {
                report.status = SolveStatus::Breakdown;
            }
            Ok(Adjoint {
                w,
                fallback: unsolved.then(|| {
                    format!(
                        "least squares: the {} system has no solution (rank {} of {n}, residual {:.3e}); the gradient ignores the hypothesis",
                        system.stage(),
                        ls.rank,
                        report.residual
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
                return Err(report.failure(name, system.stage()));
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
                OnAdjointFailure::Error => Err(report.failure(name, system.stage())),
                OnAdjointFailure::Dense => {
                    let (w, dense_report) = dense_solve(name, &dense_block(dense)?, g, system)?;
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
                OnAdjointFailure::AcceptApproximate => Err(report.failure(name, system.stage())),
            }
        }
        GradientMode::Unrolled { .. } | GradientMode::OneStep => Err(Error::invalid(
            "implicit layer",
            format!(
                "{name}: the {} mode solves no {} system",
                options.mode.name(),
                system.stage()
            ),
        )),
    }
}

/// `A^T w = g` (or `A w = g`) by LU; a singular `A` is refused.
fn dense_solve<S: Scalar>(
    name: &str,
    a: &Array2<S>,
    g: ArrayView1<'_, S>,
    system: System,
) -> Result<(Array1<S>, SolveReport)> {
    let lu = DenseLu::new(a.view()).map_err(|e| Error::InImplicit {
        node: name.to_string(),
        context: match system {
            System::Adjoint => "dense adjoint solve refused",
            System::Tangent => "dense tangent solve refused",
        },
        source: Box::new(e),
    })?;
    let w = match system {
        System::Adjoint => lu.solve_transpose(g)?,
        System::Tangent => lu.solve(g)?,
    };
    let report = dense_report("dense_lu", a, &w, g, system);
    Ok((w, report))
}

/// A report for a direct solve: the true relative residual of `A^T w = g` (or `A w = g`;
/// the tolerance field is 0: a direct solve has none).
fn dense_report<S: Scalar>(
    solver: &'static str,
    a: &Array2<S>,
    w: &Array1<S>,
    g: ArrayView1<'_, S>,
    system: System,
) -> SolveReport {
    let product = match system {
        System::Adjoint => a.t().dot(w),
        System::Tangent => a.dot(w),
    };
    let r = &product - &g;
    let norm = |v: ArrayView1<'_, S>| v.iter().map(|x| x.to_f64_exact().powi(2)).sum::<f64>().sqrt();
    let gn = norm(g);
    let rn = norm(r.view());
    SolveReport {
        solver,
        iterations: 0,
        matvecs: a.nrows(),
        residual: if gn > 0.0 { rn / gn } else { rn },
        tolerance: 0.0,
        status: SolveStatus::Converged,
        residual_history: Vec::new(),
    }
}
