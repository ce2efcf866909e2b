//! Neumann-series (fixed-point) iteration for `(I - A) x = b`.

use clarke_core::{Result, Scalar};
use ndarray::{Array1, ArrayView1};

use super::{Start, neumann_residual, rel, setup};
use crate::linop::LinearOperator;
use crate::report::{SolveOptions, SolveReport};

/// Solves `(I - A) x = b` by the fixed-point iteration `x <- A x + b`.
///
/// **Takes the operator `A`, not `I - A`.** Starting from `x0 = 0` the iterates are the
/// partial sums of the Neumann series `sum_k A^k b`; they converge when the spectral radius
/// of `A` is below one, at the rate of that radius. This is the "AID-FP" adjoint of a
/// contractive fixed-point layer: with `A = J_z^T` it solves `(I - J_z)^T w = g`.
///
/// One iteration is one product with `A`. The residual of `x` is
/// `b - (I - A) x = (A x + b) - x`, the step itself, so convergence is measured on the
/// returned `x` without extra products. When the residual grows past
/// [`SolveOptions::divergence_factor`] times the initial one (for example when
/// `rho(A) >= 1`), the run stops with [`SolveStatus::Diverged`](crate::SolveStatus::Diverged).
///
/// ```
/// use clarke_solve::{neumann, SolveOptions};
/// use ndarray::array;
///
/// // (I - A) x = b with ||A|| = 0.5
/// let a = array![[0.5f64, 0.0], [0.0, -0.25]];
/// let b = array![1.0, 1.0];
/// let (x, report) = neumann(&a, b.view(), None, &SolveOptions::default()).unwrap();
/// assert!(report.is_converged());
/// assert!((x[0] - 2.0).abs() < 1e-9 && (x[1] - 0.8).abs() < 1e-9);
/// ```
pub fn neumann<S: Scalar>(
    a: &impl LinearOperator<S>,
    b: ArrayView1<'_, S>,
    x0: Option<ArrayView1<'_, S>>,
    opts: &SolveOptions,
) -> Result<(Array1<S>, SolveReport)> {
    let (problem, mut run) = match setup("neumann", a, b, x0, opts)? {
        Start::Done(x, report) => return Ok((x, report)),
        Start::Iterate(p, run) => (p, run),
    };
    let scale = problem.scale;
    let mut x = problem.x;
    let n = x.len();
    // r = A x + b - x, the residual of x and the next step.
    let mut r = Array1::<S>::zeros(n);
    let mut residual;
    loop {
        let cold = !problem.warm && run.iterations == 0;
        neumann_residual(a, b, x.view(), cold, &mut r, &mut run)?;
        residual = rel(r.view(), scale);
        run.push(residual);
        if let Some(status) = run.end(residual, opts) {
            return Ok((x, run.report(residual, status)));
        }
        x += &r;
        run.iterations += 1;
    }
}
