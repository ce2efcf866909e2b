//! Integration tests of `clarke-solve`, one module per subject, linked into one binary: each
//! integration test file would otherwise be its own binary, linked against the whole
//! dependency tree.

mod bad_input;
mod common;
mod dense;
mod fixed_point;
mod krylov;
mod linop;
mod spectral;
