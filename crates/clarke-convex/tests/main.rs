//! Integration tests of `clarke-convex`, one module per subject, linked into one binary: each
//! integration test file would otherwise be its own binary, linked against the whole
//! dependency tree.

mod bad_input;
mod cone;
mod forward_mode;
mod lasso;
mod prox_ops;
mod qp_layer;
mod sparse;
mod sparse_cone;
