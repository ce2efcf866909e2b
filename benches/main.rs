//! Every criterion bench of clarke, in one binary: one optimised build instead of one per
//! bench. `cargo bench` runs them all; a filter after `--` picks by group name, for example
//! `cargo bench -- deq_step` or `cargo bench -- conic_qp`.
//!
//! The groups: `tape_overhead`, `elementwise_*`, `matmul_fwd_bwd`, `tape_vs_unrolled`,
//! `deq_step`, `conic_qp`, `conic_qp_raw` and `qp_layer` (see each module).
//!
//! With `CLARKE_PEER_DATA=DIR` set, `deq_step`, `conic_qp` and `qp_layer` also write their
//! problems to `DIR` for the peer scripts of `benches/peers/` (see `peer_data`); nothing else
//! changes.

mod conic_qp;
mod deq_step;
mod elementwise;
mod matmul;
mod peer_data;
mod qp_layer;
mod tape_overhead;
mod tape_vs_unrolled;

criterion::criterion_main!(
    tape_overhead::benches,
    elementwise::benches,
    matmul::benches,
    tape_vs_unrolled::benches,
    deq_step::benches,
    conic_qp::benches,
    qp_layer::benches,
);
