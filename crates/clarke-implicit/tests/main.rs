//! Integration tests of `clarke-implicit`, one module per subject, linked into one binary: each
//! integration test file would otherwise be its own binary, linked against the whole
//! dependency tree.

mod check;
mod errors;
mod gradients;
mod paper_cases;
mod solver_error;
