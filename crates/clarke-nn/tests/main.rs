//! Integration tests of `clarke-nn`, one module per subject, linked into one binary: each
//! integration test file would otherwise be its own binary, linked against the whole
//! dependency tree.

mod bad_input;
mod deq;
mod deq_forward_mode;
mod threads;
mod training;
