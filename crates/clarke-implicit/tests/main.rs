//! Integration tests of `clarke-implicit`, one module per subject, linked into one binary: each
//! integration test file would otherwise be its own binary, linked against the whole
//! dependency tree.

mod check;
mod errors;
mod forward_mode;
mod gradients;
mod matrix_free_check;
mod paper_cases;
mod solver_error;
