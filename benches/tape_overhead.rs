//! Tape overhead: a chain of 100,000 ops on one-element arrays, forward and backward.
//!
//! With one-element values the arithmetic is negligible, so the time per node is the cost
//! of recording a node (allocation of its value, the push) and of its backward step
//! (the rule, gradient accumulation). Each step of the chain records five nodes: two affine
//! maps, a relu, a product with a parameter, and a tanh or another affine map.

use std::hint::black_box;

use clarke::core::{Tape, Var};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use ndarray::arr1;

/// Records the chain on `tape`; returns the parameter `w` and the scalar output.
fn record_chain(tape: &Tape<f64>, nodes: usize) -> (Var<'_, f64>, Var<'_, f64>) {
    let x = tape.param(arr1(&[0.3]).into_dyn());
    let w = tape.param(arr1(&[0.999]).into_dyn());
    let mut h = x;
    for i in 0..nodes / 5 {
        h = (h * 1.0001 + 0.01).relu();
        h = h * w;
        h = if i % 2 == 0 { h.tanh() } else { h + 0.0 };
    }
    (w, h.sum())
}

fn chain(c: &mut Criterion) {
    let mut group = c.benchmark_group("tape_overhead");
    group.sample_size(20);
    for &nodes in &[10_000usize, 100_000] {
        group.throughput(Throughput::Elements(nodes as u64));
        group.bench_with_input(BenchmarkId::new("forward_backward", nodes), &nodes, |b, &nodes| {
            b.iter(|| {
                let tape = Tape::<f64>::with_capacity(nodes + 3);
                let (w, loss) = record_chain(&tape, nodes);
                let grads = loss.backward().unwrap();
                black_box(grads.wrt(w).unwrap()[0])
            })
        });
        group.bench_with_input(BenchmarkId::new("forward_only", nodes), &nodes, |b, &nodes| {
            b.iter(|| {
                let tape = Tape::<f64>::with_capacity(nodes + 3);
                black_box(record_chain(&tape, nodes).1.scalar())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, chain);
