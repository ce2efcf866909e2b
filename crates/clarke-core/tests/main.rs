//! Integration tests of `clarke-core`, one module per subject, linked into one binary: each
//! integration test file would otherwise be its own binary, linked against the whole
//! dependency tree.

mod bad_input;
mod engine;
mod forward_mode;
mod fuzz;
mod hvp;
mod kink_selection;
mod mlp;
mod op_cases;
mod op_gradients;
mod paper_cases;
mod properties;
