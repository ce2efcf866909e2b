//! # clarke
//!
//! Automatic differentiation of nonsmooth programs and implicit layers.
//!
//! This facade re-exports the member crates. Start with [`core`].
#![deny(missing_docs)]

pub use clarke_core as core;
pub use clarke_solve as solve;
