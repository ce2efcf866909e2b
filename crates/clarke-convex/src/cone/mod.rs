//! Differentiable cone programs: a solver, the derivative of the solution map, its
//! hypothesis check, and the conic layer on the tape.
//!
//! ```text
//! minimise (1/2) x^T P x + c^T x   subject to   A x + s = b,  s in K
//! ```
//!
//! with `K` a product of zero, non-negative, second-order and PSD cones ([`cones`]).
//!
//! - [`problem`]: the program and constructors for LPs, QPs, and the projection layers
//!   people use (sparsemax / simplex, box, polytope).
//! - [`solver`]: ADMM (a fixed point of a nonsmooth map built from `Pi_K`) with
//!   infeasibility and unboundedness certificates, then Newton refinement on the residual
//!   map.
//! - [`residual`]: the residual map `N(z) = (Q - I) Pi(z) + z + (c, b)` and its Jacobian
//!   `M = (Q - I) J + I`.
//! - [`derivative`]: forward and adjoint derivatives with respect to `(P, A, b, c)`, dense
//!   or matrix-free.
//! - [`check`]: strict complementarity per cone and the invertibility of `M` for every
//!   selection at the kinks (certified / warning / violated).
//! - [`layer`]: [`cone_program`] and [`quadratic_cone_program`] on the tape, batched.
//! - [`qp_layer`](mod@qp_layer): [`qp_layer()`], the QP `min 1/2 x^T Q x + p^T x` s.t.
//!   `A x = b`, `l <= G x <= u` on the tape (optional blocks, infinite bounds, batched), mapped
//!   to a cone program and differentiated by the layer above; infeasible samples are refused
//!   or replaced by their closest feasible QP.
//!
//! ```
//! use clarke_convex::cone::{simplex_projection, solve, ConeDerivative, DerivativeOptions, SolutionDirection, SolverOptions};
//! use ndarray::array;
//!
//! // sparsemax(u) as a QP: the projection of u onto the simplex.
//! let u = array![0.9, 0.4, -0.5];
//! let prog = simplex_projection(u.view(), 1.0).unwrap();
//! let sol = solve(&prog, &SolverOptions::default(), None).unwrap();
//! assert!((&sol.x - &array![0.75, 0.25, 0.0]).iter().all(|d| d.abs() < 1e-12));
//! // d x_0 / d u: the gradient of x_0 with respect to c = -u, negated.
//! let d = ConeDerivative::new(&prog, &sol, 0.0, &DerivativeOptions::default()).unwrap();
//! let g = SolutionDirection { x: array![1.0, 0.0, 0.0], y: array![0.0, 0.0, 0.0, 0.0], s: array![0.0, 0.0, 0.0, 0.0] };
//! let grad_u = -d.adjoint(&g).unwrap().c;
//! assert!((&grad_u - &array![0.5, -0.5, 0.0]).iter().all(|d| d.abs() < 1e-10));
//! assert_eq!(d.check().outcome(), clarke_implicit::CheckOutcome::Certified);
//! ```

pub mod check;
pub mod cones;
pub mod derivative;
pub mod layer;
pub mod problem;
pub mod qp_layer;
pub mod residual;
pub mod solver;
mod sparse;

pub use check::{ConeMargin, ConicCheck};
pub use cones::{Boundary, BoundaryKind, Cone, Cones, ProjectionJacobian, smat, svec};
pub use derivative::SparseDataDirection;
pub use derivative::{
    ConeDerivative, DataDirection, DataGradient, DerivativeOptions, DerivativeSolver, SolutionDirection,
};
pub use layer::{
    ConicBackwardReport, ConicLayer, ConicLayerOptions, ConicLog, QuadraticTerm, cone_program, quadratic_cone_program,
};
pub use problem::SparseData;
pub use problem::{ConeProgram, box_projection, lp, polytope_projection, qp, simplex_projection};
pub use qp_layer::{
    ClosestFeasible, InfeasibleMode, QpData, QpForwardReport, QpLayer, QpLayerOptions, QpRow, QpSampleReport,
    QpSolution, qp_layer,
};
pub use solver::{ConeSolution, ConeStatus, Refinement, Residuals, SolverOptions, WarmStart, solve};
