//! matmul forward + backward against the three GEMMs it needs (C = A B, dA = G B^T,
//! dB = A^T G) called directly on the same kernel, for n = 64, 256, 1024 (f64).

use std::hint::black_box;

use clarke::core::Tape;
use clarke::core::gemm::gemm;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use ndarray::{Array2, ArrayD};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(n: usize, seed: u64) -> Array2<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Array2::from_shape_simple_fn((n, n), || rng.random_range(-1.0..1.0))
}

fn matmul(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul_fwd_bwd");
    for &n in &[64usize, 256, 1024] {
        if n >= 1024 {
            group.sample_size(10);
        }
        let (a, b, g) = (random(n, 1), random(n, 2), random(n, 3));
        group.throughput(Throughput::Elements(3 * 2 * (n * n * n) as u64)); // flops
        group.bench_with_input(BenchmarkId::new("clarke", n), &n, |bch, _| {
            let seed: ArrayD<f64> = g.clone().into_dyn();
            bch.iter(|| {
                let tape = Tape::<f64>::new();
                let av = tape.param(a.clone().into_dyn());
                let bv = tape.param(b.clone().into_dyn());
                let y = av.matmul(bv);
                let grads = y.backward_seeded(seed.clone()).unwrap();
                black_box(grads.wrt(av).unwrap()[[0, 0]])
            })
        });
        group.bench_with_input(BenchmarkId::new("three_gemms", n), &n, |bch, _| {
            bch.iter(|| {
                let (ac, bc, gc) = (a.clone(), b.clone(), g.clone());
                let mut y = Array2::zeros((n, n));
                let mut ga = Array2::zeros((n, n));
                let mut gb = Array2::zeros((n, n));
                gemm(1.0, ac.view(), bc.view(), false, y.view_mut());
                gemm(1.0, gc.view(), bc.t(), false, ga.view_mut());
                gemm(1.0, ac.t(), gc.view(), false, gb.view_mut());
                black_box((y[[0, 0]], ga[[0, 0]], gb[[0, 0]]))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, matmul);
