//! # clarke-solve
//!
//! Numerics for implicit differentiation, on plain `ndarray` vectors and matrices: nothing
//! here knows about autodiff tapes. The implicit layers of clarke use these solvers for
//! their forward solves (find `z* = T(z*, theta)` or `F(z*, theta) = 0`) and for their
//! backward solves (the adjoint `(I - J_z)^T w = g`), and the diagnostics use the spectral
//! estimates to check the invertibility hypothesis of the nonsmooth implicit function
//! theorem.
//!
//! - [`linop`]: the [`LinearOperator`] trait (`y = A x`, optionally `y = A^T x`) with dense,
//!   closure, `I - A`, transpose and `A^T A` adapters.
//! - [`krylov`]: matrix-free linear solvers [`neumann`], [`cg`], [`gmres`], [`bicgstab`], all
//!   with warm starts and a [`SolveReport`].
//! - [`dense`]: LU (plain, transposed, reusable [`DenseLu`]), Cholesky, least squares,
//!   singular values and a rayon-parallel batched solve; faer by default, LAPACK with the
//!   `lapack` feature.
//! - [`fixed_point`]: forward solvers [`picard`], [`anderson`], [`broyden`] and
//!   [`newton_krylov`].
//! - [`spectral`]: power iteration for the spectral norm and radius, smallest singular value.
//!
//! **No silent wrong answers.** Iterative solvers return `Err` only for bad input (shapes,
//! options) or a failing operator or map; otherwise they return the iterate together with a
//! report whose status says how the run ended (converged, out of iterations, breakdown,
//! diverged, non-finite) and whose residual belongs to the returned vector. Call
//! `report.into_result()` to turn anything but convergence into
//! [`Error::NotConverged`](clarke_core::Error::NotConverged). Dense solves refuse singular
//! matrices with [`Error::Singular`](clarke_core::Error::Singular) rather than falling back to
//! least squares, which would change what a gradient means.
//!
//! ```
//! use clarke_solve::{gmres, IdentityMinus, SolveOptions};
//! use ndarray::array;
//!
//! // The adjoint of a fixed-point layer: (I - J)^T w = g with J = [[0.5, 0.2], [0.1, 0.3]].
//! let j = array![[0.5f64, 0.2], [0.1, 0.3]];
//! let jt = j.t().to_owned();
//! let g = array![1.0, -1.0];
//! let (w, report) = gmres(&IdentityMinus::new(&jt), g.view(), None, &SolveOptions::default()).unwrap();
//! let report = report.into_result().unwrap();
//! assert!(report.residual <= 1e-10);
//! let check = &w - &jt.dot(&w);
//! assert!((check - g).iter().all(|r: &f64| r.abs() < 1e-9));
//! ```
#![deny(missing_docs)]

pub mod dense;
pub mod fixed_point;
pub mod krylov;
pub mod linop;
pub mod report;
pub mod spectral;
mod util;

pub use dense::{DenseLu, Lstsq, batched_solve, cholesky_solve, lstsq, lu_solve, lu_solve_transpose};
pub use fixed_point::{
    FixedPointOptions, FixedPointReport, NewtonKrylovOptions, anderson, broyden, flattened, newton_krylov,
    newton_krylov_with_jvp, picard,
};
pub use krylov::{anderson_neumann, bicgstab, cg, gmres, neumann};
pub use linop::{DenseOperator, FnOperator, IdentityMinus, LinearOperator, NormalOperator, Transposed};
pub use report::{SolveOptions, SolveReport, SolveStatus};
pub use spectral::{
    SpectralEstimate, SpectralOptions, largest_singular_value, smallest_singular_value, smallest_singular_value_dense,
    spectral_norm, spectral_norm_dense, spectral_radius,
};
