//! # clarke-implicit
//!
//! Implicit layers on the clarke tape: `z* = T(z*, theta)` ([`ImplicitLayer::fixed_point`])
//! and `F(z*, theta) = 0` ([`ImplicitLayer::root`]), differentiated by the nonsmooth implicit
//! function theorem of Bolte, Le, Pauwels and Silveti-Falls (NeurIPS 2021).
//!
//! - **Forward** runs a solver from `clarke-solve` (Picard, Anderson, Broyden, Newton-Krylov)
//!   without recording; the outer tape gets one node holding `z*`, so its memory does not
//!   grow with the number of iterations.
//! - **Backward** records the map once at `(z*, theta)` on a short-lived tape, solves the
//!   adjoint `(I - J_z)^T w = g` (or `J_F^T w = g`) with products `J_z^T v` that replay that
//!   recording, and returns `J_theta^T w` (or `-J_theta^T w`). The kink policy of the outer
//!   backward call applies inside, so one policy governs the whole gradient.
//! - **Forward mode** ([`clarke_core::Tape::jvp`] through a layer) solves the tangent system
//!   `(I - J_z) dz = J_theta dtheta` (or `J_F dz = -J_theta dtheta`) with the adjoint's
//!   solver, after the same kink band, check and refusal as backward; products with `J_z`
//!   and `J_theta` are forward-mode replays of the map. Its reports are logged as
//!   [`Pass::ForwardMode`].
//! - **Modes** ([`GradientMode`]): implicit with a dense, Neumann, GMRES or BiCGSTAB adjoint;
//!   truncated Neumann; unrolled; one-step; and an opt-in least-squares mode that ignores the
//!   hypothesis, to reproduce the pathologies of the paper.
//! - **Reports** ([`BackwardReport`]): every backward leaves the forward and adjoint
//!   iterations and residuals, the kinks at `z*` and the [`check`] of the theorem's
//!   hypothesis (certified, warning or violated, with the numbers). A violated check
//!   refuses the backward pass by default; an unconverged solve is an error unless the
//!   options opt into a fallback, which the report records.
//!
//! ```
//! use clarke_core::{KinkPolicy, Tape};
//! use clarke_implicit::{CheckOutcome, ImplicitLayer, ImplicitOptions};
//! use ndarray::arr1;
//!
//! // T3 of the paper digest: y = relu(0.5 y + theta) at theta = 0 sits on the kink.
//! let layer = ImplicitLayer::fixed_point(|y, th| Ok((y * 0.5 + th[0]).relu()), ImplicitOptions::default()).unwrap();
//! for (slope, expected) in [(0.0, 0.0), (0.5, 2.0 / 3.0), (1.0, 2.0)] {
//!     let tape = Tape::<f64>::with_policy(KinkPolicy::pytorch().with_relu(slope)).unwrap();
//!     let theta = tape.param(arr1(&[0.0]).into_dyn());
//!     let y = layer.apply(&arr1(&[0.0]).into_dyn(), &[theta]).unwrap().z;
//!     let grads = y.sum().backward().unwrap();
//!     assert!((grads.wrt(theta).unwrap()[0] - expected).abs() < 1e-12);
//!     // Every element d/(1 - 0.5 d), d in [0, 1], is finite: the check certifies it.
//!     assert_eq!(layer.reports().last().unwrap().check.outcome, CheckOutcome::Certified);
//! }
//! ```
#![deny(missing_docs)]

mod adjoint;
pub mod check;
mod forward;
mod inner;
mod layer;
pub mod options;
pub mod report;

pub use inner::MapFn;
pub use layer::{ImplicitLayer, Solution, fixed_point, root};
pub use options::{
    AdjointSolver, CheckOptions, ForwardSolver, GradientMode, ImplicitOptions, KinkBand, OnAdjointFailure,
};
pub use report::{BackwardReport, CheckOutcome, HypothesisCheck, Pass, ReportLog};
