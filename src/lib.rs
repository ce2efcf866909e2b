//! # clarke
//!
//! Automatic differentiation of nonsmooth programs and implicit layers.
//!
//! This facade re-exports the member crates:
//! - [`core`]: the tape, its nonsmooth ops with selectable conservative derivatives and the
//!   kink ledger;
//! - [`solve`]: linear, fixed-point and root solvers and spectral estimates;
//! - [`implicit`]: fixed-point and root layers differentiated by the nonsmooth implicit
//!   function theorem, with backward reports and the check of its hypothesis;
//! - [`nn`]: deep equilibrium and explicit layers, losses, optimisers, data loading and
//!   training helpers;
//! - [`convex`]: prox and projection ops, Lasso-type models and their hypergradients.
#![deny(missing_docs)]

pub use clarke_convex as convex;
pub use clarke_core as core;
pub use clarke_implicit as implicit;
pub use clarke_nn as nn;
pub use clarke_solve as solve;

/// The code blocks of the README, compiled and run as doctests so that they cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
