//! relu, abs and maximum forward + backward against hand-written ndarray loops doing the same
//! arithmetic (the forward map and the masked gradient), from 1e3 to 1e6 elements.
//!
//! The baseline allocates the same arrays the tape does (the output and the input gradient)
//! but records nothing, checks nothing and keeps no ledger. Both use rayon above the same
//! size threshold ([`clarke::core::kernels::PARALLEL_ELEMENTS`]), so the ratio is the cost of
//! the tape, the policy lookup and the kink ledger.

use std::hint::black_box;

use clarke::core::Tape;
use clarke::core::kernels::PARALLEL_ELEMENTS;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use ndarray::{ArrayD, IxDyn, Zip};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn data(n: usize, seed: u64) -> ArrayD<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(&[n]), || rng.random_range(-1.0..1.0))
}

/// Hand-written relu forward + backward with upstream gradient `g`.
fn baseline_relu(x: &ArrayD<f64>, g: &ArrayD<f64>) -> (ArrayD<f64>, ArrayD<f64>) {
    if x.len() >= PARALLEL_ELEMENTS {
        let y = Zip::from(x).par_map_collect(|&v| v.max(0.0));
        let gx = Zip::from(g)
            .and(x)
            .par_map_collect(|&g, &v| if v > 0.0 { g } else { 0.0 });
        (y, gx)
    } else {
        let y = x.mapv(|v| v.max(0.0));
        let gx = Zip::from(g).and(x).map_collect(|&g, &v| if v > 0.0 { g } else { 0.0 });
        (y, gx)
    }
}

fn baseline_abs(x: &ArrayD<f64>, g: &ArrayD<f64>) -> (ArrayD<f64>, ArrayD<f64>) {
    if x.len() >= PARALLEL_ELEMENTS {
        let y = Zip::from(x).par_map_collect(|&v| v.abs());
        let gx = Zip::from(g).and(x).par_map_collect(|&g, &v| g * v.signum());
        (y, gx)
    } else {
        let y = x.mapv(f64::abs);
        let gx = Zip::from(g).and(x).map_collect(|&g, &v| g * v.signum());
        (y, gx)
    }
}

fn baseline_max(a: &ArrayD<f64>, b: &ArrayD<f64>, g: &ArrayD<f64>) -> (ArrayD<f64>, ArrayD<f64>, ArrayD<f64>) {
    let y = Zip::from(a).and(b).map_collect(|&a, &b| a.max(b));
    let ga = Zip::from(g)
        .and(a)
        .and(b)
        .map_collect(|&g, &a, &b| if a > b { g } else { 0.0 });
    let gb = Zip::from(g)
        .and(a)
        .and(b)
        .map_collect(|&g, &a, &b| if a > b { 0.0 } else { g });
    (y, ga, gb)
}

fn elementwise(c: &mut Criterion) {
    for op in ["relu", "abs", "maximum"] {
        let mut group = c.benchmark_group(format!("elementwise_{op}"));
        for &n in &[1_000usize, 10_000, 100_000, 1_000_000] {
            let x = data(n, 1);
            let other = data(n, 2);
            let seed = ArrayD::from_elem(IxDyn(&[n]), 1.5);
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(BenchmarkId::new("clarke", n), &n, |bch, _| {
                bch.iter(|| {
                    let tape = Tape::<f64>::new();
                    let xv = tape.param(x.clone());
                    let y = match op {
                        "relu" => xv.relu(),
                        "abs" => xv.abs(),
                        _ => xv.maximum(tape.param(other.clone())),
                    };
                    let grads = y.backward_seeded(seed.clone()).unwrap();
                    black_box(grads.ledger().exact_hits())
                })
            });
            group.bench_with_input(BenchmarkId::new("ndarray_loop", n), &n, |bch, _| {
                bch.iter(|| {
                    // The same copies the tape makes: the input values and the seed.
                    let (xc, gc) = (x.clone(), seed.clone());
                    match op {
                        "relu" => black_box(baseline_relu(&xc, &gc)).0.len(),
                        "abs" => black_box(baseline_abs(&xc, &gc)).0.len(),
                        _ => black_box(baseline_max(&xc, &other.clone(), &gc)).0.len(),
                    }
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, elementwise);
