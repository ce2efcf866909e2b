//! The Neumann iteration `x <- A x + b` accelerated by Anderson mixing.

use std::collections::VecDeque;

use clarke_core::{Error, Result, Scalar};
use ndarray::{Array1, ArrayView1, Zip};

use super::{Start, neumann_residual, rel, setup};
use crate::FixedPointOptions;
use crate::fixed_point::anderson::mixing_coefficients;
use crate::linop::LinearOperator;
use crate::report::{SolveOptions, SolveReport};

/// Solves `(I - A) x = b` by Anderson acceleration (memory `memory`) of the Neumann
/// iteration `x <- A x + b`.
///
/// **Takes the operator `A`, not `I - A`**, as [`neumann`](super::neumann). With the residual
/// `r_k = A x_k + b - x_k` and the last `m` differences `dX_j`, `dR_j` of iterates and
/// residuals, each step solves `gamma = argmin ||r_k - dR gamma||^2` (regularised relative to
/// the largest `||dR_j||^2` by the default [`FixedPointOptions::regularization`], through the
/// same least-squares step as [`anderson`](crate::anderson)) and takes
/// `x_{k+1} = x_k + r_k - (dX + dR) gamma`. On this affine map Anderson mixing is a
/// Krylov method (with unlimited memory it matches GMRES on `(I - A) x = b`), so it needs
/// far fewer products than the plain series when `rho(A)` is close to one; with
/// `memory = 0` it is [`neumann`](super::neumann). Unlike the plain series it does not need
/// `rho(A) < 1`, only that the mixing finds descent, which short memories do not guarantee:
/// a run that does not converge says so in its status. When the least-squares step gives no
/// usable answer the step is the plain one.
///
/// One iteration is one product with `A`; the residual is that of the returned `x`, as
/// [`neumann`](super::neumann) measures it, relative to `||b||`.
///
/// # Errors
/// Invalid options, an operator that is not square or fails, a length mismatch.
///
/// ```
/// use clarke_solve::krylov::anderson_neumann;
/// use clarke_solve::SolveOptions;
/// use ndarray::array;
///
/// let a = array![[0.5f64, 0.4], [0.3, 0.6]]; // spectral radius 0.9
/// let b = array![1.0, 1.0];
/// let (x, report) = anderson_neumann(&a, b.view(), None, 3, &SolveOptions::default()).unwrap();
/// assert!(report.is_converged());
/// assert!((x[0] - 10.0).abs() < 1e-8 && (x[1] - 10.0).abs() < 1e-8);
/// ```
pub fn anderson_neumann<S: Scalar>(
    a: &impl LinearOperator<S>,
    b: ArrayView1<'_, S>,
    x0: Option<ArrayView1<'_, S>>,
    memory: usize,
    opts: &SolveOptions,
) -> Result<(Array1<S>, SolveReport)> {
    const NAME: &str = "anderson_neumann";
    if memory > 1000 {
        return Err(Error::invalid(
            NAME,
            format!("the Anderson memory is {memory}; past a few dozen it only keeps dependent differences"),
        ));
    }
    let (problem, mut run) = match setup(NAME, a, b, x0, opts)? {
        Start::Done(x, report) => return Ok((x, report)),
        Start::Iterate(p, run) => (p, run),
    };
    let scale = problem.scale;
    let mut x = problem.x;
    let n = x.len();
    let mut r = Array1::<S>::zeros(n);
    let mut prev: Option<(Array1<S>, Array1<S>)> = None;
    let mut dx: VecDeque<Array1<S>> = VecDeque::with_capacity(memory);
    let mut dr: VecDeque<Array1<S>> = VecDeque::with_capacity(memory);
    let regularization = FixedPointOptions::default().regularization;
    loop {
        let cold = !problem.warm && run.iterations == 0;
        neumann_residual(a, b, x.view(), cold, &mut r, &mut run)?;
        let residual = rel(r.view(), scale);
        run.push(residual);
        if let Some(status) = run.end(residual, opts) {
            return Ok((x, run.report(residual, status)));
        }
        if memory > 0 {
            if let Some((px, pr)) = prev.take() {
                if dx.len() == memory {
                    dx.pop_front();
                    dr.pop_front();
                }
                dx.push_back(&x - &px);
                dr.push_back(&r - &pr);
            }
            prev = Some((x.clone(), r.clone()));
        }
        let step = if dr.is_empty() {
            None
        } else {
            mixing_coefficients(&dr, r.view(), regularization)
        };
        x += &r;
        if let Some(gamma) = step {
            for ((dxj, drj), &c) in dx.iter().zip(&dr).zip(&gamma) {
                Zip::from(&mut x)
                    .and(dxj)
                    .and(drj)
                    .for_each(|xi, &a, &b| *xi -= c * (a + b));
            }
        }
        run.iterations += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::krylov::neumann;
    use crate::report::SolveStatus;
    use ndarray::Array2;

    /// A slow contraction (symmetric tridiagonal, eigenvalues `0.98 cos(pi k / (n + 1))`):
    /// Anderson converges in a fraction of the plain series' products, to the same
    /// solution, and memory 0 is the plain series.
    #[test]
    fn accelerates_the_plain_series_to_the_same_solution() {
        let n = 30;
        let a = Array2::from_shape_fn((n, n), |(i, j)| if i.abs_diff(j) == 1 { 0.49 } else { 0.0 });
        let b = Array1::from_shape_fn(n, |i| ((i as f64) * 0.37).cos());
        let opts = SolveOptions {
            tol: 1e-12,
            max_iter: 20_000,
            ..SolveOptions::default()
        };
        let (xn, rn) = neumann(&a, b.view(), None, &opts).unwrap();
        let (xa, ra) = anderson_neumann(&a, b.view(), None, 8, &opts).unwrap();
        let (x0, r0) = anderson_neumann(&a, b.view(), None, 0, &opts).unwrap();
        assert!(rn.is_converged() && ra.is_converged() && r0.is_converged());
        assert!(
            5 * ra.iterations < rn.iterations,
            "anderson {} vs neumann {}",
            ra.iterations,
            rn.iterations
        );
        assert_eq!(r0.iterations, rn.iterations);
        assert!((&xa - &xn).iter().all(|d| d.abs() < 1e-9));
        assert_eq!(x0, xn);
        // The reported residual is the true one of the returned x.
        let true_r = &b - &(&xa - &a.dot(&xa));
        let rel = true_r.dot(&true_r).sqrt() / b.dot(&b).sqrt();
        assert!(
            (rel - ra.residual).abs() <= 1e-12 + 1e-6 * rel,
            "{rel} vs {}",
            ra.residual
        );
    }

    #[test]
    fn a_non_finite_operator_or_budget_is_reported() {
        let a = Array2::from_elem((2, 2), f64::NAN);
        let b = Array1::from_elem(2, 1.0);
        let (_, r) = anderson_neumann(&a, b.view(), None, 3, &SolveOptions::default()).unwrap();
        assert_eq!(r.status, SolveStatus::NonFinite);
        let a = Array2::from_shape_fn((2, 2), |(i, j)| if i == j { 0.999 } else { 0.0 });
        let opts = SolveOptions {
            max_iter: 1,
            ..SolveOptions::default()
        };
        let (_, r) = anderson_neumann(&a, b.view(), None, 3, &opts).unwrap();
        assert_eq!(r.status, SolveStatus::MaxIterations);
        assert!(anderson_neumann(&a, b.view(), None, 5000, &SolveOptions::default()).is_err());
    }
}
