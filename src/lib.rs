//! # clarke
//!
//! Automatic differentiation of nonsmooth programs and implicit layers.
//!
//! This facade re-exports the member crates:
//! - [`core`]: the tape, its nonsmooth ops with selectable conservative derivatives and the
//!   kink ledger;
//! - [`solve`]: linear, fixed-point and root solvers and spectral estimates;
//! - [`implicit`]: fixed-point and root layers differentiated by the nonsmooth implicit
//!   function theorem, with backward reports and the check of its hypothesis.
#![deny(missing_docs)]

pub use clarke_core as core;
pub use clarke_implicit as implicit;
pub use clarke_solve as solve;
