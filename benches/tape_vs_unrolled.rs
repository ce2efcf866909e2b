//! A DEQ layer Z = relu(Z W^T + X U^T + b) differentiated three ways: implicit with 30
//! Neumann adjoint terms, implicit with GMRES to 1e-8, and 30 iterations unrolled on the
//! tape. W has spectral norm 0.9; the loss is sum(Z * C) for a fixed C; the forward runs 30
//! Picard iterations. Sizes (B, d, n): batch, input and hidden widths.
//!
//! Also measured in the same run: one f64 GEMM of the layer's main shape (B x n times n x n),
//! to express a whole implicit step as a fraction of the GEMM throughput, and (printed before
//! the timings) the bytes the tape holds for K = 10, 30, 100 iterations.

use std::hint::black_box;

use clarke::core::gemm::gemm;
use clarke::core::{Result, Tape, Var};
use clarke::implicit::{AdjointSolver, CheckOptions, ForwardSolver, GradientMode, ImplicitLayer, ImplicitOptions};
use clarke::solve::SolveOptions;
use criterion::{BenchmarkId, Criterion, criterion_group};
use ndarray::{Array1, Array2, ArrayD};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIZES: [(usize, usize, usize); 3] = [(64, 64, 64), (128, 64, 256), (256, 256, 512)];
const FORWARD_ITERATIONS: usize = 30;

fn random(rows: usize, cols: usize, seed: u64) -> Array2<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Array2::from_shape_simple_fn((rows, cols), || rng.random_range(-1.0..1.0))
}

/// `a` scaled to spectral norm `target` (power iteration on a^T a).
fn with_spectral_norm(a: Array2<f64>, target: f64) -> Array2<f64> {
    let mut v = Array1::from_elem(a.ncols(), 1.0);
    for _ in 0..200 {
        let w = a.t().dot(&a.dot(&v));
        v = &w / w.dot(&w).sqrt();
    }
    let norm = a.dot(&v).dot(&a.dot(&v)).sqrt();
    a * (target / norm)
}

struct Problem {
    w: ArrayD<f64>,
    x: ArrayD<f64>,
    u: ArrayD<f64>,
    b: ArrayD<f64>,
    c: ArrayD<f64>,
    z0: ArrayD<f64>,
}

impl Problem {
    fn new((batch, d, n): (usize, usize, usize)) -> Self {
        Problem {
            w: with_spectral_norm(random(n, n, 1), 0.9).into_dyn(),
            x: random(batch, d, 2).into_dyn(),
            u: (random(n, d, 3) / (d as f64).sqrt()).into_dyn(),
            b: (random(1, n, 4).into_shape_with_order(n).unwrap() * 0.1).into_dyn(),
            c: random(batch, n, 5).into_dyn(),
            z0: Array2::<f64>::zeros((batch, n)).into_dyn(),
        }
    }
}

/// The layer's map with the input injection X U^T + b precomputed: relu(Z W^T + inj).
fn deq_map<'s>(z: Var<'s, f64>, theta: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    Ok((z.matmul(theta[0].t()) + theta[1]).relu())
}

fn layer(mode: GradientMode, iterations: usize) -> ImplicitLayer<f64> {
    let options = ImplicitOptions::default()
        .with_mode(mode)
        .with_forward_solver(ForwardSolver::Picard)
        .with_fixed_forward_iterations(iterations)
        .with_adjoint(SolveOptions {
            tol: 1e-8,
            ..Default::default()
        })
        // ||W|| = 0.9 and relu is 1-Lipschitz: a contraction for every selection.
        .with_check(CheckOptions::default().with_contraction_bound(0.9));
    ImplicitLayer::fixed_point(deq_map, options).expect("valid options")
}

/// One training step: forward, loss, backward; returns a gradient entry and the tape bytes.
fn step(layer: &ImplicitLayer<f64>, p: &Problem) -> (f64, usize) {
    let tape = Tape::<f64>::new();
    let (w, x, u, b) = (
        tape.param(p.w.clone()),
        tape.param(p.x.clone()),
        tape.param(p.u.clone()),
        tape.param(p.b.clone()),
    );
    let injection = x.matmul(u.t()) + b;
    let z = layer.apply(&p.z0, &[w, injection]).expect("forward").z;
    let loss = (z * tape.constant(p.c.clone())).sum();
    let bytes = tape.value_bytes();
    let grads = loss.backward().expect("backward");
    (grads.wrt(w).expect("W gradient")[[0, 0]], bytes)
}

fn modes() -> [(&'static str, GradientMode); 3] {
    [
        ("implicit_neumann30", GradientMode::TruncatedNeumann { terms: 30 }),
        ("implicit_gmres", GradientMode::Implicit(AdjointSolver::Gmres)),
        (
            "unrolled30",
            GradientMode::Unrolled {
                iterations: FORWARD_ITERATIONS,
            },
        ),
    ]
}

/// Tape bytes for K = 10, 30, 100 at the smallest size, printed once.
fn print_memory() {
    let p = Problem::new(SIZES[0]);
    eprintln!("tape bytes at (B, d, n) = {:?}:", SIZES[0]);
    for k in [10, 30, 100] {
        let implicit = step(&layer(GradientMode::TruncatedNeumann { terms: 30 }, k), &p).1;
        let unrolled = step(&layer(GradientMode::Unrolled { iterations: k }, k), &p).1;
        eprintln!("  K = {k:>3}: implicit {implicit:>10} B, unrolled {unrolled:>10} B");
    }
    let largest = Problem::new(SIZES[2]);
    for (name, mode) in modes() {
        let l = layer(mode, FORWARD_ITERATIONS);
        let started = std::time::Instant::now();
        step(&l, &largest);
        eprintln!("{name} at {:?}, one step in {:.1?}:", SIZES[2], started.elapsed());
        if let Some(report) = l.reports().last() {
            eprintln!("{report}");
        }
    }
}

fn deq(c: &mut Criterion) {
    print_memory();
    let mut group = c.benchmark_group("tape_vs_unrolled");
    group.sample_size(10);
    for size in SIZES {
        let (batch, d, n) = size;
        let p = Problem::new(size);
        let label = format!("{batch}x{d}x{n}");
        for (name, mode) in modes() {
            let l = layer(mode, FORWARD_ITERATIONS);
            group.bench_with_input(BenchmarkId::new(name, &label), &size, |bch, _| {
                bch.iter(|| black_box(step(&l, &p).0))
            });
        }
        // The reference GEMM: (B x n) times (n x n), the product every iteration does.
        let (z, w) = (random(batch, n, 6), random(n, n, 7));
        group.bench_with_input(BenchmarkId::new("gemm_reference", &label), &size, |bch, _| {
            let mut out = Array2::zeros((batch, n));
            bch.iter(|| {
                gemm(1.0, z.view(), w.t(), false, out.view_mut());
                black_box(out[[0, 0]])
            })
        });
    }
    group.finish();
}

criterion_group!(benches, deq);
