//! # clarke-nn
//!
//! Neural-network building blocks on the clarke tape, centred on deep equilibrium layers
//! whose implicit gradients are valid through relu kinks.
//!
//! - [`deq`]: `z* = sigma(W z* + U x + b)` with one fixed point per sample, two
//!   parametrisations of `W` that guarantee the hypothesis of the nonsmooth implicit function
//!   theorem for every selection at kinks (spectral norm below one, monotone), fused batched
//!   forward and adjoint solvers, unrolled and one-step modes, and a report of every backward.
//! - [`Linear`], seeded [`init`]ialisers; losses come from the tape
//!   (`Var::softmax_cross_entropy`).
//! - [`optim`]: SGD with momentum and step schedules (including vanishing steps), Adam.
//! - [`data`]: a CSV loader, feature scaling, index splits, seeded mini-batches.
//! - [`train`]: accuracy, per-epoch history, a progress display; [`plot`]: PNG curves.
//! - [`ParamSet`]: named parameters, bound to each step's tape, saved and loaded as JSON.
#![deny(missing_docs)]

pub mod data;
pub mod deq;
pub mod init;
mod linear;
pub mod optim;
mod params;
pub mod plot;
pub mod train;

pub use linear::Linear;
pub use params::{Bound, ParamId, ParamSet};
