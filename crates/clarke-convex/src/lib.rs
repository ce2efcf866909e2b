//! # clarke-convex
//!
//! Prox and projection ops with selectable conservative Jacobians, Lasso-type models with
//! fast inner solvers and hypergradients, and differentiable cone programs.
//!
//! - [`prox`], [`project`]: soft-thresholding, group soft-thresholding, box, non-negative
//!   orthant, simplex and l1-ball projections on the clarke tape. At their kinks the
//!   derivative is the kink policy's selection, and the kinks they hit are reported
//!   ([`kinks`]).
//! - [`model`], [`cd`]: the Lasso, the elastic net, the weighted Lasso (one `lambda` per
//!   feature) and sparse logistic regression, solved by coordinate descent with working
//!   sets, Anderson extrapolation and warm starts, stopped on the duality gap.
//! - [`hypergrad`]: `dC(beta_hat)/d log lambda` three ways: the generic implicit layer on
//!   the forward-backward map, the support-restricted solve of Prop. 5 of Bolte, Le, Pauwels
//!   and Silveti-Falls (NeurIPS 2021) with its hypothesis check, and unrolled ISTA in forward
//!   mode.
//! - [`search`]: gradient-based search on `log lambda` and a warm-started grid.
//! - [`cone`]: cone programs (zero, non-negative, second-order, PSD cones) with an ADMM
//!   solver, infeasibility detection and Newton refinement; forward and adjoint derivatives
//!   of the solution through the residual map of the embedding, with the hypothesis check;
//!   the conic layer on the tape; LP, QP, sparsemax, box and polytope constructors.
//! - [`data`]: a CSV reader, a centred train/validation split, synthetic sparse regression.
//!
//! ```
//! use clarke_convex::cd::{solve, CdOptions};
//! use clarke_convex::hypergrad::{hypergradient, HypergradOptions, Method, ValidationMse};
//! use clarke_convex::model::{LassoModel, LossScale, Penalty};
//! use ndarray::array;
//!
//! // T7 of the paper digest: a 2-feature Lasso with the unscaled data fit.
//! let a = array![[1.0, 0.5], [0.3, 1.0], [0.2, -0.4]];
//! let b = array![2.0, 0.5, -0.3];
//! let model = LassoModel::new(a.view(), b.view()).unwrap().with_loss_scale(LossScale::Sum);
//! let fit = solve(&model, &Penalty::Uniform(0.5), None, &CdOptions::default().with_tol(1e-14)).unwrap();
//! assert!((fit.beta[0] - 1.335473).abs() < 1e-6 && (fit.beta[1] - 0.112383).abs() < 1e-6);
//! // C(x) = (1/2)||x - (1, 0)||^2 is the validation MSE with X_val = I, y_val = (1, 0).
//! let val = ValidationMse::new(ndarray::Array2::eye(2).view(), array![1.0, 0.0].view()).unwrap();
//! let hg = hypergradient(&model, &fit, &val, Method::Support, &HypergradOptions::default()).unwrap();
//! assert!((hg.gradient[0] - -0.1291065).abs() < 1e-6);
//! ```
#![deny(missing_docs)]

pub mod cd;
pub mod cone;
pub mod data;
pub mod design;
pub mod hypergrad;
pub mod kinks;
pub mod model;
pub mod project;
pub mod prox;
pub mod search;

pub use cd::{CdOptions, Fit, FitStatus, solve};
pub use design::CscMatrix;
pub use hypergrad::{Criterion, HypergradOptions, Hypergradient, Method, SupportCheck, ValidationMse, hypergradient};
pub use kinks::{KinkSite, Prox};
pub use model::{LassoModel, Loss, LossScale, Penalty};
pub use search::{SearchOptions, Stepper, geometric_grid, gradient_search, grid_search, try_geometric_grid};
